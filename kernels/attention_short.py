"""Short-sequence attention in Triton (forward and backward): the whole key set in one tile.

    short_attention(q, k, v, key_padding_mask=None) -> (B, H, Lq, D)

Same layout and semantics as ``flash_attention`` (``sdiff.kernels.attention``), for at most
``max_keys(D, dtype)`` keys (MAX_KEYS = 512, fewer where a tile of all keys of K would pass
KV_TILE_BYTES = 64 KiB: 256 at D = 128 in fp16/bf16; 256 at D = 64 and 128 at D = 128 in
fp32): q (B, H, Lq, D), k and v (B, H, Lk, D), any Lq, ``key_padding_mask``
(B, Lk) bool with True marking padded keys, a query whose keys are all padding gets zeros.
Non-causal. fp32, fp16 and bf16 inputs, fp32 accumulation; head dims 16, 32, 64 and 128. The
library's attention entry point offers it as the ``triton-short`` backend; its reference is
``attention_ref``.

Why a second kernel: at the U-ViT's 256 tokens the whole K and V of a (batch, head) fit in one
tile, so the flash kernel's machinery for long sequences (the online-softmax rescaling of every
key block, and a backward in two sweeps that computes P and dP twice) is overhead there.

Forward: one program per (block of BLOCK_M queries, batch x head) loads q (BLOCK_M, D) and the
whole K and V of its head, (BLOCK_N, D) with BLOCK_N the next power of two >= Lk (at least 16),
and takes the softmax in one shot, in base 2 (log2(e) folded into the scale):
    s = q k^T * scale * log2(e)   (padded keys and the tail past Lk: -inf)
    m = rowmax s;  p = 2^(s - m);  l = rowsum p;  out = (p v) / l;  lse = m + log2(l)
lse is the row log-sum-exp in base 2, +inf for a row whose keys are all padding (l = 0), so
that the backward's P = 2^(s - lse) is 0 there and its output is zeros.

Backward: ONE kernel, one program per (batch, head), owning the head. It loads K and V once and
loops over blocks of BLOCK_M queries; for each it recomputes P from lse and takes
    delta = rowsum(dO * O);  dV += P^T dO;  dP = dO V^T;  dS = P (dP - delta)
    dK += scale dS^T Q;  dQ = scale dS K   (written for this query block, complete)
dK and dV accumulate in registers over the query loop and are written once at the end. Every
output element is written by exactly one program, in a fixed order: no atomics, no second
sweep, deterministic; delta is computed in the loop, so no separate kernel either. Matmuls of
size Lq x Lk x D per head: 2 (forward) and 5 (backward), against 7 in the flash kernel's two
backward sweeps.

Code layout: thin kernels ``_fwd_short`` and ``_bwd_short`` over the ``@triton.jit`` helpers of
``sdiff.kernels.attention`` (``_load_tile``, ``_store_tile``, ``_keys_ok``, ``_scores``,
``_probs``, ``_dscores``), so both kernels compute s, P and dS the same way. EVEN_K (Lk ==
BLOCK_N and no mask) compiles the key masking away. Launch configs: ``LAUNCH_CONFIGS`` by
kernel and head dim (BLOCK_M, warps, stages; no autotuning), BLOCK_M then halved until the
(BLOCK_M, BLOCK_N) score tile has at most MAX_TILE elements (``_launch_config``).
Precision: as the flash kernel (``DOT_FP32`` under the interpreter, bf16 results rounded by
torch from fp32 buffers there), through its ``_precision_args`` and ``_result_like``.

Tensor descriptors (TMA) are not used: K and V are read once per program, with no loop to
pipeline, so TMA would only replace one masked load; a TMA box holds at most 256 rows (512 keys
would need two); and it could not be checked here (no GPU). The pointer path is the only one.

Resources on a GPU (what Triton and ptxas report compiling for an H200, sm90, without one):
both kernels keep K and V of the head in shared memory, BLOCK_N x D x itemsize bytes each,
hence ``max_keys``: 512 keys at D = 128 in bf16 would need 264 KiB in the forward, over the
227 KiB an sm90 program may have; within ``max_keys`` every case fits. The backward also keeps
the fp32 accumulators dK and dV, 2 x BLOCK_N x D x 4 bytes: 256 KiB at the U-ViT's 256 keys and
D = 128, an SM's whole register file, so it spills there (about 1.6 KiB per thread); at D = 64
it spills almost nothing. Its grid is B x H programs, which leaves SMs idle below about 132
(an H200's count) heads in the batch. fp32 (IEEE dots, for checking rather than speed) spills
in both kernels. Whether the one-sweep backward beats two sweeps is for a GPU to measure.

The ops are registered with ``torch.library`` (``sdiff::short_attn_fwd``/``_bwd``) with fake
implementations, so ``torch.compile(fullgraph=True)`` has no graph break at them; autograd
goes through ``register_autograd``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sdiff.kernels.attention import (
    HEAD_DIMS,
    LOG2E,
    _check,
    _mask_args,
    _precision_args,
    _result_like,
    _setup_context,  # saves q, k, v, out, lse and the mask: the same for both ops
    attention_ref,
    interpreting,
    triton,  # None where triton is not installed
)
from sdiff.kernels.attention import supports as _flash_supports

__all__ = ["HEAD_DIMS", "MAX_KEYS", "attention_ref", "max_keys", "short_attention", "supports"]

MAX_KEYS = 512
MIN_BLOCK_N = 16  # tl.dot needs every tile dimension >= 16
MAX_TILE = 64 * 256  # elements of the (BLOCK_M, BLOCK_N) fp32 score tile held in registers
# bytes of the K tile (and of the V tile) of one head: both are held whole in shared memory, of
# which an H100/H200 (sm90) gives a program at most 227 KiB
KV_TILE_BYTES = 64 * 1024


def _block_n(lk: int) -> int:
    """Keys per tile: all of them, rounded up to a power of two (at least MIN_BLOCK_N)."""
    return max(MIN_BLOCK_N, triton.next_power_of_2(lk))


def max_keys(head_dim: int, dtype: torch.dtype) -> int:
    """The most keys the kernels take at this head dim and dtype: MAX_KEYS, fewer where the key
    tile of K (or of V), BLOCK_N x head_dim x itemsize bytes, would pass KV_TILE_BYTES."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return min(MAX_KEYS, KV_TILE_BYTES // max(1, head_dim * itemsize))


