"""Ablation results out of the results stores: a pandas DataFrame, CSV, JSON or Parquet files,
and MLflow runs.

    from sdiff.ablations.results import results_frame

    df = results_frame("runs/ablate/table2-smoke")            # a grid folder, or its store file
    df = results_frame("runs/a/results.sqlite", "runs/b")     # several stores: rows concatenated
    df[df.status == "done"].groupby(["row", "column"])["fid"].mean()

    sdiff results runs/ablate/table2-smoke                     # CSV on stdout
    sdiff results runs/ablate/table2-* --format json --status done > table2.json
    sdiff results runs/ablate/table2-smoke --format parquet --out table2.parquet
    sdiff results runs/ablate/table2-smoke --to mlflow --tracking-uri file:/data/mlruns

The frame has one row per cell of each store (stores in the order given, cells in the order
they were added) and its columns in this order: ``grid``, ``table``, ``scale``, ``row``,
``column``; one ``axis:<name>`` column per axis beyond row and column (sorted by name); ``seed``,
``status``; one column per metric under the metric's own name (``fid``, ``kid_mean``,
``final_loss``, ``train_img_s``, ...; sorted by name); then ``wall_s``, ``device``, ``git_sha``,
``finished_at``, ``hash``, ``config_hash``, ``source``, ``store``, ``run_dir``. A metric whose
name is one of those columns (a cell's metrics carry their own ``wall_s``) is named
``metric:<name>``. A metric column is float64 when every value in it is a number (NaN where a
cell has none: pending, failed, or another table's metric); otherwise it holds text
(``feature_extractor``). ``seed`` is a nullable integer, ``finished_at`` a UTC timestamp (NaT
until the cell has finished), ``store`` the store file's absolute path, ``run_dir`` the cell's
run folder beside it (``<grid folder>/cells/<hash>``), ``source`` the store a cached result was
copied from (else empty).

Files: CSV has the frame's columns (timestamps in ISO 8601, empty for a missing value). JSON is
a list of records, one object per cell, with the frame's fields in its order except that the
axes and the metrics are nested objects (``"axes": {"lr": "high"}``, ``"metrics": {"fid":
12.3, ...}``) under their own names, so no metric name can clash with a field; numbers are
floats, a missing or non-finite value is ``null``. Parquet (pyarrow) holds the frame as it is.
Every file is written atomically: a reader sees the old file or the new one, never a part.

MLflow (``export_mlflow``): one run per done cell, in the experiment ``--experiment`` (default
``sdiff``; created when missing). Params: ``grid``, ``table``, ``scale``, ``row``, ``column``,
``axis.<name>``, ``seed``, ``hash``, ``config_hash``, ``kind``, the cell's run config flattened
(``model.width``, ``train.lr``, ...) and its evaluation settings (``eval.n``, ...); metrics:
the numeric metrics (the others, such as ``feature_extractor``, are params ``metric.<name>``);
tags: ``git_sha``, ``device``, ``store``, ``source`` (for a cached result), ``version.<name>``
and ``sdiff.cell_hash``. Exporting again adds only cells whose hash has no finished run in the
experiment, so a second export of the same stores adds nothing; a run left unfinished by an
interrupted export is deleted and exported again. A cell found in several stores is exported
once. MLflow's file store (``file:/path``) needs no server and no network; since MLflow 3.7 it
is "in maintenance mode" and refused unless ``MLFLOW_ALLOW_FILE_STORE=true``, which the export
sets for the duration of a ``file:`` (or plain path) URI; set it yourself to read such a store
back with MLflow (``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:/...``).

Reading never creates or changes a store beyond what opening one does (``ResultsStore``): a
path that is not a results store is a ValueError naming it.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sqlite3
from collections.abc import Iterator, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import pandas as pd

from sdiff.ablations.store import (
    STATUSES,
    STORE_NAME,
    ResultsStore,
    StoreError,
    cell_dir,
    read_only_rows,
)
from sdiff.training.trackers import mlflow_file_store_allowed
from sdiff.util.files import atomic_write_text, atomic_write_with

__all__ = [
    "BASE_COLUMNS",
    "FORMATS",
    "export_mlflow",
    "read_results",
    "results_frame",
    "results_json",
    "write_results",
]

FORMATS = ("csv", "json", "parquet")
# the frame's columns before and after the axis and metric columns
HEAD = ("grid", "table", "scale", "row", "column")
MIDDLE = ("seed", "status")
TAIL = ("wall_s", "device", "git_sha", "finished_at", "hash", "config_hash", "source", "store",
        "run_dir")  # fmt: skip
BASE_COLUMNS = (*HEAD, *MIDDLE, *TAIL)
SQLITE_HEADER = b"SQLite format 3\x00"
PYARROW_HINT = "pip install pyarrow"
MLFLOW_HINT = "pip install mlflow-skinny"


# --------------------------------------------------------------------------------------------
# Reading the stores


def store_path(given: str | os.PathLike[str]) -> Path:
    """The store file of ``given`` (a grid folder holding ``results.sqlite``, or the file),
    checked to be an existing results store without creating or changing anything."""
    path = Path(given)
    if path.is_dir():
        path = path / STORE_NAME
    if not path.is_file():
        where = f"{given} holds no {STORE_NAME}" if Path(given).is_dir() else "no such file"
        raise ValueError(f"no results store at {path} ({where}): give a grid folder that "
                         f"`sdiff ablate` wrote, or its {STORE_NAME}")  # fmt: skip
    with open(path, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise ValueError(f"{path} is not a results store (not an SQLite file)")
    try:  # read-only: an SQLite file without the store's tables must not get them
        rows = read_only_rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")
        tables = {r["name"] for r in rows}
    except sqlite3.Error:
        return path  # cannot tell read-only (a WAL file elsewhere): ResultsStore will say
    if not {"meta", "cells"} <= tables:
        raise ValueError(
            f"{path} is an SQLite file but not a results store (tables {sorted(tables)})"
        )
    return path


def read_results(*stores: str | os.PathLike[str], status: str = "all") -> list[dict[str, Any]]:
    """Every cell of ``stores`` as a record: the frame's fields (module docstring) with
    ``axes`` and ``metrics`` as dicts, ``finished_at`` and ``started_at`` as unix times, and the
    cell's ``spec`` (kind, run config, evaluation settings), ``kind`` and ``versions``.
    ``status``: "all", or one status ("done") to keep only those cells."""
    if status != "all" and status not in STATUSES:
        raise ValueError(f"status must be 'all' or one of {', '.join(STATUSES)}; got {status!r}")
    records = []
    for given in stores:
        path = store_path(given)
        try:
            with ResultsStore(path) as store:
                rows = store.rows()
        except StoreError as err:
            raise ValueError(str(err)) from err
        records.extend(_record(r, path) for r in rows)
    if status != "all":
        records = [r for r in records if r["status"] == status]
    return records


def _record(r: dict[str, Any], path: Path) -> dict[str, Any]:
    """One store row as a record; keys older stores lack fall back to what the spec holds."""
    spec = r.get("spec") or {}
    config = spec.get("config") or {}
    seed = r.get("seed")
    if seed is None:
        seed = (config.get("train") or {}).get("seed")
    return {
        "grid": r.get("grid") or f"table{r['table_number']}",
        "table": r["table_number"],
        "scale": r["scale"],
        "row": r["row_name"],
        "column": r["column_name"],
        "axes": {str(k): str(v) for k, v in (r.get("axes") or {}).items()},
        "seed": None if seed is None else int(seed),
        "status": r["status"],
        "metrics": {str(k): _metric_value(v) for k, v in (r.get("metrics") or {}).items()},
        "wall_s": r.get("wall_s"),
        "device": r.get("device"),
        "git_sha": r.get("git_sha"),
        "finished_at": r.get("finished_at"),
        "hash": r["hash"],
        "config_hash": r.get("config_hash"),
        "source": r.get("source"),
        "store": str(path.absolute()),
        "run_dir": str(cell_dir(path.absolute().parent, r["hash"])),
        "kind": r.get("kind") or spec.get("kind"),
        "spec": spec,
        "started_at": r.get("started_at"),
        "versions": r.get("versions") or {},
    }


def _is_number(value: Any) -> bool:
    return isinstance(value, Number) and not isinstance(value, complex)


def _metric_value(value: Any) -> Any:
    """Numbers (bools included) as floats; text as it is; anything else as JSON text."""
    if value is None or isinstance(value, str):
        return value
    if _is_number(value):
        return float(value)
    return json.dumps(value, sort_keys=True, default=str)


# --------------------------------------------------------------------------------------------
# The frame


def results_frame(*stores: str | os.PathLike[str], status: str = "all") -> pd.DataFrame:
    """One row per cell of ``stores`` (grid folders or store files, concatenated in order), the
    columns of the module docstring. ``status="done"`` keeps the finished cells only. A missing
    or corrupt store is a ValueError naming it."""
    return frame_of(read_results(*stores, status=status))


def metric_column(name: str) -> str:
    """The frame's column for metric ``name``."""
    return f"metric:{name}" if name in BASE_COLUMNS else name


