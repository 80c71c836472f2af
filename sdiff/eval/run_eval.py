"""Evaluating a trained run: generate samples, measure them against a reference, record it.

    sdiff eval --run runs/digits --n 1000                      # "FID train" on the bundled data
    sdiff eval --run runs/uvit --n 50000 --reference VIRTUAL_imagenet256_labeled.npz
    sdiff eval --samples my_samples/ --reference val_folder/   # any two image sets
    torchrun --nproc_per_node=8 -m sdiff -- eval --run runs/uvit --n 50000 --save-npz s.npz

simple diffusion (arXiv 2301.11093), Table 7, reports two FIDs: "FID train", against statistics
of the training set, and "FID eval", against the validation set. One ``EvalSpec``
(``sdiff.eval.spec``) says how: its sampling settings, its reference and its metrics. Reference
``"train"`` uses the run's own training data (optionally an evenly spaced subset of
``reference_n`` images, for quick CPU runs); a folder or an ``.npz`` (ADM reference batches hold
``mu``/``sigma`` and images; their statistics are recomputed from the images unless
``reference_stats`` is "stored", ``sdiff.eval.metrics``) gives either at paper scale.

The images are never all held at once: each chunk of ``batch_size`` images goes through the
Inception as soon as it is drawn (and into ``--save-samples`` / ``--save-npz`` when asked), and
only its features are kept. Under torchrun (``sdiff.eval.distributed``) each process does this
for its own chunks and rank 0 gathers the features, in global index order, so the numbers do
not depend on the number of processes.

Each evaluation of a run is appended to ``<run>/metrics.json`` (by rank 0, once) with the
sampling settings and how the noise was drawn ("per-chunk seeds", ``sdiff.eval.sample``), the
checkpoint step, the model weights (EMA or raw), the Inception weights, how the reference
statistics were made, the sample counts, the number of processes and the commit of the sdiff
that ran it (``sdiff.util.provenance``), so a number in a report can be traced back to how it
was made. A checkpoint file named explicitly (``--checkpoint``) is evaluated as it is and
recorded in ``metrics.json`` beside the file. Evaluating holds the lock of the folder it
records into (``sdiff.util.runlock``; under torchrun, rank 0 holds it for all).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdiff.data.datasets import build_dataset
from sdiff.data.images import to_uint8
from sdiff.eval.distributed import (
    World,
    barrier,
    broadcast_from_main,
    current_world,
    gather_to_main,
)
from sdiff.eval.features import extract, image_dataset, inception_outputs
from sdiff.eval.inception import InceptionWeights, cache_dir, resolve_weights
from sdiff.eval.metrics import (
    ReferenceStats,
    check_counts,
    check_reference,
    reference_stats,
    result_from_features,
)
from sdiff.eval.sample import (
    BUSY_HINT,
    NOISE,
    Chunk,
    draw,
    load_run_checkpoint,
    model_from_state,
)
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


def training_reference_stats(config, spec: EvalSpec, *, progress: bool = False) -> ReferenceStats:
    """Inception statistics (and features) of the run's training images (``spec.reference_n``
    of them, or all), cached on disk under ``$SDIFF_CACHE/reference/`` keyed by the data
    config, the subset size and the weights, so that the cells of an ablation grid (and
    reruns) extract them once."""
    from sdiff.training.config import to_dict

    n = spec.reference_n
    weights = resolve_weights(spec.weights)
    key = json.dumps([to_dict(config.data), n, weights.description], sort_keys=True)
    path = cache_dir() / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.exists():
        try:
            # computed here before, by these weights (the key): not someone else's statistics
            return dataclasses.replace(ReferenceStats.load(path), origin="computed")
        except ValueError:
            path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, not trusted
    images = training_reference(config, n)
    feats = extract(image_dataset(images, "reference"), spec, weights, ("2048",),
                    progress=progress, desc="reference features")["2048"]  # fmt: skip
    stats = ReferenceStats.from_features(feats, weights.description, f"train (n={len(images)})")
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
    npz: str | Path | None = None,
    progress: bool = False,
    world: World | None = None,
) -> dict[str, Any]:
    """Generate ``spec.n`` images from a run folder's newest good checkpoint (checked against
    the run's config) or from a checkpoint file, evaluate them against ``spec.reference``, and
    append the record to ``metrics_path(run)``. ``ema``: the EMA weights, else the raw ones.
    ``samples_dir`` and ``npz`` also keep the images (PNGs named by index; an ADM sample
    batch, ``sdiff.eval.adm_batch``); ``progress`` draws bars on rank 0. ``should_stop`` ends
    it early (``StopRequested``), before the record is written.

    Under torchrun (``world``, default: the process group joined, if any) every process calls
    it: each samples its chunks and extracts their features, rank 0 gathers the features,
    computes the metrics and writes the record, and every process returns it.
    """
    world = current_world() if world is None else world
    path = metrics_path(run)
    lock = RunLock(path.parent, "sdiff eval", hint=BUSY_HINT) if world.main else nullcontext()
    with lock:
        barrier(world)  # the others read the checkpoint once rank 0 holds the folder
        return _evaluate(run, path, spec, ema, samples_dir, npz, should_stop, progress, world)


def _evaluate(
    run, path: Path, spec: EvalSpec, ema: bool, samples_dir, npz, should_stop, progress: bool,
    world: World,
) -> dict:  # fmt: skip
    if Path(run).is_dir():
        checkpoint, state = load_run_checkpoint(run)
    else:
        checkpoint, state = Path(run), load_checkpoint(run)
    model, config, step = model_from_state(state, ema=ema, device=spec.device)
    check_counts(spec, spec.n)  # what cannot be measured fails before the sampling
    check_reference(spec.reference, spec)
    weights = _shared_weights(spec, world)
    outputs: dict[int, dict[str, np.ndarray]] = {}  # chunk index -> Inception outputs
    feature_s = 0.0

    def features(chunk: Chunk) -> None:
        nonlocal feature_s
        start = time.perf_counter()
        outputs[chunk.index] = inception_outputs(chunk.images, spec, weights)
        feature_s += time.perf_counter() - start

    start = time.perf_counter()
    # one bar: a chunk counts once it is drawn and through the Inception
    draw(model, config, spec, world=world, folder=samples_dir, npz=npz, each=features,
         should_stop=should_stop, progress=progress, desc="sample + features")  # fmt: skip
    sample_s = time.perf_counter() - start - feature_s
    gathered = gather_to_main((outputs, sample_s, feature_s), world)
    record = None
    if world.main:
        record = _record_on_main(gathered, run, checkpoint, step, ema, config, spec, weights,
                                 npz, progress, world)  # fmt: skip
        if should_stop is not None and should_stop():
            raise StopRequested(f"evaluation of {run} stopped on request before its record")
        _append_record(path, record)
    return broadcast_from_main(record, world)


def _shared_weights(spec: EvalSpec, world: World) -> InceptionWeights:
    """Rank 0 resolves ``spec.weights`` (one probe of the network, one warning); the others
    take its answer, converting the offline weights themselves when rank 0's file is not on
    their file system."""
    weights = broadcast_from_main(resolve_weights(spec.weights) if world.main else None, world)
    if weights.path is not None and not Path(weights.path).is_file():
        weights = resolve_weights(weights.kind)
    return weights


def _record_on_main(
    gathered, run, checkpoint, step, ema, config, spec: EvalSpec, weights, npz, progress, world
) -> dict:  # fmt: skip
    """Rank 0: the features of every chunk in global order, the reference, the metrics."""
    outputs = {c: out for part, _, _ in gathered for c, out in part.items()}
    feats = {k: np.concatenate([outputs[c][k] for c in sorted(outputs)]) for k in outputs[0]}
    start = time.perf_counter()
    if spec.reference == "train":
        reference = training_reference_stats(config, spec, progress=progress)
        reference_label = f"train (n={reference.num_images})"
    else:
        reference = reference_stats(spec.reference, spec, progress=progress)
        reference_label = spec.reference
    result = result_from_features(feats, reference, spec, weights)
    return {
        "run": str(Path(run)),
        "checkpoint": str(checkpoint),
        "step": step,
        "model_weights": "ema" if ema else "raw",
        "reference": reference_label,
        "sampling": spec.sampling(),
        "noise": NOISE,  # sdiff.eval.sample: chunk c of sample_batch_size images, its own seed
        "sample_batch_size": spec.batch_size,
        "sample_seconds": round(max(s for _, s, _ in gathered), 2),
        # the slowest process's feature extraction, then rank 0's reference and metrics
        "eval_seconds": round(max(f for _, _, f in gathered) + time.perf_counter() - start, 2),
        "device": spec.device,
        "processes": world.size,
        "samples_npz": None if npz is None else str(npz),
        "git_sha": provenance.git_sha(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        **result,
    }


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
