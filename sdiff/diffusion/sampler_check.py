"""Samplers against a known answer: drive each sampler with the exact denoiser of a Gaussian
mixture and compare the moments of what comes out with the data's.

Every figure comes with its Monte Carlo standard error, so a reader can tell discretisation
error (a z-score that stays large as n grows) from sampling noise (|z| of a few):
- mean:     SE = sqrt(var / n)
- variance: SE = var sqrt(2 / (n - 1))   (exact for Gaussian samples; used as a guide otherwise)
- weight of component k (nearest mean): SE = sqrt(p (1 - p) / n)

Two cases with closed-form answers:
- ``mixture``: the unconditional two-component mixture; samples must match its mean, variance
  and component weights.
- ``guided``: classifier-free guidance between two equal-variance Gaussians, cond N(m_c, s^2)
  and uncond N(m_u, s^2). The guided score (1 + w) score_c - w score_u is then exactly the score
  of N((1 + w) m_c - w m_u, s^2) at every noise level, so guided samples follow that Gaussian.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from sdiff.diffusion.analytic import GaussianMixture
from sdiff.diffusion.samplers import Guidance, get_sampler
from sdiff.diffusion.schedules import LogSNRFn, get_schedule

__all__ = ["SamplerCheck", "moments_table", "run_sampler_check"]


@dataclass(frozen=True)
class SamplerCheck:
    """The data of the check: a 1-D two-component mixture inside [-1, 1]."""

    weights: tuple[float, float] = (0.3, 0.7)
    means: tuple[float, float] = (-0.5, 0.4)
    std: float = 0.15
    guidance_weight: float = 1.0
    guided_means: tuple[float, float] = (0.2, -0.1)  # (m_c, m_u) of the guided case

    def mixture(self) -> GaussianMixture:
        return GaussianMixture.create(self.weights, self.means, self.std)

    def guided_pair(self) -> GaussianMixture:
        # component 0 is the condition, component 1 plays the unconditional model
        return GaussianMixture.create((0.5, 0.5), self.guided_means, self.std)


def moments_table(samples: torch.Tensor, expected: dict[str, float]) -> list[dict]:
    """Rows (statistic, expected, measured, standard error, z) for 1-D samples (n, 1)."""
    x = samples.double().flatten()
    n = x.numel()
    var_true = expected["variance"]
    rows = [
        ("mean", expected["mean"], float(x.mean()), math.sqrt(var_true / n)),
        ("variance", var_true, float(x.var()), var_true * math.sqrt(2 / (n - 1))),
    ]
    if "weight0" in expected:
        p = expected["weight0"]
        rows.append(
            ("weight0", p, expected["measure_weight0"](samples), math.sqrt(p * (1 - p) / n))
        )
    return [
        {"statistic": s, "expected": e, "measured": m, "stderr": se, "z": (m - e) / se}
        for s, e, m, se in rows
    ]


def run_sampler_check(
    samplers: tuple[str, ...] = ("ddpm", "ddim"),
    steps: tuple[int, ...] = (16, 64, 256, 1024),
    n: int = 20_000,
    schedule: LogSNRFn | None = None,
    check: SamplerCheck | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Run every sampler x step count on both cases; one row per statistic."""
    schedule = schedule or get_schedule("cosine")
    check = check or SamplerCheck()
    mix, pair = check.mixture(), check.guided_pair()
    w = check.guidance_weight
    m_c, m_u = check.guided_means
    cases = {
        "mixture": (
            mix,
            None,
            None,
            {
                "mean": float(mix.mean()[0]),
                "variance": float(mix.variance()[0]),
                "weight0": float(mix.weights[0]),
                "measure_weight0": lambda s: float((mix.nearest_component(s) == 0).double().mean()),
            },
        ),
        "guided": (
            pair,
            torch.zeros(n, dtype=torch.long),
            Guidance(weight=w, uncond=torch.ones(n, dtype=torch.long)),
            {"mean": (1 + w) * m_c - w * m_u, "variance": check.std**2},
        ),
    }
    rows = []
    for case, (data, cond, guidance, expected) in cases.items():
        for name in samplers:
            for k in steps:
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn(n, 1, dtype=torch.float64, generator=gen)
                out = get_sampler(name)(
                    data.denoise,
                    noise,
                    schedule=schedule,
                    steps=k,
                    cond=cond,
                    guidance=guidance,
                    clip_x=False,
                    generator=gen,
                )
                for row in moments_table(out, expected):
                    rows.append({"case": case, "sampler": name, "steps": k, "n": n, **row})
    return pd.DataFrame(rows)
