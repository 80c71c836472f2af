"""Attention throughput: sdiff's Triton kernel vs SDPA with each backend forced vs xformers.

    python bench/bench_attention.py                      # CUDA, bf16, head dims 64 and 128
    python bench/bench_attention.py --csv out.csv --markdown out.md

FLOPs (non-causal): forward 4 B H N^2 D (two matmuls of 2 B H N^2 D each); backward 2.5x the
forward (five N^2 matmuls); forward+backward 3.5x. TFLOP/s = FLOPs / median time. The batch is
chosen so that B x N = ``--tokens`` (16k by default) and H = width / D with width 2048, the
U-ViT L transformer's: at N = 256 (its 16x16 tokens) that is B = 64.

Each backend runs in the same process on the same inputs, one shape after another, so ratios
are side by side; timing is ``triton.testing.do_bench`` (CUDA events, warm-up, median) on a GPU
and ``time.perf_counter`` medians on the CPU (only for smoke tests of this script). A backend
that cannot run a shape (not built for this GPU, out of memory, unsupported head dim) gets a row
with its reason instead of a number. Rows go to CSV with the GPU name, torch and triton versions,
git SHA and date; a table is printed (and written as markdown with ``--markdown``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdiff.util.cli_args import ExtendList, show_defaults
from sdiff.util.files import append_csv_row, atomic_write_text, ensure_folder
from sdiff.util.provenance import git_sha
from sdiff.util.tables import markdown_table

SDPA = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-math": "MATH",
}
BACKENDS = ["triton", *SDPA, "xformers"]
MODES = ("fwd", "fwd+bwd")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def attention_fn(backend: str):
    """q, k, v (B, H, N, D) -> out, through one forced backend."""
    if backend == "triton":
        from sdiff.kernels.attention import flash_attention

        return flash_attention
    if backend == "xformers":
        import xformers.ops as xops

        def run(q, k, v):
            return xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            ).transpose(1, 2)

        return run
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA[backend])

    def run(q, k, v):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def time_ms(fn, device: str, cpu_reps: int = 5) -> float:
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_one(backend, mode, b, h, n, d, dtype, device) -> dict:
    row = {"backend": backend, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
           "batch": b, "heads": h, "seq_len": n, "head_dim": d}  # fmt: skip
    flops = 4 * b * h * n * n * d * (1.0 if mode == "fwd" else 3.5)
    try:
        fn = attention_fn(backend)
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
                   for _ in range(3))  # fmt: skip
        if mode == "fwd":
            with torch.no_grad():
                ms = time_ms(lambda: fn(q, k, v), device)
        else:
            q, k, v = (x.requires_grad_(True) for x in (q, k, v))
            grad = torch.randn_like(q)

            def step():
                for x in (q, k, v):
                    x.grad = None
                fn(q, k, v).backward(grad)

            ms = time_ms(step, device)
        row.update(ms=float(f"{ms:.5g}"), tflops=float(f"{flops / ms / 1e9:.4g}"), status="ok")
    except Exception as err:  # report and go on: one backend must not stop the table
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        row.update(ms=None, tflops=None, status=f"unavailable: {reason}")
    finally:
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: list[dict]) -> None:
    """ratio_flash / ratio_cudnn / ratio_best_sdpa: this row's TFLOP/s over theirs, same shape."""
    key = lambda r: (r["mode"], r["seq_len"], r["head_dim"])  # noqa: E731
    by = {}
    for r in rows:
        if r["tflops"]:
            by.setdefault(key(r), {})[r["backend"]] = r["tflops"]
    for r in rows:
        shape = by.get(key(r), {})
        best = max((v for b, v in shape.items() if b.startswith("sdpa")), default=None)
        refs = {"ratio_flash": shape.get("sdpa-flash"), "ratio_cudnn": shape.get("sdpa-cudnn"),
                "ratio_best_sdpa": best}  # fmt: skip
        for name, ref in refs.items():
            r[name] = round(r["tflops"] / ref, 3) if r["tflops"] and ref else None


def markdown(rows: list[dict], meta: dict) -> str:
    head = (f"# Attention TFLOP/s on {meta['device']}\n\n{meta['dtype']}, non-causal; torch "
            f"{meta['torch']}, triton {meta['triton']}, git {meta['git_sha']}, {meta['date']}. "
            f"FLOPs: forward 4 B H N^2 D, backward 2.5x forward.\n\n")  # fmt: skip
    cols = ["mode", "head_dim", "seq_len", "batch", "heads", "backend", "ms", "tflops",
            "ratio_flash", "ratio_cudnn", "ratio_best_sdpa", "status"]  # fmt: skip
    return head + markdown_table(cols, [[r.get(c) for c in cols] for r in rows], right=range(1, 11))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--head-dims", type=int, nargs="+", action=ExtendList, default=[64, 128])
    p.add_argument("--lengths", type=int, nargs="+", action=ExtendList,
                   default=[256, 1024, 2048, 4096, 8192, 16384])  # fmt: skip
    p.add_argument("--tokens", type=int, default=16384, help="batch x sequence length")
    p.add_argument("--width", type=int, default=2048, help="heads = width / head dim")
    p.add_argument("--backends", nargs="+", action=ExtendList, default=BACKENDS, choices=BACKENDS)
    p.add_argument("--modes", nargs="+", action=ExtendList, default=list(MODES), choices=MODES)
    p.add_argument("--max-math-len", type=int, default=4096, help="skip sdpa-math above this")
    p.add_argument("--csv", default="runs/bench/attention.csv")
    p.add_argument("--markdown")
    args = show_defaults(p).parse_args(argv)
    dtype = getattr(torch, args.dtype)
    meta = {
        "device": device_name(args.device),
        "dtype": args.dtype,
        "torch": str(torch.__version__),
        "triton": _triton_version(),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d"),
    }
    backends = [b for b in args.backends if b != "xformers" or _has_xformers()]
    rows = []
    for mode in args.modes:
        for d in args.head_dims:
            for n in args.lengths:
                b, h = max(1, args.tokens // n), max(1, args.width // d)
                for backend in backends:
                    if backend == "sdpa-math" and n > args.max_math_len:
                        continue
                    row = bench_one(backend, mode, b, h, n, d, dtype, args.device)
                    rows.append({**row, **meta})
                    shown = f"{row['tflops']:8.1f} TFLOP/s" if row["tflops"] else row["status"]
                    print(f"{mode:8} D={d:<4} N={n:<6} {backend:15} {shown}", flush=True)
    add_ratios(rows)
    path = ensure_folder(Path(args.csv).parent) / Path(args.csv).name
    for row in rows:
        append_csv_row(path, list(rows[0]), row)
    table = markdown(rows, meta)
    print("\n" + table)
    if args.markdown:
        atomic_write_text(args.markdown, table)
    print(f"rows appended to {path}")
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _has_xformers() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