def supports(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> bool:
    """Whether ``short_attention`` handles these inputs: what ``flash_attention`` handles
    (device, dtype, head dim), with at most ``max_keys(head dim, dtype)`` keys."""
    ok = _flash_supports(q, k, v, key_padding_mask)
    return ok and k.shape[2] <= max_keys(q.shape[-1], q.dtype)


def _check_short(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    _check(q, k, v, mask)
    most = max_keys(q.shape[-1], q.dtype)
    if k.shape[2] > most:
        raise ValueError(
            f"the short-sequence attention kernel holds all keys in one tile and takes at most "
            f"{most} keys at head dim {q.shape[-1]} in {q.dtype}; got {k.shape[2]} (use "
            f"flash_attention, the 'triton' backend)"
        )


# --------------------------------------------------------------------------------------------
# Triton kernels (as in sdiff.kernels.attention: TRITON_INTERPRET must be set before triton is
# first imported to run them on the CPU). Pointers move to their (batch, head) matrix in int64.

if triton is not None:
    import triton.language as tl

    from sdiff.kernels.attention import _dscores, _keys_ok, _load_tile, _probs, _scores, _store_tile

    @triton.jit
    def _fwd_short(
        Q,
        K,
        V,
        Mask,
        O,
        LSE,
        sqb,
        sqh,
        sqm,
        sqd,
        skb,
        skh,
        skn,
        skd,
        svb,
        svh,
        svn,
        svd,
        sob,
        soh,
        som,
        sod,
        smb,
        smn,
        H,
        LQ,
        LK,
        scale_log2e,
        HAS_MASK: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,  # >= LK: every key of the head in one tile
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,  # LK == BLOCK_N and no padding mask: no key masking at all
    ):
        """Output and base-2 log-sum-exp of one block of BLOCK_M queries against all keys of
        the head, softmax in one shot."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        O += b * sob + h * soh
        Mask += b * smb
        LSE += bh * LQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ok = offs_m < LQ
        in_range = offs_n < LK
        q = _load_tile(Q, offs_m, offs_d, sqm, sqd, q_ok, TO_FP32=DOT_FP32)  # (BLOCK_M, D)
        kt = _load_tile(
            K, offs_n, offs_d, skn, skd, in_range, EVEN=EVEN_K, TRANS=True, TO_FP32=DOT_FP32
        )  # (D, BLOCK_N)
        v = _load_tile(
            V, offs_n, offs_d, svn, svd, in_range, EVEN=EVEN_K, TO_FP32=DOT_FP32
        )  # (BLOCK_N, D)
        s = _scores(q, kt, scale_log2e, PRECISION)  # (BLOCK_M, BLOCK_N)
        if EVEN_K:
            m_i = tl.max(s, 1)
        else:
            key_ok = _keys_ok(Mask, offs_n, smn, in_range, HAS_MASK)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_i = tl.max(s, 1)
            m_i = tl.where(m_i == float("-inf"), 0.0, m_i)  # all keys padded: p = 2^-inf = 0
        p = tl.math.exp2(s - m_i[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = tl.sum(p, 1)
        empty = l_i == 0.0
        acc = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)  # (BLOCK_M, D)
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        _store_tile(O, offs_m, offs_d, som, sod, q_ok, out)
        tl.store(LSE + offs_m, lse, mask=q_ok)

    @triton.jit
    def _bwd_short(
        Q,
        K,
        V,
        Mask,
        O,
        DO,
        LSE,
        DQ,
        DK,
        DV,
        sqb,
        sqh,
        sqm,
        sqd,
        skb,
        skh,
        skn,
        skd,
        svb,
        svh,
        svn,
        svd,
        sob,
        soh,
        som,
        sod,
        sdob,
        sdoh,
        sdom,
        sdod,
        sdqb,
        sdqh,
        sdqm,
        sdqd,
        sdkb,
        sdkh,
        sdkn,
        sdkd,
        sdvb,
        sdvh,
        sdvn,
        sdvd,
        smb,
        smn,
        H,
        LQ,
        LK,
        scale,
        scale_log2e,
        HAS_MASK: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,  # >= LK: every key of the head in one tile
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,
    ):
        """dQ, dK and dV of one (batch, head): K and V loaded once, a loop over query blocks
        writes each block's dQ and accumulates dK and dV, written at the end."""
        bh = tl.program_id(0).to(tl.int64)
        b = bh // H
        h = bh % H
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        O += b * sob + h * soh
        DO += b * sdob + h * sdoh
        DQ += b * sdqb + h * sdqh
        DK += b * sdkb + h * sdkh
        DV += b * sdvb + h * sdvh
        Mask += b * smb
        LSE += bh * LQ
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_range = offs_n < LK
        k = _load_tile(K, offs_n, offs_d, skn, skd, in_range, EVEN=EVEN_K, TO_FP32=DOT_FP32)
        v = _load_tile(V, offs_n, offs_d, svn, svd, in_range, EVEN=EVEN_K, TO_FP32=DOT_FP32)
        key_ok = _keys_ok(Mask, offs_n, smn, in_range, HAS_MASK)  # (BLOCK_N,)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for start in range(0, LQ, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q_ok = offs_m < LQ
            q = _load_tile(Q, offs_m, offs_d, sqm, sqd, q_ok, TO_FP32=DOT_FP32)  # (BLOCK_M, D)
            do = _load_tile(DO, offs_m, offs_d, sdom, sdod, q_ok, TO_FP32=DOT_FP32)
            o = _load_tile(O, offs_m, offs_d, som, sod, q_ok, TO_FP32=True)
            delta = tl.sum(do.to(tl.float32) * o, 1)  # (BLOCK_M,) rowsum(dO * O)
            lse = tl.load(LSE + offs_m, mask=q_ok, other=float("inf"))  # missing rows: P = 0
            p = _probs(q, tl.trans(k), lse[:, None], key_ok[None, :], scale_log2e, PRECISION)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # (N, D)
            ds = _dscores(p, do, tl.trans(v), delta[:, None], PRECISION)  # (BLOCK_M, BLOCK_N)
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)  # (BLOCK_M, D)
            _store_tile(DQ, offs_m, offs_d, sdqm, sdqd, q_ok, dq * scale)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)  # (N, D)
        _store_tile(DK, offs_n, offs_d, sdkn, sdkd, in_range, dk * scale)
        _store_tile(DV, offs_n, offs_d, sdvn, sdvd, in_range, dv)


