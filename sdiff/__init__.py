"""sdiff: pixel-space diffusion at high resolution, after "simple diffusion" (Hoogeboom, Heek,
Salimans, ICML 2023) and SiD2.

Modules: ``schedules`` (logSNR schedules), ``diffusion`` (forward process, targets, weightings,
multiscale loss), ``samplers`` (DDPM, DDIM, guidance), ``analytic`` (exact denoisers for
Gaussian-mixture data), ``wavelets`` (DWT), ``attention_backends`` (the attention entry point
``sdiff.attention``), ``blocks``, ``unet``, ``uvit``, ``presets`` (``build_model``), ``flops``.
``sdiff.kernels`` is the top-level ``kernels/`` folder.
"""

from sdiff import diffusion, samplers, schedules
from sdiff.attention_backends import attention
from sdiff.presets import PRESETS, build_model, get_preset

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "__version__",
    "attention",
    "build_model",
    "diffusion",
    "get_preset",
    "samplers",
    "schedules",
]
