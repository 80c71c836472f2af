"""What a training step keeps in memory, counted on meta tensors: the machinery behind
``sdiff.bench.memory`` (see its docstring for the method).

- ``SavedTensorCounter``: bytes autograd saves for backward, each storage once, attributed to the
  model part running.
- ``_LiveBytes``: live-tensor tracking through backward (the simulated backward peak).
- ``TrainingSemantics``: the op policy of a CUDA bf16 autocast step (which ops run in bf16 or
  fp32, autocast's cache of bf16 weight copies), and the saved tensors of the flash attention
  and fused dropout kernels, so meta tensors keep what a real GPU step keeps.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICES = ("cuda", "cpu")
# --------------------------------------------------------------------------------------------
# Counting saved tensors, tracking live ones


class SavedTensorCounter:
    """Bytes of the tensors autograd saves for backward while active, each storage once.

    ``exclude``: tensors whose storages are not counted (the parameters). ``units``: (module,
    part) pairs; bytes first saved while a unit's forward runs go to its part, the rest to
    ``part`` ("other" unless set). ``labels`` (storage id -> part) overrides both at read time.
    """

    def __init__(
        self, exclude: Iterable[Tensor] = (), units: Iterable[tuple[nn.Module, str]] = ()
    ) -> None:
        self._excluded = [t.untyped_storage() for t in exclude]  # held, so their ids stay
        self._exclude = {id(s) for s in self._excluded}
        self._units = list(units)
        self._seen: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, part)
        self._keep: list = []  # the saved storages, held so that no id is reused meanwhile
        self._stack: list[str] = []
        self._gap: set[int] = set()  # saved outside every unit since a unit last started
        self._hooks: list = []
        self._ctx = None
        self.labels: dict[int, str] = {}
        self.part = "other"

    def _pack(self, t: Tensor) -> Tensor:
        s = t.untyped_storage()
        key = id(s)
        if key not in self._exclude and key not in self._seen:
            self._seen[key] = (s.nbytes(), self._stack[-1] if self._stack else self.part)
            self._keep.append(s)
            if not self._stack:
                self._gap.add(key)
        return t

    def note(self, t: Tensor) -> None:
        """Count ``t`` as kept for backward although autograd's hooks do not show it (what a
        selective checkpoint keeps in its own cache), attributed as a saved tensor would be."""
        self._pack(t)

    def _enter(self, part: str, _module: nn.Module, args: tuple) -> None:
        # checkpoint() saves a region's inputs just before it calls the region: give them to it
        for a in args:
            key = id(a.untyped_storage()) if isinstance(a, Tensor) else None
            if key in self._gap:
                self._seen[key] = (self._seen[key][0], part)
        self._gap.clear()
        self._stack.append(part)

    def _leave(self, *_) -> None:  # a forward hook: returns None, so the output stays
        self._stack.pop()

    def __enter__(self) -> SavedTensorCounter:
        for module, part in self._units:
            self._hooks.append(
                module.register_forward_pre_hook(functools.partial(self._enter, part))
            )
            self._hooks.append(module.register_forward_hook(self._leave))
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def release(self) -> None:
        """Drop the references held for counting (so that backward can free the tensors)."""
        self._keep.clear()

    @property
    def total(self) -> int:
        return sum(n for n, _ in self._seen.values())

    @property
    def by_part(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key, (nbytes, part) in self._seen.items():
            part = self.labels.get(key, part)
            out[part] = out.get(part, 0) + nbytes
        return out

    def storage_ids(self) -> set[int]:
        return set(self._seen)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create, while they live (a weakref finalizer on each
    storage), and their peak since ``reset_peak``. Storages that exist before (parameters,
    inputs) are not counted, even when an op returns a view of one."""

    def __init__(self, existing: Iterable[Tensor]) -> None:
        super().__init__()
        self._existing = [t.untyped_storage() for t in existing]
        self._tracked = {id(s) for s in self._existing}
        self.live = 0
        self.peak = 0

    def _free(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                s = t.untyped_storage()
                if id(s) not in self._tracked:
                    nbytes = s.nbytes()
                    self._tracked.add(id(s))
                    weakref.finalize(s, self._free, id(s), nbytes)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
        return out


# --------------------------------------------------------------------------------------------
# What a training step runs: autocast's op policy, the flash attention and dropout kernels

# CUDA autocast policy (ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP / AT_FORALL_FP32 /
# AT_FORALL_FP32_SET_OPT_DTYPE), at the level of the Python functions the models call.
_LOWER = {
    F.linear, F.bilinear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
    F.conv_transpose3d, F.prelu, F.scaled_dot_product_attention, torch.matmul, torch.mm, torch.bmm,
    torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum, torch.Tensor.matmul,
    torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
}  # fmt: skip
_FP32 = {
    F.group_norm, F.layer_norm, F.softmax, F.log_softmax, F.softplus, F.mse_loss, F.l1_loss,
    F.smooth_l1_loss, F.huber_loss, F.kl_div, F.nll_loss, F.binary_cross_entropy_with_logits,
    F.cosine_similarity, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log, torch.pow,
    torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.softmax,
    torch.Tensor.softmax, torch.log_softmax, torch.Tensor.log_softmax, torch.logsumexp,
    torch.cumsum, torch.Tensor.cumsum, torch.expm1, torch.log1p, torch.reciprocal,
}  # fmt: skip
_FP32_INTERPOLATE = ("nearest", "nearest-exact", "linear", "bilinear", "bicubic", "trilinear")


class FlopCount(TorchDispatchMode):
    """FLOPs of the ops PyTorch's FLOP counter knows (matrix products, convolutions,
    attention kernels), summed as they run; ``torch.utils.flop_counter.FlopCounterMode`` without
    its module tracker, whose hooks keep tensors alive and would distort the live-byte count."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func.overloadpacket)
        if count is not None:
            self.total += int(count(*args, **kwargs, out_val=out))
        return out


def _cpu_flash_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether CPU SDPA picks its flash kernel (what ``torch._fused_sdp_choice`` answers on
    CPU; on meta it always says math): 4-D inputs, unit stride in the head dim, equal head dims.
    """
    dense = all(t.dim() == 4 and t.stride(-1) == 1 and t.shape[-2] > 0 for t in (q, k, v))
    return dense and q.shape[-1] == k.shape[-1] == v.shape[-1]


class _FlashLikeAttention(torch.autograd.Function):
    """Saves what sdiff's Triton kernel (and FlashAttention) saves: q, k, v, out (a new
    contiguous (B, H, Lq, D) tensor) and the fp32 log-sum-exp (B, H, Lq) [+ the mask]."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if q.device.type == "meta" and mask is None:  # the real op's meta kernel: its outputs
            # and FLOPs are what FlopCounterMode and a selective checkpoint see on the GPU
            out, lse, *rest = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
            # in the layout of q (the heads' view of one (B, N, W) tensor); sdiff's kernel, as
            # measured on the H200, returns a new contiguous one, which the model's head merge
            # then copies: kept here (cuDNN, which returns q's layout, keeps one copy less)
            out = out.contiguous()
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.lengths = rest[2:4]  # the rest is dropped here, as on CPU tensors (below)
            return out
        if q.device.type == "meta":
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        else:  # values only matter off meta
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).contiguous()
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)  # (B, H, Lq)
        ctx.save_for_backward(q, k, v, out, lse, *([mask] if mask is not None else []))
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # shapes only: dq, dk, dv as the kernel allocates them
        q, k, v, *saved = ctx.saved_tensors
        if hasattr(ctx, "lengths"):  # meta: the real backward op, for its FLOPs
            seed = torch.empty(2, dtype=torch.uint64, device=q.device)  # (unused: no dropout)
            offset = torch.empty((), dtype=torch.uint64, device=q.device)
            op = torch.ops.aten._scaled_dot_product_flash_attention_backward
            args = (dout, q, k, v, *saved, None, None, *ctx.lengths, 0.0, False, seed, offset)
            return *op(*args), None
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None


def _check_dtype_device(dtype: str, device: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {list(DEVICES)}")
    if device == "cpu" and dtype != "fp32":
        raise ValueError(
            "device='cpu' models fp32 only: CPU autocast follows another op policy than CUDA's"
        )


class TrainingSemantics(TorchFunctionMode):
    """Makes a forward on any device (meta included) keep what a training step on ``device``
    keeps: CUDA autocast's op policy and weight cache when ``dtype`` is bf16, flash attention
    and fused-dropout masks on CUDA; CPU's SDPA choice and dropout noise on CPU.

    ``copies`` is autocast's cache (id(parameter) -> (parameter, its bf16 copy)); autocast
    empties it when it exits, ``release_cache`` does here, and ``caching = False`` stops it (as
    during backward's recomputation, whose autocast context is short-lived)."""

    def __init__(self, dtype: str = "bf16", device: str = "cuda") -> None:
        super().__init__()
        _check_dtype_device(dtype, device)
        self.cast = None if dtype == "fp32" else DTYPES[dtype]
        self.device = device
        self.copies: dict[int, tuple[Tensor, Tensor]] = {}
        self.caching = True

    def release_cache(self) -> list[Tensor]:
        copies = [copy for _, copy in self.copies.values()]
        self.copies.clear()
        return copies

    def _to(self, x: object, dtype: torch.dtype) -> object:
        if type(x) in (list, tuple):
            return type(x)(self._to(v, dtype) for v in x)
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if x.dtype == torch.float64:  # autocast leaves float64 alone
            return x
        if self.caching and x.is_leaf and x.requires_grad:  # autocast caches weight casts
            if id(x) not in self.copies:
                self.copies[id(x)] = (x, x.to(dtype))
            return self.copies[id(x)][1]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.cast is not None:
            to = None
            if func in _LOWER:
                to = self.cast
            elif func in _FP32 or (
                func is F.interpolate and kwargs.get("mode", "nearest") in _FP32_INTERPOLATE
            ):
                to = torch.float32
            if to is not None:
                args, kwargs = self._to(args, to), {k: self._to(v, to) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:
            return self._attention(*args, **kwargs)
        if func is F.dropout and self.device == "cuda":
            return self._dropout(*args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kw):
        plain = dropout_p == 0 and not is_causal and kw.get("scale") is None
        if self.device == "cuda" and plain:
            return _FlashLikeAttention.apply(q, k, v, attn_mask)
        if self.device == "cuda" or q.device.type != "meta" or not _cpu_flash_ok(q, k, v):
            # off meta: PyTorch's own choice; on meta SDPA takes the math path, which is also
            # what CPU runs when flash cannot (B x H x Lq x Lk probabilities saved)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw
            )
        mask = attn_mask
        if mask is not None and mask.dtype == torch.bool:  # SDPA turns a bool mask into floats
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device)
        op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return op(q, k, v, attn_mask=mask)[0]

    def _dropout(self, x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False):
        if not training or p == 0 or inplace:
            return F.dropout(x, p, training, inplace)
        return torch.native_dropout(x, p, True)[0]  # CUDA's fused kernel: saves a bool mask
