"""Forward process, targets, weightings and the multiscale loss against hand computations."""

import itertools
import math

import numpy as np
import pytest
import torch

from sdiff.diffusion.analytic import GaussianMixture
from sdiff.diffusion.process import (
    PREDICTIONS,
    WEIGHTINGS,
    DiffusionConfig,
    convert,
    diffusion_loss,
    log_weight,
    mse,
    multiscale_levels,
    multiscale_mse,
    q_sample,
    sample_time,
    target,
)
from sdiff.diffusion.schedules import ScheduleConfig, dlogsnr_dt, get_schedule

GEN = torch.Generator().manual_seed(1234)


def rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def np_alpha_sigma(lam):
    lam = np.asarray(lam, dtype=np.float64)
    return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def test_forward_process_by_hand():
    x, eps = rand(3, 2, 4, 4), rand(3, 2, 4, 4)
    lam = torch.tensor([-4.0, 0.0, 7.5], dtype=torch.float64)
    a, s = np_alpha_sigma(lam.numpy())
    z = q_sample(x, lam, eps).numpy()
    expected = a[:, None, None, None] * x.numpy() + s[:, None, None, None] * eps.numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-14, atol=1e-14)


def test_targets_by_hand():
    x, eps = rand(2, 5), rand(2, 5)
    lam = torch.tensor([-2.0, 3.0], dtype=torch.float64)
    a, s = (torch.from_numpy(c)[:, None] for c in np_alpha_sigma(lam.numpy()))
    assert torch.equal(target("eps", x, eps, lam), eps)
    assert torch.equal(target("x", x, eps, lam), x)
    assert torch.allclose(target("v", x, eps, lam), a * eps - s * x, rtol=1e-14)


@pytest.mark.parametrize(("source", "dest"), list(itertools.product(PREDICTIONS, PREDICTIONS)))
@pytest.mark.parametrize("lam", [-15.0, -4.0, 0.0, 4.0, 15.0])
def test_conversions_are_exact_in_float64(source, dest, lam):
    x, eps = rand(4, 3, 8, 8), rand(4, 3, 8, 8)
    logsnr = torch.full((4,), lam, dtype=torch.float64)
    z = q_sample(x, logsnr, eps)
    # from the true target of one kind, every other kind comes out exactly
    got = convert(target(source, x, eps, logsnr), source, dest, z, logsnr)
    # x from eps at logSNR -15 divides by alpha = 5.5e-4: allow the conditioning of the map
    a, s = np_alpha_sigma(lam)
    tol = 1e-12 / min(a, s)
    assert torch.allclose(got, target(dest, x, eps, logsnr), rtol=0, atol=tol)
    # and round-trips back
    back = convert(got, dest, source, z, logsnr)
    assert torch.allclose(back, target(source, x, eps, logsnr), rtol=0, atol=tol / min(a, s))


def hand_eps_weight(weighting, lam, dlam, bias):
    """w(lambda) on the eps-space squared error, from the formulas of simple diffusion (arXiv
    2301.11093) and SiD2 (arXiv 2410.19324)."""
    a, s = np_alpha_sigma(lam)
    if weighting == "eps":
        return np.ones_like(lam)
    if weighting == "v":
        return 1 / a**2
    if weighting == "x":
        return s**2 / a**2
    return -dlam / (1 + np.exp(lam - bias))  # -dlambda/dt sigmoid(b - lambda)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_weighted_loss_equals_eps_space_hand_computation(prediction, weighting):
    """diffusion_loss (computed on the model's own target with a log-space weight) equals the
    eps-space squared error of the converted prediction times the hand weight."""
    x = rand(6, 2, 8, 8).clamp(-1, 1)
    t = torch.tensor([0.02, 0.2, 0.4, 0.6, 0.8, 0.98], dtype=torch.float64)
    noise = rand(6, 2, 8, 8)
    sched = get_schedule("shifted", resolution=8, base=4)
    model_out = rand(6, 2, 8, 8)
    cfg = DiffusionConfig(prediction=prediction, weighting=weighting, sigmoid_bias=1.5)
    out = diffusion_loss(lambda z, lam, c: model_out, x, cfg, schedule=sched, t=t, noise=noise)

    lam = sched(t)
    z = q_sample(x, lam, noise)
    eps_hat = convert(model_out, prediction, "eps", z, lam)
    err = ((noise - eps_hat) ** 2).flatten(1).mean(1).numpy()
    dlam = dlogsnr_dt(sched, t).numpy()
    expected = hand_eps_weight(weighting, lam.numpy(), dlam, 1.5) * err
    np.testing.assert_allclose(out.per_example.numpy(), expected, rtol=1e-8)
    assert out.loss.item() == pytest.approx(expected.mean(), rel=1e-8)


