"""GroupNorm + scale-shift conditioning + SiLU fused in Triton (forward and backward) and its
PyTorch reference.

    groupnorm_silu(x, weight, bias, scale, shift, groups, eps=1e-5)     -> (B, C, H, W)
    groupnorm_silu_ref(x, weight, bias, scale, shift, groups, eps=1e-5) -> (B, C, H, W)

    y = SiLU(GroupNorm(x; groups, weight, bias, eps) * (1 + scale[:, :, None, None])
             + shift[:, :, None, None])

the second norm of the U-Net ResBlock, where the noise-level embedding enters as a scale and a
shift (the U-Net of simple diffusion, arXiv 2301.11093, section 3 and Table 4): x (B, C, H, W),
weight and bias (C,) the GroupNorm's own affine, scale and shift (B, C) (the model's are views of
one (B, 2C) projection), biased variance over each group's C/groups x H x W values, ``eps``
inside the square root. x may be contiguous or channels_last (any strides under which H and W
flatten to one axis; otherwise it is copied); fp32, fp16 and bf16 (mixed allowed: the result
has the promoted dtype of x, scale and shift, as the model's expression); fp32 arithmetic
throughout. Up to MAX_GROUP_CHANNELS channels per group, any H x W.

Algorithm. Forward: one program per (example b, group g) takes the group's statistics in fp32
in one sweep of shifted sums (the shift K is the mean of the group's first tile, close to the
group's mean, so neither sum (x - K) nor sum (x - K)^2 cancels when the mean is large against
the spread):
    mean = K + S1 / n,  var = S2 / n - (S1 / n)^2,  rstd = 1 / sqrt(var + eps)
then a second sweep writes y = silu(z) = z sig(z), z = xhat gamma + beta, with
xhat = (x - mean) rstd and the per-channel gamma = w (1 + s), beta = bias (1 + s) + shift, and
saves mean and rstd (B, groups). Backward, with dz = dy silu'(z) = dy sig(z) (1 + z (1 - sig(z))):
    dshift = sum_HW dz,   dscale = w sum_HW dz xhat + bias sum_HW dz
    dweight = sum_B (1 + s) sum_HW dz xhat,   dbias = sum_B (1 + s) sum_HW dz
    dx = rstd (gamma dz - mean_group(gamma dz) - xhat mean_group(gamma dz xhat))
again one program per (b, g): a first sweep sums dz and dz xhat per channel, a second writes
dx. Each program owns its (b, channel) entries, so dshift and dscale are written directly; the
per-example terms of dweight and dbias go to an fp32 (B, C) buffer that torch sums over B: the
result is deterministic (no atomics).

Code layout (as the Triton layer-norm tutorial): thin kernels ``_fwd`` and ``_bwd`` over the
``@triton.jit`` helpers of ``_common`` (``tile_ptrs``, ``load_tile`` and ``store_tile``: pointers,
mask and fp32 values of a (BLOCK_C, BLOCK_HW) tile of one group; ``load_vec``: per-channel
vectors) and ``_modulated`` (z recomputed from x the same way by both kernels). The masks of a
channel count per group that is a power of two and of an H x W that is a multiple of BLOCK_HW
are compiled away by constexpr flags (EVEN_C, EVEN_HW). BLOCK_HW and num_warps: the caller's
``launch_config`` (a keyword of ``_forward`` and ``_backward``), else ``_launch_config``'s
default by channels per group and H x W (not yet measured on a GPU). bf16 results under the
Triton interpreter go through fp32 buffers (``_common.result_buffer``: its fp32 -> bf16 store
truncates).

The ops are registered with ``torch.library`` (``sdiff::groupnorm_silu_fwd``/``_bwd``) with fake
implementations, so ``torch.compile(fullgraph=True)`` passes through them; autograd goes through
``register_autograd`` (``_common.register_norm_autograd``).
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

__all__ = ["MAX_GROUP_CHANNELS", "groupnorm_silu", "groupnorm_silu_ref", "supports"]

MAX_GROUP_CHANNELS = 256  # one (BLOCK_C, BLOCK_HW >= 16) fp32 tile per program in registers


def supports(
    x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, shift: Tensor, groups: int
) -> bool:
    """Whether ``groupnorm_silu`` handles these inputs (device, dtypes, shapes)."""
    if not triton_available() or not (x.is_cuda or interpreting()):
        return False
    if x.dim() != 4 or groups <= 0 or x.shape[1] % groups != 0:
        return False
    b, c = x.shape[:2]
    tensors = (x, weight, bias, scale, shift)
    return (
        0 < c // groups <= MAX_GROUP_CHANNELS
        and x.shape[2] * x.shape[3] > 0
        and weight.shape == bias.shape == (c,)
        and scale.shape == shift.shape == (b, c)
        and all(t.device == x.device and t.dtype in DTYPES for t in tensors)
    )


def groupnorm_silu_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    groups: int,
    eps: float = 1e-5,
) -> Tensor:
    """SiLU(GroupNorm(x) * (1 + scale) + shift) with float32 (float64 for float64 inputs)
    arithmetic, in the promoted dtype of x, scale and shift."""
    out = promoted_dtype(x, scale, shift)
    acc = torch.promote_types(out, torch.float32)
    h = F.group_norm(x.to(acc), groups, weight.to(acc), bias.to(acc), eps)  # (B, C, H, W)
    h = h * (1 + scale.to(acc)[:, :, None, None]) + shift.to(acc)[:, :, None, None]
    return F.silu(h).to(out)


# --------------------------------------------------------------------------------------------
# Triton kernels (importable without a GPU; TRITON_INTERPRET=1 before triton's first import runs
# them on the CPU). Every kernel runs one program per (example b, group g): it first moves its
# pointers to the group's first channel, in int64 because B x C x H x W may pass 2^31 elements,
# and addresses the group as a (channels, H x W) matrix with int64 offsets (``tile_ptrs``). x
# is loaded with the mean where masked, so that z stays finite where nothing is stored.

if triton is not None:

    @triton.jit
    def _modulated(x, mean, rstd, gamma, beta):
        """xhat = (x - mean) rstd and z = xhat gamma + beta of the (BLOCK_C, BLOCK_HW) fp32 tile
        ``x``, with per-channel gamma = w (1 + s) and beta = bias (1 + s) + shift."""
        xhat = (x - mean) * rstd
        return xhat, xhat * gamma[:, None] + beta[:, None]

    @triton.jit
    def _fwd(
        X,
        W,
        Bias,
        Scale,
        Shift,
        Y,
        Mean,
        Rstd,
        sxb,
        sxc,
        sxhw,
        syb,
        syc,
        syhw,
        ssb,
        ssc,
        stb,
        stc,
        G,
        CG,
        HW,
        eps,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        EVEN_C: tl.constexpr,  # CG == BLOCK_C: no channel masking
        EVEN_HW: tl.constexpr,  # HW % BLOCK_HW == 0 and EVEN_C: no masking at all
    ):
        """y = silu(GroupNorm(x) (1 + scale) + shift) of one (example, group), and its mean and
        rstd."""
        bg = tl.program_id(0).to(tl.int64)
        b = bg // G
        c0 = (bg % G) * CG
        X += b * sxb + c0 * sxc
        Y += b * syb + c0 * syc
        offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
        offs_hw = tl.arange(0, BLOCK_HW).to(tl.int64)
        ptrs, mask = tile_ptrs(X, offs_c, offs_hw, sxc, sxhw, CG, HW)  # K: the first tile's mean
        k = tl.sum(tl.sum(load_tile(ptrs, mask, EVEN_HW), 1), 0) / (CG * tl.minimum(HW, BLOCK_HW))
        s1 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        s2 = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        for start in range(0, HW, BLOCK_HW):
            ptrs, mask = tile_ptrs(X, offs_c, start + offs_hw, sxc, sxhw, CG, HW)
            d = load_tile(ptrs, mask, EVEN_HW) - k
            if not EVEN_HW:
                d = tl.where(mask, d, 0.0)
            s1 += d
            s2 += d * d
        n = CG * HW
        m1 = tl.sum(tl.sum(s1, 1), 0) / n
        var = tl.maximum(tl.sum(tl.sum(s2, 1), 0) / n - m1 * m1, 0.0)
        mean = k + m1
        rstd = 1.0 / tl.sqrt(var + eps)
        one_s = 1.0 + load_vec(Scale + b * ssb + c0 * ssc, offs_c, ssc, CG, EVEN_C)
        gamma = load_vec(W + c0, offs_c, 1, CG, EVEN_C) * one_s
        beta = load_vec(Bias + c0, offs_c, 1, CG, EVEN_C) * one_s + load_vec(
            Shift + b * stb + c0 * stc, offs_c, stc, CG, EVEN_C
        )
        for start in range(0, HW, BLOCK_HW):
            ptrs, mask = tile_ptrs(X, offs_c, start + offs_hw, sxc, sxhw, CG, HW)
            _, z = _modulated(load_tile(ptrs, mask, EVEN_HW, mean), mean, rstd, gamma, beta)
            y = z * tl.sigmoid(z)
            out, mask = tile_ptrs(Y, offs_c, start + offs_hw, syc, syhw, CG, HW)
            store_tile(out, y, mask, EVEN_HW)
        tl.store(Mean + bg, mean)
        tl.store(Rstd + bg, rstd)

    @triton.jit
    def _bwd(
        X,
        DY,
        W,
        Bias,
        Scale,
        Shift,
        Mean,
        Rstd,
        DX,
        DScale,
        DShift,
        DWb,
        DBb,
        sxb,
        sxc,
        sxhw,
        sdb,
        sdc,
        sdhw,
        sgb,
        sgc,
        sghw,
        ssb,
        ssc,
        stb,
        stc,
        G,
        CG,
        HW,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        EVEN_C: tl.constexpr,
        EVEN_HW: tl.constexpr,
    ):
        """dx of one (example, group); dscale, dshift and the example's terms of dweight and
        dbias of its channels (DScale, DShift, DWb, DBb: contiguous fp32 (B, C))."""
        bg = tl.program_id(0).to(tl.int64)
        b = bg // G
        c0 = (bg % G) * CG
        X += b * sxb + c0 * sxc
        DY += b * sdb + c0 * sdc
        DX += b * sgb + c0 * sgc
        offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
        offs_hw = tl.arange(0, BLOCK_HW).to(tl.int64)
        mean = tl.load(Mean + bg)
        rstd = tl.load(Rstd + bg)
        w = load_vec(W + c0, offs_c, 1, CG, EVEN_C)
        bias = load_vec(Bias + c0, offs_c, 1, CG, EVEN_C)
        one_s = 1.0 + load_vec(Scale + b * ssb + c0 * ssc, offs_c, ssc, CG, EVEN_C)
        gamma = w * one_s
        beta = bias * one_s + load_vec(Shift + b * stb + c0 * stc, offs_c, stc, CG, EVEN_C)
        sum_dz = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        sum_dzx = tl.zeros([BLOCK_C, BLOCK_HW], tl.float32)
        for start in range(0, HW, BLOCK_HW):
            ptrs, mask = tile_ptrs(X, offs_c, start + offs_hw, sxc, sxhw, CG, HW)
            xhat, z = _modulated(load_tile(ptrs, mask, EVEN_HW, mean), mean, rstd, gamma, beta)
            ptrs, mask = tile_ptrs(DY, offs_c, start + offs_hw, sdc, sdhw, CG, HW)
            sig = tl.sigmoid(z)
            dz = load_tile(ptrs, mask, EVEN_HW) * sig * (1.0 + z * (1.0 - sig))  # 0 where masked
            sum_dz += dz
            sum_dzx += dz * xhat
        s1 = tl.sum(sum_dz, 1)  # (BLOCK_C,): sum_HW dz, 0 past CG
        s2 = tl.sum(sum_dzx, 1)  # sum_HW dz xhat
        n = CG * HW
        m1 = tl.sum(gamma * s1, 0) / n  # mean over the group of dxhat = gamma dz
        m2 = tl.sum(gamma * s2, 0) / n  # ... of dxhat xhat
        for start in range(0, HW, BLOCK_HW):
            ptrs, mask = tile_ptrs(X, offs_c, start + offs_hw, sxc, sxhw, CG, HW)
            xhat, z = _modulated(load_tile(ptrs, mask, EVEN_HW, mean), mean, rstd, gamma, beta)
            ptrs, mask = tile_ptrs(DY, offs_c, start + offs_hw, sdc, sdhw, CG, HW)
            sig = tl.sigmoid(z)
            dz = load_tile(ptrs, mask, EVEN_HW) * sig * (1.0 + z * (1.0 - sig))
            dx = rstd * (dz * gamma[:, None] - m1 - xhat * m2)
            out, mask = tile_ptrs(DX, offs_c, start + offs_hw, sgc, sghw, CG, HW)
            store_tile(out, dx, mask, EVEN_HW)
        per_bc = b * G * CG + c0 + offs_c  # (B, C) contiguous fp32 buffers
        ok = offs_c < CG
        tl.store(DShift + per_bc, s1, mask=ok)
        tl.store(DScale + per_bc, w * s2 + bias * s1, mask=ok)
        tl.store(DWb + per_bc, one_s * s2, mask=ok)
        tl.store(DBb + per_bc, one_s * s1, mask=ok)


def _launch_config(
    channels_per_group: int, hw: int, launch_config: Mapping | None = None
) -> dict[str, int]:
    """BLOCK_HW and num_warps for groups of ``channels_per_group`` x ``hw``: ``launch_config``'s
    entries where given, else the default (tiles of about 4096 values; 16384 under the
    interpreter, where fewer, larger steps run faster)."""
    block_c = triton.next_power_of_2(channels_per_group)
    tile = 16384 if interpreting() else 4096
    default = {
        "BLOCK_HW": max(16, min(triton.next_power_of_2(hw), tile // block_c)),
        "num_warps": 8 if block_c * hw >= 4096 else 4,
    }
    return {**default, **(launch_config or {})}


def _check(
    x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, shift: Tensor, groups: int
) -> None:
    if not supports(x, weight, bias, scale, shift, groups):
        raise unsupported(
            "groupnorm_silu",
            f"x (B, C, H, W) with groups dividing C into at most {MAX_GROUP_CHANNELS} channels "
            f"each, weight and bias (C,), scale and shift (B, C)",
            f"x {tuple(x.shape)} {x.dtype} on {x.device}, groups {groups}, weight "
            f"{tuple(weight.shape)}, bias {tuple(bias.shape)}, scale {tuple(scale.shape)}, "
            f"shift {tuple(shift.shape)}",
        )


def _flat(x: Tensor) -> Tensor:
    """x (B, C, H, W) as a (B, C, H x W) view (NCHW and channels_last both flatten), copied
    only where its strides do not allow one."""
    b, c, h, w = x.shape
    if h == 1 or w == 1 or x.stride(2) == w * x.stride(3):
        stride_hw = x.stride(3) if w > 1 else x.stride(2)
        return x.as_strided((b, c, h * w), (x.stride(0), x.stride(1), stride_hw))
    return x.contiguous().view(b, c, h * w)


def _flags(cg: int, hw: int, cfg: Mapping) -> dict:
    block_c = triton.next_power_of_2(cg)
    even_c = cg == block_c
    return {"BLOCK_C": block_c, "EVEN_C": even_c, "EVEN_HW": even_c and hw % cfg["BLOCK_HW"] == 0}


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    groups: int,
    eps: float,
    *,
    launch_config: Mapping | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y (B, C, H, W), mean (B, groups) fp32, rstd (B, groups) fp32); ``launch_config`` as in
    _launch_config."""
    _check(x, weight, bias, scale, shift, groups)
    bsz, c, h, w = x.shape
    cg, hw = c // groups, h * w
    xf = _flat(x)
    weight, bias = weight.contiguous(), bias.contiguous()  # read with stride 1
    y = result_buffer(xf, promoted_dtype(x, scale, shift))
    mean, rstd = stats_buffers(x, (bsz, groups))
    cfg = _launch_config(cg, hw, launch_config)
    _fwd[(bsz * groups,)](
        xf, weight, bias, scale, shift, y, mean, rstd, *xf.stride(), *y.stride(),
        *scale.stride(), *shift.stride(), groups, cg, hw, eps, **_flags(cg, hw, cfg), **cfg,
    )  # fmt: skip
    return y.view(bsz, c, h, w).to(promoted_dtype(x, scale, shift)), mean, rstd


