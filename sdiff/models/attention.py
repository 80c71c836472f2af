"""The one attention entry point, ``sdiff.attention``, and its backends.

    attention(q, k, v, *, backend="auto", key_padding_mask=None) -> (B, H, Lq, D)

Layout is SDPA's: q (B, H, Lq, D), k and v (B, H, Lk, D); Lk may differ from Lq
(cross-attention). ``key_padding_mask`` (B, Lk) bool marks padded keys with True, as in
``torch.nn.MultiheadAttention``; a query whose keys are all padding gets zeros (so an empty
caption is a well-defined "no text" condition rather than NaN).

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; PyTorch's own dispatcher then
  picks flash / cuDNN / memory-efficient / math kernels on CUDA.
- ``sdpa-cudnn``, ``sdpa-flash``, ``sdpa-efficient``: SDPA with that kernel tried first
  (``torch.nn.attention.sdpa_kernel`` with priority); PyTorch falls back to its other kernels
  where the first cannot take the inputs (a mask it does not support, the CPU).
- ``math``: softmax(q k^T / sqrt(D)) v written out, accumulated in float32: the reference.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (optional extra; CUDA only).
- ``triton``: sdiff's own flash-attention kernel (``sdiff.kernels.attention``), forward and
  backward, registered with ``torch.library`` so compiled graphs do not break at it. CUDA, or
  the Triton interpreter on CPU (``TRITON_INTERPRET=1`` set before triton is imported).
- ``triton-short``: sdiff's short-sequence kernel (``sdiff.kernels.attention_short``): all keys
  of a head in one tile (at most 512; 256 at head dim 128 in fp16/bf16, fewer in fp32), the
  softmax in one shot and the backward in one sweep. Runs where ``triton`` runs.

``auto`` is resolved by ``select_backend``, the single predicate every model goes through, from
a table of measured timings (``attention_dispatch.json`` beside this file, or the file named by
``SDIFF_ATTN_DISPATCH``; ``sdiff bench attention --write-table`` writes it). The table is keyed
by GPU (name, else compute capability), dtype, head dim, sequence-length bucket (the next power
of two of the query and of the key length), key padding mask or not, and mode (``fwd`` when no
gradient is needed, ``fwd+bwd`` otherwise); ``auto`` takes the fastest backend measured there
that can run here. Off CUDA, and for anything not measured, ``auto`` is ``sdpa``. If a kernel
of ours fails to build on a GPU, ``auto`` warns once and stays off ``triton`` and ``triton-short``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

# SDPA with one kernel tried first, named as ``sdiff bench attention`` names its rows
SDPA_KERNELS = {
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
}
BACKENDS = ("auto", "sdpa", *SDPA_KERNELS, "math", "xformers", "triton", "triton-short")
# what ``auto`` may pick from the table
DISPATCHABLE = ("triton", "triton-short", *SDPA_KERNELS, "xformers")
DISPATCH_TABLE = Path(__file__).with_name("attention_dispatch.json")
DISPATCH_FORMAT = 1
MODES = ("fwd", "fwd+bwd")
_TRITON_FAILED: list[str] = []  # set when a kernel failed under "auto" (then: no triton*)

__all__ = [
    "BACKENDS",
    "DISPATCH_TABLE",
    "attention",
    "attention_math",
    "clear_dispatch_cache",
    "load_dispatch_table",
    "select_backend",
    "seq_bucket",
]


def _xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"attention takes (batch, heads, length, head_dim) tensors; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, h, _, d = q.shape
    if k.shape[:2] != (b, h) or v.shape[:2] != (b, h) or k.shape[3] != d:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree on "
            f"batch, heads or head_dim"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (b, k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (batch, key length) = "
                f"{(b, k.shape[2])}; got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


def seq_bucket(length: int) -> int:
    """The sequence-length regime of the dispatch table: the next power of two (256 for 200)."""
    return 1 << max(0, int(length) - 1).bit_length()


def _entry_error(i: int, entry: object) -> str | None:
    """Why entry ``i`` of a dispatch table is malformed, or None if it is well formed."""
    if not isinstance(entry, dict):
        return f"entry {i} is not an object"
    fields = {"device": str, "capability": str, "dtype": str, "head_dim": int, "seq_bucket": int,
              "mask": bool, "mode": str, "ms": dict}  # fmt: skip
    for name, kind in fields.items():
        if not isinstance(entry.get(name), kind) or (kind is int and isinstance(entry[name], bool)):
            return f"entry {i} needs {name!r} as {kind.__name__}; got {entry.get(name)!r}"
    if entry["mode"] not in MODES or entry["dtype"] not in ("float32", "float16", "bfloat16"):
        return f"entry {i} has mode {entry['mode']!r} / dtype {entry['dtype']!r}"
    if entry["seq_bucket"] != seq_bucket(entry["seq_bucket"]):
        return f"entry {i} has seq_bucket {entry['seq_bucket']}, not a power of two"
    ms = entry["ms"]
    if not ms or not all(isinstance(t, int | float) and t > 0 for t in ms.values()):
        return f"entry {i} needs 'ms' as a non-empty map of backend to positive milliseconds"
    return None


@functools.cache
def load_dispatch_table(path: str | os.PathLike = DISPATCH_TABLE) -> Mapping:
    """The dispatch table in ``path``, read once: ``{"format": 1, "entries": [...]}``, entries
    keyed by device, capability, dtype, head_dim, seq_bucket, mask and mode, each with ``ms``
    (backend -> median milliseconds measured) and where and when that was measured. A
    ValueError naming the file if it cannot be read or is not such a table."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError) as err:
        why = f"not a readable JSON file ({err})"
        raise ValueError(f"attention dispatch table {path}: {why}") from err
    if not isinstance(table, dict) or table.get("format") != DISPATCH_FORMAT:
        raise ValueError(f"attention dispatch table {path}: not a format {DISPATCH_FORMAT} table")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"attention dispatch table {path}: 'entries' must be a list")
    for i, entry in enumerate(entries):
        if why := _entry_error(i, entry):
            raise ValueError(f"attention dispatch table {path}: {why}")
    return table


