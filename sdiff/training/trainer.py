"""The training loop: one process, or many under torchrun (DDP, or FSDP for the 2B model).

    sdiff train --run-preset digits --out runs/digits
    torchrun --nproc_per_node=8 -m sdiff train --run-preset imagenet-uvit-l-256 \
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
from sdiff.data.prepared import check_num_workers
from sdiff.diffusion.samplers import get_sampler, x_predictor
from sdiff.training import step as one_step
from sdiff.training.checkpoint import (
    list_checkpoints,
    load_latest_good,
    save_checkpoint,
    save_sharded_checkpoint,
    sharded_into,
)
from sdiff.training.config import (
    RunConfig,
    config_hash,
    diff_keys,
    identity_dict,
    to_dict,
    to_json,
)
from sdiff.training.step import TrainState, build_state, micro_batches
from sdiff.training.trackers import Tracker, describe_tracker, open_tracker
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
    "train.logger", "train.logger_project", "train.logger_name", "train.logger_uri",
    "train.ema_snapshot_every_images",
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


def _indexed(optimizer_state: dict) -> bool:
    """Whether an optimizer state dict names parameters by position (``Optimizer.state_dict``)
    rather than by name (``torch.distributed.checkpoint.state_dict``)."""
    groups = optimizer_state.get("param_groups", [])
    return any(isinstance(p, int) for g in groups for p in g.get("params", []))


def _named_optimizer_state(model: nn.Module, optimizer_state: dict) -> dict:
    """A positional optimizer state dict keyed by parameter names instead: the optimizer was
    built over ``model.parameters()``, so position i is the i-th named parameter."""
    names = [name for name, _ in model.named_parameters()]
    groups = [
        dict(g, params=[names[i] for i in g["params"]]) for g in optimizer_state["param_groups"]
    ]
    state = {names[i]: v for i, v in optimizer_state["state"].items()}
    return {"state": state, "param_groups": groups}


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
        if self.dist.main:  # a file-backed dataset on CUDA wants loader workers
            check_num_workers(self.dataset, self.device, t.num_workers)
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
        # processes that wrote the checkpoint resumed, when they were another number
        self.resharded_from: int | None = None
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
        accumulate = ""
        if t.batch_per_gpu and t.batch_per_gpu < self.batch_local:
            accumulate = f" in micro-batches of {t.batch_per_gpu}"
        logs = [str(self.run_dir / "metrics.csv"), describe_tracker(c, self.run_dir)]
        logs = [where for where in logs if where]
        return "\n".join([
            f"sdiff train: {c.model.kind} {params / 1e6:.2f}M parameters, {c.model.resolution} "
            f"px, {c.diffusion.schedule.name} schedule",
            f"  device {self.device} x {self.dist.world} process(es), precision {t.precision}",
            f"  data {c.data.name} ({len(self.dataset):,} images"
            + (f", {self.num_classes} classes" if self.num_classes else "") + ")",
            f"  {t.total_images:,} images = {total:,} steps of batch {t.batch_size} "
            f"({self.batch_local} per process{accumulate}), {where}",
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
        new = identity_dict(self.config, tracking=True)
        changes: dict[str, list[Any]] = {}
        accepted = {config_hash(self.config)} | self._earlier_hashes()
        if cfg_path.exists():
            try:
                raw = json.loads(cfg_path.read_text())
                old = identity_dict(raw, tracking=True)
            except ValueError as err:
                raise ValueError(f"{cfg_path} is not valid JSON: {err}") from None
            changes = resume_changes(old, new, self.run_dir)
            if changes:
                accepted.add(config_hash(raw))

        def same_config(path: Path, state: dict[str, Any]) -> None:
            if state.get("config_hash") not in accepted:
                raise ValueError(f"checkpoint {path} was written by a different config")

        # tensors of a sharded checkpoint are read into this run's own (sharded) state dicts
        found = load_latest_good(self.run_dir / "checkpoints", accept=same_config, full=False)
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
            if self.resharded_from is not None:
                record = {"time": time.strftime("%Y-%m-%d %H:%M:%S %z"), "step": self.step,
                          "processes": [self.resharded_from, self.dist.world]}  # fmt: skip
                append_line(self.run_dir / CHANGES_FILE, json.dumps(record) + "\n")
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
    @property
    def sharded(self) -> bool:
        """Whether the state is sharded over the processes (FSDP), so checkpoints are too."""
        return self.config.train.distributed == "fsdp" and self.dist.world > 1

    def state_dict(self) -> dict[str, Any]:
        """The whole training state as one ``.pt`` checkpoint holds it (gathered under FSDP)."""
        if self.sharded:
            model_sd, ema_sd, opt_sd = self._tensor_state(full=True)
        else:
            model_sd, ema_sd, opt_sd = (
                self.model.state_dict(),
                self.ema.state_dict(),
                self.opt.state_dict(),
            )
        return {"model": model_sd, "ema": ema_sd, "optimizer": opt_sd, **self._meta()}

    def _tensor_state(self, full: bool) -> tuple[dict, dict, dict]:
        """Model, EMA and optimizer state dicts keyed by parameter name, through
        ``torch.distributed.checkpoint.state_dict``: under FSDP each process's shards
        (``full=False``) or everything gathered to CPU (``full=True``)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=full, cpu_offload=full)
        return (
            get_model_state_dict(self.model, options=opts),
            get_model_state_dict(self.ema, options=opts),
            get_optimizer_state_dict(self.model, self.opt, options=opts),
        )

    def _meta(self) -> dict[str, Any]:
        """Everything of a checkpoint but the tensors."""
        return {
            "format": 1,
            "step": self.step,
            "images": self.step * self.config.train.batch_size,
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
        """Load a checkpoint's state: a sharded one (``.dcp``) into this run's state dicts,
        whatever the number of processes that wrote it; a ``.pt`` one whole."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if "sharded" in state:
            model_sd, ema_sd, opt_sd = self._tensor_state(full=False)
            target = {"model": model_sd, "ema": ema_sd, "optimizer": opt_sd}
            sharded_into(path, target)
            set_model_state_dict(self.model, target["model"])
            set_model_state_dict(self.ema, target["ema"])
            set_optimizer_state_dict(self.model, self.opt, target["optimizer"])
        else:
            opt_sd = state["optimizer"]
            if self.sharded or not _indexed(opt_sd):  # parameter names, not positions
                opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
                set_model_state_dict(self.model, state["model"], options=opts)
                set_model_state_dict(self.ema, state["ema"], options=opts)
                if _indexed(opt_sd):  # written by one process or DDP: name the positions
                    opt_sd = _named_optimizer_state(self.model, opt_sd)
                set_optimizer_state_dict(self.model, self.opt, opt_sd, options=opts)
            else:
                self.model.load_state_dict(state["model"])
                self.ema.load_state_dict(state["ema"])
                self.opt.load_state_dict(opt_sd)
        self.step = int(state["step"])
        self._restore_rng(path, state["rng"])
        self.window = list(state.get("log_window", [0.0, 0.0, 0]))
        self.last_checkpoint = path

    def _restore_rng(self, path: Path, rng: list[dict[str, Tensor]]) -> None:
        """Each process resumes its own random streams; on another number of processes than
        wrote the checkpoint there are no such streams, and each process's are seeded afresh
        from (seed, step, rank). Weights, EMA, optimizer, schedule and data order go on
        exactly (the data order is a function of the seed and the step alone), so the run
        continues as an equivalent one, not a bit-identical one."""
        if len(rng) == self.dist.world:
            mine = rng[self.dist.rank]
            self.gen.set_state(mine["trainer"])
            torch.set_rng_state(mine["cpu"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
            return
        base = (self.config.train.seed * 7919 + 7 * self.step + 3) * 1_000_003
        self.gen.manual_seed(base + 1 + self.dist.rank)
        torch.manual_seed(base + 104729 + self.dist.rank)
        self.resharded_from = len(rng)
        if self.dist.main:
            print(
                f"sdiff train: {path.name} was written by {len(rng)} process(es), this run has "
                f"{self.dist.world}: weights, EMA, optimizer and data order go on exactly; the "
                f"per-process random streams (t, noise, flips, label and model dropout) are "
                f"seeded afresh from (seed, step, rank), so the run is not bit-identical to one "
                f"without the change (recorded in {CHANGES_FILE})",
                flush=True,
            )

    def save(self) -> Path:
        """Write a checkpoint of the current step: one ``.pt`` file, or under FSDP a sharded
        ``.dcp`` folder that each process writes its own part of (no gather)."""
        self._check_finite()
        folder, keep = self.run_dir / "checkpoints", self.config.train.keep_checkpoints
        if self.sharded:
            model_sd, ema_sd, opt_sd = self._tensor_state(full=False)
            tensors = {"model": model_sd, "ema": ema_sd, "optimizer": opt_sd}
            path = save_sharded_checkpoint(folder, self.step, tensors, self._meta(), keep)
        else:
            state = self.state_dict()
            path = save_checkpoint(folder, self.step, state, keep) if self.dist.main else None
            if dist.is_initialized():
                dist.barrier()
        self.last_checkpoint = path or self.last_checkpoint
        return path

    def save_ema_snapshot(self) -> Path | None:
        """The EMA weights alone, as a portable export (``sdiff.training.export``) under
        ``<run>/ema/<images>/``: what sampling needs, a fraction of a checkpoint's size (no
        raw weights, no Adam moments). Under FSDP every process gives its shards to the main
        one, which writes. Returns the folder (None on the other processes)."""
        from sdiff.training.export import save_ema_snapshot

        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            ema = get_model_state_dict(self.ema, options=full)
        else:
            ema = self.ema.state_dict()
        if not self.dist.main:
            return None
        images = self.step * self.config.train.batch_size
        return save_ema_snapshot(self.run_dir, ema, self.config, step=self.step, images=images)

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
        snap_every = self._every(t.ema_snapshot_every_images) if t.ema_snapshot_every_images else 0
        # the experiment tracker (sdiff.training.trackers); an exception closes it as failed
        tracker = open_tracker(self.config, self.run_dir, start * t.batch_size, self.dist.main)
        with tracker:
            tracker.log_config(to_dict(self.config), config_hash(self.config))
            bar = self._progress_bar(total, start)
            clock = _Clock()
            data = self._batches(start)
            while self.step < stop:
                x, y = self.prepare_batch(*next(data))
                loss, norm = self.train_step(x, y)
                if should_stop is not None and should_stop():
                    raise StopRequested(
                        f"{self.run_dir}: stopped on request after step {self.step}"
                    )
                self.window[0] += float(loss)
                self.window[1] += float(norm)
                self.window[2] += 1
                clock.steps += 1
                if bar is not None:
                    bar.update(1)
                if self.step % log_every == 0 or self.step == stop:
                    row = self._log(self._log_row(clock), tracker)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}")
                if sample_every and self.step % sample_every == 0:
                    grid = self.sample_grid()
                    if grid is not None:
                        tracker.log_image(grid, self.step * t.batch_size, "EMA samples")
                if self.step % ckpt_every == 0 or self.step == total:
                    self.save()
                if snap_every and self.step % snap_every == 0:
                    self.save_ema_snapshot()
            if bar is not None:
                bar.close()
            tracker.close("finished" if self.step >= total else "stopped")
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

    def _log(self, row: dict, tracker: Tracker) -> dict:
        """Write ``row`` to metrics.csv and the tracker (the main process only); returns it.
        The row of a session that stops between logging steps goes to metrics.csv only: a
        resume drops it there and redoes its steps, and a tracker could not drop it."""
        if self.dist.main:
            append_csv_row(self.run_dir / "metrics.csv", METRIC_FIELDS, row)
            step, log_every = row["step"], self._every(self.config.train.log_every_images)
            if step % log_every == 0 or step == self.total_steps():
                tracker.log_metrics(row, row["images"])
        return row

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
