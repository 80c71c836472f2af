"""Evaluating a trained run: generate samples, measure them against a reference, record it.

    sdiff eval --run runs/digits --n 1000                      # "FID train" on the bundled data
    sdiff eval --run runs/uvit --n 50000 --reference VIRTUAL_imagenet256_labeled.npz
    sdiff eval --samples my_samples/ --reference val_folder/   # any two image sets

The paper reports two FIDs (PAPER.md, Table 7): "FID train", against statistics of the
training set, and "FID eval", against the validation set. ``--reference train`` uses the run's
own training data (optionally an evenly spaced subset of ``reference_n`` images, for quick CPU
runs); a folder or an ``.npz`` (ADM reference batches hold ``mu``/``sigma`` and images) gives
either at paper scale. Each evaluation of a run is appended to ``<run>/metrics.json`` with the
sampling settings, the checkpoint step, the weights of the feature network and the sample
counts, so a number in a report can be traced back to how it was made.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sdiff.data import build_dataset
from sdiff.evaluate import EvalConfig, ReferenceStats, evaluate, inception_features
from sdiff.images import save_folder, to_uint8
from sdiff.sample import SampleOptions, generate, load_trained, resolve_checkpoint

__all__ = ["evaluate_run", "training_reference"]


def training_reference(config, n: int | None = None) -> torch.Tensor:
    """The run's training images as uint8 (N, C, H, W); ``n`` takes an evenly spaced subset."""
    dataset = build_dataset(config.data)
    total = len(dataset)
    if n is not None and not 1 <= n <= total:
        raise ValueError(f"reference_n must lie in [1, {total}] (the dataset size); got {n}")
    idx = range(total) if n is None else torch.linspace(0, total - 1, n).round().long().tolist()
    return torch.stack([to_uint8(dataset[i][0]) for i in idx])


def training_reference_stats(config, n: int | None, eval_config: EvalConfig) -> ReferenceStats:
    """Inception statistics (and features) of the run's training images, cached on disk under
    ``$SDIFF_CACHE/reference/`` keyed by the data config, the subset size and the weights, so
    that the cells of an ablation grid (and reruns) extract them once."""
    from sdiff.config import to_dict
    from sdiff.inception_weights import cache_dir, resolve_weights

    weights = resolve_weights(eval_config.weights)
    key = json.dumps([to_dict(config.data), n, weights.description], sort_keys=True)
    path = cache_dir() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        try:
            return ReferenceStats.load(path)
        except ValueError:
            path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, not trusted
    images = training_reference(config, n)
    stats = ReferenceStats.from_features(
        inception_features(images, eval_config), weights.description, f"train (n={len(images)})"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    stats.save(tmp)
    os.replace(tmp, path)
    return stats


def evaluate_run(
    run: str | Path,
    options: SampleOptions,
    eval_config: EvalConfig,
    *,
    reference: str = "train",
    reference_n: int | None = None,
    ema: bool = True,
    device: str = "cpu",
    samples_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Generate ``options.n`` images from the run's checkpoint and evaluate them."""
    checkpoint = resolve_checkpoint(run)
    model, config, step = load_trained(checkpoint, ema=ema, device=device)
    start = time.perf_counter()
    images, _ = generate(model, config, options, device=device)
    sample_s = time.perf_counter() - start
    if samples_dir is not None:
        save_folder(images, samples_dir)
    start = time.perf_counter()
    if reference == "train":
        ref = training_reference_stats(config, reference_n, eval_config)
        reference_label = f"train (n={ref.num_images})"
    else:
        ref, reference_label = reference, reference
    result = evaluate(images, ref, eval_config)
    record = {
        "run": str(Path(run)),
        "checkpoint": str(checkpoint),
        "step": step,
        "weights": "ema" if ema else "raw",
        "reference": reference_label,
        "sampling": {k: v for k, v in asdict(options).items() if k != "batch_size"},
        "sample_seconds": round(sample_s, 2),
        "eval_seconds": round(time.perf_counter() - start, 2),
        "device": device,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **result,
    }
    run_dir = Path(run) if Path(run).is_dir() else checkpoint.parent.parent
    _append_record(run_dir / "metrics.json", record)
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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"evaluations": records}, indent=2, default=str) + "\n")
    os.replace(tmp, path)
