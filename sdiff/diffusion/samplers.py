"""Samplers: ancestral DDPM in logSNR form (the paper's) and DDIM (eta = 0).

All samplers share one signature and are looked up by CLI name in ``SAMPLERS``:

    sampler(denoise, noise, *, schedule, steps, cond=None, guidance=None, clip_x=True,
            generator=None, progress=False) -> Tensor

``denoise(z, logsnr, cond) -> x_hat`` returns the model's estimate of the clean image
(``x_predictor`` makes one from a model that predicts eps, v or x); ``noise`` is z at t = 1 and
fixes shape, device and dtype. The time grid is uniform, t_i = i / steps for i = steps ... 1,
with one denoiser evaluation per step. Each step moves z_t to z_s, s = t - 1/steps; the last
step goes to the clean end (logSNR = +inf, alpha = 1, sigma = 0), where both samplers reduce to
returning x_hat, so the output has no residual noise even when a shifted schedule clips
logSNR at t = 0 to a modest value (10.84 at 512 px from base 64).

DDPM (simple diffusion, arXiv 2301.11093), with s < t: c = -expm1(lambda_t - lambda_s),
    z_s ~ N(alpha_s (z_t (1 - c) / alpha_t + c x_hat), sigma_s^2 c).
DDIM: z_s = alpha_s x_hat + sigma_s eps_hat, eps_hat = (z_t - alpha_t x_hat) / sigma_t.

Classifier-free guidance with weight w: eps = (1 + w) eps_cond - w eps_uncond. The conversion
from x to eps is affine with coefficients that sum to one, so the same combination of x_hat is
identical; it is applied to x_hat before clipping. The "guidance scale" of other libraries
(diffusers, k-diffusion) is 1 + w. SiD2 applies guidance only inside a logSNR interval.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from sdiff.diffusion.process import PREDICTIONS, convert
from sdiff.diffusion.schedules import LogSNRFn

# denoise(z, logsnr (B,), cond) -> x_hat, same shape as z.
Denoiser = Callable[[Tensor, Tensor, Any], Tensor]

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "Guidance",
    "Sampler",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "x_predictor",
]


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: eps = (1 + weight) eps_cond - weight eps_uncond.

    ``weight`` is the paper's w (0 = no guidance); the "guidance scale" of other libraries is
    1 + w. ``uncond`` is the null condition passed to the denoiser for the unconditional pass
    (e.g. a tensor of null-class labels). Guidance applies only at steps whose logSNR lies in
    [logsnr_min, logsnr_max] (SiD2's guidance interval); the default is everywhere.
    """

    weight: float
    uncond: Any
    logsnr_min: float = -math.inf
    logsnr_max: float = math.inf

    def __post_init__(self) -> None:
        if not math.isfinite(self.weight):
            raise ValueError(f"guidance weight must be finite; got {self.weight}")
        if self.logsnr_min > self.logsnr_max:
            raise ValueError(
                f"empty guidance interval: logsnr_min {self.logsnr_min} > "
                f"logsnr_max {self.logsnr_max}"
            )

    def active(self, logsnr: float) -> bool:
        return self.weight != 0 and self.logsnr_min <= logsnr <= self.logsnr_max


class Sampler(Protocol):
    def __call__(
        self,
        denoise: Denoiser,
        noise: Tensor,
        *,
        schedule: LogSNRFn,
        steps: int,
        cond: Any = None,
        guidance: Guidance | None = None,
        clip_x: bool = True,
        generator: torch.Generator | None = None,
        progress: bool = False,
    ) -> Tensor: ...


def x_predictor(model: Callable[[Tensor, Tensor, Any], Tensor], prediction: str) -> Denoiser:
    """Wrap a model that predicts ``prediction`` (eps, v or x) into a denoiser returning x_hat."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {list(PREDICTIONS)}")

    def denoise(z: Tensor, logsnr: Tensor, cond: Any) -> Tensor:
        return convert(model(z, logsnr, cond), prediction, "x", z, logsnr)

    return denoise


def _logsnr_grid(schedule: LogSNRFn, steps: int) -> list[float]:
    """logSNR at t_i = i / steps for i = steps ... 1, then +inf for the clean end."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    t = torch.arange(steps, 0, -1, dtype=torch.float64) / steps  # (steps,), 1 -> 1/steps
    grid = schedule(t).tolist()
    if not all(math.isfinite(v) for v in grid):
        raise ValueError("the schedule returned non-finite logSNR on the sampling grid")
    if any(b <= a for a, b in itertools.pairwise(grid)):
        raise ValueError("the schedule's logSNR must increase from t=1 to t=0 on the sampling grid")
    return [*grid, math.inf]


def _alpha_sigma(logsnr: float) -> tuple[float, float]:
    if logsnr == math.inf:
        return 1.0, 0.0
    # alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), in float64
    return math.sqrt(1 / (1 + math.exp(-logsnr))), math.sqrt(1 / (1 + math.exp(logsnr)))


