"""Schedules against their formulas evaluated independently (numpy, float64)."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdiff.diffusion.schedules import (
    ScheduleConfig,
    alpha_sigma,
    dlogsnr_dt,
    get_schedule,
    logsnr_cosine,
    logsnr_interpolated,
    logsnr_shifted,
    shift_for_resolution,
    t_from_logsnr,
    t_from_logsnr_cosine,
)

T = np.linspace(0.0, 1.0, 1001)


def np_cosine(t, lo=-15.0, hi=15.0):
    t_min, t_max = np.arctan(np.exp(-hi / 2)), np.arctan(np.exp(-lo / 2))
    return -2.0 * np.log(np.tan(t_min + t * (t_max - t_min)))


def f64(t):
    return torch.tensor(t, dtype=torch.float64)


def test_cosine_matches_formula_in_float64():
    np.testing.assert_allclose(logsnr_cosine(f64(T)).numpy(), np_cosine(T), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        logsnr_cosine(f64(T), -5.0, 7.0).numpy(), np_cosine(T, -5.0, 7.0), rtol=1e-12, atol=1e-12
    )


def test_cosine_clipping_endpoints_and_unclipped_limit():
    assert logsnr_cosine(f64([0.0, 1.0])).tolist() == pytest.approx([15.0, -15.0], abs=1e-12)
    assert logsnr_cosine(f64([0.0, 1.0]), -3.0, 4.0).tolist() == pytest.approx([4.0, -3.0])
    # with a very wide range the clipped schedule is the plain -2 log tan(pi t / 2)
    t = np.linspace(0.05, 0.95, 19)
    wide = logsnr_cosine(f64(t), -60.0, 60.0).numpy()
    np.testing.assert_allclose(wide, -2 * np.log(np.tan(np.pi * t / 2)), rtol=1e-9, atol=1e-9)
    # and alpha = cos(pi t / 2) exactly as the name says
    alpha, _ = alpha_sigma(torch.from_numpy(wide))
    np.testing.assert_allclose(alpha.numpy(), np.cos(np.pi * t / 2), rtol=1e-9)


@pytest.mark.parametrize(("res", "hand"), [(128, -1.386), (256, -2.773), (512, -4.159)])
def test_shift_values_from_base_64(res, hand):
    assert shift_for_resolution(res, 64) == pytest.approx(hand, abs=5e-4)
    shifted = logsnr_shifted(f64(T), res).numpy()
    np.testing.assert_allclose(shifted, np_cosine(T) + 2 * np.log(64 / res), rtol=0, atol=1e-12)


def test_shift_moves_the_clip_range_at_512():
    ends = logsnr_shifted(f64([0.0, 1.0]), 512).tolist()
    assert ends == pytest.approx([10.84, -19.16], abs=5e-3)
    assert logsnr_shifted(f64(T), 64).numpy() == pytest.approx(np_cosine(T), abs=1e-12)


def test_interpolated_orientation_and_values():
    # default: base 32 (strong shift) at the noisy end t=1, base 256 at the clean end t=0
    res = 512
    lam = logsnr_interpolated(f64(T), res).numpy()
    s32, s256 = 2 * np.log(32 / res), 2 * np.log(256 / res)
    expected = T * (np_cosine(T) + s32) + (1 - T) * (np_cosine(T) + s256)
    np.testing.assert_allclose(lam, expected, rtol=0, atol=1e-12)
    assert lam[0] == pytest.approx(15 + s256)  # 13.614
    assert lam[-1] == pytest.approx(-15 + s32)  # -20.545
    assert lam[-1] < logsnr_shifted(f64(1.0), res).item() < logsnr_shifted(f64(1.0), res, 256)
    # the other transcription is one argument swap away
    swapped = logsnr_interpolated(f64(T), res, base_noisy=256, base_clean=32).numpy()
    assert swapped[0] == pytest.approx(15 + s32) and swapped[-1] == pytest.approx(-15 + s256)


@pytest.mark.parametrize("name", ["cosine", "shifted", "interpolated"])
@pytest.mark.parametrize("res", [32, 64, 128, 256, 512, 1024])
def test_schedules_strictly_decrease(name, res):
    lam = ScheduleConfig(name=name).build(res)(f64(T))
    assert bool((lam[1:] < lam[:-1]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_alpha_sigma_variance_preserving(dtype):
    lam = torch.linspace(-25, 25, 501, dtype=dtype)
    alpha, sigma = alpha_sigma(lam)
    tol = 1e-15 if dtype == torch.float64 else 1e-6
    assert (alpha**2 + sigma**2 - 1).abs().max() < tol * 4
    np.testing.assert_allclose(
        torch.log(alpha**2 / sigma**2).double().numpy(),
        lam.double().numpy(),
        atol=1e-9 if dtype == torch.float64 else 2e-4,
    )


def test_float32_input_is_accurate():
    t32 = torch.tensor(T, dtype=torch.float32)
    lam32 = logsnr_shifted(t32, 256)
    assert lam32.dtype == torch.float32
    # the reference takes the same (float32-rounded) times, evaluated in float64
    reference = np_cosine(t32.double().numpy()) + 2 * np.log(0.25)
    np.testing.assert_allclose(lam32.double().numpy(), reference, rtol=2e-6, atol=2e-6)


def test_derivative_matches_closed_form_and_finite_differences():
    t = f64(np.linspace(0.01, 0.99, 50))
    t_min, t_max = math.atan(math.exp(-7.5)), math.atan(math.exp(7.5))
    theta = t_min + t * (t_max - t_min)
    closed = -4 * (t_max - t_min) / torch.sin(2 * theta)
    assert torch.allclose(dlogsnr_dt(get_schedule("cosine"), t), closed, rtol=1e-12)
    assert torch.allclose(
        dlogsnr_dt(get_schedule("shifted", resolution=512), t), closed, rtol=1e-12
    )
    interp = get_schedule("interpolated", resolution=512)
    h = 1e-6
    fd = (interp(t + h) - interp(t - h)) / (2 * h)
    assert torch.allclose(dlogsnr_dt(interp, t), fd, rtol=1e-6)


def test_inverse_maps():
    t = f64(np.linspace(0, 1, 257))
    assert torch.allclose(t_from_logsnr_cosine(logsnr_cosine(t)), t, atol=1e-12)
    lam_shift = logsnr_shifted(t, 256) - shift_for_resolution(256, 64)
    assert torch.allclose(t_from_logsnr_cosine(lam_shift), t, atol=1e-12)
    for name in ["cosine", "shifted", "interpolated"]:
        sched = ScheduleConfig(name=name).build(512)
        assert torch.allclose(t_from_logsnr(sched, sched(t)), t, atol=1e-12)
    with pytest.raises(ValueError, match="outside the schedule's range"):
        t_from_logsnr(get_schedule("cosine"), 20.0)
    with pytest.raises(ValueError, match="outside the schedule's range"):
        t_from_logsnr_cosine(-16.0)


@settings(max_examples=50, deadline=None)
@given(t=st.floats(0, 1), log2res=st.integers(3, 12), log2base=st.integers(3, 10))
def test_doubling_resolution_lowers_logsnr_by_2_log_2(t, log2res, log2base):
    res, base = 2**log2res, 2**log2base
    a = logsnr_shifted(f64(t), res, base).item()
    b = logsnr_shifted(f64(t), 2 * res, base).item()
    assert a - b == pytest.approx(2 * math.log(2), abs=1e-12)


def test_pooling_multiplies_snr_by_four():
    """2x2 average pooling of z_t keeps alpha D[x] and halves the noise std: SNR x 4. So a
    128 px image under the schedule shifted to base 64, pooled to 64 px, has exactly the
    logSNR of the unshifted cosine (simple diffusion,
    arXiv 2301.11093, "Adjusting Noise Schedules")."""
    gen = torch.Generator().manual_seed(0)
    n, res = 64, 128
    low = torch.rand(1, 3, res // 2, res // 2, generator=gen, dtype=torch.float64) * 2 - 1
    x = low.repeat_interleave(2, -1).repeat_interleave(2, -2)  # constant on 2x2 blocks
    for t in [0.2, 0.5, 0.8]:
        lam = logsnr_shifted(f64(t), res, base=64)
        alpha, sigma = alpha_sigma(lam)
        eps = torch.randn(n, *x.shape[1:], generator=gen, dtype=torch.float64)
        z = alpha * x + sigma * eps  # (n, 3, 128, 128)
        pooled = torch.nn.functional.avg_pool2d(z, 2)  # (n, 3, 64, 64)
        noise_var = (pooled - alpha * low).var().item()  # ~ sigma^2 / 4
        m = pooled.numel()
        # the variance estimate of m Gaussian draws has relative SE sqrt(2/m) (~0.1% here)
        assert noise_var == pytest.approx(sigma.item() ** 2 / 4, rel=5 * math.sqrt(2 / m))
        empirical_logsnr = math.log(alpha.item() ** 2 / noise_var)
        assert empirical_logsnr == pytest.approx(lam.item() + math.log(4), abs=5 * math.sqrt(2 / m))
        assert empirical_logsnr == pytest.approx(
            logsnr_cosine(f64(t)).item(), abs=5 * math.sqrt(2 / m)
        )


def test_resolution_by_name_and_config():
    sched = get_schedule("shifted", resolution=256, base=64)
    assert sched(f64(0.5)).item() == pytest.approx(0.0 + 2 * math.log(0.25))
    cfg = ScheduleConfig(name="interpolated", base_noisy=16, base_clean=128)
    assert cfg.build(512)(f64(1.0)).item() == pytest.approx(-15 + 2 * math.log(16 / 512))
    assert ScheduleConfig(name="cosine").build(512)(f64(1.0)).item() == pytest.approx(-15)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (-0.1, r"\[0, 1\]"),
        (1.0001, r"\[0, 1\]"),
        (math.nan, "non-finite"),
        (math.inf, "non-finite"),
    ],
)
def test_bad_time_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        logsnr_cosine(torch.tensor([0.5, bad]))
    with pytest.raises(ValueError, match=message):
        logsnr_interpolated(bad, 512)


def test_bad_names_and_parameters_raise():
    with pytest.raises(ValueError, match=r"unknown schedule 'linear'.*cosine"):
        get_schedule("linear")
    with pytest.raises(ValueError, match="unknown schedule"):
        ScheduleConfig(name="cosin").build(64)
    with pytest.raises(ValueError, match="unexpected \\['bse'\\]"):
        get_schedule("shifted", resolution=64, bse=32)
    with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
        logsnr_cosine(0.5, 15.0, -15.0)
    with pytest.raises(ValueError, match="finite"):
        logsnr_cosine(0.5, -math.inf, 15.0)
    with pytest.raises(ValueError, match="resolution must be a positive"):
        logsnr_shifted(0.5, 0)
    with pytest.raises(ValueError, match="base must be a positive"):
        logsnr_shifted(0.5, 256, base=-64)
    with pytest.raises(ValueError, match="non-finite"):
        t_from_logsnr_cosine(math.nan)


def test_integer_time_is_accepted():
    assert logsnr_cosine(torch.tensor([0, 1])).tolist() == pytest.approx([15.0, -15.0], abs=1e-4)