def _backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    mean: Tensor,
    rstd: Tensor,
    *,
    launch_config: Mapping | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift) in the dtypes of their inputs, from the forward's
    mean and rstd; ``launch_config`` as in _launch_config."""
    bsz, c, h, w = x.shape
    groups = mean.shape[1]
    cg, hw = c // groups, h * w
    xf, dyf = _flat(x), _flat(dy)
    weight, bias = weight.contiguous(), bias.contiguous()
    dx = result_buffer(xf)
    dscale, dshift, dw_b, db_b = (
        torch.empty(bsz, c, device=x.device, dtype=torch.float32) for _ in range(4)
    )
    cfg = _launch_config(cg, hw, launch_config)
    _bwd[(bsz * groups,)](
        xf, dyf, weight, bias, scale, shift, mean, rstd, dx, dscale, dshift, dw_b, db_b,
        *xf.stride(), *dyf.stride(), *dx.stride(), *scale.stride(), *shift.stride(),
        groups, cg, hw, **_flags(cg, hw, cfg), **cfg,
    )  # fmt: skip
    return (
        dx.view(bsz, c, h, w).to(x.dtype),
        dw_b.sum(0).to(weight.dtype),  # (C,): the examples' terms
        db_b.sum(0).to(bias.dtype),
        dscale.to(scale.dtype),
        dshift.to(shift.dtype),
    )


# --------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with shapes from the fake impls.


@torch.library.custom_op("sdiff::groupnorm_silu_fwd", mutates_args=())
def groupnorm_silu_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor, shift: Tensor, groups: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(x, weight, bias, scale, shift, groups, eps)


@groupnorm_silu_fwd.register_fake
def _(x, weight, bias, scale, shift, groups, eps):
    y = torch.empty_like(_flat(x), dtype=promoted_dtype(x, scale, shift)).view(x.shape)
    return (y, *stats_buffers(x, (x.shape[0], groups)))


@torch.library.custom_op("sdiff::groupnorm_silu_bwd", mutates_args=())
def groupnorm_silu_bwd(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    mean: Tensor,
    rstd: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward(dy, x, weight, bias, scale, shift, mean, rstd)


@groupnorm_silu_bwd.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd):
    dx = torch.empty_like(_flat(x)).view(x.shape)
    return (dx, weight.new_empty(weight.shape), bias.new_empty(bias.shape),
            scale.new_empty(scale.shape), shift.new_empty(shift.shape))  # fmt: skip


# x, weight, bias, scale, shift
register_norm_autograd(groupnorm_silu_fwd, groupnorm_silu_bwd, tensors=5)


def groupnorm_silu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor,
    shift: Tensor,
    groups: int,
    eps: float = 1e-5,
) -> Tensor:
    """Triton GroupNorm + scale-shift + SiLU with the signature of ``groupnorm_silu_ref``
    (differentiable in x, weight, bias, scale and shift)."""
    _check(x, weight, bias, scale, shift, groups)
    y, _, _ = torch.ops.sdiff.groupnorm_silu_fwd(x, weight, bias, scale, shift, groups, eps)
    return y
