"""Reports: the paper's tables from the results stores, with the paper's numbers beside ours,
plots, sample grids and an index.

    sdiff report 2                        # runs/ablate/table2-smoke -> reports/tables/...
    sdiff report 2 --scale gpu --store runs/ablate/table2-gpu
    sdiff report --all                    # every store under runs/ablate, bench plots, index

Per table and scale (``reports/tables/table<N>-<scale>.md`` and ``.tex``): the table laid out
as the paper's (its rows, its columns), each cell "ours" (the mean over the cells that share a
row and column, i.e. several seeds run into the same store or several stores, with the standard
deviation and the count when there are more than one) beside "paper" (the number of simple
diffusion (arXiv 2301.11093), a dash where sdiff does not transcribe it), and a header naming
the scale, the samples and reference images behind each FID, the sampler steps, the devices,
the cells' git SHAs and wall time. Plots (PNG, ``reports/plots/``): training loss per cell,
FID/KID per cell; the cells' last sample grids are copied to ``reports/samples/``. Table 7 is a
comparison table: the literature rows as cited in simple diffusion (arXiv 2301.11093) and SiD2
(arXiv 2410.19324), then ours, grouped by scale.

``--all`` also plots the benchmark CSVs (throughput and peak memory against resolution per
preset and device; attention TFLOP/s against sequence length per backend) and writes
``reports/index.md`` linking everything. pandas holds the tables; markdown tables are
``sdiff.util.tables.markdown_table``'s, LaTeX is rendered here.

Every markdown, LaTeX and index file names the commit it was generated from
(``sdiff.util.provenance``). The repository's own ``reports/`` folder holds committed reports,
which must be reproducible from their commit: writing into it from a tree with uncommitted
changes is refused unless ``--allow-dirty`` is given, and then each file says that it was
generated from a dirty tree. Any other ``--out`` folder is written whatever the tree.
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sdiff.ablations.grid import SCALES, cell_hash
from sdiff.ablations.runner import DEFAULT_ROOT, default_out
from sdiff.ablations.store import STORE_NAME, ResultsStore, StoreError, cell_dir
from sdiff.util import provenance
from sdiff.util.cli_args import ExtendList
from sdiff.util.files import atomic_write_text
from sdiff.util.tables import markdown_table

__all__ = [
    "TableReport",
    "bench_plots",
    "build_table_report",
    "committed_reports",
    "find_stores",
    "generated_from",
    "load_cells",
    "plot_curves",
    "plot_metrics",
    "report_main",
    "to_latex",
    "to_markdown",
    "write_index",
    "write_table_report",
]

DEFAULT_OUT = "reports"
METRIC_NAMES = {
    "fid": "FID",
    "kid_mean": "KID",
    "isc_mean": "IS",
    "fid_train": "FID train",
    "fid_eval": "FID eval",
    "isc": "IS",
    "params": "params",
    "gmacs": "GMACs",
    "train_img_s": "train img/s",
    "kernel_mib": "kernel MiB",
    "feature_gib": "feature map GiB",
    "ratio": "feature / kernel",
}
DASH = "–"


# --------------------------------------------------------------------------------------------
# Provenance of the report files


def committed_reports() -> Path | None:
    """The ``reports/`` folder of the sdiff checkout this code runs from (None outside one)."""
    root = provenance.source_root()
    return None if root is None else root / "reports"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def generated_from(out: str | Path, allow_dirty: bool = False) -> str:
    """What the report files written to ``out`` say about their origin: "from commit <sha>",
    "from <sha>+dirty: uncommitted changes, ...", or an unknown commit.

    A ValueError, before anything is written, for the repository's committed ``reports/``
    folder and a tree with uncommitted changes, unless ``allow_dirty``.
    """
    sha = provenance.git_sha()
    if sha is None:
        return "from an unknown commit (not a git checkout, and $SDIFF_GIT_SHA is not set)"
    if not sha.endswith(provenance.DIRTY):
        return f"from commit {sha}"
    reports = committed_reports()
    if not allow_dirty and reports is not None and _inside(Path(out), reports):
        raise ValueError(
            f"refusing to write into {reports}: the source tree has uncommitted changes (git "
            f"{sha}), and a committed report must be reproducible from its commit. Commit "
            f"first, or pass --allow-dirty (each file then says it came from a dirty tree), "
            f"or write elsewhere with --out"
        )
    return f"from {sha}: uncommitted changes, not reproducible from a commit"


# --------------------------------------------------------------------------------------------
# Reading stores


def _store_path(path: str | Path) -> Path:
    p = Path(path)
    return p / STORE_NAME if p.is_dir() else p


def find_stores(runs_dir: str | Path) -> list[Path]:
    """Every results store under ``runs_dir`` (``*/results.sqlite``, one level down, and
    ``runs_dir/results.sqlite`` itself), sorted."""
    root = Path(runs_dir)
    found = sorted(root.glob(f"*/{STORE_NAME}"))
    if (root / STORE_NAME).exists():
        found.insert(0, root / STORE_NAME)
    return found


def load_cells(stores: Iterable[str | Path]) -> pd.DataFrame:
    """All cells of the given stores as one DataFrame: table, scale, row, column, status,
    the metrics (one column each), seed, eval settings, device, git SHA, wall time, the store
    and the cell's run folder. A missing, corrupt or incompatible store raises a ValueError
    naming it (nothing is created or changed)."""
    records: list[dict[str, Any]] = []
    for given in stores:
        path = _store_path(given)
        if not path.is_file():
            raise ValueError(
                f"no results store at {path}: run `sdiff ablate TABLE --out {path.parent}` first "
                f"(or give --store the folder or file the runner wrote)"
            )
        try:
            with ResultsStore(path) as store:
                rows = store.rows()
        except StoreError as err:
            raise ValueError(str(err)) from err
        for r in rows:
            spec = r.get("spec") or {}
            config = spec.get("config", {})
            ev = spec.get("eval", {})
            rec = {
                "variant": _variant(spec),
                "table": r["table_number"],
                "scale": r["scale"],
                "row": r["row_name"],
                "column": r["column_name"],
                "status": r["status"],
                "hash": r["hash"],
                "seed": config.get("train", {}).get("seed"),
                "eval_n": ev.get("n"),
                "reference_n": ev.get("reference_n"),
                "eval_steps": ev.get("steps"),
                "guidance": ev.get("guidance"),
                "device": r.get("device"),
                "git_sha": r.get("git_sha"),
                "wall_s": r.get("wall_s"),
                "finished_at": r.get("finished_at"),
                "error": _last_line(r.get("error")),
                "store": str(path),
                "run_dir": str(cell_dir(path.parent, r["hash"])),
            }
            for k, v in (r.get("metrics") or {}).items():
                rec[f"m.{k}"] = v
            records.append(rec)
    return pd.DataFrame.from_records(records)


def _last_line(text: str | None) -> str | None:
    """A traceback's last line (the exception), or None."""
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else None


