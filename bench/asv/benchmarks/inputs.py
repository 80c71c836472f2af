"""The objects the benchmarks time, built once per benchmark process.

asv re-runs a benchmark's ``setup`` before every timing sample, and building a training state
costs more than the step it times, so the builders are cached. asv runs each benchmark (one
parameter combination) in its own process, so the cache never crosses benchmarks. sdiff
modules are imported inside the builders: history.sh runs this suite against old commits, and
a module that an old commit lacks must fail only the benchmarks that need it, not the whole
suite.

Every tensor comes from a fixed seed, so all commits time the same work.
"""

from __future__ import annotations

import functools

import torch

TINY = ("unet-tiny-32", "uvit-tiny-32", "uvit-digits-32")  # the CPU-sized presets
SEED = 0


def images(preset: str, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (B, C, H, W) in [-1, 1] and labels (B,) (None for an unconditional model)."""
    from sdiff.models.presets import get_preset

    model = get_preset(preset)
    gen = torch.Generator().manual_seed(SEED)
    c, r = model.in_channels, model.resolution
    x = torch.rand(batch, c, r, r, generator=gen) * 2 - 1
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=gen)
    return x, (y if model.num_classes else None)


@functools.cache
def train_state(preset: str, batch: int):
    """(config, state): the benchmarks' run config for the preset at ``batch``
    (``sdiff.bench.throughput.run_config``: default training settings, fp32 on the CPU) and a
    fresh ``TrainState`` for it, as the trainer builds one (no dataset: ``images`` feeds it)."""
    from sdiff.bench.throughput import run_config
    from sdiff.models.presets import get_preset
    from sdiff.training.step import build_state

    config = run_config(get_preset(preset), batch, seed=SEED)
    return config, build_state(config, "cpu")


@functools.cache
def eval_model(preset: str) -> torch.nn.Module:
    from sdiff.models.presets import build_model

    torch.manual_seed(SEED)
    return build_model(preset).eval()
