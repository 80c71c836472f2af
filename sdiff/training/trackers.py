"""Experiment trackers: where a training run's metrics, sample grids and config go besides
``metrics.csv``, chosen by ``train.logger``: none, TensorBoard, Weights & Biases or MLflow.

    sdiff train --run-preset digits --out runs/digits --set train.logger=wandb
    MLFLOW_TRACKING_URI=file:/data/mlruns sdiff train --run-preset digits --out runs/digits \
        --set train.logger=mlflow

One interface, ``Tracker``: ``log_config`` once per training session, ``log_metrics`` for each
row of metrics.csv, ``log_image`` for each sample grid and ``close(status)`` when the session
ends. The step axis is training images (durations in this project are counted in images), and
each metric is ``train/<column of metrics.csv>``. The trainer sends the rows an uninterrupted
run would write: not the extra row metrics.csv gets where a session stops between logging
steps (``max_steps``), which a resume drops there and a tracker could not. Only the main
process of a torchrun job logs (``open_tracker`` gives the others a ``Tracker``, which does
nothing). wandb, mlflow and tensorboard are imported only when chosen; a missing one is a
ValueError naming its pip extra.

- ``tensorboard``: ``<run>/tensorboard``: the scalars, the sample grids, the config as text.
  ``train.tensorboard=true`` (the older switch) means the same.
- ``wandb``: ``wandb.init`` with project ``train.logger_project`` in ``<run>/wandb`` (or
  ``WANDB_DIR``); the config with its hash as the run's config; grids as ``wandb.Image``. The
  usual variables apply (``WANDB_MODE=offline`` where there is no network, ``WANDB_ENTITY``).
- ``mlflow``: a run in the experiment ``train.logger_project`` (created when missing) at the
  tracking URI ``train.logger_uri``, else ``MLFLOW_TRACKING_URI``, else MLflow's default. Params:
  the config flattened (``train.lr``, ``model.width``, ...); the tag ``sdiff.config_hash``;
  grids as artifacts under ``samples/``. MLflow 3.7+ refuses its file store (``file:/path``)
  unless ``MLFLOW_ALLOW_FILE_STORE=true``; the tracker sets it around its own calls to a file
  URI (unless the user set it) and puts the environment back.

Resume. ``<run>/tracker.json`` holds, per tracker kind, the id of the W&B or MLflow run, where it
lives (project, MLflow URI) and the last step sent to it. A resumed training run continues the
same tracker run (W&B ``resume="allow"`` with the stored id; MLflow reopens the stored run and
sets it RUNNING again); a changed project or URI starts a new one. The trainer redoes the steps
after the checkpoint it resumes from and writes those rows of metrics.csv again, but W&B drops a
step that is not after its last one and MLflow would keep both values of a step, so rows (and
grids) at or before the last step sent are not sent again: each step reaches the tracker once,
with the values of the session that first logged it. An exact resume (deterministic mode)
repeats the loss, gradient norm and learning rate bit for bit, so the tracker and metrics.csv
agree on them; ``img_per_s`` and ``wall_s`` of those rows are the first session's. TensorBoard,
which can, does what metrics.csv does instead: the resumed writer hides the older events after
the checkpoint (``purge_step``) and the redone rows are logged again.

Ending. ``close`` marks the run "finished" (``total_images`` reached), "stopped" (ended before:
``max_steps``, a stop request, Ctrl-C; resumable) or "failed" (an error): MLflow FINISHED, KILLED
or FAILED; W&B exit code 0, 0 or 1 (W&B shows a non-zero exit as failed). Used as a context
manager, an exception closes it as failed (stopped for Ctrl-C and ``StopRequested``), so a
crashing run does not leave its tracker run open. A process killed outright (SIGKILL) cannot:
W&B's service marks the run crashed; the MLflow run stays RUNNING until the run is resumed.

Ablation grids: the runner writes ``cell.json`` into each cell's run folder before training it,
so each cell is its own tracker run, named by the cell (``table2-smoke / row / column [/
axis=value] [seed N]``), in the W&B group ``<grid>-<scale>`` and with MLflow tags ``sdiff.grid``
and ``sdiff.cell``. ``train.logger_name`` names the run instead; without either, the run folder's
name does.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sdiff.training.config import RunConfig, TrainConfig
from sdiff.util.errors import StopRequested
from sdiff.util.files import atomic_write_text

__all__ = [
    "STATUSES",
    "TRACKER_FILE",
    "MlflowTracker",
    "TensorBoardTracker",
    "Tracker",
    "WandbTracker",
    "describe_tracker",
    "logger_kind",
    "mlflow_file_store_allowed",
    "open_tracker",
    "run_label",
]

TRACKER_FILE = "tracker.json"
STATUSES = ("finished", "stopped", "failed")


def logger_kind(train: TrainConfig) -> str:
    """The tracker ``train`` asks for: ``train.logger``, or "tensorboard" for the older
    ``train.tensorboard=true`` (the config refuses the two set to different trackers)."""
    return "tensorboard" if train.tensorboard else train.logger


def _status_of(exc: BaseException | None) -> str:
    if exc is None:
        return "finished"
    return "stopped" if isinstance(exc, (KeyboardInterrupt, StopRequested)) else "failed"


def _metrics(row: Mapping[str, float]) -> dict[str, float]:
    """``train/<name>`` for every column of a metrics row but ``images``, the step axis."""
    return {f"train/{k}": float(v) for k, v in row.items() if k != "images"}


class Tracker:
    """No tracker: every call does nothing. The others override what they log."""

    kind = "none"

    def log_config(self, config: dict[str, Any], config_hash: str) -> None:
        """The resolved run config (``to_dict`` form) and its ``config_hash``."""

    def log_metrics(self, row: Mapping[str, float], images: int) -> None:
        """One row of metrics.csv, at step ``images``."""

    def log_image(self, path: Path, images: int, caption: str) -> None:
        """A sample grid (a PNG file) at step ``images``."""

    def close(self, status: str = "finished") -> None:
        """End the session; ``status`` one of ``STATUSES``. A second close does nothing."""
        _check_status(status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.close(_status_of(exc))


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValueError(f"unknown tracker status {status!r}; choose {STATUSES}")


# -- TensorBoard -------------------------------------------------------------------------------
class TensorBoardTracker(Tracker):
    """Scalars, grids and the config in ``<run>/tensorboard``. A session that starts at
    ``start_images`` > 0 hides the events the previous one wrote after it (``purge_step``),
    so the redone rows replace them as they replace the rows of metrics.csv."""

    kind = "tensorboard"

    def __init__(self, run_dir: str | os.PathLike[str], start_images: int = 0) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError(
                "train.logger=tensorboard needs the tensorboard package: "
                "pip install 'sdiff[tensorboard]'"
            ) from err
        self.start_images = start_images
        purge = start_images + 1 if start_images > 0 else None
        self.writer = SummaryWriter(Path(run_dir) / "tensorboard", purge_step=purge)
        self._open = True

    def log_config(self, config: dict[str, Any], config_hash: str) -> None:
        text = json.dumps(config, indent=2, sort_keys=True)
        code = "\n".join("    " + line for line in text.splitlines())  # a Markdown code block
        self.writer.add_text("config", f"config_hash {config_hash}\n\n{code}", self.start_images)

    def log_metrics(self, row: Mapping[str, float], images: int) -> None:
        for key, value in _metrics(row).items():
            self.writer.add_scalar(key, value, images)

    def log_image(self, path: Path, images: int, caption: str) -> None:
        import numpy as np

        from sdiff.data.images import load_image

        pixels = np.asarray(load_image(path, "RGB"))  # (H, W, 3) uint8
        self.writer.add_image("samples", pixels, images, dataformats="HWC")

    def close(self, status: str = "finished") -> None:
        _check_status(status)
        if self._open:
            self._open = False
            self.writer.close()


# -- trackers with a run to resume (W&B, MLflow) -------------------------------------------------
def _read_record(run_dir: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """``<run>/tracker.json``: {kind: {"run_id", where it lives, "images": last step sent}}."""
    path = Path(run_dir) / TRACKER_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return record


class _Resumable(Tracker):
    """A tracker run found again through tracker.json (module docstring: Resume). ``where``
    says where the run lives; a stored run elsewhere is not resumed. Rows and grids at or
    before ``sent_before`` (the last step the previous sessions sent) are not sent again."""

    def __init__(self, run_dir: str | os.PathLike[str], where: dict[str, str]) -> None:
        self.run_dir = Path(run_dir)
        record = _read_record(self.run_dir)
        old = record.get(self.kind) or {}
        same = bool(old.get("run_id")) and all(old.get(k) == v for k, v in where.items())
        self.previous_id: str | None = old["run_id"] if same else None
        self.sent_before = int(old.get("images", -1)) if same else -1
        self._entry = {**where, "run_id": self.previous_id, "images": self.sent_before}
        self._open = False

    def _remember(self, **changes: Any) -> None:
        self._entry.update(changes)
        record = _read_record(self.run_dir)
        record[self.kind] = self._entry
        atomic_write_text(self.run_dir / TRACKER_FILE, json.dumps(record, indent=2) + "\n")

    @property
    def run_id(self) -> str:
        return self._entry["run_id"]

    def log_metrics(self, row: Mapping[str, float], images: int) -> None:
        if images <= self.sent_before:
            return
        self._send_metrics(_metrics(row), images)
        self._remember(images=max(images, self._entry["images"]))

    def log_image(self, path: Path, images: int, caption: str) -> None:
        if images <= self.sent_before:
            return
        self._send_image(Path(path), images, caption)
        self._remember(images=max(images, self._entry["images"]))

    def close(self, status: str = "finished") -> None:
        _check_status(status)
        if self._open:
            self._open = False
            self._end(status)

    def _send_metrics(self, values: dict[str, float], images: int) -> None:
        raise NotImplementedError

    def _send_image(self, path: Path, images: int, caption: str) -> None:
        raise NotImplementedError

    def _end(self, status: str) -> None:
        raise NotImplementedError


class WandbTracker(_Resumable):
    """A W&B run (``wandb.init``), resumed by its stored id."""

    kind = "wandb"

    def __init__(self, config: RunConfig, run_dir: str | os.PathLike[str]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ValueError("train.logger=wandb needs wandb: pip install 'sdiff[wandb]'") from err
        t = config.train
        super().__init__(run_dir, {"project": t.logger_project})
        name, group = run_label(config, self.run_dir)
        self._wandb = wandb
        try:
            self.run = wandb.init(
                project=t.logger_project,
                name=name,
                group=group,
                id=self.previous_id,
                resume="allow",
                # <run>/wandb unless the user points W&B elsewhere
                dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
                reinit="create_new",  # never finish or reuse a run the caller has open
            )
        except wandb.errors.Error as err:  # no API key, a project it may not write, ...
            raise ValueError(
                f"train.logger=wandb: W&B refused to start a run: {err} (without a network "
                f"or a login: WANDB_MODE=offline, then `wandb sync`)"
            ) from err
        self._open = True
        self._remember(run_id=self.run.id)

    def log_config(self, config: dict[str, Any], config_hash: str) -> None:
        # a resume may change some fields (sdiff.training.trainer.RESUMABLE_FIELDS)
        self.run.config.update({**config, "config_hash": config_hash}, allow_val_change=True)

    def _send_metrics(self, values: dict[str, float], images: int) -> None:
        self.run.log(values, step=images)

    def _send_image(self, path: Path, images: int, caption: str) -> None:
        self.run.log({"samples": self._wandb.Image(str(path), caption=caption)}, step=images)

    def _end(self, status: str) -> None:
        self.run.finish(exit_code=1 if status == "failed" else 0)


def _is_file_uri(uri: str) -> bool:
    """``file:...`` or a plain path (what MLflow takes for its file store)."""
    return uri.startswith("file:") or ("://" not in uri and ":" not in uri.split("/")[0])


@contextlib.contextmanager
def mlflow_file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3.7+ refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set: set it for
    the block when ``uri`` is a file URI (unless the user set it), then put it back."""
    key = "MLFLOW_ALLOW_FILE_STORE"
    if not _is_file_uri(uri) or key in os.environ:
        yield
        return
    os.environ[key] = "true"
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _flatten(prefix: str, tree: Any, out: dict[str, Any]) -> None:
    if isinstance(tree, dict):
        for k, v in tree.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = tree


