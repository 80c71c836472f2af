"""Flash attention in Triton (forward and backward) and its PyTorch reference.

    flash_attention(q, k, v, key_padding_mask=None) -> (B, H, Lq, D)
    attention_ref(q, k, v, key_padding_mask=None)   -> (B, H, Lq, D)

Same layout and semantics as ``sdiff.attention``: q (B, H, Lq, D), k and v (B, H, Lk, D), any
Lq and Lk (tails masked), ``key_padding_mask`` (B, Lk) bool with True marking padded keys, a
query whose keys are all padding gets zeros. Non-causal. fp32, fp16 and bf16 inputs, fp32
accumulation; head dims 16, 32, 64 and 128.

Algorithm (Dao et al., FlashAttention-2). Forward: one program per (block of BLOCK_M queries,
batch x head) streams over key blocks with the online softmax, in base 2:
    s = q k^T * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
    l' = l 2^(m - m') + rowsum p;  acc' = acc 2^(m - m') + p v;  out = acc / l
and saves the row log-sum-exp lse = m + log2(l) (base 2; +inf for an all-padding row so that
the backward's 2^(s - lse) is 0 there). Backward: delta = rowsum(dO * O); one kernel per key
block accumulates dV = P^T dO and dK = scale dS^T Q with dS = P (dO V^T - delta); one per query
block accumulates dQ = scale dS K; P is recomputed from lse, so nothing of size L^2 is stored.
Two kernels instead of atomics keep the backward deterministic.

Precision: tiles are multiplied in the input dtype with fp32 accumulation (tensor cores for
fp16/bf16; ``input_precision="ieee"`` for fp32, no TF32). Under the Triton interpreter
(``TRITON_INTERPRET=1``, the CPU tests), where a bf16 ``tl.dot`` is wrong, tiles are cast to
fp32 first (``DOT_FP32``), and bf16 results are written to fp32 buffers and rounded by torch,
because the interpreter's fp32 -> bf16 store truncates instead of rounding to nearest.

The ops are registered with ``torch.library`` (``sdiff::flash_attn_fwd``/``_bwd``) with fake
implementations, so ``torch.compile(fullgraph=True)`` of a model that uses them has no graph
break; autograd goes through ``register_autograd``.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

__all__ = [
    "HEAD_DIMS",
    "attention_ref",
    "flash_attention",
    "interpreting",
    "supports",
    "triton_available",
]

HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    return triton is not None


def supports(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None) -> bool:
    """Whether ``flash_attention`` handles these inputs (device, dtype, head dim)."""
    if not triton_available():
        return False
    if not (q.is_cuda or interpreting()):
        return False
    same = q.dtype == k.dtype == v.dtype and q.device == k.device == v.device
    return same and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS and v.shape[-1] == q.shape[-1]


def attention_ref(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """softmax(q k^T / sqrt(D)) v with float32 (float64 for float64 inputs) accumulation."""
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = q.to(acc) @ k.to(acc).transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, Lq, Lk)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if key_padding_mask is not None:  # all keys padded: softmax of -inf is nan; define as zeros
        probs = probs.nan_to_num(0.0)
    return (probs @ v.to(acc)).to(q.dtype)  # (B, H, Lq, D)


# --------------------------------------------------------------------------------------------
# Triton kernels. Importing this module needs neither a GPU nor triton itself; TRITON_INTERPRET
# must be set before this module (and triton) is first imported to run them on the CPU.

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux x86_64
    triton = None

if triton is not None:

    @triton.jit
    def _fwd(
        Q,
        K,
        V,
        M,
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
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,  # LK % BLOCK_N == 0 and no padding mask: no key masking at all
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_valid = offs_m < LQ
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=q_valid[:, None],
            other=0.0,
        )  # (BLOCK_M, D)
        if DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, LK, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            kt_ptrs = K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd
            v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
            if EVEN_K:
                kt = tl.load(kt_ptrs)  # (D, BLOCK_N)
                v = tl.load(v_ptrs)  # (BLOCK_N, D)
            else:
                key_ok = offs_n < LK
                kt = tl.load(kt_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            if DOT_FP32:
                kt = kt.to(tl.float32)
                v = v.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION) * scale_log2e  # (BLOCK_M, BLOCK_N)
            if EVEN_K:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_base = m_new  # every row has seen a key
            else:
                if HAS_MASK:
                    pad = tl.load(M + b * smb + offs_n * smn, mask=key_ok, other=1)
                    key_ok = key_ok & (pad == 0)
                s = tl.where(key_ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            alpha = tl.math.exp2(m_i - m_base)
            p = tl.math.exp2(s - m_base[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(
            O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
            out.to(O.dtype.element_ty),
            mask=q_valid[:, None],
        )
        tl.store(LSE + bh * LQ + offs_m, lse, mask=q_valid)

    @triton.jit
    def _bwd_dkdv(
        Q,
        K,
        V,
        M,
        DO,
        LSE,
        DELTA,
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
        sdb,
        sdh,
        sdm,
        sdd,
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
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_range = offs_n < LK
        k = tl.load(
            K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            mask=in_range[:, None],
            other=0.0,
        )  # (BLOCK_N, D)
        v = tl.load(
            V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
            mask=in_range[:, None],
            other=0.0,
        )
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        key_ok = in_range
        if HAS_MASK:
            pad = tl.load(M + b * smb + offs_n * smn, mask=in_range, other=1)
            key_ok = key_ok & (pad == 0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for start in range(0, LQ, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q_valid = offs_m < LQ
            q = tl.load(
                Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=q_valid[:, None],
                other=0.0,
            )  # (BLOCK_M, D)
            do = tl.load(
                DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
                mask=q_valid[:, None],
                other=0.0,
            )
            if DOT_FP32:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(LSE + bh * LQ + offs_m, mask=q_valid, other=float("inf"))
            delta = tl.load(DELTA + bh * LQ + offs_m, mask=q_valid, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * scale_log2e  # (N, M)
            pt = tl.math.exp2(st - lse[None, :])
            pt = tl.where(key_ok[:, None] & q_valid[None, :], pt, 0.0)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (N, M)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        tl.store(
            DK + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
            (dk * scale).to(DK.dtype.element_ty),
            mask=in_range[:, None],
        )
        tl.store(
            DV + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
            dv.to(DV.dtype.element_ty),
            mask=in_range[:, None],
        )

    @triton.jit
    def _bwd_dq(
        Q,
        K,
        V,
        M,
        DO,
        LSE,
        DELTA,
        DQ,
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
        sdb,
        sdh,
        sdm,
        sdd,
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
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_valid = offs_m < LQ
        q = tl.load(
            Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            mask=q_valid[:, None],
            other=0.0,
        )
        do = tl.load(
            DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
            mask=q_valid[:, None],
            other=0.0,
        )
        if DOT_FP32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh * LQ + offs_m, mask=q_valid, other=float("inf"))
        delta = tl.load(DELTA + bh * LQ + offs_m, mask=q_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, LK, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            key_ok = offs_n < LK
            k = tl.load(
                K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=key_ok[:, None],
                other=0.0,
            )  # (BLOCK_N, D)
            v = tl.load(
                V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=key_ok[:, None],
                other=0.0,
            )
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if HAS_MASK:
                pad = tl.load(M + b * smb + offs_n * smn, mask=key_ok, other=1)
                key_ok = key_ok & (pad == 0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e  # (M, N)
            p = tl.math.exp2(s - lse[:, None])
            p = tl.where(key_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(
            DQ + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
            (dq * scale).to(DQ.dtype.element_ty),
            mask=q_valid[:, None],
        )

    @triton.jit
    def _bwd_delta(
        O,
        DO,
        DELTA,
        sob,
        soh,
        som,
        sod,
        sdb,
        sdh,
        sdm,
        sdd,
        H,
        LQ,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
    ):
        """delta = rowsum(dO * O) in fp32, without fp32 copies of dO and O."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        valid = offs_m < LQ
        o = tl.load(
            O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        do = tl.load(
            DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd,
            mask=valid[:, None],
            other=0.0,
        ).to(tl.float32)
        tl.store(DELTA + bh * LQ + offs_m, tl.sum(o * do, 1), mask=valid)


def _kernels() -> dict[str, object]:
    return {"fwd": _fwd, "dkdv": _bwd_dkdv, "dq": _bwd_dq, "delta": _bwd_delta}


# Launch configurations (block sizes, warps, pipeline stages) per kernel, head dim and length
# regime ("short": the query or key length the grid runs over is <= SHORT_LEN, the U-ViT's 256
# tokens; "long" otherwise). ``SDIFF_ATTN_CONFIG`` (a JSON file of the same shape, written by
# bench/gpu/tune_attention.py) or ``set_launch_configs`` overrides entries, for tuning on a GPU.
# The table is the tuner's choice on an NVIDIA H200 (torch 2.11, triton 3.6; 2026-11-26,
# reports/gpu/attention_tune.csv): bf16, width 2048, N = 256 (batch 64) and N = 4096 (batch 4).
SHORT_LEN = 512
LAUNCH_CONFIGS: dict[str, dict[int, dict[str, dict[str, int]]]] = {
    "fwd": {
        64: {"short": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
             "long": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}},
        128: {"short": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
             "long": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}},
    },
    "dkdv": {
        64: {"short": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
             "long": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}},
        128: {"short": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
             "long": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}},
    },
    "dq": {
        64: {"short": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
             "long": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}},
        128: {"short": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4},
             "long": {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}},
    },
}  # fmt: skip
_OVERRIDES: dict = {}
_ENV_LOADED = False


