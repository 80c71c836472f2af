"""The forward process, prediction targets, loss weightings and the multiscale loss.

Variance-preserving process (simple diffusion, arXiv 2301.11093, "Background: Diffusion
Models"): z_t = alpha_t x + sigma_t eps with alpha^2 = sigmoid(lambda), sigma^2 =
sigmoid(-lambda). The three prediction targets and their
exact conversions, given z and (alpha, sigma) with alpha^2 + sigma^2 = 1:

    x   = (z - sigma eps) / alpha = alpha z - sigma v
    eps = (z - alpha x) / sigma   = sigma z + alpha v
    v   = alpha eps - sigma x     = (eps - sigma z) / alpha = (alpha z - x) / sigma

Losses. A weighting is a per-example factor w(lambda) on the eps-space squared error; a model
predicting target p has eps - eps_hat = c_p (p - p_hat) with c_eps = 1, c_v = alpha,
c_x = -alpha / sigma. The loss is therefore computed on the model's own error, scaled by
exp(log w + log c_p^2) evaluated in log space, which keeps the extreme logSNRs of shifted
schedules (down to -19 at 512 px) finite in float32:

    eps-MSE: w = 1            v-MSE: w = 1 / alpha^2 = 1 + e^-lambda      x-MSE: w = e^-lambda
    SiD2 sigmoid: w = -dlambda/dt * sigmoid(b - lambda)
        (= an x-space error weighted by -dlambda/dt * sigmoid(lambda - b) * e^b).

The SiD2 bias b defaults to 2.0, the value in google/hackable_diffusion's presets (its class
default is 0; third-party code uses -3; the paper's value is not in the text we have).

Multiscale loss (simple diffusion): with D_f the f x f average pooling and d the full error,
L = sum_f w_f mean((D_f d)^2) over pooling factors f = 1, 2, 4, ... while the pooled side
stays >= ``base`` (32). The paper weights a level of side s by 1/s; we use (d/s)^power
= f^power so the full-resolution level has weight 1 and a single level equals the plain loss
(a constant factor d away from the literal 1/s, which Adam does not see). ``power=2`` is the
other transcription (1/s^2); explicit ``weights`` override both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from sdiff.diffusion.schedules import LogSNRFn, ScheduleConfig, alpha_sigma, dlogsnr_dt
from sdiff.util.validation import FINITE, POSITIVE_INT, Range, check_fields

PREDICTIONS = ("eps", "v", "x")
WEIGHTINGS = ("eps", "v", "x", "sigmoid")
TIME_SAMPLING = ("uniform", "stratified")

# model(z, logsnr, cond) -> prediction of the configured target, same shape as z.
Model = Callable[[Tensor, Tensor, Any], Tensor]

__all__ = [
    "PREDICTIONS",
    "WEIGHTINGS",
    "DiffusionConfig",
    "LossOutput",
    "convert",
    "diffusion_loss",
    "log_weight",
    "mse",
    "multiscale_levels",
    "multiscale_mse",
    "q_sample",
    "sample_time",
    "target",
]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {list(choices)}")


def _check_finite(name: str, x: Tensor) -> None:
    if not _compiling() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _per_example(coef: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example (B,) coefficient to broadcast over (B, ...)."""
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


def q_sample(x: Tensor, logsnr: Tensor, noise: Tensor) -> Tensor:
    """Forward process z = alpha x + sigma eps; logsnr has shape (B,) or broadcasts to x."""
    alpha, sigma = alpha_sigma(logsnr)
    return _per_example(alpha, x) * x + _per_example(sigma, x) * noise


def target(prediction: str, x: Tensor, noise: Tensor, logsnr: Tensor) -> Tensor:
    """The regression target of a model that predicts ``prediction`` (eps, v or x)."""
    _check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return noise
    if prediction == "x":
        return x
    alpha, sigma = alpha_sigma(logsnr)
    return _per_example(alpha, x) * noise - _per_example(sigma, x) * x  # v = alpha eps - sigma x


