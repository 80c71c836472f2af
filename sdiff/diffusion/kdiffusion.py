"""k-diffusion's samplers on sdiff's denoisers.

k-diffusion (crowsonkb/k-diffusion; Karras et al., arXiv 2206.00364) samples the
variance-exploding process x = x0 + sigma eps with a denoiser D(x, sigma) -> x0 estimate.
sdiff's process is variance preserving, z = alpha x0 + sigma_t eps with alpha^2 = sigmoid(lambda),
sigma_t^2 = sigmoid(-lambda) (simple diffusion, arXiv 2301.11093, section 2). Dividing by alpha
gives the VE form: z / alpha = x0 + (sigma_t / alpha) eps, so

    sigma = sigma_t / alpha = exp(-lambda / 2),    lambda = -2 log sigma,
    x = z / alpha,   alpha = sigmoid(lambda)^(1/2) = (1 + sigma^2)^(-1/2),

and D(x, sigma) = x_hat(z = alpha x, lambda), the same posterior mean. ``KDiffusionDenoiser``
wraps any sdiff denoiser ``denoise(z, logsnr, cond) -> x_hat`` (``samplers.x_predictor`` makes
one from a model) into that D, with classifier-free guidance and clipping exactly as sdiff's
samplers apply them (``samplers.Guidance``; k-diffusion's "cond_scale" is 1 + w).

``sigmas_from_schedule`` gives sdiff's sampling grid (t_i = i / steps, i = steps ... 1, then
the clean end) as k-diffusion's descending sigmas ending in 0; the VP start z_1 = noise is
x = noise / alpha_1 = noise (1 + sigma_max^2)^(1/2) (``noise_to_ve``). On that grid
k-diffusion's Euler sampler is sdiff's DDIM: DDIM's step z_s = alpha_s x_hat + sigma_s eps_hat,
eps_hat = (z_t - alpha_t x_hat) / sigma_t, divided by alpha_s, reads
x_s = x_hat + (sigma_s / sigma_t)(x_t - x_hat) = x_t + (sigma_s - sigma_t)(x_t - x_hat) / sigma_t,
the Euler step of the probability-flow ODE dx/dsigma = (x - D) / sigma; the last step (to
sigma = 0) returns x_hat in both. ``kdiffusion_sampler(name)`` runs any k-diffusion sampler
that takes a sigma list through sdiff's shared sampler signature.

k-diffusion is an optional extra (``pip install 'sdiff[kdiffusion]'`` plus
``pip install --no-deps k-diffusion dctorch``, which ``make`` does); this module imports it
only in ``kdiffusion_sampler`` and ``k_sampling``.
"""

from __future__ import annotations

import inspect
import math
import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from sdiff.diffusion.samplers import Denoiser, Guidance, Sampler, _guided_x, _logsnr_grid
from sdiff.diffusion.schedules import LogSNRFn, t_from_logsnr

__all__ = [
    "KDIFFUSION_SAMPLERS",
    "KDiffusionDenoiser",
    "k_sampling",
    "kdiffusion_sampler",
    "noise_to_ve",
    "sigmas_from_schedule",
]

INSTALL_HINT = (
    "k-diffusion is not installed: pip install 'sdiff[kdiffusion]' and then "
    "pip install --no-deps k-diffusion==0.1.1.post1 dctorch==0.1.2 (make .venv/.dev does both)"
)

# k-diffusion 0.1.1's samplers that take a sigma list (sample_<name>); sample_dpm_fast and
# sample_dpm_adaptive take sigma_min/sigma_max instead (see KDiffusionDenoiser's attributes).
KDIFFUSION_SAMPLERS = (
    "dpm_2", "dpm_2_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2s_ancestral",
    "dpmpp_3m_sde", "dpmpp_sde", "euler", "euler_ancestral", "heun", "lms",
)  # fmt: skip
# the ones whose default noise is a Brownian tree (sub-steps of one interval share one path)
_BROWNIAN = ("dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde")


def k_sampling() -> types.ModuleType:
    """``k_diffusion.sampling``, or an ImportError that says how to install it."""
    try:
        with warnings.catch_warnings():  # its dependencies' import-time deprecation notices
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
            import k_diffusion.sampling
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} ({err})") from err
    return k_diffusion.sampling


