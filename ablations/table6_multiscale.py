"""Table 6: the multiscale loss, on and off.

    sdiff ablate 6 --preset smoke                        # 2 cells, 264 s measured on 2 cores

simple diffusion (arXiv 2301.11093), "Multiscale training loss": a loss summed over
average-pooled versions of the error (weights 1/s per level) helps at 512 px and slightly hurts
at 256 (numbers not transcribed here). Smoke: digits
resized to 64 px, levels 64, 32, 16 (multiscale base 16); gpu: 128 px, levels 128 ... 32;
paper: U-ViT L at 256 and 512 with levels down to 32.
"""

from __future__ import annotations

from dataclasses import replace

from sdiff.ablations import scales
from sdiff.ablations.grid import Axis, Scale, Table


def _rows(base: int) -> tuple[Axis, ...]:
    return (
        Axis("off", ("diffusion.multiscale=false",), "plain loss"),
        Axis(
            "on",
            ("diffusion.multiscale=true", f"diffusion.multiscale_base={base}"),
            f"multiscale (levels down to {base})",
        ),
    )


def _smoke64():
    base = scales.smoke_base()
    return replace(
        base,
        model=replace(base.model, resolution=64, patch_size=4),
        data=replace(base.data, resolution=64, mnist_mode="resize"),
    )


def _gpu128():
    base = scales.gpu_base()
    return replace(
        base,
        model=replace(base.model, resolution=128, patch_size=4),
        data=replace(base.data, resolution=128),
    )


TABLE = Table(
    number=6,
    name="multiscale",
    aliases=("table6",),
    title="Multiscale loss on/off (FID)",
    metrics=("fid", "kid_mean"),
    scales={
        "smoke": Scale(
            base=_smoke64,
            rows=_rows(16),
            eval=scales.SMOKE_EVAL,
            cost="2 cells x about 2 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=_gpu128,
            rows=_rows(32),
            eval=scales.GPU_EVAL,
            cost="2 cells x about 25 minutes on one H100 (estimated)",
            needs=("data.root",),
        ),
        "paper": Scale(
            base=lambda: scales.paper_base("imagenet-uvit-l-256"),
            rows=_rows(32),
            columns=(
                Axis("256", (), "256 px"),
                Axis(
                    "512",
                    (
                        "model=uvit-l-512",
                        "data.resolution=512",
                        "diffusion.schedule.name=interpolated",
                    ),
                    "512 px",
                ),
            ),
            eval=scales.PAPER_EVAL,
            cost="4 cells x weeks on many GPUs",
            needs=("data.root",),
        ),
    },
)
