"""Wavelet transforms against PyWavelets, closed forms and their own inverses (float64 unless
a test is about another dtype)."""

import math

import numpy as np
import pytest
import pywt
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdiff.models.wavelets import DWT, HIGH_GAIN, IDWT, LOW_GAIN, WAVELETS, dwt2, idwt2

SQRT2 = math.sqrt(2.0)
# "weird" rows: non-square, and sizes whose coarsest level is odd (3x5) or a single pixel
SHAPES = [(1, 1, 8, 8), (2, 3, 16, 24), (3, 2, 32, 32), (2, 1, 24, 8), (1, 2, 24, 40)]


def randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def unpack(y, channels, levels):
    """Our (B, C * 4**L, h, w) coefficients -> pywt.wavedec2's list [cA_L, (cH_L, cV_L, cD_L),
    ..., (cH_1, cV_1, cD_1)], by the index formula of the module docstring (plain numpy
    indexing, not pixel_shuffle): level l's band b of channel c at pixel (y r + i, x r + j) is
    channel C 4**(L - l) + ((b C + c) r + i) r + j at (y, x), with r = 2**(L - l)."""
    y = np.asarray(y)
    batch, _, h, w = y.shape
    coeffs = [y[:, :channels]]
    for level in range(levels, 0, -1):
        r = 2 ** (levels - level)
        start = channels * 4 ** (levels - level)
        bands = []
        for b in range(3):
            band = np.empty((batch, channels, h * r, w * r))
            for c in range(channels):
                for i in range(r):
                    for j in range(r):
                        band[:, c, i::r, j::r] = y[:, start + ((b * channels + c) * r + i) * r + j]
            bands.append(band)
        coeffs.append(tuple(bands))
    return coeffs


def pywt_legall(x, levels):
    """Reference 5/3 DWT: pywt "bior2.2" with mode "reflect", each level sliced to [1 : N/2 + 1]
    on both axes (module docstring), applied again to the sliced cA."""
    coeffs, approx = [], np.asarray(x)
    for _ in range(levels):
        h, w = approx.shape[-2] // 2, approx.shape[-1] // 2
        approx, details = pywt.dwt2(approx, "bior2.2", mode="reflect")
        approx = approx[..., 1 : h + 1, 1 : w + 1]
        coeffs.insert(0, tuple(d[..., 1 : h + 1, 1 : w + 1] for d in details))
    return [approx, *coeffs]


def assert_coeffs_equal(ours, theirs, atol):
    assert len(ours) == len(theirs)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=0, atol=atol)
    for level_ours, level_theirs in zip(ours[1:], theirs[1:], strict=True):
        for band_ours, band_theirs in zip(level_ours, level_theirs, strict=True):
            assert band_ours.shape == band_theirs.shape
            np.testing.assert_allclose(band_ours, band_theirs, rtol=0, atol=atol)


# --- perfect reconstruction ----------------------------------------------------------------------


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
def test_perfect_reconstruction_float64(wavelet, levels, shape):
    batch, channels, height, width = shape
    x = randn(*shape)
    y = dwt2(x, wavelet, levels)
    f = 2**levels
    assert y.shape == (batch, channels * 4**levels, height // f, width // f)
    assert (idwt2(y, wavelet, levels) - x).abs().max() < 1e-12
    # and the other way round: every coefficient tensor is the image of exactly one image
    z = randn(*y.shape, seed=1)
    assert (dwt2(idwt2(z, wavelet, levels), wavelet, levels) - z).abs().max() < 1e-12


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 3])
def test_perfect_reconstruction_float32(wavelet, levels):
    x = randn(2, 3, 32, 48, dtype=torch.float32)
    assert (idwt2(dwt2(x, wavelet, levels), wavelet, levels) - x).abs().max() < 1e-6 * 4


@settings(max_examples=25, deadline=None)
@given(
    wavelet=st.sampled_from(WAVELETS),
    levels=st.integers(1, 3),
    batch=st.integers(0, 2),
    channels=st.integers(1, 3),
    h_blocks=st.integers(1, 5),
    w_blocks=st.integers(1, 5),
)
def test_roundtrip_any_admissible_shape(wavelet, levels, batch, channels, h_blocks, w_blocks):
    f = 2**levels
    x = randn(batch, channels, h_blocks * f, w_blocks * f)
    y = dwt2(x, wavelet, levels)
    assert y.shape == (batch, channels * 4**levels, h_blocks, w_blocks)
    assert torch.allclose(idwt2(y, wavelet, levels), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 3])
