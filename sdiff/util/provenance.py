"""Where a result came from: the commit of the sdiff source that ran (its own repository, not
the current directory's), whether that tree had uncommitted changes, the versions and the
device. Every benchmark row, the ablation results store, the reports and the GPU tables stamp
this, so a number can be traced to one commit.

``git_sha()`` gives ``<12 hex digits>``, ``<12 hex digits>+dirty`` when the source tree differs
from its commit (tracked changes, or untracked files git does not ignore), the value of
``$SDIFF_GIT_SHA`` where git cannot tell (a copied tree, as on the GPU machines), else None.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

__all__ = ["Provenance", "device_label", "git_sha", "provenance", "source_root"]

DIRTY = "+dirty"


@cache
def source_root() -> Path | None:
    """The git work tree that holds this sdiff source, or None (an installed wheel, a copy)."""
    root = Path(__file__).resolve().parents[2]  # sdiff/util/provenance.py -> the tree
    top = _git(root, "rev-parse", "--show-toplevel")
    # an installed sdiff inside some other repository (a venv in a project) is not a checkout
    return root if top is not None and Path(top).resolve() == root else None


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_sha() -> str | None:
    """The source's commit, ``+dirty`` when its tree has changes (see the module docstring)."""
    root = source_root()
    sha = _git(root, "rev-parse", "--short=12", "HEAD") if root is not None else None
    if sha is None:
        return os.environ.get("SDIFF_GIT_SHA") or None
    status = _git(root, "status", "--porcelain")
    return sha + (DIRTY if status is None or status else "")


def device_label(device=None) -> str:
    """ "NVIDIA H200" for a GPU, "cpu (x86_64, 2 threads)" for the CPU."""
    import torch

    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass(frozen=True)
class Provenance:
    git_sha: str | None
    dirty: bool
    sdiff: str
    python: str
    torch: str
    cuda: str | None
    triton: str
    device: str
    date: str

    def as_dict(self) -> dict:
        return asdict(self)


def provenance(device=None) -> Provenance:
    """Commit, dirty flag, versions and device of this process's run."""
    import torch

    from sdiff import __version__

    sha = git_sha()
    return Provenance(
        git_sha=sha,
        dirty=bool(sha and sha.endswith(DIRTY)),
        sdiff=__version__,
        python=platform.python_version(),
        torch=str(torch.__version__),
        cuda=torch.version.cuda,
        triton=_triton_version(),
        device=device_label(device),
        date=time.strftime("%Y-%m-%d"),
    )


def _triton_version() -> str:
    if "triton" not in sys.modules:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "not installed"
    return getattr(sys.modules["triton"], "__version__", "unknown")
