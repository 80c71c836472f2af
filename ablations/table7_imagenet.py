"""Table 7: class-conditional generation, our models beside the literature.

    sdiff ablate 7 --preset smoke                        # 1 cell, 268 s measured on 2 cores

The literature rows (FID train / FID eval and IS) are as cited in simple diffusion (arXiv
2301.11093), Table 7, and SiD2 (arXiv 2410.19324); ours are whatever
scale was run, labelled with it, so smoke numbers on MNIST digits are never mistaken for
ImageNet ones. Smoke: the demo's digits model (48k images), sampled with guidance w = 3 as in
the demo. gpu: the 64 px U-ViT on your data, w = 1. paper: U-ViT L at 256 and 512 with guidance
w = 1.0 (the paper's guidance weight for these rows is not transcribed here: a parameter).
"""

from __future__ import annotations

from dataclasses import replace

from sdiff.ablations.grid import Axis, Scale, Table
from sdiff.ablations.scales import GPU_EVAL, PAPER_EVAL, SMOKE_EVAL, gpu_base, paper_base
from sdiff.training.config import get_run_preset

# (model, resolution): FID train, FID eval, IS as cited in simple diffusion (arXiv 2301.11093),
# Table 7, and SiD2 (arXiv 2410.19324); None where not cited
LITERATURE = {
    ("simple diffusion U-Net", 128): (2.26, 2.88, 137.3),
    ("simple diffusion U-Net", 256): (3.76, 3.71, 171.6),
    ("simple diffusion U-Net", 512): (4.30, 4.28, 171.0),
    ("simple diffusion U-ViT L", 128): (None, 3.23, 171.9),
    ("simple diffusion U-ViT L", 256): (2.77, 3.75, 211.8),
    ("simple diffusion U-ViT L", 512): (3.54, 4.53, 205.3),
    ("simple diffusion U-ViT L, guided", 256): (2.44, None, 256.3),
    ("simple diffusion U-ViT L, guided", 512): (3.02, None, 248.7),
    ("VDM++ (guided)", 256): (2.12, None, None),
    ("VDM++ (guided)", 512): (2.65, None, None),
    ("RIN", 256): (3.42, None, None),
    ("RIN", 512): (3.95, None, None),
    ("ADM-G", 256): (4.59, None, None),
    ("DiT-XL/2 (cfg)", 256): (2.27, None, None),
    ("DiT-XL/2 (cfg)", 512): (3.04, None, None),
    ("SiD2", 256): (1.38, None, None),
    ("SiD2", 512): (1.48, None, None),
}

TABLE = Table(
    number=7,
    name="imagenet",
    aliases=("comparison", "table7"),
    title="Class-conditional comparison with the literature (FID train, FID eval, IS)",
    metrics=("fid", "kid_mean", "isc_mean"),
    scales={
        "smoke": Scale(
            base=lambda: get_run_preset("digits"),
            rows=(Axis("digits", (), "sdiff U-ViT digits (smoke, MNIST 32 px)"),),
            eval=replace(SMOKE_EVAL, guidance=3.0),
            cost="1 cell, about 5 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=gpu_base,
            rows=(Axis("uvit-64", (), "sdiff U-ViT 64 px (gpu scale)"),),
            eval=replace(GPU_EVAL, guidance=1.0),
            cost="1 cell, about 30 minutes on one H100 (estimated)",
            needs=("data.root",),
        ),
        "paper": Scale(
            base=lambda: paper_base("imagenet-uvit-l-256"),
            rows=(Axis("uvit-l", (), "sdiff U-ViT L"),),
            columns=(
                Axis("256", (), "256 px"),
                Axis(
                    "512",
                    (
                        "model=uvit-l-512",
                        "data.resolution=512",
                        "diffusion.schedule.name=interpolated",
                        "diffusion.multiscale=true",
                    ),
                    "512 px",
                ),
            ),
            eval=replace(PAPER_EVAL, guidance=1.0, metrics=("fid", "kid", "isc")),
            cost="2 cells x weeks on many GPUs",
            needs=("data.root",),
        ),
    },
    paper={
        (name, str(res)): {"fid_train": t, "fid_eval": e, "isc": i}
        for (name, res), (t, e, i) in LITERATURE.items()
    },
    notes="literature rows as cited in simple diffusion (arXiv 2301.11093), Table 7, and SiD2 "
    "(arXiv 2410.19324); ours labelled with their scale and data",
)
