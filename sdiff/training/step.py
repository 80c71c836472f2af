"""The one training step: everything a step touches (``TrainState``) and the step itself.

    state = build_state(config, device)                  # weights, EMA, Adam, schedule, RNG
    batch = prepare_batch(state, x, y, config)           # flips, label dropout
    loss, grad_norm = train_step(state, batch, config)   # warm-up lr, loss, backward, clip,
                                                         # Adam, EMA, step += 1

``sdiff.training.trainer.Trainer`` runs this step inside its loop (data, logging, checkpoints,
sample grids), and every benchmark that times or measures training (``sdiff bench``'s
throughput and MFU, ``sdiff bench memory --measure``, the asv suite, bench/perf) calls the same
functions, so a change to the step shows in all of them and no benchmark times a copy.

The step, in order: the learning rate of this step (linear warm-up over ``warmup_images``);
``zero_grad``; the diffusion loss (``sdiff.diffusion.process.diffusion_loss``: t and noise
drawn from the state's generator) under bf16 autocast where the config asks for it, and its
backward, over the whole per-process batch or, with ``train.batch_per_gpu``, over micro-batches
of that size whose gradients add up to the batch mean's (gradient accumulation: the global
batch stays ``train.batch_size``; processes reduce gradients after the last micro-batch only);
the global gradient norm, clipped to ``grad_clip``; a non-finite norm (which any non-finite
loss gives) raises ``FloatingPointError`` before the optimizer touches the weights; the Adam
step; the EMA update (decay ``min(ema_decay, (1 + step) / (10 + step))`` while ``ema_warmup``
is on); ``step += 1``. Adam and the EMA each treat all parameters in one foreach call per
operation, not in a Python loop over them.
The norm check reads the norm on the host: one synchronisation per step, which the trainer's
own logging would need anyway.

Randomness: ``build_state`` seeds the global generator with ``train.seed`` before building the
model (identical initial weights on every process), then reseeds it per process for dropout;
flips, label dropout, t and noise come from ``state.generator`` (one per process). Given the
same config and the same batches, two states built by ``build_state`` in one process take
bit-identical steps on the CPU in deterministic mode (tests/test_spine.py).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdiff.diffusion.process import diffusion_loss
from sdiff.diffusion.schedules import LogSNRFn
from sdiff.models.compile import maybe_compile
from sdiff.models.presets import build_model
from sdiff.training.config import RunConfig, TrainConfig

__all__ = [
    "TrainState",
    "autocast",
    "build_state",
    "lr_at",
    "micro_batches",
    "prepare_batch",
    "train_step",
    "update_ema",
]


@dataclass
class TrainState:
    """What a training step reads and changes, for one process.

    ``model`` holds the parameters the optimizer updates (sharded in place under FSDP);
    ``step_model`` is what the step calls: the model, wrapped for DDP when there are several
    processes, compiled when ``train.compile`` is on. ``ema`` is an fp32 copy without gradients.
    ``generator`` draws flips, label dropout, t and noise; ``step`` counts the steps taken."""

    model: nn.Module
    step_model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LogSNRFn  # t -> logSNR(t) at the model's resolution
    generator: torch.Generator
    device: torch.device
    step: int = 0
    rank: int = 0
    world: int = 1


def build_state(
    config: RunConfig, device: torch.device | str, *, rank: int = 0, world: int = 1
) -> TrainState:
    """A fresh state for ``config`` on ``device``: seeded weights, their EMA copy, Adam, the
    noise schedule and this process's generator. With ``world > 1`` (a torchrun process group
    already joined) the model is wrapped for ``train.distributed`` (DDP, or FSDP's
    ``fully_shard`` of each transformer block, then the whole model, and the same for the EMA).
    ``train.deterministic`` switches PyTorch's deterministic algorithms on for the process."""
    t = config.train
    device = torch.device(device)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(t.seed)  # identical initial weights on every process
    # CUDA: initialised on the device (seconds instead of most of a minute for U-ViT L)
    on_device = device if device.type == "cuda" else None
    with on_device or contextlib.nullcontext():
        model = build_model(config.model).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    wrapped = _wrap(model, ema, t, device, world)  # before the optimizer: FSDP swaps parameters
    # foreach: each Adam operation over all parameters in one call (CUDA's default already;
    # on CPU it replaces a Python loop over the parameters with the same kernels, so the
    # numbers are bit-identical to the per-parameter loop). Fused Adam (one kernel) rounds
    # differently from both, so it is not used.
    optimizer = torch.optim.Adam(
        model.parameters(), lr=t.lr, betas=t.betas, eps=t.eps, weight_decay=t.weight_decay,
        foreach=True,
    )  # fmt: skip
    # dropout draws from the global generator: give each process its own stream
    torch.manual_seed(t.seed * 7919 + 104729 + rank)
    step_model = maybe_compile(wrapped, enabled=t.compile)
    schedule = config.diffusion.schedule.build(config.model.resolution)
    generator = torch.Generator(device=device).manual_seed(t.seed * 7919 + 1 + rank)
    return TrainState(
        model=model, step_model=step_model, ema=ema, optimizer=optimizer, schedule=schedule,
        generator=generator, device=device, rank=rank, world=world,
    )  # fmt: skip


