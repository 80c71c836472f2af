"""Noise schedules as logSNR functions of continuous time t in [0, 1] (t=0 data, t=1 noise).

Every schedule is a plain function ``logsnr_<name>(t, ...) -> Tensor``; shifting and
interpolation are built on the cosine one. A variance-preserving process follows from logSNR
alone: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda) (``alpha_sigma``).

Conventions (simple diffusion, arXiv 2301.11093, "Adjusting Noise Schedules"):
- ``logsnr_cosine`` is the alpha-cosine schedule, lambda(t) = -2 log tan(pi t / 2), clipped to
  [logsnr_min, logsnr_max] by rescaling t between t_min = atan(exp(-logsnr_max / 2)) and
  t_max = atan(exp(-logsnr_min / 2)).
- ``logsnr_shifted`` adds 2 log(base / resolution) *after* clipping, so the clipped range moves
  with the shift (as in google/hackable_diffusion and the best-known PyTorch re-implementation):
  at 512 px from base 64 the range is [-19.16, 10.84].
- ``logsnr_interpolated`` interpolates in logSNR between two shifted schedules. Default: the
  strong shift (``base_noisy=32``) at the noisy end t=1 and the weak shift (``base_clean=256``)
  at the clean end t=0, following the SiD2 appendix and the best-known public
  re-implementation; one transcription of simple diffusion swaps the ends. Both bases are
  explicit parameters, so either reading can be run.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from sdiff.util.validation import FINITE, POSITIVE_INT, Range, check_fields

LogSNRFn = Callable[[Tensor], Tensor]

__all__ = [
    "SCHEDULES",
    "LogSNRFn",
    "ScheduleConfig",
    "alpha_sigma",
    "dlogsnr_dt",
    "get_schedule",
    "logsnr_cosine",
    "logsnr_interpolated",
    "logsnr_shifted",
    "shift_for_resolution",
    "t_from_logsnr",
    "t_from_logsnr_cosine",
]


def _compiling() -> bool:
    # Data-dependent checks would break a compiled graph; eager calls pay one host sync.
    return torch.compiler.is_compiling()


def _as_time(t: Tensor | float) -> Tensor:
    """Turn t into a floating tensor and reject values outside [0, 1] or non-finite ones."""
    t = _as_float(t)
    if not _compiling():
        if not bool(torch.isfinite(t).all()):
            raise ValueError("schedule time t contains non-finite values (nan or inf)")
        if t.numel() and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(
                f"schedule time t must lie in [0, 1]; got values in "
                f"[{t.min().item():.6g}, {t.max().item():.6g}]"
            )
    return t


def _as_float(x: Tensor | float) -> Tensor:
    x = torch.as_tensor(x)
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_range(logsnr_min: float, logsnr_max: float) -> None:
    if not (math.isfinite(logsnr_min) and math.isfinite(logsnr_max)):
        raise ValueError(f"logSNR clip range must be finite; got [{logsnr_min}, {logsnr_max}]")
    if not logsnr_min < logsnr_max:
        raise ValueError(f"need logsnr_min < logsnr_max; got [{logsnr_min}, {logsnr_max}]")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive number of pixels; got {value!r}")


def _angle_range(logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    # lambda = -2 log tan(theta)  <=>  theta = atan(exp(-lambda / 2)).
    return math.atan(math.exp(-logsnr_max / 2)), math.atan(math.exp(-logsnr_min / 2))


def logsnr_cosine(t: Tensor | float, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Tensor:
    """alpha-cosine schedule (alpha_t = cos(pi t / 2)) clipped to [logsnr_min, logsnr_max].

    lambda(t) = -2 log tan(t_min + t (t_max - t_min)).
    Decreasing in t: lambda(0) = logsnr_max, lambda(1) = logsnr_min.
    """
    _check_range(logsnr_min, logsnr_max)
    t = _as_time(t)
    t_min, t_max = _angle_range(logsnr_min, logsnr_max)
    # Same value, better conditioned near t=1: -2 log tan(theta) = 2 log tan(pi/2 - theta) with
    # pi/2 - theta = (pi/2 - t_max) + (1 - t)(t_max - t_min); 1 - t is exact in floating point.
    near_noise = t > 0.5
    angle = torch.where(
        near_noise,
        (math.pi / 2 - t_max) + (1 - t) * (t_max - t_min),
        t_min + t * (t_max - t_min),
    )
    sign = torch.where(near_noise, 2.0, -2.0).to(t.dtype)
    return sign * torch.log(torch.tan(angle))


def shift_for_resolution(resolution: float, base: float) -> float:
    """The logSNR shift 2 log(base / resolution): -1.386 at 128, -2.773 at 256, -4.159 at 512
    from base 64. Pooling d x d to d/s x d/s multiplies the SNR by s^2 (simple diffusion,
    arXiv 2301.11093, "Adjusting Noise Schedules").
    """
    _check_positive("resolution", resolution)
    _check_positive("base", base)
    return 2.0 * math.log(base / resolution)


def logsnr_shifted(
    t: Tensor | float,
    resolution: int,
    base: int = 64,
    logsnr_min: float = -15.0,
    logsnr_max: float = 15.0,
) -> Tensor:
    """Shifted cosine schedule: lambda_cosine(t) + 2 log(base / resolution) (simple
    diffusion, arXiv 2301.11093).

    The cosine is clipped first, then shifted, so the range becomes
    [logsnr_min + shift, logsnr_max + shift].
    """
    return logsnr_cosine(t, logsnr_min, logsnr_max) + shift_for_resolution(resolution, base)


def logsnr_interpolated(
    t: Tensor | float,
    resolution: int,
    base_noisy: int = 32,
    base_clean: int = 256,
    logsnr_min: float = -15.0,
    logsnr_max: float = 15.0,
) -> Tensor:
    """Interpolated schedule: lambda(t) = t lambda_shift(base_noisy)(t)
    + (1 - t) lambda_shift(base_clean)(t).

    ``base_noisy`` is the shift reached at t = 1 (noise), ``base_clean`` the one at t = 0 (data).
    The default (32 at the noisy end, 256 at the clean end, the paper's 512 px example) follows
    the SiD2 appendix: the strong shift belongs where global structure is decided, at high
    noise. Pass ``base_noisy=256, base_clean=32`` for the other transcription.
    """
    t = _as_time(t)
    noisy = logsnr_shifted(t, resolution, base_noisy, logsnr_min, logsnr_max)
    clean = logsnr_shifted(t, resolution, base_clean, logsnr_min, logsnr_max)
    return t * noisy + (1.0 - t) * clean


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "cosine": logsnr_cosine,
    "shifted": logsnr_shifted,
    "interpolated": logsnr_interpolated,
}


def get_schedule(name: str, **params: float) -> LogSNRFn:
    """Resolve a schedule by its config name and bind its parameters: returns t -> logSNR.

    >>> lam = get_schedule("shifted", resolution=256)
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {sorted(SCHEDULES)}")
    fn = SCHEDULES[name]
    allowed = [p for p in inspect.signature(fn).parameters if p != "t"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} takes {allowed}; unexpected {unknown}")
    schedule = functools.partial(fn, **params)
    schedule(torch.tensor([0.0, 1.0], dtype=torch.float64))  # validate parameters now
    return schedule


# Every numeric field of ScheduleConfig; the clip range must also be increasing (__post_init__).
SCHEDULE_RULES: dict[str, Range] = {
    "base": POSITIVE_INT,  # resolutions in pixels: the shift is 2 log(base / resolution)
    "base_noisy": POSITIVE_INT,
    "base_clean": POSITIVE_INT,
    "logsnr_min": FINITE,
    "logsnr_max": FINITE,
}


@dataclass(frozen=True)
class ScheduleConfig:
    """A schedule as it appears in a run config; ``build(resolution)`` gives t -> logSNR.

    Fields a schedule does not use are ignored by it (``base`` only matters for "shifted",
    ``base_noisy``/``base_clean`` only for "interpolated").
    """

    name: str = "shifted"
    base: int = 64  # shifted: reference resolution of the unshifted cosine
    base_noisy: int = 32  # interpolated: shift base at t = 1
    base_clean: int = 256  # interpolated: shift base at t = 0
    logsnr_min: float = -15.0
    logsnr_max: float = 15.0

    def __post_init__(self) -> None:
        check_fields(self, "diffusion.schedule", SCHEDULE_RULES)
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"diffusion.schedule: need logsnr_min < logsnr_max; "
                f"got [{self.logsnr_min}, {self.logsnr_max}]"
            )

    def build(self, resolution: int) -> LogSNRFn:
        params = {"logsnr_min": self.logsnr_min, "logsnr_max": self.logsnr_max}
        if self.name == "shifted":
            params |= {"resolution": resolution, "base": self.base}
        elif self.name == "interpolated":
            params |= {
                "resolution": resolution,
                "base_noisy": self.base_noisy,
                "base_clean": self.base_clean,
            }
        return get_schedule(self.name, **params)

    def to_dict(self) -> dict:
        return asdict(self)


