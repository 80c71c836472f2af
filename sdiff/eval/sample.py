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
"guidance scale" is 1 + w). Images come back as uint8 (N, C, H, W) and can be written as a grid,
a folder and/or an ADM sample batch (``sdiff.eval.adm_batch``).

Noise: "per-chunk seeds". The images are drawn in chunks of ``spec.batch_size``: chunk c holds
images c B .. (c + 1) B - 1 (the last may be short) and draws everything random, its initial
noise and the sampler's per-step noise (DDPM's ancestral noise), from one generator seeded with
``chunk_seed(seed, c)``. An image is thus a function of the seed, the batch size and its global
index (and of the device type, whose generators differ), not of how many processes share the
work: under torchrun (``sdiff.eval.distributed``) rank r draws chunks r, r + W, r + 2W, ...,
and the first k images of an n-image draw are a k-image draw when B divides k. Labels cycle
by global index.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from sdiff.data.images import save_folder, to_uint8
from sdiff.diffusion.samplers import Guidance, get_sampler, x_predictor
from sdiff.eval.adm_batch import SampleBatchSink
from sdiff.eval.distributed import SINGLE, World, gather_to_main
from sdiff.eval.progress import progress_bar
from sdiff.eval.spec import EvalSpec
from sdiff.models.compile import maybe_compile
from sdiff.models.presets import build_model
from sdiff.training.checkpoint import load_checkpoint, load_latest_good
from sdiff.training.config import RunConfig, from_dict
from sdiff.training.export import run_checker
from sdiff.util.errors import StopRequested
from sdiff.util.runlock import RunLock

if TYPE_CHECKING:
    from sdiff.models.uvit import TextCondition

__all__ = [
    "NOISE",
    "Chunk",
    "EvalSpec",
    "chunk_seed",
    "draw",
    "generate",
    "load_run_checkpoint",
    "load_trained",
    "local_chunks",
    "sample_chunks",
]

NOISE = "per-chunk seeds"  # how the noise is drawn (module docstring); recorded with results

BUSY_HINT = "to use a checkpoint of a run in progress, name its file with --checkpoint"


def load_run_checkpoint(run_dir: str | Path) -> tuple[Path, dict]:
    """The newest good checkpoint of a run folder and its state, refusing one that the folder's
    ``config.json`` did not write (the caller holds the folder's lock)."""
    run_dir = Path(run_dir)
    written_here = run_checker(run_dir, force="name it with --checkpoint")
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


