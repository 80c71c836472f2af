"""One owner per run folder: an advisory lock that a crashed owner cannot leave behind.

    with RunLock("runs/digits", "sdiff train"):       # exclusive: writes checkpoints, metrics
        ...
    with RunLock("runs/digits", "sdiff sample", shared=True):   # reads a checkpoint
        ...

``sdiff train`` and ``sdiff eval`` hold their run folder exclusively (they write checkpoints,
``metrics.csv``, ``metrics.json``); ``sdiff sample`` holds it shared while it picks and reads a
checkpoint, so several samplers may read at once but no trainer starts rotating checkpoints
under them. A second owner is refused with ``RunFolderBusy`` naming the holder.

The lock is a POSIX record lock (``fcntl.lockf``) on ``<run>/run.lock``. The kernel drops it
when its process ends, however it ends (``kill -9`` included), so a folder is taken over only
when its owner is provably gone, and at once (on NFS the lock manager does the same across
machines). The file also holds the owner's pid, host, command and start time, for the message.
POSIX locks belong to a process: the worker processes a DataLoader forks do not inherit them,
and a second lock taken by the same process would silently merge with the first, so this
module keeps a table of the locks its process holds and refuses a second owner in the same
process like one in another.

Two cases without a kernel lock. A folder that cannot be written (a read-only mount, another
user's results) takes a shared lock on an existing ``run.lock``, or none: nothing can be
written there, by this process or the ones it would protect. A file system without locks
(``ENOLCK``) falls back on the record: one naming a process of this host that no longer exists
is taken over; any other is refused, naming the file to remove once its owner is known dead.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdiff.util.errors import RunFolderBusy

__all__ = ["LOCK_NAME", "RunLock", "pid_alive"]

LOCK_NAME = "run.lock"
_HOST = socket.gethostname()
_CANNOT_WRITE = (errno.EROFS, errno.EACCES, errno.EPERM)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass
class _Held:
    fd: int | None
    shared: bool
    count: int
    record: dict[str, Any]


_HELD: dict[str, _Held] = {}  # realpath of a lock file -> this process's hold on it
_TABLE = threading.Lock()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host exists (a zombie does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:  # a killed child nobody has reaped yet is a zombie: gone for our purposes
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    """The lock of one run folder for one owner (see the module docstring). ``hint`` is added
    to the message when the folder is busy (what the user can do instead)."""

    def __init__(
        self, folder: str | os.PathLike[str], command: str, *, shared: bool = False, hint: str = ""
    ) -> None:
        self.folder = Path(folder)
        self.command = command
        self.shared = shared
        self.hint = hint
        self.read_only = False  # the folder could not be written: held shared, or not at all
        self._key: str | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._key is not None

    def acquire(self) -> RunLock:
        if self.held:
            return self
        if not self.shared and not self.folder.is_dir():
            self.folder.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        record = {"pid": os.getpid(), "host": _HOST, "command": self.command,
                  "since": time.strftime("%Y-%m-%d %H:%M:%S %z")}  # fmt: skip
        with _TABLE:
            held = _HELD.get(key)
            if held is not None:  # this process holds it already
                if not (held.shared and self.shared):
                    raise RunFolderBusy(self._busy_text(held.record, this_process=True))
                held.count += 1
                self._key = key
                return self
            fd, self.read_only = self._open()
            shared = self.shared or self.read_only
            if fd is not None:
                self._lock(fd, shared)
                if not shared:
                    _write_record(fd, record)
            _HELD[key] = _Held(fd, shared, 1, record)
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _TABLE:
            key, self._key = self._key, None
            held = _HELD[key]
            held.count -= 1
            if held.count:
                return
            del _HELD[key]
            if held.fd is not None:
                if not held.shared:  # the record stays readable, marked as released
                    _write_record(held.fd, {**held.record, "released": True})
                os.close(held.fd)  # closing the file gives the POSIX lock back

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- internals -------------------------------------------------------------------------
    def _open(self) -> tuple[int | None, bool]:
        """The lock file open for reading and writing, or for reading only (and True) where
        the folder cannot be written; (None, True) where it cannot be written and has none."""
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), False
        except OSError as err:
            if err.errno not in _CANNOT_WRITE:
                raise
        try:
            return os.open(self.path, os.O_RDONLY), True
        except FileNotFoundError:
            return None, True

    def _lock(self, fd: int, shared: bool) -> None:
        try:
            fcntl.lockf(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                record = _read_record(fd)
                os.close(fd)
                raise RunFolderBusy(self._busy_text(record)) from None
            if err.errno not in _NO_LOCKS:
                os.close(fd)
                raise
        # no locks on this file system: the record decides
        record = _read_record(fd)
        if record and not record.get("released") and _record_alive(record):
            os.close(fd)
            raise RunFolderBusy(
                self._busy_text(record)
                + f" (this file system has no locks: once that process is surely gone, "
                f"remove {self.path})"
            )

    def _busy_text(self, record: dict[str, Any] | None, this_process: bool = False) -> str:
        text = f"run folder {self.folder} is in use"
        if this_process and record:
            text += f" by this process (pid {record['pid']}: {record['command']})"
        elif record and not record.get("released") and _record_alive(record):
            text += (
                f" by `{record.get('command', '?')}` (pid {record.get('pid')} on host "
                f"{record.get('host')}, since {record.get('since')}); it is free again when "
                f"that process ends"
            )
        else:
            text += (
                f" by another process (one reading it, such as `sdiff sample`, or one that "
                f"{self.path} does not name); it is free again when that process ends"
            )
        return text + (f"; {self.hint}" if self.hint else "")


def _record_alive(record: dict[str, Any]) -> bool:
    """Whether the owner a record names may still run: a process of this host that exists,
    or any process of another host (whose liveness cannot be checked from here)."""
    pid = record.get("pid")
    if record.get("host") != _HOST or not isinstance(pid, int):
        return True
    return pid_alive(pid)


def _read_record(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode()) if data.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write_record(fd: int, record: dict[str, Any]) -> None:
    """Best effort: the record only feeds messages, so a full disk must not stop the owner
    (rewriting a few bytes of an existing page needs no new space)."""
    data = (json.dumps(record, sort_keys=True) + "\n").encode()
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    except OSError:
        pass
