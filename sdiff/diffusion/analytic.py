"""Exact denoisers for data whose posterior mean E[x | z_t] has a closed form.

For x ~ sum_k pi_k N(m_k, s_k^2 I) (D dimensions) and z = alpha x + sigma eps, each component
gives z ~ N(alpha m_k, (alpha^2 s_k^2 + sigma^2) I) and

    E[x | z, k] = m_k + alpha s_k^2 / (alpha^2 s_k^2 + sigma^2) (z - alpha m_k),
    P(k | z) ∝ pi_k N(z; alpha m_k, (alpha^2 s_k^2 + sigma^2) I),
    E[x | z]    = sum_k P(k | z) E[x | z, k].

Used to test samplers against a known answer (a sampler driven by the exact denoiser must
reproduce the data distribution) and by ``sdiff sampler-check``. The class label k is the
condition; the label K (one past the last component) is the null class, for which the
denoiser is the unconditional mixture, as classifier-free guidance expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from sdiff.diffusion.schedules import alpha_sigma

__all__ = ["GaussianMixture"]


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture in D dimensions; weights (K,), means (K, D), stds (K,)."""

    weights: Tensor
    means: Tensor
    stds: Tensor

    def __post_init__(self) -> None:
        k = self.weights.shape[0]
        if self.weights.ndim != 1 or self.means.ndim != 2 or self.stds.shape != (k,):
            raise ValueError("need weights (K,), means (K, D) and stds (K,)")
        if self.means.shape[0] != k:
            raise ValueError(f"{k} weights but {self.means.shape[0]} means")
        if not bool((self.weights > 0).all()) or abs(float(self.weights.sum()) - 1) > 1e-9:
            raise ValueError("mixture weights must be positive and sum to 1")
        if not bool((self.stds > 0).all()):
            raise ValueError("component standard deviations must be positive")

    @classmethod
    def create(cls, weights, means, stds, dtype=torch.float64) -> GaussianMixture:
        w = torch.as_tensor(weights, dtype=dtype)
        m = torch.as_tensor(means, dtype=dtype)
        if m.ndim == 1:
            m = m[:, None]
        s = torch.as_tensor(stds, dtype=dtype).expand(w.shape[0]).clone()
        return cls(w / w.sum(), m, s)

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    @property
    def null_label(self) -> int:
        return self.num_components

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> Tensor:
        return self.weights @ self.means  # (D,)

    def variance(self) -> Tensor:
        """Per-dimension variance of the mixture: E[s_k^2 + m_k^2] - (E m_k)^2."""
        second = self.weights @ (self.stds[:, None] ** 2 + self.means**2)
        return second - self.mean() ** 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws (n, D) and their component labels (n,)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=self.means.dtype, generator=generator)
        return self.means[labels] + self.stds[labels, None] * noise, labels

    def nearest_component(self, x: Tensor) -> Tensor:
        """Index of the closest component mean for each row of x (N, D)."""
        return torch.cdist(x.to(self.means.dtype), self.means).argmin(dim=1)

    def denoise(self, z: Tensor, logsnr: Tensor, cond: Tensor | None = None) -> Tensor:
        """E[x | z] for z (B, D) at per-example logSNR (B,); cond (B,) restricts to component
        cond[i], the null label (K) or ``cond=None`` gives the whole mixture."""
        zd = z.to(self.means.dtype)
        alpha, sigma = (c.to(zd.dtype)[:, None, None] for c in alpha_sigma(logsnr))  # (B, 1, 1)
        var = alpha**2 * self.stds[None, :, None] ** 2 + sigma**2  # (B, K, 1)
        resid = zd[:, None, :] - alpha * self.means[None]  # (B, K, D)
        x_k = self.means[None] + alpha * self.stds[None, :, None] ** 2 / var * resid  # (B, K, D)
        log_p = (
            torch.log(self.weights)[None]
            - 0.5 * self.dim * torch.log(2 * math.pi * var[..., 0])
            - 0.5 * resid.square().sum(-1) / var[..., 0]
        )  # (B, K)
        if cond is not None:
            cond = torch.as_tensor(cond, device=z.device).long()
            if bool(((cond < 0) | (cond > self.null_label)).any()):
                raise ValueError(
                    f"labels must lie in [0, {self.null_label}] ({self.null_label} = null)"
                )
            only = torch.nn.functional.one_hot(
                cond.clamp(max=self.num_components - 1), self.num_components
            )
            only = torch.where((cond == self.null_label)[:, None], torch.ones_like(only), only)
            log_p = log_p.masked_fill(only == 0, -math.inf)
        resp = torch.softmax(log_p, dim=1)  # (B, K)
        return (resp[..., None] * x_k).sum(1).to(z.dtype)  # (B, D)
