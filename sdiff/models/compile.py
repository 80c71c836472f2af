"""torch.compile behind one wrapper with an off switch.

    model = maybe_compile(model, enabled=config.train.compile)

Used for the denoiser of the train step (``train.compile``) and of the sampler step
(``EvalSpec.compile`` / ``sdiff sample --compile``). ``SDIFF_COMPILE=0`` in the environment
turns every compilation off (eager fallback) without touching configs, e.g. to debug or on a
machine without a compiler. The models have no graph breaks with the sdpa, math and triton
attention backends (tested with ``torch._dynamo.explain``): data-dependent input checks are
skipped while tracing, and the Triton kernel is a ``torch.library`` custom op.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["compile_enabled", "maybe_compile"]


def compile_enabled() -> bool:
    """False when SDIFF_COMPILE is set to 0/false/no/off."""
    return os.environ.get("SDIFF_COMPILE", "1").strip().lower() not in ("0", "false", "no", "off")


def maybe_compile(obj: T, *, enabled: bool = True, **kwargs: Any) -> T:
    """``torch.compile(obj, **kwargs)`` when enabled here and by the environment, else ``obj``."""
    if enabled and compile_enabled():
        return torch.compile(obj, **kwargs)
    return obj
