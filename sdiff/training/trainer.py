"""The training loop: one process, or many under torchrun (DDP, or FSDP for the 2B model).

    sdiff train --preset digits --out runs/digits
    torchrun --nproc_per_node=8 -m sdiff train --preset imagenet-uvit-l-256 \
        --set data.root=/data/imagenet/train --out runs/uvit-l-256

A run directory holds ``config.json`` (the resolved config), ``checkpoints/ckpt-<step>.pt``,
``metrics.csv`` (one row per logging interval) and ``samples/grid-<images>.png``.

The training step itself (weights, EMA, Adam, schedule and generator in a ``TrainState``;
``prepare_batch`` and ``train_step``) is ``sdiff.training.step``, shared with the benchmarks;
this module is the loop around it: the data order, logging, checkpoints, sample grids, the
run folder and the processes of a torchrun job.

Exact resume. Everything random is drawn from generators owned by the trainer and saved in the
checkpoint: the data order is a pure function of (seed, step) (one permutation per epoch of the
dataset, consumed ``batch_size`` indices per step, each process taking its slice), and flips,
label dropout, t and noise come from a per-process generator whose state is checkpointed. A run
stopped at any point and resumed from its last checkpoint repeats exactly the steps after it,
so on CPU in deterministic mode it ends with bit-identical parameters (tested). Rows of
``metrics.csv`` written after the checkpoint that a resume starts from are dropped, then
written again by the resumed run.

A non-finite gradient norm (which any non-finite loss produces) stops the run with an error
naming the step, before the optimizer touches the weights and without writing a checkpoint, so
the last good one is what remains. A finite gradient can still make non-finite weights (a huge
learning rate): before every checkpoint the weights, EMA and optimizer state are checked, and a
non-finite one stops the run without writing it. So every checkpoint a run writes is all
finite, and a resume takes the newest good one (``checkpoint.load_latest_good``), skipping a
damaged newer one with a warning.

One process owns a run folder at a time (``sdiff.util.runlock``): a Trainer takes the folder's lock
when it is built and gives it back when ``run`` ends (or on ``close``); another trainer, an
evaluation or a sampler of the same folder is refused meanwhile. ``run(should_stop=...)`` ends
the run cooperatively at the next step boundary, before that step writes anything (an ablation
runner that lost its claim on a cell).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from sdiff import __version__
from sdiff.data.datasets import build_dataset
from sdiff.data.images import save_grid
from sdiff.diffusion.samplers import get_sampler, x_predictor
from sdiff.training import step as one_step
from sdiff.training.checkpoint import list_checkpoints, load_latest_good, save_checkpoint
from sdiff.training.config import RunConfig, config_hash, diff_keys, identity_dict, to_json
from sdiff.training.step import TrainState, build_state, micro_batches
from sdiff.util.devices import resolve_device
from sdiff.util.errors import StopRequested
from sdiff.util.files import append_csv_row, append_line, atomic_write_text, write_csv
from sdiff.util.runlock import RunLock

__all__ = ["TrainResult", "Trainer", "index_batches", "train"]

METRIC_FIELDS = ["step", "images", "loss", "grad_norm", "lr", "img_per_s", "wall_s"]


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int
    images: int
    last_checkpoint: Path | None
    stopped_early: bool


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device | None) -> tuple[Dist, torch.device]:
    """Join the torchrun process group when WORLD_SIZE > 1; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    d = Dist(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        world=dist.get_world_size() if dist.is_initialized() else 1,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", d.local_rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
    return d, device


def index_batches(
    n: int, batch: int, seed: int, start_step: int, rank: int = 0, world: int = 1
) -> Iterator[list[int]]:
    """This process's dataset indices for steps start_step, start_step + 1, ...

    The global stream is one random permutation of range(n) per epoch, epoch e drawn with seed
    (seed, e); step s takes stream[s B : (s + 1) B] and process r its r-th slice of B / world.
    """
    if batch % world:
        raise ValueError(f"global batch {batch} is not divisible by {world} processes")
    local = batch // world
    pos = start_step * batch
    epoch, cache = -1, None
    while True:
        out = []
        for g in range(pos + rank * local, pos + (rank + 1) * local):
            e, i = divmod(g, n)
            if e != epoch:
                gen = torch.Generator().manual_seed(seed * 1_000_003 + e)
                epoch, cache = e, torch.randperm(n, generator=gen)
            out.append(int(cache[i]))
        yield out
        pos += batch


class _Batches(torch.utils.data.Sampler):
    def __init__(self, it: Iterator[list[int]]) -> None:
        self.it = it

    def __iter__(self):
        return self.it


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class _Clock:
    """Wall time of the run and of the current logging window (steps since its start)."""

    def __init__(self) -> None:
        self.start = self.tick = time.perf_counter()
        self.steps = 0


# Fields a resumed run may change: when things are logged, saved and sampled, how data is
# loaded, and how long the run goes on (upwards); none of them changes what a step computes.
RESUMABLE_FIELDS = (
    "train.num_workers", "train.log_every_images", "train.checkpoint_every_images",
    "train.keep_checkpoints", "train.sample_every_images", "train.sample_count",
    "train.sample_steps", "train.sample_sampler", "train.tensorboard", "train.total_images",
)  # fmt: skip
CHANGES_FILE = "config_changes.jsonl"  # one JSON record per resume that changed the config


def resume_changes(old: dict, new: dict, run_dir: Path) -> dict[str, list[Any]]:
    """{field: [old, new]} of a resume's allowed changes; a ValueError naming the fields when
    any other field differs, or when ``train.total_images`` would shrink."""
    diff = diff_keys(old, new)
    refused = [k for k in diff if k not in RESUMABLE_FIELDS]
    if refused:
        raise ValueError(
            f"{run_dir} holds a run with a different config (differs at {refused}); a resume "
            f"may change only {', '.join(RESUMABLE_FIELDS)}: use a new --out folder, or the "
            f"run's own values for those fields"
        )

    def at(tree: dict, key: str) -> Any:
        for part in key.split("."):
            tree = tree.get(part) if isinstance(tree, dict) else None
        return tree

    changes = {k: [at(old, k), at(new, k)] for k in diff}
    total = changes.get("train.total_images")
    if total and total[1] < total[0]:
        raise ValueError(
            f"train.total_images {total[1]} is less than the run's {total[0]}: a resume may "
            f"extend a run, not shorten it (use a checkpoint of the step you want instead)"
        )
    return changes


class Trainer:
    """Build everything a run needs from a ``RunConfig`` and a run directory, resuming when the
    directory already holds a run with the same config."""

    def __init__(
        self,
        config: RunConfig,
        run_dir: str | Path,
        *,
        device: torch.device | str | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.dist, self.device = setup_distributed(resolve_device(device) if device else None)
        # the main process owns the folder (it alone writes there); released when run() ends
        self._lock = RunLock(self.run_dir, "sdiff train") if self.dist.main else None
        if self._lock is not None:
            self._lock.acquire()
            weakref.finalize(self, self._lock.release)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        config = self.config
        t = config.train
        self.dataset = build_dataset(config.data)
        n_classes = getattr(self.dataset, "num_classes", 0)
        self.num_classes = config.model.num_classes
        if self.num_classes and n_classes > self.num_classes:
            raise ValueError(
                f"the dataset has {n_classes} classes but the model only {self.num_classes} "
                f"(set model.num_classes={n_classes})"
            )
        self.captions = None
        if config.text.enabled:
            from sdiff.models.text import build_caption_table

            table = build_caption_table(config.text, list(self.dataset.classes))
            if table.dim != config.model.text_dim:
                raise ValueError(
                    f"the text encoder gives {table.dim}-d embeddings but model.text_dim is "
                    f"{config.model.text_dim}"
                )
            self.captions = table.to(self.device)
        self.batch_local = t.batch_size // self.dist.world
        if t.batch_size % self.dist.world:
            raise ValueError(
                f"train.batch_size {t.batch_size} is not divisible by {self.dist.world} processes"
            )
        micro_batches(self.batch_local, t.batch_per_gpu)  # a bad split fails before any work
        self.state: TrainState = build_state(
            config, self.device, rank=self.dist.rank, world=self.dist.world
        )
        # running sums of the current logging window (loss, grad norm, steps); checkpointed so
        # a resumed run logs exactly the rows an uninterrupted one would
        self.window = [0.0, 0.0, 0]
        self.last_checkpoint: Path | None = None
        self._prepare_run_dir()

    def header(self) -> str:
        """What a person wants to see before the first step: the model and its size, the
        device and processes, the data, the budget, where it resumes and where logs go."""
        c, t = self.config, self.config.train
        params = sum(p.numel() for p in self.model.parameters())
        if self.dist.world > 1 and c.train.distributed == "fsdp":
            params = sum(p.numel() for p in self.ema.parameters())  # full shapes of the EMA
        total = self.total_steps()
        where = "from scratch" if self.step == 0 else f"resuming at step {self.step:,}"
        logs = [str(self.run_dir / "metrics.csv")]
        if t.tensorboard:
            logs.append(str(self.run_dir / "tensorboard"))
        return "\n".join([
            f"sdiff train: {c.model.kind} {params / 1e6:.2f}M parameters, {c.model.resolution} "
            f"px, {c.diffusion.schedule.name} schedule",
            f"  device {self.device} x {self.dist.world} process(es), precision {t.precision}",
            f"  data {c.data.name} ({len(self.dataset):,} images"
            + (f", {self.num_classes} classes" if self.num_classes else "") + ")",
            f"  {t.total_images:,} images = {total:,} steps of batch {t.batch_size} "
            f"({self.batch_local} per process), {where}",
            f"  run folder {self.run_dir.resolve()}; logs {', '.join(logs)}",
        ])  # fmt: skip

    # -- the state the step changes (sdiff.training.step.TrainState) -------------------------
    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def step_model(self) -> nn.Module:
        return self.state.step_model

    @property
    def ema(self) -> nn.Module:
        return self.state.ema

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.state.optimizer

    @property
    def schedule(self):
        return self.state.schedule

    @property
    def gen(self) -> torch.Generator:
        return self.state.generator

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    # -- set-up --------------------------------------------------------------------------
    def _prepare_run_dir(self) -> None:
        cfg_path = self.run_dir / "config.json"
        new = identity_dict(self.config)
        changes: dict[str, list[Any]] = {}
        accepted = {config_hash(self.config)} | self._earlier_hashes()
        if cfg_path.exists():
            try:
                raw = json.loads(cfg_path.read_text())
                old = identity_dict(raw)
            except ValueError as err:
                raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
            changes = resume_changes(old, new, self.run_dir)
            if changes:
                accepted.add(config_hash(raw))

        def same_config(path: Path, state: dict[str, Any]) -> None:
            if state.get("config_hash") not in accepted:
                raise ValueError(f"checkpoint {path} was written by a different config")

        found = load_latest_good(self.run_dir / "checkpoints", accept=same_config)
        if found is not None:
            self._restore(*found)
        if self.dist.main:
            if not self.run_dir.is_dir():
                self.run_dir.mkdir(parents=True)
            if changes:  # recorded, then the folder's config is the new one
                record = {"time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "step": self.step,
                          "from_hash": config_hash(raw), "changes": changes}  # fmt: skip
                append_line(self.run_dir / CHANGES_FILE, json.dumps(record) + "\n")
                atomic_write_text(cfg_path, to_json(self.config) + "\n")
                print(f"sdiff train: resuming {self.run_dir} at step {self.step} with "
                      + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changes.items())
                      + f" (recorded in {CHANGES_FILE})", flush=True)  # fmt: skip
            if not cfg_path.exists():
                atomic_write_text(cfg_path, to_json(self.config) + "\n")
            self._truncate_metrics()
        if dist.is_initialized():
            dist.barrier()

    def _earlier_hashes(self) -> set[str]:
        """The config hashes this folder's checkpoints may carry from before recorded changes."""
        path = self.run_dir / CHANGES_FILE
        if not path.is_file():
            return set()
        hashes = set()
        for line in path.read_text().splitlines():
            try:
                hashes.add(json.loads(line)["from_hash"])
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line of an interrupted append
        return hashes

    def _truncate_metrics(self) -> None:
        """Drop rows logged after the checkpoint this run resumes from (they are redone); a
        file with none to drop is left alone (a finished run may sit in a read-only folder)."""
        path = self.run_dir / "metrics.csv"
        if not path.exists():
            return
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        keep = [r for r in rows if int(r["step"]) <= self.step]
        if len(keep) < len(rows):
            write_csv(path, METRIC_FIELDS, keep)

    def close(self) -> None:
        """Give the run folder back (``run`` does so when it ends; idempotent)."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.config.train.distributed == "fsdp" and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
                get_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            model_sd = get_model_state_dict(self.model, options=opts)
            ema_sd = get_model_state_dict(self.ema, options=opts)
            opt_sd = get_optimizer_state_dict(self.model, self.opt, options=opts)
        else:
            model_sd, ema_sd, opt_sd = (
                self.model.state_dict(),
                self.ema.state_dict(),
                self.opt.state_dict(),
            )
        return {
            "format": 1,
            "step": self.step,
            "images": self.step * self.config.train.batch_size,
            "model": model_sd,
            "ema": ema_sd,
            "optimizer": opt_sd,
            "rng": self._gather_rng(),
            "log_window": list(self.window),
            "config": to_json(self.config, indent=None),
            "config_hash": config_hash(self.config),
            "versions": {"sdiff": __version__, "torch": str(torch.__version__)},
        }

    def _gather_rng(self) -> list[dict[str, Tensor]]:
        """Every process's generator states (rank order), so each resumes its own streams:
        the trainer's generator (flips, labels, t, noise) and the global ones (dropout)."""
        state = {"trainer": self.gen.get_state(), "cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not dist.is_initialized():
            return [state]
        states = [None] * self.dist.world
        dist.all_gather_object(states, state)
        return states

    def _restore(self, path: Path, state: dict[str, Any]) -> None:
        if self.config.train.distributed == "fsdp" and self.dist.world > 1:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            set_model_state_dict(self.model, state["model"], options=opts)
            set_model_state_dict(self.ema, state["ema"], options=opts)
            set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=opts)
        else:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])
        rng = state["rng"]
        if len(rng) != self.dist.world:
            raise ValueError(
                f"checkpoint {path} was written by {len(rng)} processes, this run has "
                f"{self.dist.world}: exact resume needs the same number"
            )
        mine = rng[self.dist.rank]
        self.gen.set_state(mine["trainer"])
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and self.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"], self.device)
        self.step = int(state["step"])
        self.window = list(state.get("log_window", [0.0, 0.0, 0]))
        self.last_checkpoint = path

    def save(self) -> Path:
        self._check_finite()
        state = self.state_dict()
        path = None
        if self.dist.main:
            path = save_checkpoint(
                self.run_dir / "checkpoints", self.step, state, self.config.train.keep_checkpoints
            )
        if dist.is_initialized():
            dist.barrier()
        self.last_checkpoint = path or self.last_checkpoint
        return path

    def _check_finite(self) -> None:
        """Weights, EMA and optimizer state all finite on every process, or a
        FloatingPointError before the checkpoint is written: a finite gradient with a huge
        step can still overflow the weights, and "last good checkpoint" must mean it."""

        def local(t: Tensor) -> Tensor:  # FSDP: each process checks its own shards
            return t.to_local() if hasattr(t, "to_local") else t

        named = [(f"model.{n}", p) for n, p in self.model.named_parameters()]
        named += [(f"ema.{n}", p) for n, p in self.ema.named_parameters()]
        for i, group in enumerate(self.opt.state.values()):
            named += [(f"optimizer.{i}.{k}", v) for k, v in group.items()
                      if isinstance(v, Tensor) and v.is_floating_point()]  # fmt: skip
        with torch.no_grad():
            flags = torch.stack([torch.isfinite(local(t)).all() for _, t in named])
            bad = (~flags).sum().reshape(1).float()
            if dist.is_initialized():
                dist.all_reduce(bad)
        if bad.item():
            mine = [name for (name, _), ok in zip(named, flags.tolist(), strict=True) if not ok]
            example = f", e.g. {mine[0]}" if mine else ""
            raise FloatingPointError(
                f"non-finite parameters after step {self.step} ({int(bad.item())} tensor(s)"
                f"{example}); its checkpoint was not written; last good checkpoint: "
                f"{self.last_checkpoint or 'none yet'}"
            )

    # -- one step (sdiff.training.step) -------------------------------------------------
    def lr_at(self, images: int) -> float:
        return one_step.lr_at(self.config.train, images)

    def _autocast(self):
        return one_step.autocast(self.config.train, self.device)

    def prepare_batch(self, x: Tensor, y: Tensor) -> tuple[Tensor, Any]:
        """Flip and drop labels (or pick and drop captions) with the state's generator
        (checkpointed, so resumable)."""
        return one_step.prepare_batch(self.state, x, y, self.config, self.captions)

    def train_step(self, x: Tensor, y: Any, *, t=None, noise=None) -> tuple[Tensor, Tensor]:
        """``sdiff.training.step.train_step`` on this run's state; a non-finite loss or
        gradient also names the last good checkpoint. Returns (loss, gradient norm)."""
        try:
            return one_step.train_step(self.state, (x, y), self.config, t=t, noise=noise)
        except FloatingPointError as err:
            last = self.last_checkpoint or "none yet"
            raise FloatingPointError(f"{err}; last good checkpoint: {last}") from err

    # -- the loop --------------------------------------------------------------------------
    def total_steps(self) -> int:
        t = self.config.train
        return math.ceil(t.total_images / t.batch_size)

    def _every(self, images: int) -> int:
        return max(1, images // self.config.train.batch_size)

    def run(
        self, max_steps: int | None = None, should_stop: Callable[[], bool] | None = None
    ) -> TrainResult:
        """Train to ``total_images`` (or ``max_steps`` more steps: a stop, as if killed). With
        ``should_stop``, checked after every step before it writes anything, a True ends the
        run with ``StopRequested``. The run folder is given back when this returns or raises."""
        if self._lock is not None and not self._lock.held:  # a second run() of this Trainer
            self._lock.acquire()
            newest = list_checkpoints(self.run_dir / "checkpoints")
            if (newest[-1] if newest else None) != self.last_checkpoint:
                self.close()
                raise ValueError(
                    f"{self.run_dir} changed since this Trainer was built (newest checkpoint "
                    f"{newest[-1] if newest else 'none'}); build a new one to resume from it"
                )
        try:
            return self._run(max_steps, should_stop)
        finally:
            self.close()

    def _run(self, max_steps: int | None, should_stop: Callable[[], bool] | None) -> TrainResult:
        t = self.config.train
        total = self.total_steps()
        start = self.step
        stop = total if max_steps is None else min(total, start + max_steps)
        log_every, ckpt_every = (
            self._every(t.log_every_images),
            self._every(t.checkpoint_every_images),
        )
        sample_every = self._every(t.sample_every_images) if t.sample_every_images else 0
        writer = self._tensorboard()
        bar = self._progress_bar(total, start)
        clock = _Clock()
        data = self._batches(start)
        while self.step < stop:
            x, y = self.prepare_batch(*next(data))
            loss, norm = self.train_step(x, y)
            if should_stop is not None and should_stop():
                raise StopRequested(f"{self.run_dir}: stopped on request after step {self.step}")
            self.window[0] += float(loss)
            self.window[1] += float(norm)
            self.window[2] += 1
            clock.steps += 1
            if bar is not None:
                bar.update(1)
            if self.step % log_every == 0 or self.step == stop:
                row = self._log_row(clock)
                self._log(row, writer)
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
            if sample_every and self.step % sample_every == 0:
                self.sample_grid()
            if self.step % ckpt_every == 0 or self.step == total:
                self.save()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        return TrainResult(self.run_dir, self.step, self.step * t.batch_size, self.last_checkpoint,
                           stopped_early=self.step < total)  # fmt: skip

    def _batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's (images, labels) for steps start, start + 1, ... (``index_batches``
        order: a function of the seed and the step, so a resume continues it exactly)."""
        t = self.config.train
        batches = index_batches(
            len(self.dataset), t.batch_size, t.seed, start, self.dist.rank, self.dist.world
        )
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_Batches(batches), num_workers=t.num_workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating an iterator must not draw from the global one,
            # which dropout uses and which a resume restores
            generator=torch.Generator().manual_seed(t.seed),
        )  # fmt: skip
        return iter(loader)

    def _progress_bar(self, total: int, start: int):
        if not (self.progress and self.dist.main):
            return None
        from tqdm.auto import tqdm

        # redraw at most every 0.5 s (every 10 s into a log file rather than a terminal)
        every = 0.5 if sys.stderr.isatty() else 10.0
        return tqdm(total=total, initial=start, unit="step", desc="train", mininterval=every)

    def _log_row(self, clock: _Clock) -> dict:
        """The metrics row of the logging window that ends now (loss averaged over the
        processes); starts the next window."""
        t = self.config.train
        now = time.perf_counter()
        sum_loss, sum_norm, count = self.window
        row = {
            "step": self.step,
            "images": self.step * t.batch_size,
            "loss": self._mean_over_processes(sum_loss / count),
            "grad_norm": sum_norm / count,
            "lr": self.opt.param_groups[0]["lr"],
            "img_per_s": clock.steps * t.batch_size / max(now - clock.tick, 1e-9),
            "wall_s": now - clock.start,
        }
        self.window = [0.0, 0.0, 0]
        clock.steps, clock.tick = 0, now
        return row

    def _mean_over_processes(self, value: float) -> float:
        if not dist.is_initialized():
            return value
        v = torch.tensor([value], device=self.device)
        dist.all_reduce(v)
        return v.item() / self.dist.world

    def _log(self, row: dict, writer) -> None:
        if not self.dist.main:
            return
        append_csv_row(self.run_dir / "metrics.csv", METRIC_FIELDS, row)
        if writer is not None:
            for key in ("loss", "grad_norm", "lr", "img_per_s"):
                writer.add_scalar(f"train/{key}", row[key], row["images"])

    def _tensorboard(self):
        if not (self.config.train.tensorboard and self.dist.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(
                "train.tensorboard needs the tensorboard package: pip install 'sdiff[tensorboard]'"
            ) from err
        return SummaryWriter(self.run_dir / "tensorboard")

    @torch.no_grad()
    def sample_grid(self, path: Path | None = None) -> Path | None:
        """A grid of EMA samples with fixed noise and labels cycling over the classes. Every
        process samples under FSDP (the EMA is sharded); only the main one otherwise."""
        sharded = self.config.train.distributed == "fsdp" and self.dist.world > 1
        if not (self.dist.main or sharded):
            return None
        t, m = self.config.train, self.config.model
        n = t.sample_count
        gen = torch.Generator(device=self.device).manual_seed(t.seed + 12345)
        noise = torch.randn(
            n, m.in_channels, m.resolution, m.resolution, device=self.device, generator=gen
        )
        cond = torch.arange(n, device=self.device) % self.num_classes if self.num_classes else None
        if self.captions is not None:
            classes = len(self.captions.captions) // self.captions.per_class
            labels = torch.arange(n, device=self.device) % classes
            cond = self.captions.condition(self.captions.for_labels(labels))
        denoise = x_predictor(_unwrap(self.ema), self.config.diffusion.prediction)
        with self._autocast():
            x = get_sampler(t.sample_sampler)(
                denoise, noise, schedule=self.schedule, steps=t.sample_steps, cond=cond,
                generator=gen,
            )  # fmt: skip
        if not self.dist.main:
            return None
        path = path or self.run_dir / "samples" / f"grid-{self.step * t.batch_size:012d}.png"
        return save_grid(x.float(), path, nrow=math.ceil(math.sqrt(n)))


def train(config: RunConfig, run_dir: str | Path, **kwargs) -> TrainResult:
    return Trainer(config, run_dir, **kwargs).run()
