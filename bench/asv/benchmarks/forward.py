"""Forward pass of the tiny presets without gradients (what sampling costs per step)."""

import torch

from .inputs import TINY, eval_model


class Forward:
    params = (TINY, (16,))
    param_names = ("preset", "batch")
    number = 1
    repeat = (3, 15, 1.5)
    warmup_time = 0.2
    timeout = 60

    def setup(self, preset: str, batch: int) -> None:
        from sdiff.models.flops import example_inputs
        from sdiff.models.presets import get_preset

        self.model = eval_model(preset)
        z, logsnr, cond = example_inputs(get_preset(preset), batch, "cpu")
        gen = torch.Generator().manual_seed(0)
        self.inputs = (torch.randn(z.shape, generator=gen), logsnr, cond)

    def time_forward(self, preset: str, batch: int) -> None:
        with torch.no_grad():
            self.model(*self.inputs)