def frame_of(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """The frame of ``read_results`` records. Text columns take the installed pandas' own
    dtype for text (pandas 3: ``str``, missing values NaN; pandas 2: object, None)."""
    axes = sorted({a for r in records for a in r["axes"]})
    metrics = sorted({m for r in records for m in r["metrics"]})
    data: dict[str, Any] = {c: pd.Series([r[c] for r in records]) for c in HEAD}
    data["table"] = data["table"].astype("int64")
    for a in axes:
        data[f"axis:{a}"] = pd.Series([r["axes"].get(a) for r in records])
    data["seed"] = pd.array([r["seed"] for r in records], dtype="Int64")
    data["status"] = pd.Series([r["status"] for r in records])
    for m in metrics:
        values = [r["metrics"].get(m) for r in records]
        if all(v is None or _is_number(v) for v in values):
            column = pd.Series([math.nan if v is None else v for v in values], dtype="float64")
        else:  # text: numbers among it as text too, so the column has one type
            column = pd.Series([None if v is None else str(v) for v in values])
        data[metric_column(m)] = column
    data["wall_s"] = pd.Series([r["wall_s"] for r in records], dtype="float64")
    for c in ("device", "git_sha"):
        data[c] = pd.Series([r[c] for r in records])
    finished = pd.Series([r["finished_at"] for r in records], dtype="float64")
    microseconds = (finished * 1e6).round().astype("Int64")  # no float noise below a microsecond
    data["finished_at"] = pd.to_datetime(microseconds, unit="us", utc=True)
    for c in ("hash", "config_hash", "source", "store", "run_dir"):
        data[c] = pd.Series([r[c] for r in records])
    return pd.DataFrame(data, index=pd.RangeIndex(len(records)))


# --------------------------------------------------------------------------------------------
# Files


def _iso(t: float | None) -> str | None:
    if t is None or (isinstance(t, float) and math.isnan(t)):
        return None
    return pd.Timestamp(round(t * 1e6), unit="us", tz="UTC").isoformat()


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def results_json(records: Sequence[dict[str, Any]]) -> str:
    """The JSON text of ``read_results`` records (module docstring: axes and metrics nested)."""
    out = []
    for r in records:
        item: dict[str, Any] = {c: r[c] for c in HEAD}
        item["axes"] = dict(sorted(r["axes"].items()))
        item["seed"] = r["seed"]
        item["status"] = r["status"]
        item["metrics"] = {k: _json_value(v) for k, v in sorted(r["metrics"].items())}
        for c in TAIL:
            item[c] = _json_value(r[c])
        item["wall_s"] = None if r["wall_s"] is None else _json_value(float(r["wall_s"]))
        item["finished_at"] = _iso(r["finished_at"])
        out.append(item)
    return json.dumps(out, indent=2, allow_nan=False) + "\n"


def results_csv(frame: pd.DataFrame) -> str:
    """The CSV text of a results frame (timestamps in ISO 8601)."""
    frame = frame.copy()
    frame["finished_at"] = [None if pd.isna(t) else t.isoformat() for t in frame["finished_at"]]
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False, lineterminator="\n")
    return buffer.getvalue()


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise ValueError(f"--format parquet needs pyarrow: {PYARROW_HINT}") from None


