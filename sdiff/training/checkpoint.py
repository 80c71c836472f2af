"""Checkpoints that lose nothing.

A checkpoint is written to ``ckpt-<step>.pt.tmp`` in the same folder, flushed and fsync'ed,
then renamed over ``ckpt-<step>.pt`` with ``os.replace`` (atomic on POSIX), and the folder is
fsync'ed. A crash at any moment therefore leaves either the previous set of complete
checkpoints or the new one as well, never a half-written ``.pt``; stray ``.tmp`` files are
ignored and cleaned up by the next save (the run folder's lock, ``sdiff.util.runlock``, makes the
saving process the only writer). A write that fails (a full disk) removes its ``.tmp`` and
raises an ``OSError`` naming the checkpoint. Only after a new checkpoint is in place are old
ones beyond ``keep`` removed.

Files are loaded with ``torch.load(weights_only=True)``: the state holds only tensors and plain
Python values (the config as JSON text, RNG states as byte tensors), so no pickled code runs.

"Good" checkpoints: one that loads and whose floating-point tensors (weights, EMA, optimizer
state) are all finite. ``load_latest_good`` takes the newest good one, skipping newer damaged
ones with a warning that names them, so a run resumes from the last good state.

Sharded checkpoints. Under FSDP a full checkpoint would gather every weight, EMA and Adam moment
on one process (about 28 GB for U-ViT L) and every process would read the whole file back.
There each process writes its own shards with ``torch.distributed.checkpoint`` (DCP) into a
folder ``ckpt-<step>.dcp`` beside the ``.pt`` files: ``model``, ``ema`` and ``optimizer`` as
DCP entries keyed by parameter name, and ``meta.pt`` (step, per-process RNG states, config,
versions: everything but the tensors). It is written as ``ckpt-<step>.dcp.tmp`` and renamed into
place once every process has finished, so the same crash rule holds. DCP stores each tensor's
global shape and where each shard lies, so a sharded checkpoint loads on any number of
processes (resharding): FSDP on another world size reads only the pieces its shards cover, a
single process reads whole tensors (``sharded_into``), and ``load_checkpoint`` turns one into
an ordinary state (``full=True``) for sampling or export.
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdiff.util.errors import is_disk_full

__all__ = [
    "checkpoint_path",
    "is_sharded",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_good",
    "non_finite_tensors",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "sharded_into",
]

_NAME = re.compile(r"^ckpt-(\d{12})\.(pt|dcp)$")
META = "meta.pt"  # a sharded checkpoint's non-tensor state


def checkpoint_path(folder: str | Path, step: int, sharded: bool = False) -> Path:
    return Path(folder) / f"ckpt-{step:012d}.{'dcp' if sharded else 'pt'}"


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` names a sharded (DCP folder) checkpoint."""
    return Path(path).suffix == ".dcp"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder`` (``.pt`` files and ``.dcp`` folders), oldest first;
    ``.tmp`` leftovers are not checkpoints. A step saved both ways (a run that went from one
    process to FSDP) lists its newer one last."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: (int(_NAME.match(p.name).group(1)), p.stat().st_mtime))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _prune(folder: Path, keep: int) -> None:
    for old in list_checkpoints(folder)[:-keep]:
        _remove(old)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 3) -> Path:
    """Write ``state`` atomically as checkpoint ``step`` and keep the newest ``keep``."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("ckpt-*.pt.tmp"):  # leftovers of a crashed write
        stale.unlink(missing_ok=True)
    path = checkpoint_path(folder, step)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
        full = is_disk_full(folder)  # before the partial file gives its space back
        tmp.unlink(missing_ok=True)
        raise _write_failed(err, full, path) from err
    _fsync_dir(folder)
    _prune(folder, keep)
    return path


def _write_failed(err: BaseException, disk_full: bool, path: Path) -> OSError:
    """The OSError naming ``path`` for a failed write (a full disk is ENOSPC)."""
    if isinstance(err, OSError) and err.errno is not None:
        return OSError(err.errno, err.strerror, str(path))
    if disk_full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f"writing the checkpoint failed ({err})", str(path))


def save_sharded_checkpoint(
    folder: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any], keep: int = 3
) -> Path:
    """Write a sharded checkpoint (module docstring); called on every process of the group.

    ``tensors`` holds this process's ``model``, ``ema`` and ``optimizer`` state dicts (sharded
    DTensors, as ``torch.distributed.checkpoint.state_dict`` gives them), ``meta`` the rest
    (written by the main process). The folder appears under its final name only once every
    process has written its shards; then the newest ``keep`` checkpoints are kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    if keep < 1:
        raise ValueError(f"keep must be >= 1; got {keep}")
    folder = Path(folder)
    main = _rank() == 0
    path = checkpoint_path(folder, step, sharded=True)
    tmp = path.with_name(path.name + ".tmp")
    failure: BaseException | None = None
    if main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in list(folder.glob("ckpt-*.tmp")):  # leftovers of a crashed write
                _remove(stale)
            tmp.mkdir()
        except OSError as err:
            failure = err
    if not _any(failure is not None):
        try:
            with warnings.catch_warnings():  # one process writing is fine too
                warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
                dcp.save(tensors, checkpoint_id=str(tmp))
            if main:
                with open(tmp / META, "wb") as f:
                    torch.save(meta, f)
                    f.flush()
                    os.fsync(f.fileno())
                for part in tmp.iterdir():  # every shard on disk before the rename
                    with open(part, "rb") as f:
                        os.fsync(f.fileno())
                _fsync_dir(tmp)
        except (OSError, RuntimeError, CheckpointException) as err:
            failure = err
    # every process learns whether any failed, so none counts a checkpoint with a hole
    if _any(failure is not None):
        full = main and is_disk_full(folder)
        if main:
            _remove(tmp)
        _barrier()
        err = failure or RuntimeError("another process failed to write its shards")
        raise _write_failed(err, full, path) from failure
    if main:
        if path.exists():  # the same step written again (it was damaged): old one out first
            _remove(path)
        os.replace(tmp, path)
        _fsync_dir(folder)
        _prune(folder, keep)
    _barrier()
    return path


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _any(flag: bool) -> bool:
    """Whether ``flag`` holds on any process of the group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return flag
    t = torch.tensor([float(flag)])
    dist.all_reduce(t)  # gloo and NCCL both reduce CPU-side flags through the default group
    return bool(t.item())


def _check_sharded(path: Path) -> None:
    """Check that a sharded checkpoint is complete: its metadata reads and every file it names
    is there and long enough (a truncated shard is damage, found before loading anything)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file() or not (path / META).is_file():
        raise ValueError(f"cannot read checkpoint {path}: incomplete (no .metadata or {META})")
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: damaged .metadata ({err})") from err
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = path / name
        size = file.stat().st_size if file.is_file() else -1
        if size < end:
            what = "missing" if size < 0 else f"truncated ({size} of {end} bytes)"
            raise ValueError(f"cannot read checkpoint {path}: shard {name} is {what}")


