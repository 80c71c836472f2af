"""Checkpoints that lose nothing.

A checkpoint is written to ``ckpt-<step>.pt.tmp`` in the same folder, flushed and fsync'ed,
then renamed over ``ckpt-<step>.pt`` with ``os.replace`` (atomic on POSIX), and the folder is
fsync'ed. A crash at any moment therefore leaves either the previous set of complete
checkpoints or the new one as well, never a half-written ``.pt``; stray ``.tmp`` files are
ignored and cleaned up by the next save. Only after a new checkpoint is in place are old ones
beyond ``keep`` removed.

Files are loaded with ``torch.load(weights_only=True)``: the state holds only tensors and plain
Python values (the config as JSON text, RNG states as byte tensors), so no pickled code runs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["checkpoint_path", "list_checkpoints", "load_checkpoint", "save_checkpoint"]

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
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    except Exception as err:  # torch raises several types for damaged files
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise ValueError(f"{path} is not an sdiff checkpoint (no model/step entries)")
    return state