def sigmas_from_schedule(
    schedule: LogSNRFn,
    steps: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """sdiff's sampling grid as k-diffusion sigmas: (steps + 1,), descending, ending in 0.

    sigmas[i] = exp(-lambda(t) / 2) at t = (steps - i) / steps for i < steps (the same grid as
    ``sample_ddpm``/``sample_ddim``), and sigmas[steps] = 0, the clean end (lambda = +inf).
    """
    grid = _logsnr_grid(schedule, steps)  # logSNR at t = 1 ... 1/steps, then +inf
    return torch.tensor([math.exp(-lam / 2) for lam in grid], dtype=dtype, device=device)


def noise_to_ve(noise: Tensor, sigma: float | Tensor) -> Tensor:
    """The VP start z = ``noise`` at noise level ``sigma`` as k-diffusion's x = z / alpha =
    z (1 + sigma^2)^(1/2) (for large sigma about k-diffusion's own noise * sigma)."""
    return noise * math.sqrt(1 + float(sigma) ** 2)


class KDiffusionDenoiser(nn.Module):
    """An sdiff denoiser as k-diffusion's D(x, sigma, cond=...) -> x0 estimate.

    ``denoise(z, logsnr, cond) -> x_hat``; ``guidance`` and ``clip_x`` act as in sdiff's
    samplers (guidance inside its logSNR interval only; x_hat clipped to [-1, 1]). k-diffusion
    calls it with one sigma for the whole batch (``sigma * s_in``), which is required here;
    ``cond`` comes through k-diffusion's ``extra_args={"cond": ...}``. At sigma = 0 it returns
    x (the clean end, where the posterior mean is x itself).

    With a ``schedule`` it also has what k-diffusion's helpers read: ``sigma_min`` and
    ``sigma_max`` (the schedule's ends, e.g. for ``get_sigmas_karras(n, model.sigma_min,
    model.sigma_max)``), ``get_sigmas(n)`` (sdiff's grid, ``sigmas_from_schedule``) and
    ``t_to_sigma``/``sigma_to_t`` between sdiff's time t in [0, 1] and sigma.
    """

    def __init__(
        self,
        denoise: Denoiser,
        schedule: LogSNRFn | None = None,
        *,
        guidance: Guidance | None = None,
        clip_x: bool = True,
    ) -> None:
        super().__init__()
        self.denoise = denoise
        self.schedule = schedule
        self.guidance = guidance
        self.clip_x = clip_x
        self.calls = 0  # denoiser evaluations so far (named in error messages)
        if schedule is not None:
            ends = schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))
            self.sigma_min = math.exp(-float(ends[0]) / 2)
            self.sigma_max = math.exp(-float(ends[1]) / 2)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Any = None) -> Tensor:
        sigma = torch.as_tensor(sigma)
        first = sigma.flatten()[0] if sigma.numel() else None
        if first is None or sigma.ndim > 1 or not bool((sigma == first).all()):
            raise ValueError(
                f"KDiffusionDenoiser takes one sigma for the batch (k-diffusion passes sigma * "
                f"s_in); got a sigma of shape {tuple(sigma.shape)} that is not one value repeated"
            )
        s = float(first)
        if not (math.isfinite(s) and s >= 0):
            raise ValueError(f"sigma must be finite and >= 0; got {s}")
        if s == 0:
            return x
        logsnr = -2 * math.log(s)
        z = x * (1 / math.sqrt(1 + s * s))  # alpha x
        self.calls += 1
        return _guided_x(self.denoise, z, logsnr, cond, self.guidance, self.clip_x, self.calls)

    def get_sigmas(self, n: int) -> Tensor:
        """sdiff's n-step grid as sigmas (``sigmas_from_schedule``)."""
        return sigmas_from_schedule(self._schedule(), n)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return torch.exp(-self._schedule()(t) / 2)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return t_from_logsnr(self._schedule(), -2 * torch.log(torch.as_tensor(sigma)))

    def _schedule(self) -> LogSNRFn:
        if self.schedule is None:
            raise ValueError("this KDiffusionDenoiser was built without a schedule")
        return self.schedule


def kdiffusion_sampler(name: str) -> Sampler:
    """k-diffusion's ``sample_<name>`` with sdiff's shared sampler signature
    (``sdiff.diffusion.samplers``): the sigmas of sdiff's grid, the start ``noise_to_ve(noise,
    sigma_max)``, ``cond`` as ``extra_args``. Noise of stochastic samplers is drawn from
    ``generator`` (a Brownian tree seeded from it for the SDE samplers) when one is given."""
    if name not in KDIFFUSION_SAMPLERS:
        known = list(KDIFFUSION_SAMPLERS)
        raise ValueError(f"unknown k-diffusion sampler {name!r}; known: {known}")

    @torch.no_grad()
    def sample(
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
        ks = k_sampling()
        fn = getattr(ks, f"sample_{name}")
        dtype = torch.promote_types(noise.dtype, torch.float32)
        sigmas = sigmas_from_schedule(schedule, steps, device=noise.device, dtype=dtype)
        model = KDiffusionDenoiser(denoise, schedule, guidance=guidance, clip_x=clip_x)
        x = noise_to_ve(noise, sigmas[0])
        kwargs: dict[str, Any] = {"extra_args": {"cond": cond}, "disable": not progress}
        if generator is not None and "noise_sampler" in inspect.signature(fn).parameters:
            if name in _BROWNIAN:
                seed = int(torch.randint(2**31 - 1, (), generator=generator))
                positive = sigmas[sigmas > 0]
                # a little wider than the grid: the samplers' exp(-log sigma) round-trips
                # may land just outside it
                lo, hi = float(positive.min()) * (1 - 1e-6), float(positive.max()) * (1 + 1e-6)
                kwargs["noise_sampler"] = ks.BrownianTreeNoiseSampler(x, lo, hi, seed=seed)
            else:
                kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(
                    x.shape, generator=generator, device=x.device, dtype=x.dtype
                )
        return fn(model, x, sigmas, **kwargs)

    sample.__name__ = sample.__qualname__ = f"kdiffusion_{name}"
    return sample
