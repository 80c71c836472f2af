"""The objects the benchmarks time, built once per benchmark process.

asv re-runs a benchmark's ``setup`` before every timing sample, and building a trainer costs
more than the step it times, so the builders are cached. asv runs each benchmark (one parameter
combination) in its own process, so the cache never crosses benchmarks. sdiff modules are
imported inside the builders: history.sh runs this suite against old commits, and a module
that an old commit lacks must fail only the benchmarks that need it, not the whole suite.

Every tensor comes from a fixed seed, so all commits time the same work.
"""

from __future__ import annotations

import functools
import tempfile

import torch

TINY = ("unet-tiny-32", "uvit-tiny-32", "uvit-digits-32")  # the CPU-sized presets
SEED = 0


def images(preset: str, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (B, C, H, W) in [-1, 1] and labels (B,) (None for an unconditional model)."""
    from sdiff.presets import get_preset

    model = get_preset(preset)
    gen = torch.Generator().manual_seed(SEED)
    c, r = model.in_channels, model.resolution
    x = torch.rand(batch, c, r, r, generator=gen) * 2 - 1
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=gen)
    return x, (y if model.num_classes else None)


@functools.cache
def trainer(preset: str, batch: int):
    """The trainer's own ``train_step`` set-up (model, Adam, EMA), fp32 on the CPU."""
    from sdiff.config import RunConfig, TrainConfig
    from sdiff.data import DataConfig
    from sdiff.presets import get_preset
    from sdiff.train import Trainer

    model = get_preset(preset)
    # the data set is never read: train_step gets the batches above
    data = DataConfig(name="mnist", resolution=model.resolution, channels=model.in_channels)
    config = RunConfig(model=model, data=data, train=TrainConfig(batch_size=batch, seed=SEED))
    run_dir = tempfile.mkdtemp(prefix=f"asv-{preset}-")
    return Trainer(config, run_dir, device="cpu", progress=False)


@functools.cache
def eval_model(preset: str) -> torch.nn.Module:
    from sdiff.presets import build_model

    torch.manual_seed(SEED)
    return build_model(preset).eval()
