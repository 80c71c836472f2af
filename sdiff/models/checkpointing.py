"""Activation checkpointing of the models' regions, full or selective, and the plans that say
which region does what.

Regions: each conv level's ResBlocks (``level.<i>``, the down and up blocks of level i, each
block its own checkpoint) and, in the U-ViT, each transformer block (``block.<k>``). A region's
policy:

- ``none``: autograd keeps what every op saves for backward.
- ``full``: only the region's inputs are kept; backward reruns its whole forward (every matmul,
  convolution and attention again: the recomputed FLOPs are the region's forward FLOPs).
- ``selective``: the outputs of the expensive ops (matrix products, convolutions, attention
  kernels: ``SAVED_OPS``) are kept, everything else (norms, modulation, activations, dtype
  casts, additions) is recomputed in backward from them (``torch.utils.checkpoint``'s selective
  checkpointing, ``create_selective_checkpoint_contexts``). Next to no recomputed FLOPs; it
  frees what the cheap ops save, e.g. the GELU's input and output in a transformer MLP (8 of
  the ~17 width-sized tensors a U-ViT block keeps per token under bf16 autocast) and the
  GroupNorm/SiLU inputs of a ResBlock, at the price of keeping the matmul outputs.

A plan (the model configs' ``checkpoint_plan``) is a tuple of ``"<region>=<policy>"`` entries:
``levels=<p>`` and ``blocks=<p>`` set every conv level / every transformer block, ``level.<i>=<p>``
and ``block.<k>=<p>`` one of them (a specific entry overrides a group entry whatever the order).
It refines the older switches: ``checkpoint_levels`` (those levels ``full``) and
``checkpoint_transformer`` (every block ``full``), which apply first. ``sdiff bench memory
--plan`` chooses a plan that fits a memory budget at the least recomputed FLOPs.

``observe_selective_saves`` lets the memory estimator (``sdiff.bench.memory``) see the tensors a
selective region keeps, which autograd's saved-tensor hooks do not show (they live in the
checkpoint's own cache).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

POLICIES = ("none", "selective", "full")
_ENTRY = re.compile(r"^(levels|blocks|level|block)(?:\.(\d+)(?:-(\d+))?)?=(\w+)$")

__all__ = [
    "POLICIES",
    "observe_selective_saves",
    "parse_plan",
    "plan_policy",
    "run_checkpointed",
    "saved_ops",
]

# Ops whose outputs a selective region keeps (by packet name; those missing from the installed
# PyTorch, or sdiff's own kernels when they are not registered, are skipped).
_SAVED_NAMES = (
    "aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution",
    "aten._scaled_dot_product_flash_attention",
    "aten._scaled_dot_product_flash_attention_for_cpu",
    "aten._scaled_dot_product_efficient_attention",
    "aten._scaled_dot_product_cudnn_attention",
    "sdiff.flash_attn_fwd", "sdiff.short_attn_fwd",
)  # fmt: skip


def _packet(name: str):
    namespace, op = name.split(".")
    try:
        return getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def _aten_saved() -> frozenset:
    return frozenset(p for n in _SAVED_NAMES if n.startswith("aten.") and (p := _packet(n)))


def saved_ops() -> frozenset:
    """The op packets whose outputs a selective region keeps: the ATen ones this PyTorch has,
    and sdiff's attention kernels once they are registered (imported)."""
    own = (_packet(n) for n in _SAVED_NAMES if n.startswith("sdiff."))
    return _aten_saved() | {p for p in own if p is not None}


def saves(op) -> bool:
    """Whether a selective region keeps the output of ``op`` (an ATen or sdiff overload)."""
    packet = getattr(op, "overloadpacket", op)
    if packet in _aten_saved():
        return True
    name = getattr(packet, "_qualified_op_name", "")
    return name.startswith("sdiff::") and name.replace("::", ".") in _SAVED_NAMES


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if saves(op) else CheckpointPolicy.PREFER_RECOMPUTE


# --------------------------------------------------------------------------------------------
# Plans


