"""Building blocks shared by the U-Net and the U-ViT.

- ``ConditionEmbedding``: logSNR (and class label) -> one embedding vector per example.
  The logSNR enters through sinusoidal features of u = (2/pi) atan(exp(-lambda/2)), the time at
  which the unshifted cosine schedule reaches lambda; u is in (0, 1) for every finite lambda, so
  the features cover shifted schedules (lambda down to -20 and below) without retuning.
  Class labels are embedded with one extra row, the null class (index ``num_classes``), used
  when the label is dropped for classifier-free guidance.
- ``ResBlock``: GroupNorm, SiLU, 3x3 conv, GroupNorm modulated by the embedding (scale-shift,
  h * (1 + scale) + shift), SiLU, dropout (only where the model places it), 3x3 conv, residual.
- ``norm_modulate`` and ``groupnorm_silu``: the modulated norms of the U-ViT's transformer blocks
  and of the ResBlock, in PyTorch ops or (the model config's ``kernels="triton"``) each fused
  into one Triton kernel of ``sdiff.kernels``, from the same parameters.
- ``SelfAttention2d``: multi-head self-attention over the pixels of a feature map through
  ``sdiff.attention``.
- ``Downsample`` (3x3 conv, stride 2) and ``Upsample`` (nearest x2, 3x3 conv).
- ``InputStem`` and ``OutputHead``: the "downsample first" layers of simple diffusion: none,
  DWT (``levels``; sub-bands stacked on channels) or patching (p x p conv with stride p, and a
  transposed conv at the end).
Output layers are zero-initialised (as in ADM), so a new model predicts zeros.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdiff.models.attention import attention

DOWNSAMPLING = ("none", "dwt", "patch")
# The model configs' ``kernels``: the blocks' modulated norms in PyTorch ops, or fused in Triton.
KERNELS = ("torch", "triton")


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def groups_for(channels: int, groups: int) -> int:
    """GroupNorm groups: ``groups`` when it divides ``channels``, else the largest divisor below."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def _require_kernel(supported: bool, op: str, x: Tensor) -> None:
    """Raise, naming the config field, where ``kernels="triton"`` meets inputs ``op``'s kernel
    does not handle (a CPU without the interpreter, float64, ...)."""
    if not supported:
        raise ValueError(
            f"model.kernels='triton': the fused {op} kernel cannot take x {tuple(x.shape)} "
            f"{x.dtype} on {x.device} (it needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"triton is imported, in float32, float16 or bfloat16); use model.kernels='torch'"
        )


def norm_modulate(
    norm: nn.LayerNorm, h: Tensor, shift: Tensor, scale: Tensor, kernels: str = "torch"
) -> Tensor:
    """norm(h) * (1 + scale[:, None]) + shift[:, None], the adaLN modulation of a LayerNorm
    without affine: h (B, N, D), shift and scale (B, D). PyTorch ops, or with
    ``kernels="triton"`` one fused pass of ``sdiff.kernels.norm_modulate`` (same formula)."""
    if kernels != "triton":
        return norm(h) * (1 + scale[:, None]) + shift[:, None]  # (B, N, D)
    from sdiff.kernels import norm_modulate as kernel

    _require_kernel(kernel.supports(h, shift, scale), "norm_modulate", h)
    return kernel.norm_modulate(h, shift, scale, norm.eps)


def groupnorm_silu(
    norm: nn.GroupNorm, h: Tensor, scale: Tensor, shift: Tensor, kernels: str = "torch"
) -> Tensor:
    """SiLU(norm(h) * (1 + scale) + shift), the ResBlock's second norm conditioned on the
    embedding: h (B, C, H, W), scale and shift (B, C). PyTorch ops, or with ``kernels="triton"``
    one fused pass of ``sdiff.kernels.groupnorm_silu`` with the GroupNorm's weight and bias."""
    if kernels != "triton":
        return F.silu(norm(h) * (1 + scale[:, :, None, None]) + shift[:, :, None, None])
    from sdiff.kernels import groupnorm_silu as kernel

    args = (h, norm.weight, norm.bias, scale, shift, norm.num_groups)
    _require_kernel(kernel.supports(*args), "groupnorm_silu", h)
    return kernel.groupnorm_silu(*args, norm.eps)


