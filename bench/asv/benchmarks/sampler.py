"""Sampling with the shipped samplers on uvit-tiny-32, batch 16.

A call of ``steps`` steps makes ``steps`` denoiser evaluations and ``steps - 1`` updates
z_t -> z_s (the last step returns x_hat), so the cost of one step is the slope
(time[8] - time[2]) / 6, and time[2] is one update plus two model calls.
"""

import torch

from .inputs import eval_model

PRESET, BATCH = "uvit-tiny-32", 16


class Sampler:
    params = (("ddim", "ddpm"), (2, 8))
    param_names = ("sampler", "steps")
    number = 1
    repeat = (3, 15, 1.5)
    warmup_time = 0.2
    timeout = 60

    def setup(self, sampler: str, steps: int) -> None:
        from sdiff.diffusion.samplers import get_sampler, x_predictor
        from sdiff.diffusion.schedules import ScheduleConfig
        from sdiff.models.presets import get_preset

        config = get_preset(PRESET)
        self.sample = get_sampler(sampler)
        self.denoise = x_predictor(eval_model(PRESET), "v")
        self.schedule = ScheduleConfig().build(config.resolution)
        r = config.resolution
        self.noise = torch.randn(BATCH, config.in_channels, r, r,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
        self.labels = torch.arange(BATCH) % config.num_classes

    def time_sample(self, sampler: str, steps: int) -> None:
        gen = torch.Generator().manual_seed(1)  # ddpm's fresh noise, the same every call
        self.sample(self.denoise, self.noise, schedule=self.schedule, steps=steps,
                    cond=self.labels, generator=gen)  # fmt: skip
