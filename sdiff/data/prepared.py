"""Prepared datasets: an image folder decoded and center-cropped once (``sdiff data prepare``,
``sdiff.data.prepare``) and stored as memory-mapped uint8 shards, read by ``PreparedDataset``
with the items ``ImageFolderDataset`` gives for the same files, bit for bit.

Why this format. Training reads batches in an order that is a pure function of (seed, step)
(``sdiff.training.trainer.index_batches``: a fresh random permutation per epoch), so that a
resumed run sees exactly the batches an uninterrupted one would. That needs cheap random access
by index, with nothing left to compute per item:
- uint8 pixels in ``.npy`` shards, memory-mapped: item i is one contiguous C R R-byte slice at a
  known offset, so a batch is B copies out of the page cache (or B reads from disk) and no
  decoding at all. ``.npy`` keeps each shard self-describing (numpy's header holds its dtype
  and shape) and readable without sdiff: ``np.load(path, mmap_mode="r")``.
- Tar shards (webdataset) are made to be read front to back; their readers shuffle within a
  buffer, which is not the (seed, step) order, so resuming would mean replaying the stream, and
  random access would need an index and a seek per item anyway.
- A zip of PNGs (EDM2's dataset tool) gives random access but decodes a PNG per item: cheaper
  than a JPEG plus resizing, yet still CPU work per image that a raw array does not have.
The price is disk: C R^2 bytes per image, uncompressed. ImageNet's 1,281,167 training images
take 252 GB at 256 px, 63 GB at 128 px and 1.0 TB at 512 px (the JPEG folder: about 140 GB).
Pixels are stored channel-first, (N, C, R, R), the layout the model takes.

A prepared dataset is a folder:
- ``sdiff-prepared.json``, the manifest: ``format`` and ``version``; ``resolution``,
  ``channels``, ``count``; ``classes`` (label names, index = label) and ``labeled``; ``shards``
  (file, count, bytes, sha256 of each); ``labels`` and ``files`` (file, bytes, sha256);
  ``source`` (the folder's absolute path or ``bundled:<name>[:<count>]``, how many images it
  has, the ``limit``); ``crop`` (what was done to every image); ``skipped`` (source files left
  out by ``--skip-bad``, each with its reason); the sdiff version and the date that wrote it.
- ``images-00000.npy``, ``images-00001.npy``, ...: uint8 (n_k, C, R, R); items are numbered
  across the shards in order.
- ``labels.npy``: int64 (count,). ``files.txt``: item i's source file (relative to the source
  folder) on line i.
The manifest is written last and the folder renamed into place after it, so a folder with a
manifest is complete; shards without one are an unfinished prepare, refused as such.

Opening checks all that costs no pixel reading: the manifest parses and has every field, each
shard's size is the manifest's and its ``.npy`` header gives the manifest's shape and dtype, the
labels load and lie in range. A missing, truncated or corrupt shard or manifest is a ValueError
naming the file. Checksums (sha256 of every file) are compared only on request
(``verify=True``, ``verify_prepared``, ``sdiff data verify``): hashing 252 GB takes minutes and
opening must not.

Reading. ``PreparedDataset`` is map-style: ``dataset[i]`` is ``(float32 (C, R, R) in [-1, 1],
int label)`` and ``__getitems__(indices)`` reads a whole batch at once (one gather per shard
touched, one conversion to float), which ``torch.utils.data.DataLoader`` calls with each batch
of its ``batch_sampler``. With ``num_workers`` W > 0, worker k reads batches k, k + W, ... of
the trainer's (seed, step) order whole: worker-sharded streaming with the order unchanged. The
memory maps are opened lazily by each process on its first read and never pickled (pickling an
``np.memmap`` copies its data), so starting a worker costs nothing. There is no
``IterableDataset``: sequential reading is this dataset under a sequential batch sampler, and
an iterable dataset could not follow the (seed, step) order that exact resume needs.
Still use workers on a GPU (``check_num_workers``): with ``num_workers=0`` the training process
copies and converts every batch while the GPU waits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from sdiff.data.datasets import ImageFolderDataset

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "Manifest",
    "PreparedDataset",
    "check_num_workers",
    "file_sha256",
    "is_prepared",
    "read_manifest",
    "shard_name",
    "verify_prepared",
]

FORMAT = "sdiff-prepared"
VERSION = 1
MANIFEST = "sdiff-prepared.json"
LABELS = "labels.npy"
FILES = "files.txt"


def shard_name(k: int) -> str:
    return f"images-{k:05d}.npy"


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """The manifest of a prepared dataset (module docstring); ``to_dict`` is its JSON."""

    resolution: int
    channels: int
    count: int
    classes: list[str]
    labeled: bool
    shards: list[dict[str, Any]]  # {"file", "count", "bytes", "sha256"} each
    labels: dict[str, Any]  # {"file", "bytes", "sha256"}
    files: dict[str, Any]  # {"file", "bytes", "sha256"}
    source: dict[str, Any]  # {"path", "images", "limit"}
    crop: str
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"file", "reason"} each
    sdiff: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @property
    def image_bytes(self) -> int:
        return self.channels * self.resolution**2


# (type, must be positive or non-empty) of each manifest field
_FIELDS: dict[str, tuple[type, bool]] = {
    "resolution": (int, True), "channels": (int, True), "count": (int, True),
    "classes": (list, True), "labeled": (bool, False), "shards": (list, True),
    "labels": (dict, False), "files": (dict, False), "source": (dict, False),
    "crop": (str, False), "skipped": (list, False), "sdiff": (str, False),
    "created": (str, False),
}  # fmt: skip
_FILE_KEYS = {"file": str, "bytes": int, "sha256": str}


def _bad(path: Path, what: str) -> ValueError:
    return ValueError(f"prepared dataset manifest {path} {what}")


def _check_file_entry(entry: Any, path: Path, where: str, keys: dict[str, type]) -> None:
    if not isinstance(entry, dict):
        raise _bad(path, f"has a {where} that is not an object: {entry!r}")
    for key, tp in keys.items():
        value = entry.get(key)
        if not isinstance(value, tp) or isinstance(value, bool):
            raise _bad(path, f"has a {where} without a valid {key!r}: {entry!r}")
    name = entry["file"]
    if Path(name).name != name or name.startswith("."):
        raise _bad(path, f"names a file outside its folder in {where}: {name!r}")


def read_manifest(root: str | os.PathLike) -> Manifest:
    """The manifest of the prepared dataset in ``root``, its fields checked; a ValueError
    naming the manifest when it is missing, not JSON, of another format or version, or has a
    field missing or of the wrong type, or counts that do not add up."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise ValueError(f"prepared dataset {root} does not exist or is not a folder")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{root} is not a prepared dataset: {path} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _bad(path, f"is not valid JSON: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(path, f"is not an {FORMAT!r} manifest")
    if data.get("version") != VERSION:
        raise _bad(path, f"has version {data.get('version')!r}; this sdiff reads {VERSION}")
    for name, (tp, positive) in _FIELDS.items():
        value = data.get(name)
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise _bad(path, f"has no valid {name!r} field (got {value!r})")
        if positive and (value < 1 if tp is int else not value):
            raise _bad(path, f"has an empty or non-positive {name!r} ({value!r})")
    for i, shard in enumerate(data["shards"]):
        _check_file_entry(shard, path, f"shards[{i}]", {**_FILE_KEYS, "count": int})
        if shard["count"] < 1:
            raise _bad(path, f"has an empty shard {shard['file']!r}")
    _check_file_entry(data["labels"], path, "labels", _FILE_KEYS)
    _check_file_entry(data["files"], path, "files", _FILE_KEYS)
    total = sum(s["count"] for s in data["shards"])
    if total != data["count"]:
        raise _bad(path, f"says count {data['count']} but its shards hold {total} images")
    if data["channels"] not in (1, 3):
        raise _bad(path, f"has channels {data['channels']}; expected 1 or 3")
    if not all(isinstance(c, str) for c in data["classes"]):
        raise _bad(path, "has class names that are not strings")
    return Manifest(**{name: data[name] for name in _FIELDS})