def set_launch_configs(overrides: dict | None) -> None:
    """Override launch configs: {kind: {head_dim: {regime: cfg}}} (None clears)."""
    global _ENV_LOADED
    _OVERRIDES.clear()
    _ENV_LOADED = True  # an explicit setting wins over the environment
    for kind, by_dim in (overrides or {}).items():
        for dim, by_regime in by_dim.items():
            for regime, cfg in by_regime.items():
                _OVERRIDES[(kind, int(dim), regime)] = dict(cfg)


def _load_env_overrides() -> None:
    global _ENV_LOADED
    if _ENV_LOADED:
        return
    path = os.environ.get("SDIFF_ATTN_CONFIG")
    if path:
        import json

        try:
            set_launch_configs(json.loads(open(path).read()))
        except (OSError, ValueError) as err:
            raise ValueError(f"SDIFF_ATTN_CONFIG={path}: not a readable JSON file ({err})") from err
    _ENV_LOADED = True


def _launch_config(head_dim: int, kind: str, length: int) -> dict[str, int]:
    """Block sizes and warps of kernel ``kind`` ("fwd", "dkdv", "dq") whose grid runs over
    ``length`` rows. Interpreter: large tiles (fewer programs, faster on CPU). CUDA: the table
    above (head dims below 64 use the 64 entry), tuned on an H200 (issue 9)."""
    if interpreting():
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
    _load_env_overrides()
    regime = "short" if length <= SHORT_LEN else "long"
    dim = 64 if head_dim <= 64 else 128
    found = _OVERRIDES.get((kind, dim, regime))
    return dict(found) if found else dict(LAUNCH_CONFIGS[kind][dim][regime])


