"""The U-ViT of simple diffusion: a small conv U-Net down to 16x16, then a transformer stack.

Layout (the U-ViT of simple diffusion, arXiv 2301.11093): the image is first reduced (patching
or DWT) to side r_0; conv levels at r_0, r_0/2, ... each with ResBlocks and U-Net skips; a
stride-2 conv to the transformer side (16 by default; the config checks the sides meet);
``depth`` pre-norm transformer blocks over the (16*16 = 256) tokens with no skips; then back up
through the conv levels. For U-ViT L at 256 px (patch 2) and 512 px (patch 4), r_0 = 128 and
levels sit at 128, 64, 32.

Transformer conditioning: the paper's mechanism is not in the text we have. We use adaLN
"single" (PixArt-alpha): one shared projection of the (logSNR + class) embedding to six
width-vectors (shift, scale, gate for attention and MLP), plus a learned per-block table, so
conditioning costs 6 x width per block instead of DiT's emb x 6 width per block; with the
shared projection and gates zero at init each block starts as the identity.

SiD2's (arXiv 2410.19324) residual U-ViT (``residual=True``): instead of one concatenated skip
per block, each conv stage adds its input to the output of the matching up stage (one skip per
stage).

Text-to-image: with ``text_dim`` set, every transformer block cross-attends to precomputed text
embeddings; cond is then a ``TextCondition(embeddings (B, L, text_dim), padding_mask (B, L))``
(padding_mask True marks padding; an all-padding row is the null caption).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sdiff.models.attention import attention
from sdiff.models.blocks import (
    ConditionEmbedding,
    Downsample,
    InputStem,
    OutputHead,
    ResBlock,
    Upsample,
    norm_modulate,
    zero_,
)
from sdiff.models.checkpointing import run_checkpointed
from sdiff.models.unet import LEVEL_RULES, LevelsMixin, check_resolutions
from sdiff.util.validation import POSITIVE_INT, Range, check_fields


class TextCondition(NamedTuple):
    embeddings: Tensor  # (B, L, text_dim)
    padding_mask: Tensor | None = None  # (B, L) bool, True = padding
    labels: Tensor | None = None  # (B,) optional class labels alongside the text


# Every numeric field of UViTConfig.
UVIT_RULES: dict[str, Range] = {
    **LEVEL_RULES,
    "transformer_resolution": POSITIVE_INT,
    "width": POSITIVE_INT,
    "depth": POSITIVE_INT,
    "mlp_ratio": Range(gt=0),
    "text_dim": POSITIVE_INT,
}


@dataclass(frozen=True)
class UViTConfig(LevelsMixin):
    kind: ClassVar[str] = "uvit"
    title: ClassVar[str] = "U-ViT"

    resolution: int = 32
    in_channels: int = 3
    downsample: str = "patch"  # "none" | "dwt" | "patch"
    patch_size: int = 2
    wavelet: str = "haar"
    dwt_levels: int = 1
    channels: tuple[int, ...] = (64,)  # conv levels, finest first
    blocks_down: tuple[int, ...] = (1,)
    blocks_up: tuple[int, ...] = (1,)
    transformer_resolution: int = 8
    width: int = 128
    depth: int = 2
    head_dim: int = 64
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dropout_resolutions: tuple[int, ...] = ()  # conv sides and/or transformer_resolution
    num_classes: int = 0
    text_dim: int | None = None  # cross-attention to text embeddings of this size
    residual: bool = False  # SiD2: one skip per stage
    emb_dim: int | None = None  # default 4 * channels[0] (or width without conv levels)
    norm_groups: int = 32
    checkpoint_levels: tuple[int, ...] = ()
    checkpoint_transformer: bool = False
    checkpoint_plan: tuple[str, ...] = ()  # per-region policies (sdiff.models.checkpointing)
    attention_backend: str = "auto"
    # "torch" | "triton": the blocks' modulated norms (LayerNorm + adaLN, GroupNorm + scale-shift
    # + SiLU) in PyTorch ops, or each fused into one Triton kernel (sdiff.kernels; CUDA, or the
    # interpreter on a CPU), from the same parameters. "torch" is the default: the kernels are
    # not yet measured on a GPU.
    kernels: str = "torch"

    def __post_init__(self) -> None:
        check_fields(self, "model", UVIT_RULES)
        self.check_kernels()
        n = len(self.channels)
        if len(self.blocks_down) != n or len(self.blocks_up) != n:
            raise ValueError(
                f"channels, blocks_down and blocks_up need one entry per conv level; got "
                f"{n}, {len(self.blocks_down)}, {len(self.blocks_up)}"
            )
        if self.width % self.head_dim:
            raise ValueError(
                f"attention head_dim {self.head_dim} does not divide the transformer width "
                f"{self.width}"
            )
        sides = self.level_sides()
        reached = sides[-1] // 2 if sides else self.resolution // self.factor
        if reached != self.transformer_resolution or (sides and sides[-1] % 2):
            raise ValueError(
                f"resolution {self.resolution} with input factor {self.factor} and "
                f"{n} conv levels {sides} reaches side {reached}, not the transformer "
                f"resolution {self.transformer_resolution}"
            )
        check_resolutions(
            "dropout_resolutions", self.dropout_resolutions, [*sides, self.transformer_resolution]
        )
        self.check_checkpoint_levels()

    @property
    def text_conditioned(self) -> bool:
        return self.text_dim is not None

    @property
    def transformer_level(self) -> tuple[int, int]:
        return self.transformer_resolution, self.width

    def attention_sides(self) -> tuple[int, ...]:
        """The transformer side: attention exists only in the stack."""
        return (self.transformer_resolution,) if self.depth else ()

    def with_checkpointing(self, on: bool) -> UViTConfig:
        levels = tuple(range(len(self.channels))) if on else ()
        return replace(
            self, checkpoint_levels=levels, checkpoint_transformer=on, checkpoint_plan=()
        )

    @property
    def transformer_blocks(self) -> int:
        return self.depth

    def patch_size_at(self, resolution: int) -> int | None:
        """For a patching U-ViT, the patch size that keeps its conv levels and transformer side
        at ``resolution`` (patch 2 at 256, 4 at 512 for U-ViT L); None for a DWT or no input
        downsampling (unchanged). Raises where no whole patch size reaches the transformer."""
        if self.downsample != "patch":
            return None
        inner = self.transformer_resolution * 2 ** len(self.channels)
        if resolution % inner:
            raise ValueError(
                f"{resolution} px cannot reach this U-ViT's {self.transformer_resolution}x"
                f"{self.transformer_resolution} transformer through its conv levels"
            )
        return resolution // inner

    def at_resolution(self, resolution: int) -> UViTConfig:
        """This U-ViT at another resolution, the way simple diffusion (arXiv 2301.11093) scales
        its U-ViTs: the conv levels and transformer side stay and a patching U-ViT changes its
        patch size (``patch_size_at``); otherwise only the resolution changes (and the
        config's checks decide)."""
        if resolution == self.resolution:
            return self
        patch = self.patch_size_at(resolution)
        if patch is None:
            return replace(self, resolution=resolution)
        return replace(self, resolution=resolution, patch_size=patch)


class TransformerBlock(nn.Module):
    """Pre-norm block: adaLN-modulated self-attention and MLP, optional cross-attention."""

    def __init__(
        self,
        width: int,
        head_dim: int,
        mlp_ratio: float,
        *,
        dropout: float = 0.0,
        text_dim: int | None = None,
        backend: str = "auto",
        kernels: str = "torch",
    ) -> None:
        super().__init__()
        self.heads, self.backend, self.kernels = width // head_dim, backend, kernels
        self.table = nn.Parameter(torch.zeros(6, width))  # per-block adaLN offsets
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.cross = None
        if text_dim is not None:
            self.cross = nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width, eps=1e-6),
                    "q": nn.Linear(width, width),
                    "kv": nn.Linear(text_dim, 2 * width),
                    "proj": zero_(nn.Linear(width, width)),
                }
            )
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(approximate="tanh"),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(hidden, width),
        )

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, -1).transpose(1, 2)  # (B, heads, N, head_dim)

    def _merge(self, x: Tensor) -> Tensor:
        return x.transpose(1, 2).flatten(2)  # (B, N, width)

    def forward(self, h: Tensor, mod: Tensor, text: TextCondition | None = None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = (mod + self.table).unbind(1)  # (B, W)
        x = norm_modulate(self.norm1, h, shift1, scale1, self.kernels)  # (B, N, W)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = attention(self._heads(q), self._heads(k), self._heads(v), backend=self.backend)
        h = h + gate1[:, None] * self.proj(self._merge(a))
        if self.cross is not None:
            if text is None:
                raise ValueError("this U-ViT cross-attends to text: cond must be a TextCondition")
            q = self.cross["q"](self.cross["norm"](h))
            k, v = self.cross["kv"](text.embeddings.to(h.dtype)).chunk(2, dim=-1)  # (B, L, W)
            a = attention(
                self._heads(q),
                self._heads(k),
                self._heads(v),
                backend=self.backend,
                key_padding_mask=text.padding_mask,
            )
            h = h + self.cross["proj"](self._merge(a))
        x = norm_modulate(self.norm2, h, shift2, scale2, self.kernels)
        return h + gate2[:, None] * self.mlp(x)


class UViT(nn.Module):
    def __init__(self, config: UViTConfig) -> None:
        super().__init__()
        self.config = c = config
        # each region's checkpointing policy, resolved once (the config is frozen)
        self.level_policies = [c.checkpoint_policy("level", i) for i in range(len(c.channels))]
        self.block_policies = [c.checkpoint_policy("block", k) for k in range(c.depth)]
        sides = c.level_sides()
        emb_dim = c.emb_dim or 4 * (c.channels[0] if c.channels else c.width // 4)
        io = {"wavelet": c.wavelet, "dwt_levels": c.dwt_levels, "patch_size": c.patch_size}
        first = c.channels[0] if c.channels else c.width
        self.embed = ConditionEmbedding(emb_dim, c.num_classes)
        self.stem = InputStem(c.in_channels, first, c.downsample, **io)

        def block(i: int, cin: int) -> ResBlock:
            return c.res_block(i, cin, emb_dim)

        self.down, self.downsamplers = nn.ModuleList(), nn.ModuleList()
        cin = first
        for i, n in enumerate(c.blocks_down):
            self.down.append(nn.ModuleList())
            for _ in range(n):
                self.down[i].append(block(i, cin))
                cin = c.channels[i]
            self.downsamplers.append(Downsample(cin))

        tokens = c.transformer_resolution**2
        self.proj_in = nn.Linear(cin, c.width)
        self.pos = nn.Parameter(torch.randn(1, tokens, c.width) * 0.02)
        self.adaln = nn.Sequential(nn.SiLU(), zero_(nn.Linear(emb_dim, 6 * c.width)))
        drop = c.dropout if c.transformer_resolution in c.dropout_resolutions else 0.0
        self.blocks = nn.ModuleList(
            TransformerBlock(
                c.width,
                c.head_dim,
                c.mlp_ratio,
                dropout=drop,
                text_dim=c.text_dim,
                backend=c.attention_backend,
                kernels=c.kernels,
            )
            for _ in range(c.depth)
        )
        self.norm_out = nn.LayerNorm(c.width, eps=1e-6)
        self.proj_out = nn.Linear(c.width, cin)

        # residual variant: stage i's input (channels of the level above) joins its output
        self.stage_skips = nn.ModuleList(
            nn.Conv2d(cprev, ch, 1) if c.residual and cprev != ch else nn.Identity()
            for cprev, ch in zip([first, *c.channels][: len(c.channels)], c.channels, strict=True)
        )
        self.up, self.upsamplers = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(len(sides))):
            self.upsamplers.insert(0, Upsample(cin))
            blocks = nn.ModuleList()
            for j in range(c.blocks_up[i]):
                takes = not c.residual and j < min(c.blocks_down[i], c.blocks_up[i])
                blocks.append(block(i, cin + (c.channels[i] if takes else 0)))
                cin = c.channels[i]
            self.up.insert(0, blocks)
        self.head = OutputHead(cin, c.in_channels, c.downsample, groups=c.norm_groups, **io)

    def _transformer(self, h: Tensor, emb: Tensor, text: TextCondition | None) -> Tensor:
        b, ch, s, _ = h.shape
        x = self.proj_in(h.flatten(2).transpose(1, 2)) + self.pos  # (B, s*s, width)
        mod = self.adaln(emb).reshape(b, 6, -1)  # (B, 6, width)
        for blk, policy in zip(self.blocks, self.block_policies, strict=True):
            x = run_checkpointed(blk, x, mod, text, policy=policy)
        x = self.proj_out(self.norm_out(x))  # (B, s*s, ch)
        return x.transpose(1, 2).reshape(b, ch, s, s)

    def forward(
        self, z: Tensor, logsnr: Tensor, cond: Tensor | TextCondition | None = None
    ) -> Tensor:
        c = self.config
        if z.shape[1:] != (c.in_channels, c.resolution, c.resolution):
            raise ValueError(
                f"U-ViT for {c.in_channels}x{c.resolution}x{c.resolution} inputs got "
                f"{tuple(z.shape[1:])}"
            )
        text = cond if isinstance(cond, TextCondition) else None
        if c.text_dim is not None and text is None:
            raise ValueError("this U-ViT cross-attends to text: cond must be a TextCondition")
        if text is not None and c.text_dim is None:
            raise ValueError("this U-ViT has no text cross-attention (text_dim=None)")
        labels = text.labels if text is not None else cond
        emb = self.embed(logsnr, labels)  # (B, emb_dim)
        h = self.stem(z)  # (B, channels[0], r_0, r_0)
        skips: list[list[Tensor]] = []
        stage_inputs: list[Tensor] = []
        for i, blocks in enumerate(self.down):
            stage_inputs.append(h)
            skips.append([])
            for blk in blocks:
                h = run_checkpointed(blk, h, emb, policy=self.level_policies[i])
                skips[i].append(h)
            h = self.downsamplers[i](h)
        h = self._transformer(h, emb, text)  # (B, ch, 16, 16)
        for i in reversed(range(len(self.up))):
            h = self.upsamplers[i](h)
            take = 0 if c.residual else min(c.blocks_down[i], c.blocks_up[i])
            for j, blk in enumerate(self.up[i]):
                if j < take:
                    h = torch.cat([h, skips[i].pop()], dim=1)
                h = run_checkpointed(blk, h, emb, policy=self.level_policies[i])
            if c.residual:
                h = h + self.stage_skips[i](stage_inputs[i])  # SiD2: one skip per stage
        return self.head(h)  # (B, C, H, W)