MLFLOW_STATUS = {"finished": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


class MlflowTracker(_Resumable):
    """An MLflow run (``MlflowClient``, no global active run), reopened by its stored id."""

    kind = "mlflow"

    def __init__(self, config: RunConfig, run_dir: str | os.PathLike[str]) -> None:
        try:
            import mlflow
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
            from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
        except ImportError as err:
            raise ValueError(
                "train.logger=mlflow needs MLflow: pip install 'sdiff[mlflow]'"
            ) from err
        self._Metric, self._Param, self._max_param = Metric, Param, MAX_PARAM_VAL_LENGTH
        t = config.train
        self.uri = t.logger_uri or mlflow.get_tracking_uri()  # MLFLOW_TRACKING_URI or default
        super().__init__(run_dir, {"uri": self.uri, "experiment": t.logger_project})
        name, group = run_label(config, self.run_dir)
        tags = {"sdiff.run_dir": str(self.run_dir.resolve())}
        if group is not None:
            tags.update({"sdiff.grid": group, "sdiff.cell": self.run_dir.name})
        with self._calls():
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment_id = self._experiment(t.logger_project)
            run = None
            if self.previous_id is not None:
                try:
                    run = self.client.get_run(self.previous_id)
                except MlflowException:
                    run = None  # deleted from the store: a new run
                if run is not None and run.info.lifecycle_stage != "active":
                    run = None
            if run is None:
                self.sent_before = -1
                run = self.client.create_run(experiment_id, run_name=name, tags=tags)
            else:
                self.client.update_run(run.info.run_id, status="RUNNING")
        self._open = True
        self._remember(run_id=run.info.run_id, images=self.sent_before)

    @contextlib.contextmanager
    def _calls(self) -> Iterator[None]:
        with mlflow_file_store_allowed(self.uri):
            yield

    def _experiment(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            return self.client.create_experiment(name)
        if exp.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} at {self.uri} is deleted: restore it or set "
                f"train.logger_project to another name"
            )
        return exp.experiment_id

    def log_config(self, config: dict[str, Any], config_hash: str) -> None:
        flat: dict[str, Any] = {}
        _flatten("", config, flat)
        with self._calls():
            # MLflow refuses to change a param: a resume adds new keys only (a resumed run's
            # changes are in the tag and in the run folder's config_changes.jsonl)
            have = self.client.get_run(self.run_id).data.params
            params = [
                self._Param(k, (v if isinstance(v, str) else json.dumps(v))[: self._max_param])
                for k, v in sorted(flat.items())
                if k not in have
            ]
            for i in range(0, len(params), 100):  # MLflow's limit per log_batch call
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            self.client.set_tag(self.run_id, "sdiff.config_hash", config_hash)

    def _send_metrics(self, values: dict[str, float], images: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._Metric(k, v, now, images) for k, v in values.items()]
        with self._calls():
            self.client.log_batch(self.run_id, metrics=metrics)

    def _send_image(self, path: Path, images: int, caption: str) -> None:
        with self._calls():
            self.client.log_artifact(self.run_id, str(path), artifact_path="samples")

    def _end(self, status: str) -> None:
        with self._calls():
            self.client.set_terminated(self.run_id, status=MLFLOW_STATUS[status])