def alpha_sigma(logsnr: Tensor) -> tuple[Tensor, Tensor]:
    """Variance-preserving coefficients: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


def dlogsnr_dt(schedule: LogSNRFn, t: Tensor) -> Tensor:
    """d lambda / d t of any (elementwise) schedule, by forward-mode differentiation.

    Used by the SiD2 weighting (-d lambda/dt). Tested against the closed form of the cosine,
    d lambda/dt = -4 (t_max - t_min) / sin(2 theta).
    """
    t = _as_time(t)
    _, tangent = torch.func.jvp(schedule, (t,), (torch.ones_like(t),))
    return tangent


def t_from_logsnr_cosine(
    logsnr: Tensor | float, logsnr_min: float = -15.0, logsnr_max: float = 15.0
) -> Tensor:
    """Closed-form inverse of ``logsnr_cosine``; logsnr must lie in [logsnr_min, logsnr_max]."""
    _check_range(logsnr_min, logsnr_max)
    logsnr = _as_float(logsnr)
    _check_logsnr_in(logsnr, logsnr_min, logsnr_max)
    t_min, t_max = _angle_range(logsnr_min, logsnr_max)
    theta = torch.atan(torch.exp(-logsnr / 2))
    return ((theta - t_min) / (t_max - t_min)).clamp(0.0, 1.0)


def _check_logsnr_in(logsnr: Tensor, lo: float, hi: float) -> None:
    if _compiling():
        return
    if not bool(torch.isfinite(logsnr).all()):
        raise ValueError("logSNR contains non-finite values (nan or inf)")
    tol = 1e-9 * max(1.0, abs(lo), abs(hi))
    if logsnr.numel() and not bool(((logsnr >= lo - tol) & (logsnr <= hi + tol)).all()):
        raise ValueError(
            f"logSNR outside the schedule's range [{lo:.6g}, {hi:.6g}]: got values in "
            f"[{logsnr.min().item():.6g}, {logsnr.max().item():.6g}]"
        )


def t_from_logsnr(schedule: LogSNRFn, logsnr: Tensor | float, iters: int = 60) -> Tensor:
    """Inverse of any decreasing schedule by bisection in float64 (2^-60 resolution in t).

    For schedules without a closed-form inverse (the interpolated one). Values outside
    [schedule(1), schedule(0)] raise.
    """
    logsnr = _as_float(logsnr)
    target = logsnr.to(torch.float64)
    ends = schedule(torch.tensor([0.0, 1.0], dtype=torch.float64, device=target.device))
    hi_val, lo_val = float(ends[0]), float(ends[1])
    if not lo_val < hi_val:
        raise ValueError("t_from_logsnr needs a schedule that decreases from t=0 to t=1")
    _check_logsnr_in(target, lo_val, hi_val)
    lo = torch.zeros_like(target)  # schedule(lo) >= target
    hi = torch.ones_like(target)  # schedule(hi) <= target
    for _ in range(iters):
        mid = (lo + hi) / 2
        above = schedule(mid) > target
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return ((lo + hi) / 2).to(logsnr.dtype)
