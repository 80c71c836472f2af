"""What can go wrong in a command, and the exit code each kind of failure gets.

Every ``sdiff`` command turns the failures a user can cause or meet into one line on stderr that
names the path or value, and an exit code per kind; the traceback is shown only with
``--debug`` (``sdiff --debug train ...``). A failure of any other kind is a bug in sdiff and
keeps its traceback.

====  ==========================================================================================
code  meaning
====  ==========================================================================================
0     success
1     the command ran but part of its work failed (``sdiff ablate``: a cell failed)
2     usage: a bad argument, config value, or file content (``ValueError``)
3     stopped: training met non-finite values (``FloatingPointError``)
4     file system: a missing file, no permission, a read-only folder, a full disk (``OSError``)
5     device: the requested device does not exist here, or ran out of memory
6     busy: the run folder or ablation cell is owned by another live process
130   interrupted (Ctrl-C)
====  ==========================================================================================
"""

from __future__ import annotations

import errno
import os
import shutil
import sys

__all__ = [
    "EXIT_BUSY",
    "EXIT_DEVICE",
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_IO",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "DeviceUnavailable",
    "RunFolderBusy",
    "StopRequested",
    "describe",
    "describe_os_error",
    "exit_code",
    "is_disk_full",
    "report_failure",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_STOPPED = 3
EXIT_IO = 4
EXIT_DEVICE = 5
EXIT_BUSY = 6
EXIT_INTERRUPTED = 130


class DeviceUnavailable(RuntimeError):
    """The requested device does not exist on this machine (named in the message)."""

    exit_code = EXIT_DEVICE


class RunFolderBusy(RuntimeError):
    """Another live process (or another owner in this one) holds the run folder."""

    exit_code = EXIT_BUSY


class StopRequested(Exception):
    """A cooperative stop: the caller asked a running job to end at its next step boundary
    (an ablation runner that lost its claim on a cell)."""

    exit_code = EXIT_BUSY


# Free space below which a write failure without an errno (torch.save, SQLite) counts as a
# full disk: less than one more checkpoint page or database page could need.
_FULL_BELOW_BYTES = 1 << 20


def is_disk_full(path: str | os.PathLike[str]) -> bool:
    """Whether the file system holding ``path`` (or its nearest existing parent) has next to no
    free space left, for errors that do not carry an errno."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return shutil.disk_usage(p).free < _FULL_BELOW_BYTES
    except OSError:
        return False


_REASONS = {
    errno.ENOSPC: "disk is full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists (a file where a folder is needed?)",
}


def describe_os_error(err: OSError) -> str:
    """One line for a file-system error: what went wrong, and with which path."""
    reason = _REASONS.get(err.errno) or err.strerror or str(err)
    paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
    where = " -> ".join(paths)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"{reason}: cannot write {where}" if where else reason
        return f"{what}; files written before are intact: free some space and run again"
    return f"{where}: {reason}" if where else reason


def describe(err: BaseException) -> str:
    """The one line printed for an expected failure."""
    if isinstance(err, OSError):
        return describe_os_error(err)
    text = str(err).strip()
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    if _is_out_of_memory(err):
        first = text.splitlines()[0] if text else ""
        return f"out of device memory: {first} (try a smaller batch or activation checkpointing)"
    return " ".join(text.split("\n")) if text else type(err).__name__


def _is_out_of_memory(err: BaseException) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a core dependency
        return False
    return isinstance(err, torch.OutOfMemoryError)


def exit_code(err: BaseException) -> int | None:
    """The exit code of an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    code = getattr(err, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(err, FloatingPointError):  # before ValueError's family: it is an ArithmeticError
        return EXIT_STOPPED
    if isinstance(err, OSError):
        return EXIT_IO
    if isinstance(err, ValueError):
        return EXIT_USAGE
    if _is_out_of_memory(err):
        return EXIT_DEVICE
    return None


def report_failure(command: str, err: BaseException, *, debug: bool = False) -> int:
    """Print an expected failure as one line (``<command>: error: ...``) and return its exit
    code; re-raise a bug (no exit code) or anything under ``debug``, traceback and all."""
    code = exit_code(err)
    if debug or code is None:
        raise err
    verb = "stopped" if isinstance(err, FloatingPointError) else "error"
    print(f"{command}: {verb}: {describe(err)}", file=sys.stderr)
    return code