def _variant(spec: dict[str, Any]) -> str:
    """The cell's identity apart from its seed: cells of one row and column that share it are
    repeats (averaged); different variants in one report are refused."""
    plain = copy.deepcopy(spec)
    plain.get("config", {}).get("train", {}).pop("seed", None)
    return cell_hash(plain)


def _check_variants(table, scale: str, cells: pd.DataFrame) -> None:
    for (row, column), group in cells.groupby(["row", "column"]):
        if group["variant"].nunique() > 1:
            stores = sorted(set(group["store"]))
            raise ValueError(
                f"table {table.number} at {scale}, cell {row} / {column}: the stores hold cells "
                f"that differ in more than the seed ({group['variant'].nunique()} configs; "
                f"stores {stores}); report them separately (--store) or keep only seeds apart"
            )


# --------------------------------------------------------------------------------------------
# Formatting


def fmt_number(metric: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    base = metric.split("@")[0]
    if base == "params":
        return f"{value / 1e6:.2f}M"
    if base.startswith("kid"):
        return f"{value:.4f}"
    if base in ("fid", "fid_train", "fid_eval", "isc", "isc_mean", "train_img_s"):
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def fmt_cell(metric: str, values: Sequence[float]) -> str:
    """One value as it is; several as mean ± sample std (n)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return DASH
    if len(vals) == 1:
        return fmt_number(metric, vals[0])
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    return f"{fmt_number(metric, mean)} ± {fmt_number(metric, std)} (n={len(vals)})"


def to_markdown(df: pd.DataFrame, index_name: str = "") -> str:
    """A pipe table of the DataFrame (index as the first column; string cells)."""
    columns = [index_name or (df.index.name or ""), *(str(c) for c in df.columns)]
    rows = [
        [idx, *values] for idx, values in zip(df.index, df.itertuples(index=False), strict=True)
    ]
    return markdown_table(columns, rows)


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(df: pd.DataFrame, caption: str, label: str, index_name: str = "") -> str:
    """A booktabs table of the DataFrame (string cells, escaped)."""
    cols = [index_name or (df.index.name or "")] + [str(c) for c in df.columns]
    spec = "l" + "r" * len(df.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(c) for c in cols) + r" \\",
        r"\midrule",
    ]
    for idx, row in df.iterrows():
        cells = [str(idx)] + ["" if v is None else str(v) for v in row.tolist()]
        lines.append(" & ".join(latex_escape(c) for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# One table


@dataclass
class TableReport:
    table: Any  # sdiff.ablations.grid.Table
    scale: str
    cells: pd.DataFrame  # this table and scale only
    frame: pd.DataFrame  # the paper-layout table (strings)
    header: list[str]  # lines of provenance
    extra: list[tuple[str, pd.DataFrame]]  # further tables (Table 7's literature)


def _metric_values(cells: pd.DataFrame, metric: str) -> list[float]:
    col = f"m.{metric}"
    if col not in cells.columns:
        return []
    return [float(v) for v in cells[col].tolist() if v is not None and not pd.isna(v)]


def _status_note(cells: pd.DataFrame) -> str:
    counts = cells["status"].value_counts().to_dict()
    if counts.get("done", 0) == len(cells):
        return ""
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items()) if s != "done")


def _paper_value(table, row: str, column: str, metric: str) -> float | None:
    return (table.paper.get((row, column)) or {}).get(metric)


def _ours(metric: str, here: pd.DataFrame) -> str:
    """One "ours" entry: the metric over the done cells of ``here``, and what is not done."""
    done = here[here["status"] == "done"]
    ours = fmt_cell(metric, _metric_values(done, metric)) if len(done) else DASH
    note = _status_note(here) if len(here) else "not run"
    if not note:
        return ours
    return f"{ours} ({note})" if ours != DASH else note


def _grid_frame(table, scale: str, cells: pd.DataFrame) -> pd.DataFrame:
    """Rows = the table's rows; for each column of the table and each metric: ours, paper."""
    s = table.scale(scale)
    data: dict[str, list[str]] = {}
    for row in s.rows:
        for col in s.columns:
            here = cells[(cells["row"] == row.name) & (cells["column"] == col.name)]
            prefix = f"{col.title}: " if len(s.columns) > 1 else ""
            for metric in table.metrics:
                name = f"{prefix}{METRIC_NAMES.get(metric, metric)}"
                data.setdefault(f"{name} (ours)", []).append(_ours(metric, here))
                paper = _paper_value(table, row.name, col.name, metric)
                data.setdefault(f"{name} (paper)", []).append(fmt_number(metric, paper))
    return pd.DataFrame(data, index=pd.Index([row.title for row in s.rows], name="row"))


def _per_side_frame(table, scale: str, cells: pd.DataFrame) -> pd.DataFrame:
    """Table 1's layout: one row per (model, side), metrics as columns."""
    s = table.scale(scale)
    records, index = [], []
    for row in s.rows:
        here = cells[(cells["row"] == row.name) & (cells["status"] == "done")]
        if not len(here):
            continue
        sides = sorted(
            {
                int(c.split("@")[1])
                for c in here.columns
                if c.startswith("m.") and "@" in c and here[c].notna().any()
            },
            reverse=True,
        )
        for side in sides:
            index.append(f"{row.title}, {side}x{side}")
            rec = {}
            for metric in table.metrics:
                key = f"{metric}@{side}"
                name = METRIC_NAMES.get(metric, metric)
                rec[f"{name} (ours)"] = fmt_cell(key, _metric_values(here, key))
                rec[f"{name} (paper)"] = DASH
            records.append(rec)
    return pd.DataFrame.from_records(records, index=pd.Index(index, name="level"))


LITERATURE_SOURCE = (
    "as cited in simple diffusion (arXiv 2301.11093), Table 7, and SiD2 (arXiv 2410.19324)"
)


def _literature_frame(table) -> pd.DataFrame:
    records, index = [], []
    for (name, res), values in table.paper.items():
        index.append(f"{name}, {res} px")
        records.append(
            {METRIC_NAMES.get(k, k): fmt_number(k, v) for k, v in values.items()}
            | {"scale": "literature"}
        )
    return pd.DataFrame.from_records(records, index=pd.Index(index, name="model"))


def _ours_row(scale: str, here: pd.DataFrame) -> dict[str, str]:
    """Table 7: one of our rows (the cells of one row and column at one scale)."""
    done = here[here["status"] == "done"]
    n = done["eval_n"].dropna().astype(int).unique().tolist()
    guidance = fmt_number("w", done["guidance"].dropna().max()) if len(done) else DASH
    return {
        "FID (ours, vs train)": fmt_cell("fid", _metric_values(done, "fid")),
        "KID": fmt_cell("kid_mean", _metric_values(done, "kid_mean")),
        "IS": fmt_cell("isc_mean", _metric_values(done, "isc_mean")),
        "scale": scale,
        "samples": ", ".join(str(x) for x in n) or DASH,
        "guidance w": guidance,
        "status": _status_note(here) or "done",
    }


def _ours_frame(table, cells: pd.DataFrame) -> pd.DataFrame:
    """Table 7: our rows, whatever scales were run, labelled with their scale."""
    records, index = [], []
    for scale in (s for s in SCALES if s in table.scales):
        s = table.scales[scale]
        at_scale = cells[cells["scale"] == scale]
        for row in s.rows:
            for col in s.columns:
                here = at_scale[(at_scale["row"] == row.name) & (at_scale["column"] == col.name)]
                if len(here):
                    index.append(row.title if len(s.columns) == 1 else f"{row.title}, {col.title}")
                    records.append(_ours_row(scale, here))
    return pd.DataFrame.from_records(records, index=pd.Index(index, name="model"))


def _header(table, scale: str, cells: pd.DataFrame) -> list[str]:
    """The lines above the table: what was run, how it was measured, where, what failed."""
    done = cells[cells["status"] == "done"]
    lines = [f"Scale: **{scale}**. Cells: {len(done)} done of {len(cells)}."]
    if table.compute is None and len(done):
        lines += _evaluation_lines(done)
    if len(done):
        lines.append(_where_line(done))
    failed = cells[cells["status"] == "failed"]
    lines += [f"Failed: {r['row']} / {r['column']}: {r['error']}" for _, r in failed.iterrows()]
    if scale == "smoke" and table.compute is None and len(done):
        lines.append(_smoke_line(done))
    if not table.paper:
        lines.append("The paper's numbers for this table are not transcribed in sdiff: dashes.")
    return lines


def _distinct(done: pd.DataFrame, column: str, kind=int) -> list:
    return sorted(done[column].dropna().astype(kind).unique().tolist())


def _evaluation_lines(done: pd.DataFrame) -> list[str]:
    """How the FIDs were measured, and over which seeds."""
    fx = sorted({str(v) for v in done.get("m.feature_extractor", pd.Series()).dropna()})
    join = ", ".join
    return [
        f"FID/KID of {join(map(str, _distinct(done, 'eval_n')))} generated samples against "
        f"{join(map(str, _distinct(done, 'reference_n')))} training images, "
        f"{join(map(str, _distinct(done, 'eval_steps')))} DDPM steps, guidance w = "
        f"{join(f'{x:g}' for x in _distinct(done, 'guidance', float))}; features: "
        f"{'; '.join(fx) or 'n/a'}.",
        f"Seeds: {join(map(str, _distinct(done, 'seed')))}; with several, a cell shows mean ± "
        f"sample standard deviation (n).",
    ]


def _where_line(done: pd.DataFrame) -> str:
    """Devices, the commits the cells ran from, wall time and date."""
    devices = sorted({str(d) for d in done["device"].dropna()})
    shas = sorted({str(s) for s in done["git_sha"].dropna()})
    dirty = any(sha.endswith(provenance.DIRTY) for sha in shas)
    wall = float(done["wall_s"].fillna(0).sum())
    when = max(done["finished_at"].dropna(), default=None)
    date = time.strftime("%Y-%m-%d", time.localtime(when)) if when else "?"
    return (
        f"Device: {', '.join(devices) or '?'}; git {', '.join(shas) or '?'}"
        f"{' (+dirty: run from uncommitted changes)' if dirty else ''}; "
        f"{wall / 60:.1f} min of cell wall time; finished {date}."
    )


def _smoke_line(done: pd.DataFrame) -> str:
    params = [v / 1e6 for v in _metric_values(done, "params")]
    images = sorted({int(v) for v in _metric_values(done, "train_images")})
    lo, hi = (f"{min(params):.2f}", f"{max(params):.2f}") if params else ("?", "?")
    size = f"{lo}M" if lo == hi else f"{lo}-{hi}M"
    return (
        f"Smoke scale: {size}-parameter models trained on "
        f"{', '.join(f'{i:,}' for i in images) or '?'} images of the bundled MNIST digits "
        "per cell; FIDs from a few hundred samples: differences of a few points are "
        "within the noise (compare the KID's subset std in the metrics plot), and the "
        "paper's ImageNet effects need not show at this scale."
    )


def build_table_report(table, scale: str, cells: pd.DataFrame) -> TableReport:
    """The report of ``table`` at ``scale`` from ``cells`` (load_cells' frame, any tables)."""
    table.scale(scale)  # raises for an unknown scale
    if len(cells):
        mine = cells[(cells["table"] == table.number) & (cells["scale"] == scale)]
    else:
        mine = cells
    if not len(mine):
        raise ValueError(
            f"no cells of table {table.number} ({table.name}) at the {scale} scale in the given "
            f"stores: run `sdiff ablate {table.number} --preset {scale}` first"
        )
    _check_variants(table, scale, mine)
    extra: list[tuple[str, pd.DataFrame]] = []
    if table.number == 7:
        frame = _ours_frame(table, cells[cells["table"] == 7])
        extra.append((f"Literature ({LITERATURE_SOURCE}; not run here)", _literature_frame(table)))
    elif table.compute is not None:
        frame = _per_side_frame(table, scale, mine)
    else:
        frame = _grid_frame(table, scale, mine)
    return TableReport(table, scale, mine, frame, _header(table, scale, mine), extra)


# --------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cell_label(r: pd.Series) -> str:
    return r["row"] if r["column"] == "all" else f"{r['row']} / {r['column']}"


def plot_curves(cells: pd.DataFrame, path: str | Path, title: str):
    """Training loss against images seen, one line per trained cell (from its metrics.csv).
    Returns the figure (closed after saving) or None when no cell has a curve."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    drawn = 0
    for _, r in cells.iterrows():
        f = Path(r["run_dir"]) / "metrics.csv"
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if not rows:
            continue
        x = [float(q["images"]) for q in rows]
        y = [float(q["loss"]) for q in rows]
        seed = "" if pd.isna(r["seed"]) else f" (seed {int(r['seed'])})"
        ax.plot(x, y, marker="o", ms=3, label=_cell_label(r) + seed)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("training images")
    ax.set_ylabel("loss (logging-interval mean)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(path))
    return fig


def plot_metrics(cells: pd.DataFrame, path: str | Path, title: str, metrics=("fid", "kid_mean")):
    """FID and KID (with the KID's subset std as error bar) per cell, as bars. Returns the
    figure or None when no cell has these metrics."""
    plt = _plt()
    done = cells[cells["status"] == "done"]
    present = [m for m in metrics if f"m.{m}" in done.columns and done[f"m.{m}"].notna().any()]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.0 * len(present), 3.6), squeeze=False)
    labels = [_cell_label(r) for _, r in done.iterrows()]
    for ax, m in zip(axes[0], present, strict=True):
        vals = done[f"m.{m}"].astype(float).tolist()
        err = None
        if m == "kid_mean" and "m.kid_std" in done.columns:
            err = done["m.kid_std"].astype(float).fillna(0).tolist()
        ax.bar(range(len(vals)), vals, yerr=err, capsize=3, color="tab:blue")
        ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(METRIC_NAMES.get(m, m))
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    _save(fig, Path(path))
    return fig


def _read_csvs(paths: Iterable[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths if Path(p).is_file() and Path(p).stat().st_size]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def bench_plots(reports: str | Path, out: str | Path) -> list[Path]:
    """Plots of the benchmark CSVs under ``reports`` (reports/bench/throughput.csv,
    reports/gpu/throughput.csv, reports/gpu/attention.csv): training img/s and peak memory
    against resolution per preset and device, attention TFLOP/s against sequence length per
    backend. Returns the files written."""
    reports, out = Path(reports), Path(out)
    written: list[Path] = []
    tp = _read_csvs([reports / "bench" / "throughput.csv", reports / "gpu" / "throughput.csv"])
    if len(tp) and "train_img_s" in tp.columns:
        tp = tp[tp["status"] == "ok"].copy()
        tp["compiled"] = tp["compiled"].astype(str).str.lower().isin(["true", "1"])
        for what, ylabel, name in (
            ("train_img_s", "training img/s (log)", "bench-throughput.png"),
            ("peak_mem_gib", "peak memory of a training step, GiB", "bench-memory.png"),
        ):
            sub = tp[tp[what].notna()]
            if len(sub):
                written.append(_throughput_plot(sub, what, ylabel, out / name))
    at = _read_csvs([reports / "gpu" / "attention.csv"])
    if len(at) and "tflops" in at.columns:
        written.append(_attention_plot(at[at["status"] == "ok"], out / "bench-attention.png"))
    return written


def _throughput_plot(rows: pd.DataFrame, what: str, ylabel: str, path: Path) -> Path:
    """``what`` against resolution, one panel per device, one line per preset, batch,
    compilation and attention backend."""
    plt = _plt()
    devices = sorted({str(d) for d in rows["device"]})
    fig, axes = plt.subplots(1, len(devices), figsize=(5.6 * len(devices), 4.4), squeeze=False)
    for ax, dev in zip(axes[0], devices, strict=True):
        on_device = rows[rows["device"].astype(str) == dev]
        keys = ["preset", "compiled", "backend", "batch"]
        for i, (key, g) in enumerate(on_device.groupby(keys, sort=True)):
            g = g.sort_values("resolution").drop_duplicates("resolution", keep="last")
            preset, compiled, backend, batch = key
            label = f"{preset} b{batch} {'compiled' if compiled else 'eager'}"
            label += f" {backend}" if backend != "auto" else ""
            style = ("-", "--", ":", "-.")[(i // 10) % 4]
            ax.plot(g["resolution"], g[what], marker="o", ls=style, label=label)
        ax.set_xscale("log", base=2)
        if what == "train_img_s":
            ax.set_yscale("log")
        ax.set_xlabel("resolution (px)")
        ax.set_title(dev, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel(ylabel)
    return _save(fig, path)


def _attention_plot(rows: pd.DataFrame, path: Path) -> Path:
    """TFLOP/s against sequence length, one panel per mode and head dim, one line per
    backend."""
    plt = _plt()
    panels = sorted({(m, int(d)) for m, d in zip(rows["mode"], rows["head_dim"], strict=True)})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.0 * len(panels), 3.8), squeeze=False)
    for ax, (mode, d) in zip(axes[0], panels, strict=True):
        g = rows[(rows["mode"] == mode) & (rows["head_dim"] == d)]
        for backend, gb in g.groupby("backend", sort=True):
            gb = gb.sort_values("seq_len")
            ax.plot(gb["seq_len"], gb["tflops"], marker="o", label=backend)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}, head dim {d}", fontsize=9)
        ax.set_xlabel("sequence length")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s (bf16)")
    axes[0][-1].legend(fontsize=7)
    device = str(rows["device"].iloc[0]) if "device" in rows.columns and len(rows) else ""
    fig.suptitle(f"attention, {device}", fontsize=10)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Writing


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")


def _copy_grids(report: TableReport, out: Path) -> list[tuple[str, Path]]:
    grids = []
    for _, r in report.cells[report.cells["status"] == "done"].iterrows():
        found = sorted((Path(r["run_dir"]) / "samples").glob("grid-*.png"))
        if not found:
            continue
        seed = "" if pd.isna(r["seed"]) else f"-seed{int(r['seed'])}"
        name = f"{_slug(r['row'])}-{_slug(r['column'])}{seed}.png"
        dest = out / "samples" / f"table{report.table.number}-{report.scale}" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(found[-1], dest)
        grids.append((_cell_label(r) + seed.replace("-", " "), dest))
    return grids


def write_table_report(
    report: TableReport, out: str | Path, *, allow_dirty: bool = False, origin: str | None = None
) -> dict[str, Path]:
    """Markdown, LaTeX, plots and sample grids of one table report under ``out``; returns the
    paths written by kind. The repository's committed ``reports/`` and a tree with
    uncommitted changes: a ValueError unless ``allow_dirty`` (``generated_from``). A run that
    writes several files passes the ``origin`` it checked once, before its first write (its
    own writes into reports/ make the tree differ from its commit)."""
    out = Path(out)
    origin = origin or generated_from(out, allow_dirty)
    stem = f"table{report.table.number}-{report.scale}"
    paths = _table_plots(report, out, stem)
    grids = _copy_grids(report, out) if report.table.compute is None else []
    if grids:
        paths["samples"] = grids[0][1].parent
    figures = [(caption, paths[kind]) for kind, caption in PLOTS if kind in paths]
    tables_dir = out / "tables"
    tables_dir.mkdir(parents=True, exist_ok=True)
    paths["markdown"] = atomic_write_text(
        tables_dir / f"{stem}.md", _markdown_text(report, origin, figures, grids, out)
    )
    paths["latex"] = atomic_write_text(tables_dir / f"{stem}.tex", _latex_text(report, origin))
    return paths


PLOTS = (("curves", "training loss per cell"), ("metrics", "FID / KID per cell"))


def _title(report: TableReport) -> str:
    return f"Table {report.table.number}: {report.table.title}"


def _table_plots(report: TableReport, out: Path, stem: str) -> dict[str, Path]:
    """The training curves and the metrics bars of a trained table (none for a computed one)."""
    if report.table.compute is not None:
        return {}
    paths = {}
    curves = out / "plots" / f"{stem}-curves.png"
    title = f"{_title(report)} — {report.scale}: training loss"
    if plot_curves(report.cells, curves, title) is not None:
        paths["curves"] = curves
    bars = out / "plots" / f"{stem}-metrics.png"
    if (
        plot_metrics(report.cells, bars, f"Table {report.table.number} ({report.scale})")
        is not None
    ):
        paths["metrics"] = bars
    return paths


def _markdown_text(report: TableReport, origin: str, figures, grids, out: Path) -> str:
    def rel(p: Path) -> str:
        return Path("..", p.relative_to(out)).as_posix()

    date = time.strftime("%Y-%m-%d")
    md = [f"# {_title(report)}", "", f"Generated by `sdiff report` on {date} {origin}.  "]
    md += [*[f"{line}  " for line in report.header], ""]
    if report.table.notes:
        md += [f"Notes: {report.table.notes}", ""]
    if report.table.number == 7:
        md += ["## Ours (by scale; not comparable with the literature rows below)", ""]
    md.append(to_markdown(report.frame))
    for caption, frame in report.extra:
        md += [f"## {caption}", "", to_markdown(frame)]
    if figures:
        md += ["## Plots", ""] + [f"![{c}]({rel(p)})" for c, p in figures] + [""]
    if grids:
        md += ["## Sample grids (EMA model, end of training)", ""]
        md += [f"**{c}**  \n![{c}]({rel(p)})\n" for c, p in grids]
    return "\n".join(md)


def _latex_text(report: TableReport, origin: str) -> str:
    number, scale, title = report.table.number, report.scale, _title(report)
    date = time.strftime("%Y-%m-%d")
    caption = f"{title} ({scale} scale; ours beside the paper's)"
    tex = [
        f"% {title} ({scale}); generated by `sdiff report` on {date} {origin}",
        to_latex(report.frame, caption, f"tab:table{number}-{scale}"),
    ]
    for caption, frame in report.extra:
        tex.append(to_latex(frame, caption, f"tab:table{number}-{scale}-{_slug(caption)}"))
    return "\n".join(tex)


def write_index(
    out: str | Path,
    entries: list[tuple[str, dict[str, Path]]],
    extra: list[Path],
    *,
    allow_dirty: bool = False,
    origin: str | None = None,
) -> Path:
    """reports/index.md: every table report, plot and benchmark file under ``out``
    (``allow_dirty``, ``origin``: as for ``write_table_report``)."""
    out = Path(out)
    origin = origin or generated_from(out, allow_dirty)
    lines = [
        "# sdiff reports",
        "",
        f"Generated by `sdiff report --all` on {time.strftime('%Y-%m-%d')} {origin}. Numbers "
        "are ours at the scale named in each table (smoke: CPU, bundled MNIST digits, minutes; "
        "not comparable with the paper's ImageNet numbers).",
        "",
        "## Tables",
        "",
    ]
    for name, paths in entries:
        links = [f"[{k}]({p.relative_to(out).as_posix()})" for k, p in paths.items()]
        lines.append(f"- {name}: " + ", ".join(links))
    lines += ["", "## Benchmarks", ""]
    for p in extra:
        lines.append(f"- [{p.relative_to(out).as_posix()}]({p.relative_to(out).as_posix()})")
    return atomic_write_text(out / "index.md", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdiff report", description=__doc__.split("\n\n")[0])
    p.add_argument("table", nargs="?", help="table number 1-8 or alias (omit with --all)")
    p.add_argument("--all", action="store_true", help="every table found, bench plots, index")
    p.add_argument("--scale", default="smoke", choices=[*SCALES, "all"])
    p.add_argument("--store", nargs="+", action=ExtendList, default=None,
                   help="results stores (files or runner --out folders); default: "
                   "runs/ablate/table<N>-<scale>")  # fmt: skip
    p.add_argument("--runs", default=DEFAULT_ROOT, help="where --all looks for stores")
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--bench", default=None, help="folder holding bench/ and gpu/ CSVs "
                   "(default: --out)")  # fmt: skip
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into the repository's committed reports/ from a tree with "
                   "uncommitted changes (the files say so)")  # fmt: skip
    return p


def report_main(argv: list[str] | None = None) -> int:
    """``sdiff report``: 0 when every report was written; 1 when ``--all`` skipped a table; 2
    for a usage error (a missing or foreign store, an unknown table, cells that differ beyond
    their seed, a dirty tree writing into the committed reports/)."""
    args = build_parser().parse_args(argv)
    if bool(args.table) == bool(args.all):
        print("sdiff report: give a TABLE or --all (not both)", file=sys.stderr)
        return 2
    try:
        # refuse before any work; then every file names this origin (the report's own writes
        # into reports/ would make the tree look dirty to a later check)
        args.origin = generated_from(args.out, args.allow_dirty)
        return _report_all(args) if args.all else _report_tables(args)
    except ValueError as err:
        print(f"sdiff report: {err}", file=sys.stderr)
        return 2


def _report_all(args: argparse.Namespace) -> int:
    """Every table and scale found in the stores, the benchmark plots, the index."""
    from sdiff.ablations import TABLES

    out = Path(args.out)
    stores = [_store_path(s) for s in args.store] if args.store else find_stores(args.runs)
    cells = load_cells(stores) if stores else pd.DataFrame()
    entries, skipped = [], 0
    for number, table in sorted(TABLES.items()):
        for scale in SCALES if args.scale == "all" else [args.scale]:
            if not len(cells) or not ((cells["table"] == number) & (cells["scale"] == scale)).any():
                continue
            try:
                report = build_table_report(table, scale, cells)
            except ValueError as err:  # one table's problem does not stop the others
                print(f"sdiff report: skipped: {err}", file=sys.stderr)
                skipped += 1
                continue
            paths = write_table_report(report, out, origin=args.origin)
            entries.append((f"Table {number} ({table.name}), {scale}", paths))
    extra = bench_plots(args.bench or out, out / "plots")
    for f in ("gpu/README.md", "bench/throughput.csv", "gpu/attention.csv", "gpu/throughput.csv"):
        if (out / f).is_file():
            extra.append(out / f)
    index = write_index(out, entries, extra, origin=args.origin)
    missing = sorted(set(TABLES) - {int(e[0].split()[1]) for e in entries})
    print(f"{len(entries)} table reports, {len(extra)} benchmark files; index: {index.resolve()}")
    if missing:
        print(f"no stores for table(s) {missing} under {args.runs}")
    return 1 if skipped else 0


def _report_tables(args: argparse.Namespace) -> int:
    """One table at one scale (or every scale with a store)."""
    from sdiff.ablations import get_table

    table = get_table(args.table)
    written = []
    for scale in SCALES if args.scale == "all" else [args.scale]:
        stores = args.store or [default_out(table.number, scale)]
        if args.scale == "all" and not args.store and not _store_path(stores[0]).exists():
            continue
        report = build_table_report(table, scale, load_cells(stores))
        paths = write_table_report(report, args.out, origin=args.origin)
        written.append(paths["markdown"])
        print(to_markdown(report.frame))
    if not written:
        raise ValueError(f"no stores found for table {table.number} under {DEFAULT_ROOT}")
    for p in written:
        print(f"report: {p.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(report_main())
