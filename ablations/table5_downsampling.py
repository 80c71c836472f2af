"""Table 5: downsampling first: none vs DWT vs patching, FID and training speed.

    sdiff ablate 5 --preset smoke                        # 3 cells, 602 s measured on 2 cores

simple diffusion (arXiv 2301.11093), "Avoiding high resolution feature maps": at 512 px,
reducing the image before the first high-resolution layer (a DWT, or a strided "patching" conv
with a transposed conv at the end) trains much faster for a similar FID; patching was "slightly
worse but similar" (numbers not transcribed here). Rows (all
reach the same inner network): patching, a DWT, and no downsampling with extra conv levels at
full resolution. Smoke: digits resized to 64 px (patch 4 / 2 Haar DWT levels / conv levels at
64, 32, 16 before the 8x8 transformer); gpu: 128 px (patch 4 / 2 DWT levels / extra levels);
paper: 512 px with U-Net 512 (2 DWT levels), patch 4, or none.
"""

from __future__ import annotations

from sdiff.ablations import scales
from sdiff.ablations.grid import Axis, Scale, Table


def _rows(res: int, factor: int, levels: int, base_ch: int, ch: int) -> tuple[Axis, ...]:
    """patch ``factor`` / DWT ``levels`` (2**levels = factor) / none with extra conv levels."""
    common = (f"model.resolution={res}", f"data.resolution={res}")
    extra = levels  # one more conv level per halving the input layer no longer does
    return (
        Axis(
            "patch",
            (*common, "model.downsample=patch", f"model.patch_size={factor}"),
            f"patching {factor}x{factor}",
        ),
        Axis(
            "dwt",
            (*common, "model.downsample=dwt", f"model.dwt_levels={levels}"),
            f"DWT ({levels} Haar levels)",
        ),
        Axis(
            "none",
            (
                *common,
                "model.downsample=none",
                f"model.channels={[base_ch] * extra + [ch]}",
                f"model.blocks_down={[1] * (extra + 1)}",
                f"model.blocks_up={[1] * (extra + 1)}",
            ),
            "none (conv levels at full resolution)",
        ),
    )


def _paper_rows() -> tuple[Axis, ...]:
    return (
        Axis("dwt", ("model=unet-512", "data.resolution=512"), "DWT (2 levels), U-Net 512"),
        Axis(
            "patch",
            (
                "model=unet-512",
                "data.resolution=512",
                "model.downsample=patch",
                "model.patch_size=4",
            ),
            "patching 4x4, U-Net 512",
        ),
        Axis(
            "none",
            (
                "model=unet-512",
                "data.resolution=512",
                "model.downsample=none",
                "model.channels=[64,128,128,256,512,1024]",
                "model.blocks_down=[1,1,2,2,2,8]",
                "model.blocks_up=[1,1,3,3,3,8]",
            ),
            "none (levels at 512 and 256 added)",
        ),
    )


TABLE = Table(
    number=5,
    name="downsampling",
    aliases=("dwt", "patching", "table5"),
    title="Downsampling first: none vs DWT vs patching (FID, training img/s)",
    metrics=("fid", "kid_mean", "train_img_s", "gmacs"),
    scales={
        "smoke": Scale(
            base=lambda: _mnist64(),
            rows=_rows(64, 4, 2, 16, 32),
            eval=scales.SMOKE_EVAL,
            cost="3 cells x 2-5.5 minutes on 2 CPU cores",
        ),
        "gpu": Scale(
            base=scales.gpu_base,
            rows=_rows(128, 4, 2, 64, 128),
            eval=scales.GPU_EVAL,
            cost="3 cells x 15-40 minutes on one H100 (estimated)",
            needs=("data.root",),
        ),
        "paper": Scale(
            base=lambda: scales.paper_base("imagenet-unet-512"),
            rows=_paper_rows(),
            eval=scales.PAPER_EVAL,
            cost="3 cells x weeks on many GPUs",
            needs=("data.root",),
        ),
    },
)


def _mnist64():
    from dataclasses import replace

    base = scales.smoke_base()
    return replace(base, data=replace(base.data, mnist_mode="resize"))