def test_low_precision_error_is_a_few_rounding_steps(dtype, wavelet, levels):
    """Against a float64 evaluation on the same (rounded) input, the error stays within 4 eps of
    the largest coefficient: the result's own rounding costs 0.5 eps, measured errors are
    0.7 to 1.6 eps."""
    x = randn(2, 3, 32, 32).to(dtype)
    eps = torch.finfo(dtype).eps
    y = dwt2(x, wavelet, levels)
    assert y.dtype == dtype
    reference = dwt2(x.double(), wavelet, levels)
    assert (y.double() - reference).abs().max() <= 4 * eps * reference.abs().max()
    back = idwt2(y, wavelet, levels)
    assert back.dtype == dtype
    assert (back.double() - x.double()).abs().max() <= 4 * eps * x.double().abs().max()


# --- agreement with PyWavelets -------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 8, 8), (2, 2, 6, 10), (1, 1, 16, 24)])
def test_haar_one_level_matches_pywt_band_by_band(shape):
    """Our channels b * C + c for b = LL, LH, HL, HH are pywt's cA, cH, cV, cD of channel c,
    same sign."""
    channels = shape[1]
    x = randn(*shape)
    y = dwt2(x, "haar").numpy()
    cA, (cH, cV, cD) = pywt.dwt2(x.numpy(), "haar")
    for b, band in enumerate((cA, cH, cV, cD)):
        np.testing.assert_allclose(y[:, b * channels : (b + 1) * channels], band, atol=1e-12)
    # the mapping is not trivially satisfied: the detail bands differ from each other
    assert np.abs(cH - cV).max() > 0.1


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 2, 32, 32), (2, 1, 8, 40)])
def test_haar_multilevel_matches_pywt_wavedec2(levels, shape):
    x = randn(*shape)
    ours = unpack(dwt2(x, "haar", levels), shape[1], levels)
    theirs = pywt.wavedec2(x.numpy(), "haar", level=levels)
    assert_coeffs_equal(ours, theirs, atol=1e-12)


