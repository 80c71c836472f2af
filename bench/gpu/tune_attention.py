"""Tune the Triton attention kernel's launch configs on the GPU at hand.

    python -m sdiff.bench.gpu.tune_attention --out tuned.json --csv tune.csv [--time-budget 150]

For head dims 64 and 128 (bf16, width 2048 as in ``bench_attention.py``) and two length regimes
("short": N = 256, batch 64, the U-ViT's 16x16 tokens; "long": N = 4096, batch 4), it times a
short list of (BLOCK_M, BLOCK_N, warps, stages) candidates for each of the three kernels with
``triton.testing.do_bench`` (median): the forward alone, then the backward (dK/dV kernel and dQ
kernel timed together, by coordinate descent: dK/dV candidates with dQ at its default, then dQ
candidates with dK/dV at its winner). SDPA's flash backend at the same shapes is timed beside
them for scale. A candidate that does not compile (shared memory) gets its error in the CSV.

Writes the winners as JSON of the shape of ``kernels.attention.LAUNCH_CONFIGS`` (the kernel reads
it through ``SDIFF_ATTN_CONFIG``) and every timing to CSV; the committed table in
``kernels/attention.py`` is copied from a run of this script.
"""

# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
from __future__ import annotations

import argparse
import json
import math
import os
import time
from functools import partial

import torch
import torch.nn.functional as F

from sdiff.kernels import attention as ka
from sdiff.util.cli_args import ExtendList
from sdiff.util.files import atomic_write_text, write_csv

SHAPES = {"short": (256, 64), "long": (4096, 4)}  # regime -> (seq_len, batch)
WIDTH = 2048

_C = lambda m, n, w, s: {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}  # noqa: E731
CANDIDATES = {
    "fwd": {
        64: [_C(128, 64, 4, 3), _C(128, 64, 4, 4), _C(128, 128, 4, 3), _C(128, 128, 8, 3),
             _C(128, 32, 4, 4), _C(64, 64, 4, 3), _C(64, 128, 4, 3), _C(128, 64, 8, 3),
             _C(64, 32, 4, 3), _C(64, 64, 4, 4)],
        128: [_C(128, 64, 8, 2), _C(128, 64, 8, 3), _C(128, 64, 4, 3), _C(128, 128, 8, 2),
              _C(128, 128, 8, 3), _C(128, 32, 4, 3), _C(64, 64, 4, 3), _C(64, 128, 4, 2),
              _C(64, 32, 4, 3), _C(64, 64, 4, 4)],
    },
    # dK/dV: BLOCK_N keys per program (outer), BLOCK_M queries per inner step
    "dkdv": {
        64: [_C(64, 64, 4, 2), _C(32, 128, 4, 2), _C(32, 128, 8, 2), _C(64, 128, 8, 2),
             _C(32, 64, 4, 3), _C(64, 64, 8, 3), _C(16, 128, 4, 2), _C(64, 128, 4, 2),
             _C(32, 64, 4, 4), _C(32, 32, 4, 3)],
        128: [_C(64, 64, 8, 2), _C(32, 128, 4, 2), _C(32, 128, 8, 2), _C(64, 128, 8, 2),
              _C(32, 64, 4, 3), _C(64, 64, 4, 2), _C(16, 128, 4, 2), _C(64, 128, 8, 1),
              _C(32, 64, 4, 4), _C(32, 32, 4, 3)],
    },
    # dQ: BLOCK_M queries per program (outer), BLOCK_N keys per inner step
    "dq": {
        64: [_C(64, 64, 4, 2), _C(128, 32, 4, 2), _C(128, 32, 8, 2), _C(128, 64, 8, 2),
             _C(64, 32, 4, 3), _C(64, 64, 8, 3), _C(128, 16, 4, 2), _C(128, 64, 4, 2),
             _C(64, 32, 4, 4), _C(32, 64, 4, 3)],
        128: [_C(64, 64, 8, 2), _C(128, 32, 4, 2), _C(128, 32, 8, 2), _C(128, 64, 8, 2),
              _C(64, 32, 4, 3), _C(64, 64, 4, 2), _C(128, 16, 4, 2), _C(128, 64, 8, 1),
              _C(64, 32, 4, 4), _C(32, 64, 4, 3)],
    },
}  # fmt: skip


