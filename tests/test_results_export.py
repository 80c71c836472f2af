"""`sdiff results` and sdiff.ablations.results: real results stores (Table 2's smoke cells with
done, failed and pending rows, a second store with another seed, grid and an extra axis) read
into a DataFrame, written as CSV, JSON and Parquet and read back, and exported to an offline
MLflow file store; expectations are the values written into the stores, read back with the csv
and json modules, pandas and MLflow's own client."""

import csv
import io
import json
import math
import os
import sqlite3
import sys
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest

from sdiff.ablations import get_table
from sdiff.ablations.grid import Cell, expand
from sdiff.ablations.results import results_frame
from sdiff.ablations.store import ResultsStore, new_owner
from sdiff.cli import main

# store a: (row, column) -> metrics written; ("shifted", "32") fails, ("shifted", "64") pends
METRICS_A = {
    ("cosine", "32"): {"fid": 91.25, "kid_mean": 0.0712, "num_generated": 200,
                       "feature_extractor": "inception-v3", "wall_s": 58.5},
    ("cosine", "64"): {"fid": 88.5, "kid_mean": 0.0655, "num_generated": 200,
                       "feature_extractor": "inception-v3", "wall_s": 61.0, "final_loss": 0.125},
}  # fmt: skip
# store b: seed 1, grid "lr-sweep", extra axis lr; only the cosine row, both done
METRICS_B = {
    ("cosine", "32"): {"fid": 95.0, "kid_mean": 0.08, "train_img_s": 1234.5},
    ("cosine", "64"): {"fid": 90.0, "kid_mean": 0.07, "train_img_s": 456.25},
}
COLUMNS = [
    "grid", "table", "scale", "row", "column", "axis:lr", "seed", "status",  # metrics by name:
    "feature_extractor", "fid", "final_loss", "kid_mean", "num_generated", "train_img_s",
    "metric:wall_s", "wall_s", "device", "git_sha", "finished_at", "hash", "config_hash",
    "source", "store", "run_dir",
]  # fmt: skip


@dataclass(frozen=True)
class GridCell:
    """A cell declared in a named grid with extra axes (what the store records of them)."""

    cell: Cell
    grid: str
    axes: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cell, name)


@pytest.fixture
def stores(tmp_path):
    """Two grid folders: a (seed 0: two done, one failed, one pending) and b (seed 1, grid
    lr-sweep, axis lr=high: two done). Returns (a, b, cells by (store, row, column))."""
    table = get_table(2)
    owner = new_owner()
    cells = {}
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with ResultsStore(a / "results.sqlite") as store:
        grid = expand(table, "smoke")
        store.add(grid)
        for c in grid:
            cells["a", c.row, c.column] = c
            if (c.row, c.column) in METRICS_A:
                assert store.claim(c.hash, owner)
                store.finish(c.hash, owner, METRICS_A[c.row, c.column], wall_s=60.0,
                             device="cpu (2 threads)", git_sha="abc123",
                             versions={"torch": "2.14.1"})  # fmt: skip
            elif c.row == "shifted" and c.column == "32":
                assert store.claim(c.hash, owner)
                store.fail(c.hash, owner, "Traceback ...\nRuntimeError: boom", wall_s=1.5)
    with ResultsStore(b / "results.sqlite") as store:
        seeded = expand(table, "smoke", rows=["cosine"], overrides=["train.seed=1"])
        grid = [GridCell(c, "lr-sweep", {"lr": "high"}) for c in seeded]
        store.add(grid)
        for c in grid:
            cells["b", c.row, c.column] = c
            assert store.claim(c.hash, owner)
            store.finish(c.hash, owner, METRICS_B[c.row, c.column], wall_s=30.0,
                         device="cuda:0 (H200)", git_sha="def456")  # fmt: skip
    return a, b, cells


