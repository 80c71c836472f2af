"""Sampling from a trained run: ``sdiff sample`` and the generator behind ``sdiff eval``.

    sdiff sample --run runs/digits --n 64 --steps 256 --guidance 1.0 --grid grid.png

Loads a run folder's newest good checkpoint, or a checkpoint file named explicitly, and its
config; takes the EMA weights unless told otherwise, and draws images with any registered
sampler. A run folder's checkpoint must have been written by the folder's own ``config.json``
(one dropped in from another run is refused, naming the fields that differ); a file named
explicitly is used as it is. Reading a run folder holds its lock shared (``sdiff.util.runlock``):
a trainer that owns the folder is not raced, and to sample while one trains, name one of its
checkpoint files. What to draw is the sampling part of an ``EvalSpec`` (``sdiff.eval.spec``).
Class labels cycle over the classes unless given; guidance uses the null class as the
unconditional condition, with weight w (eps = (1 + w) eps_cond - w eps_uncond; other libraries'
"guidance scale" is 1 + w). Images come back as uint8 (N, C, H, W) and can be written as a grid
and/or a folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdiff.data.images import to_uint8
from sdiff.diffusion.samplers import Guidance, get_sampler, x_predictor
from sdiff.eval.spec import EvalSpec
from sdiff.models.compile import maybe_compile
from sdiff.models.presets import build_model
from sdiff.training.checkpoint import load_checkpoint, load_latest_good
from sdiff.training.config import RunConfig, diff_keys, from_dict
from sdiff.util.errors import StopRequested
from sdiff.util.runlock import RunLock

if TYPE_CHECKING:
    from sdiff.models.uvit import TextCondition

__all__ = ["EvalSpec", "generate", "load_run_checkpoint", "load_trained"]

BUSY_HINT = "to use a checkpoint of a run in progress, name its file with --checkpoint"


def load_run_checkpoint(run_dir: str | Path) -> tuple[Path, dict]:
    """The newest good checkpoint of a run folder and its state, refusing one that the folder's
    ``config.json`` did not write (the caller holds the folder's lock)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"no checkpoint found: {run_dir} is not a run folder (no config.json); to use a "
            f"checkpoint file on its own, name it with --checkpoint"
        )
    try:
        expected = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None

    def written_here(path: Path, state: dict) -> None:
        differs = diff_keys(expected, json.loads(state["config"]))
        if differs:
            raise ValueError(
                f"checkpoint {path} was not written by {config_path}: they differ at "
                f"{differs}; to use it anyway, name it with --checkpoint"
            )

    found = load_latest_good(run_dir / "checkpoints", accept=written_here)
    if found is None:
        raise ValueError(f"no checkpoint found in {run_dir} (looked in {run_dir / 'checkpoints'})")
    return found


def load_trained(
    source: str | Path, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, int]:
    """(model in eval mode, its run config, its step) from a run folder (its newest good
    checkpoint, checked against the run's config) or a checkpoint file (used as it is)."""
    source = Path(source)
    if source.is_dir():
        with RunLock(source, "sdiff sample", shared=True, hint=BUSY_HINT):
            _, state = load_run_checkpoint(source)
    else:
        state = load_checkpoint(source)
    return model_from_state(state, ema=ema, device=device)


def model_from_state(
    state: dict, *, ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, int]:
    config = from_dict(RunConfig, json.loads(state["config"]))
    model = build_model(config.model)
    model.load_state_dict(state["ema" if ema else "model"])
    return model.to(device).eval(), config, int(state["step"])


@torch.no_grad()
def generate(
    model: nn.Module,
    config: RunConfig,
    spec: EvalSpec,
    device: str | torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``spec.n`` uint8 images (n, C, H, W) drawn as ``spec``'s sampling settings say, and
    their labels (or None for an unconditional model), on ``device`` (default ``spec.device``:
    where ``model`` is). ``should_stop``, checked between batches, ends the sampling with
    ``StopRequested``."""
    m, o = config.model, spec
    device = spec.device if device is None else device
    if config.text.enabled:
        return _generate_text(model, config, spec, device, should_stop)
    k = m.num_classes
    if o.labels is not None and not k:
        raise ValueError("labels were given but the model is unconditional")
    if o.guidance and not k:
        raise ValueError("guidance needs a class-conditional model")
    labels = _cycle_labels(o, k) if k else None

    def conditions(start: int, b: int) -> tuple[Tensor | None, Tensor | None]:
        cond = labels[start : start + b].to(device) if labels is not None else None
        return cond, (torch.full_like(cond, k) if o.guidance else None)

    return _sample(model, config, o, device, conditions, should_stop), labels


@torch.no_grad()
def _generate_text(
    model, config: RunConfig, o: EvalSpec, device, should_stop
) -> tuple[Tensor, Tensor]:
    """Text-conditioned sampling: the classes' first captions (labels pick the classes), the
    empty caption as the unconditional condition for guidance."""
    from sdiff.data.datasets import build_dataset
    from sdiff.models.text import build_caption_table

    classes = list(build_dataset(config.data).classes)
    table = build_caption_table(config.text, classes).to(device)
    labels = _cycle_labels(o, len(classes))

    def conditions(start: int, b: int) -> tuple[TextCondition, TextCondition | None]:
        ids = table.for_labels(labels[start : start + b].to(device))
        all_padding = torch.ones(b, dtype=torch.bool, device=device)
        empty = table.condition(ids, all_padding) if o.guidance else None
        return table.condition(ids), empty

    return _sample(model, config, o, device, conditions, should_stop), labels


def _cycle_labels(o: EvalSpec, k: int) -> Tensor:
    """``o.n`` labels cycling over ``o.labels`` (default: every class 0..k-1)."""
    if o.labels is not None and any(not 0 <= c < k for c in o.labels):
        raise ValueError(f"labels must lie in [0, {k - 1}]; got {list(o.labels)}")
    pool = torch.tensor(o.labels if o.labels is not None else range(k))
    return pool.repeat(math.ceil(o.n / len(pool)))[: o.n]


def _sample(model, config: RunConfig, o: EvalSpec, device, conditions, should_stop) -> Tensor:
    """``o.n`` uint8 images drawn in batches of ``o.batch_size``; ``conditions(start, b)``
    gives a batch's condition and, with guidance, its unconditional counterpart."""
    m = config.model
    schedule = config.diffusion.schedule.build(m.resolution)
    denoise = x_predictor(maybe_compile(model, enabled=o.compile), config.diffusion.prediction)
    gen = torch.Generator(device=device).manual_seed(o.seed)
    lo, hi = o.guidance_interval or (-math.inf, math.inf)
    out = []
    for start in range(0, o.n, o.batch_size):
        if should_stop is not None and should_stop():
            raise StopRequested(f"sampling stopped on request after {start} of {o.n} images")
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
