"""pytest-benchmark timings of sdiff's hot paths: the benchmarks bench/compare.py gates on.

    .venv/bin/python -m pytest bench/perf              # this tree, one table
    .venv/bin/python bench/compare.py HEAD~1           # HEAD~1 vs the working tree, side by side

Not collected by ``make test`` (pytest's testpaths are tests/). Inputs come from fixed seeds;
each benchmark warms up, then times a fixed number of rounds of one call
(``benchmark.pedantic``), so two revisions time exactly the same work. The device is CUDA when
present (``SDIFF_BENCH_DEVICE`` overrides; see conftest.py) and every timed call ends with a
synchronise there. ``extra_info`` carries what turns a median into a derived unit: ``items``
(images per call, img/s = items / median) or ``flops`` (TFLOP/s = flops / median / 1e12).

sdiff is imported inside the tests, not at the top: a revision that lacks a module then fails
only the benchmarks that need it, and compare.py reports those as new rather than stopping.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

TINY = ["unet-tiny-32", "uvit-tiny-32", "uvit-digits-32"]
SEED = 0


def timed(benchmark, fn: Callable[[], object], device: torch.device, rounds: int) -> None:
    def call() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    benchmark.pedantic(call, rounds=rounds, warmup_rounds=2, iterations=1)


def images(preset: str, batch: int, device: torch.device):
    """x (B, C, H, W) in [-1, 1] and labels (B,), None for an unconditional model."""
    from sdiff.models.presets import get_preset

    c = get_preset(preset)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.rand(batch, c.in_channels, c.resolution, c.resolution, generator=gen) * 2 - 1
    y = torch.randint(0, max(c.num_classes, 1), (batch,), generator=gen)
    return x.to(device), (y.to(device) if c.num_classes else None)


def eval_model(preset: str, device: torch.device) -> torch.nn.Module:
    from sdiff.models.presets import build_model

    torch.manual_seed(SEED)
    return build_model(preset).to(device).eval()


@pytest.mark.parametrize("preset", TINY)
def test_train_step(benchmark, device, preset):
    """One training step as the trainer takes it: ``prepare_batch`` and ``train_step`` of
    ``sdiff.training.step`` (label dropout, warm-up lr, forward, backward, clip, the non-finite
    check, Adam, EMA; bf16 autocast on CUDA), batch 8."""
    from sdiff.bench.throughput import run_config
    from sdiff.models.presets import get_preset
    from sdiff.training.step import build_state, prepare_batch, train_step

    batch = 8
    config = run_config(get_preset(preset), batch, seed=SEED)
    state = build_state(config, device)
    x, y = images(preset, batch, device)
    benchmark.extra_info["items"] = batch

    def step():
        return train_step(state, prepare_batch(state, x, y, config), config)

    timed(benchmark, step, device, rounds=10)


def test_forward_uvit_digits(benchmark, device):
    """The demo model's forward pass without gradients, batch 16."""
    from sdiff.models.flops import example_inputs
    from sdiff.models.presets import get_preset

    preset, batch = "uvit-digits-32", 16
    model = eval_model(preset, device)
    z, logsnr, cond = example_inputs(get_preset(preset), batch, device)
    z = torch.randn(z.shape, generator=torch.Generator().manual_seed(SEED)).to(device)
    benchmark.extra_info["items"] = batch

    @torch.no_grad()
    def forward():
        return model(z, logsnr, cond)

    timed(benchmark, forward, device, rounds=20)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampler(benchmark, device, sampler):
    """A 4-step sampler call on uvit-tiny-32, batch 16: 4 model calls and 3 updates."""
    from sdiff.diffusion.samplers import get_sampler, x_predictor
    from sdiff.diffusion.schedules import ScheduleConfig
    from sdiff.models.presets import get_preset

    preset, batch = "uvit-tiny-32", 16
    c = get_preset(preset)
    sample, denoise = get_sampler(sampler), x_predictor(eval_model(preset, device), "v")
    schedule = ScheduleConfig().build(c.resolution)
    gen = torch.Generator().manual_seed(SEED)
    noise = torch.randn(batch, c.in_channels, c.resolution, c.resolution, generator=gen)
    noise, labels = noise.to(device), (torch.arange(batch) % c.num_classes).to(device)
    benchmark.extra_info["items"] = batch

    def run():
        # ddpm's fresh noise comes from a generator reseeded every call: the same work each time
        step_gen = torch.Generator(device=device).manual_seed(SEED + 1)
        return sample(denoise, noise, schedule=schedule, steps=4, cond=labels, generator=step_gen)

    timed(benchmark, run, device, rounds=15)


@pytest.mark.parametrize("seq_len", [256, 1024])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attention(benchmark, device, backend, seq_len):
    """sdiff.attention forward, backend forced; batch 2, 4 heads of dim 64, fp32."""
    from sdiff import attention

    b, h, d = 2, 4, 64
    gen = torch.Generator().manual_seed(SEED)
    q, k, v = (torch.randn(b, h, seq_len, d, generator=gen).to(device) for _ in range(3))
    benchmark.extra_info["flops"] = 4 * b * h * seq_len**2 * d  # two matmuls of 2 B H N^2 D

    @torch.no_grad()
    def forward():
        return attention(q, k, v, backend=backend)

    timed(benchmark, forward, device, rounds=15)
