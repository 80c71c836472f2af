"""Samplers against analytic answers.

Two independent references:
1. Gaussian data: the exact denoiser is affine in z, so the whole DDPM/DDIM chain is an affine
   Gaussian map of z_1 ~ N(0, 1). Its output mean and variance after any number of steps follow
   from a scalar float64 recursion written here from the paper's formulas (``chain_moments``);
   DDIM is deterministic, so its output is checked sample by sample.
2. Gaussian-mixture data: with enough steps the samples must match the data's mean, variance and
   component weights; tolerances are 4 Monte Carlo standard errors (see ``assert_moments``) and
   the remaining discretisation bias is bounded with reference 1.
"""

import inspect
import itertools
import math

import pytest
import torch

import sdiff.diffusion.samplers as samplers_mod
from sdiff.diffusion.analytic import GaussianMixture
from sdiff.diffusion.process import convert
from sdiff.diffusion.samplers import (
    SAMPLERS,
    Guidance,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    x_predictor,
)
from sdiff.diffusion.schedules import get_schedule

COSINE = get_schedule("cosine")
Z_TOL = 4.0  # |z| above 4 happens with probability 6e-5 per statistic under the null


def a_s(lam):
    if lam == math.inf:
        return 1.0, 0.0
    return math.sqrt(1 / (1 + math.exp(-lam))), math.sqrt(1 / (1 + math.exp(lam)))


def chain_moments(
    kind, steps, m_c, s, w=0.0, m_u=0.0, interval=(-math.inf, math.inf), schedule=COSINE
):
    """(K, M, V): output = K z_1 + M + (Gaussian noise) with total variance V, for data
    N(m_c, s^2), optional guidance against N(m_u, s^2) inside a logSNR interval."""
    t = [i / steps for i in range(steps, 0, -1)]
    lams = [schedule(torch.tensor(ti, dtype=torch.float64)).item() for ti in t] + [math.inf]
    gain, offset, var = 1.0, 0.0, 0.0  # z_t = gain z_1 + offset + N(0, var)
    for lt, ls in itertools.pairwise(lams):
        at, st = a_s(lt)
        k = at * s * s / (at * at * s * s + st * st)  # E[x|z] = m + k (z - alpha m)
        m = (1 + w) * m_c - w * m_u if (w and interval[0] <= lt <= interval[1]) else m_c
        b = m * (1 - k * at)
        if ls == math.inf:
            return k * gain, k * offset + b, k * k * var
        as_, ss = a_s(ls)
        if kind == "ddpm":
            c = 1 - math.exp(lt - ls)
            A, B, noise = as_ * (1 - c) / at + as_ * c * k, as_ * c * b, ss * ss * c
        else:
            r = ss / st
            A, B, noise = r + (as_ - r * at) * k, (as_ - r * at) * b, 0.0
        gain, offset, var = A * gain, A * offset + B, A * A * var + noise
    raise AssertionError


def gaussian_pair(m_c, m_u, s):
    return GaussianMixture.create([0.5, 0.5], [m_c, m_u], s)  # label 0 = cond, 1 = "uncond"


def run(kind, data, n, steps, seed=0, cond=None, guidance=None, clip_x=False, schedule=COSINE):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    out = get_sampler(kind)(
        data.denoise,
        noise,
        schedule=schedule,
        steps=steps,
        cond=cond,
        guidance=guidance,
        clip_x=clip_x,
        generator=gen,
    )
    return noise, out


def assert_moments(x, mean, var, weight0=None, data=None):
    """|measured - expected| <= 4 standard errors for mean, variance (and weight0)."""
    x = x.double().flatten()
    n = x.numel()
    checks = [
        ("mean", x.mean().item(), mean, math.sqrt(var / n)),
        ("variance", x.var().item(), var, var * math.sqrt(2 / (n - 1))),
    ]
    if weight0 is not None:
        p = (data.nearest_component(x[:, None]) == 0).double().mean().item()
        checks.append(("weight0", p, weight0, math.sqrt(weight0 * (1 - weight0) / n)))
    for name, got, want, se in checks:
        assert abs(got - want) <= Z_TOL * se, (
            f"{name}: {got:.5g} vs {want:.5g} (z={(got - want) / se:.1f})"
        )


@pytest.mark.parametrize("steps", [1, 4, 16, 64])
@pytest.mark.parametrize(("w", "interval"), [(0.0, None), (1.5, None), (2.0, (-3.0, 2.0))])
def test_ddim_is_the_exact_affine_chain(steps, w, interval):
    m_c, m_u, s = 0.3, -0.2, 0.4
    interval = interval or (-math.inf, math.inf)
    pair = gaussian_pair(m_c, m_u, s)
    n = 64
    cond, guidance = torch.zeros(n, dtype=torch.long), None
    if w:
        guidance = Guidance(w, torch.ones(n, dtype=torch.long), *interval)
    noise, out = run("ddim", pair, n, steps, cond=cond, guidance=guidance)
    K, M, V = chain_moments("ddim", steps, m_c, s, w, m_u, interval)
    assert V == 0
    assert torch.allclose(out, K * noise + M, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [2, 8, 32])