def write_results(
    stores: Sequence[str | os.PathLike[str]],
    fmt: str,
    out: str | os.PathLike[str] | None = None,
    *,
    status: str = "all",
) -> tuple[str | None, int]:
    """The cells of ``stores`` in format ``fmt`` (csv, json, parquet), written atomically to
    ``out``, or returned as text (csv, json) when ``out`` is None. Returns (text or None, the
    number of cells). Checks everything it can before reading or writing anything."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if out is None:
            raise ValueError("--format parquet writes a file: give --out FILE.parquet")
        _require_pyarrow()
    if out is not None and Path(out).is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    records = read_results(*stores, status=status)
    if fmt == "json":
        text = results_json(records)
    elif fmt == "csv":
        text = results_csv(frame_of(records))
    else:
        text = None
    if out is None:
        return text, len(records)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        atomic_write_text(out, text)
    else:
        frame = frame_of(records)
        atomic_write_with(out, lambda tmp: frame.to_parquet(tmp, index=False))
    return None, len(records)


# --------------------------------------------------------------------------------------------
# MLflow

CELL_TAG = "sdiff.cell_hash"  # the tag that makes an export idempotent


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _param_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _key(name: str) -> str:
    """An MLflow param, metric or tag key: letters, digits and ``_-. /`` only."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def mlflow_params(record: dict[str, Any]) -> dict[str, str]:
    """The params of a cell's run (module docstring), as text."""
    params: dict[str, Any] = {c: record[c] for c in (*HEAD, "seed", "hash", "config_hash")}
    params["kind"] = record["kind"]
    for name, value in record["axes"].items():
        params[f"axis.{name}"] = value
    _flatten("", record["spec"].get("config") or {}, params)
    _flatten("eval", record["spec"].get("eval") or {}, params)
    for name, value in record["metrics"].items():
        if not _is_number(value):
            params[f"metric.{name}"] = value
    return {_key(k): _param_text(v) for k, v in params.items() if v is not None}


