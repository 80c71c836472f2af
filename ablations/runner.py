"""Running a grid (a paper table, a shipped grid or a grid file): expand it, record the cells
in a results store, take what other grids already did from the cell cache, run the rest.

    sdiff ablate 2 --scale smoke --out runs/ablate/table2-smoke
    sdiff ablate schedule --scale gpu --set data.root=/data/imagenet/train --executor gpus
    sdiff ablate my-grid.yaml --seeds 0 1 2   # a grid file (ablations.gridfile), three seeds
    sdiff ablate 2 --dry-run            # one line per cell: overrides, status, estimated cost
    sdiff ablate 2 --dry-run --json     # every cell's hash and resolved spec, as JSON
    sdiff ablate --list                 # the tables and grids, their scales and costs

The output folder (default ``runs/ablate/<table2 or grid name>-<scale>``) holds
``results.sqlite`` (the store: one row per cell, see ``ablations.store``) and
``cells/<hash>/``, an ordinary sdiff run folder per cell (config.json, checkpoints,
metrics.csv, metrics.json) plus ``cell.json`` naming its table, row and column.

The cell cache (``ablations.cache``): before running, every cell not done here is looked up in
the other stores under the output folder's parent (``runs/ablate``) and in each ``--cache``
folder; one done there is recorded done here with its source named, and its run folder linked
(``--no-cache`` turns this off).

A rerun picks up where the last one stopped: ``done`` cells are skipped; a cell whose runner
was killed (``running``, its owner gone) is claimed again and its training resumes from the
cell folder's last checkpoint; ``failed`` cells are reported and rerun only with
``--retry-failed``. Any number of runners may share one output folder: the store's atomic claim
gives each cell to one of them, and a result is recorded only by the runner that holds it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from sdiff.ablations.cache import find_cached, link_cell
from sdiff.ablations.executors import EXECUTORS, GridJob
from sdiff.ablations.grid import SCALES, Table, expand
from sdiff.ablations.store import LIVE_GRACE_S, STALE_AFTER_S, STORE_NAME, ResultsStore
from sdiff.util.cli_args import ExtendList, KeyValueList, renamed, show_defaults
from sdiff.util.errors import report_failure

__all__ = [
    "ablate_main",
    "default_out",
    "default_scale",
    "dry_run",
    "dry_run_text",
    "estimate_cost",
    "format_results",
    "list_tables",
    "resolve_table",
    "run_grid",
]

DEFAULT_ROOT = "runs/ablate"


def default_out(table: Table | int | str, scale: str, root: str | Path = DEFAULT_ROOT) -> Path:
    """A grid's folder unless ``--out`` says otherwise: ``<root>/<slug>-<scale>``, the slug
    being ``table<N>`` for a paper table (a Table or its number) or a grid's name."""
    if isinstance(table, Table):
        slug = table.slug
    elif isinstance(table, int) or str(table).isdigit():
        slug = f"table{table}"
    else:
        slug = str(table)
    return Path(root) / f"{slug}-{scale}"


