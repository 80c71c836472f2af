"""k-diffusion's samplers through the adapter, against sdiff's samplers and the exact answer.

On the exact denoiser of a Gaussian mixture (float64): k-diffusion's Euler sampler on sdiff's
grid is sdiff's DDIM, its Euler-ancestral sampler is sdiff's DDPM (the same noise drawn from the
same generator), and DPM-Solver++(2M) reproduces the mixture's moments. The adapter itself is
checked against the closed-form VE posterior mean of a Gaussian, which needs no k-diffusion.
"""

import math
import sys

import pytest
import torch

from sdiff.diffusion.analytic import GaussianMixture
from sdiff.diffusion.kdiffusion import (
    KDIFFUSION_SAMPLERS,
    KDiffusionDenoiser,
    k_sampling,
    kdiffusion_sampler,
    noise_to_ve,
    sigmas_from_schedule,
)
from sdiff.diffusion.sampler_check import SamplerCheck, moments_table
from sdiff.diffusion.samplers import Guidance, sample_ddim, sample_ddpm, x_predictor
from sdiff.diffusion.schedules import get_schedule
from sdiff.models.presets import build_model, get_preset

SCHEDULES = {
    "cosine": get_schedule("cosine"),
    "shifted-512": get_schedule("shifted", resolution=512),  # sigma_max = 14464
    "interpolated-128": get_schedule("interpolated", resolution=128),
}
# a 2-D two-component mixture, one component wider than the other
MIXTURE = GaussianMixture.create((0.3, 0.7), [[-0.5, 0.2], [0.4, -0.3]], (0.15, 0.2))


def k_diffusion_sampling():
    pytest.importorskip("k_diffusion", reason="k-diffusion is an optional extra")
    return k_sampling()


def test_sigmas_are_the_samplers_grid():
    schedule = SCHEDULES["shifted-512"]
    sigmas = sigmas_from_schedule(schedule, 5)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (6,)
    t = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64)
    assert torch.allclose(sigmas[:5], torch.exp(-schedule(t) / 2), rtol=1e-15, atol=0)
    assert sigmas[5] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    # the cosine from base 64 shifted by 2 log(64/512) = -4.159: sigma_max = exp((15 + 4.159)/2)
    assert float(sigmas[0]) == pytest.approx(math.exp((15 + 2 * math.log(8)) / 2), rel=1e-12)
    model = KDiffusionDenoiser(MIXTURE.denoise, schedule)
    assert model.sigma_max == pytest.approx(float(sigmas[0]), rel=1e-14)
    assert model.sigma_min == pytest.approx(math.exp(-(15 - 2 * math.log(8)) / 2), rel=1e-12)
    assert torch.equal(model.get_sigmas(5), sigmas)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(model.sigma_to_t(model.t_to_sigma(t)), t, atol=1e-12)


def test_the_adapter_is_the_ve_posterior_mean():
    """For x0 ~ N(m, s^2) and x = x0 + sigma eps: E[x0 | x] = m + s^2 (x - m) / (s^2 + sigma^2)."""
    m, s = 0.3, 0.4
    gaussian = GaussianMixture.create([1.0], [m], s)
    model = KDiffusionDenoiser(gaussian.denoise, clip_x=False)
    x = torch.linspace(-30, 30, 7, dtype=torch.float64)[:, None]
    for sigma in (1e-3, 0.5, 3.0, 2000.0):
        expected = m + s**2 * (x - m) / (s**2 + sigma**2)
        got = model(x, torch.full((7,), sigma, dtype=torch.float64))
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-14), sigma
    assert torch.equal(model(x, torch.zeros(7, dtype=torch.float64)), x)  # the clean end
    with pytest.raises(ValueError, match="one sigma for the batch"):
        model(x, torch.linspace(1, 2, 7, dtype=torch.float64))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 7, 32])
def test_euler_is_ddim(name, steps):
    """DDIM is the Euler method of the probability-flow ODE in the VE variables, on the same
    grid: the first step starts at sigma_max from x = noise / alpha_1, the last goes to 0."""
    ks = k_diffusion_sampling()
    schedule = SCHEDULES[name]
    noise = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ddim = sample_ddim(MIXTURE.denoise, noise, schedule=schedule, steps=steps, clip_x=False)
    sigmas = sigmas_from_schedule(schedule, steps)
    model = KDiffusionDenoiser(MIXTURE.denoise, schedule, clip_x=False)
    euler = ks.sample_euler(model, noise_to_ve(noise, sigmas[0]), sigmas, disable=True)
    assert model.calls == steps
    assert (euler - ddim).abs().max() < 1e-10