def convert(pred: Tensor, source: str, dest: str, z: Tensor, logsnr: Tensor) -> Tensor:
    """Exact conversion of a prediction between eps, v and x given z and its logSNR."""
    _check_choice("prediction", source, PREDICTIONS)
    _check_choice("prediction", dest, PREDICTIONS)
    if source == dest:
        return pred
    a, s = (_per_example(c, z) for c in alpha_sigma(logsnr))
    if dest == "x":
        return (z - s * pred) / a if source == "eps" else a * z - s * pred
    if dest == "eps":
        return (z - a * pred) / s if source == "x" else s * z + a * pred
    return (pred - s * z) / a if source == "eps" else (a * z - pred) / s  # dest == "v"


def log_weight(
    weighting: str,
    logsnr: Tensor,
    prediction: str = "eps",
    *,
    dlogsnr: Tensor | None = None,
    sigmoid_bias: float = 2.0,
) -> Tensor:
    """log of the per-example factor on the squared error of ``prediction``'s own target.

    = log w_eps(lambda) + log c_p^2 (see the module docstring). ``dlogsnr`` (d lambda/dt at the
    sampled t) is required by the sigmoid weighting.
    """
    _check_choice("weighting", weighting, WEIGHTINGS)
    _check_choice("prediction", prediction, PREDICTIONS)
    if weighting == "eps":
        log_w = torch.zeros_like(logsnr)
    elif weighting == "v":
        log_w = F.softplus(-logsnr)  # 1 / alpha^2 = 1 + e^-lambda
    elif weighting == "x":
        log_w = -logsnr  # sigma^2 / alpha^2
    else:
        if dlogsnr is None:
            raise ValueError("the sigmoid weighting needs dlogsnr (d lambda / dt)")
        # -dlambda/dt * sigmoid(b - lambda), SiD2; log sigmoid(b - lambda) = -softplus(lambda - b)
        log_w = torch.log(-dlogsnr) - F.softplus(logsnr - sigmoid_bias)
    if prediction == "v":
        log_w = log_w - F.softplus(-logsnr)  # c_v^2 = alpha^2 = sigmoid(lambda)
    elif prediction == "x":
        log_w = log_w + logsnr  # c_x^2 = alpha^2 / sigma^2 = e^lambda
    return log_w


def mse(diff: Tensor) -> Tensor:
    """Per-example mean of squares over all non-batch dimensions: (B, ...) -> (B,)."""
    return diff.square().flatten(1).mean(1)


def multiscale_levels(
    height: int, width: int, base: int = 32, power: float = 1.0
) -> list[tuple[int, float]]:
    """(pooling factor f, weight f^power) for the multiscale loss of an H x W image.

    Levels are f = 1, 2, 4, ... while min(H, W) / f >= base and f divides H and W. For a
    d x d image with d = base 2^k these are the sides s = d, d/2, ..., base with weights
    (d / s)^power, i.e. the paper's 1/s up to the constant d.
    """
    if min(height, width) < base:
        raise ValueError(
            f"image of {height}x{width} is below the multiscale base {base}: "
            f"the multiscale loss needs both sides >= base"
        )
    levels, f = [], 1
    while min(height, width) // f >= base and height % f == 0 and width % f == 0:
        levels.append((f, float(f) ** power))
        f *= 2
    return levels