def default_scale(table: Table) -> str:
    """The scale a grid runs at unless told: smoke where it has one, else its first."""
    return "smoke" if "smoke" in table.scales else next(iter(table.scales))


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
    """One paragraph per table: number, name and aliases, title, and per scale the grid's
    size, its expected cost and what it needs."""
    known = _unique(tables) if tables is not None else _registry()
    if tables is None:
        from sdiff.ablations import EXTRA_GRIDS, get_table

        known += [get_table(name) for name in EXTRA_GRIDS]
    lines = []
    for t in known:
        aliases = f" (also {', '.join(t.aliases)})" if t.aliases else ""
        kind = "computed" if t.compute is not None else "trained + evaluated"
        what = f"table {t.number}: {t.name}" if t.number else f"grid {t.name}"
        lines.append(f"{what}{aliases} - {t.title}")
        lines.append(f"  reports {', '.join(t.metrics)}; cells are {kind}")
        for name in [s for s in SCALES if s in t.scales] + sorted(set(t.scales) - set(SCALES)):
            s = t.scales[name]
            n = len(s.rows) * len(s.columns) * math.prod(len(v) for _, v in s.axes)
            n *= max(1, len(s.seeds))
            size = f"{len(s.rows)} rows x {len(s.columns)} columns"
            size += "".join(f" x {len(v)} {a}" for a, v in s.axes)
            size += f" x {len(s.seeds)} seeds" if s.seeds else ""
            size += f" = {n}"
            needs = (
                s.needs
                if isinstance(s.needs, str)
                else ", ".join(f"--set {k}=..." for k in s.needs)
            )
            extra = "".join(f"; {x}" for x in (s.cost, f"needs {needs}" if needs else "") if x)
            lines.append(f"  --scale {name}: {size} cells{extra}")
    return "\n".join(lines) + "\n"


# -- dry run and results -------------------------------------------------------------------------
def dry_run(
    table: Table,
    scale: str,
    rows: list[str] | None = None,
    overrides: list[str] | None = None,
    *,
    seeds: list[int] | None = None,
    out_dir: str | Path | None = None,
    caches: list[str | Path] = (),
    use_cache: bool = True,
) -> list[dict[str, Any]]:
    """Each cell's hash, row, column, extra axes, seed, kind, resolved spec, its own overrides
    (over the scale's base), its status in the store at ``out_dir`` (done, running, pending,
    failed, or cached: done in another store the cache would take it from) and the estimated
    cost. Reads only: no store or folder is created."""
    cells = expand(table, scale, rows=rows, overrides=overrides, seeds=seeds)
    out = Path(out_dir) if out_dir is not None else default_out(table, scale)
    status = _store_statuses(out / STORE_NAME, [c.hash for c in cells])
    open_ = [c.hash for c in cells if status.get(c.hash, "pending") in ("pending", "failed")]
    cached = {}
    if use_cache and open_:
        cached = find_cached(open_, [out.parent, *caches], exclude=out / STORE_NAME)
    s = table.scale(scale)
    records = []
    for c in cells:
        own = [*_axis_overrides(s, c), *(overrides or [])]
        own += [] if c.seed is None else [f"train.seed={c.seed}"]
        state = status.get(c.hash, "pending")
        if c.hash in cached and state in ("pending", "failed"):
            state = f"cached ({cached[c.hash].store.parent})"
        records.append(
            {
                "hash": c.hash,
                "table": c.table,
                "grid": c.grid,
                "scale": c.scale,
                "row": c.row,
                "column": c.column,
                "axes": dict(c.axes),
                "seed": c.seed,
                "kind": c.kind,
                "overrides": own,
                "status": state,
                "cost": estimate_cost(c),
                "spec": c.spec,
            }
        )
    return records


def _axis_overrides(s, cell) -> list[str]:
    """The overrides that make ``cell`` what it is over the scale's base and shared set."""
    col = next(a for a in s.columns if a.name == cell.column)
    row = next(a for a in s.rows if a.name == cell.row)
    extra = [next(v for v in values if v.name == dict(cell.axes)[axis]) for axis, values in s.axes]
    return [*col.overrides, *row.overrides, *(o for v in extra for o in v.overrides)]


def _store_statuses(path: Path, hashes: list[str]) -> dict[str, str]:
    """{hash: status} from the store at ``path`` without creating or upgrading it; a running
    cell whose owner is gone reads "interrupted"."""
    if not path.is_file():
        return {}
    import sqlite3

    from sdiff.ablations.store import owner_alive, read_only_rows

    try:
        rows = read_only_rows(path, "SELECT hash, status, owner, heartbeat FROM cells")
    except sqlite3.Error as err:
        raise ValueError(f"cannot read the results store {path}: {err}") from err
    wanted = set(hashes)
    out = {}
    for r in rows:
        h, status = r["hash"], r["status"]
        if h in wanted:
            alive = owner_alive(r["owner"], r["heartbeat"], STALE_AFTER_S, LIVE_GRACE_S)
            if status == "running" and not alive:
                status = "interrupted"
            out[h] = status
    return out


