"""Running one cell: train its config and evaluate it, or compute it (Table 1).

The cell's run folder is an ordinary sdiff run (config.json, checkpoints/, metrics.csv,
metrics.json), so an interrupted cell resumes from its last checkpoint when it runs again, and
everything a report shows can be traced back to it.
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdiff.ablations.grid import Cell, Table

__all__ = ["evaluate_cell", "execute"]


def _training_summary(run_dir: Path) -> dict[str, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    tail = rows[-3:]
    return {
        "final_loss": statistics.fmean(float(r["loss"]) for r in tail),
        "train_img_s": statistics.median(float(r["img_per_s"]) for r in rows),
        "train_images": float(rows[-1]["images"]),
    }


def evaluate_cell(
    cell: Cell,
    run_dir: str | Path,
    *,
    device: str,
    train_s: float,
    start: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """The evaluation half: the cell's ``EvalSpec`` on ``device`` for its trained run (whoever
    trained it), plus the training summary and the model's size."""
    from sdiff.eval.run_eval import evaluate_run
    from sdiff.models.flops import model_stats

    start = time.perf_counter() if start is None else start
    run_dir = Path(run_dir)
    record = evaluate_run(run_dir, replace(cell.eval, device=device), should_stop=should_stop)
    stats = model_stats(cell.config.model)
    metrics: dict[str, Any] = {
        k: record[k]
        for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "isc_mean")
        if record.get(k) is not None
    }
    metrics.update(_training_summary(run_dir))
    metrics.update(
        params=stats.params,
        gmacs=stats.macs / 1e9,
        num_generated=record["num_generated"],
        feature_extractor=record["feature_extractor"],
        train_s=train_s,
        wall_s=time.perf_counter() - start,
    )
    return metrics


def execute(
    cell: Cell,
    table: Table,
    run_dir: str | Path,
    *,
    progress: bool = False,
    device: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Metrics of one cell (a flat dict of numbers, plus a few descriptive strings).
    ``should_stop`` (training steps, sampling batches) ends it with ``StopRequested``."""
    start = time.perf_counter()
    if cell.kind == "compute":
        metrics = dict(table.compute(cell.config))
        metrics["wall_s"] = time.perf_counter() - start
        return metrics
    from sdiff.training.trainer import Trainer

    trainer = Trainer(cell.config, run_dir, device=device, progress=progress)
    trainer.run(should_stop=should_stop)
    return evaluate_cell(
        cell, run_dir, device=str(trainer.device), train_s=time.perf_counter() - start,
        start=start, should_stop=should_stop,
    )  # fmt: skip
