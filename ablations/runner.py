"""Running a paper table: expand its grid, record the cells in a results store, run them.

    sdiff ablate 2 --preset smoke --out runs/ablate/table2-smoke
    sdiff ablate schedule --preset gpu --set data.root=/data/imagenet/train --executor gpus
    sdiff ablate 2 --dry-run            # every cell's hash and resolved spec, as JSON
    sdiff ablate --list                 # the tables, their presets and what each costs

The output folder holds ``results.sqlite`` (the store: one row per cell, see
``ablations.store``) and ``cells/<hash>/``, an ordinary sdiff run folder per cell (config.json,
checkpoints, metrics.csv, metrics.json) plus ``cell.json`` naming its table, row and column.

A rerun picks up where the last one stopped: ``done`` cells are skipped; a cell whose runner
was killed (``running``, its owner gone) is claimed again and its training resumes from the
cell folder's last checkpoint; ``failed`` cells are reported and rerun only with
``--retry-failed``. Any number of runners may share one output folder: the store's atomic claim
gives each cell to one of them, and a result is recorded only by the runner that holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sdiff.ablations.executors import EXECUTORS, GridJob
from sdiff.ablations.grid import SCALES, Table, expand
from sdiff.ablations.store import LIVE_GRACE_S, STALE_AFTER_S, STORE_NAME, ResultsStore
from sdiff.util.cli_args import ExtendList
from sdiff.util.errors import report_failure

__all__ = ["ablate_main", "dry_run", "format_results", "list_tables", "resolve_table", "run_grid"]

DEFAULT_ROOT = "runs/ablate"


def default_out(table_number: int, scale: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """A grid's folder unless ``--out`` says otherwise: ``<root>/table<N>-<scale>``."""
    return Path(root) / f"table{table_number}-{scale}"


# -- the table registry ---------------------------------------------------------------------------
def _registry() -> list[Table]:
    try:
        from sdiff.ablations import TABLES
    except ImportError as err:
        raise ValueError("no ablation tables are registered (sdiff.ablations.TABLES)") from err
    return _unique(TABLES)


def _unique(tables: Mapping[Any, Table] | Iterable[Table]) -> list[Table]:
    values = tables.values() if isinstance(tables, Mapping) else tables
    seen: dict[int, Table] = {}
    for t in values:
        seen.setdefault(id(t), t)
    return sorted(seen.values(), key=lambda t: t.number)


def resolve_table(name: str | int, tables: Mapping[Any, Table] | None = None) -> Table:
    """A table by number (``2``), name or alias. With ``tables`` None: the registry's
    ``sdiff.ablations.get_table`` (or a lookup in ``sdiff.ablations.TABLES``)."""
    if tables is None:
        try:
            from sdiff.ablations import get_table
        except ImportError:
            pass
        else:
            return get_table(str(name))
    known = _unique(tables) if tables is not None else _registry()
    key = str(name).strip().lower().removeprefix("table")
    for t in known:
        if key in (str(t.number), t.name.lower(), *(a.lower() for a in t.aliases)):
            return t
    names = ", ".join(f"{t.number} ({t.name})" for t in known)
    raise ValueError(f"unknown table {name!r}; known: {names}")


def list_tables(tables: Mapping[Any, Table] | None = None) -> str:
    """One paragraph per table: number, name and aliases, title, and per preset the grid's
    size, its expected cost and what it needs."""
    known = _unique(tables) if tables is not None else _registry()
    lines = []
    for t in known:
        aliases = f" (also {', '.join(t.aliases)})" if t.aliases else ""
        kind = "computed" if t.compute is not None else "trained + evaluated"
        lines.append(f"table {t.number}: {t.name}{aliases} - {t.title}")
        lines.append(f"  reports {', '.join(t.metrics)}; cells are {kind}")
        for name in [s for s in SCALES if s in t.scales] + sorted(set(t.scales) - set(SCALES)):
            s = t.scales[name]
            size = f"{len(s.rows)} rows x {len(s.columns)} columns = {len(s.rows) * len(s.columns)}"
            needs = (
                s.needs
                if isinstance(s.needs, str)
                else ", ".join(f"--set {k}=..." for k in s.needs)
            )
            extra = "".join(f"; {x}" for x in (s.cost, f"needs {needs}" if needs else "") if x)
            lines.append(f"  --preset {name}: {size} cells{extra}")
    return "\n".join(lines) + "\n"


# -- dry run and results -------------------------------------------------------------------------
def dry_run(
    table: Table, scale: str, rows: list[str] | None = None, overrides: list[str] | None = None
) -> list[dict[str, Any]]:
    """Each cell's hash, row, column, kind and resolved spec (what ``--dry-run`` prints)."""
    return [
        {
            "hash": c.hash,
            "table": c.table,
            "scale": c.scale,
            "row": c.row,
            "column": c.column,
            "kind": c.kind,
            "spec": c.spec,
        }
        for c in expand(table, scale, rows=rows, overrides=overrides)
    ]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _metric_columns(table: Table, rows: list[dict[str, Any]]) -> list[str]:
    """The table's metrics as the rows have them: ``fid`` itself, or ``ratio@16``,
    ``ratio@32`` ... for a metric reported per resolution."""
    keys = {k for r in rows for k in (r["metrics"] or {})}
    out = []
    for m in table.metrics:
        per = sorted((k for k in keys if k.startswith(f"{m}@")), key=lambda k: (len(k), k))
        out += [m] if m in keys or not per else per
    return out