@pytest.mark.parametrize(("w", "interval"), [(0.0, None), (1.0, None), (3.0, (-2.0, 4.0))])
def test_ddpm_matches_the_exact_chain_moments(steps, w, interval):
    m_c, m_u, s, n = 0.3, -0.2, 0.4, 40_000
    interval = interval or (-math.inf, math.inf)
    pair = gaussian_pair(m_c, m_u, s)
    cond = torch.zeros(n, dtype=torch.long)
    guidance = Guidance(w, torch.ones(n, dtype=torch.long), *interval) if w else None
    _, out = run("ddpm", pair, n, steps, seed=steps, cond=cond, guidance=guidance)
    K, M, V = chain_moments("ddpm", steps, m_c, s, w, m_u, interval)
    assert_moments(out, M, K * K + V)  # z_1 ~ N(0, 1)


# DDPM's step-count bias is about twice DDIM's (reference 1), so it gets twice the steps
STEPS_FOR_DATA = {"ddpm": 2048, "ddim": 1024}


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_many_steps_reproduce_a_gaussian_and_its_guided_shift(kind):
    """With guidance weight w between equal-variance Gaussians, the guided score is exactly the
    score of N((1 + w) m_c - w m_u, s^2): the samples must follow that Gaussian."""
    m_c, m_u, s, w, n = 0.2, -0.1, 0.3, 1.0, 20_000
    steps = STEPS_FOR_DATA[kind]
    target_mean = (1 + w) * m_c - w * m_u
    K, _, V = chain_moments(kind, steps, m_c, s, w, m_u)
    se_var = s * s * math.sqrt(2 / n)
    # both samplers are first order: the variance falls short by O(1/steps) (reference 1);
    # at this step count the shortfall is below 1 SE, inside the 4 SE tolerance
    assert abs(K * K + V - s * s) < se_var
    pair = gaussian_pair(m_c, m_u, s)
    guidance = Guidance(w, torch.ones(n, dtype=torch.long))
    _, out = run(kind, pair, n, steps, cond=torch.zeros(n, dtype=torch.long), guidance=guidance)
    assert_moments(out, target_mean, s * s)
    _, plain = run(kind, pair, n, steps, cond=torch.zeros(n, dtype=torch.long))
    assert_moments(plain, m_c, s * s)


MIX = GaussianMixture.create([0.3, 0.7], [-0.5, 0.4], 0.15)


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_mixture_mean_variance_and_weights(kind):
    n, steps = 20_000, 1024
    # discretisation bias of the within-component variance at this step count, from reference 1
    K, _, V = chain_moments(kind, steps, 0.0, 0.15)
    var = MIX.variance().item()
    assert abs(K * K + V - 0.15**2) < 0.5 * var * math.sqrt(2 / n)  # < 0.5 SE of the total
    _, out = run(kind, MIX, n, steps, seed=3)
    assert_moments(out, MIX.mean().item(), var, weight0=0.3, data=MIX)


def test_mixture_with_clipping_stays_in_range_and_correct():
    n = 20_000
    _, out = run("ddpm", MIX, n, 1024, seed=5, clip_x=True)
    assert out.abs().max() <= 1.0
    assert_moments(out, MIX.mean().item(), MIX.variance().item(), weight0=0.3, data=MIX)


def test_the_checks_can_fail():
    """Negative controls: too few steps, and a DDPM without its noise term, are both caught."""
    n = 20_000
    _, few = run("ddpm", MIX, n, 8, seed=3)
    with pytest.raises(AssertionError, match="z="):
        assert_moments(few, MIX.mean().item(), MIX.variance().item(), weight0=0.3, data=MIX)

    # the same DDPM with its per-step noise zeroed (the initial noise is drawn before)
    noise = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            samplers_mod.torch, "randn", lambda *a, **k: torch.zeros(n, 1, dtype=torch.float64)
        )
        broken = sample_ddpm(MIX.denoise, noise, schedule=COSINE, steps=256, clip_x=False)
    assert broken.var() > 0  # not a collapse to one point, just the wrong spread
    with pytest.raises(AssertionError):
        assert_moments(broken, MIX.mean().item(), MIX.variance().item(), weight0=0.3, data=MIX)


