"""Differentiable 2-D discrete wavelet transform (DWT) and its exact inverse, batched, in torch.

Used as the first and last layer of a pixel-space U-Net (simple diffusion, arXiv
2301.11093, "Avoiding high resolution feature maps"): ``dwt2`` turns a (B, C, H, W) image into
(B, C * 4**L, H / 2**L, W / 2**L) wavelet coefficients, so the network's first convolution
already runs at a lower resolution, and ``idwt2`` maps the network's output back. Both are pure
torch ops: differentiable, any floating dtype, any device (``meta`` included, for shape-only
FLOP counts), no data-dependent control flow, so they trace under
``torch.compile(fullgraph=True)``.

Wavelets (``WAVELETS``):
- ``"haar"``: orthonormal Haar. For a 2x2 block [a b; c d] the four coefficients are
  LL = (a + b + c + d) / 2, LH = (a + b - c - d) / 2, HL = (a - b + c - d) / 2,
  HH = (a - b - c + d) / 2. The transform is orthogonal, so sums of squares are kept and white
  unit Gaussian noise stays white unit Gaussian. This is what makes it safe for diffusion: with
  W orthogonal, W z_t = alpha W x + sigma W eps and W eps ~ N(0, I), so the noisy image in the
  wavelet domain is the same variance-preserving process with the same alpha, sigma and logSNR;
  schedules, loss weightings and samplers need no change, and activations keep their scale.
- ``"legall53"``: the LeGall 5/3 (CDF 5/3) wavelet of lossless JPEG2000, PyWavelets'
  ``"bior2.2"``. Computed with the lifting scheme on the even/odd samples e[n] = x[2n],
  o[n] = x[2n + 1] of each row (then column):
      predict  d[n] = o[n] - (e[n] + e[n + 1]) / 2
      update   s[n] = e[n] + (d[n - 1] + d[n]) / 4
  with whole-sample symmetric extension at both ends as in JPEG2000 (x[-k] = x[k],
  x[N - 1 + k] = x[N - 1 - k]; hence e[N/2] = e[N/2 - 1] and d[-1] = d[0]), so N samples give
  exactly N/2 low and N/2 high coefficients and the inverse (the same steps undone in reverse
  order) reconstructs exactly. The filters are biorthogonal, not orthogonal: white unit noise
  comes out with interior variances LL 2.07, LH and HL 1.08, HH 0.56 (products of the 1-D
  gains 23/16 and 3/4), and neighbouring coefficients are correlated.

Normalisation (both wavelets, 1-D, applied per axis): low = ``LOW_GAIN`` * s with
``LOW_GAIN = sqrt(2)`` and high = ``HIGH_GAIN`` * d with ``HIGH_GAIN = -1 / sqrt(2)``. Haar in
lifting form is d = o - e, s = e + d / 2, so this is the orthonormal Haar above; for both, the DC
gain is sqrt(2) per axis, so a constant image c has LL = 2**L * c after L levels. The minus sign
makes every coefficient equal PyWavelets' (whose Haar high-pass is (e - o) / sqrt(2)).

Agreement with PyWavelets (tested in tests/test_wavelets.py), for one level and
``cA, (cH, cV, cD) = pywt.dwt2(x, w)`` over the last two axes:
- Haar: ``w = "haar"``, any mode; our LL, LH, HL, HH equal cA, cH, cV, cD exactly (same sign).
- LeGall 5/3: ``w = "bior2.2"`` with ``mode="reflect"`` (PyWavelets' name for whole-sample
  symmetric extension). PyWavelets returns N/2 + 2 coefficients per axis; ours are its slice
  ``[1 : N/2 + 1]`` on both axes, equal to it everywhere, boundaries included, with scale 1 and
  the same sign. With ``mode="symmetric"`` (half-sample; same slice) or
  ``mode="periodization"`` (N/2 coefficients, no slice) only the first and last coefficient
  on each axis differ.
Multi-level Haar equals ``pywt.wavedec2(x, "haar", level=L)``; multi-level 5/3 equals
``pywt.dwt2(..., mode="reflect")`` sliced as above and applied again to cA, level by level.

Band names follow JPEG2000: the first letter is the filter along W (horizontal), the second
along H (vertical). LH (low along W, high along H) responds to horizontal edges and is
PyWavelets' cH; HL is cV; HH is cD. Rows (along W) are filtered first, then columns.

Channel layout, band-major. One level: output channels are [LL of channels 0..C-1,
LH of 0..C-1, HL of 0..C-1, HH of 0..C-1], i.e. band b in (LL, LH, HL, HH) = (0, 1, 2, 3) of
input channel c is output channel b * C + c. Several levels L: the transform recurses on LL,
and level l's details (l = 1 finest, l = L coarsest; resolution H / 2**l) are brought down to
the coarsest resolution h = H / 2**L by ``pixel_unshuffle`` with r = 2**(L - l) and stacked,
coarsest first:

    [LL_L, LH_L, HL_L, HH_L | details of level L-1 | ... | details of level 1]
      C    C     C     C      3C * 4                       3C * 4**(L-1)      channels

so the first C channels are the coarsest LL. Level l's details occupy channels
[C * 4**(L - l), C * 4**(L - l + 1)); within them, band b in (LH, HL, HH) = (0, 1, 2) of input
channel c at pixel (y * r + i, x * r + j) of level l is output channel
C * 4**(L - l) + ((b * C + c) * r + i) * r + j at position (y, x) (``pixel_unshuffle``'s order).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["DWT", "HIGH_GAIN", "IDWT", "LOW_GAIN", "WAVELETS", "dwt2", "idwt2"]

WAVELETS: tuple[str, ...] = ("haar", "legall53")

# Per-axis scale of the lifting outputs (module docstring, "Normalisation"): DC gain sqrt(2) as
# in orthonormal Haar, and the sign of PyWavelets' high-pass filters.
LOW_GAIN = math.sqrt(2.0)
HIGH_GAIN = -1.0 / math.sqrt(2.0)


def _check_args(wavelet: str, levels: int) -> None:
    if wavelet not in WAVELETS:
        raise ValueError(f"unknown wavelet {wavelet!r}; known wavelets: {list(WAVELETS)}")
    # bool is an int subclass, but True levels is a bug, not a request for one level.
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an integer >= 1; got {levels!r}")


def _check_tensor(x: Tensor, name: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} expects a 4-D (B, C, H, W) tensor; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} expects a floating-point tensor; got dtype {x.dtype}")


# --- 1-D transforms along one axis (dim = -1 for W, -2 for H) ---------------------------------


def _split(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Even and odd samples along dim: (..., N, ...) -> 2 x (..., N/2, ...)."""
    even, odd = x.unflatten(dim, (-1, 2)).unbind(dim)
    return even, odd