def format_results(table: Table, rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the store's rows: row, column, status, the table's metrics."""
    metrics = _metric_columns(table, rows)
    head = ["row", "column", "status", *metrics, "wall_s", "hash"]
    body = []
    for r in rows:
        m = r["metrics"] or {}
        values = [_fmt(m.get(k)) for k in metrics]
        body.append(
            [r["row_name"], r["column_name"], r["status"], *values, _fmt(r["wall_s"]), r["hash"]]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join(
        "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)).rstrip()
        for line in [head, *body]
    )


# -- running -------------------------------------------------------------------------------------
def _status_counts(store: ResultsStore, hashes: list[str]) -> tuple[Counter, list[dict]]:
    rows = store.rows(hashes=hashes)
    counts: Counter = Counter()
    for r in rows:
        status = r["status"]
        if status == "running":
            status = "running" if store.owner_alive(r) else "interrupted"
        counts[status] += 1
    return counts, rows


def run_grid(
    table: Table,
    scale: str,
    out_dir: str | Path,
    *,
    rows: list[str] | None = None,
    overrides: list[str] | None = None,
    executor: str = "local",
    workers: int | None = None,
    progress: bool = True,
    retry_failed: bool = False,
    device: str | None = None,
    executor_options: dict[str, Any] | None = None,
    heartbeat_s: float = 30.0,
    stale_after_s: float = STALE_AFTER_S,
    live_grace_s: float = LIVE_GRACE_S,
    poll_s: float = 1.0,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every cell of ``table`` at ``scale`` not done yet; returns the store's rows for the
    grid, in grid order.

    ``workers``: local: worker processes (default 1, this process); gpus: at most this many
    GPUs (default all visible); torchrun: processes per cell (default the GPU count, else 1);
    slurm: jobs running at once (array parallelism; default unlimited). ``executor_options``:
    submitit parameters for slurm (``cluster="local"`` runs the jobs locally). A running cell
    whose heartbeat (refreshed every ``heartbeat_s``) is older than ``stale_after_s`` counts as
    abandoned and is taken over; ``live_grace_s`` instead when its runner is a process of this
    host that still exists (``ablations.store``). A device this machine lacks is an error
    before anything is written. Every result row records the commit of the sdiff that ran it
    (``sdiff.util.provenance.git_sha``).
    """
    _check_run_arguments(executor, device, heartbeat_s, stale_after_s)
    cells = expand(table, scale, rows=rows, overrides=overrides)
    job = GridJob(
        table=table,
        scale=scale,
        rows=tuple(rows) if rows else None,
        overrides=tuple(overrides or ()),
        out_dir=str(out_dir),
        retry_failed_before=time.time() if retry_failed else None,
        device=device,
        progress=progress,
        heartbeat_s=heartbeat_s,
        stale_after_s=stale_after_s,
        live_grace_s=live_grace_s,
        poll_s=poll_s,
        journal="delete" if executor == "slurm" else "wal",  # WAL: one machine's shared memory
    )
    hashes = [c.hash for c in cells]
    new, counts = _register(job, cells)
    out = Path(out_dir)
    log(_plan_text(table, scale, out, len(cells), new, counts, retry_failed))
    initial = counts["done"] + (0 if retry_failed else counts["failed"])
    with _progress_bar(job, hashes, f"table {table.number} {scale}", initial) as on_progress:
        EXECUTORS[executor](
            job, workers=workers, on_progress=on_progress, log=log, options=executor_options or {}
        )
    with job.open_store() as store:
        counts, result = _status_counts(store, hashes)
    log(_summary_text(counts, out, retry_failed))
    return result


def _check_run_arguments(
    executor: str, device: str | None, heartbeat_s: float, stale_after_s: float
) -> None:
    """Fail before the store is touched: an unknown executor, a device this machine lacks, a
    staleness limit a live heartbeat could miss."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose one of {sorted(EXECUTORS)}")
    if device is not None:
        from sdiff.util.devices import resolve_device

        resolve_device(device)
    if stale_after_s <= 2 * heartbeat_s:
        raise ValueError(
            f"stale_after_s ({stale_after_s}) must exceed twice heartbeat_s ({heartbeat_s})"
        )


def _register(job: GridJob, cells: list) -> tuple[int, Counter]:
    """Add the grid's cells to the store (existing rows untouched): how many were new, and the
    cells' statuses."""
    store = job.open_store()
    try:
        new = store.add(cells)
        counts, _ = _status_counts(store, [c.hash for c in cells])
    finally:
        store.close()
    return new, counts


@contextlib.contextmanager
def _progress_bar(
    job: GridJob, hashes: list[str], desc: str, initial: int
) -> Iterator[Callable[[], None]]:
    """``on_progress`` for the executors: with ``job.progress``, a bar of the finished cells
    (done or failed), read from the store on each call; without, a no-op."""
    if not job.progress:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=len(hashes), desc=desc, unit="cell", initial=initial)
    watch = job.open_store()

    def on_progress() -> None:
        now, _ = _status_counts(watch, hashes)
        bar.n = now["done"] + now["failed"]
        bar.refresh()

    try:
        yield on_progress
    finally:
        on_progress()
        bar.close()
        watch.close()


