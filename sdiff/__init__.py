"""sdiff: pixel-space diffusion at high resolution, after "simple diffusion" (Hoogeboom, Heek,
Salimans, ICML 2023) and SiD2.

Modules: ``schedules`` (logSNR schedules), ``diffusion`` (forward process, targets, weightings,
multiscale loss), ``samplers`` (DDPM, DDIM, guidance), ``analytic`` (exact denoisers for
Gaussian-mixture data). ``sdiff.kernels`` is the top-level ``kernels/`` folder.
"""

from sdiff import diffusion, samplers, schedules

__version__ = "0.1.0"

__all__ = ["__version__", "diffusion", "samplers", "schedules"]