def _merge(even: Tensor, odd: Tensor, dim: int) -> Tensor:
    """Inverse of _split: interleave 2 x (..., N/2, ...) -> (..., N, ...)."""
    return torch.stack((even, odd), dim=dim).flatten(dim - 1, dim)


def _next(v: Tensor, dim: int) -> Tensor:
    """v[n + 1] with v[N/2] := v[N/2 - 1]: for the even samples this is the whole-sample
    symmetric extension x[N] = x[N - 2]."""
    n = v.shape[dim]
    return torch.cat((v.narrow(dim, 1, n - 1), v.narrow(dim, n - 1, 1)), dim=dim)


def _prev(v: Tensor, dim: int) -> Tensor:
    """v[n - 1] with v[-1] := v[0]: for the details this is d[-1] = x[1] - (x[0] + x[2]) / 2
    = d[0] under the symmetric extension x[-k] = x[k]."""
    n = v.shape[dim]
    return torch.cat((v.narrow(dim, 0, 1), v.narrow(dim, 0, n - 1)), dim=dim)


def _analysis(x: Tensor, wavelet: str, dim: int) -> tuple[Tensor, Tensor]:
    """One 1-D level along dim: (..., N, ...) -> low, high, each (..., N/2, ...)."""
    even, odd = _split(x, dim)
    if wavelet == "haar":
        # Lifting d = o - e, s = e + d / 2 = (e + o) / 2, scaled: (e + o) / sqrt2, (e - o) / sqrt2.
        return (even + odd) * (LOW_GAIN / 2), (odd - even) * HIGH_GAIN
    detail = odd - (even + _next(even, dim)) / 2  # predict
    smooth = even + (_prev(detail, dim) + detail) / 4  # update
    return smooth * LOW_GAIN, detail * HIGH_GAIN


def _synthesis(low: Tensor, high: Tensor, wavelet: str, dim: int) -> Tensor:
    """Inverse of _analysis: low, high (..., N/2, ...) -> (..., N, ...)."""
    if wavelet == "haar":
        # low = (e + o) / sqrt2 and high = (e - o) / sqrt2, so e, o = (low +- high) / sqrt2.
        scale = 1.0 / math.sqrt(2.0)
        return _merge((low + high) * scale, (low - high) * scale, dim)
    smooth, detail = low / LOW_GAIN, high / HIGH_GAIN
    even = smooth - (_prev(detail, dim) + detail) / 4  # undo update
    odd = detail + (even + _next(even, dim)) / 2  # undo predict
    return _merge(even, odd, dim)


# --- one 2-D level -------------------------------------------------------------------------------


