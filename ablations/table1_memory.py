"""Table 1's computation (its grid: ``ablations/grids/table1.yaml``): memory of convolution
kernels vs feature maps per resolution, at batch 1024.

    sdiff ablate 1 --scale smoke                        # seconds: computed, nothing trained

The paper's point (simple diffusion, arXiv 2301.11093, "Scaling the Architecture"): at high
resolution the feature maps dominate memory, at low resolution the kernels do, and 16x16 is
where both are tractable, so that is where to add capacity. Computed exactly from each model
config, per level of side s with C channels: one 3x3 convolution kernel C -> C in fp32
(9 C^2 x 4 bytes) and one feature map at batch 1024 in bf16 (1024 C s^2 x 2 bytes); the
U-ViT's transformer level counts its (width x width) projection and its (1024, tokens, width)
activations the same way.

Rows: a U-Net at 512 px without input downsampling whose channels grow as in ADM-style U-Nets
(128 at 512 up to 1024 at 16 and 8; the paper's channels are not known: illustrative), and
U-ViT L at 512 (the preset). The paper's numbers are not transcribed here. All scales are
the same computation.
"""

from __future__ import annotations

from sdiff.data.datasets import DataConfig
from sdiff.models.unet import UNetConfig
from sdiff.training.config import RunConfig

BATCH = 1024
KERNEL_BYTES = 4  # fp32 weights
FEATURE_BYTES = 2  # bf16 activations

UNET_512 = UNetConfig(
    resolution=512,
    channels=(128, 128, 256, 256, 512, 1024, 1024),  # sides 512 ... 8; illustrative
    blocks_down=(1,) * 7,
    blocks_up=(1,) * 7,
    num_classes=1000,
)


def level_memory(config) -> list[tuple[int, int, int]]:
    """(side, kernel bytes, feature-map bytes) per level of the model."""
    out = []
    for side, ch in zip(config.level_sides(), config.channels, strict=True):
        out.append((side, 9 * ch * ch * KERNEL_BYTES, BATCH * ch * side * side * FEATURE_BYTES))
    if config.transformer_level is not None:  # (side, width) of a transformer stack
        s, w = config.transformer_level
        out.append((s, w * w * KERNEL_BYTES, BATCH * s * s * w * FEATURE_BYTES))
    return out


def compute(config: RunConfig) -> dict[str, float]:
    metrics = {}
    for side, kernel, feature in level_memory(config.model):
        metrics[f"kernel_mib@{side}"] = kernel / 2**20
        metrics[f"feature_gib@{side}"] = feature / 2**30
        metrics[f"ratio@{side}"] = feature / kernel
    return metrics


def base_config() -> RunConfig:
    """The grid's base: U-Net 512 (the other row swaps in U-ViT L 512)."""
    return RunConfig(
        model=UNET_512,
        data=DataConfig(name="folder", resolution=512, channels=3, root="unused"),
    )