class CountingDenoiser:
    def __init__(self, data):
        self.data, self.calls, self.batch = data, 0, []

    def __call__(self, z, lam, cond):
        self.calls += 1
        self.batch.append(z.shape[0])
        return self.data.denoise(z, lam, cond)


def test_guidance_switches_and_batching():
    pair, n, steps = gaussian_pair(0.3, -0.2, 0.4), 256, 16
    cond, null = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)

    def sample(guidance, denoise=None, kind="ddpm", unc=None):
        gen = torch.Generator().manual_seed(11)
        noise = torch.randn(n, 1, dtype=torch.float64, generator=gen)
        return get_sampler(kind)(
            denoise or pair.denoise,
            noise,
            schedule=COSINE,
            steps=steps,
            cond=cond,
            guidance=guidance,
            generator=gen,
        )

    plain = sample(None)
    everywhere = sample(Guidance(2.0, null))
    assert torch.equal(sample(Guidance(2.0, null, -100.0, 100.0)), everywhere)
    assert torch.equal(sample(Guidance(2.0, null, 100.0, 200.0)), plain)  # empty interval
    counter = CountingDenoiser(pair)
    assert torch.equal(sample(Guidance(0.0, null), counter), plain)  # w = 0: one pass per step
    assert counter.calls == steps and set(counter.batch) == {n}
    counter = CountingDenoiser(pair)
    sample(Guidance(2.0, null), counter)  # tensor cond and uncond: one doubled batch per step
    assert counter.calls == steps and set(counter.batch) == {2 * n}
    # an uncond that is not a tensor takes two calls and gives the same answer
    listed = sample(Guidance(2.0, [1] * n), kind="ddim")
    assert torch.allclose(listed, sample(Guidance(2.0, null), kind="ddim"), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(everywhere, plain)


def test_clipping():
    wide = GaussianMixture.create([1.0], [0.0], 2.0)
    for kind in ["ddpm", "ddim"]:
        _, free = run(kind, wide, 2000, 32)
        _, clipped = run(kind, wide, 2000, 32, clip_x=True)
        assert free.abs().max() > 1.5
        assert clipped.abs().max() <= 1.0


def test_generator_reproducibility():
    a = run("ddpm", MIX, 500, 20, seed=1)[1]
    b = run("ddpm", MIX, 500, 20, seed=1)[1]
    c = run("ddpm", MIX, 500, 20, seed=2)[1]
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("prediction", ["eps", "v", "x"])
def test_x_predictor_converts_any_target(prediction):
    z = torch.randn(50, 1, dtype=torch.float64)
    lam = torch.linspace(-8, 8, 50, dtype=torch.float64)
    x_true = MIX.denoise(z, lam)

    def model(z, lam, cond):
        return convert(MIX.denoise(z, lam, cond), "x", prediction, z, lam)

    assert torch.allclose(x_predictor(model, prediction)(z, lam, None), x_true, atol=1e-9)
    with pytest.raises(ValueError, match="unknown prediction"):
        x_predictor(model, "score")


def test_registry_and_shared_signature():
    assert set(SAMPLERS) == {"ddpm", "ddim"}
    assert get_sampler("ddpm") is sample_ddpm and get_sampler("ddim") is sample_ddim
    assert inspect.signature(sample_ddpm) == inspect.signature(sample_ddim)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'.*ddim"):
        get_sampler("euler")


def test_bad_input():
    noise = torch.randn(4, 1, dtype=torch.float64)
    kw = {"schedule": COSINE, "steps": 4}
    for steps in [0, -1, 2.5, True]:
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            sample_ddpm(MIX.denoise, noise, schedule=COSINE, steps=steps)
    with pytest.raises(ValueError, match="initial noise contains non-finite"):
        sample_ddim(MIX.denoise, torch.full((4, 1), math.nan), **kw)
    with pytest.raises(ValueError, match="guidance needs a condition"):
        sample_ddpm(MIX.denoise, noise, guidance=Guidance(1.0, torch.ones(4)), **kw)
    with pytest.raises(ValueError, match="empty guidance interval"):
        Guidance(1.0, None, 3.0, -3.0)
    with pytest.raises(ValueError, match="guidance weight must be finite"):
        Guidance(math.nan, None)

    def nan_after_two(z, lam, cond, calls=[]):  # noqa: B006 - counts calls across steps
        calls.append(1)
        return z * math.nan if len(calls) > 2 else z

    with pytest.raises(FloatingPointError, match="non-finite values at step 2"):
        sample_ddpm(nan_after_two, noise, **kw)
    with pytest.raises(ValueError, match="denoiser output shape"):
        sample_ddim(lambda z, lam, c: z[:2], noise, **kw)
    with pytest.raises(ValueError, match="increase from t=1 to t=0"):
        sample_ddim(MIX.denoise, noise, schedule=lambda t: t, steps=4)