def multiscale_mse(
    diff: Tensor,
    base: int = 32,
    power: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Multiscale squared error of a (B, C, H, W) difference: sum_f w_f mean((D_f diff)^2).

    D_f is f x f average pooling (linear, so D_f[eps] - D_f[eps_hat] = D_f[eps - eps_hat]).
    ``weights``, if given, replaces f^power level by level (finest first).
    """
    if diff.ndim != 4:
        raise ValueError(
            f"multiscale loss needs (B, C, H, W) tensors; got shape {tuple(diff.shape)}"
        )
    levels = multiscale_levels(diff.shape[-2], diff.shape[-1], base, power)
    if weights is not None:
        if len(weights) != len(levels):
            raise ValueError(
                f"{len(weights)} multiscale weights given for {len(levels)} levels "
                f"(pooling factors {[f for f, _ in levels]})"
            )
        levels = [(f, float(w)) for (f, _), w in zip(levels, weights, strict=True)]
    total = diff.new_zeros(diff.shape[0])
    for f, w in levels:
        pooled = diff if f == 1 else F.avg_pool2d(diff, f)  # (B, C, H/f, W/f)
        total = total + w * mse(pooled)
    return total


# Every numeric field of DiffusionConfig (the schedule's are in SCHEDULE_RULES).
DIFFUSION_RULES: dict[str, Range] = {
    "sigmoid_bias": FINITE,  # SiD2's b shifts the sigmoid: any finite value
    "multiscale_base": POSITIVE_INT,
    # 0 weights every level equally; a negative power would weight the coarse levels, which the
    # multiscale loss exists to emphasise, below the full-resolution one
    "multiscale_power": Range(ge=0),
    "multiscale_weights": Range(ge=0),  # a negative weight would reward error at that level
}


@dataclass(frozen=True)
class DiffusionConfig:
    """Everything the training loss needs besides the model and the data.

    Defaults: the shifted cosine schedule from base 64 (simple diffusion), v-prediction (the
    paper found it slightly better than eps, which is unstable near t=1) and an eps-space MSE,
    the space in which the paper writes its multiscale loss. The paper's exact per-t weighting
    is not in the text we have, so ``weighting`` is a parameter.
    """

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prediction: str = "v"
    weighting: str = "eps"
    sigmoid_bias: float = 2.0  # SiD2 b; 2.0 as in google/hackable_diffusion's presets
    multiscale: bool = False
    multiscale_base: int = 32
    multiscale_power: float = 1.0  # level weight (d/s)^power; 1 is the paper's 1/s reading
    multiscale_weights: tuple[float, ...] | None = None
    time_sampling: str = "uniform"  # or "stratified": one t per 1/B stratum (low variance)

    def __post_init__(self) -> None:
        check_fields(self, "diffusion", DIFFUSION_RULES)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        _check_choice("weighting", self.weighting, WEIGHTINGS)
        _check_choice("time sampling", self.time_sampling, TIME_SAMPLING)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_time(
    batch: int,
    method: str = "uniform",
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """t in [0, 1) per example: i.i.d. uniform, or stratified (u + i) / B with one shared u."""
    _check_choice("time sampling", method, TIME_SAMPLING)
    if method == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    u = torch.rand((), device=device, generator=generator)
    return (u + torch.arange(batch, device=device)) / batch


class LossOutput(NamedTuple):
    loss: Tensor  # scalar, mean over the batch
    per_example: Tensor  # (B,)
    t: Tensor  # (B,)
    logsnr: Tensor  # (B,)


def image_resolution(x: Tensor) -> float:
    """The d of a d x d image; sqrt(H W) for a non-square one (same pixel count)."""
    h, w = x.shape[-2], x.shape[-1]
    return h if h == w else math.sqrt(h * w)


def diffusion_loss(
    model: Model,
    x: Tensor,
    config: DiffusionConfig,
    cond: Any = None,
    *,
    schedule: LogSNRFn | None = None,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
) -> LossOutput:
    """One Monte Carlo estimate of the training loss on a batch x (B, C, H, W) in [-1, 1].

    ``schedule`` defaults to ``config.schedule`` built at x's resolution; ``t`` and ``noise``
    may be given to make the estimate deterministic.
    """
    _check_finite("training batch x", x)
    if schedule is None:
        schedule = config.schedule.build(image_resolution(x))
    if t is None:
        t = sample_time(x.shape[0], config.time_sampling, device=x.device, generator=generator)
    if noise is None:
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    # The loss is formed in at least float32 whatever the data or autocast dtype.
    loss_dtype = torch.promote_types(x.dtype, torch.float32)
    x, noise = x.to(loss_dtype), noise.to(loss_dtype)
    logsnr = schedule(t.to(loss_dtype))  # (B,)
    z = q_sample(x, logsnr, noise)  # (B, C, H, W)
    pred = model(z, logsnr, cond)
    if pred.shape != x.shape:
        raise ValueError(f"model output shape {tuple(pred.shape)} != input shape {tuple(x.shape)}")
    diff = target(config.prediction, x, noise, logsnr) - pred.to(loss_dtype)
    if config.multiscale:
        err = multiscale_mse(
            diff, config.multiscale_base, config.multiscale_power, config.multiscale_weights
        )
    else:
        err = mse(diff)
    dlogsnr = dlogsnr_dt(schedule, t.to(loss_dtype)) if config.weighting == "sigmoid" else None
    log_w = log_weight(
        config.weighting,
        logsnr,
        config.prediction,
        dlogsnr=dlogsnr,
        sigmoid_bias=config.sigmoid_bias,
    )
    per_example = torch.exp(log_w) * err
    return LossOutput(per_example.mean(), per_example, t, logsnr)
