"""Exports of trained runs: ``sdiff export RUN OUT`` and the trainer's EMA snapshots.

    sdiff export runs/digits exports/digits               # newest good checkpoint, EMA weights
    sdiff export runs/digits exports/raw --raw --dtype bf16
    sdiff export runs/digits exports/d --checkpoint runs/digits/checkpoints/ckpt-000000000750.pt

``export_run`` turns one training checkpoint into the layout of ``sdiff.models.pretrained``
(``model.safetensors`` + ``config.json``), which ``sdiff.load_pretrained`` reads without any
training code. The checkpoint is found the way ``sdiff sample`` finds one: a run folder gives
its newest good checkpoint (or the one of ``step``), which must have been written by the
folder's own ``config.json``, and the folder's lock is held shared while it is read (a trainer
that owns the folder is not raced); ``checkpoint=`` names a file to take instead, checked
against the run's config but read without the lock (to export while the run trains); a
checkpoint given as the source is used as it is. Checkpoints are read by
``sdiff.training.checkpoint.load_checkpoint``, whole.

``save_ema_snapshot`` is what a trainer calls to keep small inference-only copies of its EMA
weights beside the checkpoints, one folder per training images seen:

    <run>/ema/<images:012d>/model.safetensors
    <run>/ema/<images:012d>/config.json

each a complete export (``sdiff.load_pretrained("<run>/ema/000000048000")``), written as a
whole, so a crash never leaves one that loads half.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdiff.models.pretrained import save_pretrained
from sdiff.training.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_latest_good,
    non_finite_tensors,
)
from sdiff.training.config import RunConfig, config_hash, diff_keys, from_dict, to_dict
from sdiff.util.runlock import RunLock

__all__ = ["EMA_FOLDER", "ema_snapshot_path", "export_run", "load_run_state", "save_ema_snapshot"]

EMA_FOLDER = "ema"
BUSY_HINT = "to export a checkpoint of a run in progress, name its file with --checkpoint"


def export_run(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    ema: bool = True,
    step: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Export a run folder's checkpoint (see the module docstring) or a checkpoint file into
    the folder ``out``: the EMA weights (``ema=False``: the raw ones), floating tensors in
    ``dtype`` (None: as trained). Returns ``out``."""
    source = Path(source)
    if (source / "config.json").is_file():
        path, state = load_run_state(source, step=step, checkpoint=checkpoint)
    elif step is not None or checkpoint is not None:
        raise ValueError(f"{source} is not a run folder (no config.json): a step or a "
                         f"checkpoint file is looked up in a run folder")  # fmt: skip
    elif not source.exists():
        raise ValueError(f"{source}: no such run folder or checkpoint")
    else:
        try:
            path, state = source, load_checkpoint(source)
        except ValueError as err:
            if not source.is_dir():
                raise
            raise ValueError(
                f"{source} is neither a run folder (no config.json) nor a checkpoint"
            ) from err
    config = from_dict(RunConfig, json.loads(state["config"]))
    metadata = {
        "source": str(source.resolve()),
        "checkpoint": path.name,
        "step": int(state["step"]),
        "images": int(state.get("images", int(state["step"]) * config.train.batch_size)),
        "weights": "ema" if ema else "raw",
        "config_hash": state.get("config_hash") or config_hash(config),
        "run_config": to_dict(config),
    }
    weights = state["ema" if ema else "model"]
    return save_pretrained(weights, config.model, out, diffusion=config.diffusion,
                           metadata=metadata, dtype=dtype)  # fmt: skip


def run_checker(run_dir: Path, *, force: str) -> Callable[[Path, dict[str, Any]], None]:
    """``check(path, state)``, raising unless the run folder's ``config.json`` wrote that
    checkpoint; ``force`` says how to use a checkpoint anyway (it ends the messages)."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise ValueError(
            f"no checkpoint found: {run_dir} is not a run folder (no config.json); to use a "
            f"checkpoint file on its own, {force}"
        )
    try:
        expected = json.loads(config_path.read_text())
    except ValueError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from None

    def written_here(path: Path, state: dict[str, Any]) -> None:
        differs = diff_keys(expected, json.loads(state["config"]))
        if differs:
            raise ValueError(
                f"checkpoint {path} was not written by {config_path}: they differ at {differs}; "
                f"to use it anyway, {force}"
            )

    return written_here


def load_run_state(
    run_dir: str | os.PathLike[str],
    *,
    step: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """(path, state) of a run folder's newest good checkpoint, of the one of ``step``, or of
    the file ``checkpoint``; refused if the run's ``config.json`` did not write it."""
    run_dir = Path(run_dir)
    if step is not None and checkpoint is not None:
        raise ValueError("give a step or a checkpoint file, not both")
    written_here = run_checker(run_dir, force="give the checkpoint file as the source")

    if checkpoint is not None:  # a file named explicitly: no lock, so a running trainer is fine
        return _one_good(Path(checkpoint), written_here)
    with RunLock(run_dir, "sdiff export", shared=True, hint=BUSY_HINT):
        if step is not None:
            name = f"ckpt-{step:012d}"
            of_step = [p for p in list_checkpoints(run_dir / "checkpoints") if p.stem == name]
            if not of_step:
                raise ValueError(f"no checkpoint of step {step} in {run_dir / 'checkpoints'}")
            return _one_good(of_step[-1], written_here)
        found = load_latest_good(run_dir / "checkpoints", accept=written_here)
    if found is None:
        raise ValueError(f"no checkpoint found in {run_dir} (looked in {run_dir / 'checkpoints'})")
    return found


def _one_good(path: Path, accept) -> tuple[Path, dict[str, Any]]:
    state = load_checkpoint(path)
    accept(path, state)
    bad = non_finite_tensors(state)
    if bad:
        raise ValueError(f"checkpoint {path} has non-finite values in {len(bad)} tensor(s), "
                         f"e.g. {bad[0]}")  # fmt: skip
    return path, state


def ema_snapshot_path(run_dir: str | os.PathLike[str], images: int) -> Path:
    """``<run>/ema/<images:012d>``: the EMA snapshot after ``images`` training images."""
    return Path(run_dir) / EMA_FOLDER / f"{images:012d}"


def save_ema_snapshot(
    run_dir: str | os.PathLike[str],
    ema: nn.Module | dict[str, torch.Tensor],
    config: RunConfig,
    *,
    step: int,
    images: int,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the EMA weights at ``step`` (``images`` training images) as the export
    ``<run>/ema/<images:012d>/`` (module docstring); return its folder. ``ema`` is the EMA
    module or its state dict; under FSDP, call it on the main process with the full state
    dict (gathered, on the CPU), as the trainer builds for a ``.pt`` checkpoint. An existing
    snapshot of the same count is replaced; ``dtype`` converts the floating tensors."""
    if isinstance(ema, nn.Module):
        ema = ema.state_dict()
    metadata = {
        "source": str(Path(run_dir).resolve()),
        "step": int(step),
        "images": int(images),
        "weights": "ema",
        "config_hash": config_hash(config),
        "run_config": to_dict(config),
    }
    folder = ema_snapshot_path(run_dir, images)
    return save_pretrained(ema, config.model, folder, diffusion=config.diffusion,
                           metadata=metadata, dtype=dtype)  # fmt: skip