def _check_size(root: Path, entry: dict[str, Any]) -> Path:
    path = root / entry["file"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ValueError(
            f"prepared dataset file {path} is missing (listed in its manifest)"
        ) from None
    if size != entry["bytes"]:
        raise ValueError(
            f"prepared dataset file {path} has {size} bytes, its manifest says "
            f"{entry['bytes']}: truncated or replaced"
        )
    return path


def _shard_offset(path: Path, shape: tuple[int, ...]) -> int:
    """Where the pixels of the ``.npy`` shard ``path`` start; a ValueError naming the file
    unless its header says uint8 of ``shape`` in C order and the file is exactly that long."""
    try:
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else (
                np.lib.format.read_array_header_2_0)  # fmt: skip
            found, fortran, dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as err:
        raise ValueError(f"prepared shard {path} has no valid .npy header: {err}") from None
    if tuple(found) != shape or fortran or dtype != np.uint8:
        raise ValueError(
            f"prepared shard {path} holds {dtype} {tuple(found)}"
            f"{' in Fortran order' if fortran else ''}; its manifest says uint8 {shape}"
        )
    if path.stat().st_size != offset + math.prod(shape):
        raise ValueError(f"prepared shard {path} is not the length its .npy header implies")
    return offset


def verify_prepared(root: str | os.PathLike) -> Manifest:
    """Open the prepared dataset in ``root`` (all of ``PreparedDataset``'s checks) and compare
    the sha256 of every file with its manifest: a ValueError naming the first file that
    differs. Returns the manifest."""
    root = Path(root)
    manifest = read_manifest(root)
    for entry in [*manifest.shards, manifest.labels, manifest.files]:
        path = _check_size(root, entry)
        if file_sha256(path) != entry["sha256"]:
            raise ValueError(
                f"prepared dataset file {path} does not match its manifest's sha256: corrupt"
            )
    PreparedDataset(root)  # headers and labels
    return manifest


def is_prepared(root: str | os.PathLike) -> bool:
    """Whether ``root`` holds a prepared dataset (its manifest). Shards without a manifest
    (an unfinished prepare, a damaged copy) are a ValueError, not an image folder."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return True
    if root.is_dir() and any(root.glob("images-*.npy")):
        raise ValueError(
            f"{root} holds prepared shards but no manifest {MANIFEST}: an unfinished "
            f"`sdiff data prepare` (run it again to finish it) or a damaged copy"
        )
    return False


def _raise_fd_limit(needed: int) -> None:
    """Each memory map keeps a file descriptor; lift the soft limit towards the hard one when
    a dataset has more shards than it leaves room for."""
    try:
        import resource
    except ImportError:  # not a Unix
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256  # headroom for everything else the process opens
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class PreparedDataset(Dataset):
    """A prepared dataset (module docstring) -> ((C, R, R) float32 in [-1, 1], label).

    ``resolution`` and ``channels``, when given (a run's ``data`` section), must be the
    manifest's. ``verify=True`` also compares every file's sha256 (slow: reads everything).
    Has ``classes``, ``num_classes``, ``labeled``, ``labels`` (int64 numpy, one per item) and
    ``manifest``; ``files`` lists each item's source file (read on first use).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        resolution: int | None = None,
        channels: int | None = None,
        verify: bool = False,
    ) -> None:
        self.root = Path(root)
        manifest = verify_prepared(self.root) if verify else read_manifest(self.root)
        where = self.root / MANIFEST
        for name, want in (("resolution", resolution), ("channels", channels)):
            have = getattr(manifest, name)
            if want is not None and want != have:
                raise ValueError(
                    f"data.{name} is {want} but the prepared dataset {self.root} has {have} "
                    f"({where}); prepare it again at {name} {want} or set data.{name}={have}"
                )
        self.manifest = manifest
        self.resolution, self.channels = manifest.resolution, manifest.channels
        self.classes = list(manifest.classes)
        self.labeled = manifest.labeled
        shape = (manifest.channels, manifest.resolution, manifest.resolution)
        self._shards = []  # (path, pixel offset, (n, C, R, R))
        for entry in manifest.shards:
            path = _check_size(self.root, entry)
            full = (entry["count"], *shape)
            self._shards.append((path, _shard_offset(path, full), full))
        self._starts = np.cumsum([0] + [s["count"] for s in manifest.shards])  # (shards + 1,)
        self.labels = self._read_labels(_check_size(self.root, manifest.labels))
        _check_size(self.root, manifest.files)
        self._files: list[str] | None = None
        self._maps: list[np.memmap] | None = None  # opened per process on first read

    def _read_labels(self, path: Path) -> np.ndarray:
        try:
            labels = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise ValueError(f"prepared labels {path} cannot be read: {err}") from None
        if labels.shape != (len(self),) or labels.dtype != np.int64:
            raise ValueError(
                f"prepared labels {path} are {labels.dtype} {labels.shape}; expected int64 "
                f"({len(self)},)"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"prepared labels {path} lie outside [0, {self.num_classes})")
        return labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def files(self) -> list[str]:
        """Item i's source file, relative to the source folder."""
        if self._files is None:
            path = self.root / FILES
            self._files = path.read_text(encoding="utf-8").splitlines()
            if len(self._files) != len(self):
                raise ValueError(f"{path} lists {len(self._files)} files for {len(self)} images")
        return self._files

    def __len__(self) -> int:
        return self.manifest.count

    def __getstate__(self) -> dict[str, Any]:
        # workers open their own maps: a pickled np.memmap would carry a copy of its data
        return {**self.__dict__, "_maps": None}

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            _raise_fd_limit(len(self._shards))
            self._maps = [np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
                          for path, offset, shape in self._shards]  # fmt: skip
        return self._maps

    def _indices(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = idx[(idx < -n) | (idx >= n)][0]
            raise IndexError(f"index {bad} out of range for a dataset of {n} images")
        return idx % n

    def read_uint8(self, indices: Sequence[int] | np.ndarray) -> Tensor:
        """The stored pixels of these items, uint8 (B, C, R, R), in the order given."""
        idx = self._indices(indices)
        shard = np.searchsorted(self._starts, idx, side="right") - 1  # (B,)
        maps = self._open()
        out = np.empty((len(idx), self.channels, self.resolution, self.resolution), np.uint8)
        for k in np.unique(shard):
            rows = np.flatnonzero(shard == k)
            out[rows] = maps[k][idx[rows] - self._starts[k]]
        return torch.from_numpy(out)

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """A whole batch in one read, as the list of items the DataLoader's collate expects."""
        # from_uint8's arithmetic (k / 127.5 - 1 in float32, so the same bits), in place: one
        # new batch-sized buffer instead of three, 2-3x faster at 256 px on a 2-core machine
        images = self.read_uint8(indices).to(torch.float32).div_(127.5).sub_(1.0)  # (B, C, R, R)
        labels = self.labels[self._indices(indices)].tolist()
        return list(zip(images.unbind(0), labels, strict=True))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.__getitems__([index])[0]


def check_num_workers(dataset: Dataset, device: torch.device | str, num_workers: int) -> None:
    """Warn when a dataset read from files (an image folder, a prepared dataset) feeds a CUDA
    device with ``num_workers=0``: the training process then decodes (or copies and converts)
    every batch while the GPU waits. The paper presets set train.num_workers=8."""
    if torch.device(device).type != "cuda" or num_workers > 0:
        return
    if isinstance(dataset, (ImageFolderDataset, PreparedDataset)):
        kind = "decodes" if isinstance(dataset, ImageFolderDataset) else "reads and converts"
        warnings.warn(
            f"train.num_workers=0 with {type(dataset).__name__} on CUDA: the training process "
            f"{kind} every batch while the GPU waits; set train.num_workers (e.g. 8)",
            stacklevel=2,
        )
