"""Peak training memory of a model config, estimated without allocating, and measured to check.

    sdiff bench memory --model uvit-l-512 --batch 4                  # with and without
    sdiff bench memory --model uvit-l-512 --batch 4 --checkpoint     # only with checkpointing
    sdiff bench memory --model uvit-l-512 --batch 4 --max-batch      # and the largest batch
    sdiff bench memory --model uvit-tiny-32 --batch 64 --measure      # and a real step

Each estimate simulates a training step on meta (about 1.5 s for U-ViT L at 512 on 2 CPU cores),
so the largest-batch search, about five more per setting, runs only when asked for:
``--max-batch`` (80 GiB) or ``--budget-gib``.

The question it answers: "will U-ViT L (2B parameters) at 512 px train with batch B on an 80 GB
GPU, with and without activation checkpointing, and what is the largest batch that fits?"

Model state (exact, from the parameter count): the trainer keeps fp32 master weights (autocast
computes in bf16), fp32 gradients, Adam's exp_avg and exp_avg_sq (fp32) and an fp32 EMA copy:
4 + 4 + 8 + 4 = 20 bytes per parameter.

Activations (counted, not modelled): the model is built on ``torch.device("meta")`` (tensors with
shapes and no memory, so the 2B model costs nothing) and one forward pass plus the loss's MSE
runs on meta inputs of the given batch under ``torch.autograd.graph.saved_tensors_hooks``. The
pack hook sees every tensor autograd keeps for backward; ``SavedTensorCounter`` counts each
underlying storage once (several saved tensors often share one: q, k and v are views of one qkv
output; a ReLU's output is also the next Linear's input), keyed by the identity of
``untyped_storage()`` (PyTorch keeps one Python object per storage; ``data_ptr()`` is 0 on
meta), and skips the parameters' storages (counted as weights). Forward pre/post hooks on the
U-Net levels, the U-ViT's conv levels and each transformer block name the part that is running.

A CUDA step under bf16 autocast keeps more than a model cast to bf16 would, so the meta pass
emulates it with a ``TorchFunctionMode`` (``TrainingSemantics``):
- autocast's CUDA op policy (the lists of ATen/autocast_mode.h): linear, convolutions, matmuls
  and attention take bf16 inputs; group/layer norm, nearest upsampling, exp, pow, softmax and
  losses run in fp32. So a GroupNorm saves an fp32 copy of its bf16 input and the U-ViT's
  residual stream (proj_in + an fp32 position table) stays fp32, as on the GPU;
- autocast's cast cache: the bf16 copy of every weight a matmul or conv used lives until
  autocast exits after the loss ("weight copies (bf16)", 2 bytes per such parameter);
- attention saves what the flash kernels save (q, k, v, out and the fp32 log-sum-exp, as sdiff's
  Triton kernel), not the B x H x N x N probabilities of the math path that meta would take;
- dropout saves a bool mask (CUDA's fused kernel), not a noise tensor of the input's dtype.
``device="cpu"`` (fp32 only) follows a CPU step instead (SDPA's flash kernel when CPU would pick
it, else the math path; dropout noise), which is what the RSS check below runs.

Activation checkpointing (``checkpoint=True``: every conv level's ResBlocks and, for the U-ViT,
every transformer block, each its own region, through ``sdiff.models.blocks.run_checkpointed``):
PyTorch's non-reentrant checkpoint packs a region's internal saves with its own hook, which the
outer hook does not see, but it saves the region's inputs with an ordinary ``save_for_backward``
before the region runs, which the outer hook does see. So counting the checkpointed forward
gives what is really kept: the regions' inputs and everything outside them (the inputs are
attributed to the region they feed). Recomputation happens in backward, below.

Peak model: three moments of a steady-state step (``sdiff.training.step.train_step``, the step
the trainer runs: forward and loss under autocast, then ``zero_grad(set_to_none=True)``,
backward, clip, Adam, EMA):
1. end of the forward: the previous step's gradients are still allocated, so
       total = weights + gradients + optimizer + ema + activations;
2. backward: gradients were freed and come back one by one while activations are released;
   backward is run on the meta graph with a ``TorchDispatchMode`` that tracks live storages
   (a weakref finalizer on each), recomputing checkpointed regions as PyTorch does:
       backward_step = weights + optimizer + ema + backward   (its peak live bytes);
3. the Adam step: foreach Adam (what ``sdiff.training.step`` builds on every device) allocates
   one temporary the size of all parameters (sqrt(exp_avg_sq)):
       optimizer_step = weights + gradients + optimizer + ema + optimizer_temp.
``peak`` is the largest; ``largest_batch`` keeps it within the budget. Not modelled: kernel
workspaces (cuBLAS/cuDNN, oneDNN scratchpads: invisible on meta), weight decay (foreach Adam then
adds a gradient-sized temporary), DDP/FSDP buffers, the CUDA context (~0.5 GB outside the
allocator) and the caching allocator's fragmentation (reserved minus allocated): leave ~5-10% of
the card free.

Check (``measure_training_memory``): the real training step, ``prepare_batch`` and
``train_step`` of ``sdiff.training.step`` on a ``TrainState`` built as the trainer builds one
(no dataset: a fixed random batch), its second call, so that gradients and Adam state exist
as in steady state. CUDA: ``torch.cuda.max_memory_allocated`` over that step (and
``memory_allocated`` when the model's forward returns), optionally a snapshot for PyTorch's
memory viewer. CPU (fp32): a fresh subprocess reads its resident set size: VmHWM, reset
through /proc/self/clear_refs before the step, against VmRSS after a throwaway warm-up step (torch
and lazily imported libraries); glibc's mmap threshold is fixed at 64 KiB there, so freed tensors
go back to the OS and RSS follows the live tensors. tests/test_memory.py holds the measured
numbers and the tolerance.

The counting machinery (saved-tensor counter, live-tensor tracker, autocast semantics) is in
``sdiff.bench.memory_counting``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from sdiff.bench.memory_counting import (
    DEVICES,
    DTYPES,
    FlopCount,
    SavedTensorCounter,
    TrainingSemantics,
    _check_dtype_device,
    _LiveBytes,
)
from sdiff.models.checkpointing import observe_selective_saves
from sdiff.models.presets import PRESETS, ModelConfig, build_model, get_preset
from sdiff.models.registry import is_model_config
from sdiff.models.unet import UNetConfig
from sdiff.models.uvit import TextCondition
from sdiff.util.cli_args import show_defaults
from sdiff.util.files import append_csv_row, ensure_folder

__all__ = [
    "MemoryReport",
    "SavedTensorCounter",
    "TrainingSemantics",
    "checkpoint_label",
    "compare",
    "estimate_training_memory",
    "format_measurement",
    "format_report",
    "largest_batch",
    "measure_training_memory",
    "memory_main",
    "model_units",
    "simulate_step",
    "with_checkpointing",
]

GiB = 2**30
TEXT_TOKENS = 77  # caption length assumed for a text-conditioned U-ViT (as sdiff.models.flops)
WEIGHT_COPIES = "weight copies (bf16)"


# --------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of one steady-state training step. Peak model (module docstring): ``total`` at the
    end of the forward (the previous step's gradients still allocated), ``backward_step`` at the
    peak of backward, ``optimizer_step`` during Adam; ``peak`` is the largest."""

    model: str
    resolution: int
    batch: int
    dtype: str
    checkpoint: bool | tuple[str, ...]  # every region full (True), none (False), or a plan
    weights: int  # fp32 master parameters (+ buffers)
    gradients: int  # fp32
    optimizer: int  # Adam exp_avg + exp_avg_sq, fp32
    ema: int  # fp32 EMA copy (parameters and buffers)
    activations: int  # kept for backward at the end of the forward, weight copies included
    activations_by_part: dict[str, int] = field(default_factory=dict)
    params: int = 0
    weight_copies: int = 0  # autocast's bf16 copies of the weights (part of activations)
    backward: int = 0  # live bytes at backward's peak: activations left, recomputation,
    #                    activation gradients and the parameter gradients allocated so far
    optimizer_temp: int = 0  # Adam's temporaries during its step
    device: str = "cuda"  # whose kernels the count follows
    step_flops: int = 0  # counted forward + backward FLOPs of the step without checkpointing
    recomputed_flops: int = 0  # what checkpointing adds to backward (its recomputation)

    @property
    def recomputed_share(self) -> float:
        """Recomputed FLOPs over the plain step's FLOPs."""
        return self.recomputed_flops / self.step_flops if self.step_flops else 0.0

    @property
    def checkpoint_label(self) -> str:
        return checkpoint_label(self.checkpoint)

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations

    @property
    def backward_step(self) -> int:
        return self.weights + self.optimizer + self.ema + self.backward

    @property
    def optimizer_step(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.optimizer_temp

    @property
    def peak(self) -> int:
        return max(self.total, self.backward_step, self.optimizer_step)

    @property
    def peak_phase(self) -> str:
        phases = {
            "forward end": self.total,
            "backward": self.backward_step,
            "optimizer step": self.optimizer_step,
        }
        return max(phases, key=phases.__getitem__)

    @property
    def activations_per_image(self) -> float:
        return (self.activations - self.weight_copies) / self.batch

    def to_dict(self) -> dict:
        return asdict(self) | {
            "total": self.total,
            "backward_step": self.backward_step,
            "optimizer_step": self.optimizer_step,
            "peak": self.peak,
            "peak_phase": self.peak_phase,
            "recomputed_share": self.recomputed_share,
        }


# --------------------------------------------------------------------------------------------
# Parts of the models

_LEVEL_LISTS = {
    "down": "down", "down_attn": "down", "downsamplers": "down", "up": "up", "up_attn": "up",
    "upsamplers": "up", "stage_skips": "up",
}  # fmt: skip
_RENAME = {
    "proj_in": "transformer in", "adaln": "transformer in", "norm_out": "transformer out",
    "proj_out": "transformer out",
}  # fmt: skip


def model_units(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, part) for the U-Net / U-ViT: "down.i (SxS)" and "up.i (SxS)" per conv level,
    "blocks.k" per transformer block, and embed, stem, transformer in/out, head."""
    sides = model.config.level_sides()
    units = []
    for name, child in model.named_children():
        if name in _LEVEL_LISTS:
            for i, level in enumerate(child):
                part = f"{_LEVEL_LISTS[name]}.{i} ({sides[i]}x{sides[i]})"
                mods = level if isinstance(level, nn.ModuleList) else [level]
                units += [(m, part) for m in mods]
        elif name == "blocks":
            units += [(m, f"blocks.{k}") for k, m in enumerate(child)]
        else:
            units.append((child, _RENAME.get(name, name)))
    return units


def with_checkpointing(config: ModelConfig, on: bool | tuple[str, ...]) -> ModelConfig:
    """The config with activation checkpointing on (``full``) for every conv level and
    (U-ViT) every transformer block, or off everywhere, or as a plan says (a tuple of
    ``checkpoint_plan`` entries, ``sdiff.models.checkpointing``)."""
    if isinstance(on, bool):
        return config.with_checkpointing(on)
    if not isinstance(on, (tuple, list)):
        raise ValueError(f"checkpoint must be True, False or plan entries; got {on!r}")
    return replace(config.with_checkpointing(False), checkpoint_plan=tuple(on))


def checkpoint_label(checkpoint: bool | tuple[str, ...]) -> str:
    """ "full", "none" or the plan's entries joined by commas."""
    if isinstance(checkpoint, bool):
        return "full" if checkpoint else "none"
    return ",".join(checkpoint) or "none"


# --------------------------------------------------------------------------------------------
# The estimate


def resolve_config(config: ModelConfig | str) -> tuple[str, ModelConfig]:
    """(name, config) from a preset name or a config (named after its preset if it is one)."""
    if isinstance(config, str):
        return config, get_preset(config)
    if not is_model_config(config):
        raise ValueError(f"not a model config: {type(config).__name__}")
    for name, preset in PRESETS.items():
        if with_checkpointing(preset, False) == with_checkpointing(config, False):
            return name, config
    return f"{config.kind} ({config.resolution} px)", config


def _check_batch(batch: int) -> None:
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1; got {batch!r}")


@functools.lru_cache(maxsize=8)
def _meta_model(config: ModelConfig) -> nn.Module:
    with torch.device("meta"):
        return build_model(config).train()


@dataclass(frozen=True)
class StepCount:
    """What ``simulate_step`` counts: bytes kept for backward at the end of the forward (by
    part; autocast's weight copies included) and the peak live bytes during backward."""

    activations: int
    by_part: dict[str, int]
    weight_copies: int
    backward: int
    forward_flops: int = 0  # matmul, convolution and attention FLOPs (``FlopCount``)
    backward_flops: int = 0  # the same in backward, checkpointed regions' recomputation included


def _loss(z: Tensor, pred: Tensor, logsnr: Tensor) -> Tensor:
    """The diffusion loss's autograd footprint: MSE in fp32 against a target, times a
    per-example weight (sdiff.diffusion.process.diffusion_loss)."""
    diff = torch.empty_like(z) - pred.float()  # target - prediction (B, C, H, W)
    return diff.square().flatten(1).mean(1).mul(logsnr.exp()).mean()


def simulate_step(model: nn.Module, batch: int, *, dtype: str, device: str) -> StepCount:
    """Forward, loss and backward of a U-Net / U-ViT in training mode on inputs of ``batch``
    images, on the model's own device (meta for estimates; CPU to check meta's fidelity),
    counting saved tensors and tracking live ones as a step on ``device`` would keep them."""
    c = model.config
    where = next(model.parameters()).device
    model.zero_grad(set_to_none=True)  # train_step frees the gradients before backward
    z = torch.zeros(batch, c.in_channels, c.resolution, c.resolution, device=where)  # fp32
    logsnr = torch.zeros(batch, device=where)
    cond = torch.zeros(batch, dtype=torch.long, device=where) if c.num_classes else None
    if c.text_conditioned:
        text = torch.zeros(batch, TEXT_TOKENS, c.text_dim, device=where)
        cond = TextCondition(text, None, cond)
    params = list(model.parameters())
    semantics = TrainingSemantics(dtype, device)
    live = _LiveBytes(params + list(model.buffers()))
    counter = SavedTensorCounter(params, model_units(model))
    flops = FlopCount()
    with torch.enable_grad(), semantics, live, flops:
        with counter, observe_selective_saves(counter.note):
            pred = model(z, logsnr, cond)  # (B, C, H, W)
            counter.part = "loss"
            loss = _loss(z, pred, logsnr)
        forward_flops = flops.total
        # autocast's cache holds every weight copy until it exits, saved for backward or not
        copies = {id(t.untyped_storage()): t for t in semantics.release_cache()}
        counter.labels = dict.fromkeys(copies, WEIGHT_COPIES)
        saved = counter.storage_ids()
        unsaved = sum(t.untyped_storage().nbytes() for k, t in copies.items() if k not in saved)
        by_part = counter.by_part
        if unsaved:
            by_part[WEIGHT_COPIES] = by_part.get(WEIGHT_COPIES, 0) + unsaved
        activations = counter.total + unsaved
        counter.release()
        del pred, copies
        semantics.caching = False
        live.reset_peak()
        # a gradient edge, not the tensor: Tensor.backward would run inside this mode's
        # handler, where the mode is off, and recomputed regions would lose the semantics
        edge = torch.autograd.graph.get_gradient_edge(loss)
        torch.autograd.backward(edge, grad_tensors=torch.ones_like(loss))
        backward = live.peak
    model.zero_grad(set_to_none=True)
    backward_flops = flops.total - forward_flops
    return StepCount(
        activations, by_part, by_part.get(WEIGHT_COPIES, 0), backward, forward_flops,
        backward_flops,
    )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _simulate(config: ModelConfig, batch: int, dtype: str, device: str) -> StepCount:
    return simulate_step(_meta_model(config), batch, dtype=dtype, device=device)


def estimate_training_memory(
    config: ModelConfig | str,
    batch: int,
    *,
    dtype: str = "bf16",
    checkpoint: bool | tuple[str, ...] = False,
    device: str = "cuda",
    flops: bool = True,
) -> MemoryReport:
    """Memory of one steady-state training step of ``config`` at ``batch``, on meta.

    dtype: "bf16" (CUDA autocast, the trainer's default on GPUs) or "fp32". checkpoint:
    activation checkpointing on (``full``) for every conv level and transformer block, off
    everywhere, or a plan's entries (``with_checkpointing``). device: whose kernels to follow,
    "cuda" or "cpu" (fp32 only). flops: also the step's FLOPs and what checkpointing
    recomputes (which, checkpointing on, simulates the plain step too); else both are 0."""
    name, config = resolve_config(config)
    _check_batch(batch)
    _check_dtype_device(dtype, device)
    step = _simulate(with_checkpointing(config, checkpoint), batch, dtype, device)
    plain = step
    if flops and checkpoint is not False:
        plain = _simulate(with_checkpointing(config, False), batch, dtype, device)
    config = with_checkpointing(config, checkpoint)
    model = _meta_model(config)
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)  # fp32 master weights
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    temp = weights  # foreach Adam (every device): sqrt(exp_avg_sq) of every parameter at once
    return MemoryReport(
        model=name,
        resolution=config.resolution,
        batch=batch,
        dtype=dtype,
        checkpoint=checkpoint,
        weights=weights + buffers,
        gradients=weights,
        optimizer=2 * weights,
        ema=weights + buffers,
        activations=step.activations,
        activations_by_part=dict(step.by_part),
        params=sum(p.numel() for p in params),
        weight_copies=step.weight_copies,
        backward=step.backward,
        optimizer_temp=temp,
        device=device,
        step_flops=plain.forward_flops + plain.backward_flops if flops else 0,
        recomputed_flops=step.backward_flops - plain.backward_flops if flops else 0,
    )