# -- choosing one ------------------------------------------------------------------------------
def run_label(config: RunConfig, run_dir: str | os.PathLike[str]) -> tuple[str, str | None]:
    """(name, group) of the tracker run: ``train.logger_name``, or for an ablation cell (its
    folder holds the runner's ``cell.json``) its label and ``<grid>-<scale>``, else the run
    folder's name and no group."""
    run_dir = Path(run_dir)
    cell = None
    with contextlib.suppress(OSError, ValueError):
        cell = json.loads((run_dir / "cell.json").read_text())
    group = None
    if isinstance(cell, dict) and {"grid", "scale", "row", "column"} <= cell.keys():
        group = f"{cell['grid']}-{cell['scale']}"
        parts = [group, cell["row"]] + ([cell["column"]] if cell["column"] != "all" else [])
        parts += [f"{k}={v}" for k, v in sorted((cell.get("axes") or {}).items())]
        label = " / ".join(str(p) for p in parts)
        if cell.get("seed") is not None:
            label += f" seed {cell['seed']}"
    else:
        label = run_dir.resolve().name
    return config.train.logger_name or label, group


def describe_tracker(config: RunConfig, run_dir: str | os.PathLike[str]) -> str | None:
    """Where the tracker logs, in words for the trainer's header (None without one)."""
    t = config.train
    kind = logger_kind(t)
    if kind == "tensorboard":
        return str(Path(run_dir) / "tensorboard")
    if kind == "wandb":
        mode = os.environ.get("WANDB_MODE", "online")
        return f"W&B project {t.logger_project} ({mode})"
    if kind == "mlflow":
        uri = t.logger_uri or os.environ.get("MLFLOW_TRACKING_URI") or "MLflow's default URI"
        return f"MLflow experiment {t.logger_project} at {uri}"
    return None


def open_tracker(
    config: RunConfig, run_dir: str | os.PathLike[str], start_images: int = 0, main: bool = True
) -> Tracker:
    """The tracker ``config`` asks for, for a session starting at ``start_images``; a
    ``Tracker`` that does nothing on any process but the main one (``main``)."""
    kind = logger_kind(config.train)
    if not main or kind == "none":
        return Tracker()
    if kind == "tensorboard":
        return TensorBoardTracker(run_dir, start_images)
    if kind == "wandb":
        return WandbTracker(config, run_dir)
    if kind == "mlflow":
        return MlflowTracker(config, run_dir)
    raise ValueError(f"unknown train.logger {kind!r}")
