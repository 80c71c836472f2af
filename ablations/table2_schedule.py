"""Table 2: the cosine schedule vs the shifted schedule, at two resolutions.

    sdiff ablate 2 --preset smoke                        # 4 cells, 522 s measured on 2 cores

simple diffusion (arXiv 2301.11093), "Adjusting Noise Schedules": a schedule tuned at 64x64 is
too easy at higher resolution, because pooling a noisy image multiplies its SNR; shifting
logSNR by 2 log(64/d) fixes it (FID at 128 and 256; the paper's numbers are not transcribed
here).

Smoke: MNIST digits resized to 32 and 64 px (the 28 px strokes upscaled: the redundancy that
makes high resolution easy to denoise), the cosine schedule vs the schedule shifted from base
16, i.e. shifts of 2 log(16/32) = -1.39 and 2 log(16/64) = -2.77, the paper's shifts at 128 and
256 from base 64. gpu: your 64/128 px data, shift from base 32 (-1.39 and -2.77 again). paper:
the U-Net presets at 128 and 256 with the paper's base 64.
"""

from __future__ import annotations

from sdiff.ablations.grid import Axis, Scale, Table
from sdiff.ablations.scales import (
    GPU_EVAL,
    PAPER_EVAL,
    SMOKE_EVAL,
    gpu_base,
    paper_base,
    res_overrides,
    smoke_base,
)


def _smoke():
    return smoke_base()


def _digits_at(res: int) -> tuple[str, ...]:
    return (*res_overrides(_smoke, res), "data.mnist_mode=resize")


def _scales() -> dict[str, Scale]:
    return {
        "smoke": Scale(
            base=_smoke,
            rows=(
                Axis("cosine", ("diffusion.schedule.name=cosine",), "cosine"),
                Axis(
                    "shifted",
                    ("diffusion.schedule.name=shifted", "diffusion.schedule.base=16"),
                    "shifted (base 16)",
                ),
            ),
            columns=(
                Axis("32", _digits_at(32), "32 px (shift -1.39)"),
                Axis("64", _digits_at(64), "64 px (shift -2.77)"),
            ),
            eval=SMOKE_EVAL,
            cost="4 cells x about 2 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=gpu_base,
            rows=(
                Axis("cosine", ("diffusion.schedule.name=cosine",), "cosine"),
                Axis(
                    "shifted",
                    ("diffusion.schedule.name=shifted", "diffusion.schedule.base=32"),
                    "shifted (base 32)",
                ),
            ),
            columns=(
                Axis("64", res_overrides(gpu_base, 64), "64 px"),
                Axis("128", res_overrides(gpu_base, 128), "128 px"),
            ),
            eval=GPU_EVAL,
            cost="4 cells x about 15 minutes on one H100 (estimated)",
            needs=("data.root",),
        ),
        "paper": Scale(
            base=lambda: paper_base("imagenet-unet-128"),
            rows=(
                Axis("cosine", ("diffusion.schedule.name=cosine",), "cosine"),
                Axis(
                    "shifted",
                    ("diffusion.schedule.name=shifted", "diffusion.schedule.base=64"),
                    "shifted (base 64)",
                ),
            ),
            columns=(
                Axis("128", (), "128 px"),
                Axis("256", ("model=unet-256", "data.resolution=256"), "256 px"),
            ),
            eval=PAPER_EVAL,
            cost="4 cells x weeks on many GPUs",
            needs=("data.root",),
        ),
    }


TABLE = Table(
    number=2,
    name="schedule",
    aliases=("shift", "table2"),
    title="Noise schedule: cosine vs shifted (FID)",
    metrics=("fid", "kid_mean"),
    scales=_scales(),
)