def _guided_x(
    denoise: Denoiser,
    z: Tensor,
    logsnr: float,
    cond: Any,
    guidance: Guidance | None,
    clip_x: bool,
    step: int,
) -> Tensor:
    """x_hat at one step, with guidance if active, clipped to [-1, 1] if asked."""
    lam = torch.full(
        (z.shape[0],), logsnr, device=z.device, dtype=torch.promote_types(z.dtype, torch.float32)
    )
    if guidance is not None and guidance.active(logsnr):
        if cond is None:
            raise ValueError("guidance needs a condition (cond) to contrast with guidance.uncond")
        w = guidance.weight
        if (
            torch.is_tensor(cond)
            and torch.is_tensor(guidance.uncond)
            and cond.shape == guidance.uncond.shape
        ):
            both = denoise(
                torch.cat([z, z]), torch.cat([lam, lam]), torch.cat([cond, guidance.uncond])
            )
            x_cond, x_uncond = both.chunk(2)
        else:
            x_cond, x_uncond = denoise(z, lam, cond), denoise(z, lam, guidance.uncond)
        x_hat = (1 + w) * x_cond - w * x_uncond
    else:
        x_hat = denoise(z, lam, cond)
    if x_hat.shape != z.shape:
        raise ValueError(f"denoiser output shape {tuple(x_hat.shape)} != z shape {tuple(z.shape)}")
    if not bool(torch.isfinite(x_hat).all()):
        raise FloatingPointError(
            f"denoiser returned non-finite values at step {step} (logSNR {logsnr:.4g})"
        )
    x_hat = x_hat.to(z.dtype)
    return x_hat.clamp(-1.0, 1.0) if clip_x else x_hat


def _check_noise(noise: Tensor) -> None:
    if not noise.is_floating_point():
        raise ValueError(f"noise must be a floating tensor; got {noise.dtype}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("initial noise contains non-finite values (nan or inf)")


def _steps(grid: list[float], progress: bool, name: str):
    pairs = list(enumerate(itertools.pairwise(grid)))
    if progress:
        from tqdm.auto import tqdm

        return tqdm(pairs, desc=name, unit="step")
    return pairs


def _ddpm_step(z: Tensor, x_hat: Tensor, lam_t: float, lam_s: float, generator) -> Tensor:
    """z_s ~ N(alpha_s (z_t (1 - c) / alpha_t + c x_hat), sigma_s^2 c), c = -expm1(lam_t - lam_s)
    (simple diffusion, arXiv 2301.11093)."""
    alpha_t, _ = _alpha_sigma(lam_t)
    alpha_s, sigma_s = _alpha_sigma(lam_s)
    c = -math.expm1(lam_t - lam_s)  # in (0, 1): share of x_hat in the posterior mean
    coef_z = alpha_s * math.exp(lam_t - lam_s) / alpha_t  # alpha_s (1 - c) / alpha_t
    eps = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    return coef_z * z + (alpha_s * c) * x_hat + math.sqrt(sigma_s**2 * c) * eps


def _ddim_step(z: Tensor, x_hat: Tensor, lam_t: float, lam_s: float, generator) -> Tensor:
    """z_s = alpha_s x_hat + sigma_s eps_hat, eps_hat = (z - alpha_t x_hat) / sigma_t taken from
    the (clipped) x_hat."""
    alpha_t, sigma_t = _alpha_sigma(lam_t)
    alpha_s, sigma_s = _alpha_sigma(lam_s)
    ratio = sigma_s / sigma_t
    return ratio * z + (alpha_s - ratio * alpha_t) * x_hat


def _run(step, name, denoise, noise, schedule, steps, cond, guidance, clip_x, generator, progress):
    """The loop both samplers share: one denoiser call per grid point, then ``step``."""
    _check_noise(noise)
    grid = _logsnr_grid(schedule, steps)
    z = noise
    for i, (lam_t, lam_s) in _steps(grid, progress, name):
        x_hat = _guided_x(denoise, z, lam_t, cond, guidance, clip_x, i)
        if lam_s == math.inf:  # the clean end: alpha = 1, sigma = 0, so z_0 = x_hat
            return x_hat
        z = step(z, x_hat, lam_t, lam_s, generator)
    raise AssertionError("unreachable: the grid ends at +inf")


@torch.no_grad()
def sample_ddpm(
    denoise: Denoiser,
    noise: Tensor,
    *,
    schedule: LogSNRFn,
    steps: int,
    cond: Any = None,
    guidance: Guidance | None = None,
    clip_x: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Ancestral DDPM in logSNR form (simple diffusion's sampler); see the module docstring."""
    args = (denoise, noise, schedule, steps, cond, guidance, clip_x, generator, progress)
    return _run(_ddpm_step, "ddpm", *args)


@torch.no_grad()
def sample_ddim(
    denoise: Denoiser,
    noise: Tensor,
    *,
    schedule: LogSNRFn,
    steps: int,
    cond: Any = None,
    guidance: Guidance | None = None,
    clip_x: bool = True,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Deterministic DDIM (eta = 0); ``generator`` is accepted for the shared signature."""
    args = (denoise, noise, schedule, steps, cond, guidance, clip_x, generator, progress)
    return _run(_ddim_step, "ddim", *args)


SAMPLERS: dict[str, Sampler] = {"ddpm": sample_ddpm, "ddim": sample_ddim}


def get_sampler(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {sorted(SAMPLERS)}")
    return SAMPLERS[name]
