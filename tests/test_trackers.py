"""Experiment trackers (``sdiff.training.trackers``), each read back from what it wrote: MLflow
through ``MlflowClient`` from a file store, W&B offline from its record log (``run-<id>.wandb``),
TensorBoard through its ``EventAccumulator``, all against metrics.csv. A resumed run continues
the same tracker run with each step once; a crash ends it as failed; an ablation grid gives
each cell its own run. The new config fields leave every existing hash alone."""

import builtins
import contextlib
import csv
import hashlib
import json
import os
import struct
import time
from dataclasses import fields
from pathlib import Path

import pytest
from test_train import CONFIG

from sdiff.ablations.grid import Axis, Scale, Table, expand
from sdiff.ablations.runner import run_grid
from sdiff.eval.spec import EvalSpec
from sdiff.training import trackers
from sdiff.training.config import (
    LATER_FIELDS,
    TrainConfig,
    apply_overrides,
    config_hash,
    get_run_preset,
    identity_dict,
    to_dict,
)
from sdiff.training.trainer import Trainer, resume_changes
from sdiff.util.errors import StopRequested

# test_train's model: 6 steps of 8 images; a row of metrics.csv every 2 steps (16 images), a
# checkpoint every 3 (24 images), a grid of 4 samples every 3
TINY = apply_overrides(CONFIG, [
    "train.total_images=48", "train.sample_every_images=24", "train.sample_count=4",
    "train.sample_steps=2",
])  # fmt: skip
NEW_FIELDS = ("logger", "logger_project", "logger_name", "logger_uri")


