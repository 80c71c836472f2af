"""Model presets keyed by the names users type, and ``build_model``.

The models of simple diffusion (arXiv 2301.11093): its U-ViT and Table 7, sizes as cited.
- ``uvit-l-256`` / ``uvit-l-512``: U-ViT L, about 2B parameters and about 555 G multiply-
  accumulates per forward; the input is reduced to 128x128 (patch 2 at 256, patch 4 at 512),
  conv levels at 128, 64, 32, a transformer stack at 16x16. Known: the 16x16 stack of about 36
  blocks of width 2048 (~1.8B parameters) and the totals. Not known from the text we have, and
  our choice: conv channels and blocks per level, head dimension, MLP ratio, the conditioning
  mechanism, dropout rate and placement. We chose conv channels (128, 256, 512) with 2 blocks
  down and 2 up per level so the totals land at the cited size (see ``sdiff models``).
- ``unet-128`` / ``unet-256`` / ``unet-512``: simple diffusion's U-Net (FID 2.26/3.76/4.30 train,
  Table 7). Its per-level channels, blocks, attention and dropout resolutions are NOT known from
  the text we have: every such field below is our choice. The 256 and 512 presets reuse the
  128 network behind a 1- and 2-level DWT ("downsample first"), so all three see 128x128 maps.
Tiny presets (``*-tiny-32``) are for CPU smoke runs and tests; ``uvit-digits-32`` is the model of
``make demo`` (MNIST digits, 1 channel).

Training settings (optimizer, batch, EMA) live with the training configs, not here.
"""

from __future__ import annotations

import difflib
from dataclasses import replace

from torch import nn

from sdiff.models import registry
from sdiff.models.unet import UNetConfig
from sdiff.models.uvit import UViTConfig

# The model config type of the built-in kinds, for annotations (``RunConfig.model``). Dispatch
# on the kind goes through ``sdiff.models.registry``, which also knows kinds registered later.
ModelConfig = UNetConfig | UViTConfig

# U-ViT L. Paper: ~2B params, ~555 G MACs (FID 2.77 train / 3.75 eval at 256, 3.54 / 4.53 at 512).
_UVIT_L = UViTConfig(
    resolution=256,
    downsample="patch",
    patch_size=2,  # 256 -> 128 (paper)
    channels=(128, 256, 512),  # conv levels at 128, 64, 32 (levels: paper; channels: ours)
    blocks_down=(2, 2, 2),  # unknown: ours
    blocks_up=(2, 2, 2),  # unknown: ours
    transformer_resolution=16,  # paper
    width=2048,  # paper (best available estimate)
    depth=36,  # paper (best available estimate)
    head_dim=128,  # unknown: ours (16 heads)
    mlp_ratio=4.0,  # unknown: ours
    dropout=0.1,  # unknown: ours
    dropout_resolutions=(16,),  # unknown: ours (paper: dropout only at low resolutions)
    num_classes=1000,  # ImageNet class-conditional
)

# simple diffusion U-Net at 128 px (paper FID 2.26 train / 2.88 eval). Everything but the
# resolution and the class count is our choice: the paper's values are not in our text.
_UNET_128 = UNetConfig(
    resolution=128,
    channels=(128, 256, 512, 1024),  # unknown: ours; levels at 128, 64, 32, 16
    blocks_down=(2, 2, 2, 8),  # unknown: ours (the paper scales the 16x16 blocks, Table 4)
    blocks_up=(3, 3, 3, 8),  # unknown: ours
    attention_resolutions=(16,),  # unknown: ours
    head_dim=64,  # unknown: ours
    dropout=0.1,  # unknown: ours
    dropout_resolutions=(32, 16),  # unknown: ours (never at the highest resolution)
    num_classes=1000,
)

PRESETS: dict[str, ModelConfig] = {
    "uvit-l-256": _UVIT_L,
    "uvit-l-512": replace(_UVIT_L, resolution=512, patch_size=4),  # 512 -> 128 (paper)
    "unet-128": _UNET_128,
    "unet-256": replace(_UNET_128, resolution=256, downsample="dwt", dwt_levels=1),
    "unet-512": replace(_UNET_128, resolution=512, downsample="dwt", dwt_levels=2),
    "unet-tiny-32": UNetConfig(
        resolution=32,
        channels=(32, 64),
        blocks_down=(1, 2),
        blocks_up=(2, 3),  # "2+3" at the lowest level, as the paper's baseline
        attention_resolutions=(16,),
        head_dim=32,
        dropout=0.1,
        dropout_resolutions=(16,),
        num_classes=10,
        norm_groups=8,
    ),
    # the demo's model: MNIST digits padded to 32x32, 1 channel, 10 classes (1.04M parameters)
    "uvit-digits-32": UViTConfig(
        resolution=32,
        in_channels=1,
        downsample="patch",
        patch_size=2,  # 32 -> 16
        channels=(32,),  # conv level at 16
        blocks_down=(1,),
        blocks_up=(1,),
        transformer_resolution=8,  # 64 tokens
        width=128,
        depth=4,
        head_dim=32,
        num_classes=10,
        norm_groups=8,
    ),
    "uvit-tiny-32": UViTConfig(
        resolution=32,
        downsample="patch",
        patch_size=2,  # 32 -> 16
        channels=(32,),  # conv level at 16
        blocks_down=(1,),
        blocks_up=(1,),
        transformer_resolution=8,  # 64 tokens
        width=64,
        depth=2,
        head_dim=32,
        dropout=0.1,
        dropout_resolutions=(8,),
        num_classes=10,
        norm_groups=8,
    ),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown model preset {name!r}{hint} known presets: {sorted(PRESETS)}")
    return PRESETS[name]


def build_model(config: ModelConfig | str) -> nn.Module:
    """A model from a config of any registered kind or a preset name (on the current default
    device); ``sdiff.models.registry.build_model`` picks the module."""
    if isinstance(config, str):
        config = get_preset(config)
    return registry.build_model(config)
