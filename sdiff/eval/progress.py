"""Progress bars of sampling and feature extraction, drawn by rank 0 only.

tqdm's bars as the trainer draws them: redrawn at most every 0.5 s on a terminal, every 10 s
into a log file, on stderr (stdout stays the command's result). ``enabled=False`` (``sdiff
sample|eval --no-progress``, and every process but rank 0) gives a bar that draws nothing.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int, desc: str, *, unit: str = "img", enabled: bool = True) -> Any:
    """A tqdm bar counting ``total`` ``unit``s (``.update(k)``, ``.close()``)."""
    from tqdm.auto import tqdm

    every = 0.5 if sys.stderr.isatty() else 10.0
    return tqdm(total=total, desc=desc, unit=unit, mininterval=every, disable=not enabled)