def test_guidance_and_clipping_pass_through():
    """Through the shared signature, with guidance (an interval) and clipping: DDIM again."""
    k_diffusion_sampling()
    check = SamplerCheck()
    pair = check.guided_pair()
    n = 256
    noise = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    guidance = Guidance(2.0, torch.ones(n, dtype=torch.long), logsnr_min=-5, logsnr_max=5)
    args = dict(schedule=SCHEDULES["cosine"], steps=16, cond=torch.zeros(n, dtype=torch.long),
                guidance=guidance, clip_x=True)  # fmt: skip
    ddim = sample_ddim(pair.denoise, noise, **args)
    euler = kdiffusion_sampler("euler")(pair.denoise, noise, **args)
    assert (euler - ddim).abs().max() < 1e-10
    plain = kdiffusion_sampler("euler")(pair.denoise, noise, **{**args, "guidance": None})
    assert (plain - euler).abs().max() > 0.1  # the guidance did act


def test_a_float32_network_through_the_adapter():
    """A U-ViT (v-prediction, class labels with the null class) in float32: Euler's images are
    DDIM's to float32 rounding (5e-5 measured; the VE x reaches sigma_max = 1808 here)."""
    k_diffusion_sampling()
    torch.manual_seed(0)
    denoise = x_predictor(build_model(get_preset("uvit-tiny-32")).eval(), "v")
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    args = dict(schedule=SCHEDULES["cosine"], steps=8, cond=torch.tensor([3, 10]))
    ddim = sample_ddim(denoise, noise, **args)
    euler = kdiffusion_sampler("euler")(denoise, noise, **args)
    assert euler.dtype == torch.float32 and (euler - ddim).abs().max() < 5e-4


def test_euler_ancestral_is_ddpm():
    """With eta = 1 k-diffusion's ancestral step is the DDPM posterior step in VE form, and it
    draws one noise tensor per step except the last, as sdiff's DDPM does."""
    k_diffusion_sampling()
    schedule = SCHEDULES["interpolated-128"]
    noise = torch.randn(128, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    runs = {}
    for name, sampler in (("ddpm", sample_ddpm), ("k", kdiffusion_sampler("euler_ancestral"))):
        runs[name] = sampler(MIXTURE.denoise, noise, schedule=schedule, steps=24, clip_x=False,
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert (runs["k"] - runs["ddpm"]).abs().max() < 1e-10


def test_dpmpp_2m_reproduces_the_mixture():
    """A second-order solver through the adapter: mean, variance and the weight of the first
    component within sampling error (|z| < 4.5; see sdiff.diffusion.sampler_check). The guided
    case needs the 64 steps: at 24 its variance is 13 standard errors short (DDIM's: 28)."""
    k_diffusion_sampling()
    check = SamplerCheck()
    mix, n = check.mixture(), 20_000
    noise = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = kdiffusion_sampler("dpmpp_2m")(mix.denoise, noise, schedule=SCHEDULES["cosine"],
                                          steps=64, clip_x=False)  # fmt: skip
    expected = {
        "mean": float(mix.mean()[0]),
        "variance": float(mix.variance()[0]),
        "weight0": float(mix.weights[0]),
        "measure_weight0": lambda s: float((mix.nearest_component(s) == 0).double().mean()),
    }
    rows = moments_table(out, expected)
    assert [r["statistic"] for r in rows] == ["mean", "variance", "weight0"]
    assert all(abs(r["z"]) < 4.5 for r in rows), rows
    # guided: (1 + w) score_c - w score_u is the score of N((1 + w) m_c - w m_u, s^2)
    pair, w = check.guided_pair(), check.guidance_weight
    (m_c, m_u), cond = check.guided_means, torch.zeros(n, dtype=torch.long)
    guided = kdiffusion_sampler("dpmpp_2m")(
        pair.denoise, noise, schedule=SCHEDULES["cosine"], steps=64, cond=cond,
        guidance=Guidance(w, torch.ones(n, dtype=torch.long)), clip_x=False,
    )  # fmt: skip
    rows = moments_table(guided, {"mean": (1 + w) * m_c - w * m_u, "variance": check.std**2})
    assert all(abs(r["z"]) < 4.5 for r in rows), rows


def test_stochastic_samplers_follow_the_generator():
    k_diffusion_sampling()
    noise = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def draw(name: str, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        sampler = kdiffusion_sampler(name)
        return sampler(MIXTURE.denoise, noise, schedule=SCHEDULES["cosine"], steps=6, generator=gen)

    for name in ("euler_ancestral", "dpmpp_2m_sde"):  # i.i.d. noise; a Brownian tree
        assert torch.equal(draw(name, 5), draw(name, 5))
        assert not torch.equal(draw(name, 5), draw(name, 6))


def test_names_and_missing_k_diffusion(monkeypatch):
    with pytest.raises(ValueError, match="unknown k-diffusion sampler 'dpm_fast'"):
        kdiffusion_sampler("dpm_fast")
    assert "dpmpp_2m" in KDIFFUSION_SAMPLERS
    for name in [m for m in sys.modules if m == "k_diffusion" or m.startswith("k_diffusion.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "k_diffusion", None)  # import k_diffusion fails
    with pytest.raises(ImportError, match=r"pip install 'sdiff\[kdiffusion\]'"):
        k_sampling()
    noise = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ImportError, match="k-diffusion is not installed"):
        kdiffusion_sampler("euler")(MIXTURE.denoise, noise, schedule=SCHEDULES["cosine"], steps=2)
