"""Write kernel_attention_golden.pt: the Triton attention kernel's outputs in the interpreter.

    .venv/bin/python tests/data/make_kernel_golden.py

Runs ``sdiff.kernels.attention`` in the Triton interpreter (CPU) on a few small fixed-seed cases
and saves the forward output and log-sum-exp and the backward's dQ, dK and dV of each.
tests/test_kernels_attention.py reruns the same cases and asserts that the kernel reproduces
the saved tensors bit for bit: a change to the kernel that must not change its numerics (a
refactor) is checked against them. Regenerate only from a kernel whose numerics are the ones
to keep. The outputs depend on the interpreter's CPU arithmetic (numpy), so the file holds for
this project's locked environment.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

GOLDEN = Path(__file__).with_name("kernel_attention_golden.pt")
OUTPUTS = ("out", "lse", "dq", "dk", "dv")

# name -> (batch, heads, query length, key length, head dim, dtype, padding, layout, blocks).
# padding: None, or per example the first padded key (the key length: none; 0: all padded).
# layout: "dense" (B, H, L, D) tensors, or "fused" q, k, v as chunks of one (B, H, L, 3D)
# tensor (non-dense views). blocks: None (the launch config the kernel picks under the
# interpreter, 64 x 64) or (BLOCK_M, BLOCK_N) for the forward, dK/dV and dQ kernels.
CASES: dict[str, tuple] = {
    "fp32-d16-ragged": (2, 2, 77, 77, 16, torch.float32, None, "dense", None),
    "fp32-d32-cross-padded": (2, 1, 100, 130, 32, torch.float32, (90, 0), "dense", None),
    "fp16-d64-even-keys": (1, 2, 96, 128, 64, torch.float16, None, "dense", None),
    "bf16-d32-padded": (2, 1, 77, 64, 32, torch.bfloat16, (64, 30), "dense", None),
    "bf16-d128-one-past-block": (1, 1, 65, 65, 128, torch.bfloat16, None, "dense", None),
    "fp32-d64-fused-qkv": (1, 2, 50, 50, 64, torch.float32, None, "fused", None),
    "fp32-d32-blocks-32x16-padded": (1, 2, 77, 70, 32, torch.float32, (61,), "dense", (32, 16)),
    "fp16-d16-blocks-16x32-even": (1, 1, 100, 96, 16, torch.float16, None, "dense", (16, 32)),
}


def inputs(case: tuple, seed: int = 0):
    """q, k, v, dout and the key padding mask (or None) of one case."""
    b, h, lq, lk, d, dtype, padding, layout, _ = case
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for n in (lq, lk, lk))
    dout = torch.randn(b, h, lq, d, generator=gen).to(dtype)
    if layout == "fused":
        assert lq == lk
        q, k, v = torch.cat([q, k, v], dim=-1).to(dtype).chunk(3, dim=-1)  # (B, H, L, D) views
    else:
        q, k, v = (x.to(dtype) for x in (q, k, v))
    mask = None
    if padding is not None:
        mask = torch.arange(lk)[None, :] >= torch.tensor(padding)[:, None]  # (B, Lk)
    return q, k, v, dout, mask


def run_case(case: tuple) -> dict[str, torch.Tensor]:
    """The kernel's out, lse, dq, dk and dv on one case (the interpreter must be on)."""
    from sdiff.kernels import attention as kernel

    q, k, v, dout, mask = inputs(case)
    scale = 1.0 / math.sqrt(q.shape[-1])
    launch = None
    if case[-1] is not None:  # the same blocks for every kernel, head dim and length regime
        cfg = {"BLOCK_M": case[-1][0], "BLOCK_N": case[-1][1], "num_warps": 4, "num_stages": 1}
        by_dim = {dim: {"short": cfg, "long": cfg} for dim in (64, 128)}
        launch = {kind: by_dim for kind in ("fwd", "dkdv", "dq")}
    out, lse = kernel._forward(q, k, v, mask, scale, launch_configs=launch)
    dq, dk, dv = kernel._backward(dout, q, k, v, mask, out, lse, scale, launch_configs=launch)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def main() -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    golden = {name: run_case(case) for name, case in CASES.items()}
    torch.save(golden, GOLDEN)
    size = GOLDEN.stat().st_size
    print(f"wrote {GOLDEN} ({len(golden)} cases, {size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
