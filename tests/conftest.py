"""Test-session set-up.

Without a GPU, Triton kernels run in the Triton interpreter, which must be switched on before
triton is first imported; a GPU machine runs them natively (set TRITON_INTERPRET=1 yourself to
interpret there too).
"""

import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# -- faults: a full disk and a read-only folder, for real ------------------------------------------


@cache
def _sandbox_available() -> bool:
    """Whether ``unshare`` can give us a private mount namespace (as root, or as a user mapped to
    root in a user namespace): then tmpfs and read-only bind mounts need no privileges here."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
         "mount -t tmpfs -o size=64k tmpfs /tmp"],
        capture_output=True,
    )  # fmt: skip
    return probe.returncode == 0


@pytest.fixture
def sandbox():
    """``run(script, full=[dirs], tmpfs_kib=..., readonly=[dirs])``: run Python ``script`` in a
    child process whose ``full`` folders are small tmpfs file systems (fill them to get a real
    ENOSPC) and whose ``readonly`` folders are read-only bind mounts (EROFS even for root).
    Returns the CompletedProcess (text). Skips where no mount namespace can be had."""
    if not _sandbox_available():
        pytest.skip("needs `unshare -rm` (a private mount namespace) for real disk faults")

    def run(script: str, *, full=(), tmpfs_kib: int = 1024, readonly=(), timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:  # fmt: skip
        mounts = []
        for d in full:
            Path(d).mkdir(parents=True, exist_ok=True)
            mounts.append(f"mount -t tmpfs -o size={tmpfs_kib}k tmpfs '{d}'")
        for d in readonly:
            mounts.append(f"mount --bind '{d}' '{d}' && mount -o remount,bind,ro '{d}'")
        shell = " && ".join([*mounts, f"exec '{sys.executable}' -c \"$SDIFF_SANDBOX_SCRIPT\""])
        return subprocess.run(
            ["unshare", "-rm", "sh", "-c", shell], capture_output=True, text=True,
            timeout=timeout, env={**os.environ, **(env or {}), "SDIFF_SANDBOX_SCRIPT": script},
        )  # fmt: skip

    return run


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill the file system holding ``folder`` (a small tmpfs) until writes fail, then give back
    ``leave`` bytes. Returns the filler file."""
    filler = Path(folder) / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    if leave:
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - leave))
    return filler