def logsnr_features(logsnr: Tensor, dim: int) -> Tensor:
    """(B,) logSNR -> (B, dim) sinusoidal features of 1000 u, u = (2/pi) atan(exp(-lambda/2))."""
    u = torch.atan(torch.exp(-logsnr.float() / 2)) * (2 / math.pi)  # (B,) in (0, 1)
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=u.device) / half)  # (half,)
    angles = 1000 * u[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


class ConditionEmbedding(nn.Module):
    """logSNR features -> MLP, plus a class embedding with a null row for guidance."""

    def __init__(self, emb_dim: int, num_classes: int = 0, feature_dim: int = 256) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.mlp = nn.Sequential(
            nn.Linear(feature_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.classes = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None

    def forward(self, logsnr: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.mlp(logsnr_features(logsnr, self.feature_dim).to(self.mlp[0].weight.dtype))
        if self.classes is None:
            if labels is not None:
                raise ValueError("this model is unconditional (num_classes=0) but got labels")
            return emb  # (B, emb_dim)
        if labels is None:  # no label: the null class, i.e. the unconditional model
            labels = torch.full((logsnr.shape[0],), self.num_classes, device=logsnr.device)
        return emb + self.classes(labels)  # (B, emb_dim)


class ResBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        *,
        dropout: float = 0.0,
        groups: int = 32,
        resolution: int | None = None,
        kernels: str = "torch",
    ) -> None:
        super().__init__()
        self.resolution = resolution  # feature-map side, for reports and tests
        self.kernels = kernels  # norm2 + modulation + SiLU: PyTorch ops or one Triton kernel
        self.norm1 = nn.GroupNorm(groups_for(in_ch, groups), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups_for(out_ch, groups), out_ch)
        # dropout exists only where configured (simple diffusion: low resolutions only)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, H, W)
        scale, shift = self.emb(F.silu(emb)).chunk(2, dim=1)  # (B, out) each
        h = groupnorm_silu(self.norm2, h, scale, shift, self.kernels)
        h = self.conv2(self.dropout(h))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    def __init__(
        self, channels: int, head_dim: int, *, groups: int = 32, backend: str = "auto"
    ) -> None:
        super().__init__()
        if channels % head_dim:
            raise ValueError(f"attention head_dim {head_dim} does not divide the width {channels}")
        self.heads, self.backend = channels // head_dim, backend
        self.norm = nn.GroupNorm(groups_for(channels, groups), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # the 1x1 convolutions as matrix products over the pixels' channel vectors (the same
        # weights, viewed (out, in)): GEMMs on (B, HW, C) tokens, 1.07-1.25x the whole module
        # on CPU against 1x1 convs. The qkv product comes out token-major, so q, k and v are
        # views with head_dim innermost, the layout SDPA's fused CPU and CUDA kernels read (a
        # transposed view sends PyTorch to its math path, B x heads x HW x HW probabilities)
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)  # (B, HW, 3C)
        qkv = qkv.view(b, h * w, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, HW, head_dim)
        out = attention(q, k, v, backend=self.backend)  # (B, heads, HW, head_dim)
        out = out.transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


def input_factor(downsample: str, dwt_levels: int, patch_size: int) -> int:
    """How much the first layer shrinks the image side."""
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"unknown downsampling {downsample!r}; choose one of {list(DOWNSAMPLING)}")
    if downsample == "dwt":
        if dwt_levels < 1:
            raise ValueError(f"dwt_levels must be >= 1; got {dwt_levels}")
        return 2**dwt_levels
    if downsample == "patch":
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1; got {patch_size}")
        return patch_size
    return 1


class InputStem(nn.Module):
    """Image (B, C, H, W) -> features (B, width, H/f, W/f) by none, DWT or patching."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        downsample: str = "none",
        *,
        wavelet: str = "haar",
        dwt_levels: int = 1,
        patch_size: int = 2,
    ) -> None:
        super().__init__()
        self.factor = input_factor(downsample, dwt_levels, patch_size)
        self.dwt = None
        if downsample == "patch":
            self.conv = nn.Conv2d(in_channels, width, patch_size, stride=patch_size)
        else:
            if downsample == "dwt":
                from sdiff.models.wavelets import DWT

                self.dwt = DWT(wavelet, dwt_levels)
            self.conv = nn.Conv2d(in_channels * self.factor**2, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.dwt is not None:
            x = self.dwt(x)  # (B, C * 4^L, H / 2^L, W / 2^L)
        return self.conv(x)


class OutputHead(nn.Module):
    """Features (B, width, h, w) -> image (B, C, h f, w f), the inverse of ``InputStem``."""

    def __init__(
        self,
        width: int,
        out_channels: int,
        downsample: str = "none",
        *,
        wavelet: str = "haar",
        dwt_levels: int = 1,
        patch_size: int = 2,
        groups: int = 32,
    ) -> None:
        super().__init__()
        factor = input_factor(downsample, dwt_levels, patch_size)
        self.norm = nn.GroupNorm(groups_for(width, groups), width)
        self.idwt = None
        if downsample == "patch":
            self.conv = zero_(
                nn.ConvTranspose2d(width, out_channels, patch_size, stride=patch_size)
            )
        else:
            if downsample == "dwt":
                from sdiff.models.wavelets import IDWT

                self.idwt = IDWT(wavelet, dwt_levels)
            self.conv = zero_(nn.Conv2d(width, out_channels * factor**2, 3, padding=1))

    def forward(self, h: Tensor) -> Tensor:
        out = self.conv(F.silu(self.norm(h)))
        return self.idwt(out) if self.idwt is not None else out
