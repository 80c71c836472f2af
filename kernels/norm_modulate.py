"""LayerNorm + adaLN modulation fused in Triton (forward and backward) and its PyTorch reference.

    norm_modulate(x, shift, scale, eps=1e-6)     -> (B, N, D)
    norm_modulate_ref(x, shift, scale, eps=1e-6) -> (B, N, D)

    y = LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]

the pre-norm adaLN modulation of the U-ViT's transformer blocks (simple diffusion, arXiv
2301.11093, section 3; the shift and scale come from the noise-level conditioning): x (B, N, D)
tokens, shift and scale (B, D), a LayerNorm over D without its own affine parameters (the
modulation is the affine), biased variance, ``eps`` inside the square root. Any strides (the
model's shift and scale are ``unbind`` views of one (B, 6, D) tensor), any D up to MAX_DIM, fp32,
fp16 and bf16 (mixed allowed; the result has their promoted dtype), fp32 arithmetic throughout.

Algorithm. Forward: one program per (block of BLOCK_M rows of one example, example) loads whole
rows (D padded to the power of two BLOCK_D), takes mean and rstd = 1 / sqrt(var + eps) in fp32,
writes y and saves mean and rstd (B, N) for the backward. Backward, with xhat = (x - mean) rstd
and g = dy (1 + scale):
    dx = rstd (g - mean_D(g) - xhat mean_D(g xhat))
    dshift = sum_N dy,   dscale = sum_N dy xhat
one program per row block again; its dshift and dscale sums over its own rows go to an fp32
(B, row blocks, D) buffer that torch sums over the blocks, so the result is deterministic (no
atomics).

Code layout (as the Triton layer-norm tutorial): thin kernels ``_fwd`` and ``_bwd`` over the
``@triton.jit`` helpers of ``_common`` (``tile_ptrs``, ``load_tile`` and ``store_tile``:
pointers, mask and fp32 values of a (BLOCK_M, BLOCK_D) tile; ``load_vec``: one example's shift
or scale), shared by both, and ``_normalize`` (xhat, mean and rstd; the backward recomputes xhat
from the saved statistics). The masks of a row count that is a multiple of BLOCK_M and of a
power-of-two D are compiled away by constexpr flags (EVEN_M, EVEN_D). BLOCK_M and num_warps: the
caller's ``launch_config`` (a keyword of ``_forward`` and ``_backward``), else
``_launch_config``'s default by D (not yet measured on a GPU). bf16 results under the Triton
interpreter go through fp32 buffers (``_common.result_buffer``: its fp32 -> bf16 store
truncates).

The ops are registered with ``torch.library`` (``sdiff::norm_modulate_fwd``/``_bwd``) with
fake implementations, so ``torch.compile(fullgraph=True)`` passes through them; autograd goes
through ``register_autograd`` (``_common.register_norm_autograd``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from sdiff.kernels._common import (
    DTYPES,
    interpreting,
    load_tile,
    load_vec,
    promoted_dtype,
    register_norm_autograd,
    result_buffer,
    stats_buffers,
    store_tile,
    tile_ptrs,
    tl,
    triton,
    triton_available,
    unsupported,
)

__all__ = ["MAX_DIM", "norm_modulate", "norm_modulate_ref", "supports"]

MAX_DIM = 16384  # one row of fp32 per program must fit in registers


def supports(x: Tensor, shift: Tensor, scale: Tensor) -> bool:
    """Whether ``norm_modulate`` handles these inputs (device, dtypes, shapes)."""
    if not triton_available() or not (x.is_cuda or interpreting()):
        return False
    if x.dim() != 3 or not 0 < x.shape[-1] <= MAX_DIM:
        return False
    b, _, d = x.shape
    return (
        shift.shape == scale.shape == (b, d)
        and x.device == shift.device == scale.device
        and all(t.dtype in DTYPES for t in (x, shift, scale))
    )


def norm_modulate_ref(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """LayerNorm(x) * (1 + scale[:, None]) + shift[:, None] with float32 (float64 for float64
    inputs) arithmetic, in the inputs' promoted dtype."""
    out = promoted_dtype(x, shift, scale)
    acc = torch.promote_types(out, torch.float32)
    y = F.layer_norm(x.to(acc), x.shape[-1:], eps=eps)  # (B, N, D)
    return (y * (1 + scale.to(acc)[:, None]) + shift.to(acc)[:, None]).to(out)


# --------------------------------------------------------------------------------------------
# Triton kernels (importable without a GPU; TRITON_INTERPRET=1 before triton's first import runs
# them on the CPU). Every kernel runs one program per (block of BLOCK_M rows, example b); it
# first moves its pointers to example b, in int64 because B x N x D may pass 2^31 elements.

