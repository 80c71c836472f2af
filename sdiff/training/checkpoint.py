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
"""

from __future__ import annotations

import errno
import os
import pickle
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdiff.util.errors import is_disk_full

__all__ = [
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_good",
    "non_finite_tensors",
    "save_checkpoint",
]

_NAME = re.compile(r"^ckpt-(\d{12})\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / f"ckpt-{step:012d}.pt"


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first (``.tmp`` files are not checkpoints)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


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
        if isinstance(err, OSError) and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(path)) from err
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise OSError(errno.EIO, f"writing the checkpoint failed ({err})", str(path)) from err
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint; a missing, truncated or foreign file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
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
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in ``folder`` that loads and is all finite, and its state; None
    if the folder holds no checkpoint. Newer damaged ones are skipped with a warning naming
    each; if all are damaged, a ValueError lists them. ``accept(path, state)`` may raise a
    ValueError to refuse a checkpoint outright (one of another config is not damage: it is
    an error, not skipped)."""
    skipped: list[tuple[Path, str]] = []  # (checkpoint, why it is not good)
    for path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path, map_location=map_location)
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