def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="winners, JSON")
    p.add_argument("--csv", required=True, help="every timing")
    p.add_argument("--time-budget", type=float, default=180.0, help="seconds; then stop")
    p.add_argument("--head-dims", type=int, nargs="+", action=ExtendList, default=[64, 128])
    args = p.parse_args(argv)
    start = time.time()
    dev = os.environ.get("TUNE_DEVICE", "cuda")
    gpu = torch.cuda.get_device_name(0)
    rows: list[dict] = []
    winners: dict = {"fwd": {}, "dkdv": {}, "dq": {}}

    def record(**row):
        rows.append({"gpu": gpu, **row})
        shown = (
            f"{row['ms']:.4f} ms {row.get('tflops', 0):7.1f} TFLOP/s"
            if row["ms"]
            else row["status"]
        )
        print(f"{row['kind']:5} D={row['head_dim']:<4} {row['regime']:5} {row['config']:28} "
              f"{shown}", flush=True)  # fmt: skip

    def current(d, regime):
        return {k: {d: {regime: winners[k].get(d, {}).get(regime) or
                        ka.LAUNCH_CONFIGS[k][d][regime]}} for k in winners}  # fmt: skip

    for d in args.head_dims:
        for regime, (n, b) in SHAPES.items():
            h = WIDTH // d
            gen = torch.Generator(device=dev).manual_seed(0)
            q, k, v, dout = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16,
                                         generator=gen) for _ in range(4))  # fmt: skip
            scale = 1.0 / math.sqrt(d)
            fl_fwd = 4 * b * h * n * n * d
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ms = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            record(kind="sdpa-flash-fwd", head_dim=d, regime=regime, seq_len=n, batch=b,
                   config="", ms=ms, tflops=fl_fwd / ms / 1e9, status="ok")  # fmt: skip
            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(qg, kg, vg)
                ms = bench_ms(lambda: torch.autograd.grad(o, (qg, kg, vg), dout,
                                                          retain_graph=True))  # fmt: skip
            record(kind="sdpa-flash-bwd", head_dim=d, regime=regime, seq_len=n, batch=b,
                   config="", ms=ms, tflops=2.5 * fl_fwd / ms / 1e9, status="ok")  # fmt: skip
            for kind in ("fwd", "dkdv", "dq"):
                best = None
                for cfg in CANDIDATES[kind][d]:
                    if time.time() - start > args.time_budget:
                        print("time budget spent; stopping the search", flush=True)
                        break
                    trial = current(d, regime)
                    trial[kind][d][regime] = cfg
                    label = "m{BLOCK_M} n{BLOCK_N} w{num_warps} s{num_stages}".format(**cfg)
                    try:
                        if kind == "fwd":
                            ms = bench_ms(partial(ka._forward, q, k, v, None, scale,
                                                  launch_configs=trial))  # fmt: skip
                            flops = fl_fwd
                        else:
                            out, lse = ka._forward(q, k, v, None, scale, launch_configs=trial)
                            ms = bench_ms(partial(ka._backward, dout, q, k, v, None, out, lse,
                                                  scale, launch_configs=trial))  # fmt: skip
                            flops = 2.5 * fl_fwd
                        tflops = flops / ms / 1e9
                        record(kind=kind, head_dim=d, regime=regime, seq_len=n, batch=b,
                               config=label, ms=ms, tflops=tflops, status="ok")  # fmt: skip
                        if best is None or ms < best[0]:
                            best = (ms, cfg)
                    except Exception as err:  # out of shared memory, etc.: record, go on
                        msg = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
                        record(kind=kind, head_dim=d, regime=regime, seq_len=n, batch=b,
                               config=label, ms=None, status=msg)  # fmt: skip
                    finally:
                        torch.cuda.synchronize()
                if best is not None:
                    winners[kind].setdefault(d, {})[regime] = best[1]
    atomic_write_text(args.out, json.dumps(winners, indent=1))
    fields = ["gpu", "kind", "head_dim", "regime", "seq_len", "batch", "config", "ms", "tflops",
              "status"]  # fmt: skip
    write_csv(args.csv, fields, rows)
    print(json.dumps(winners))
    print(f"tuned in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