def finished_at(folder, hash: str) -> float | None:
    """The store's own record of when a cell finished, read with sqlite3 directly."""
    with sqlite3.connect(folder / "results.sqlite") as db:
        return db.execute("SELECT finished_at FROM cells WHERE hash = ?", (hash,)).fetchone()[0]


def test_frame_holds_every_cell_with_its_metrics_and_seed(stores):
    a, b, cells = stores
    df = results_frame(a, b / "results.sqlite")  # a folder and a store file
    assert list(df.columns) == COLUMNS
    assert len(df) == 6
    keys = [("a", "cosine", "32"), ("a", "cosine", "64"), ("a", "shifted", "32"),
            ("a", "shifted", "64"), ("b", "cosine", "32"), ("b", "cosine", "64")]  # fmt: skip
    assert df["hash"].tolist() == [cells[k].hash for k in keys]
    assert df["status"].tolist() == ["done", "done", "failed", "pending", "done", "done"]
    assert df["seed"].tolist() == [0, 0, 0, 0, 1, 1]
    assert df["grid"].tolist() == ["table2"] * 4 + ["lr-sweep"] * 2
    assert df["table"].tolist() == [2] * 6
    assert df["axis:lr"].isna().tolist() == [True] * 4 + [False] * 2
    assert df["axis:lr"].iloc[4:].tolist() == ["high", "high"]
    written = {**{("a", *k): m for k, m in METRICS_A.items()},
               **{("b", *k): m for k, m in METRICS_B.items()}}  # fmt: skip
    for i, key in enumerate(keys):
        row = df.iloc[i]
        for name in ("fid", "kid_mean", "final_loss", "train_img_s", "num_generated"):
            want = written.get(key, {}).get(name)
            assert math.isnan(row[name]) if want is None else row[name] == want, (key, name)
        want_wall = written.get(key, {}).get("wall_s")
        assert (
            math.isnan(row["metric:wall_s"])
            if want_wall is None
            else row["metric:wall_s"] == want_wall
        )
        folder = a if key[0] == "a" else b
        assert row["store"] == str(folder / "results.sqlite")
        assert row["run_dir"] == str(folder / "cells" / cells[key].hash)
        t = finished_at(folder, cells[key].hash)
        assert (
            pd.isna(row["finished_at"])
            if t is None
            else abs(row["finished_at"].timestamp() - t) < 1e-6
        )
    assert df["num_generated"].dtype == "float64" and df["fid"].dtype == "float64"
    assert df["feature_extractor"].tolist()[:2] == ["inception-v3"] * 2
    assert df["feature_extractor"].iloc[2:].isna().all()
    assert df["wall_s"].tolist()[:3] == [60.0, 60.0, 1.5] and math.isnan(df["wall_s"].iloc[3])
    assert df["wall_s"].tolist()[4:] == [30.0, 30.0]
    assert df["git_sha"].tolist()[4:] == ["def456"] * 2
    assert str(df["finished_at"].dt.tz) == "UTC"
    assert df["source"].isna().all()

    done = results_frame(a, b, status="done")
    assert done["hash"].tolist() == [cells[k].hash for k in keys if k[1:] != ("shifted", "32")
                                     and k[1:] != ("shifted", "64")]  # fmt: skip


def test_a_store_without_the_new_keys_falls_back_to_the_spec(stores, monkeypatch):
    """Rows without grid, axes, seed or source (an older store): the grid from the table
    number, the seed from the run config."""
    a, b, _ = stores
    rows = ResultsStore.rows

    def old_rows(self, *args, **kwargs):
        drop = ("grid", "axes", "seed", "source")
        return [{k: v for k, v in r.items() if k not in drop} for r in rows(self, *args, **kwargs)]

    monkeypatch.setattr(ResultsStore, "rows", old_rows)
    df = results_frame(a, b)
    assert df["grid"].tolist() == ["table2"] * 6
    assert df["seed"].tolist() == [0, 0, 0, 0, 1, 1]
    assert "axis:lr" not in df.columns