# Launch configurations per kernel ("fwd", "bwd") and head dim (dims below 64 use the 64 entry):
# queries per tile, warps, pipeline stages. Not timed (there was no GPU to tune on) but chosen
# from what Triton's compiler and ptxas report for an H200 (sm90; triton 3.8, compiled here
# without a GPU), bf16: every supported (head dim, key tile) fits the 227 KiB of shared memory.
# Forward, 8 warps: at 256 keys no spills at D = 64, 4 bytes per thread at D = 128. Backward,
# 16 queries per loop trip: at 32 the staging of Q, dO and the transposed P and dS tiles passes
# 227 KiB at 256 keys and D = 128; it spills nothing at D = 64, 256 keys, but about 1.9 KiB per
# thread at D = 128, where dK and dV (fp32, 256 x 128 each) alone fill an SM's register file.
# Under the interpreter INTERPRETER_CONFIG: large tiles, fewer loop trips, faster on a CPU.
LAUNCH_CONFIGS = {
    "fwd": {
        64: {"BLOCK_M": 64, "num_warps": 8, "num_stages": 1},
        128: {"BLOCK_M": 64, "num_warps": 8, "num_stages": 1},
    },
    "bwd": {
        64: {"BLOCK_M": 16, "num_warps": 8, "num_stages": 1},
        128: {"BLOCK_M": 16, "num_warps": 8, "num_stages": 1},
    },
}
INTERPRETER_CONFIG = {"BLOCK_M": 64, "num_warps": 4, "num_stages": 1}