@functools.cache
def _dispatch_index(path: str) -> dict[tuple, dict[str, float]]:
    """(device name or "sm" capability, dtype, head_dim, seq_bucket, mask, mode) -> timings; a
    name match is exact, a capability entry is the first measured on any GPU of that capability."""
    index: dict[tuple, dict[str, float]] = {}
    for e in load_dispatch_table(path)["entries"]:
        shape = (e["dtype"], e["head_dim"], e["seq_bucket"], e["mask"], e["mode"])
        index[(e["device"], *shape)] = e["ms"]
        index.setdefault((f"sm{e['capability']}", *shape), e["ms"])
    return index


def clear_dispatch_cache() -> None:
    """Forget the tables read and the choices made (after a table file changed)."""
    load_dispatch_table.cache_clear()
    _dispatch_index.cache_clear()
    _auto_backend.cache_clear()


def _device_identity(device: torch.device) -> tuple[str, str] | None:
    """(GPU name, compute capability "major.minor") of a CUDA device; None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return torch.cuda.get_device_name(device), f"{major}.{minor}"


def _triton_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    from sdiff.kernels import attention as kernel

    on_device = device.type == "cuda" or kernel.interpreting()
    ok = kernel.triton_available() and on_device
    return ok and dtype in kernel.DTYPES and head_dim in kernel.HEAD_DIMS


def _triton_short_runs(
    device: torch.device, dtype: torch.dtype, head_dim: int, bucket_k: int
) -> bool:
    """Whether the short kernel runs here for keys of seq_bucket ``bucket_k``: as ``triton``,
    with at most ``max_keys`` keys (a power of two: bucket_k <= it iff the length is)."""
    from sdiff.kernels.attention_short import max_keys

    return _triton_runs(device, dtype, head_dim) and bucket_k <= max_keys(head_dim, dtype)


@functools.cache
def _auto_backend(
    device: torch.device, dtype: torch.dtype, head_dim: int, bucket: int, bucket_k: int,
    masked: bool, mode: str, triton_failed: bool, table: str,
) -> str:  # fmt: skip
    """``auto``'s choice, cached per call signature: the fastest dispatchable backend the table
    measured for this GPU and shape that can run here, else ``sdpa``. ``bucket`` and
    ``bucket_k`` are the query's and the keys' seq_bucket."""
    identity = _device_identity(device)
    if identity is None or bucket_k != bucket:
        return "sdpa"  # off CUDA, or a cross-attention regime nobody measured
    index = _dispatch_index(table)
    shape = (str(dtype).removeprefix("torch."), head_dim, bucket, masked, mode)
    ms = index.get((identity[0], *shape)) or index.get((f"sm{identity[1]}", *shape)) or {}
    runnable = {
        "triton": not triton_failed and _triton_runs(device, dtype, head_dim),
        "triton-short": not triton_failed and _triton_short_runs(device, dtype, head_dim, bucket_k),
        "xformers": device.type == "cuda" and _xformers_available(),
    }
    timed = [(t, b) for b, t in ms.items() if b in DISPATCHABLE and runnable.get(b, True)]
    return min(timed)[1] if timed else "sdpa"


def _bucket(length: int | torch.SymInt) -> int:
    """seq_bucket of a length that torch.compile may hold as a symbol, by comparisons only: each
    becomes a guard, so a compiled graph is reused across the bucket and retraced outside it."""
    bucket = 1
    while bucket < length:
        bucket *= 2
    return bucket


def _exact(n: int | torch.SymInt) -> int:
    """``n`` as a Python int, a symbol of torch.compile pinned by bisection (each comparison a
    guard): ``assume_constant_result`` takes constant arguments only."""
    low, high = 0, _bucket(n)  # n in (low, high]
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if n <= mid else (mid, high)
    return high


@torch.compiler.assume_constant_result
def _auto_backend_constant(*key: object) -> str:
    """``_auto_backend`` that torch.compile calls once while tracing and keeps as a constant
    (the first lookup reads the table file, which a traced graph cannot do)."""
    return _auto_backend(*key)


def select_backend(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, backend: str = "auto"
) -> str:
    """The one predicate that decides which backend runs an attention call."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "xformers":
        if not _xformers_available():
            raise ValueError(
                "attention backend 'xformers' was asked for but xformers is not installed "
                "(pip install 'sdiff[xformers]'), or use backend='auto'"
            )
        if not q.is_cuda:
            raise ValueError(
                f"attention backend 'xformers' has no kernels for device {q.device.type!r}; "
                f"use backend='sdpa' or 'auto'"
            )
        return "xformers"
    if backend == "triton":
        from sdiff.kernels import attention as kernel

        if not kernel.supports(q, k, v, key_padding_mask):
            raise ValueError(
                f"attention backend 'triton' does not support {q.device.type} {q.dtype} inputs "
                f"with head dim {q.shape[-1]}: it needs CUDA (or TRITON_INTERPRET=1 for tests) "
                f"and head dim in {kernel.HEAD_DIMS}"
            )
        return "triton"
    if backend == "triton-short":
        from sdiff.kernels import attention_short as short

        if not short.supports(q, k, v, key_padding_mask):
            d, lk = q.shape[-1], k.shape[2]
            raise ValueError(
                f"attention backend 'triton-short' does not support {q.device.type} {q.dtype} "
                f"inputs with head dim {d} and {lk} keys: it needs CUDA (or TRITON_INTERPRET=1 "
                f"for tests), head dim in {short.HEAD_DIMS} and at most "
                f"{short.max_keys(d, q.dtype)} keys at this head dim and dtype; use 'triton'"
            )
        return "triton-short"
    if backend == "auto":
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        head_dim = _exact(q.shape[-1]) if v.shape[-1] == q.shape[-1] else -1  # -1: no kernel can
        table = os.environ.get("SDIFF_ATTN_DISPATCH") or str(DISPATCH_TABLE)
        key = (q.device, q.dtype, head_dim, _bucket(q.shape[2]), _bucket(k.shape[2]),
               key_padding_mask is not None, MODES[grad], bool(_TRITON_FAILED), table)  # fmt: skip
        return _auto_backend_constant(*key)
    return backend