def same(text: str, value: Any) -> bool:
    """A CSV field against the frame's value."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return text == ""
    if isinstance(value, pd.Timestamp):
        return pd.Timestamp(text) == value
    if isinstance(value, float):
        return float(text) == value
    return text == str(value)


def test_csv_on_stdout_is_the_frame(stores, capsys):
    a, b, _ = stores
    assert main(["results", str(a), str(b)]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    df = results_frame(a, b)
    assert rows[0] == list(df.columns)
    assert len(rows) == 1 + len(df)
    for fields, (_, row) in zip(rows[1:], df.iterrows(), strict=True):
        for name, text, value in zip(df.columns, fields, row, strict=True):
            assert same(text, value), (name, text, value)


def test_json_records_nest_axes_and_metrics(stores, tmp_path):
    a, b, _ = stores
    out = tmp_path / "out" / "results.json"
    assert main(["results", str(a), str(b), "--format", "json", "--out", str(out)]) == 0
    records = json.loads(out.read_text())
    df = results_frame(a, b)
    assert len(records) == 6
    assert list(records[0]) == [
        "grid", "table", "scale", "row", "column", "axes", "seed", "status", "metrics", "wall_s",
        "device", "git_sha", "finished_at", "hash", "config_hash", "source", "store", "run_dir",
    ]  # fmt: skip
    assert [r["hash"] for r in records] == df["hash"].tolist()
    expected = [METRICS_A[("cosine", "32")], METRICS_A[("cosine", "64")], {}, {},
                METRICS_B[("cosine", "32")], METRICS_B[("cosine", "64")]]  # fmt: skip
    for record, want in zip(records, expected, strict=True):
        assert record["metrics"] == {k: float(v) if isinstance(v, int) else v
                                     for k, v in want.items()}  # fmt: skip
    assert isinstance(records[0]["metrics"]["num_generated"], float)  # numbers as floats
    assert [r["axes"] for r in records] == [{}] * 4 + [{"lr": "high"}] * 2
    assert [r["seed"] for r in records] == [0, 0, 0, 0, 1, 1]
    assert records[3]["finished_at"] is None and records[3]["wall_s"] is None
    for record, t in zip(records, df["finished_at"], strict=True):
        assert (record["finished_at"] is None) == pd.isna(t)
        if record["finished_at"] is not None:
            assert pd.Timestamp(record["finished_at"]) == t
    assert [r["status"] for r in records] == df["status"].tolist()
    assert not list(out.parent.glob(".*"))  # no temporary file left beside it


def test_parquet_round_trip(stores, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    a, b, _ = stores
    out = tmp_path / "r.parquet"
    assert main(["results", str(a), str(b), "--format", "parquet", "--out", str(out)]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(out), results_frame(a, b))
    assert "wrote 6 cells" in capsys.readouterr().out
    assert main(["results", str(a), "--format", "parquet"]) == 2  # a file needs --out
    assert "give --out" in capsys.readouterr().err


def test_parquet_without_pyarrow_names_the_install(stores, tmp_path, monkeypatch, capsys):
    a, _, _ = stores
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    out = tmp_path / "r.parquet"
    assert main(["results", str(a), "--format", "parquet", "--out", str(out)]) == 2
    assert "pip install pyarrow" in capsys.readouterr().err
    assert not out.exists()


def test_bad_stores_exit_2_and_create_nothing(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    zero = tmp_path / "zero.sqlite"
    zero.write_bytes(b"")
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE x (a INTEGER)")
    blank = tmp_path / "blank.sqlite"  # an SQLite file without any table
    with sqlite3.connect(blank) as db:
        db.execute("PRAGMA user_version = 7")
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n")
    before = {p: p.stat().st_size for p in tmp_path.rglob("*")}
    out = tmp_path / "out.csv"
    for given in (tmp_path / "missing", empty, zero, other, blank, text):
        assert main(["results", str(given), "--out", str(out)]) == 2, given
        err = capsys.readouterr().err
        assert err.startswith("sdiff results: error:") and err.count("\n") == 1
        assert str(given) in err
    assert {p: p.stat().st_size for p in tmp_path.rglob("*")} == before
    for db_file, tables in ((other, [("x",)]), (blank, [])):  # no store tables added
        with sqlite3.connect(db_file) as db:
            assert db.execute("SELECT name FROM sqlite_master").fetchall() == tables


def test_mlflow_export_is_idempotent(stores, tmp_path, monkeypatch, capsys):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    a, b, cells = stores
    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    assert main(["results", str(a), "--to", "mlflow", "--tracking-uri", uri]) == 0
    assert "2 runs added, 0 cells already there" in capsys.readouterr().out
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # set for the export only
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read MLflow's file store back
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sdiff").experiment_id
    # an export interrupted halfway left an unfinished run for one of b's cells
    stray = client.create_run(experiment, tags={"sdiff.cell_hash": cells["b", "cosine", "64"].hash})

    assert main(["results", str(a), str(b), "--to", "mlflow", "--tracking-uri", uri]) == 0
    assert "2 runs added, 2 cells already there" in capsys.readouterr().out
    runs = client.search_runs([experiment])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert stray.info.run_id not in {r.info.run_id for r in runs}
    by_hash = {r.data.tags["sdiff.cell_hash"]: r for r in runs}
    assert set(by_hash) == {
        cells[k].hash
        for k in [
            ("a", "cosine", "32"),
            ("a", "cosine", "64"),
            ("b", "cosine", "32"),
            ("b", "cosine", "64"),
        ]
    }
    run = by_hash[cells["a", "cosine", "64"].hash]
    assert run.data.metrics["fid"] == 88.5 and run.data.metrics["final_loss"] == 0.125
    assert run.data.metrics["num_generated"] == 200.0
    assert run.data.params["metric.feature_extractor"] == "inception-v3"  # text: a param
    assert run.data.params["model.width"] == str(cells["a", "cosine", "64"].config.model.width)
    assert run.data.params["data.resolution"] == "64" and run.data.params["eval.n"] == "200"
    assert (run.data.params["grid"], run.data.params["row"], run.data.params["column"]) == (
        "table2", "cosine", "64")  # fmt: skip
    assert (
        run.data.params["seed"] == "0"
        and run.data.params["hash"] == cells["a", "cosine", "64"].hash
    )
    assert run.data.tags["git_sha"] == "abc123" and run.data.tags["device"] == "cpu (2 threads)"
    assert run.data.tags["store"] == str(a / "results.sqlite")
    assert run.info.end_time == round(finished_at(a, cells["a", "cosine", "64"].hash) * 1000)
    other = by_hash[cells["b", "cosine", "32"].hash]
    assert other.data.params["axis.lr"] == "high" and other.data.params["grid"] == "lr-sweep"
    assert other.data.params["seed"] == "1" and other.data.metrics["train_img_s"] == 1234.5

    assert main(["results", str(a), str(b), "--to", "mlflow", "--tracking-uri", uri]) == 0
    assert "0 runs added, 4 cells already there" in capsys.readouterr().out
    assert len(client.search_runs([experiment])) == 4


def test_mlflow_usage_errors(stores, tmp_path, monkeypatch, capsys):
    a, _, _ = stores
    uri = f"file:{tmp_path / 'mlruns'}"
    for argv in (["--to", "mlflow"], ["--to", "mlflow", "--tracking-uri", uri, "--format", "csv"],
                 ["--to", "mlflow", "--tracking-uri", uri, "--status", "all"],
                 ["--tracking-uri", uri]):  # fmt: skip
        assert main(["results", str(a), *argv]) == 2, argv
        assert capsys.readouterr().err.count("\n") == 1
    for name in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["results", str(a), "--to", "mlflow", "--tracking-uri", uri]) == 2
    assert "pip install mlflow-skinny" in capsys.readouterr().err
    assert not (tmp_path / "mlruns").exists()