def parse_plan(plan: tuple[str, ...], levels: int, blocks: int) -> dict[str, str]:
    """``{"levels": p, "blocks": p, "level.i": p, "block.k": p}`` from a plan's entries, checked
    against a model with ``levels`` conv levels and ``blocks`` transformer blocks; a range
    (``block.0-11=full``) sets each region in it."""
    parsed: dict[str, str] = {}
    for entry in plan:
        m = _ENTRY.match(entry.replace(" ", "")) if isinstance(entry, str) else None
        if m is not None and (m.group(2) is None) != m.group(1).endswith("s"):
            m = None  # "levels.3" or "level" alone
        if m is None:
            raise ValueError(
                f"checkpoint_plan entry {entry!r} is not '<region>=<policy>' with region one of "
                f"levels, blocks, level.<i>, block.<k> (or a range: block.<a>-<b>) and policy "
                f"one of {list(POLICIES)}"
            )
        kind, first, last, policy = m.groups()
        if policy not in POLICIES:
            raise ValueError(
                f"checkpoint_plan entry {entry!r}: unknown policy {policy!r}; choose one of "
                f"{list(POLICIES)}"
            )
        if kind.startswith("block") and not blocks:
            raise ValueError(f"checkpoint_plan entry {entry!r}: this model has no transformer")
        if first is None:
            keys = [kind]
        else:
            count = levels if kind == "level" else blocks
            lo, hi = int(first), int(last if last is not None else first)
            if not lo <= hi < count:
                raise ValueError(
                    f"checkpoint_plan entry {entry!r}: this model's {kind} indices are "
                    f"0..{count - 1} (a range runs upwards)"
                )
            keys = [f"{kind}.{i}" for i in range(lo, hi + 1)]
        for key in keys:
            if key in parsed and parsed[key] != policy:
                raise ValueError(f"checkpoint_plan sets {key} twice ({parsed[key]}, {policy})")
            parsed[key] = policy
    return parsed


def plan_policy(parsed: dict[str, str], region: str, index: int, default: str) -> str:
    """The policy of ``region`` ("level" or "block") ``index``: its own entry, else its group's
    (``levels`` / ``blocks``), else ``default`` (what the older switches say)."""
    return parsed.get(f"{region}.{index}", parsed.get(f"{region}s", default))


# --------------------------------------------------------------------------------------------
# Running a region

_OBSERVERS: list[Callable[[Tensor], object]] = []
# what a selective region keeps bypasses saved-tensor hooks (offloading ones included): said
# explicitly where PyTorch asks for it (2.14 warns that the default will change)
_SAC_KW = (
    {"respect_saved_tensors_hooks": False}
    if "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters
    else {}
)


class _SavedOutputs(TorchDispatchMode):
    """Hands the outputs a selective region keeps to an observer (the memory estimator)."""

    def __init__(self, observe: Callable[[Tensor], object]) -> None:
        super().__init__()
        self.observe = observe

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if saves(func):
            for t in tree_leaves(out):
                if isinstance(t, Tensor):
                    self.observe(t)
        return out


@contextlib.contextmanager
def observe_selective_saves(observe: Callable[[Tensor], object]) -> Iterator[None]:
    """While active, ``observe(t)`` is called on every tensor a selective region keeps for
    backward (in its forward, not when backward recomputes it)."""
    _OBSERVERS.append(observe)
    try:
        yield
    finally:
        _OBSERVERS.remove(observe)


def _selective_contexts():
    forward, recompute = create_selective_checkpoint_contexts(_policy)
    if not _OBSERVERS:
        return forward, recompute
    if _SAC_KW:  # what checkpoint() sets on the mode itself, which it cannot see in the stack
        forward.respect_saved_tensors_hooks = False
    stack = contextlib.ExitStack()
    stack.enter_context(forward)
    stack.enter_context(_SavedOutputs(_OBSERVERS[-1]))  # on top: sees what forward keeps
    return stack, recompute


def run_checkpointed(fn: Callable[..., Tensor], *args, policy: str) -> Tensor:
    """``fn(*args)`` under ``policy`` (``none``, ``selective``, ``full``) when gradients are
    needed; plainly otherwise."""
    if policy == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if policy == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if policy == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_contexts, **_SAC_KW)
    raise ValueError(f"unknown checkpoint policy {policy!r}; choose one of {list(POLICIES)}")