def _dwt_level(x: Tensor, wavelet: str) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), bands [LL, LH, HL, HH] band-major."""
    low_w, high_w = _analysis(x, wavelet, dim=-1)  # (B, C, H, W/2) each
    ll, lh = _analysis(low_w, wavelet, dim=-2)  # (B, C, H/2, W/2): low along W, low / high along H
    hl, hh = _analysis(high_w, wavelet, dim=-2)  # (B, C, H/2, W/2): high along W
    return torch.cat((ll, lh, hl, hh), dim=1)  # (B, 4C, H/2, W/2)


def _idwt_level(y: Tensor, wavelet: str) -> Tensor:
    """(B, 4C, h, w) -> (B, C, 2h, 2w), inverse of _dwt_level."""
    ll, lh, hl, hh = y.chunk(4, dim=1)  # (B, C, h, w) each
    low_w = _synthesis(ll, lh, wavelet, dim=-2)  # (B, C, 2h, w)
    high_w = _synthesis(hl, hh, wavelet, dim=-2)  # (B, C, 2h, w)
    return _synthesis(low_w, high_w, wavelet, dim=-1)  # (B, C, 2h, 2w)


# --- space-to-depth ---------------------------------------------------------------------------


def _space_to_depth(x: Tensor, r: int) -> Tensor:
    """(B, K, h r, w r) -> (B, K r^2, h, w) in ``pixel_unshuffle``'s channel order
    (k r^2 + i r + j for offset (i, j)). Written out because torch's CPU pixel_(un)shuffle
    returns an empty batch unchanged instead of reshaped."""
    b, k, hr, wr = x.shape
    x = x.reshape(b, k, hr // r, r, wr // r, r)  # (B, K, h, r, w, r)
    return x.permute(0, 1, 3, 5, 2, 4).reshape(b, k * r * r, hr // r, wr // r)


def _depth_to_space(y: Tensor, r: int) -> Tensor:
    """Inverse of _space_to_depth: (B, K r^2, h, w) -> (B, K, h r, w r)."""
    b, kr2, h, w = y.shape
    y = y.reshape(b, kr2 // (r * r), r, r, h, w)  # (B, K, r, r, h, w)
    return y.permute(0, 1, 4, 2, 5, 3).reshape(b, kr2 // (r * r), h * r, w * r)


# --- public API ----------------------------------------------------------------------------------


def dwt2(x: Tensor, wavelet: str = "haar", levels: int = 1) -> Tensor:
    """L-level 2-D DWT: (B, C, H, W) -> (B, C * 4**L, H // 2**L, W // 2**L).

    H and W must be divisible by 2**L. Channel layout and normalisation: module docstring.
    """
    _check_args(wavelet, levels)
    _check_tensor(x, "dwt2")
    height, width = x.shape[-2:]
    factor = 2**levels
    if height % factor or width % factor:
        raise ValueError(
            f"image of {height}x{width} cannot take {levels} DWT levels: "
            f"both sides must be divisible by {factor}"
        )
    channels = x.shape[1]
    ll = x
    details = []  # level l = 1..L: (B, 3C, H / 2**l, W / 2**l)
    for _ in range(levels):
        bands = _dwt_level(ll, wavelet)  # (B, 4C, h, w)
        ll, detail = bands.split((channels, 3 * channels), dim=1)
        details.append(detail)
    out = [ll]  # coarsest first
    for level in range(levels, 0, -1):
        r = 2 ** (levels - level)
        detail = details[level - 1]
        out.append(_space_to_depth(detail, r) if r > 1 else detail)  # (B, 3C r^2, h_L, w_L)
    return torch.cat(out, dim=1)  # (B, C * 4**L, H / 2**L, W / 2**L)


def idwt2(y: Tensor, wavelet: str = "haar", levels: int = 1) -> Tensor:
    """Exact inverse of ``dwt2``: (B, C * 4**L, h, w) -> (B, C, h * 2**L, w * 2**L)."""
    _check_args(wavelet, levels)
    _check_tensor(y, "idwt2")
    total = y.shape[1]
    if total % 4**levels:
        raise ValueError(
            f"idwt2 with {levels} levels needs a channel count divisible by 4**{levels} = "
            f"{4**levels}; got {total} channels (shape {tuple(y.shape)})"
        )
    channels = total // 4**levels
    # Channel blocks as laid out by dwt2: LL_L, then level l = L, L-1, ..., 1 details.
    sizes = [channels] + [3 * channels * 4 ** (levels - level) for level in range(levels, 0, -1)]
    ll, *details = y.split(sizes, dim=1)
    for level in range(levels, 0, -1):
        r = 2 ** (levels - level)
        detail = details[levels - level]  # (B, 3C r^2, h, w)
        detail = _depth_to_space(detail, r) if r > 1 else detail  # (B, 3C, h r, w r)
        ll = _idwt_level(torch.cat((ll, detail), dim=1), wavelet)  # (B, C, 2 h r, 2 w r)
    return ll


class DWT(torch.nn.Module):
    """``dwt2`` as a layer without parameters: (B, C, H, W) -> (B, C * 4**L, H/2**L, W/2**L)."""

    def __init__(self, wavelet: str = "haar", levels: int = 1) -> None:
        super().__init__()
        _check_args(wavelet, levels)
        self.wavelet = wavelet
        self.levels = levels

    def forward(self, x: Tensor) -> Tensor:
        return dwt2(x, self.wavelet, self.levels)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, levels={self.levels}"


class IDWT(torch.nn.Module):
    """``idwt2`` as a layer without parameters: (B, C * 4**L, h, w) -> (B, C, h 2**L, w 2**L)."""

    def __init__(self, wavelet: str = "haar", levels: int = 1) -> None:
        super().__init__()
        _check_args(wavelet, levels)
        self.wavelet = wavelet
        self.levels = levels

    def forward(self, y: Tensor) -> Tensor:
        return idwt2(y, self.wavelet, self.levels)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet!r}, levels={self.levels}"
