"""Evaluating a trained run: generate samples, measure them against a reference, record it.

    sdiff eval --run runs/digits --n 1000                      # "FID train" on the bundled data
    sdiff eval --run runs/uvit --n 50000 --reference VIRTUAL_imagenet256_labeled.npz
    sdiff eval --samples my_samples/ --reference val_folder/   # any two image sets

simple diffusion (arXiv 2301.11093), Table 7, reports two FIDs: "FID train", against statistics
of the training set, and "FID eval", against the validation set. One ``EvalSpec``
(``sdiff.eval.spec``) says how: its sampling settings, its reference and its metrics. Reference
``"train"`` uses the run's own training data (optionally an evenly spaced subset of
``reference_n`` images, for quick CPU runs); a folder or an ``.npz`` (ADM reference batches hold
``mu``/``sigma`` and images) gives either at paper scale. Each evaluation of a run is appended
to ``<run>/metrics.json`` with the sampling settings, the checkpoint step, the model weights
(EMA or raw), the Inception weights, the sample counts and the commit of the sdiff that ran it
(``sdiff.util.provenance``), so a number in a report can be traced back to how it was made. A
checkpoint file named explicitly (``--checkpoint``) is evaluated as it is and recorded in
``metrics.json`` beside the file. Evaluating holds the lock of the folder it records into
(``sdiff.util.runlock``).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sdiff.data.datasets import build_dataset
from sdiff.data.images import save_folder, to_uint8
from sdiff.eval.metrics import ReferenceStats, evaluate, inception_features
from sdiff.eval.sample import BUSY_HINT, generate, load_run_checkpoint, model_from_state
from sdiff.eval.spec import EvalSpec
from sdiff.training.checkpoint import load_checkpoint
from sdiff.util import provenance
from sdiff.util.errors import StopRequested
from sdiff.util.files import atomic_write_text
from sdiff.util.runlock import RunLock

__all__ = ["evaluate_run", "metrics_path", "training_reference"]


def training_reference(config, n: int | None = None) -> torch.Tensor:
    """The run's training images as uint8 (N, C, H, W); ``n`` takes an evenly spaced subset."""
    dataset = build_dataset(config.data)
    total = len(dataset)
    if n is not None and not 1 <= n <= total:
        raise ValueError(f"reference_n must lie in [1, {total}] (the dataset size); got {n}")
    idx = range(total) if n is None else torch.linspace(0, total - 1, n).round().long().tolist()
    return torch.stack([to_uint8(dataset[i][0]) for i in idx])


def training_reference_stats(config, spec: EvalSpec) -> ReferenceStats:
    """Inception statistics (and features) of the run's training images (``spec.reference_n``
    of them, or all), cached on disk under ``$SDIFF_CACHE/reference/`` keyed by the data
    config, the subset size and the weights, so that the cells of an ablation grid (and
    reruns) extract them once."""
    from sdiff.eval.inception import cache_dir, resolve_weights
    from sdiff.training.config import to_dict

    n = spec.reference_n
    weights = resolve_weights(spec.weights)
    key = json.dumps([to_dict(config.data), n, weights.description], sort_keys=True)
    path = cache_dir() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        try:
            return ReferenceStats.load(path)
        except ValueError:
            path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, not trusted
    images = training_reference(config, n)
    stats = ReferenceStats.from_features(
        inception_features(images, spec), weights.description, f"train (n={len(images)})"
    )
    stats.save(path)  # atomic: a concurrent cell reads the old entry or the whole new one
    return stats


def metrics_path(source: str | Path) -> Path:
    """Where the evaluations of a run folder, or of a checkpoint file, are recorded."""
    source = Path(source)
    return (source if source.is_dir() else source.parent) / "metrics.json"


def evaluate_run(
    run: str | Path,
    spec: EvalSpec,
    *,
    ema: bool = True,
    samples_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Generate ``spec.n`` images from a run folder's newest good checkpoint (checked against
    the run's config) or from a checkpoint file, evaluate them against ``spec.reference``, and
    append the record to ``metrics_path(run)``. ``ema``: the EMA weights, else the raw ones.
    ``should_stop`` ends it early (``StopRequested``), before the record is written.
    """
    path = metrics_path(run)
    with RunLock(path.parent, "sdiff eval", hint=BUSY_HINT):
        return _evaluate(run, path, spec, ema, samples_dir, should_stop)


def _evaluate(run, path: Path, spec: EvalSpec, ema: bool, samples_dir, should_stop) -> dict:
    if Path(run).is_dir():
        checkpoint, state = load_run_checkpoint(run)
    else:
        checkpoint, state = Path(run), load_checkpoint(run)
    model, config, step = model_from_state(state, ema=ema, device=spec.device)
    start = time.perf_counter()
    images, _ = generate(model, config, spec, should_stop=should_stop)
    sample_s = time.perf_counter() - start
    if samples_dir is not None:
        save_folder(images, samples_dir)
    start = time.perf_counter()
    if spec.reference == "train":
        reference = training_reference_stats(config, spec)
        reference_label = f"train (n={reference.num_images})"
    else:
        reference = reference_label = spec.reference
    result = evaluate(images, reference, spec)
    record = {
        "run": str(Path(run)),
        "checkpoint": str(checkpoint),
        "step": step,
        "model_weights": "ema" if ema else "raw",
        "reference": reference_label,
        "sampling": spec.sampling(),
        "sample_seconds": round(sample_s, 2),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "device": spec.device,
        "git_sha": provenance.git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **result,
    }
    if should_stop is not None and should_stop():
        raise StopRequested(f"evaluation of {run} stopped on request before its record")
    _append_record(path, record)
    return record


def _append_record(path: Path, record: dict) -> None:
    """Add one evaluation to ``metrics.json`` (rewritten atomically; earlier ones kept)."""
    records = []
    if path.exists():
        try:
            records = json.loads(path.read_text())["evaluations"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path} exists but is not an sdiff metrics file: {err}") from err
    records.append(record)
    atomic_write_text(path, json.dumps({"evaluations": records}, indent=2, default=str) + "\n")
