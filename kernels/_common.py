"""What the Triton kernels share: the triton import, where they run, their dtypes, output
buffers, error messages, the autograd of the fused norms, and the tile helpers of those norms.

    interpreting()                       -> bool   TRITON_INTERPRET=1: kernels run on the CPU
    triton_available()                   -> bool   triton imported
    promoted_dtype(*tensors)             -> dtype  the dtype torch's arithmetic on them gives
    result_buffer(x, dtype=None)         -> Tensor empty like x (its memory format), see below
    stats_buffers(x, shape)              -> (mean, rstd), empty fp32 of ``shape``
    unsupported(op, needs, got)          -> ValueError naming what the kernel needs
    register_norm_autograd(fwd, bwd, n)  -> None   autograd of a (y, mean, rstd) norm op

Under the Triton interpreter the fp32 -> bf16 store truncates instead of rounding to nearest,
so bf16 results are written to an fp32 buffer there and rounded by torch (``result_buffer``).

The ``@triton.jit`` helpers of the normalisation kernels (``norm_modulate``,
``groupnorm_silu``), which address a 2-D block of one example as a (ROWS, COLS) tile:
``tile_ptrs`` (pointers and mask of a tile), ``load_tile`` and ``store_tile`` (fp32 values,
masks compiled away by a constexpr EVEN flag) and ``load_vec`` (a per-column or per-channel
vector in fp32).

Bottom layer: torch and triton only.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

# Importing the kernels needs neither a GPU nor triton itself; TRITON_INTERPRET must be set
# before triton is first imported to run them on the CPU.
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux x86_64
    triton = tl = None

__all__ = [
    "DTYPES",
    "interpreting",
    "load_tile",
    "load_vec",
    "promoted_dtype",
    "register_norm_autograd",
    "result_buffer",
    "stats_buffers",
    "store_tile",
    "tile_ptrs",
    "triton_available",
    "unsupported",
]

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what every kernel reads and writes


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return triton is not None


def promoted_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype of torch's elementwise arithmetic on ``tensors`` (the kernels' result dtype)."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return out


def result_buffer(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output buffer shaped like x, in its memory format: ``dtype`` (default x's), or fp32
    for bf16 under the interpreter (rounded to bf16 by torch afterwards)."""
    dtype = x.dtype if dtype is None else dtype
    if interpreting() and dtype == torch.bfloat16:
        dtype = torch.float32
    return torch.empty_like(x, dtype=dtype)


def stats_buffers(x: Tensor, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Empty fp32 mean and rstd of ``shape`` on x's device (also the fake implementations')."""
    mean = x.new_empty(shape, dtype=torch.float32)
    return mean, torch.empty_like(mean)


def unsupported(op: str, needs: str, got: str) -> ValueError:
    """The error of a kernel handed inputs its ``supports`` rejects: what it needs, what it got."""
    return ValueError(
        f"the triton {op} kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
        f"imported) of dtypes {[str(d) for d in DTYPES]}, {needs}; got {got}"
    )


def register_norm_autograd(
    fwd: torch.library.CustomOpDef, bwd: Callable[..., tuple[Tensor, ...]], tensors: int
) -> None:
    """Autograd of the custom op ``fwd(*inputs) -> (y, mean, rstd)`` whose first ``tensors``
    inputs are tensors and the rest constants (groups, eps): the backward op
    ``bwd(dy, *tensor inputs, mean, rstd)`` gives one gradient per tensor input, the constants
    get None. The statistics are outputs for the backward only; their gradients are ignored."""

    def setup_context(ctx, inputs, output) -> None:
        _y, mean, rstd = output
        ctx.constants = len(inputs) - tensors
        ctx.save_for_backward(*inputs[:tensors], mean, rstd)

    def backward(ctx, dy, _dmean, _drstd):
        grads = bwd(dy, *ctx.saved_tensors)
        return (*grads, *[None] * ctx.constants)

    fwd.register_autograd(backward, setup_context=setup_context)


if triton is not None:

    @triton.jit
    def tile_ptrs(base, offs_r, offs_c, stride_r, stride_c, R, C):
        """Pointers to rows ``offs_r`` x columns ``offs_c`` of the (R, C) matrix at ``base`` (a
        (BLOCK_R, BLOCK_C) tile) and the mask of the entries that exist."""
        ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
        mask = (offs_r < R)[:, None] & (offs_c < C)[None, :]
        return ptrs, mask

    @triton.jit
    def load_tile(ptrs, mask, EVEN: tl.constexpr, other=0.0):
        """The tile at ``ptrs`` in fp32; entries outside ``mask`` read ``other`` (EVEN: all
        exist, the load is unmasked)."""
        if EVEN:
            return tl.load(ptrs).to(tl.float32)
        return tl.load(ptrs, mask=mask, other=other).to(tl.float32)

    @triton.jit
    def store_tile(ptrs, x, mask, EVEN: tl.constexpr):
        """Write the fp32 tile ``x`` to ``ptrs`` in their dtype, where ``mask`` (EVEN: all)."""
        if EVEN:
            tl.store(ptrs, x.to(ptrs.dtype.element_ty))
        else:
            tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)

    @triton.jit
    def load_vec(base, offs, stride, N, EVEN: tl.constexpr):
        """The (BLOCK,) vector of entries ``offs`` at ``base`` in fp32, 0 from N on (EVEN: all
        exist)."""
        if EVEN:
            return tl.load(base + offs * stride).to(tl.float32)
        return tl.load(base + offs * stride, mask=offs < N, other=0.0).to(tl.float32)
