"""Table 3: where dropout goes: from which resolution down it is applied.

    sdiff ablate 3 --preset smoke                        # 3 cells, 463 s measured on 2 cores

simple diffusion (arXiv 2301.11093), "Dropout": dropout helps only at the low resolutions;
applied to the highest-resolution feature maps it hurts (ablation at 128 px; numbers not
transcribed here). Rows: no
dropout, dropout (0.1) at the lowest resolution only, and dropout at every resolution of the
model. Smoke: the digits U-ViT (conv level at 16x16, transformer at 8x8); gpu: the 64 px U-ViT
(conv level at 32, transformer at 16); paper: U-Net 128 (levels 128, 64, 32, 16).
"""

from __future__ import annotations

from sdiff.ablations import scales
from sdiff.ablations.grid import Axis, Scale, Table


def _rows(sides: list[int]) -> tuple[Axis, ...]:
    """No dropout; the lowest side only; all sides (from the highest down)."""

    def at(chosen: list[int]) -> tuple[str, ...]:
        return ("model.dropout=0.1", f"model.dropout_resolutions={chosen}")

    return (
        Axis("none", ("model.dropout=0.0", "model.dropout_resolutions=[]"), "no dropout"),
        Axis(f"from{sides[-1]}", at([sides[-1]]), f"{sides[-1]}x{sides[-1]} and below"),
        Axis(f"from{sides[0]}", at(sides), f"{sides[0]}x{sides[0]} and below (everywhere)"),
    )


TABLE = Table(
    number=3,
    name="dropout",
    aliases=("table3",),
    title="Dropout placement: from which resolution down (FID)",
    metrics=("fid", "kid_mean"),
    scales={
        "smoke": Scale(
            base=scales.smoke_base,
            rows=_rows([16, 8]),
            eval=scales.SMOKE_EVAL,
            cost="3 cells x about 2.5 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=scales.gpu_base,
            rows=_rows([32, 16]),
            eval=scales.GPU_EVAL,
            cost="3 cells x about 15 minutes on one H100 (estimated)",
            needs=("data.root",),
        ),
        "paper": Scale(
            base=lambda: scales.paper_base("imagenet-unet-128"),
            rows=_rows([128, 64, 32, 16]),
            eval=scales.PAPER_EVAL,
            cost="3 cells x weeks on many GPUs",
            needs=("data.root",),
        ),
    },
)
