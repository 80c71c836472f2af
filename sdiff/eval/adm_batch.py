"""Generated images as an ADM sample batch: the ``.npz`` that OpenAI's ADM evaluation suite reads.

    sdiff eval --run runs/uvit --n 50000 --save-npz samples.npz
    sdiff sample --run runs/uvit --n 50000 --npz samples.npz

ADM (Dhariwal & Nichol 2021, arXiv 2105.05233) evaluates a batch of samples given as an
``.npz`` whose ``arr_0`` holds the images, uint8 (N, H, W, C), and, for a class-conditional
model, ``arr_1`` their int64 labels (N,): the file ``np.savez(path, images, labels)`` writes.
At 50k images of 512 px that is 39 GB, so it is never built in memory: ``NpzImageWriter``
writes the ``.npy`` header first (the shape is known before sampling starts), then the images
chunk by chunk into the zip entry (stored, ZIP64), into a temporary file beside the target
that is renamed when complete (a reader sees no file or the whole one): the temporary name and
rename of ``sdiff.util.files.atomic_write_with``, held open across the chunks.

Under torchrun (``SampleBatchSink``) each process appends its chunks, in the order it draws
them, to a part file beside the target; once all are written, rank 0 streams the parts into
the ``.npz`` in global chunk order (chunk c of ``sdiff.eval.sample`` is the
(c // W)-th chunk of rank c mod W's part) and removes them. The parts must therefore lie on a
file system every process sees (on one machine, any folder). With one process the chunks go
straight into the ``.npz``.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

from sdiff.eval.distributed import SINGLE, World, barrier
from sdiff.util.files import naming

__all__ = ["NpzImageWriter", "SampleBatchSink", "part_path"]


class NpzImageWriter:
    """Writes ``arr_0`` (uint8 ``shape`` = (N, H, W, C)) of an ``.npz`` chunk by chunk, then
    ``arr_1`` (labels) on ``close``, which renames the finished file into place."""

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int, int]) -> None:
        self.path = Path(path)
        if self.path.suffix != ".npz":
            raise ValueError(f"the sample batch path must end in .npz; got {str(self.path)!r}")
        self.shape, self.written = tuple(shape), 0
        self.tmp = self.path.with_name(f".{self.path.stem}.{os.getpid()}.tmp.npz")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._zip = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
        self._entry: IO[bytes] | None = self._zip.open("arr_0.npy", "w", force_zip64=True)
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                  "fortran_order": False, "shape": self.shape}  # fmt: skip
        np.lib.format.write_array_header_1_0(self._entry, header)

    def write(self, images: np.ndarray) -> None:
        """Append uint8 images (b, H, W, C), in order."""
        if images.dtype != np.uint8 or images.shape[1:] != self.shape[1:]:
            raise ValueError(
                f"sample batch images must be uint8 (b, {', '.join(map(str, self.shape[1:]))}); "
                f"got {images.dtype} {images.shape}"
            )
        if self.written + len(images) > self.shape[0]:
            raise ValueError(f"more than the {self.shape[0]} images the sample batch holds")
        try:
            self._entry.write(np.ascontiguousarray(images).reshape(-1).data)
        except OSError as err:
            raise naming(err, self.path) from err
        self.written += len(images)

    def close(self, labels: np.ndarray | None = None) -> Path:
        """Finish ``arr_0``, add ``arr_1`` (int64 labels) when given, and rename into place."""
        if self.written != self.shape[0]:
            raise ValueError(f"sample batch has {self.written} of its {self.shape[0]} images")
        try:
            self._entry.close()
            self._entry = None
            if labels is not None:
                labels = np.asarray(labels, dtype=np.int64)
                if labels.shape != (self.shape[0],):
                    raise ValueError(f"need {self.shape[0]} labels; got shape {labels.shape}")
                with self._zip.open("arr_1.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, labels)
            self._zip.close()
            os.replace(self.tmp, self.path)
        except OSError as err:
            raise naming(err, self.path) from err
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Drop the unfinished file (nothing once ``close`` has renamed it)."""
        try:
            if self._entry is not None:
                self._entry.close()
                self._entry = None
            self._zip.close()
        except (OSError, ValueError):
            pass  # a full disk may fail the close too; the file goes anyway
        self.tmp.unlink(missing_ok=True)


def part_path(path: str | os.PathLike, world: World) -> Path:
    """This process's part file for the sample batch ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.part{world.rank}-of-{world.size}")


def _hwc(images: Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()  # (b, C, H, W) -> (b, H, W, C)


class SampleBatchSink:
    """``sdiff.eval.sample``'s chunks of ``n`` images (C, H, W) into the sample batch ``path``,
    from every process of ``world`` (module docstring). ``add`` each of this process's chunks
    in order, then ``finish`` on every process (a collective) or ``abort``."""

    def __init__(
        self,
        path: str | os.PathLike,
        n: int,
        batch_size: int,
        image_shape: tuple[int, int, int],
        world: World = SINGLE,
    ) -> None:
        self.path, self.n, self.batch_size, self.world = Path(path), n, batch_size, world
        c, h, w = image_shape
        self.shape = (n, h, w, c)
        if world.size == 1:
            self.writer: NpzImageWriter | None = NpzImageWriter(path, self.shape)
            self.part = None
        else:
            self.writer = None
            self.part = part_path(path, world)
            self.part.parent.mkdir(parents=True, exist_ok=True)
            self._file: IO[bytes] | None = open(self.part, "wb")

    def add(self, images: Tensor) -> None:
        """This process's next chunk, uint8 (b, C, H, W)."""
        if images.dtype != torch.uint8:
            raise ValueError(f"sample batch images must be uint8; got {images.dtype}")
        if self.writer is not None:
            self.writer.write(_hwc(images))
        else:
            self._file.write(_hwc(images).reshape(-1).data)

    def finish(self, labels: Tensor | None) -> Path:
        """Complete the ``.npz`` (rank 0 merges the parts); every process calls it."""
        if self.writer is not None:
            return self.writer.close(None if labels is None else labels.numpy())
        self._file.close()
        self._file = None
        barrier(self.world)  # every part is complete
        if self.world.main:
            self._merge(labels)
        barrier(self.world)  # rank 0 has read the parts: the others may remove theirs
        self.abort()
        return self.path

    def _merge(self, labels: Tensor | None) -> None:
        size = self.world.size
        parts = [part_path(self.path, World(r, size)) for r in range(size)]
        missing = [str(p) for p in parts if not p.is_file()]
        if missing:
            raise ValueError(
                f"sample batch part files {missing} not found: the .npz must lie on a file "
                f"system every process sees"
            )
        per_image = int(np.prod(self.shape[1:]))
        writer = NpzImageWriter(self.path, self.shape)
        files = [open(p, "rb") for p in parts]
        try:
            for start in range(0, self.n, self.batch_size):  # chunk c = start // batch_size
                b = min(self.batch_size, self.n - start)
                chunk_rank = (start // self.batch_size) % size
                data = files[chunk_rank].read(b * per_image)
                if len(data) != b * per_image:
                    raise ValueError(f"sample batch part {parts[chunk_rank]} ends early")
                writer.write(np.frombuffer(data, np.uint8).reshape(b, *self.shape[1:]))
            writer.close(None if labels is None else labels.numpy())
        finally:
            writer.abort()
            for f in files:
                f.close()

    def abort(self) -> None:
        """Remove what this process wrote that is not the finished ``.npz``."""
        if self.writer is not None:
            self.writer.abort()
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self.part.unlink(missing_ok=True)
