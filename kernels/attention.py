"""Flash attention in Triton (forward and backward) and its PyTorch reference.

    flash_attention(q, k, v, key_padding_mask=None) -> (B, H, Lq, D)
    attention_ref(q, k, v, key_padding_mask=None)   -> (B, H, Lq, D)

Same layout and semantics as the library's attention entry point (this is its ``triton``
backend): q (B, H, Lq, D), k and v (B, H, Lk, D), any Lq and Lk (tails masked),
``key_padding_mask`` (B, Lk) bool with True marking padded keys, a query whose keys are all
padding gets zeros. Non-causal. fp32, fp16 and bf16 inputs, fp32 accumulation; head dims 16, 32,
64 and 128.

Algorithm (Dao et al., FlashAttention-2). Forward: one program per (block of BLOCK_M queries,
batch x head) streams over key blocks with the online softmax, in base 2:
    s = q k^T * scale * log2(e);  m' = max(m, rowmax s);  p = 2^(s - m')
    l' = l 2^(m - m') + rowsum p;  acc' = acc 2^(m - m') + p v;  out = acc / l
and saves the row log-sum-exp lse = m + log2(l) (base 2; +inf for an all-padding row so that
the backward's 2^(s - lse) is 0 there). Backward: delta = rowsum(dO * O); one kernel per key
block accumulates dV = P^T dO and dK = scale dS^T Q with dS = P (dO V^T - delta); one per query
block accumulates dQ = scale dS K; P is recomputed from lse, so nothing of size L^2 is stored.
Two kernels instead of atomics keep the backward deterministic.

Code layout (as the Triton fused-attention tutorial): thin kernels ``_fwd``, ``_bwd_dkdv``,
``_bwd_dq`` and ``_bwd_delta`` over ``@triton.jit`` helpers they share: ``_load_tile`` and
``_store_tile`` (row-masked (rows, D) tiles), ``_keys_ok`` (the padding mask), ``_load_lse_delta``
and ``_scores``, ``_probs`` and ``_dscores`` (s, P and dS, recomputed the same way by both backward
kernels). Boundary cases are compiled away by constexpr flags (HAS_MASK, EVEN_K). Block sizes,
warps and stages: the entry of the caller's ``launch_configs`` (a keyword of ``_forward`` and
``_backward``; the registered ops pass the JSON file named by ``SDIFF_ATTN_CONFIG``), else the
tuned, read-only table ``LAUNCH_CONFIGS`` (``_launch_config``).

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

import functools
import json
import math
import os
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from sdiff.kernels._common import DTYPES, interpreting, tl, triton, triton_available, unsupported
from sdiff.kernels._common import result_buffer as _result_like

__all__ = [
    "HEAD_DIMS",
    "attention_ref",
    "flash_attention",
    "interpreting",
    "supports",
    "triton_available",
]

HEAD_DIMS = (16, 32, 64, 128)
LOG2E = 1.4426950408889634


def _read_only(table: Mapping) -> Mapping:
    """A read-only view of a nested dict (the launch-config tables)."""
    return MappingProxyType(
        {key: _read_only(val) if isinstance(val, Mapping) else val for key, val in table.items()}
    )


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
# must be set before this module (and triton, imported by ``_common``) is first imported to run
# them on the CPU.
#
# Every kernel runs one program per (block of rows, batch x head). It first moves each pointer
# to its (batch, head) matrix, in int64 because B x H x L x D may pass 2^31 elements; the tiles
# are then addressed by row and column offsets within one (L, D) matrix.

if triton is not None:

    @triton.jit
    def _load_tile(
        base,
        offs_row,
        offs_d,
        stride_row,
        stride_d,
        row_ok,
        EVEN: tl.constexpr = False,
        TRANS: tl.constexpr = False,
        TO_FP32: tl.constexpr = False,
    ):
        """Rows ``offs_row`` of the (L, D) matrix at ``base``: a (ROWS, D) tile, or (D, ROWS) with
        TRANS (K^T for q K^T, read transposed from memory). Rows not ``row_ok`` read as 0, or
        with EVEN (every row exists) the load is unmasked. TO_FP32 casts to fp32 (DOT_FP32)."""
        if TRANS:
            ptrs = base + offs_row[None, :] * stride_row + offs_d[:, None] * stride_d
            mask = row_ok[None, :]
        else:
            ptrs = base + offs_row[:, None] * stride_row + offs_d[None, :] * stride_d
            mask = row_ok[:, None]
        if EVEN:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
        if TO_FP32:
            x = x.to(tl.float32)
        return x

    @triton.jit
    def _store_tile(base, offs_row, offs_d, stride_row, stride_d, row_ok, x):
        """Write the (ROWS, D) tile ``x`` to rows ``offs_row`` (those ``row_ok``) at ``base``, in
        the dtype of ``base``."""
        ptrs = base + offs_row[:, None] * stride_row + offs_d[None, :] * stride_d
        tl.store(ptrs, x.to(base.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit
    def _keys_ok(Mask, offs_n, stride_mn, in_range, HAS_MASK: tl.constexpr):
        """(BLOCK_N,) bool: keys ``offs_n`` that exist (``in_range``) and are not padding."""
        ok = in_range
        if HAS_MASK:
            pad = tl.load(Mask + offs_n * stride_mn, mask=in_range, other=1)
            ok = ok & (pad == 0)
        return ok

    @triton.jit
    def _load_lse_delta(LSE, DELTA, offs_m, q_ok):
        """The forward's log-sum-exp (base 2) and delta = rowsum(dO * O) of queries ``offs_m``;
        a query that does not exist gets lse = +inf, so its row of P is 0."""
        lse = tl.load(LSE + offs_m, mask=q_ok, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=q_ok, other=0.0)
        return lse, delta

    @triton.jit
    def _scores(a, bt, scale_log2e, PRECISION: tl.constexpr):
        """a b^T * scale * log2(e): attention logits in base 2, (rows of a, columns of bt)."""
        return tl.dot(a, bt, input_precision=PRECISION) * scale_log2e

    @triton.jit
    def _probs(a, bt, lse, keep, scale_log2e, PRECISION: tl.constexpr):
        """P = 2^(a bt * scale * log2(e) - lse), 0 where not ``keep``: the forward's softmax,
        recomputed from its log-sum-exp. With a = q, bt = k^T it is P (M, N), with lse and keep
        broadcast as (M, 1) and (1, N); with a = k, bt = q^T it is P^T (N, M)."""
        p = tl.math.exp2(_scores(a, bt, scale_log2e, PRECISION) - lse)
        return tl.where(keep, p, 0.0)

    @triton.jit
    def _dscores(p, da, dbt, delta, PRECISION: tl.constexpr):
        """dS = P (dP - delta), the gradient at the softmax's input, with dP = da dbt: dO V^T
        for P (M, N), V dO^T for P^T (N, M); ``delta`` broadcast like ``lse`` in ``_probs``."""
        dp = tl.dot(da, dbt, input_precision=PRECISION)
        return p * (dp - delta)

    @triton.jit
    def _fwd(
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
        BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
        EVEN_K: tl.constexpr,  # LK % BLOCK_N == 0 and no padding mask: no key masking at all
    ):
        """Output and base-2 log-sum-exp of one block of BLOCK_M queries, streaming over all
        keys with the online softmax."""
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
        offs_d = tl.arange(0, HEAD_DIM)
        q_ok = offs_m < LQ
        q = _load_tile(Q, offs_m, offs_d, sqm, sqd, q_ok, TO_FP32=DOT_FP32)  # (BLOCK_M, D)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, LK, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            in_range = offs_n < LK
            kt = _load_tile(
                K, offs_n, offs_d, skn, skd, in_range, EVEN=EVEN_K, TRANS=True, TO_FP32=DOT_FP32
            )  # (D, BLOCK_N)
            v = _load_tile(
                V, offs_n, offs_d, svn, svd, in_range, EVEN=EVEN_K, TO_FP32=DOT_FP32
            )  # (BLOCK_N, D)
            s = _scores(q, kt, scale_log2e, PRECISION)  # (BLOCK_M, BLOCK_N)
            if EVEN_K:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_base = m_new  # every row has seen a key
            else:
                key_ok = _keys_ok(Mask, offs_n, smn, in_range, HAS_MASK)
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
        _store_tile(O, offs_m, offs_d, som, sod, q_ok, out)
        tl.store(LSE + offs_m, lse, mask=q_ok)

    @triton.jit
    def _bwd_dkdv(
        Q,
        K,
        V,
        Mask,
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
        """dK and dV of one block of BLOCK_N keys, streaming over all queries (DK and DV have
        K's and V's strides)."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        DO += b * sdb + h * sdh
        DK += b * skb + h * skh
        DV += b * svb + h * svh
        Mask += b * smb
        LSE += bh * LQ
        DELTA += bh * LQ
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        in_range = offs_n < LK
        k = _load_tile(K, offs_n, offs_d, skn, skd, in_range, TO_FP32=DOT_FP32)  # (BLOCK_N, D)
        v = _load_tile(V, offs_n, offs_d, svn, svd, in_range, TO_FP32=DOT_FP32)
        key_ok = _keys_ok(Mask, offs_n, smn, in_range, HAS_MASK)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
        for start in range(0, LQ, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q_ok = offs_m < LQ
            q = _load_tile(Q, offs_m, offs_d, sqm, sqd, q_ok, TO_FP32=DOT_FP32)  # (BLOCK_M, D)
            do = _load_tile(DO, offs_m, offs_d, sdm, sdd, q_ok, TO_FP32=DOT_FP32)
            lse, delta = _load_lse_delta(LSE, DELTA, offs_m, q_ok)
            keep = key_ok[:, None] & q_ok[None, :]
            pt = _probs(k, tl.trans(q), lse[None, :], keep, scale_log2e, PRECISION)  # (N, M)
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dst = _dscores(pt, v, tl.trans(do), delta[None, :], PRECISION)  # (N, M)
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
        _store_tile(DK, offs_n, offs_d, skn, skd, in_range, dk * scale)
        _store_tile(DV, offs_n, offs_d, svn, svd, in_range, dv)

    @triton.jit
    def _bwd_dq(
        Q,
        K,
        V,
        Mask,
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
        """dQ of one block of BLOCK_M queries, streaming over all keys (DQ has Q's strides)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        Q += b * sqb + h * sqh
        K += b * skb + h * skh
        V += b * svb + h * svh
        DO += b * sdb + h * sdh
        DQ += b * sqb + h * sqh
        Mask += b * smb
        LSE += bh * LQ
        DELTA += bh * LQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ok = offs_m < LQ
        q = _load_tile(Q, offs_m, offs_d, sqm, sqd, q_ok, TO_FP32=DOT_FP32)  # (BLOCK_M, D)
        do = _load_tile(DO, offs_m, offs_d, sdm, sdd, q_ok, TO_FP32=DOT_FP32)
        lse, delta = _load_lse_delta(LSE, DELTA, offs_m, q_ok)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(0, LK, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            in_range = offs_n < LK
            k = _load_tile(K, offs_n, offs_d, skn, skd, in_range, TO_FP32=DOT_FP32)  # (N, D)
            v = _load_tile(V, offs_n, offs_d, svn, svd, in_range, TO_FP32=DOT_FP32)
            key_ok = _keys_ok(Mask, offs_n, smn, in_range, HAS_MASK)
            p = _probs(q, tl.trans(k), lse[:, None], key_ok[None, :], scale_log2e, PRECISION)
            ds = _dscores(p, do, tl.trans(v), delta[:, None], PRECISION)  # (BLOCK_M, BLOCK_N)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        _store_tile(DQ, offs_m, offs_d, sqm, sqd, q_ok, dq * scale)

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
        bh = tl.program_id(1).to(tl.int64)
        b = bh // H
        h = bh % H
        O += b * sob + h * soh
        DO += b * sdb + h * sdh
        DELTA += bh * LQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        ok = offs_m < LQ
        o = _load_tile(O, offs_m, offs_d, som, sod, ok, TO_FP32=True)
        do = _load_tile(DO, offs_m, offs_d, sdm, sdd, ok, TO_FP32=True)
        tl.store(DELTA + offs_m, tl.sum(o * do, 1), mask=ok)


# Launch configurations (block sizes, warps, pipeline stages) per kernel ("fwd", "dkdv", "dq"),
# head dim (dims below 64 use the 64 entry) and length regime ("short": the query or key length
# the grid runs over is <= SHORT_LEN, the U-ViT's 256 tokens; "long" otherwise). The table is
# the tuner's choice (bench/gpu/tune_attention.py) on an NVIDIA H200 (torch 2.11, triton 3.6;
# 2026-11-26, reports/gpu/attention_tune.csv): bf16, width 2048, N = 256 (batch 64) and
# N = 4096 (batch 4). It is read-only: a caller overrides entries by passing ``launch_configs``
# of the same shape (head dims as ints or strings, as in the tuner's JSON) to ``_forward`` and
# ``_backward``; the registered ops pass the JSON file named by ``SDIFF_ATTN_CONFIG``. Under the
# interpreter the default is INTERPRETER_CONFIG: large tiles, fewer programs, faster on a CPU.
SHORT_LEN = 512
INTERPRETER_CONFIG = MappingProxyType(
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 1}
)
LAUNCH_CONFIGS: Mapping[str, Mapping[int, Mapping[str, Mapping[str, int]]]] = _read_only({
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
})  # fmt: skip


def _launch_config(
    head_dim: int, kind: str, length: int, launch_configs: Mapping | None = None
) -> dict[str, int]:
    """Block sizes, warps and stages of kernel ``kind`` ("fwd", "dkdv", "dq") whose grid runs over
    ``length`` rows: the entry of ``launch_configs`` if it has one, else INTERPRETER_CONFIG under
    the interpreter, else LAUNCH_CONFIGS."""
    regime = "short" if length <= SHORT_LEN else "long"
    dim = 64 if head_dim <= 64 else 128
    by_dim = (launch_configs or {}).get(kind) or {}
    found = (by_dim.get(dim) or by_dim.get(str(dim)) or {}).get(regime)
    if found:
        return dict(found)
    return dict(INTERPRETER_CONFIG if interpreting() else LAUNCH_CONFIGS[kind][dim][regime])


def _env_launch_configs() -> Mapping | None:
    """The launch-config overrides in the JSON file named by ``SDIFF_ATTN_CONFIG`` (written by
    bench/gpu/tune_attention.py), read once per path; None if unset or under the interpreter."""
    path = os.environ.get("SDIFF_ATTN_CONFIG")
    if not path or interpreting():
        return None
    return _read_launch_configs(path)


@functools.cache
def _read_launch_configs(path: str) -> Mapping:
    """The JSON object in ``path``, read-only; a ValueError naming SDIFF_ATTN_CONFIG if none."""
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict):
            raise ValueError("not a JSON object")
        return _read_only(table)
    except (OSError, ValueError) as err:
        raise ValueError(f"SDIFF_ATTN_CONFIG={path}: not a readable JSON file ({err})") from err


def _precision_args(q: Tensor) -> dict:
    return {"DOT_FP32": interpreting(), "PRECISION": "ieee" if q.dtype == torch.float32 else "tf32"}


def _mask_args(q: Tensor, mask: Tensor | None) -> tuple[Tensor, int, int, bool]:
    if mask is None:
        return q, 0, 0, False  # a dummy pointer, never read
    m = mask.to(torch.uint8)
    return m, m.stride(0), m.stride(1), True


def _check(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
    if not supports(q, k, v, mask):
        raise unsupported(
            "attention",
            f"one dtype for q, k and v and head dim in {HEAD_DIMS}",
            f"{q.device} {q.dtype} head dim {q.shape[-1]}",
        )


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    scale: float,
    *,
    launch_configs: Mapping | None = None,
) -> tuple[Tensor, Tensor]:
    """(out (B, H, Lq, D), lse (B, H, Lq) fp32, base 2); ``launch_configs`` as in _launch_config."""
    _check(q, k, v, mask)
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    out = _result_like(q)
    lse = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    m, smb, smn, has_mask = _mask_args(q, mask)
    cfg = _launch_config(d, "fwd", lq, launch_configs)
    grid = (triton.cdiv(lq, cfg["BLOCK_M"]), bsz * heads)
    _fwd[grid](
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


def _backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    out: Tensor,
    lse: Tensor,
    scale: float,
    *,
    launch_configs: Mapping | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from the forward's out and lse; ``launch_configs`` as in _launch_config."""
    bsz, heads, lq, d = q.shape
    lk = k.shape[2]
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    delta = torch.empty(bsz, heads, lq, device=q.device, dtype=torch.float32)
    _bwd_delta[(triton.cdiv(lq, 64), bsz * heads)](
        out, dout, delta, *out.stride(), *dout.stride(), heads, lq, HEAD_DIM=d, BLOCK_M=64
    )  # (B, H, Lq): rowsum(dO * O)
    # dq, dk and dv are written with q's, k's and v's strides: a non-dense view (a chunk of a
    # fused qkv projection) is first copied into ``empty_like``'s dense layout, which is also
    # what the fake implementation promises to torch.compile
    q, k, v = (x if _result_like(x).stride() == x.stride() else torch.empty_like(x).copy_(x)
               for x in (q, k, v))  # fmt: skip
    dq, dk, dv = _result_like(q), _result_like(k), _result_like(v)
    m, smb, smn, has_mask = _mask_args(q, mask)
    cfg_kv = _launch_config(d, "dkdv", lk, launch_configs)
    cfg_q = _launch_config(d, "dq", lq, launch_configs)
    common = dict(HAS_MASK=has_mask, HEAD_DIM=d, **_precision_args(q))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), smb, smn)
    _bwd_dkdv[(triton.cdiv(lk, cfg_kv["BLOCK_N"]), bsz * heads)](
        q, k, v, m, dout, lse, delta, dk, dv, *strides, heads, lq, lk, scale, scale * LOG2E,
        **common, **cfg_kv,
    )  # fmt: skip
    _bwd_dq[(triton.cdiv(lq, cfg_q["BLOCK_M"]), bsz * heads)](
        q, k, v, m, dout, lse, delta, dq, *strides, heads, lq, lk, scale, scale * LOG2E,
        **common, **cfg_q,
    )  # fmt: skip
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# --------------------------------------------------------------------------------------------
# torch.library registration: opaque to torch.compile, with shapes from the fake impls.


@torch.library.custom_op("sdiff::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, scale: float
) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, key_padding_mask, scale, launch_configs=_env_launch_configs())


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
    return _backward(
        dout, q, k, v, key_padding_mask, out, lse, scale, launch_configs=_env_launch_configs()
    )


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
