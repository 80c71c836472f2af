"""Sampling from a trained run: ``sdiff sample`` and the generator behind ``sdiff eval``.

    sdiff sample --run runs/digits --n 64 --steps 256 --guidance 1.0 --grid grid.png

Loads a checkpoint (the run's latest by default) and its config, takes the EMA weights unless
told otherwise, and draws images with any registered sampler. Class labels cycle over the
classes unless given; guidance uses the null class as the unconditional condition, with weight
w as in the paper (eps = (1 + w) eps_cond - w eps_uncond; other libraries' "guidance scale" is
1 + w). Images come back as uint8 (N, C, H, W) and can be written as a grid and/or a folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdiff.checkpoint import list_checkpoints, load_checkpoint
from sdiff.compile import maybe_compile
from sdiff.config import RunConfig, from_dict
from sdiff.images import to_uint8
from sdiff.presets import build_model
from sdiff.samplers import Guidance, get_sampler, x_predictor

if TYPE_CHECKING:
    from sdiff.uvit import TextCondition

__all__ = ["SampleOptions", "generate", "load_trained"]


@dataclass(frozen=True)
class SampleOptions:
    n: int = 64
    sampler: str = "ddpm"
    steps: int = 256
    guidance: float = 0.0  # w; the "guidance scale" of other libraries is 1 + w
    guidance_interval: tuple[float, float] | None = None  # logSNR interval (SiD2)
    labels: tuple[int, ...] | None = None  # cycled to n; default: all classes in turn
    seed: int = 0
    batch_size: int = 256
    clip_x: bool = True
    compile: bool = False  # torch.compile the denoiser (SDIFF_COMPILE=0 turns it off)

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1 or self.steps < 1:
            raise ValueError("n, batch_size and steps must be >= 1")
        get_sampler(self.sampler)


def resolve_checkpoint(run_or_checkpoint: str | Path) -> Path:
    path = Path(run_or_checkpoint)
    if path.is_file():
        return path
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise ValueError(f"no checkpoint found in {path} (looked in {path / 'checkpoints'})")
    return found[-1]


def load_trained(
    run_or_checkpoint: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, int]:
    """(model in eval mode, its run config, its step) from a run folder or a checkpoint file."""
    path = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(path)
    config = from_dict(RunConfig, json.loads(state["config"]))
    model = build_model(config.model)
    model.load_state_dict(state["ema" if ema else "model"])
    return model.to(device).eval(), config, int(state["step"])


@torch.no_grad()
def generate(
    model: nn.Module, config: RunConfig, options: SampleOptions, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor | None]:
    """uint8 images (n, C, H, W) and their labels (or None for an unconditional model)."""
    m, o = config.model, options
    if config.text.enabled:
        return _generate_text(model, config, options, device)
    k = m.num_classes
    if o.labels is not None and not k:
        raise ValueError("labels were given but the model is unconditional")
    if o.guidance and not k:
        raise ValueError("guidance needs a class-conditional model")
    labels = _cycle_labels(o, k) if k else None

    def conditions(start: int, b: int) -> tuple[Tensor | None, Tensor | None]:
        cond = labels[start : start + b].to(device) if labels is not None else None
        return cond, (torch.full_like(cond, k) if o.guidance else None)

    return _sample(model, config, o, device, conditions), labels


@torch.no_grad()
def _generate_text(model, config: RunConfig, o: SampleOptions, device) -> tuple[Tensor, Tensor]:
    """Text-conditioned sampling: the classes' first captions (labels pick the classes), the
    empty caption as the unconditional condition for guidance."""
    from sdiff.data import build_dataset
    from sdiff.text import build_caption_table

    classes = list(build_dataset(config.data).classes)
    table = build_caption_table(config.text, classes).to(device)
    labels = _cycle_labels(o, len(classes))

    def conditions(start: int, b: int) -> tuple[TextCondition, TextCondition | None]:
        ids = table.for_labels(labels[start : start + b].to(device))
        all_padding = torch.ones(b, dtype=torch.bool, device=device)
        empty = table.condition(ids, all_padding) if o.guidance else None
        return table.condition(ids), empty

    return _sample(model, config, o, device, conditions), labels


def _cycle_labels(o: SampleOptions, k: int) -> Tensor:
    """``o.n`` labels cycling over ``o.labels`` (default: every class 0..k-1)."""
    if o.labels is not None and any(not 0 <= c < k for c in o.labels):
        raise ValueError(f"labels must lie in [0, {k - 1}]; got {list(o.labels)}")
    pool = torch.tensor(o.labels if o.labels is not None else range(k))
    return pool.repeat(math.ceil(o.n / len(pool)))[: o.n]


def _sample(model, config: RunConfig, o: SampleOptions, device, conditions) -> Tensor:
    """``o.n`` uint8 images drawn in batches of ``o.batch_size``; ``conditions(start, b)``
    gives a batch's condition and, with guidance, its unconditional counterpart."""
    m = config.model
    schedule = config.diffusion.schedule.build(m.resolution)
    denoise = x_predictor(maybe_compile(model, enabled=o.compile), config.diffusion.prediction)
    gen = torch.Generator(device=device).manual_seed(o.seed)
    lo, hi = o.guidance_interval or (-math.inf, math.inf)
    out = []
    for start in range(0, o.n, o.batch_size):
        b = min(o.batch_size, o.n - start)
        noise = torch.randn(
            b, m.in_channels, m.resolution, m.resolution, device=device, generator=gen
        )
        cond, uncond = conditions(start, b)
        guidance = Guidance(o.guidance, uncond, lo, hi) if o.guidance else None
        x = get_sampler(o.sampler)(
            denoise, noise, schedule=schedule, steps=o.steps, cond=cond, guidance=guidance,
            clip_x=o.clip_x, generator=gen,
        )  # fmt: skip
        out.append(to_uint8(x.float()).cpu())
    return torch.cat(out)