@pytest.mark.parametrize(
    "shape", [(1, 1, 2, 2), (1, 1, 2, 4), (2, 3, 8, 8), (2, 2, 6, 10), (1, 1, 16, 24)]
)
def test_legall_one_level_matches_pywt_reflect_everywhere(shape):
    """bior2.2, mode "reflect", slice [1 : N/2 + 1]: all coefficients, boundaries included."""
    channels, height, width = shape[1:]
    x = randn(*shape)
    y = dwt2(x, "legall53").numpy()
    cA, (cH, cV, cD) = pywt.dwt2(x.numpy(), "bior2.2", mode="reflect")
    assert cA.shape[-2:] == (height // 2 + 2, width // 2 + 2)
    for b, band in enumerate((cA, cH, cV, cD)):
        ours = y[:, b * channels : (b + 1) * channels]
        np.testing.assert_allclose(
            ours, band[..., 1 : height // 2 + 1, 1 : width // 2 + 1], rtol=0, atol=1e-12
        )


def test_legall_other_pywt_modes_agree_only_in_the_interior():
    """Periodic and half-sample symmetric extensions change the boundary coefficients only:
    the interior (away from the first and last coefficient) still matches to 1e-10."""
    x = randn(2, 2, 16, 24)
    ours = dwt2(x, "legall53").numpy()[:, :2]  # LL
    periodic, _ = pywt.dwt2(x.numpy(), "bior2.2", mode="periodization")  # (2, 2, 8, 12), unsliced
    half_sample, _ = pywt.dwt2(x.numpy(), "bior2.2", mode="symmetric")
    half_sample = half_sample[..., 1:9, 1:13]
    for other in (periodic, half_sample):
        inner = (..., slice(1, -1), slice(1, -1))
        np.testing.assert_allclose(ours[inner], other[inner], rtol=0, atol=1e-10)
        assert np.abs(ours - other).max() > 1e-3  # the boundaries do differ


@pytest.mark.parametrize("levels", [2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 16, 24), (1, 2, 32, 32)])
def test_legall_multilevel_matches_iterated_pywt(levels, shape):
    x = randn(*shape)
    ours = unpack(dwt2(x, "legall53", levels), shape[1], levels)
    assert_coeffs_equal(ours, pywt_legall(x.numpy(), levels), atol=1e-12)


def test_legall_impulse_responses_are_the_5_3_filters():
    """Independent of PyWavelets: the analysis filters are low = sqrt2 (-1, 2, 6, 2, -1) / 8
    and high = -(-1/2, 1, -1/2) / sqrt2 (LOW_GAIN and HIGH_GAIN times the lifting's taps). So a
    row impulse at the even sample 2m gives low sqrt2 (-1, 6, -1) / 8 at m - 1, m, m + 1 and
    high (1/2, 1/2) / sqrt2 at m - 1, m; at the odd sample 2m + 1, low sqrt2 (2, 2) / 8 at m,
    m + 1 and high -1 / sqrt2 at m. The image has two equal rows, which 5/3 on N = 2 maps to
    sqrt2 x the row (low along H) and 0 (high along H): LL = sqrt2 low, HL = sqrt2 high."""
    assert (LOW_GAIN, HIGH_GAIN) == (SQRT2, -1 / SQRT2)
    cases = [  # impulse position, {index: LL}, {index: HL}
        (6, {2: -2 / 8, 3: 12 / 8, 4: -2 / 8}, {2: 0.5, 3: 0.5}),
        (7, {3: 4 / 8, 4: 4 / 8}, {3: -1.0}),
    ]
    for position, ll, hl in cases:
        x = torch.zeros(1, 1, 2, 16, dtype=torch.float64)
        x[..., position] = 1.0
        y = dwt2(x, "legall53")[0, :, 0].numpy()  # (4, 8): LL, LH, HL, HH of the single row
        for band, values in [(0, ll), (2, hl)]:
            expected = np.zeros(8)
            expected[list(values)] = list(values.values())
            np.testing.assert_allclose(y[band], expected, rtol=0, atol=1e-15)
        np.testing.assert_allclose(y[[1, 3]], 0.0, rtol=0, atol=1e-15)


# --- orthogonality, noise and vanishing moments --------------------------------------------------


def transform_matrix(wavelet, levels, height, width):
    """The (H W) x (H W) matrix of dwt2 on one channel, column k = dwt2 of the k-th basis image."""
    basis = torch.eye(height * width, dtype=torch.float64).reshape(-1, 1, height, width)
    return dwt2(basis, wavelet, levels).reshape(height * width, -1).T


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_haar_is_orthogonal(levels):
    m = transform_matrix("haar", levels, 8, 16)
    assert torch.allclose(m @ m.T, torch.eye(128, dtype=torch.float64), atol=1e-12)
    x = randn(3, 2, 16, 24)
    assert torch.allclose(dwt2(x, "haar", levels).square().sum(), x.square().sum(), rtol=1e-12)
    # 5/3 is biorthogonal only: its matrix is invertible but not orthogonal
    m53 = transform_matrix("legall53", levels, 8, 16)
    assert (m53 @ m53.T - torch.eye(128, dtype=torch.float64)).abs().max() > 0.1


def test_haar_keeps_white_noise_white():
    """Each of the 48 output channels of 64 x 3 x 64 x 64 unit Gaussian noise (2 levels) has
    m = 64 x 16 x 16 = 16384 samples: variance 1 with standard error sqrt(2/m) = 0.011, and
    cross-channel correlations 0 with standard error 1/sqrt(m) = 0.008; we allow 5 standard
    errors (the seed is fixed, so this cannot flake)."""
    eps = randn(64, 3, 64, 64, seed=3)
    y = dwt2(eps, "haar", levels=2)  # (64, 48, 16, 16)
    samples = y.transpose(0, 1).reshape(48, -1)  # (48, m)
    m = samples.shape[1]
    cov = samples @ samples.T / m  # (48, 48); mean is 0 by construction of the noise
    assert (cov.diagonal() - 1).abs().max() < 5 * math.sqrt(2 / m)
    off_diagonal = cov - torch.diag(cov.diagonal())
    assert off_diagonal.abs().max() < 5 / math.sqrt(m)


def test_legall_noise_band_variances():
    """White unit noise through 5/3 (one level): interior band variances are products of the
    1-D gains |low|^2 = 2 (1 + 4 + 36 + 4 + 1) / 64 = 23/16 and |high|^2 = (1/4 + 1 + 1/4) / 2
    = 3/4. Tolerance 5 standard errors of a variance estimate, sqrt(2/m) each."""
    eps = randn(32, 3, 64, 64, seed=4)
    y = dwt2(eps, "legall53")[..., 1:-1, 1:-1]  # (32, 12, 30, 30), away from the boundary
    expected = [(23 / 16) ** 2, 23 / 16 * 3 / 4, 3 / 4 * 23 / 16, (3 / 4) ** 2]
    for b, var in enumerate(expected):
        band = y[:, 3 * b : 3 * (b + 1)]
        m = band.numel()
        assert band.square().mean().item() == pytest.approx(var, rel=5 * math.sqrt(2 / m))


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_legall_constant_image_has_no_details(levels):
    """Symmetric extension keeps a constant constant, so every detail coefficient is 0,
    boundaries included, and LL is 2**L times the constant (DC gain sqrt2 per axis per level)."""
    x = torch.full((1, 2, 16, 24), 0.7, dtype=torch.float64)
    y = dwt2(x, "legall53", levels)
    assert torch.allclose(y[:, :2], torch.full_like(y[:, :2], 0.7 * 2**levels), atol=1e-12)
    assert y[:, 2:].abs().max() < 1e-12


def test_legall_ramp_has_no_interior_details_but_a_quadratic_does():
    """5/3 has two vanishing moments: a linear ramp a i + b j + c gives zero details away from
    the boundary (where the mirror breaks the ramp), a quadratic does not; Haar (one vanishing
    moment) leaves ramp details everywhere."""
    i = torch.arange(16, dtype=torch.float64)[:, None]  # (H, 1)
    j = torch.arange(24, dtype=torch.float64)[None, :]  # (1, W)
    ramp = (0.3 * i - 1.7 * j + 2.0).expand(1, 1, 16, 24)
    details = dwt2(ramp, "legall53")[:, 1:]  # (1, 3, 8, 12)
    assert details[..., 1:-1, 1:-1].abs().max() < 1e-12
    assert details.abs().max() > 0.1  # the last row / column see the mirror
    # LH and HL (HH vanishes for any a i + b j: it is a mixed second difference)
    assert dwt2(ramp, "haar")[:, 1:3].abs().min() > 0.1
    quadratic = (0.3 * i**2 + j**2).expand(1, 1, 16, 24)
    assert dwt2(quadratic, "legall53")[:, 1:3, 1:-1, 1:-1].abs().min() > 0.1


# --- layout -------------------------------------------------------------------------------------


def test_haar_one_level_2x2_block_formulas():
    """Band-major layout: channel b * C + c is band b (LL, LH, HL, HH) of input channel c, with
    LL = (a + b + c + d) / 2, LH = (a + b - c - d) / 2, HL = (a - b + c - d) / 2,
    HH = (a - b - c + d) / 2 on each 2x2 block [a b; c d]."""
    x = randn(2, 3, 6, 10)
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    expected = torch.cat(
        [(a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2], 1
    )
    assert torch.allclose(dwt2(x, "haar"), expected, atol=1e-12)


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_multilevel_layout_is_recursion_plus_pixel_unshuffle(wavelet):
    """Two levels = one level, then one level on its LL, then level 1's details brought down by
    torch's pixel_unshuffle(2): [LL_2, LH_2, HL_2, HH_2, pixel_unshuffle(LH_1, HL_1, HH_1)]."""
    channels = 2
    x = randn(2, channels, 16, 24)
    first = dwt2(x, wavelet)  # (2, 8, 8, 12)
    second = dwt2(first[:, :channels], wavelet)  # (2, 8, 4, 6)
    expected = torch.cat(
        [second, torch.nn.functional.pixel_unshuffle(first[:, channels:], 2)], dim=1
    )
    assert torch.equal(dwt2(x, wavelet, 2), expected)


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_first_channels_are_the_coarsest_ll(wavelet, levels):
    """Haar's LL_L is 2**L times the mean of each 2**L x 2**L block; for 5/3 the same holds on
    images that are constant on each block's neighbourhood, i.e. on constants per channel."""
    channels, f = 3, 2**levels
    x = randn(2, channels, 24, 32)
    y = dwt2(x, "haar", levels)
    means = torch.nn.functional.avg_pool2d(x, f)  # (2, 3, 24 / f, 32 / f)
    assert torch.allclose(y[:, :channels], f * means, atol=1e-12)
    levels_const = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    const = levels_const[None, :, None, None].expand(2, channels, 24, 32)
    ll = dwt2(const, wavelet, levels)[:, :channels]
    assert torch.allclose(ll, f * levels_const[None, :, None, None].expand_as(ll), atol=1e-12)


# --- autograd, devices, modules, compile ---------------------------------------------------------


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 2])
def test_gradcheck(wavelet, levels):
    x = randn(1, 2, 4, 8).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dwt2(t, wavelet, levels), (x,))
    y = randn(1, 2 * 4**levels, 4 // 2**levels * 2, 8 // 2**levels).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: idwt2(t, wavelet, levels), (y,))


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 2, 3])
def test_meta_device_shapes(wavelet, levels):
    x = torch.empty(2, 3, 512, 512, device="meta")
    y = dwt2(x, wavelet, levels)
    f = 2**levels
    assert y.device.type == "meta"
    assert y.shape == (2, 3 * 4**levels, 512 // f, 512 // f)
    assert idwt2(y, wavelet, levels).shape == x.shape


@pytest.mark.parametrize("wavelet", WAVELETS)
def test_modules_have_no_parameters_and_match_the_functions(wavelet):
    down, up = DWT(wavelet, levels=2), IDWT(wavelet, levels=2)
    assert list(down.parameters()) == [] and list(up.parameters()) == []
    assert list(down.buffers()) == [] and list(up.buffers()) == []
    assert "levels=2" in repr(down) and repr(wavelet) in repr(up)
    x = randn(2, 3, 16, 8)
    assert torch.equal(down(x), dwt2(x, wavelet, 2))
    assert torch.equal(up(down(x)), idwt2(dwt2(x, wavelet, 2), wavelet, 2))
    with pytest.raises(ValueError, match="unknown wavelet"):
        DWT("db4")


def test_traces_under_compile_fullgraph():
    """Dynamo traces both directions without a graph break (the eager backend skips the C++
    build, which takes tens of seconds on CPU; the slow test below runs inductor)."""
    torch._dynamo.reset()
    x = randn(2, 3, 16, 24, dtype=torch.float32)
    for wavelet in WAVELETS:
        fn = torch.compile(
            lambda t, w=wavelet: idwt2(dwt2(t, w, 2), w, 2), fullgraph=True, backend="eager"
        )
        assert torch.allclose(fn(x), x, atol=1e-6)


@pytest.mark.slow
def test_compiles_with_inductor():
    torch._dynamo.reset()
    x = randn(2, 3, 16, 24, dtype=torch.float32)
    fn = torch.compile(lambda t: dwt2(t, "legall53", 2), fullgraph=True)
    assert torch.allclose(fn(x), dwt2(x, "legall53", 2), atol=1e-6)


# --- bad inputs ----------------------------------------------------------------------------------


def test_bad_inputs_raise():
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"unknown wavelet 'db2'.*'haar', 'legall53'"):
        dwt2(x, "db2")
    with pytest.raises(ValueError, match=r"unknown wavelet 'bior2\.2'"):
        idwt2(x, "bior2.2")
    for bad in [0, -1, 1.0, True, "2"]:
        with pytest.raises(ValueError, match="levels must be an integer >= 1"):
            dwt2(x, levels=bad)
        with pytest.raises(ValueError, match="levels must be an integer >= 1"):
            idwt2(torch.zeros(1, 16, 4, 4), levels=bad)
    with pytest.raises(ValueError, match=r"4-D \(B, C, H, W\).*\(3, 32, 32\)"):
        dwt2(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"4-D.*\(1, 1, 1, 4, 4\)"):
        idwt2(torch.zeros(1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="image of 30x32 cannot take 2 DWT levels: both sides "):
        dwt2(torch.zeros(1, 3, 30, 32), levels=2)
    with pytest.raises(ValueError, match=r"image of 24x20 cannot take 3 DWT levels.*by 8"):
        dwt2(torch.zeros(1, 3, 24, 20), "legall53", levels=3)
    with pytest.raises(ValueError, match=r"divisible by 4\*\*2 = 16; got 12 channels"):
        idwt2(torch.zeros(1, 12, 4, 4), levels=2)
    with pytest.raises(ValueError, match="floating-point"):
        dwt2(torch.zeros(1, 3, 8, 8, dtype=torch.int64))
