"""Table 4: scaling the number of blocks at 16x16.

    sdiff ablate 4 --preset smoke                        # 3 cells, 554 s measured on 2 cores

simple diffusion (arXiv 2301.11093), "Scaling the Architecture": capacity is cheapest at
16x16, where kernels and feature maps are both small (Table 1); it compares "2+3" down+up blocks
there with 8 and 12 (numbers not transcribed here). For the U-ViTs the blocks at the lowest
resolution are the transformer stack: smoke uses depths 2, 4 and 8 at 8x8 tokens; gpu depths 4,
8 and 12 at 16x16; paper: U-Net 128 with "2+3", 8+8 and 12+12 blocks at 16x16 (the preset's
other levels unchanged).
"""

from __future__ import annotations

from sdiff.ablations import scales
from sdiff.ablations.grid import Axis, Scale, Table


def _depths(depths: tuple[int, ...]) -> tuple[Axis, ...]:
    return tuple(Axis(f"depth{d}", (f"model.depth={d}",), f"{d} blocks") for d in depths)


def _unet_blocks() -> tuple[Axis, ...]:
    rows = []
    for name, down, up in [("2+3", 2, 3), ("8", 8, 8), ("12", 12, 12)]:
        rows.append(
            Axis(
                name,
                (f"model.blocks_down=[2,2,2,{down}]", f"model.blocks_up=[3,3,3,{up}]"),
                f"{name} blocks at 16x16",
            )
        )
    return tuple(rows)


TABLE = Table(
    number=4,
    name="blocks",
    aliases=("scaling", "table4"),
    title="Blocks at the lowest resolution (FID)",
    metrics=("fid", "kid_mean", "params", "gmacs"),
    scales={
        "smoke": Scale(
            base=scales.smoke_base,
            rows=_depths((2, 4, 8)),
            eval=scales.SMOKE_EVAL,
            cost="3 cells x 1.5-6 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=scales.gpu_base,
            rows=_depths((4, 8, 12)),
            eval=scales.GPU_EVAL,
            cost="3 cells x 10-25 minutes on one H100 (estimated)",
            needs=("data.root",),
        ),
        "paper": Scale(
            base=lambda: scales.paper_base("imagenet-unet-128"),
            rows=_unet_blocks(),
            eval=scales.PAPER_EVAL,
            cost="3 cells x weeks on many GPUs",
            needs=("data.root",),
        ),
    },
)
