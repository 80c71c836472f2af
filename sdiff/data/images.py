"""Image conversion and I/O shared by training, sampling and evaluation.

Conventions:
- Model space is float in [-1, 1], laid out (N, C, H, W). Pixel space is uint8 in [0, 255].
  ``to_uint8`` maps x -> round((x + 1) * 127.5) after clamping to [-1, 1] (round half to even,
  which only matters at exact .5 values that no uint8 level maps to); ``from_uint8`` maps
  k -> k / 127.5 - 1 in float32, the same arithmetic as guided-diffusion's
  ``arr.astype(np.float32) / 127.5 - 1``. The round trip is exact on all 256 levels.
- PNG files are written atomically: a temporary file in the destination folder, then
  ``os.replace``, so a crash or a concurrent reader never sees a half-written image.
- ``save_folder`` names images by index, zero-padded to ``digits`` places (``000123.png``), so
  lexicographic order is index order; an index that does not fit raises instead of breaking it.
- ``load_image`` forces PIL to decode every pixel, so a truncated or corrupt file fails here with
  ``ValueError("cannot read image <path>: <reason>")`` rather than later inside a worker.
  (It cannot catch truncation if some other code sets ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``.)
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdiff.util.files import atomic_write_with

__all__ = [
    "from_uint8",
    "load_image",
    "make_grid",
    "save_folder",
    "save_grid",
    "to_uint8",
]


def to_uint8(x: Tensor) -> Tensor:
    """Model-space images in [-1, 1] -> uint8 with the same shape, e.g. (N, C, H, W).

    Values outside [-1, 1] are clamped (samplers may overshoot); NaN raises, since writing it as
    some arbitrary gray level would hide a diverged model.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"to_uint8 expects a floating-point tensor in [-1, 1]; got {_describe(x)}")
    if bool(torch.isnan(x).any()):
        raise ValueError("to_uint8: images contain NaN values")
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: Tensor | np.ndarray) -> Tensor:
    """uint8 pixels (any shape) -> float32 in [-1, 1] (k / 127.5 - 1); inverse of ``to_uint8``."""
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8:
        raise ValueError(f"from_uint8 expects uint8 pixels; got {_describe(x)}")
    return x.to(torch.float32) / 127.5 - 1.0


def _describe(x: object) -> str:
    if isinstance(x, (Tensor, np.ndarray)):
        return f"{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    return type(x).__name__


def _as_uint8_batch(images: Tensor) -> Tensor:
    """(N, C, H, W) float in [-1, 1] or uint8 -> uint8 on the CPU, C in {1, 3}."""
    if not isinstance(images, Tensor):
        raise ValueError(f"expected a tensor of images (N, C, H, W); got {_describe(images)}")
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (N, C, H, W); got shape {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 (gray) or 3 (RGB) channels; got {images.shape[1]}")
    if images.shape[0] == 0:
        raise ValueError("no images given (N = 0)")
    if images.dtype == torch.uint8:
        return images.detach().cpu()
    return to_uint8(images.detach()).cpu()


def make_grid(
    images: Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 0
) -> Tensor:
    """Tile (N, C, H, W) images (float in [-1, 1] or uint8) into one uint8 (C, H', W') grid.

    ``nrow`` images per row (default ceil(sqrt(N))); the last row is filled with ``pad_value``.
    Every tile has ``padding`` pixels around it and between neighbours, as in torchvision:
    H' = rows (H + padding) + padding, W' = cols (W + padding) + padding.
    """
    images = _as_uint8_batch(images)  # (N, C, H, W) uint8
    n, c, h, w = images.shape
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if isinstance(nrow, bool) or not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow must be a positive integer; got {nrow!r}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be a non-negative integer; got {padding!r}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value must be a uint8 level in [0, 255]; got {pad_value!r}")
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = torch.full(
        (c, rows * (h + padding) + padding, cols * (w + padding) + padding),
        pad_value,
        dtype=torch.uint8,
    )
    for k in range(n):
        top = (k // cols) * (h + padding) + padding
        left = (k % cols) * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[k]
    return grid


def _to_pil(image: Tensor) -> Image.Image:
    """One uint8 (C, H, W) image, C in {1, 3} -> PIL "L" or "RGB"."""
    arr = image.permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    return Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)


def _write_png_atomic(image: Image.Image, path: Path) -> None:
    atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def _png_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"images are saved as PNG; the path must end in .png: {path}")
    return path


def save_grid(images: Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    """Write ``make_grid(images, nrow)`` to ``path`` (.png) atomically: gray for C=1, RGB for C=3.

    Creates the parent folder if needed and returns the path.
    """
    path = _png_path(path)
    grid = make_grid(images, nrow)  # (C, H', W') uint8
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_png_atomic(_to_pil(grid), path)
    return path


def save_folder(
    images: Tensor,
    folder: str | os.PathLike,
    start_index: int = 0,
    prefix: str = "",
    digits: int = 6,
) -> list[Path]:
    """Write each of the (N, C, H, W) images to ``folder/{prefix}{index:0{digits}d}.png``.

    Indices run from ``start_index``, so batches saved one after another with a running index
    give one folder whose sorted listing is the sample order (what FID reference folders need).
    """
    if isinstance(start_index, bool) or not isinstance(start_index, int) or start_index < 0:
        raise ValueError(f"start_index must be a non-negative integer; got {start_index!r}")
    if os.sep in prefix or (os.altsep and os.altsep in prefix):
        raise ValueError(f"prefix must not contain a path separator; got {prefix!r}")
    images = _as_uint8_batch(images)  # (N, C, H, W) uint8
    last = start_index + images.shape[0] - 1
    if len(str(last)) > digits:
        raise ValueError(
            f"index {last} needs more than {digits} digits; pass a larger `digits` so that "
            "file names still sort in index order"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, image in enumerate(images):
        path = folder / f"{prefix}{start_index + k:0{digits}d}.png"
        _write_png_atomic(_to_pil(image), path)
        paths.append(path)
    return paths


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Read and fully decode an image file; returns a PIL image in ``mode`` ("RGB" or "L").

    Alpha is dropped (as guided-diffusion's ``convert("RGB")`` does); 16-bit gray images are
    scaled to 8 bits (PIL's own conversion would clip them). Any failure to open or decode
    raises ``ValueError("cannot read image <path>: <reason>")``.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"load_image mode must be 'RGB' or 'L'; got {mode!r}")
    try:
        with Image.open(path) as img:
            img.load()  # decode every pixel now: catches truncated and corrupt files
            if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                arr = np.asarray(img, dtype=np.float64) / 257.0  # 16-bit range -> 8-bit
                img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
            return img.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # UnidentifiedImageError and "image file is truncated" are OSErrors.
        reason = str(e) or type(e).__name__
        raise ValueError(f"cannot read image {path}: {reason}") from e
