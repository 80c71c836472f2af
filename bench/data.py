"""Data loading throughput: a prepared dataset against decoding its image folder, side by side.

    sdiff data prepare bundled:photos runs/data/photos-256 --res 256
    sdiff data bench runs/data/photos-256                  # the folder: the manifest's source
    sdiff data bench PATH --folder /data/imagenet/train --workers 0 2 8

Both datasets read the same images (the folder through a ``Subset`` that picks the prepared
items' source files, so a ``--limit``ed prepare compares like with like) in the same order:
the trainer's, ``index_batches`` (seed, step), handed to a ``DataLoader`` as its batch sampler,
as the trainer does, with ``pin_memory`` on CUDA. The prepared dataset reads each batch whole
(``__getitems__``); the folder decodes and crops each file (``ImageFolderDataset``). Before
timing, the first batch of both is compared bit for bit.

Per dataset x worker count: img/s over ``batches`` batches after ``warmup`` ones (worker start-up
and first reads, reported as ``start_s``; batches the workers prefetched meanwhile, at most
2 per worker, make the figure slightly optimistic for short runs); ``pixel_mb_s`` = img/s x C R^2
bytes of uint8 pixels read (the float32 batches handed out are 4x that). The page cache is warm
(the files were just read); a dataset larger than memory is read from disk at ``pixel_mb_s``.
Writes ``data.md`` (this run's table and provenance) and appends the rows to ``data.csv`` under
``out`` (device, versions and git SHA on every row).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from sdiff.data.datasets import ImageFolderDataset
from sdiff.data.prepare import parse_bundled, write_bundled
from sdiff.data.prepared import PreparedDataset
from sdiff.training.trainer import index_batches
from sdiff.util.devices import resolve_device
from sdiff.util.files import append_csv_row, atomic_write_text, ensure_folder
from sdiff.util.provenance import provenance
from sdiff.util.tables import markdown_table

__all__ = ["FIELDS", "folder_subset", "measure", "run_data_bench"]

FIELDS = [
    "dataset", "workers", "batch", "batches", "img_s", "pixel_mb_s", "start_s", "resolution",
    "channels", "images", "cpus", "load_1m", "device", "torch", "python", "sdiff", "git_sha",
    "date",
]  # fmt: skip


def folder_subset(prepared: PreparedDataset, folder: str | os.PathLike) -> Dataset:
    """The image folder's items for the prepared dataset's items, in its order (``files``)."""
    images = ImageFolderDataset(folder, prepared.resolution, channels=prepared.channels)
    where = {p.relative_to(images.root).as_posix(): i for i, (p, _) in enumerate(images.samples)}
    missing = next((f for f in prepared.files if f not in where), None)
    if missing is not None:
        raise ValueError(f"{folder} has no {missing}, which {prepared.root} was prepared from")
    if images.classes != prepared.classes:
        raise ValueError(f"{folder} has other classes than {prepared.root} was prepared with")
    return Subset(images, [where[f] for f in prepared.files])


def measure(
    dataset: Dataset, batches: list[list[int]], workers: int, warmup: int, pin: bool
) -> dict[str, float]:
    """img/s reading ``batches`` after the first ``warmup`` through the trainer's kind of
    DataLoader; ``start_s``: the time to the end of the warm-up batches."""
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=pin,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    start = time.perf_counter()
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    timed = time.perf_counter()
    images = sum(x.shape[0] for x, _ in it)
    end = time.perf_counter()
    return {"img_s": images / (end - timed), "start_s": timed - start}


def _source_folder(prepared: PreparedDataset, folder: str | None, stack) -> Path:
    """--folder, else the manifest's source (a bundled source is written again: the same
    files, in a temporary folder)."""
    if folder is not None:
        return Path(folder)
    source = prepared.manifest.source["path"]
    if source.startswith("bundled:"):
        name, count = parse_bundled(source)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="sdiff-bundled-"))
        return write_bundled(name, tmp, count=count)
    if not Path(source).is_dir():
        raise ValueError(f"the source folder {source} of {prepared.root} is gone; pass --folder")
    return Path(source)


def run_data_bench(
    path: str | os.PathLike,
    *,
    folder: str | None = None,
    out: str | os.PathLike = "runs/bench/data",
    workers: tuple[int, ...] = (0, 2),
    batch: int = 64,
    batches: int = 20,
    warmup: int = 2,
    seed: int = 0,
    device: str | None = None,
    command: str | None = None,
) -> list[dict]:
    """Measure (module docstring), write ``out``/data.md and append ``out``/data.csv; returns
    the rows. ``device`` (default cuda if available) decides ``pin_memory`` and the device
    named in the rows; ``command``, the command line shown in data.md."""
    from contextlib import ExitStack

    for name, value in (("batch", batch), ("batches", batches)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1; got {value}")
    if warmup < 0 or any(w < 0 for w in workers):
        raise ValueError("--warmup and --workers must not be negative")
    out = ensure_folder(out)
    device = resolve_device(device)  # checked before any work
    prepared = PreparedDataset(path)
    prov = provenance(device)
    # the 1-minute load average when the run starts: other processes on the CPUs slow both
    # datasets, and torch's intra-op threads in the main process (workers 0) most of all
    stamp = {"cpus": os.cpu_count(), "load_1m": round(os.getloadavg()[0], 2),
             "device": prov.device, "torch": prov.torch, "python": prov.python,
             "sdiff": prov.sdiff, "git_sha": prov.git_sha, "date": prov.date}  # fmt: skip
    order = list(itertools.islice(index_batches(len(prepared), batch, seed, 0), warmup + batches))
    pin = device.type == "cuda"
    image_bytes = prepared.manifest.image_bytes
    rows = []
    with ExitStack() as stack:
        source = _source_folder(prepared, folder, stack)
        datasets = {"prepared": prepared, "folder": folder_subset(prepared, source)}
        first = [torch.stack([d[i][0] for i in order[0]]) for d in datasets.values()]
        identical = torch.equal(*first)
        for (name, dataset), w in itertools.product(datasets.items(), workers):
            result = measure(dataset, order, w, warmup, pin)
            rows.append({"dataset": name, "workers": w, "batch": batch, "batches": batches,
                         "img_s": round(result["img_s"], 1),
                         "pixel_mb_s": round(result["img_s"] * image_bytes / 1e6, 1),
                         "start_s": round(result["start_s"], 3),
                         "resolution": prepared.resolution, "channels": prepared.channels,
                         "images": len(prepared), **stamp})  # fmt: skip
            append_csv_row(out / "data.csv", FIELDS, rows[-1])
            print(f"{name:8s} workers {w}: {rows[-1]['img_s']:10.1f} img/s", flush=True)
    text = _markdown(rows, prepared, source, identical, command)
    atomic_write_text(out / "data.md", text)
    print(f"wrote {out / 'data.md'}; rows appended to {out / 'data.csv'}")
    return rows


def _markdown(rows: list[dict], prepared: PreparedDataset, source: Path, identical: bool,
              command: str | None) -> str:  # fmt: skip
    r = rows[0]
    speed = {(row["dataset"], row["workers"]): row["img_s"] for row in rows}
    ratios = [f"{w} workers: {speed['prepared', w] / speed['folder', w]:.1f}x"
              for w in sorted({row["workers"] for row in rows})]  # fmt: skip
    columns = ["dataset", "workers", "img_s", "pixel_mb_s", "start_s"]
    table = markdown_table(columns, [[row[c] for c in columns] for row in rows], right=[1, 2, 3, 4])
    return "\n".join([
        "# Data loading: prepared shards vs decoding the image folder",
        "",
        *([f"`{command}`", ""] if command else []),
        f"{r['images']} images at {r['resolution']} px, {r['channels']} channel(s): "
        f"{prepared.root} against {source}; batch {r['batch']}, {r['batches']} timed batches "
        f"in the trainer's (seed, step) order through a DataLoader; page cache warm. "
        f"First batch identical bit for bit: {'yes' if identical else 'NO'}.",
        "",
        table,
        f"Prepared / folder: {', '.join(ratios)}.",
        "",
        f"{r['device']}, {r['cpus']} CPUs (load average {r['load_1m']} at the start); torch "
        f"{r['torch']}, Python {r['python']}, "
        f"sdiff {r['sdiff']}, git {r['git_sha']}, {r['date']}.",
        "",
    ])  # fmt: skip