def test_named_weightings_are_the_plain_losses_of_their_space():
    x, noise, out = rand(4, 1, 4, 4), rand(4, 1, 4, 4), rand(4, 1, 4, 4)
    t = torch.tensor([0.1, 0.3, 0.7, 0.9], dtype=torch.float64)
    sched = get_schedule("cosine")
    lam = sched(t)
    for kind in PREDICTIONS:
        cfg = DiffusionConfig(prediction=kind, weighting=kind)
        got = diffusion_loss(lambda z, l, c: out, x, cfg, schedule=sched, t=t, noise=noise)
        plain = ((target(kind, x, noise, lam) - out) ** 2).flatten(1).mean(1)
        assert torch.allclose(got.per_example, plain, rtol=1e-10)


def test_sigmoid_weighting_is_the_x_space_form():
    """SiD2: x-space error weighted by -dlambda/dt sigmoid(lambda - b) e^b."""
    x, noise, out = rand(5, 1, 4, 4), rand(5, 1, 4, 4), rand(5, 1, 4, 4)
    t = torch.linspace(0.05, 0.95, 5, dtype=torch.float64)
    sched, b = get_schedule("shifted", resolution=256), 2.0
    cfg = DiffusionConfig(prediction="x", weighting="sigmoid", sigmoid_bias=b)
    got = diffusion_loss(lambda z, l, c: out, x, cfg, schedule=sched, t=t, noise=noise)
    lam, dlam = sched(t), dlogsnr_dt(sched, t)
    x_err = ((x - out) ** 2).flatten(1).mean(1)
    expected = -dlam * torch.sigmoid(lam - b) * math.exp(b) * x_err
    assert torch.allclose(got.per_example, expected, rtol=1e-10)


def test_log_weight_stays_finite_at_extreme_logsnr():
    lam = torch.tensor([-30.0, -19.16, 0.0, 19.0, 30.0])
    for w, p in itertools.product(["eps", "v", "x"], PREDICTIONS):
        assert bool(torch.isfinite(log_weight(w, lam, p)).all())
    with pytest.raises(ValueError, match="needs dlogsnr"):
        log_weight("sigmoid", lam)