_PHASES = ("total", "backward_step", "optimizer_step")


def largest_batch(
    config: ModelConfig | str,
    budget_bytes: int,
    *,
    dtype: str = "bf16",
    checkpoint: bool | tuple[str, ...] = False,
    device: str = "cuda",
) -> int:
    """The largest B with ``estimate_training_memory(B).peak <= budget_bytes`` (0: not even 1).

    Each phase grows about linearly with the batch (per-image tensors over batch-independent
    state and weight copies), though backward's peak can move from the end of backward (all
    gradients) to its start (most activations) as B grows. So: solve each phase's line through
    the last two estimates for B, re-estimate there, repeat (secant steps); then bisect between
    a B that fits and one that does not."""
    kw = {"dtype": dtype, "checkpoint": checkpoint, "device": device}
    seen: dict[int, MemoryReport] = {}

    def est(b: int) -> MemoryReport:
        if b not in seen:
            seen[b] = estimate_training_memory(config, b, **kw, flops=False)
        return seen[b]

    if est(1).peak > budget_bytes:
        return 0
    prev, cur = 1, 2
    for _ in range(8):
        guesses = []
        for phase in _PHASES:
            f0, f1 = getattr(est(prev), phase), getattr(est(cur), phase)
            if (f1 - f0) * (cur - prev) > 0:  # growing
                guesses.append(cur + (budget_bytes - f1) * (cur - prev) // (f1 - f0))
        if not guesses:
            raise ValueError("the estimated memory does not grow with the batch")
        nxt = max(1, min(guesses))
        if nxt == cur or nxt == prev:
            break
        prev, cur = cur, nxt
    lo = max(b for b, r in seen.items() if r.peak <= budget_bytes)
    if est(lo + 1).peak > budget_bytes:  # where the secant steps usually end
        return lo
    over = [b for b, r in seen.items() if r.peak > budget_bytes and b > lo]
    hi = min(over) if over else 2 * lo + 2
    while est(hi).peak <= budget_bytes:  # grow the bracket until it holds
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # est(lo) fits, est(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if est(mid).peak <= budget_bytes else (lo, mid)
    return lo


# --------------------------------------------------------------------------------------------
# The measurement


def _training(config: ModelConfig, batch: int, device: str, dtype: str):
    """(step, state, images, labels): a fresh ``TrainState`` for ``config`` (the benchmarks'
    run config, ``sdiff.bench.throughput.run_config``, at this precision) on ``device``, a
    fixed random batch there, and ``step()``, one training step as the trainer takes it
    (``prepare_batch``, then ``train_step`` of ``sdiff.training.step``)."""
    from sdiff.bench.throughput import random_batch, run_config
    from sdiff.training.step import build_state, prepare_batch, train_step

    if config.text_conditioned:
        raise ValueError("measuring a text-conditioned U-ViT is not supported (no text data)")
    run = run_config(config, batch, precision=dtype)
    state = build_state(run, device)
    x, y = random_batch(config, batch, device)

    def step() -> None:
        train_step(state, prepare_batch(state, x, y, run), run)

    return step, state


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise OSError(f"no {field_name} in /proc/self/status")


def _cpu_child() -> None:
    """The CPU measurement, run in a fresh process (reads its job as JSON on stdin)."""
    job = json.load(sys.stdin)
    from sdiff.training.config import from_dict

    config = from_dict(ModelConfig, job["config"])
    # the baseline holds what any training step loads on first use (lazily imported modules
    # such as sympy): a throwaway tiny step loads them
    tiny = UNetConfig(resolution=32, channels=(8,), blocks_down=(1,), blocks_up=(1,), norm_groups=4)
    step, state = _training(tiny, 2, "cpu", "fp32")
    step()
    del step, state
    base = _status_kib("VmRSS") * 1024
    step, state = _training(config, job["batch"], "cpu", "fp32")
    step()  # step 1: creates gradients and Adam state
    static = _status_kib("VmRSS") * 1024
    mark = _mark_forward_end(state.model, lambda: _status_kib("VmRSS") * 1024)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    step()  # step 2: the steady state
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    out = {
        "baseline": base,
        "static": static - base,
        "forward_end": mark[0] - base,
        "peak": peak - base,
        "step_s": seconds,
    }
    print(json.dumps(out))


def _mark_forward_end(model: nn.Module, read: Callable[[], int]) -> list[int]:
    """[bytes] read by ``read`` when the model's forward returns (updated every step)."""
    mark = [0]

    def hook(*_) -> None:
        mark[0] = read()

    model.register_forward_hook(hook)
    return mark


def measure_training_memory(
    config: ModelConfig | str,
    batch: int,
    *,
    device: str | torch.device | None = None,
    dtype: str | None = None,
    checkpoint: bool | tuple[str, ...] = False,
    snapshot: str | Path | None = None,
    timeout: float = 600,
) -> dict:
    """Bytes of a real training step (the second ``sdiff.training.step.train_step`` on a fresh
    ``TrainState``), for comparison
    with ``estimate_training_memory``.

    CUDA: ``torch.cuda.max_memory_allocated`` over the step; ``snapshot`` writes a memory
    snapshot of it for https://pytorch.org/memory_viz. CPU (fp32 only): the resident set size
    of a fresh subprocess (VmHWM over the step). Keys, in bytes over the baseline (what was
    allocated before the state was built: CUDA; torch and the libraries a step loads: CPU): static
    (weights, gradients, Adam, EMA, the batch: before the step), forward_end (when the model's
    forward returns), peak; plus method, device, step_s, versions, git SHA and date.
    ``compare`` pairs them with an estimate."""
    name, config = resolve_config(config)
    _check_batch(batch)
    from sdiff.util.devices import resolve_device

    device = resolve_device(device)
    if device.type not in DEVICES:
        raise ValueError(f"cannot measure on device {device.type!r}; use cuda or cpu")
    dtype = dtype or ("bf16" if device.type == "cuda" else "fp32")
    _check_dtype_device(dtype, device.type)
    config = with_checkpointing(config, checkpoint)
    row = {
        "model": name,
        "resolution": config.resolution,
        "batch": batch,
        "dtype": dtype,
        "checkpoint": checkpoint,
    }
    if device.type == "cuda":
        row |= _measure_cuda(config, batch, device, dtype, snapshot)
    else:
        if snapshot is not None:
            raise ValueError("a memory snapshot needs CUDA (PyTorch's memory history is CUDA's)")
        row |= _measure_cpu(config, batch, timeout)
    from sdiff.util.provenance import git_sha

    return row | {
        "torch": str(torch.__version__),
        "git_sha": git_sha(),
        "date": time.strftime("%F"),
    }


def _measure_cpu(config: ModelConfig, batch: int, timeout: float) -> dict:
    from sdiff.training.config import to_dict

    if not Path("/proc/self/clear_refs").exists():
        raise ValueError("the CPU measurement needs Linux's /proc (VmHWM and clear_refs)")
    # a fixed mmap threshold: tensors are mmapped and unmapped when freed, so RSS follows them
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, "-c", "from sdiff.bench.memory import _cpu_child; _cpu_child()"]
    job = json.dumps({"config": to_dict(config), "batch": batch})
    out = subprocess.run(
        cmd, input=job, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if out.returncode:
        raise RuntimeError(f"the measuring subprocess failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result | {
        "method": "cpu peak RSS (VmHWM) over step 2",
        "device": platform.processor() or platform.machine(),
    }


def _measure_cuda(config, batch, device, dtype, snapshot) -> dict:
    if device.index is not None:
        torch.cuda.set_device(device)
    base = torch.cuda.memory_allocated(device)
    step, state = _training(config, batch, str(device), dtype)
    step()  # step 1: creates gradients and Adam state
    torch.cuda.synchronize(device)
    static = torch.cuda.memory_allocated(device)
    mark = _mark_forward_end(state.model, lambda: torch.cuda.memory_allocated(device))
    torch.cuda.reset_peak_memory_stats(device)
    if snapshot:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    start = time.perf_counter()
    step()  # step 2: the steady state
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    if snapshot:
        Path(snapshot).parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
    del step, state
    return {
        "method": "torch.cuda.max_memory_allocated over step 2",
        "device": torch.cuda.get_device_name(device),
        "baseline": base,
        "static": static - base,
        "forward_end": mark[0] - base,
        "peak": peak - base,
        "reserved": reserved,
        "step_s": seconds,
        "snapshot": str(snapshot) if snapshot else None,
    }


# --------------------------------------------------------------------------------------------
# Printing and the CLI


def _unit(largest: int) -> tuple[str, int]:
    return ("GiB", GiB) if largest >= GiB else ("MiB", 2**20)


def _grouped_parts(by_part: dict[str, int]) -> list[tuple[str, int]]:
    """Transformer blocks folded into one row ("blocks.0-35 (36)"), the others as they are,
    largest first."""
    blocks = [(k, v) for k, v in by_part.items() if k.startswith("blocks.")]
    rows = [(k, v) for k, v in by_part.items() if not k.startswith("blocks.")]
    if blocks:
        last = blocks[-1][0].split(".")[1]
        rows.append((f"blocks.0-{last} ({len(blocks)} blocks)", sum(v for _, v in blocks)))
    return sorted(rows, key=lambda kv: -kv[1])


def format_report(report: MemoryReport, top: int = 8) -> str:
    """A table: memory per component, each phase's total, the peak, and the parts holding the
    most activations."""
    r = report
    name, unit = _unit(r.peak)
    ckpt = {"full": "with", "none": "without"}.get(r.checkpoint_label)
    ckpt = ckpt or f"with the plan {r.checkpoint_label} of"
    params = f"{r.params / 1e9:.3f} B" if r.params >= 1e9 else f"{r.params / 1e6:.2f} M"
    rows = [
        ("weights (fp32)", r.weights, ""),
        ("gradients (fp32)", r.gradients, ""),
        ("Adam exp_avg + exp_avg_sq (fp32)", r.optimizer, ""),
        ("EMA (fp32)", r.ema, ""),
        (
            "activations",
            r.activations,
            f"{r.activations_per_image / unit:.3f} {name} per image + "
            f"{r.weight_copies / unit:.2f} {name} weight copies",
        ),
        ("= end of forward (total)", r.total, ""),
        (
            "backward (no grads at its start)",
            r.backward_step,
            f"{r.backward / unit:.2f} {name} live at its peak",
        ),
        (
            "optimizer step",
            r.optimizer_step,
            f"{r.optimizer_temp / unit:.2f} {name} Adam temporaries",
        ),
        ("peak", r.peak, f"at the {r.peak_phase}"),
    ]
    if r.step_flops:
        recomputed = (
            f"  recomputed in backward: {r.recomputed_flops / 1e12:.2f} TFLOP, "
            f"{100 * r.recomputed_share:.1f}% of the step's {r.step_flops / 1e12:.1f} TFLOP"
        )
    else:
        recomputed = ""
    lines = [
        f"{r.model} at {r.resolution}px, batch {r.batch}, {r.dtype} ({r.device} kernels), "
        f"{ckpt} activation checkpointing; {params} parameters"
    ]
    lines += [f"  {k:<36}{v / unit:9.2f} {name}  {note}".rstrip() for k, v, note in rows]
    if recomputed:
        lines.append(recomputed)
    lines.append("  activations by part:")
    for part, nbytes in _grouped_parts(r.activations_by_part)[:top]:
        share = 100 * nbytes / max(r.activations, 1)
        lines.append(f"    {part:<34}{nbytes / unit:9.2f} {name}  {share:5.1f}%")
    return "\n".join(lines)


def compare(measured: dict, estimate: MemoryReport) -> dict[str, tuple[int, int]]:
    """{quantity: (measured, estimated)} bytes. "state": weights, gradients, Adam and EMA
    before the step; "activations": what the step adds by the time the model's forward returns
    (the estimate's activations); "step peak": what the step adds at its peak (the estimate's
    peak minus the state); "peak": the whole (over the baseline). The measurement's own offset
    (the batch, the allocator's bookkeeping: a few MB) sits in "state" and "peak"; kernel
    workspaces, which the meta pass cannot see, in "step peak" and "peak"."""
    state = estimate.weights + estimate.gradients + estimate.optimizer + estimate.ema
    return {
        "state": (measured["static"], state),
        "activations": (measured["forward_end"] - measured["static"], estimate.activations),
        "step peak": (measured["peak"] - measured["static"], estimate.peak - state),
        "peak": (measured["peak"], estimate.peak),
    }


def format_measurement(measured: dict, estimate: MemoryReport) -> str:
    name, unit = _unit(measured["peak"])
    lines = [f"measured ({measured['method']}, {measured['device']}) vs estimated:"]
    for key, (got, est) in compare(measured, estimate).items():
        lines.append(
            f"  {key:<12}{got / unit:9.2f} {name} vs {est / unit:9.2f} {name}  "
            f"ratio {got / max(est, 1):.3f}"
        )
    return "\n".join(lines)


def _append_csv(path: str, rows: list[dict]) -> None:
    flat = [
        {k: v for k, v in r.items() if not isinstance(v, dict)}
        | {f"measured_{k}": v for k, v in r.get("measured", {}).items()}
        for r in rows
    ]
    ensure_folder(Path(path).parent)
    for row in flat:
        append_csv_row(path, list(flat[0]), row)


def memory_main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="sdiff bench memory",
        description="Peak training memory of a model preset, estimated on the meta device "
        "(no allocation) and optionally measured.",
    )
    p.add_argument("--model", default=None, help="model preset, e.g. uvit-l-512 (required)")
    p.add_argument("--res", type=int, default=None, help="resolution (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="batch size (required)")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--checkpoint", action="store_true", help="only with full checkpointing")
    p.add_argument(
        "--plan",
        default=None,
        help="only with this checkpoint plan: comma-separated entries such as "
        "levels=full,blocks=selective,block.0-3=full (sdiff.models.checkpointing)",
    )
    p.add_argument(
        "--choose-plan",
        action="store_true",
        help="also choose the plan that fits --budget-gib with the fewest recomputed FLOPs",
    )
    p.add_argument(
        "--policies-report",
        default=None,
        metavar="DIR",
        help="write DIR/checkpointing.{md,csv}: peak memory and recomputed FLOPs per policy for "
        "U-ViT L 512 (batch 32, 64) and U-Net 512 (batch 32); no other option needed",
    )
    p.add_argument(
        "--max-batch",
        action="store_true",
        help="also search the largest batch within the budget (several more simulated steps)",
    )
    p.add_argument(
        "--budget-gib",
        type=float,
        default=None,
        help="budget for the search (implies --max-batch; 80 without it)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--measure", action="store_true", help="also measure (CUDA; CPU: RSS, fp32)")
    p.add_argument("--snapshot", default=None, help="CUDA memory snapshot of the step (.pickle)")
    p.add_argument("--csv", default=None, help="append the rows to this CSV file")
    a = show_defaults(p).parse_args(args)
    if a.budget_gib is not None and a.budget_gib <= 0:
        raise ValueError(f"--budget-gib must be > 0; got {a.budget_gib}")
    if a.policies_report is not None:
        from sdiff.bench.checkpoint_plan import write_policies_report

        budget = 80.0 if a.budget_gib is None else a.budget_gib
        print(write_policies_report(a.policies_report, budget_gib=budget))
        return 0
    if a.model is None or a.batch is None:
        p.error("--model and --batch are required (unless --policies-report)")
    _check_batch(a.batch)
    if a.plan is not None and a.checkpoint:
        p.error("--plan and --checkpoint exclude each other")
    search = a.max_batch or (a.budget_gib is not None and not a.choose_plan)
    a.budget_gib = 80.0 if a.budget_gib is None else a.budget_gib
    cuda = torch.cuda.is_available()
    if a.snapshot and not (a.measure and cuda):
        raise ValueError("--snapshot needs --measure on a CUDA device (memory history is CUDA's)")
    config = get_preset(a.model)
    if a.res is not None and a.res != config.resolution:
        config = replace(config, resolution=a.res)  # the config's checks raise ValueErrors
    name = a.model if a.res in (None, get_preset(a.model).resolution) else f"{a.model}@{a.res}"
    budget = int(a.budget_gib * GiB)
    from sdiff.util.provenance import git_sha

    stamp = {"torch": str(torch.__version__), "git_sha": git_sha(), "date": time.strftime("%F")}
    rows, texts = [], []
    if a.plan is not None:
        settings: list[bool | tuple[str, ...]] = [tuple(e for e in a.plan.split(",") if e)]
        with_checkpointing(config, settings[0])  # a bad plan fails here, naming the entry
    else:
        settings = [True] if a.checkpoint else [False, True]
    for ckpt in settings:
        report = estimate_training_memory(config, a.batch, dtype=a.dtype, checkpoint=ckpt)
        report = replace(report, model=name)
        row = report.to_dict() | stamp
        text = format_report(report)
        if search:
            fits = largest_batch(config, budget, dtype=a.dtype, checkpoint=ckpt)
            row |= {"budget_gib": a.budget_gib, "largest_batch": fits}
            text += f"\n  largest batch within {a.budget_gib:g} GiB: {fits}"
        if a.measure:
            dtype = a.dtype if cuda else "fp32"  # CPU autocast is another policy: fp32 there
            snap = a.snapshot
            if snap and ckpt is True and not a.checkpoint:  # two runs: two snapshots
                snap = Path(snap).with_name(f"{Path(snap).stem}-checkpoint{Path(snap).suffix}")
            row["measured"] = measure_training_memory(
                config, a.batch, dtype=dtype, checkpoint=ckpt, snapshot=snap
            )
            same = estimate_training_memory(
                config, a.batch, dtype=dtype, checkpoint=ckpt, device="cuda" if cuda else "cpu"
            )
            if not cuda:
                text += "\n  (no CUDA: measured on CPU in fp32, against the fp32 CPU estimate)"
            text += "\n" + format_measurement(row["measured"], same)
        rows.append(row)
        texts.append(text)
    if a.choose_plan:
        from sdiff.bench.checkpoint_plan import choose_plan

        choice = choose_plan(config, a.batch, budget, dtype=a.dtype)
        if choice is None:
            texts.append(f"no checkpoint plan fits {a.batch} images in {a.budget_gib:g} GiB")
        else:
            report = replace(choice.report, model=name)
            rows.append(report.to_dict() | stamp | {"budget_gib": a.budget_gib, "chosen": True})
            texts.append(
                f"chosen plan for {a.budget_gib:g} GiB: {','.join(choice.plan)}\n"
                + format_report(report)
            )
    if a.csv:
        _append_csv(a.csv, rows)
    print(json.dumps(rows, indent=2, default=str) if a.json else "\n\n".join(texts))
    return 0


if __name__ == "__main__":
    raise SystemExit(memory_main())