def metrics_csv(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def crash_at(monkeypatch, step: int) -> None:
    """Make the trainer raise inside the step after ``step`` (once)."""
    real = Trainer.train_step

    def train_step(self, x, y, **kwargs):
        if self.step == step:
            monkeypatch.setattr(Trainer, "train_step", real)
            raise RuntimeError("a crash on purpose")
        return real(self, x, y, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def stored(run_dir: Path) -> dict:
    return json.loads((run_dir / trackers.TRACKER_FILE).read_text())


# -- config ------------------------------------------------------------------------------------
def test_the_new_fields_leave_every_hash_alone_until_set():
    """The hash of a config is the hash of the config without them (sha256 of the canonical
    JSON, computed here), set or not; a resume may change them, and records it."""
    for config in (get_run_preset("imagenet-uvit-l-512"), TINY):
        tree = to_dict(config)
        assert set(NEW_FIELDS) <= set(tree["train"])
        for name in NEW_FIELDS:
            assert ("train", name) in LATER_FIELDS
            del tree["train"][name]
        del tree["train"]["batch_per_gpu"], tree["train"]["ema_snapshot_every_images"]
        for section, name in [k for k in LATER_FIELDS if k[0] == "model"]:  # kernels, plans
            assert tree[section].pop(name) == LATER_FIELDS[(section, name)]
        canonical = json.dumps(tree, sort_keys=True, separators=(",", ":"))
        assert config_hash(config) == hashlib.sha256(canonical.encode()).hexdigest()[:12]
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert all(LATER_FIELDS[("train", n)] == defaults[n] for n in NEW_FIELDS)
    # where a run reports to is not what it computes: set, they still stay out of the hash
    # (so an ablation grid with a tracker added reuses its cells), and a resume records them
    logged = apply_overrides(TINY, ["train.logger=mlflow", "train.logger_uri=file:/x"])
    assert config_hash(logged) == config_hash(TINY)
    assert identity_dict(logged) == identity_dict(TINY)
    old, new = identity_dict(TINY, tracking=True), identity_dict(logged, tracking=True)
    changes = resume_changes(old, new, Path("run"))
    assert changes == {"train.logger": [None, "mlflow"], "train.logger_uri": [None, "file:/x"]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.logger=neptune"], r"^unknown train\.logger 'neptune'; choose \("),
        (["train.logger=wandb", "train.tensorboard=true"],
         r"^train\.tensorboard=true and train\.logger='wandb' ask for two trackers"),
        (["train.logger_project="], r"^train\.logger_project must not be empty$"),
        (["train.logger=wandb", "train.logger_uri=file:/x"],
         r"^train\.logger_uri is the MLflow tracking URI, but train\.logger is 'wandb'$"),
    ],
)  # fmt: skip
def test_bad_logger_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TINY, overrides)


def test_the_older_tensorboard_switch_means_logger_tensorboard():
    for overrides, kind in [([], "none"), (["train.tensorboard=true"], "tensorboard"),
                            (["train.tensorboard=true", "train.logger=tensorboard"], "tensorboard"),
                            (["train.logger=wandb"], "wandb")]:  # fmt: skip
        assert trackers.logger_kind(apply_overrides(TINY, overrides).train) == kind


def test_only_the_main_process_logs_and_a_missing_package_names_its_extra(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def missing(name, *args, **kwargs):
        if name.split(".")[0] in ("wandb", "mlflow"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", missing)
    for kind in ("wandb", "mlflow"):
        config = apply_overrides(TINY, [f"train.logger={kind}"])
        other = trackers.open_tracker(config, tmp_path, main=False)
        assert type(other) is trackers.Tracker  # does nothing, imports nothing
        with pytest.raises(ValueError, match=rf"pip install 'sdiff\[{kind}\]'$"):
            trackers.open_tracker(config, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_tracker_used_as_a_context_ends_with_the_status_of_its_block():
    class Recorder(trackers.Tracker):
        def close(self, status="finished"):
            super().close(status)
            ended.append(status)

    ended = []
    for exc in (None, KeyboardInterrupt(), StopRequested("lost"), RuntimeError("bug")):
        with contextlib.suppress(BaseException), Recorder():
            if exc is not None:
                raise exc
    assert ended == ["finished", "stopped", "stopped", "failed"]
    with pytest.raises(ValueError, match=r"^unknown tracker status 'done'; choose \("):
        trackers.Tracker().close("done")


def test_wandb_without_a_login_is_a_one_line_error(tmp_path, monkeypatch, wandb_fresh):
    for name in ("WANDB_API_KEY", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_SILENT": "true",
                        "WANDB_CONFIG_DIR": str(tmp_path)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    config = apply_overrides(TINY, ["train.logger=wandb"])
    with pytest.raises(ValueError, match=r"^train\.logger=wandb: W&B refused .* WANDB_MODE=offl"):
        trackers.open_tracker(config, tmp_path)
    assert not (tmp_path / trackers.TRACKER_FILE).exists()


def test_a_run_is_named_by_its_cell_its_setting_or_its_folder(tmp_path):
    cell = {"hash": "abc", "grid": "table2", "scale": "smoke", "row": "lr-high",
            "column": "all", "axes": {"width": "w64", "depth": "d2"}, "seed": 3}  # fmt: skip
    (tmp_path / "cell.json").write_text(json.dumps(cell))
    assert trackers.run_label(TINY, tmp_path) == (
        "table2-smoke / lr-high / depth=d2 / width=w64 seed 3",
        "table2-smoke",
    )
    named = apply_overrides(TINY, ["train.logger_name=mine"])
    assert trackers.run_label(named, tmp_path) == ("mine", "table2-smoke")
    assert trackers.run_label(TINY, tmp_path / "plain") == ("plain", None)


# -- MLflow --------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A file-store URI; the tracker must set MLFLOW_ALLOW_FILE_STORE itself while training,
    ``read()`` sets it for the reading back."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"file:{tmp_path / 'mlruns'}"

    def read():
        from mlflow.tracking import MlflowClient

        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        return MlflowClient(tracking_uri=uri)

    return uri, read


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_mlflow_holds_the_rows_of_metrics_csv_the_config_and_the_grids(tmp_path, mlflow_store):
    uri, read = mlflow_store
    config = apply_overrides(TINY, ["train.logger=mlflow", f"train.logger_uri={uri}",
                                    "train.logger_project=trackers-test"])  # fmt: skip
    run_dir = tmp_path / "run"
    trainer = Trainer(config, run_dir, progress=False)
    assert trainer.header().endswith(f", MLflow experiment trackers-test at {uri}")
    trainer.run()
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set around the tracker's calls only
    client = read()
    run = client.get_run(stored(run_dir)["mlflow"]["run_id"])
    assert stored(run_dir)["mlflow"] == {"uri": uri, "experiment": "trackers-test",
                                         "run_id": run.info.run_id, "images": 48}  # fmt: skip
    assert client.get_experiment(run.info.experiment_id).name == "trackers-test"
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    rows = metrics_csv(run_dir)
    assert [r["images"] for r in rows] == [16, 32, 48]
    for key in ("step", "loss", "grad_norm", "lr", "img_per_s", "wall_s"):
        assert mlflow_history(client, run.info.run_id, f"train/{key}") == [
            (int(r["images"]), r[key]) for r in rows
        ]
    params = run.data.params
    assert params["train.lr"] == "0.001" and params["model.channels"] == "[8]"
    assert params["model.kind"] == "uvit" and params["train.logger"] == "mlflow"
    assert run.data.tags["sdiff.config_hash"] == config_hash(config)
    assert run.data.tags["sdiff.run_dir"] == str(run_dir.resolve())
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert grids == ["samples/grid-000000000024.png", "samples/grid-000000000048.png"]
    local = Path(client.download_artifacts(run.info.run_id, grids[1], str(tmp_path)))
    assert local.read_bytes() == (run_dir / grids[1]).read_bytes()


def test_mlflow_resumes_the_same_run_after_a_crash_and_a_stop(tmp_path, mlflow_store, monkeypatch):
    """Crash in step 5 (rows 2 and 4 sent, checkpoint 3): FAILED. Resume from 3 and stop after
    step 5: the same run, KILLED; the redone row 4 is not sent again. Resume from 3 to the end:
    FINISHED. Each step once, with the values of metrics.csv (deterministic: a redone row
    repeats its loss exactly)."""
    uri, read = mlflow_store
    config = apply_overrides(TINY, ["train.logger=mlflow", f"train.logger_uri={uri}"])
    run_dir = tmp_path / "run"
    crash_at(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="on purpose"):
        Trainer(config, run_dir, progress=False).run()
    run_id = stored(run_dir)["mlflow"]["run_id"]
    assert stored(run_dir)["mlflow"]["images"] == 32
    statuses = [read().get_run(run_id).info.status]
    first_loss = mlflow_history(read(), run_id, "train/loss")
    assert Trainer(config, run_dir, progress=False).run(max_steps=2).stopped_early
    statuses.append(read().get_run(run_id).info.status)
    Trainer(config, run_dir, progress=False).run()
    client = read()
    statuses.append(client.get_run(run_id).info.status)
    assert statuses == ["FAILED", "KILLED", "FINISHED"]
    assert stored(run_dir)["mlflow"]["run_id"] == run_id
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    rows = metrics_csv(run_dir)
    loss = mlflow_history(client, run_id, "train/loss")
    assert loss == [(int(r["images"]), r["loss"]) for r in rows]  # each step once
    assert loss[:2] == first_loss  # the values first sent
    assert len(client.list_artifacts(run_id, "samples")) == 2


def test_each_cell_of_an_ablation_grid_is_its_own_run(tmp_path, mlflow_store, monkeypatch):
    """Through the runner with ``--set train.logger=mlflow`` (the tracking URI from
    MLFLOW_TRACKING_URI): one finished run per cell, named by the cell, tagged with the grid."""
    import sdiff.ablations.cell as cell_mod

    uri, read = mlflow_store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(cell_mod, "evaluate_cell", lambda *a, **k: {"evaluated": 1.0})
    base = apply_overrides(TINY, ["train.sample_every_images=0", "train.total_images=16"])
    table = Table(
        901, "tracked", "tracked cells", ("evaluated",),
        {"smoke": Scale(lambda: base, rows=(Axis("lr-low", ("train.lr=1e-4",)),
                                             Axis("lr-high", ("train.lr=1e-3",))),
                        eval=EvalSpec(n=8, reference_n=8, steps=2, metrics=("kid",)))},
    )  # fmt: skip
    rows = run_grid(table, "smoke", tmp_path / "grid", overrides=["train.logger=mlflow"],
                    progress=False, log=lambda _: None)  # fmt: skip
    assert [r["status"] for r in rows] == ["done", "done"]
    client = read()
    experiment = client.get_experiment_by_name("sdiff")
    runs = client.search_runs([experiment.experiment_id])
    cells = {c.hash: c for c in expand(table, "smoke", overrides=["train.logger=mlflow"])}
    assert sorted(r.info.run_name for r in runs) == ["table901-smoke / lr-high",
                                                     "table901-smoke / lr-low"]  # fmt: skip
    for run in runs:
        cell = cells[run.data.tags["sdiff.cell"]]
        assert run.info.run_name == f"table901-smoke / {cell.row}"
        assert run.data.tags["sdiff.grid"] == "table901-smoke"
        assert run.data.params["train.lr"] == json.dumps(cell.config.train.lr)
        assert run.info.status == "FINISHED"
        run_dir = tmp_path / "grid" / "cells" / cell.hash
        assert mlflow_history(client, run.info.run_id, "train/loss") == [
            (int(r["images"]), r["loss"]) for r in metrics_csv(run_dir)
        ]


# -- W&B (offline) -----------------------------------------------------------------------------
BLOCK = 32 * 1024  # the record log's block size


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (``run-<id>.wandb``), read here from its format:
    a 7-byte file header (":W&B", a 2-byte magic, a version byte), then 32 KiB blocks of
    chunks, each a 7-byte header (CRC32C, length, type: 1 full, 2 first, 3 middle, 4 last)
    and a piece of a serialized ``wandb_internal_pb2.Record``; a block's tail shorter than a
    chunk header is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if len(data) < 7:
        return []  # not written yet
    assert data[:4] == b":W&B"
    records, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def wandb_session(folder: Path) -> dict:
    """One offline run folder (one training session): its run, config, history and exit."""
    (log,) = folder.glob("run-*.wandb")
    # run.finish() returns before W&B's service has written the log out: wait for its end
    deadline = time.monotonic() + 60
    while (records := wandb_records(log))[-1:] == [] or not records[-1].HasField("exit"):
        assert time.monotonic() < deadline, f"{log} has no exit record after 60 s"
        time.sleep(0.05)
    out = {"config": {}, "history": {}, "exit_code": None}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            out.update(run_id=r.run_id, project=r.project, name=r.display_name, group=r.run_group)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                   for i in record.history.item}  # fmt: skip
            out["history"].setdefault(row["_step"], []).append(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    return out


@pytest.fixture
def wandb_fresh():
    """W&B keeps the settings it read from the environment (WANDB_MODE, ...) in a process-wide
    singleton: tear it down around each test that sets them."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch, wandb_fresh):
    home = tmp_path / "wandb-home"
    home.mkdir()
    settings = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-dir"),
                "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(home),
                "WANDB_CACHE_DIR": str(home), "WANDB_DATA_DIR": str(home)}  # fmt: skip
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def test_wandb_offline_run_holds_metrics_csv_the_config_and_the_grids(tmp_path, wandb_offline):
    config = apply_overrides(TINY, ["train.logger=wandb", "train.logger_name=tiny digits",
                                    "train.logger_project=trackers-test"])  # fmt: skip
    run_dir = tmp_path / "run"
    Trainer(config, run_dir, progress=False).run()
    assert not (run_dir / "wandb").exists()  # WANDB_DIR says where
    (folder,) = (wandb_offline / "wandb").glob("offline-run-*")
    session = wandb_session(folder)
    assert session["run_id"] == stored(run_dir)["wandb"]["run_id"]
    assert stored(run_dir)["wandb"]["images"] == 48
    assert (session["project"], session["name"]) == ("trackers-test", "tiny digits")
    assert session["config"]["train"]["lr"] == 1e-3
    assert session["config"]["model"]["channels"] == [8]
    assert session["config"]["config_hash"] == config_hash(config)
    assert session["exit_code"] == 0
    rows = metrics_csv(run_dir)
    history = session["history"]
    assert sorted(history) == [16, 24, 32, 48]  # rows at 16, 32, 48; grids at 24, 48
    for r in rows:
        (logged,) = [h for h in history[int(r["images"])] if "train/loss" in h]
        for key in ("step", "loss", "grad_norm", "lr", "img_per_s", "wall_s"):
            assert logged[f"train/{key}"] == r[key]
    for images in (24, 48):
        (grid,) = [h for h in history[images] if "samples/path" in h]
        assert grid["samples/_type"] == "image-file" and grid["samples/caption"] == "EMA samples"
        assert (folder / "files" / grid["samples/path"]).is_file()


def test_wandb_resumes_the_same_run_after_a_crash(tmp_path, wandb_offline, monkeypatch):
    """Without WANDB_DIR the run's files go to <run>/wandb. A crash in step 5 exits the W&B
    run with code 1; the resumed session logs to the same run id and does not send the redone
    row 4 again: over both sessions each step once, equal to metrics.csv."""
    monkeypatch.delenv("WANDB_DIR")
    config = apply_overrides(TINY, ["train.logger=wandb"])
    run_dir = tmp_path / "run"
    crash_at(monkeypatch, 4)
    with pytest.raises(RuntimeError, match="on purpose"):
        Trainer(config, run_dir, progress=False).run()
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    first = wandb_session(folder)
    folder.rename(run_dir / "wandb" / "first-session")  # two sessions could share a second
    Trainer(config, run_dir, progress=False).run()
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    second = wandb_session(folder)
    assert first["run_id"] == second["run_id"] == stored(run_dir)["wandb"]["run_id"]
    assert (first["exit_code"], second["exit_code"]) == (1, 0)
    assert first["name"] == second["name"] == "run"
    losses = [
        (step, h["train/loss"])
        for session in (first, second)
        for step, rows in sorted(session["history"].items())
        for h in rows
        if "train/loss" in h
    ]
    assert losses == [(int(r["images"]), r["loss"]) for r in metrics_csv(run_dir)]


# -- TensorBoard ---------------------------------------------------------------------------------
def test_tensorboard_shows_metrics_csv_after_a_resume(tmp_path):
    """The older ``train.tensorboard=true`` for the first session, stopped after step 5;
    ``train.logger=tensorboard`` for the resumed one (a change a resume may make). The resumed
    writer hides the first session's events after the checkpoint (step 3), so each step shows
    once, with the value metrics.csv holds."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    first = apply_overrides(TINY, ["train.tensorboard=true"])
    Trainer(first, run_dir, progress=False).run(max_steps=5)
    second = apply_overrides(TINY, ["train.logger=tensorboard"])
    Trainer(second, run_dir, progress=False).run()
    events = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0}
    )
    events.Reload()
    rows = metrics_csv(run_dir)
    for key in ("loss", "grad_norm", "lr"):
        shown = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert shown == [(int(r["images"]), pytest.approx(r[key], rel=1e-6)) for r in rows]
    assert [e.step for e in events.Images("samples")] == [24, 48]
    assert [e.step for e in events.Tensors("config/text_summary")] == [0, 24]
