"""The one attention entry point, ``sdiff.attention``, and its backends.

    attention(q, k, v, *, backend="auto", key_padding_mask=None) -> (B, H, Lq, D)

Layout is SDPA's: q (B, H, Lq, D), k and v (B, H, Lk, D); Lk may differ from Lq
(cross-attention). ``key_padding_mask`` (B, Lk) bool marks padded keys with True, as in
``torch.nn.MultiheadAttention``; a query whose keys are all padding gets zeros (so an empty
caption is a well-defined "no text" condition rather than NaN).

Backends:
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; PyTorch's own dispatcher then
  picks flash / cuDNN / memory-efficient / math kernels on CUDA.
- ``math``: softmax(q k^T / sqrt(D)) v written out, accumulated in float32: the reference.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` (optional extra; CUDA only).
- ``triton``: sdiff's own flash-attention kernel (``sdiff.kernels.attention``), forward and
  backward, registered with ``torch.library`` so compiled graphs do not break at it. CUDA, or
  the Triton interpreter on CPU (``TRITON_INTERPRET=1`` set before triton is imported).
``auto`` is resolved by ``select_backend``, the single predicate every model goes through:
``triton`` for CUDA inputs the kernel supports (fp32/fp16/bf16, head dim 16/32/64/128), else
``sdpa``. If the kernel fails to build on a GPU, ``auto`` warns once and stays on ``sdpa``.
"""

from __future__ import annotations

import importlib.util
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "math", "xformers", "triton")
_TRITON_FAILED: list[str] = []  # set when the kernel failed under "auto" (then: sdpa)

__all__ = ["BACKENDS", "attention", "attention_math", "select_backend"]


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
    if backend == "auto":
        if q.is_cuda and not _TRITON_FAILED:
            from sdiff.kernels import attention as kernel

            if kernel.supports(q, k, v, key_padding_mask):
                return "triton"
        return "sdpa"
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
    "math": attention_math,
    "xformers": _attention_xformers,
    "triton": _attention_triton,
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
    if chosen == "triton" and backend == "auto" and not torch.compiler.is_compiling():
        try:
            return _attention_triton(q, k, v, key_padding_mask)
        except Exception as err:  # a kernel that does not build must not stop a training run
            _TRITON_FAILED.append(f"{type(err).__name__}: {err}")
            warnings.warn(
                f"the triton attention kernel failed ({_TRITON_FAILED[-1]}); backend 'auto' "
                f"uses sdpa from now on",
                stacklevel=2,
            )
            chosen = "sdpa"
    return _IMPLEMENTATIONS[chosen](q, k, v, key_padding_mask)