def mlflow_metrics(record: dict[str, Any]) -> dict[str, float]:
    return {_key(k): v for k, v in record["metrics"].items() if _is_number(v)}


def mlflow_tags(record: dict[str, Any]) -> dict[str, str]:
    tags = {
        CELL_TAG: record["hash"],
        "git_sha": record["git_sha"],
        "device": record["device"],
        "store": record["store"],
        "source": record["source"],
    }
    for name, value in record["versions"].items():
        tags[f"version.{name}"] = value
    return {_key(k): str(v) for k, v in tags.items() if v is not None}


def run_name(record: dict[str, Any]) -> str:
    parts = [record["grid"], record["scale"], record["row"], record["column"]]
    parts += [f"{k}={v}" for k, v in sorted(record["axes"].items())]
    if record["seed"] is not None:
        parts.append(f"seed{record['seed']}")
    return " / ".join(str(p) for p in parts)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _existing_runs(client, experiment_id: str) -> dict[str, list]:
    """The experiment's active runs that carry a cell hash, by hash."""
    found: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            h = run.data.tags.get(CELL_TAG)
            if h:
                found.setdefault(h, []).append(run)
        token = page.token
        if not token:
            return found


def export_mlflow(
    stores: Sequence[str | os.PathLike[str]],
    tracking_uri: str,
    experiment: str = "sdiff",
) -> dict[str, int]:
    """One MLflow run per done cell of ``stores`` (module docstring); cells already exported
    to the experiment are skipped. Returns {"added": n, "skipped": n, "cells": n}."""
    try:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise ValueError(f"--to mlflow needs MLflow: {MLFLOW_HINT}") from None
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    records = read_results(*stores, status="done")  # a bad store fails before MLflow is touched
    added = skipped = 0
    with mlflow_file_store_allowed(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            experiment_id = client.create_experiment(experiment)
        elif exp.lifecycle_stage != "active":
            raise ValueError(f"MLflow experiment {experiment!r} at {tracking_uri} is deleted: "
                             f"restore it or give another --experiment")  # fmt: skip
        else:
            experiment_id = exp.experiment_id
        existing = _existing_runs(client, experiment_id)
        seen: set[str] = set()
        for record in records:
            h = record["hash"]
            if h in seen:
                continue
            seen.add(h)
            runs = existing.get(h, [])
            if any(run.info.status == "FINISHED" for run in runs):
                skipped += 1
                continue
            for run in runs:  # left unfinished by an interrupted export
                client.delete_run(run.info.run_id)
            _export_cell(client, experiment_id, record, Metric, Param, RunTag,
                         MAX_PARAM_VAL_LENGTH)  # fmt: skip
            added += 1
    return {"added": added, "skipped": skipped, "cells": len(seen)}


def _ms(t: float | None) -> int | None:
    return None if t is None else round(t * 1000)


def _export_cell(client, experiment_id, record, Metric, Param, RunTag, max_param_len) -> None:
    """One finished run for one cell; a failure deletes the partial run before raising."""
    finished = _ms(record["finished_at"])
    run = client.create_run(experiment_id, start_time=_ms(record["started_at"]) or finished,
                            tags=mlflow_tags(record), run_name=run_name(record))  # fmt: skip
    run_id = run.info.run_id
    try:
        params = [Param(k, v[:max_param_len]) for k, v in mlflow_params(record).items()]
        metrics = [Metric(k, v, finished or 0, 0) for k, v in mlflow_metrics(record).items()]
        for part in _chunks(params, 100):  # MLflow's limits per log_batch call
            client.log_batch(run_id, params=part)
        for part in _chunks(metrics, 1000):
            client.log_batch(run_id, metrics=part)
        client.set_terminated(run_id, status="FINISHED", end_time=finished)
    except BaseException:
        with contextlib.suppress(Exception):
            client.delete_run(run_id)
        raise
