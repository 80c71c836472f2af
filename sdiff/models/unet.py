"""The U-Net of simple diffusion: conv ResBlock levels with skips, attention and dropout only at
chosen resolutions, and an optional "downsample first" layer (DWT or patching).

Level i works at side r_i = resolution / f / 2^i, where f is the input factor (1, 2^levels for
the DWT, p for patching). Down: ``blocks_down[i]`` ResBlocks (each followed by self-attention if
r_i is in ``attention_resolutions``), each output kept as a skip, then a stride-2 conv. The
deepest level's down and up blocks meet directly, so "2+3 blocks at 16x16" (simple diffusion,
arXiv 2301.11093, Table 4) is ``blocks_down[-1] = 2, blocks_up[-1] = 3``. Up: ``blocks_up[i]``
ResBlocks; the first min(blocks_down[i], blocks_up[i]) of them take the level's skips
(concatenated, last first).
Dropout exists only in the ResBlocks of levels whose side is in ``dropout_resolutions``.

forward(z, logsnr, cond): z (B, C, H, W), logsnr (B,), cond = class labels (B,) or None (the
null class); returns the prediction (B, C, H, W) of whatever target the loss trains.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

from sdiff.models.blocks import (
    KERNELS,
    ConditionEmbedding,
    Downsample,
    InputStem,
    OutputHead,
    ResBlock,
    SelfAttention2d,
    Upsample,
    input_factor,
)
from sdiff.models.checkpointing import parse_plan, plan_policy, run_checkpointed
from sdiff.util.validation import NON_NEGATIVE_INT, POSITIVE_INT, Range, check_fields


def level_sides(resolution: int, factor: int, levels: int, what: str) -> list[int]:
    """Feature-map sides of ``levels`` levels below an input factor; errors name the problem."""
    if not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer; got {resolution!r}")
    if resolution % factor:
        raise ValueError(
            f"resolution {resolution} is not divisible by the input downsampling factor {factor}"
        )
    sides, side = [], resolution // factor
    for i in range(levels):
        if i and side % 2:
            raise ValueError(
                f"resolution {resolution} cannot reach the {levels} levels of this {what}: "
                f"level {i} would have side {side / 2} (sides so far {sides})"
            )
        side = side // 2 if i else side
        sides.append(side)
    return sides


def check_resolutions(name: str, wanted: tuple[int, ...], available: list[int]) -> None:
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise ValueError(f"{name} {missing} are not feature-map sides of this model ({available})")


# The numeric fields the U-Net and U-ViT configs share (the ones LevelsMixin reads, and more);
# tuple fields are checked item by item.
LEVEL_RULES: dict[str, Range] = {
    "resolution": POSITIVE_INT,
    "in_channels": POSITIVE_INT,
    "channels": POSITIVE_INT,  # each level's width
    "blocks_down": NON_NEGATIVE_INT,  # 0: the level only resamples
    "blocks_up": NON_NEGATIVE_INT,
    "head_dim": POSITIVE_INT,
    "dropout": Range(ge=0, lt=1),
    "dropout_resolutions": POSITIVE_INT,
    "num_classes": NON_NEGATIVE_INT,  # 0: unconditional
    "emb_dim": POSITIVE_INT,
    "dwt_levels": POSITIVE_INT,
    "patch_size": POSITIVE_INT,
    "norm_groups": POSITIVE_INT,
    "checkpoint_levels": NON_NEGATIVE_INT,  # level indices
}

# Every numeric field of UNetConfig.
UNET_RULES: dict[str, Range] = {**LEVEL_RULES, "attention_resolutions": POSITIVE_INT}


class LevelsMixin:
    """What the U-Net and U-ViT configs share: the input factor, the level sides, checks, and
    the per-kind questions callers ask a model config (``sdiff.models.registry``) with their
    defaults for a conv-only network; the U-ViT overrides the transformer ones."""

    kind: ClassVar[str]
    title: ClassVar[str]

    @property
    def text_conditioned(self) -> bool:
        """Whether cond carries text embeddings (a ``TextCondition`` of ``text_dim``-d tokens)."""
        return False

    @property
    def transformer_level(self) -> tuple[int, int] | None:
        """(side, width) of the transformer stack over side x side tokens; None without one."""
        return None

    def dropout_sides(self) -> tuple[int, ...]:
        """Feature-map sides with dropout, largest first (none when ``dropout`` is 0)."""
        return tuple(sorted(set(self.dropout_resolutions), reverse=True)) if self.dropout else ()

    def patch_size_at(self, resolution: int) -> int | None:
        """The patch size that keeps the inner network at ``resolution``, or None where moving
        to another resolution does not change the patch (here: always)."""
        return None

    def with_checkpointing(self, on: bool):
        """This config with activation checkpointing on for every level (and any transformer
        stack), or off everywhere (the ``checkpoint_plan`` cleared either way)."""
        levels = tuple(range(len(self.channels))) if on else ()
        return replace(self, checkpoint_levels=levels, checkpoint_plan=())

    @property
    def transformer_blocks(self) -> int:
        """Transformer blocks (checkpoint regions ``block.<k>``); none in a conv-only net."""
        return 0

    def checkpoint_policy(self, region: str, index: int) -> str:
        """The activation-checkpointing policy of conv level ``index`` (region "level") or
        transformer block ``index`` ("block"): ``none``, ``selective`` or ``full``
        (``sdiff.models.checkpointing``): the ``checkpoint_plan`` entry for it, else its group's,
        else ``full`` where ``checkpoint_levels`` / ``checkpoint_transformer`` say so."""
        plan = parse_plan(self.checkpoint_plan, len(self.channels), self.transformer_blocks)
        if region == "level":
            default = "full" if index in self.checkpoint_levels else "none"
        else:
            default = "full" if getattr(self, "checkpoint_transformer", False) else "none"
        return plan_policy(plan, region, index, default)

    @property
    def factor(self) -> int:
        return input_factor(self.downsample, self.dwt_levels, self.patch_size)

    def level_sides(self) -> list[int]:
        return level_sides(self.resolution, self.factor, len(self.channels), self.title)

    def check_checkpoint_levels(self) -> None:
        n = len(self.channels)
        bad = sorted(set(self.checkpoint_levels) - set(range(n)))
        if bad:
            raise ValueError(f"checkpoint_levels {bad} are not level indices (0..{n - 1})")
        try:
            parse_plan(self.checkpoint_plan, n, self.transformer_blocks)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None

    def check_kernels(self) -> None:
        """``kernels`` is one of KERNELS (the numeric rules tables hold numbers only)."""
        if self.kernels not in KERNELS:
            raise ValueError(
                f"unknown model.kernels {self.kernels!r}; choose one of {list(KERNELS)}"
            )

    def res_block(self, level: int, in_ch: int, emb_dim: int) -> ResBlock:
        """A ResBlock of ``level``, with dropout only if the level's side is listed."""
        side = self.level_sides()[level]
        drop = self.dropout if side in self.dropout_resolutions else 0.0
        return ResBlock(
            in_ch, self.channels[level], emb_dim, dropout=drop, groups=self.norm_groups,
            resolution=side, kernels=self.kernels,
        )  # fmt: skip

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class UNetConfig(LevelsMixin):
    kind: ClassVar[str] = "unet"
    title: ClassVar[str] = "U-Net"

    resolution: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (64, 128)  # per level, finest first
    blocks_down: tuple[int, ...] = (2, 2)
    blocks_up: tuple[int, ...] = (2, 2)
    attention_resolutions: tuple[int, ...] = ()
    head_dim: int = 64
    dropout: float = 0.0
    dropout_resolutions: tuple[int, ...] = ()
    num_classes: int = 0  # 0: unconditional; else labels 0..n-1 and the null class n
    emb_dim: int | None = None  # default 4 * channels[0]
    downsample: str = "none"  # "none" | "dwt" | "patch"
    wavelet: str = "haar"
    dwt_levels: int = 1
    patch_size: int = 2
    norm_groups: int = 32
    checkpoint_levels: tuple[int, ...] = ()  # activation checkpointing of these levels' blocks
    checkpoint_plan: tuple[str, ...] = ()  # per-region policies (sdiff.models.checkpointing)
    attention_backend: str = "auto"
    # "torch" | "triton": the ResBlocks' GroupNorm + scale-shift + SiLU in PyTorch ops, or fused
    # into one Triton kernel (sdiff.kernels.groupnorm_silu; CUDA, or the interpreter on a CPU),
    # from the same parameters. "torch" is the default: the kernel is not yet measured on a GPU.
    kernels: str = "torch"

    def __post_init__(self) -> None:
        check_fields(self, "model", UNET_RULES)
        self.check_kernels()
        n = len(self.channels)
        if n == 0 or len(self.blocks_down) != n or len(self.blocks_up) != n:
            raise ValueError(
                f"channels, blocks_down and blocks_up need one entry per level; got "
                f"{len(self.channels)}, {len(self.blocks_down)}, {len(self.blocks_up)}"
            )
        sides = self.level_sides()
        check_resolutions("attention_resolutions", self.attention_resolutions, sides)
        check_resolutions("dropout_resolutions", self.dropout_resolutions, sides)
        for side, ch in zip(sides, self.channels, strict=True):
            if side in self.attention_resolutions and ch % self.head_dim:
                raise ValueError(
                    f"attention head_dim {self.head_dim} does not divide the width {ch} "
                    f"at side {side}"
                )
        self.check_checkpoint_levels()

    def attention_sides(self) -> tuple[int, ...]:
        """Feature-map sides with self-attention, largest first."""
        return tuple(sorted(set(self.attention_resolutions), reverse=True))

    def at_resolution(self, resolution: int) -> UNetConfig:
        """This U-Net at another resolution, the way simple diffusion (arXiv 2301.11093) scales
        its U-Nets: at a higher resolution (a power-of-two multiple) the network stays the same
        behind extra DWT levels (as unet-256/512 do); at a lower one the attention and dropout
        sides shrink with the image (sides that stop being whole numbers are dropped). Any
        other change only sets the resolution (and the config's checks decide)."""
        if resolution == self.resolution:
            return self
        ratio = resolution / self.resolution
        if ratio > 1 and ratio.is_integer() and (int(ratio) & (int(ratio) - 1)) == 0:
            levels = int(math.log2(ratio)) + (self.dwt_levels if self.downsample == "dwt" else 0)
            if self.downsample in ("none", "dwt"):
                return replace(self, resolution=resolution, downsample="dwt", dwt_levels=levels)
        if ratio < 1:

            def scale(sides: tuple[int, ...]) -> tuple[int, ...]:
                return tuple(int(s * ratio) for s in sides if (s * ratio).is_integer())

            return replace(
                self,
                resolution=resolution,
                attention_resolutions=scale(self.attention_resolutions),
                dropout_resolutions=scale(self.dropout_resolutions),
            )
        return replace(self, resolution=resolution)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = c = config
        # each level's checkpointing policy, resolved once (the config is frozen)
        self.level_policies = [c.checkpoint_policy("level", i) for i in range(len(c.channels))]
        sides = c.level_sides()
        emb_dim = c.emb_dim or 4 * c.channels[0]
        io = {"wavelet": c.wavelet, "dwt_levels": c.dwt_levels, "patch_size": c.patch_size}
        self.embed = ConditionEmbedding(emb_dim, c.num_classes)
        self.stem = InputStem(c.in_channels, c.channels[0], c.downsample, **io)

        def block(i: int, cin: int) -> ResBlock:
            return c.res_block(i, cin, emb_dim)

        def attn(i: int) -> nn.Module:
            if sides[i] not in c.attention_resolutions:
                return nn.Identity()
            return SelfAttention2d(
                c.channels[i], c.head_dim, groups=c.norm_groups, backend=c.attention_backend
            )

        self.down, self.down_attn, self.downsamplers = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        cin = c.channels[0]
        for i, n in enumerate(c.blocks_down):
            self.down.append(nn.ModuleList())
            self.down_attn.append(nn.ModuleList())
            for _ in range(n):
                self.down[i].append(block(i, cin))
                self.down_attn[i].append(attn(i))
                cin = c.channels[i]
            self.downsamplers.append(Downsample(cin) if i < len(sides) - 1 else nn.Identity())

        self.up, self.up_attn, self.upsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(sides))):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            for j in range(c.blocks_up[i]):
                skip = c.channels[i] if j < min(c.blocks_down[i], c.blocks_up[i]) else 0
                blocks.append(block(i, cin + skip))
                attns.append(attn(i))
                cin = c.channels[i]
            self.up.insert(0, blocks)
            self.up_attn.insert(0, attns)
            self.upsamplers.insert(0, Upsample(cin) if i > 0 else nn.Identity())
        self.head = OutputHead(cin, c.in_channels, c.downsample, groups=c.norm_groups, **io)

    def _level(self, blocks, attns, h, emb, skips, take, ckpt):
        for j, (blk, att) in enumerate(zip(blocks, attns, strict=True)):
            if take is not None and j < take:
                h = torch.cat([h, skips.pop()], dim=1)
            h = att(run_checkpointed(blk, h, emb, policy=ckpt))
            if take is None:
                skips.append(h)
        return h

    def forward(self, z: Tensor, logsnr: Tensor, cond: Tensor | None = None) -> Tensor:
        c = self.config
        if z.shape[1:] != (c.in_channels, c.resolution, c.resolution):
            raise ValueError(
                f"U-Net for {c.in_channels}x{c.resolution}x{c.resolution} inputs got "
                f"{tuple(z.shape[1:])}"
            )
        if cond is not None and not torch.is_tensor(cond):
            raise ValueError(f"the U-Net takes class labels or None as cond; got {type(cond)}")
        emb = self.embed(logsnr, cond)  # (B, emb_dim)
        h = self.stem(z)  # (B, channels[0], r_0, r_0)
        skips: list[list[Tensor]] = []
        for i in range(len(self.down)):
            skips.append([])
            ckpt = self.level_policies[i]
            h = self._level(self.down[i], self.down_attn[i], h, emb, skips[i], None, ckpt)
            h = self.downsamplers[i](h)  # (B, channels[i], r_{i+1}, r_{i+1})
        for i in reversed(range(len(self.up))):
            take = min(c.blocks_down[i], c.blocks_up[i])
            ckpt = self.level_policies[i]
            h = self._level(self.up[i], self.up_attn[i], h, emb, skips[i], take, ckpt)
            h = self.upsamplers[i](h)
        return self.head(h)  # (B, C, H, W)