def hand_multiscale(d, weights):
    """Block means by explicit loops, per-level mean of squares, weighted sum."""
    d = d.numpy()
    b, c, h, w = d.shape
    total = np.zeros(b)
    for f, wt in weights:
        pooled = np.zeros((b, c, h // f, w // f))
        for i in range(h // f):
            for j in range(w // f):
                pooled[:, :, i, j] = d[:, :, i * f : (i + 1) * f, j * f : (j + 1) * f].mean((2, 3))
        total += wt * (pooled**2).mean((1, 2, 3))
    return total


def test_multiscale_equals_hand_computation():
    d = rand(2, 3, 8, 8)
    assert multiscale_levels(8, 8, base=2) == [(1, 1.0), (2, 2.0), (4, 4.0)]
    got = multiscale_mse(d, base=2).numpy()
    np.testing.assert_allclose(got, hand_multiscale(d, [(1, 1.0), (2, 2.0), (4, 4.0)]), rtol=1e-12)
    # the 1/s^2 reading, and explicit weights (here the literal 1/s of the paper: s = 8, 4, 2)
    got2 = multiscale_mse(d, base=2, power=2).numpy()
    np.testing.assert_allclose(
        got2, hand_multiscale(d, [(1, 1.0), (2, 4.0), (4, 16.0)]), rtol=1e-12
    )
    lit = multiscale_mse(d, base=2, weights=[1 / 8, 1 / 4, 1 / 2]).numpy()
    np.testing.assert_allclose(
        lit, hand_multiscale(d, [(1, 1 / 8), (2, 1 / 4), (4, 1 / 2)]), rtol=1e-12
    )


def test_multiscale_levels_for_paper_resolutions():
    assert [f for f, _ in multiscale_levels(256, 256)] == [1, 2, 4, 8]  # 256, 128, 64, 32
    assert [f for f, _ in multiscale_levels(512, 512)] == [1, 2, 4, 8, 16]
    assert [f for f, _ in multiscale_levels(384, 640)] == [1, 2, 4, 8]  # 384/8 = 48 >= 32
    assert [f for f, _ in multiscale_levels(48, 48)] == [1]


def test_multiscale_with_one_level_is_the_plain_loss():
    d = rand(3, 2, 32, 32)
    assert torch.allclose(multiscale_mse(d, base=32), mse(d), rtol=1e-14)
    x, noise, out = rand(3, 2, 32, 32), rand(3, 2, 32, 32), rand(3, 2, 32, 32)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    kwargs = {"schedule": get_schedule("cosine"), "t": t, "noise": noise}
    plain = diffusion_loss(lambda z, l, c: out, x, DiffusionConfig(), **kwargs)
    multi = diffusion_loss(lambda z, l, c: out, x, DiffusionConfig(multiscale=True), **kwargs)
    assert torch.allclose(plain.per_example, multi.per_example, rtol=1e-14)
    # at 64 px the coarser level adds a term, so the two differ
    x64, n64, o64 = rand(3, 2, 64, 64), rand(3, 2, 64, 64), rand(3, 2, 64, 64)
    kwargs["noise"] = n64
    plain = diffusion_loss(lambda z, l, c: o64, x64, DiffusionConfig(), **kwargs)
    multi = diffusion_loss(lambda z, l, c: o64, x64, DiffusionConfig(multiscale=True), **kwargs)
    assert bool((multi.per_example > plain.per_example).all())


def test_multiscale_bad_input():
    with pytest.raises(ValueError, match="below the multiscale base 32"):
        multiscale_mse(rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="below the multiscale base 32"):
        multiscale_mse(rand(1, 3, 64, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        multiscale_mse(rand(4, 64))
    with pytest.raises(ValueError, match="3 multiscale weights given for 2 levels"):
        multiscale_mse(rand(1, 1, 64, 64), weights=[1, 1, 1])
    cfg = DiffusionConfig(multiscale=True)
    with pytest.raises(ValueError, match="below the multiscale base"):
        diffusion_loss(lambda z, l, c: z, rand(2, 3, 16, 16), cfg)


def test_loss_of_the_exact_denoiser_matches_its_analytic_value():
    """For x ~ N(m, s^2 I), E||eps - eps_hat*||^2 per pixel = alpha^2 s^2 / (alpha^2 s^2 + sigma^2)
    and E||x - x_hat*||^2 per pixel = s^2 sigma^2 / (alpha^2 s^2 + sigma^2)."""
    m, s, n, dim = 0.3, 0.5, 4000, 16
    gauss = GaussianMixture.create([1.0], [[m] * dim], s)
    gen = torch.Generator().manual_seed(7)
    x = m + s * torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
    sched = get_schedule("cosine")

    def exact_x(z, lam, cond):
        return gauss.denoise(z.flatten(1), lam).reshape(z.shape)

    for t0 in [0.3, 0.5, 0.7]:
        t = torch.full((n,), t0, dtype=torch.float64)
        lam = sched(t)[0].item()
        a2, s2 = 1 / (1 + math.exp(-lam)), 1 / (1 + math.exp(lam))
        for weighting, analytic in [
            ("eps", a2 * s * s / (a2 * s * s + s2)),
            ("x", s * s * s2 / (a2 * s * s + s2)),
        ]:
            cfg = DiffusionConfig(prediction="x", weighting=weighting)
            out = diffusion_loss(exact_x, x, cfg, schedule=sched, t=t, generator=gen)
            # per-example loss = analytic * chi2_16 / 16: relative SE sqrt(2 / 16 / n)
            se = analytic * math.sqrt(2 / dim / n)
            assert out.loss.item() == pytest.approx(analytic, abs=5 * se)


def test_stratified_time_sampling():
    gen = torch.Generator().manual_seed(0)
    t = sample_time(8, "stratified", generator=gen)
    assert torch.equal(torch.floor(t * 8), torch.arange(8, dtype=t.dtype))  # one per stratum
    u = sample_time(10_000, "uniform", generator=gen)
    assert (
        0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / 10_000)
    )


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="unknown prediction 'noise'"):
        DiffusionConfig(prediction="noise")
    with pytest.raises(ValueError, match="unknown weighting 'snr'"):
        DiffusionConfig(weighting="snr")
    with pytest.raises(ValueError, match="unknown time sampling"):
        DiffusionConfig(time_sampling="sobol")
    with pytest.raises(ValueError, match="unknown schedule"):
        diffusion_loss(
            lambda z, l, c: z,
            rand(2, 1, 8, 8),
            DiffusionConfig(schedule=ScheduleConfig(name="lin")),
        )
    x = rand(2, 1, 8, 8)
    x[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="training batch x contains non-finite"):
        diffusion_loss(lambda z, l, c: z, x, DiffusionConfig())
    with pytest.raises(ValueError, match="model output shape"):
        diffusion_loss(lambda z, l, c: z[:, :1, :4], rand(2, 3, 8, 8), DiffusionConfig())
    with pytest.raises(ValueError, match="unknown prediction"):
        convert(x, "eps", "score", x, torch.zeros(2))


def test_loss_is_differentiable_and_float32_safe():
    x = torch.rand(4, 3, 64, 64, generator=GEN) * 2 - 1
    w = torch.zeros(1, requires_grad=True)
    cfg = DiffusionConfig(
        multiscale=True, weighting="sigmoid", schedule=ScheduleConfig(name="interpolated")
    )
    out = diffusion_loss(lambda z, lam, c: z * w, x, cfg, generator=GEN)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().item() > 0