# What a smoke cell costs here, measured: Table 2's four smoke cells (train 20k images + 200
# samples x 32 steps + FID) took 522 s of wall time on 2 CPU cores for 4 x 9.4 TFLOP by the
# estimate below, i.e. about 72 GFLOP/s end to end.
CPU_FLOPS = 7.2e10
# A GPU guess for the gpu and paper scales: 30% MFU of an H100's dense bf16 989 TFLOP/s (the
# H200 measured 29-37% for U-ViT L; reports/gpu/README.md). An estimate, not a measurement.
GPU_FLOPS = 0.30 * 989e12


@functools.cache
def _macs(model) -> int:
    """MACs per image of a (frozen, hashable) model config: the cells of a grid share a few."""
    from sdiff.models.flops import model_stats

    return model_stats(model).macs


def estimate_cost(cell) -> dict[str, Any]:
    """Training and sampling FLOPs of a cell, from the model's MACs per image (meta device):
    training 3 x (2 x MACs) per image seen (forward and a backward of twice its cost),
    sampling 2 x MACs per image per step (twice with guidance); and the wall time that takes
    at the rate above for the device class the scale targets. Computed cells cost nothing."""
    if cell.kind != "train":
        return {"tflop": 0.0, "seconds": 0.0, "at": "computed"}
    macs = _macs(cell.config.model)
    train = 6.0 * macs * cell.config.train.total_images
    per_step = 2.0 * macs * (2 if cell.eval.guidance else 1)
    sample = per_step * cell.eval.n * cell.eval.steps
    flops = train + sample
    on_cpu = cell.scale == "smoke"
    rate = CPU_FLOPS if on_cpu else GPU_FLOPS
    return {
        "tflop": flops / 1e12,
        "seconds": flops / rate,
        "at": "2 CPU cores (measured rate)" if on_cpu else "one H100 at 30% MFU (assumed)",
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _flop(tflop: float) -> str:
    for unit, scale in (("EFLOP", 1e6), ("PFLOP", 1e3), ("TFLOP", 1.0)):
        if tflop >= scale or unit == "TFLOP":
            return f"{tflop / scale:.3g} {unit}"
    return ""


def dry_run_text(table: Table, scale: str, records: list[dict[str, Any]], out: Path) -> str:
    """The compact dry run: a header naming the base and the store, one line per cell."""
    s = table.scale(scale)
    base = getattr(s.base, "name", getattr(s.base, "__name__", "custom"))
    shared = " ".join(s.overrides)
    head = [
        f"{table.slug} ({table.title}) at {scale}: {len(records)} cells; base {base}"
        + (f" + {shared}" if shared else ""),
        f"store: {out / STORE_NAME}"
        + ("" if (out / STORE_NAME).is_file() else " (not created yet)"),
    ]
    if s.cost:
        head.append(f"expected: {s.cost}")
    lines = []
    for r in records:
        name = " / ".join(
            [r["row"]] + ([r["column"]] if r["column"] != "all" else [])
            + [f"{a}={v}" for a, v in r["axes"].items()]
            + ([f"seed {r['seed']}"] if r["seed"] is not None else [])
        )  # fmt: skip
        cost = r["cost"]
        est = "computed" if cost["at"] == "computed" else (
            f"{_flop(cost['tflop'])}, ~{_duration(cost['seconds'])}"
        )  # fmt: skip
        lines.append([name, r["status"], est, " ".join(r["overrides"]) or "(the base)"])
    widths = [max(len(x[i]) for x in lines) for i in range(3)]
    body = ["  ".join(x[i].ljust(widths[i]) for i in range(3)) + "  " + x[3] for x in lines]
    left = [r for r in records if not r["status"].startswith(("done", "cached"))]
    total = sum(r["cost"]["seconds"] for r in left)
    at = next((r["cost"]["at"] for r in records if r["cost"]["at"] != "computed"), "")
    tail = f"to run: ~{_duration(total)}" + (f" on {at}" if at else "")
    return "\n".join([*head, *body, tail])


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
    axes = list(dict.fromkeys(a for r in rows for a in (r.get("axes") or {})))
    # a seed column when seeds tell cells apart (the same row, column and axes more than once)
    places = [(r["row_name"], r["column_name"], json.dumps(r.get("axes") or {})) for r in rows]
    seeds = len(set(places)) < len(places)
    head = ["row", "column", *axes, *(["seed"] if seeds else []), "status", *metrics, "wall_s",
            "hash"]  # fmt: skip
    body = []
    for r in rows:
        m = r["metrics"] or {}
        values = [_fmt(m.get(k)) for k in metrics]
        status = r["status"] + (" (cached)" if r.get("source") else "")
        body.append(
            [r["row_name"], r["column_name"], *(_fmt((r.get("axes") or {}).get(a)) for a in axes),
             *([_fmt(r.get("seed"))] if seeds else []), status, *values, _fmt(r["wall_s"]),
             r["hash"]]
        )  # fmt: skip
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
    seeds: list[int] | None = None,
    caches: list[str | Path] = (),
    use_cache: bool = True,
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
    grid, in grid order. ``seeds`` replaces the grid's seeds. Cells done in another store under
    ``out_dir``'s parent or under one of ``caches`` are taken from there (``ablations.cache``;
    not with ``use_cache`` False).

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
    cells = expand(table, scale, rows=rows, overrides=overrides, seeds=seeds)
    job = GridJob(
        table=table,
        scale=scale,
        rows=tuple(rows) if rows else None,
        overrides=tuple(overrides or ()),
        seeds=tuple(seeds) if seeds else None,
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
    out = Path(out_dir)
    roots = [out.parent, *caches] if use_cache else []
    new, counts, adopted = _register(job, cells, roots)
    log(_plan_text(table, scale, out, len(cells), new, counts, retry_failed, adopted))
    initial = counts["done"] + (0 if retry_failed else counts["failed"])
    with _progress_bar(job, hashes, f"{table.slug} {scale}", initial) as on_progress:
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


def _register(job: GridJob, cells: list, roots: list) -> tuple[int, Counter, dict[str, str]]:
    """Add the grid's cells to the store (existing rows untouched) and adopt the ones done in
    another store under ``roots``: how many were new, the cells' statuses, and {hash: source
    store} of the adopted ones. A cell whose own folder here already holds a started run is
    not adopted (its partial run resumes here instead)."""
    store = job.open_store()
    adopted: dict[str, str] = {}
    try:
        new = store.add(cells)
        open_ = [r["hash"] for r in store.rows(hashes=[c.hash for c in cells])
                 if r["status"] in ("pending", "failed")]  # fmt: skip
        if roots and open_:
            hits = find_cached(open_, roots, exclude=Path(job.out_dir) / STORE_NAME)
            for h, hit in hits.items():
                here = job.cell_dir(h)
                if here.is_dir() and not here.is_symlink() and any(here.iterdir()):
                    continue
                if store.adopt(h, hit, hit.store):
                    link_cell(job.out_dir, hit)
                    adopted[h] = str(hit.store)
        counts, _ = _status_counts(store, [c.hash for c in cells])
    finally:
        store.close()
    return new, counts, adopted


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
    table: Table,
    scale: str,
    out: Path,
    n: int,
    new: int,
    counts: Counter,
    retry_failed: bool,
    adopted: dict[str, str] | None = None,
) -> str:
    what = f"table {table.number} ({table.name})" if table.number else f"grid {table.name}"
    parts = [f"{what} at {scale}: {n} cells in {out / STORE_NAME}"]
    if adopted:
        sources = sorted({str(Path(p).parent) for p in adopted.values()})
        parts.append(f"{len(adopted)} taken from the cell cache ({', '.join(sources)})")
    if counts["done"] - len(adopted or {}):
        parts.append(f"{counts['done'] - len(adopted or {})} done already (skipped)")
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
        prog="sdiff ablate",
        description="run an ablation grid: a paper table (1-8 or its name), a shipped grid "
        "(--list) or a grid file (GRID.yaml; see sdiff.ablations.gridfile)",
    )
    p.add_argument("table", nargs="?", help="table number (1-8), name, grid name or grid file")
    p.add_argument("--scale", "--preset", dest="preset", default=None, action=renamed("--preset"),
                   help="scale: smoke (CPU), gpu or paper (default: smoke, or the grid's only "
                   "scale)")  # fmt: skip
    p.add_argument("--out", help="output folder (default runs/ablate/<table<N> or grid>-<scale>)")
    p.add_argument("--rows", nargs="+", action=ExtendList, metavar="ROW", help="only these rows")
    p.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        action=ExtendList,
        metavar="SEED",
        help="run every cell once per seed (train.seed; replaces the grid's seeds)",
    )
    p.add_argument("--cache", nargs="+", action=ExtendList, metavar="DIR", default=[],
                   help="also take done cells from the stores under these folders (the stores "
                   "beside --out are always searched)")  # fmt: skip
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="run every cell here, even ones done in another store",
    )
    p.add_argument(
        "--set",
        nargs="+",
        action=KeyValueList,
        metavar="KEY=VALUE",
        default=[],
        help="overrides for all cells, e.g. data.root=/data/imagenet/train",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print one line per cell (its overrides, status, estimated cost) and stop",
    )
    p.add_argument(
        "--json", action="store_true", help="with --dry-run: every cell in full, as JSON"
    )
    p.add_argument("--list", action="store_true", help="list the tables and stop")
    p.add_argument("--executor", default="local", choices=sorted(EXECUTORS))
    p.add_argument("--workers", type=int, help="see run_grid: processes, GPUs or jobs at once")
    p.add_argument(
        "--executor-opt",
        nargs="+",
        action=KeyValueList,
        metavar="KEY=VALUE",
        default=[],
        help="slurm: submitit parameters, e.g. slurm_partition=gpu gpus_per_node=1 "
        "timeout_min=600; cluster=local runs the jobs locally",
    )
    p.add_argument("--retry-failed", action="store_true", help="rerun cells that failed before")
    p.add_argument("--device", help="training/evaluation device (default cuda if present)")
    p.add_argument("--no-progress", action="store_true")
    return show_defaults(p)


def ablate_main(
    argv: list[str] | None = None,
    *,
    tables: Mapping[Any, Table] | None = None,
    debug: bool = False,
) -> int:
    """``sdiff ablate``. Exit 0: every cell done; 1: some failed; otherwise the code of the
    failure (``sdiff.util.errors``: 2 a usage error such as an unknown table, row, scale or option;
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
        scale = args.preset or default_scale(table)
        out = Path(args.out or default_out(table, scale))
        if args.dry_run:
            cells = dry_run(table, scale, args.rows, args.set, seeds=args.seeds, out_dir=out,
                            caches=args.cache, use_cache=not args.no_cache)  # fmt: skip
            if args.json:
                print(json.dumps(cells, indent=2, sort_keys=True))
            else:
                print(dry_run_text(table, scale, cells, out))
            return 0
        if args.json:
            raise ValueError("--json goes with --dry-run")
        rows = run_grid(
            table,
            scale,
            out,
            rows=args.rows,
            overrides=args.set,
            seeds=args.seeds,
            caches=args.cache,
            use_cache=not args.no_cache,
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