if triton is not None:

    @triton.jit
    def _normalize(x, offs_d, D, eps, EVEN_D: tl.constexpr):
        """xhat = (x - mean) rstd of each row of the (BLOCK_M, BLOCK_D) fp32 tile ``x``, whose
        columns past D are 0, with rstd = 1 / sqrt(var + eps) (biased variance over D)."""
        mean = tl.sum(x, 1) / D  # (BLOCK_M,)
        xc = x - mean[:, None]
        if not EVEN_D:
            xc = tl.where((offs_d < D)[None, :], xc, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        return xc * rstd[:, None], mean, rstd

    @triton.jit
    def _fwd(
        X,
        Shift,
        Scale,
        Y,
        Mean,
        Rstd,
        sxb,
        sxn,
        sxd,
        syb,
        syn,
        syd,
        sshb,
        sshd,
        sscb,
        sscd,
        N,
        D,
        eps,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        EVEN_M: tl.constexpr,  # N % BLOCK_M == 0: every row of every block exists
        EVEN_D: tl.constexpr,  # D == BLOCK_D: no padded columns
    ):
        """y, mean and rstd of BLOCK_M rows of example b."""
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        X += b * sxb
        Y += b * syb
        Shift += b * sshb
        Scale += b * sscb
        Mean += b * N
        Rstd += b * N
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        x_ptrs, mask = tile_ptrs(X, offs_m, offs_d, sxn, sxd, N, D)
        x = load_tile(x_ptrs, mask, EVEN_M and EVEN_D)  # (BLOCK_M, BLOCK_D)
        shift = load_vec(Shift, offs_d, sshd, D, EVEN_D)
        scale1 = 1.0 + load_vec(Scale, offs_d, sscd, D, EVEN_D)
        xhat, mean, rstd = _normalize(x, offs_d, D, eps, EVEN_D)
        y = xhat * scale1[None, :] + shift[None, :]
        y_ptrs, _ = tile_ptrs(Y, offs_m, offs_d, syn, syd, N, D)
        store_tile(y_ptrs, y, mask, EVEN_M and EVEN_D)
        row_ok = offs_m < N
        tl.store(Mean + offs_m, mean, mask=row_ok)
        tl.store(Rstd + offs_m, rstd, mask=row_ok)

    @triton.jit
    def _bwd(
        X,
        DY,
        Scale,
        Mean,
        Rstd,
        DX,
        DShift,
        DScale,
        sxb,
        sxn,
        sxd,
        sdyb,
        sdyn,
        sdyd,
        sdxb,
        sdxn,
        sdxd,
        sscb,
        sscd,
        N,
        D,
        BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr,
        EVEN_M: tl.constexpr,
        EVEN_D: tl.constexpr,
    ):
        """dx of BLOCK_M rows of example b, and these rows' sums of dshift and dscale, written
        to row (b, pid_m) of the fp32 (B, row blocks, BLOCK_D) buffers DShift and DScale."""
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        X += b * sxb
        DY += b * sdyb
        DX += b * sdxb
        Scale += b * sscb
        Mean += b * N
        Rstd += b * N
        part = (b * tl.num_programs(0) + pid_m) * BLOCK_D
        DShift += part
        DScale += part
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < N
        x_ptrs, mask = tile_ptrs(X, offs_m, offs_d, sxn, sxd, N, D)
        dy_ptrs, _ = tile_ptrs(DY, offs_m, offs_d, sdyn, sdyd, N, D)
        x = load_tile(x_ptrs, mask, EVEN_M and EVEN_D)
        dy = load_tile(dy_ptrs, mask, EVEN_M and EVEN_D)  # 0 outside the rows and columns
        scale1 = 1.0 + load_vec(Scale, offs_d, sscd, D, EVEN_D)
        mean = tl.load(Mean + offs_m, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + offs_m, mask=row_ok, other=0.0)  # missing rows: xhat = 0
        xhat = (x - mean[:, None]) * rstd[:, None]  # not 0 past D, but dy and g are
        g = dy * scale1[None, :]
        c_g = tl.sum(g, 1) / D
        c_gx = tl.sum(g * xhat, 1) / D
        dx = (g - c_g[:, None] - xhat * c_gx[:, None]) * rstd[:, None]
        dx_ptrs, _ = tile_ptrs(DX, offs_m, offs_d, sdxn, sdxd, N, D)
        store_tile(dx_ptrs, dx, mask, EVEN_M and EVEN_D)
        tl.store(DShift + offs_d, tl.sum(dy, 0))
        tl.store(DScale + offs_d, tl.sum(dy * xhat, 0))


# Launch configuration: BLOCK_M rows per program and warps, by D. The default keeps a tile near
# 4k elements (32 fp32 values per thread at 4 warps) and at most 16 rows; a starting point, not
# yet tuned on a GPU. The interpreter uses it too: its row sums are sequential, and 16-row blocks
# keep dshift's and dscale's fp32 error near PyTorch's own (the tests' bound).


def _launch_config(d: int, launch_config: Mapping | None = None) -> dict[str, int]:
    """BLOCK_M and num_warps for rows of width ``d``: ``launch_config``'s entries where given,
    else the default."""
    block_d = triton.next_power_of_2(d)
    default = {
        "BLOCK_M": max(1, min(16, 4096 // block_d)),
        "num_warps": 8 if block_d >= 4096 else 4,
    }
    return {**default, **(launch_config or {})}


def _check(x: Tensor, shift: Tensor, scale: Tensor) -> None:
    if not supports(x, shift, scale):
        raise unsupported(
            "norm_modulate",
            f"x (B, N, D) with D <= {MAX_DIM} and shift, scale (B, D)",
            f"x {tuple(x.shape)} {x.dtype} on {x.device}, shift {tuple(shift.shape)} "
            f"{shift.dtype}, scale {tuple(scale.shape)} {scale.dtype}",
        )


def _flags(n: int, d: int, cfg: Mapping) -> dict:
    block_d = triton.next_power_of_2(d)
    return {"BLOCK_D": block_d, "EVEN_M": n % cfg["BLOCK_M"] == 0, "EVEN_D": d == block_d}


def _forward(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float, *, launch_config: Mapping | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (B, N, D), mean (B, N) fp32, rstd (B, N) fp32); ``launch_config`` as in
    _launch_config."""
    _check(x, shift, scale)
    bsz, n, d = x.shape
    y = result_buffer(x, promoted_dtype(x, shift, scale))
    mean, rstd = stats_buffers(x, (bsz, n))
    cfg = _launch_config(d, launch_config)
    _fwd[(triton.cdiv(n, cfg["BLOCK_M"]), bsz)](
        x, shift, scale, y, mean, rstd, *x.stride(), *y.stride(), *shift.stride(),
        *scale.stride(), n, d, eps, **_flags(n, d, cfg), **cfg,
    )  # fmt: skip
    return y.to(promoted_dtype(x, shift, scale)), mean, rstd


def _backward(
    dy: Tensor,
    x: Tensor,
    shift: Tensor,
    scale: Tensor,
    mean: Tensor,
    rstd: Tensor,
    *,
    launch_config: Mapping | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dshift, dscale) in the dtypes of x, shift and scale, from the forward's mean and
    rstd; ``launch_config`` as in _launch_config."""
    bsz, n, d = x.shape
    cfg = _launch_config(d, launch_config)
    flags = _flags(n, d, cfg)
    blocks = triton.cdiv(n, cfg["BLOCK_M"])
    dx = result_buffer(x)
    dshift = torch.empty(bsz, blocks, flags["BLOCK_D"], device=x.device, dtype=torch.float32)
    dscale = torch.empty_like(dshift)
    _bwd[(blocks, bsz)](
        x, dy, scale, mean, rstd, dx, dshift, dscale, *x.stride(), *dy.stride(), *dx.stride(),
        *scale.stride(), n, d, **flags, **cfg,
    )  # fmt: skip
    dshift = dshift[..., :d].sum(1).to(shift.dtype)  # (B, D): the row blocks' sums
    dscale = dscale[..., :d].sum(1).to(scale.dtype)
    return dx.to(x.dtype), dshift, dscale


# --------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with shapes from the fake impls.


@torch.library.custom_op("sdiff::norm_modulate_fwd", mutates_args=())
def norm_modulate_fwd(
    x: Tensor, shift: Tensor, scale: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, shift, scale, eps)


@norm_modulate_fwd.register_fake
def _(x, shift, scale, eps):
    y = torch.empty_like(x, dtype=promoted_dtype(x, shift, scale))
    return (y, *stats_buffers(x, x.shape[:2]))


@torch.library.custom_op("sdiff::norm_modulate_bwd", mutates_args=())
def norm_modulate_bwd(
    dy: Tensor, x: Tensor, shift: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dy, x, shift, scale, mean, rstd)


@norm_modulate_bwd.register_fake
def _(dy, x, shift, scale, mean, rstd):
    dshift = shift.new_empty(shift.shape)  # contiguous (B, D), as the real op's sum
    return torch.empty_like(x), dshift, scale.new_empty(scale.shape)


register_norm_autograd(norm_modulate_fwd, norm_modulate_bwd, tensors=3)  # x, shift, scale


def norm_modulate(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6) -> Tensor:
    """Triton LayerNorm + adaLN modulate with the signature of ``norm_modulate_ref``
    (differentiable in x, shift and scale)."""
    _check(x, shift, scale)
    y, _, _ = torch.ops.sdiff.norm_modulate_fwd(x, shift, scale, eps)
    return y