def _precision_args(q: Tensor) -> dict:
    return {"DOT_FP32": interpreting(), "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _mask_args(q: Tensor, mask: Tensor | None) -> tuple[Tensor, int, int, bool]:
    if mask is None:
        return q, 0, 0, False  # a dummy pointer, never read
    m = mask.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _result_like(x: Tensor) -> Tensor:
    """Output buffer: x's dtype, or fp32 for bf16 under the interpreter (rounded afterwards)."""
    if interpreting() and x.dtype == torch.bfloat16:
        return torch.empty_like(x, dtype=torch.float32)
    return torch.empty_like(x)


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if not supports(q, k, v, mask):
        raise ValueError(
            f"the triton attention kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"triton is imported), one dtype of {[str(d) for d in DTYPES]} for q, k, v and head "
            f"dim in {HEAD_DIMS}; got {q.device} {q.dtype} head dim {q.shape[-1]}"
        )


def _forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float):
    _check(q, k, v, mask)
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    out = _result_like(q)
    lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    m, smb, smn, has_mask = _mask_args(q, mask)
    cfg = _launch_config(d, "fwd", lq)
    grid = (triton_cdiv(lq, cfg["BLOCK_M"]), bsz * heads)
    _kernels()["fwd"][grid](
        q,
        k,
        v,
        m,
        out,
        lse,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *out.stride(),
        smb,
        smn,
        heads,
        lq,
        lk,
        scale * LOG2E,
        HAS_MASK=has_mask,
        HEAD_DIM=d,
        **_precision_args(q),
        EVEN_K=not has_mask and lk % cfg["BLOCK_N"] == 0,
        **cfg,
    )
    return out.to(q.dtype), lse