def _wrap(model: nn.Module, ema: nn.Module, t: TrainConfig, device: torch.device, world: int):
    if world == 1:
        return model
    if t.distributed == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for m in (model, ema):  # shard each transformer block, then the rest
        for blk in getattr(m, "blocks", []):
            fully_shard(blk)
        fully_shard(m)
    return model


def lr_at(t: TrainConfig, images: int) -> float:
    """The learning rate of the step that starts after ``images`` training images: linear
    warm-up ``lr * (images + B) / (warmup_images + B)`` while ``images < warmup_images``."""
    if t.warmup_images and images < t.warmup_images:
        return t.lr * (images + t.batch_size) / (t.warmup_images + t.batch_size)
    return t.lr


def autocast(t: TrainConfig, device: torch.device):
    """bf16 autocast for ``precision`` "bf16", or "auto" on CUDA; else nothing (fp32)."""
    if t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_batch(
    state: TrainState, x: Tensor, y: Tensor | None, config: RunConfig, captions=None
) -> tuple[Tensor, Any]:
    """(images, condition) on the state's device: images flipped at random when
    ``data.random_flip``; labels replaced by the null class with probability
    ``train.label_dropout`` (classifier-free guidance), or, with a caption table
    (``sdiff.models.text.CaptionTable``), a random caption of each label's class, dropped to
    the empty caption with that probability. Every draw comes from ``state.generator``."""
    device, gen = state.device, state.generator
    x = x.to(device, non_blocking=True)
    y = y.to(device, non_blocking=True) if y is not None else None
    b = x.shape[0]
    if config.data.random_flip:
        flip = torch.rand(b, device=device, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    p = config.train.label_dropout
    if captions is not None:  # a random caption of the class, or the empty one
        variant = torch.randint(0, captions.per_class, (b,), device=device, generator=gen)
        drop = torch.rand(b, device=device, generator=gen) < p
        return x, captions.condition(captions.for_labels(y, variant), drop)
    num_classes = config.model.num_classes
    if not num_classes:
        return x, None
    if p > 0:
        drop = torch.rand(b, device=device, generator=gen) < p
        y = torch.where(drop, torch.full_like(y, num_classes), y)
    return x, y


def _grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train_step(
    state: TrainState,
    batch: tuple[Tensor, Any],
    config: RunConfig,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimisation step on ``batch`` = (images, condition) from ``prepare_batch``:
    warm-up lr, loss, backward, clip, Adam, EMA, ``state.step += 1`` (module docstring).
    ``t`` and ``noise`` fix the diffusion times and noise instead of drawing them. Returns the
    loss and the gradient norm before clipping, as detached tensors (no further host sync).
    A non-finite gradient norm raises ``FloatingPointError`` with the weights, the optimizer
    and ``state.step`` untouched."""
    x, cond = batch
    tc = config.train
    lr = lr_at(tc, state.step * tc.batch_size)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    chunks = micro_batches(x.shape[0], tc.batch_per_gpu)
    loss: Tensor | None = None
    for i, part in enumerate(chunks):
        # gradients of the batch mean: each micro-batch's mean weighted by its share
        share = (part.stop - part.start) / x.shape[0]
        with _sync_gradients(state.step_model, i == len(chunks) - 1), autocast(tc, state.device):
            out = diffusion_loss(
                state.step_model, x[part], config.diffusion, _rows(cond, part),
                schedule=state.schedule, generator=state.generator, t=_rows(t, part),
                noise=_rows(noise, part),
            )  # fmt: skip
        (out.loss * share).backward()
        part_loss = out.loss.detach() * share if len(chunks) > 1 else out.loss.detach()
        loss = part_loss if loss is None else loss + part_loss
    norm = _grad_norm(list(state.model.parameters()), tc.grad_clip)
    if not torch.isfinite(norm):
        raise FloatingPointError(
            f"non-finite loss or gradient at step {state.step + 1} (loss "
            f"{loss.item():.4g}, gradient norm {norm.item():.4g}); stopped before the update"
        )
    state.optimizer.step()
    update_ema(state, tc)
    state.step += 1
    return loss, norm


def micro_batches(n: int, size: int | None) -> list[slice]:
    """Gradient accumulation: the rows of a per-process batch of ``n`` in forward/backward
    passes of ``size`` (``train.batch_per_gpu``; None: all at once). ``size`` must divide
    ``n``, so that every micro-batch weighs the same in the step's mean."""
    if size is None or size >= n:
        return [slice(0, n)]
    if n % size:
        raise ValueError(
            f"train.batch_per_gpu {size} does not divide the per-process batch {n} "
            f"(train.batch_size / processes): gradient accumulation needs equal micro-batches"
        )
    return [slice(i, i + size) for i in range(0, n, size)]


def _rows(value: Any, part: slice) -> Any:
    """A micro-batch of a condition (labels, a TextCondition) or of given t / noise."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        return value[part]
    if isinstance(value, tuple):  # TextCondition and other named tuples of per-row tensors
        return type(value)(*(_rows(v, part) for v in value))
    return value


def _sync_gradients(model: nn.Module, last: bool):
    """Reduce gradients across processes only after the last micro-batch: DDP's ``no_sync``,
    FSDP2's ``set_requires_gradient_sync``; a single process has nothing to reduce."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DistributedDataParallel
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # fully_shard (FSDP2)

        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return unsynced()
    return contextlib.nullcontext()


@torch.no_grad()
def update_ema(state: TrainState, t: TrainConfig) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for the parameters (buffers copied), with
    ``decay = min(ema_decay, (1 + step) / (10 + step))`` under ``ema_warmup``: early on the EMA
    would mostly average the random initialisation.

    One ``_foreach_lerp_`` over all parameters (and one ``_foreach_copy_`` over the buffers)
    instead of a call per tensor. ``lerp`` computes ``ema + w * (model - ema)`` (for
    ``w >= 0.5``: ``model - (1 - w) * (model - ema)``), not the product form above: both are
    within a few ulps of the exact value, and the foreach call rounds exactly as a per-tensor
    ``lerp_`` does."""
    decay = t.ema_decay
    if t.ema_warmup:
        decay = min(decay, (1 + state.step) / (10 + state.step))
    ema, model = _pairs(state.ema.parameters(), state.model.parameters())
    if ema:
        torch._foreach_lerp_(ema, model, 1 - decay)
    ema, model = _pairs(state.ema.buffers(), state.model.buffers())
    if ema:
        torch._foreach_copy_(ema, model)


def _pairs(ema: Any, model: Any) -> tuple[list[Tensor], list[Tensor]]:
    """Matching lists of EMA and model tensors, the model's in the EMA's dtype."""
    pairs = list(zip(ema, model, strict=True))
    return [e for e, _ in pairs], [m if m.dtype == e.dtype else m.to(e.dtype) for e, m in pairs]
