"""Benchmarks: throughput, memory and attention, installed as ``sdiff.bench`` (the top-level
``bench/`` folder is mapped into the package by pyproject.toml, as ``kernels/`` is). Results
go to CSV files under ``reports/bench/``; ``bench/asv/`` holds the asv suite and ``bench/gpu/``
the prepared GPU scripts (neither is part of the installed package).
"""

import os
import subprocess


def git_sha() -> str:
    """The current checkout's short commit; ``$GIT_SHA`` where git cannot tell (a copied tree,
    as on the GPU machines), else "unknown". Stamped on every benchmark row."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=False)  # fmt: skip
        return out.stdout.strip() or os.environ.get("GIT_SHA", "unknown")
    except OSError:
        return os.environ.get("GIT_SHA", "unknown")