def _backward(dout, q, k, v, mask, out, lse, scale):
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    _kernels()["delta"][(triton_cdiv(lq, 64), bsz * heads)](
        out, dout, delta, *out.stride(), *dout.stride(), heads, lq, HEAD_DIM=d, BLOCK_M=64
    )  # (B, H, Lq): rowsum(dO * O)
    # dq, dk and dv are written with q's, k's and v's strides: a non-dense view (a chunk of a
    # fused qkv projection) is first copied into ``empty_like``'s dense layout, which is also
    # what the fake implementation promises to torch.compile
    q, k, v = (x if _result_like(x).stride() == x.stride() else torch.empty_like(x).copy_(x)
               for x in (q, k, v))  # fmt: skip
    dq, dk, dv = _result_like(q), _result_like(k), _result_like(v)
    m, smb, smn, has_mask = _mask_args(q, mask)
    cfg_kv, cfg_q = _launch_config(d, "dkdv", lk), _launch_config(d, "dq", lq)
    common = dict(HAS_MASK=has_mask, HEAD_DIM=d, **_precision_args(q))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), smb, smn)
    kern = _kernels()
    kern["dkdv"][(triton_cdiv(lk, cfg_kv["BLOCK_N"]), bsz * heads)](
        q,
        k,
        v,
        m,
        dout,
        lse,
        delta,
        dk,
        dv,
        *strides,
        heads,
        lq,
        lk,
        scale,
        scale * LOG2E,
        **common,
        **cfg_kv,
    )
    kern["dq"][(triton_cdiv(lq, cfg_q["BLOCK_M"]), bsz * heads)](
        q, k, v, m, dout, lse, delta, dq, *strides, heads, lq, lk, scale, scale * LOG2E,
        **common, **cfg_q,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with shapes from the fake impls.


@torch.library.custom_op("sdiff::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, key_padding_mask, scale)


@flash_attn_fwd.register_fake
def _(q, k, v, key_padding_mask, scale):
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return torch.empty_like(q), lse


@torch.library.custom_op("sdiff::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
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


@flash_attn_bwd.register_fake
def _(dout, q, k, v, key_padding_mask, out, lse, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, mask, scale = inputs
    out, lse = output
    ctx.has_mask = mask is not None
    ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
    ctx.scale = scale


def _autograd_backward(ctx, dout, _dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    mask = rest[0] if ctx.has_mask else None
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_autograd_backward, setup_context=_setup_context)


def flash_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Triton flash attention with the signature of ``attention_ref`` (differentiable)."""
    out, _ = torch.ops.sdiff.flash_attn_fwd(q, k, v, key_padding_mask, 1.0 / math.sqrt(q.shape[-1]))
    return out
