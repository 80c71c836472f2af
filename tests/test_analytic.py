"""The exact denoiser against numerical integration of E[x | z] (1-D, float64)."""

import math

import numpy as np
import pytest
import torch

from sdiff.diffusion.analytic import GaussianMixture

MIX = GaussianMixture.create([0.2, 0.5, 0.3], [-0.6, 0.1, 0.7], [0.05, 0.3, 0.12])


def quadrature_posterior_mean(z, lam, labels=None):
    """E[x | z] = int x p(x) N(z; alpha x, sigma^2) dx / int p(x) N(z; alpha x, sigma^2) dx."""
    a, s = math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))
    x = np.linspace(-4, 4, 400_001)
    comps = range(3) if labels is None else labels
    prior = sum(
        MIX.weights[k].item()
        * np.exp(-0.5 * ((x - MIX.means[k, 0].item()) / MIX.stds[k].item()) ** 2)
        / MIX.stds[k].item()
        for k in comps
    )
    like = np.exp(-0.5 * ((z - a * x) / s) ** 2)
    return float((x * prior * like).sum() / (prior * like).sum())


@pytest.mark.parametrize("lam", [-6.0, -1.0, 0.5, 3.0, 8.0])
def test_posterior_mean_matches_quadrature(lam):
    zs = [-1.2, -0.3, 0.0, 0.4, 1.5]
    got = MIX.denoise(
        torch.tensor(zs, dtype=torch.float64)[:, None], torch.full((5,), lam, dtype=torch.float64)
    )
    want = [quadrature_posterior_mean(z, lam) for z in zs]
    np.testing.assert_allclose(got[:, 0].numpy(), want, atol=1e-7)
    # conditioned on a label: that component alone; the null label (3): the whole mixture
    cond = torch.tensor([0, 1, 2, 3, 1])
    got_c = MIX.denoise(
        torch.tensor(zs, dtype=torch.float64)[:, None],
        torch.full((5,), lam, dtype=torch.float64),
        cond,
    )
    want_c = [
        quadrature_posterior_mean(z, lam, None if k == 3 else [k])
        for z, k in zip(zs, cond.tolist(), strict=True)
    ]
    np.testing.assert_allclose(got_c[:, 0].numpy(), want_c, atol=1e-7)


def test_moments_and_sampling():
    w, m, s = MIX.weights.numpy(), MIX.means[:, 0].numpy(), MIX.stds.numpy()
    mean = (w * m).sum()
    assert MIX.mean().item() == pytest.approx(mean)
    assert MIX.variance().item() == pytest.approx((w * (s**2 + m**2)).sum() - mean**2)
    x, labels = MIX.sample(50_000, torch.Generator().manual_seed(0))
    var = MIX.variance().item()
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / 50_000)
    counts = torch.bincount(labels, minlength=3).double() / 50_000
    assert torch.allclose(counts, MIX.weights, atol=4 * math.sqrt(0.25 / 50_000))


def test_bad_mixtures_and_labels():
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture.create([0.5, 0.5], [0.0, 1.0], [0.1, -0.1])
    with pytest.raises(ValueError, match="labels must lie"):
        MIX.denoise(torch.zeros(2, 1), torch.zeros(2), torch.tensor([0, 4]))