def chunk_seed(seed: int, chunk: int) -> int:
    """The seed of chunk ``chunk``'s generator: the first 8 bytes, little-endian, of the
    SHA-256 of ``"sdiff-sample/{seed}/{chunk}"`` (an unsigned 64-bit integer, which
    ``torch.Generator.manual_seed`` takes). Hashing, rather than seed + chunk, keeps the
    chunks of neighbouring seeds unrelated."""
    digest = hashlib.sha256(f"sdiff-sample/{seed}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def local_chunks(n: int, batch_size: int, world: World = SINGLE) -> range:
    """The chunks (of ``batch_size`` images; the last may be short) that ``world.rank`` draws:
    rank r takes chunks r, r + W, r + 2W, ..."""
    return range(world.rank, math.ceil(n / batch_size), world.size)


@dataclass(frozen=True)
class Chunk:
    """One chunk of drawn images: chunk ``index`` holds images ``start`` .. ``start + b - 1``."""

    index: int
    start: int
    images: Tensor  # uint8 (b, C, H, W), on the CPU
    labels: Tensor | None  # (b,) int64, or None for an unconditional model


@torch.no_grad()
def sample_chunks(
    model: nn.Module,
    config: RunConfig,
    spec: EvalSpec,
    device: str | torch.device | None = None,
    *,
    world: World = SINGLE,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    desc: str = "sample",
) -> Iterator[Chunk]:
    """This process's chunks of the ``spec.n`` images ``spec``'s sampling settings describe,
    in order (``local_chunks``), on ``device`` (default ``spec.device``: where ``model`` is).
    ``should_stop``, checked between chunks, ends the sampling with ``StopRequested``;
    ``progress`` draws a bar of this process's images on rank 0, labelled ``desc``, that counts
    a chunk once the caller has taken it."""
    device = spec.device if device is None else device
    conditions, labels = _conditioner(config, spec, device)
    m, o = config.model, spec
    schedule = config.diffusion.schedule.build(m.resolution)
    denoise = x_predictor(maybe_compile(model, enabled=o.compile), config.diffusion.prediction)
    lo, hi = o.guidance_interval or (-math.inf, math.inf)
    mine = local_chunks(o.n, o.batch_size, world)
    total = sum(min(o.batch_size, o.n - c * o.batch_size) for c in mine)
    bar = progress_bar(total, desc, enabled=progress and world.main)
    try:
        for c in mine:
            if should_stop is not None and should_stop():
                raise StopRequested(f"sampling stopped on request before image {c * o.batch_size} "
                                    f"of {o.n}")  # fmt: skip
            start = c * o.batch_size
            b = min(o.batch_size, o.n - start)
            # everything random in the chunk (initial and per-step noise) comes from its own
            # generator, so an image depends on the seed and its global index only
            gen = torch.Generator(device=device).manual_seed(chunk_seed(o.seed, c))
            noise = torch.randn(
                b, m.in_channels, m.resolution, m.resolution, device=device, generator=gen
            )  # (b, C, H, W)
            cond, uncond = conditions(start, b)
            guidance = Guidance(o.guidance, uncond, lo, hi) if o.guidance else None
            x = get_sampler(o.sampler)(
                denoise, noise, schedule=schedule, steps=o.steps, cond=cond, guidance=guidance,
                clip_x=o.clip_x, generator=gen,
            )  # fmt: skip
            chunk_labels = labels[start : start + b] if labels is not None else None
            yield Chunk(c, start, to_uint8(x.float()).cpu(), chunk_labels)
            bar.update(b)
    finally:
        bar.close()


@torch.no_grad()
def generate(
    model: nn.Module,
    config: RunConfig,
    spec: EvalSpec,
    device: str | torch.device | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    progress: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """All ``spec.n`` uint8 images (n, C, H, W) drawn as ``spec``'s sampling settings say (in
    this one process: ``sample_chunks`` with a world of one), and their labels (or None for an
    unconditional model)."""
    chunks = list(sample_chunks(model, config, spec, device, should_stop=should_stop,
                                progress=progress))  # fmt: skip
    labels = [c.labels for c in chunks]
    return torch.cat([c.images for c in chunks]), None if labels[0] is None else torch.cat(labels)


def draw(
    model: nn.Module,
    config: RunConfig,
    spec: EvalSpec,
    *,
    world: World = SINGLE,
    folder: str | Path | None = None,
    npz: str | Path | None = None,
    keep: bool = False,
    each: Callable[[Chunk], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    desc: str = "sample",
) -> Tensor | None:
    """Draw this process's chunks (``sample_chunks``) and send each where asked: ``folder``
    (one PNG per image, named by its global index, as ``save_folder`` names them), ``npz`` (an
    ADM sample batch, ``sdiff.eval.adm_batch``; every process of ``world`` must call this),
    ``each(chunk)``; ``progress`` draws a bar (``desc``) on rank 0. With ``keep``, all
    ``spec.n`` images come back on rank 0 in global order (gathered from the other processes);
    otherwise, and on the other ranks, None."""
    m = config.model
    sink = None
    if npz is not None:
        shape = (m.in_channels, m.resolution, m.resolution)
        sink = SampleBatchSink(npz, spec.n, spec.batch_size, shape, world)
    kept: dict[int, Tensor] = {}
    try:
        for chunk in sample_chunks(model, config, spec, world=world, should_stop=should_stop,
                                   progress=progress, desc=desc):  # fmt: skip
            if folder is not None:
                save_folder(chunk.images, folder, start_index=chunk.start)
            if sink is not None:
                sink.add(chunk.images)
            if each is not None:
                each(chunk)
            if keep:
                kept[chunk.index] = chunk.images
        if sink is not None:
            # the labels of every image, not only this process's: they cycle by global index
            sink.finish(_all_labels(config, spec))
    except BaseException:
        if sink is not None:
            sink.abort()
        raise
    if not keep:
        return None
    gathered = gather_to_main(kept, world)
    if gathered is None:
        return None
    merged = {c: images for part in gathered for c, images in part.items()}
    return torch.cat([merged[c] for c in sorted(merged)])


def _all_labels(config: RunConfig, spec: EvalSpec) -> Tensor | None:
    if config.text.enabled:
        from sdiff.data.datasets import build_dataset

        return _cycle_labels(spec, len(build_dataset(config.data).classes))
    return _cycle_labels(spec, config.model.num_classes) if config.model.num_classes else None


def _conditioner(config: RunConfig, o: EvalSpec, device) -> tuple[Callable, Tensor | None]:
    """(``conditions(start, b)``: the condition of images start .. start + b - 1 and, with
    guidance, its unconditional counterpart; all the labels, cycled by global index)."""
    if config.text.enabled:
        return _text_conditioner(config, o, device)
    k = config.model.num_classes
    if o.labels is not None and not k:
        raise ValueError("labels were given but the model is unconditional")
    if o.guidance and not k:
        raise ValueError("guidance needs a class-conditional model")
    labels = _cycle_labels(o, k) if k else None

    def conditions(start: int, b: int) -> tuple[Tensor | None, Tensor | None]:
        cond = labels[start : start + b].to(device) if labels is not None else None
        return cond, (torch.full_like(cond, k) if o.guidance else None)

    return conditions, labels


def _text_conditioner(config: RunConfig, o: EvalSpec, device) -> tuple[Callable, Tensor]:
    """Text conditions: the classes' first captions (labels pick the classes), the empty
    caption as the unconditional condition for guidance."""
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

    return conditions, labels


def _cycle_labels(o: EvalSpec, k: int) -> Tensor:
    """``o.n`` labels cycling over ``o.labels`` (default: every class 0..k-1)."""
    if o.labels is not None and any(not 0 <= c < k for c in o.labels):
        raise ValueError(f"labels must lie in [0, {k - 1}]; got {list(o.labels)}")
    pool = torch.tensor(o.labels if o.labels is not None else range(k))
    return pool.repeat(math.ceil(o.n / len(pool)))[: o.n]