def sharded_into(path: str | Path, target: dict[str, Any]) -> None:
    """Load a sharded checkpoint's tensors into ``target`` in place: ``model``, ``ema`` and
    ``optimizer`` state dicts of the current run, sharded (FSDP, any number of processes) or
    whole (one process); DCP reads the pieces each covers. Called on every process."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process reading whole tensors is what we mean
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(target, checkpoint_id=str(path))


def _load_sharded(path: Path, full: Any, map_location) -> dict[str, Any]:
    _check_sharded(path)
    meta = _torch_load(path / META, map_location)
    if not isinstance(meta, dict) or "step" not in meta:
        raise ValueError(f"{path} is not an sdiff checkpoint (no step in {META})")
    state = dict(meta, sharded=str(path))
    if full:  # whole tensors in this process (sampling, export): no process group needed
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

        keys = set(full) if isinstance(full, (set, tuple, list)) else None
        tensors: dict[str, Any] = {}
        reader = FileSystemReader(str(path))
        try:
            planner = _EmptyStateDictLoadPlanner(keys=keys)
            _load_state_dict(tensors, storage_reader=reader, planner=planner, no_dist=True)
        except Exception as err:
            reason = str(err).splitlines()[0] if str(err) else ""
            raise ValueError(
                f"cannot read checkpoint {path}: {type(err).__name__}: {reason}"
            ) from err
        state.update(tensors)
    return state


def _torch_load(path: Path, map_location) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:  # a pickled object, not only tensors and values
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" (a pickled {found.group(1)})" if found else ""
        raise ValueError(
            f"cannot read checkpoint {path}: it holds more than weights{what}, and sdiff only "
            f"loads weights-only checkpoints (tensors and plain values), so that no code "
            f"stored in a file runs"
        ) from None
    except Exception as err:  # torch raises several types for damaged files
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {reason}") from err


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, full: Any = True
) -> dict[str, Any]:
    """Load a checkpoint; a missing, truncated or foreign file is a ValueError naming it.

    A sharded checkpoint (``.dcp`` folder) is checked (every shard there and whole) and comes
    back as its ``meta.pt`` state plus ``sharded``, its path; with ``full`` (default) its
    tensors are read whole into the state too (``full`` may name the entries to read, e.g.
    ``("ema",)``); ``full=False`` leaves them to ``sharded_into``."""
    path = Path(path)
    if is_sharded(path) and path.is_dir():
        return _load_sharded(path, full, map_location)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not an sdiff checkpoint (no model/step entries)")
    return state


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a checkpoint (weights, EMA, optimizer state)
    that hold a NaN or an infinity."""
    found = []

    def visit(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                found.append(name)
        elif isinstance(value, dict):
            for k, v in value.items():
                visit(f"{name}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                visit(f"{name}.{i}", v)

    for key in ("model", "ema", "optimizer"):
        visit(key, state.get(key))
    return found


def load_latest_good(
    folder: str | os.PathLike[str],
    accept: Callable[[Path, dict[str, Any]], None] | None = None,
    map_location: str | torch.device = "cpu",
    *,
    full: Any = True,
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads and is all finite, and its state; None
    if the folder holds no checkpoint. Newer damaged ones are skipped with a warning naming
    each; if all are damaged, a ValueError lists them. ``accept(path, state)`` may raise a
    ValueError to refuse a checkpoint outright (one of another config is not damage: it is
    an error, not skipped)."""
    skipped: list[tuple[Path, str]] = []  # (checkpoint, why it is not good)
    for path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path, map_location=map_location, full=full)
        except ValueError as err:
            skipped.append((path, str(err).split(f"{path}: ", 1)[-1]))
            continue
        if accept is not None:
            accept(path, state)
        bad = non_finite_tensors(state)
        if bad:
            skipped.append((path, f"non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}"))
            continue
        for damaged, why in skipped:
            warnings.warn(
                f"skipped {damaged}: {why}; using the older {path.name} instead (the damaged "
                f"file is replaced when training reaches its step again)",
                stacklevel=2,
            )
        return path, state
    if skipped:
        listing = "; ".join(f"cannot read checkpoint {p}: {why}" for p, why in skipped)
        raise ValueError(
            f"no good checkpoint in {folder}: {listing}; remove the damaged file(s), or the "
            f"whole run folder, to start this run again from scratch"
        )
    return None