def attention_math(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Reference: softmax(q k^T / sqrt(D)) v with float32 (or float64) accumulation; the
    kernel's ``attention_ref``."""
    from sdiff.kernels.attention import attention_ref

    return attention_ref(q, k, v, key_padding_mask)


def _attention_triton(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    from sdiff.kernels.attention import flash_attention

    return flash_attention(q, k, v, key_padding_mask)


def _attention_triton_short(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None
) -> Tensor:
    from sdiff.kernels.attention_short import short_attention

    return short_attention(q, k, v, key_padding_mask)


def _sdpa_first(name: str):
    """SDPA with kernel ``name`` of SDPA_KERNELS tried first, then PyTorch's usual order."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = getattr(SDPBackend, SDPA_KERNELS[name])
    usual = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
             SDPBackend.CUDNN_ATTENTION]  # fmt: skip
    order = [first, *(b for b in usual if b != first)]

    def run(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        with sdpa_kernel(order, set_priority=True):
            return _attention_sdpa(q, k, v, key_padding_mask)

    return run


def _attention_sdpa(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    keep = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, Lk), True = attend
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    empty = key_padding_mask.all(dim=1)[:, None, None, None]  # (B, 1, 1, 1)
    return torch.where(empty, torch.zeros_like(out), out)


def _attention_xformers(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
    import xformers.ops as xops

    bias = None
    if key_padding_mask is not None:
        b, h, lq, _ = q.shape
        lk = k.shape[2]
        # xformers wants the bias's last dimension stored with a stride that is a multiple of 8
        padded = -(-lk // 8) * 8
        storage = q.new_zeros(b, h, lq, padded)
        storage[..., :lk].masked_fill_(key_padding_mask[:, None, None, :], -math.inf)
        bias = storage[..., :lk]
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    ).transpose(1, 2)  # (B, H, Lq, D)
    if key_padding_mask is not None:
        empty = key_padding_mask.all(dim=1)[:, None, None, None]
        out = torch.where(empty, torch.zeros_like(out), out)
    return out


_IMPLEMENTATIONS = {
    "sdpa": _attention_sdpa,
    **{name: _sdpa_first(name) for name in SDPA_KERNELS},
    "math": attention_math,
    "xformers": _attention_xformers,
    "triton": _attention_triton,
    "triton-short": _attention_triton_short,
}


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    backend: str = "auto",
    key_padding_mask: Tensor | None = None,
) -> Tensor:
    """Scaled dot-product attention through the backend ``select_backend`` picks."""
    _check(q, k, v, key_padding_mask)
    chosen = select_backend(q, k, v, key_padding_mask, backend)
    ours = chosen in ("triton", "triton-short")
    if ours and backend == "auto" and not torch.compiler.is_compiling():
        try:
            return _IMPLEMENTATIONS[chosen](q, k, v, key_padding_mask)
        except Exception as err:  # a kernel that does not build must not stop a training run
            _TRITON_FAILED.append(f"{type(err).__name__}: {err}")
            warnings.warn(
                f"the {chosen} attention kernel failed ({_TRITON_FAILED[-1]}); backend 'auto' "
                f"uses sdpa from now on",
                stacklevel=2,
            )
            chosen = "sdpa"
    return _IMPLEMENTATIONS[chosen](q, k, v, key_padding_mask)