def _plan_text(
    table: Table, scale: str, out: Path, n: int, new: int, counts: Counter, retry_failed: bool
) -> str:
    parts = [f"table {table.number} ({table.name}) at {scale}: {n} cells in {out / STORE_NAME}"]
    if counts["done"]:
        parts.append(f"{counts['done']} done already (skipped)")
    if counts["failed"]:
        parts.append(
            f"{counts['failed']} failed before ("
            + ("retried" if retry_failed else "not rerun; --retry-failed reruns them")
            + ")"
        )
    if counts["interrupted"]:
        parts.append(f"{counts['interrupted']} interrupted (resumed from their checkpoints)")
    if counts["running"]:
        parts.append(f"{counts['running']} running in another runner (left to it)")
    parts.append(f"{counts['pending']} to run ({new} new)")
    return "; ".join(parts)


def _summary_text(counts: Counter, out: Path, retry_failed: bool) -> str:
    text = f"{counts['done']} done, {counts['failed']} failed"
    if counts["running"] or counts["interrupted"] or counts["pending"]:
        left = counts["running"] + counts["interrupted"] + counts["pending"]
        text += f", {left} not finished (run again to continue)"
    if counts["failed"]:
        text += (
            f" (errors in the store's error column; "
            f"{'still failing after a retry' if retry_failed else '--retry-failed reruns them'})"
        )
    return f"{text}; results: {out / STORE_NAME}"


# -- command line --------------------------------------------------------------------------------
def _parse_options(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--executor-opt {item!r} is not of the form key=value")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sdiff ablate", description="run a paper table's grid of ablations"
    )
    p.add_argument("table", nargs="?", help="table number (1-8) or name; see --list")
    p.add_argument("--preset", default="smoke", help="scale: smoke (CPU), gpu or paper")
    p.add_argument("--out", help="output folder (default runs/ablate/table<N>-<preset>)")
    p.add_argument("--rows", nargs="+", action=ExtendList, metavar="ROW", help="only these rows")
    p.add_argument(
        "--set",
        nargs="+",
        action=ExtendList,
        metavar="KEY=VALUE",
        default=[],
        help="overrides for all cells, e.g. data.root=/data/imagenet/train",
    )
    p.add_argument("--dry-run", action="store_true", help="print every cell as JSON and stop")
    p.add_argument("--list", action="store_true", help="list the tables and stop")
    p.add_argument("--executor", default="local", choices=sorted(EXECUTORS))
    p.add_argument("--workers", type=int, help="see run_grid: processes, GPUs or jobs at once")
    p.add_argument(
        "--executor-opt",
        nargs="+",
        action=ExtendList,
        metavar="KEY=VALUE",
        default=[],
        help="slurm: submitit parameters, e.g. slurm_partition=gpu gpus_per_node=1 "
        "timeout_min=600; cluster=local runs the jobs locally",
    )
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that failed before")
    p.add_argument("--device", help="training/evaluation device (default cuda if present)")
    p.add_argument("--no-progress", action="store_true")
    return p


def ablate_main(
    argv: list[str] | None = None,
    *,
    tables: Mapping[Any, Table] | None = None,
    debug: bool = False,
) -> int:
    """``sdiff ablate``. Exit 0: every cell done; 1: some failed; otherwise the code of the
    failure (``sdiff.util.errors``: 2 a usage error such as an unknown table, row, preset or option;
    4 a store or folder that cannot be written, a full disk; 5 a device this machine lacks).
    ``tables``: a registry to use instead of ``sdiff.ablations.TABLES`` (tests); ``debug``:
    let the exception through, traceback and all."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as stop:
        return int(stop.code or 0)
    try:
        if args.list:
            print(list_tables(tables), end="")
            return 0
        if not args.table:
            raise ValueError("give a table (a number 1-8 or a name), or --list to see them")
        try:
            table = resolve_table(args.table, tables)
        except LookupError as err:  # a registry's KeyError reads as a usage error too
            raise ValueError(str(err).strip("'\"")) from err
        if args.dry_run:
            cells = dry_run(table, args.preset, args.rows, args.set)
            print(json.dumps(cells, indent=2, sort_keys=True))
            return 0
        out = args.out or default_out(table.number, args.preset)
        rows = run_grid(
            table,
            args.preset,
            out,
            rows=args.rows,
            overrides=args.set,
            executor=args.executor,
            workers=args.workers,
            progress=not args.no_progress,
            retry_failed=args.retry_failed,
            device=args.device,
            executor_options=_parse_options(args.executor_opt),
        )
    except Exception as err:
        return report_failure("sdiff ablate", err, debug=debug)
    print(format_results(table, rows))
    return 0 if all(r["status"] == "done" for r in rows) else 1