def _launch_config(head_dim: int, kind: str, block_n: int) -> dict[str, int]:
    """BLOCK_M, num_warps and num_stages of kernel ``kind`` ("fwd", "bwd"): the table's entry
    (INTERPRETER_CONFIG under the interpreter), BLOCK_M halved until BLOCK_M x block_n <= MAX_TILE
    (512 keys: half the queries per tile), but not below 16."""
    cfg = dict(INTERPRETER_CONFIG if interpreting() else LAUNCH_CONFIGS[kind][max(64, head_dim)])
    while cfg["BLOCK_M"] > 16 and cfg["BLOCK_M"] * block_n > MAX_TILE:
        cfg["BLOCK_M"] //= 2
    return cfg


def _forward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, D), lse (B, H, Lq) fp32, base 2)."""
    _check_short(q, k, v, mask)
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    out = _result_like(q)
    lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    m, smb, smn, has_mask = _mask_args(q, mask)
    block_n = _block_n(lk)
    cfg = _launch_config(d, "fwd", block_n)
    grid = (triton.cdiv(lq, cfg["BLOCK_M"]), bsz * heads)
    _fwd_short[grid](
        q, k, v, m, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(), smb, smn,
        heads, lq, lk, scale * LOG2E, HAS_MASK=has_mask, HEAD_DIM=d, BLOCK_N=block_n,
        **_precision_args(q), EVEN_K=not has_mask and lk == block_n, **cfg,
    )  # fmt: skip
    return out.to(q.dtype), lse


def _backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out and lse, each with the strides of ``empty_like`` of
    its input (what the fake implementation promises to torch.compile)."""
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    dq, dk, dv = _result_like(q), _result_like(k), _result_like(v)
    m, smb, smn, has_mask = _mask_args(q, mask)
    block_n = _block_n(lk)
    cfg = _launch_config(d, "bwd", block_n)
    strides = (q, k, v, out, dout, dq, dk, dv)
    _bwd_short[(bsz * heads,)](
        q, k, v, m, out, dout, lse, dq, dk, dv, *(s for x in strides for s in x.stride()), smb,
        smn, heads, lq, lk, scale, scale * LOG2E, HAS_MASK=has_mask, HEAD_DIM=d, BLOCK_N=block_n,
        **_precision_args(q), EVEN_K=not has_mask and lk == block_n, **cfg,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with shapes from the fake impls.


@torch.library.custom_op("sdiff::short_attn_fwd", mutates_args=())
def short_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, key_padding_mask, scale)


@short_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, scale):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("sdiff::short_attn_bwd", mutates_args=())
def short_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(dout, q, k, v, key_padding_mask, out, lse, scale)


@short_attn_bwd.register_fake
def _(dout, q, k, v, key_padding_mask, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    mask = rest[0] if ctx.has_mask else None
    dq, dk, dv = short_attn_bwd(dout, q, k, v, mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


short_attn_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def short_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Triton attention for at most MAX_KEYS keys, with the signature of ``attention_ref``
    (differentiable); a ValueError for more keys or inputs ``supports`` rejects."""
    _check_short(q, k, v, key_padding_mask)
    out, _ = torch.ops.sdiff.short_attn_fwd(q, k, v, key_padding_mask, 1.0 / math.sqrt(q.shape[-1]))
    return out
