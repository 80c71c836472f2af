"""Writing the small files of a run so that a failure names the file and leaves nothing
half-written: atomic replacement for whole files, row appends that are undone when they fail.

Errors are re-raised as ``OSError`` carrying the path (a write that fails on a full disk often
surfaces at ``close`` without one), so the command line can say which file could not be
written and why (``sdiff.util.errors``).
"""

from __future__ import annotations

import csv
import errno
import io
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "append_csv_row",
    "append_line",
    "atomic_write_text",
    "atomic_write_with",
    "ensure_folder",
    "naming",
    "write_csv",
]


def naming(err: OSError, path: str | os.PathLike[str]) -> OSError:
    """``err`` with ``path`` as its file name (an error that already names one is kept)."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Replace ``path`` by ``text`` in one step (a temporary file beside it, then a rename):
    readers see the old content or the new, never a part; a failed write leaves the old."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise naming(err, path) from err
    return path


def atomic_write_with(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Create ``path`` by ``write(tmp)`` on a temporary file beside it (same suffix, so savers
    that choose a format by it keep working: ``np.savez``, ``torch.save``), then one rename; a
    failing ``write`` leaves the old file and no temporary one. Exceptions pass through
    unchanged (a download's ``URLError`` must stay one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def append_csv_row(path: str | os.PathLike[str], fields: list[str], row: Mapping[str, Any]) -> None:
    """Append one row (and the header, to a new file). A failed append is cut off again, so
    the file never ends in half a row."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields)
    if not path.exists() or path.stat().st_size == 0:
        writer.writeheader()
    writer.writerow(row)
    append_line(path, buffer.getvalue())


def append_line(path: str | os.PathLike[str], text: str) -> None:
    """Append ``text`` (a line, or lines, ending in a newline) to ``path``; a failed append is
    cut off again, so the file never ends in a partial line."""
    path = Path(path)
    size = path.stat().st_size if path.exists() else 0
    try:
        with open(path, "a", newline="") as f:
            f.write(text)
    except OSError as err:
        try:
            os.truncate(path, size)
        except OSError:
            pass
        raise naming(err, path) from err


def write_csv(path: str | os.PathLike[str], fields: list[str], rows: Iterable[Mapping]) -> Path:
    """Replace ``path`` by a CSV of ``rows`` atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fields)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def ensure_folder(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) if needed and check that files can be created in it,
    so that a command fails before its work, not after, when its output cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where the folder should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    probe = path / f".sdiff-write-check.{os.getpid()}"
    try:
        probe.touch()
    except OSError as err:
        raise naming(err, path) from err
    probe.unlink(missing_ok=True)
    return path
