"""Reports: the paper's tables from the results stores, with the paper's numbers beside ours,
plots, sample grids and an index.

    sdiff ablate 2 --scale smoke           # first: the grid, into runs/ablate/table2-smoke
    sdiff report 2                         # -> runs/report/tables/table2-smoke.{md,tex}, plots
    sdiff report 2 --scale gpu --store runs/ablate/table2-gpu
    sdiff report --all                     # every store under runs/ablate, bench plots, index
    sdiff report --all --out reports       # the repository's committed reports/ (clean tree)

Reports go to ``runs/report`` (git-ignored) unless ``--out`` says otherwise; the repository's
committed ``reports/`` folder is written only when named (``--out reports``).

Per table and scale (``tables/table<N>-<scale>.md`` and ``.tex``): the table laid out as the
paper's (its rows, its columns), each entry ours (the mean over the cells that share a row and
column, i.e. several seeds run into the same store or several stores, with the sample standard
deviation and the count when there are more than one) beside the paper's (simple diffusion,
arXiv 2301.11093, where sdiff transcribes it). Every entry of a column has the same number of
decimals; a column whose every entry is a dash (the paper's numbers for Tables 1-6 and 8 are not
transcribed) is left out, and a line under the table says which and why. A column with a
direction (FID, KID: lower is better; IS, training img/s: higher) has an arrow in its header and
its best done value in bold; sizes and costs (parameters, GMACs, memory) have neither. The
header names the scale, the samples and reference images behind each FID, the sampler steps,
the devices, the cells' git SHAs and wall time. LaTeX: booktabs, the table's columns as grouped
headers (``\\multicolumn`` over the metrics, ``\\cmidrule`` under them), shrunk to the column
width when wider (needs ``\\usepackage{booktabs,graphicx}``).

Plots (PNG, ``plots/``): training loss per cell on a log scale, one panel per column of the table
(e.g. per resolution); each metric per cell as bars with their values, coloured by the table's
row. The cells' last sample grids are copied to ``samples/``. Table 7 is a comparison table:
the literature rows as cited in simple diffusion (arXiv 2301.11093) and SiD2 (arXiv
2410.19324), then ours, grouped by scale.

``--all`` also plots the benchmark files under ``--bench`` (default ``reports``: its bench/ and
gpu/ folders): training throughput, MFU and peak memory against resolution per preset, batch
size and compilation; the memory estimate beside the measurement, part by part, against the
80 GiB budget; attention TFLOP/s against sequence length per backend, and relative to the
fastest SDPA backend. It writes ``index.md``: each table's headline and links, the benchmark
summary. ``--all`` with no table report to index is an error (exit 2) and writes nothing.

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
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from sdiff.ablations.grid import SCALES, cell_hash
from sdiff.ablations.runner import DEFAULT_ROOT, default_out, default_scale
from sdiff.ablations.store import STORE_NAME, ResultsStore, StoreError, cell_dir
from sdiff.util import provenance
from sdiff.util.cli_args import ExtendList
from sdiff.util.files import atomic_write_text, atomic_write_with
from sdiff.util.tables import markdown_table

__all__ = [
    "METRICS",
    "Column",
    "Entry",
    "Metric",
    "PrintedTable",
    "TableReport",
    "bench_plots",
    "build_table_report",
    "committed_reports",
    "find_stores",
    "fmt_cell",
    "fmt_number",
    "generated_from",
    "load_cells",
    "plot_attention",
    "plot_curves",
    "plot_memory",
    "plot_metrics",
    "plot_throughput",
    "print_table",
    "report_main",
    "to_latex",
    "to_markdown",
    "write_index",
    "write_table_report",
]

DEFAULT_OUT = "runs/report"  # git-ignored; the committed reports/ only when --out names it
DEFAULT_BENCH = "reports"  # the committed benchmark files: reports/bench, reports/gpu
DASH = "–"


@dataclass(frozen=True)
class Metric:
    """How a metric is printed and plotted: its label, which way is better, its unit."""

    label: str
    better: str | None = None  # "lower", "higher", or None: no direction (sizes, costs)
    scale: float = 1.0  # printed value = stored value * scale (parameters in millions)

    @property
    def arrow(self) -> str:
        return {"lower": "↓", "higher": "↑"}.get(self.better or "", "")

    @property
    def axis_label(self) -> str:
        """A plot's y label: "FID (lower is better)"."""
        return f"{self.label} ({self.better} is better)" if self.better else self.label


METRICS = {
    "fid": Metric("FID", "lower"),
    "kid_mean": Metric("KID", "lower"),
    "isc_mean": Metric("IS", "higher"),
    "fid_train": Metric("FID train", "lower"),
    "fid_eval": Metric("FID eval", "lower"),
    "isc": Metric("IS", "higher"),
    "train_img_s": Metric("train img/s", "higher"),
    "final_loss": Metric("final loss", "lower"),
    "params": Metric("params (M)", scale=1e-6),
    "gmacs": Metric("GMACs"),
    "kernel_mib": Metric("kernel MiB"),
    "feature_gib": Metric("feature map GiB"),
    "ratio": Metric("feature / kernel"),
}


def metric_info(key: str) -> Metric:
    """The ``Metric`` of a metric key; ``kernel_mib@16`` (Table 1, per level) is ``kernel_mib``;
    an unknown key prints as it is, with no direction."""
    base = key.split("@")[0]
    return METRICS.get(base, Metric(base))


def heading(metric: str, suffix: str = "") -> str:
    """A column header: the metric's label, its arrow, and e.g. "(ours)"."""
    m = metric_info(metric)
    return " ".join(part for part in (m.label, m.arrow, suffix) if part)


# --------------------------------------------------------------------------------------------
# Numbers


def column_decimals(values: Iterable[float], significant: int = 3, most: int = 4) -> int:
    """Decimals that give the column's smallest nonzero magnitude ``significant`` figures (at
    most ``most``): 94.3 and 292.0 -> 1; 0.0753 -> 4; 9.5 and 10.2 -> 2. Every entry of a
    column is printed with these, so that the column reads as one."""
    nonzero = [abs(v) for v in values if v and math.isfinite(v)]
    if not nonzero:
        return 0
    exponent = math.floor(math.log10(min(nonzero)))
    return min(most, max(0, significant - 1 - exponent))


def exact_decimals(values: Iterable[float], most: int = 4) -> int:
    """Decimals that print transcribed numbers as given (2.77 -> 2, 211.8 -> 1): the paper's
    digits are neither cut nor padded beyond the longest one."""
    found = [len(f"{v:.{most}f}".rstrip("0").partition(".")[2]) for v in values]
    return max(found, default=0)


def _finite(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if math.isfinite(v):
            out.append(v)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def fmt_number(metric: str, value: float | None, decimals: int | None = None) -> str:
    """One value in the metric's unit with ``decimals`` (default: three significant figures);
    a dash for none."""
    if value is None or not math.isfinite(float(value)):
        return DASH
    value = float(value) * metric_info(metric).scale
    if decimals is None:
        decimals = column_decimals([value])
    return f"{value:.{decimals}f}"


def fmt_cell(metric: str, values: Sequence[float], decimals: int | None = None) -> str:
    """One value as it is; several as mean ± sample std (n), both with the same decimals
    (default: three significant figures of the mean)."""
    vals = _finite(values)
    if not vals:
        return DASH
    if len(vals) == 1:
        return fmt_number(metric, vals[0], decimals)
    mean, std = _mean_std(vals)
    if decimals is None:
        decimals = column_decimals([mean * metric_info(metric).scale])
    shown = (fmt_number(metric, x, decimals) for x in (mean, std))
    return "{} ± {} (n={})".format(*shown, len(vals))


# --------------------------------------------------------------------------------------------
# Printed tables: what a report table holds before it is markdown or LaTeX


@dataclass(frozen=True)
class Column:
    """One column as printed: ``heading`` under ``group`` (the paper table's column, e.g.
    "32 px"; "" when the table has one), and how its entries are printed."""

    heading: str
    group: str = ""
    metric: str | None = None  # decides decimals, unit and direction; None: a text column
    transcribed: bool = False  # the paper's or the literature's numbers, printed as given

    @property
    def name(self) -> str:
        """The flat name (a DataFrame column, a markdown header)."""
        return f"{self.group}: {self.heading}" if self.group else self.heading


@dataclass
class Entry:
    """One entry: the values of its done cells (several: seeds), what is not done, or a text."""

    values: list[float] = field(default_factory=list)
    note: str = ""  # "1 failed", "not run"
    text: str | None = None  # a text column's entry

    @property
    def mean(self) -> float | None:
        vals = _finite(self.values)
        return _mean_std(vals)[0] if vals else None


@dataclass
class PrintedTable:
    """A table as it is printed: string entries, the best entry of each column with a
    direction, and the columns left out because every entry was a dash."""

    frame: pd.DataFrame  # strings, columns named by Column.name, rows by their labels
    columns: list[Column]  # the printed columns, in order
    best: pd.DataFrame  # bool, the frame's shape: the column's best done value
    dropped: list[tuple[Column, str]] = field(default_factory=list)  # (column, why)

    @classmethod
    def plain(cls, frame: pd.DataFrame) -> PrintedTable:
        """A frame of strings as it is: no groups, nothing marked."""
        frame = frame.astype(str)
        best = pd.DataFrame(False, index=frame.index, columns=frame.columns)
        return cls(frame, [Column(str(c)) for c in frame.columns], best)

    @property
    def notes(self) -> list[str]:
        """The lines under the table: what was left out and why, and what bold means."""
        lines = []
        if self.dropped:
            lines.append(f"Not shown, as every entry is a dash: {_dropped_text(self.dropped)}.")
        if self.best.to_numpy().any():
            lines.append("Bold: each column's best value (↓ lower is better, ↑ higher is better).")
        return lines


def _dropped_text(dropped: list[tuple[Column, str]]) -> str:
    """Which columns were left out, by why: "FID (paper), KID (paper) under 32 px and 64 px
    (the paper's numbers for this table are not transcribed in sdiff)"."""
    by_reason: dict[str, list[Column]] = {}
    for column, why in dropped:
        by_reason.setdefault(why, []).append(column)
    parts = []
    for why, cols in by_reason.items():
        headings = list(dict.fromkeys(c.heading for c in cols))
        groups = list(dict.fromkeys(c.group for c in cols))
        if {(c.group, c.heading) for c in cols} == set(itertools.product(groups, headings)):
            text = ", ".join(headings)  # every heading under every group: say each once
            if any(groups):
                text += " under " + _and(groups)
        else:
            text = ", ".join(c.name for c in cols)
        parts.append(f"{text} ({why})")
    return "; ".join(parts)


def _and(words: Sequence[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _entry_text(column: Column, entry: Entry, decimals: int) -> str:
    if column.metric is None:
        return DASH if entry.text in (None, "") else str(entry.text)
    value = fmt_cell(column.metric, entry.values, decimals) if _finite(entry.values) else ""
    if value and entry.note:
        return f"{value} ({entry.note})"
    return value or entry.note or DASH


def _best_rows(column: Column, entries: list[Entry]) -> list[bool]:
    """True for the entries holding the column's best mean (several when tied): numbers
    compared as numbers, entries without a done value left out, nothing with fewer than two."""
    better = metric_info(column.metric).better if column.metric else None
    means = [e.mean for e in entries]
    known = [m for m in means if m is not None]
    if better is None or len(known) < 2:
        return [False] * len(entries)
    target = min(known) if better == "lower" else max(known)
    return [m is not None and m == target for m in means]


def print_table(
    rows: Sequence[str],
    data: dict[Column, list[Entry]],
    index_name: str = "",
    *,
    mark_best: bool = True,
    dash_reasons: dict[bool, str] | None = None,
) -> PrintedTable:
    """The printed table of ``data`` ({column: one entry per row}): every entry of a column with
    the same decimals (the smallest magnitude to three significant figures; transcribed
    numbers with their own digits), all-dash columns left out (``dash_reasons``: why, for
    transcribed and for measured columns), the best of each column with a direction marked
    (unless ``mark_best`` is False)."""
    reasons = {True: "not transcribed in sdiff", False: "no cell has this metric"}
    reasons.update(dash_reasons or {})
    texts: dict[str, list[str]] = {}
    best: dict[str, list[bool]] = {}
    columns, dropped = [], []
    for column, entries in data.items():
        if len(entries) != len(rows):
            raise ValueError(f"column {column.name}: {len(entries)} entries for {len(rows)} rows")
        scale = metric_info(column.metric).scale if column.metric else 1.0
        means = [m * scale for m in (e.mean for e in entries) if m is not None]
        if column.transcribed:
            decimals = exact_decimals(means)
        else:
            decimals = column_decimals(means)
        shown = [_entry_text(column, e, decimals) for e in entries]
        if all(s == DASH for s in shown):
            dropped.append((column, reasons[column.transcribed]))
            continue
        columns.append(column)
        texts[column.name] = shown
        best[column.name] = _best_rows(column, entries) if mark_best else [False] * len(rows)
    index = pd.Index(list(rows), name=index_name or None)
    names = [c.name for c in columns]
    frame = pd.DataFrame(texts, index=index, columns=names, dtype=object)
    return PrintedTable(frame, columns, pd.DataFrame(best, index, names, dtype=bool), dropped)


def _as_printed(table: PrintedTable | pd.DataFrame) -> PrintedTable:
    return table if isinstance(table, PrintedTable) else PrintedTable.plain(table)


def to_markdown(table: PrintedTable | pd.DataFrame, index_name: str = "") -> str:
    """A pipe table (index as the first column): the best entries in bold, number columns
    right-aligned. The notes under the table are the caller's (``PrintedTable.notes``)."""
    t = _as_printed(table)
    columns = [index_name or (t.frame.index.name or ""), *(c.name for c in t.columns)]
    rows = []
    for label, values, marks in zip(
        t.frame.index, t.frame.itertuples(index=False), t.best.itertuples(index=False), strict=True
    ):
        rows.append([label, *(f"**{v}**" if b else v for v, b in zip(values, marks, strict=True))])
    right = [i + 1 for i, c in enumerate(t.columns) if c.metric is not None]
    return markdown_table(columns, rows, right=right)


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
    "—": "---",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "×": r"$\times$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _latex_group_rows(columns: list[Column]) -> list[str]:
    """The grouped header above the metric headings: each run of columns of one group under a
    ``\\multicolumn``, ruled by a ``\\cmidrule`` (none under an empty group)."""
    cells, rules, start = [""], [], 2  # column 1 is the row labels
    for group, run in itertools.groupby(c.group for c in columns):
        span = len(list(run))
        cells.append(rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(group)}}}")
        if group:
            rules.append(rf"\cmidrule(lr){{{start}-{start + span - 1}}}")
        start += span
    return [" & ".join(cells) + r" \\", " ".join(rules)]


def to_latex(
    table: PrintedTable | pd.DataFrame, caption: str, label: str, index_name: str = ""
) -> str:
    """A booktabs table (escaped): grouped headers when the columns have groups, the best
    entries in ``\\textbf``, the notes in small type under it; ``\\small`` and shrunk to
    ``\\columnwidth`` when wider (never enlarged)."""
    t = _as_printed(table)
    spec = "l" + "".join("r" if c.metric is not None else "l" for c in t.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\label{{{label}}}",
        r"% wider than the column: shrunk to \columnwidth; narrower: as it is",
        r"\resizebox{\ifdim\width>\columnwidth\columnwidth\else\width\fi}{!}{%",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
    ]
    if any(c.group for c in t.columns):
        lines += _latex_group_rows(t.columns)
    header = [index_name or (t.frame.index.name or ""), *(c.heading for c in t.columns)]
    lines += [" & ".join(latex_escape(h) for h in header) + r" \\", r"\midrule"]
    for label_, values, marks in zip(
        t.frame.index, t.frame.itertuples(index=False), t.best.itertuples(index=False), strict=True
    ):
        cells = [latex_escape(label_)]
        for v, b in zip(values, marks, strict=True):
            cells.append(rf"\textbf{{{latex_escape(v)}}}" if b else latex_escape(v))
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}%", "}"]
    if t.notes:
        lines.append(r"\par\smallskip{\footnotesize " + latex_escape(" ".join(t.notes)) + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


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
    """The store file of a runner's folder (or of a folder not made yet), or the file given."""
    p = Path(path)
    folder = p.is_dir() or (not p.exists() and not p.suffix)
    return p / STORE_NAME if folder else p


def find_stores(runs_dir: str | Path) -> list[Path]:
    """Every results store under ``runs_dir`` (``*/results.sqlite``, one level down, and
    ``runs_dir/results.sqlite`` itself), sorted."""
    root = Path(runs_dir)
    found = sorted(root.glob(f"*/{STORE_NAME}"))
    if (root / STORE_NAME).exists():
        found.insert(0, root / STORE_NAME)
    return found


def _missing_store_hint(path: Path) -> str:
    """What makes the store ``sdiff report`` looked for at ``path``: for a runner's default
    folder (``runs/ablate/table<N>-<scale>``) the exact ``sdiff ablate`` command."""
    folder = path.parent
    found = re.fullmatch(r"table(\d+)-([A-Za-z0-9_]+)", folder.name)
    if found:
        number, scale = int(found[1]), found[2]
        command = f"sdiff ablate {number} --scale {scale}"
        if folder != default_out(number, scale):
            command += f" --out {folder}"
        return f"run `{command}` first, or pass --store FOLDER naming a store written elsewhere"
    return (
        "pass --store FOLDER naming the folder `sdiff ablate N --scale SCALE --out FOLDER` "
        f"wrote (without --out it writes {DEFAULT_ROOT}/table<N>-<scale>, where `sdiff report "
        "N --scale SCALE` looks by default)"
    )


def load_cells(stores: Iterable[str | Path]) -> pd.DataFrame:
    """All cells of the given stores as one DataFrame: table, scale, row, column, status,
    the metrics (one column each, ``m.<name>``), seed, eval settings, device, git SHA, wall
    time, the store and the cell's run folder. A missing, corrupt or incompatible store raises
    a ValueError naming it and the command that makes it (nothing is created or changed)."""
    records: list[dict[str, Any]] = []
    for given in stores:
        path = _store_path(given)
        if not path.is_file():
            raise ValueError(f"no results store at {path}: {_missing_store_hint(path)}")
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
                "grid": r.get("grid") or f"table{r['table_number']}",
                "axes": r.get("axes") or {},
                "source": r.get("source"),
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
                f"{_what(table)} at {scale}, cell {row} / {column}: the stores hold cells "
                f"that differ in more than the seed ({group['variant'].nunique()} configs; "
                f"stores {stores}); report them separately (--store) or keep only seeds apart"
            )


# --------------------------------------------------------------------------------------------
# One table


@dataclass
class TableReport:
    table: Any  # sdiff.ablations.grid.Table
    scale: str
    cells: pd.DataFrame  # this table and scale only
    printed: PrintedTable  # the paper-layout table
    header: list[str]  # lines of provenance
    extra: list[tuple[str, PrintedTable]]  # further tables (Table 7's literature)

    @property
    def frame(self) -> pd.DataFrame:
        """The paper-layout table's entries (strings, as printed, without the bold marks)."""
        return self.printed.frame


PAPER_DASHES = "the paper's numbers for this table are not transcribed in sdiff"


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


def _ours(metric: str, here: pd.DataFrame) -> Entry:
    """One of our entries: the metric over the done cells of ``here``, and what is not done."""
    done = here[here["status"] == "done"]
    note = (_status_note(here) if len(here) else "not run") or ""
    return Entry(_metric_values(done, metric), note)


def _paper(value: float | None) -> Entry:
    return Entry([] if value is None else [float(value)])


def _grid_table(table, scale: str, cells: pd.DataFrame) -> PrintedTable:
    """Rows = the table's rows; for each column of the table (a header group when there are
    several) and each metric: ours, the paper's."""
    s = table.scale(scale)
    data: dict[Column, list[Entry]] = {}
    for col in s.columns:
        group = col.title if len(s.columns) > 1 else ""
        for metric in table.metrics:
            ours = Column(heading(metric, "(ours)"), group, metric)
            paper = Column(heading(metric, "(paper)"), group, metric, transcribed=True)
            for row in s.rows:
                here = cells[(cells["row"] == row.name) & (cells["column"] == col.name)]
                data.setdefault(ours, []).append(_ours(metric, here))
                data.setdefault(paper, []).append(
                    _paper(_paper_value(table, row.name, col.name, metric))
                )
    return print_table(
        [row.title for row in s.rows], data, "row", dash_reasons={True: PAPER_DASHES}
    )


def _per_side_table(table, scale: str, cells: pd.DataFrame) -> PrintedTable:
    """Table 1's layout: one row per (model, side), metrics as columns."""
    s = table.scale(scale)
    labels: list[str] = []
    data: dict[Column, list[Entry]] = {}
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
            labels.append(f"{row.title}, {side}x{side}")
            for metric in table.metrics:
                key = f"{metric}@{side}"
                ours = Column(heading(metric, "(ours)"), metric=metric)
                paper = Column(heading(metric, "(paper)"), metric=metric, transcribed=True)
                data.setdefault(ours, []).append(Entry(_metric_values(here, key)))
                data.setdefault(paper, []).append(Entry())
    return print_table(labels, data, "level", dash_reasons={True: PAPER_DASHES})


LITERATURE_SOURCE = (
    "as cited in simple diffusion (arXiv 2301.11093), Table 7, and SiD2 (arXiv 2410.19324)"
)


def _literature_table(table) -> PrintedTable:
    """Table 7's literature rows, their numbers as cited (a dash where the source has none)."""
    metrics = list(dict.fromkeys(k for values in table.paper.values() for k in values))
    labels = [f"{name}, {res} px" for name, res in table.paper]
    data: dict[Column, list[Entry]] = {}
    for metric in metrics:
        column = Column(heading(metric), metric=metric, transcribed=True)
        data[column] = [_paper(values.get(metric)) for values in table.paper.values()]
    data[Column("scale")] = [Entry(text="literature") for _ in labels]
    return print_table(labels, data, "model")


def _ours_table(table, cells: pd.DataFrame) -> PrintedTable:
    """Table 7: our rows, whatever scales were run, labelled with their scale. No best marks:
    rows of different scales do not compare."""
    labels: list[str] = []
    records: list[dict[str, Entry]] = []
    for scale in (s for s in SCALES if s in table.scales):
        s = table.scales[scale]
        at_scale = cells[cells["scale"] == scale]
        for row in s.rows:
            for col in s.columns:
                here = at_scale[(at_scale["row"] == row.name) & (at_scale["column"] == col.name)]
                if len(here):
                    labels.append(row.title if len(s.columns) == 1 else f"{row.title}, {col.title}")
                    records.append(_ours_row(scale, here))
    columns = [
        Column(heading("fid", "(ours, vs train)"), metric="fid"),
        Column(heading("kid_mean"), metric="kid_mean"),
        Column(heading("isc_mean"), metric="isc_mean"),
        *(Column(name) for name in ("scale", "samples", "guidance w", "status")),
    ]
    keys = ["fid", "kid_mean", "isc_mean", "scale", "samples", "guidance w", "status"]
    data = {c: [r[k] for r in records] for c, k in zip(columns, keys, strict=True)}
    return print_table(labels, data, "model", mark_best=False)


def _ours_row(scale: str, here: pd.DataFrame) -> dict[str, Entry]:
    """Table 7: one of our rows (the cells of one row and column at one scale)."""
    done = here[here["status"] == "done"]
    n = done["eval_n"].dropna().astype(int).unique().tolist()
    guidance = done["guidance"].dropna()
    return {
        "fid": Entry(_metric_values(done, "fid")),
        "kid_mean": Entry(_metric_values(done, "kid_mean")),
        "isc_mean": Entry(_metric_values(done, "isc_mean")),
        "scale": Entry(text=scale),
        "samples": Entry(text=", ".join(str(x) for x in n)),
        "guidance w": Entry(text=f"{guidance.max():g}" if len(guidance) else None),
        "status": Entry(text=_status_note(here) or "done"),
    }


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
    cached = done[done["source"].notna()] if "source" in done.columns else done.iloc[:0]
    if len(cached):
        sources = sorted({_shown_path(Path(s).parent) for s in cached["source"]})
        lines.append(
            f"From the cell cache: {len(cached)} of the {len(done)} done cells were run for "
            f"another grid and taken from its store ({', '.join(sources)}); their run folders "
            "are links to that grid's."
        )
    if scale == "smoke" and table.compute is None and len(done):
        lines.append(_smoke_line(done))
    return lines


def _shown_path(path: Path) -> str:
    """``path`` relative to the working folder when under it (runs/ablate/...), else as is."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


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
        f"Seeds: {join(map(str, _distinct(done, 'seed')))}; with several, an entry shows mean ± "
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


def _what(table) -> str:
    """ "table 2", or "grid shift-resolution"."""
    return f"table {table.number}" if table.number else f"grid {table.name}"


def _ablate_name(table) -> str:
    """How ``sdiff ablate`` names ``table``: its number, a shipped grid's name, or its file."""
    if table.number:
        return str(table.number)
    from sdiff.ablations import EXTRA_GRIDS

    return table.name if table.name in EXTRA_GRIDS else (table.source or table.name)


def _fold_axes(table, scale: str, cells: pd.DataFrame):
    """A grid with extra axes reported as rows x (columns x axis values): the table with those
    combined columns, and the cells with their ``column`` renamed to match."""
    s = table.scale(scale)
    if not s.axes:
        return table, cells
    columns = []
    for col in s.columns:
        for values in itertools.product(*(v for _, v in s.axes)):
            pairs = list(zip(s.axes, values, strict=True))
            name = "/".join([col.name, *(f"{a}={v.name}" for (a, _), v in pairs)])
            title = ", ".join(
                ([col.title] if col.name != "all" else [])
                + [f"{a} {v.title}" for (a, _), v in pairs]
            )  # fmt: skip
            columns.append(replace(col, name=name, label=title))
    folded = replace(table, scales={**table.scales, scale: replace(s, columns=tuple(columns),
                                                                   axes=())})  # fmt: skip
    cells = cells.copy()
    if len(cells):
        cells["column"] = [
            "/".join([c, *(f"{a}={(ax or {}).get(a)}" for a, _ in s.axes)])
            for c, ax in zip(cells["column"], cells["axes"], strict=True)
        ]
    return folded, cells


def build_table_report(table, scale: str, cells: pd.DataFrame) -> TableReport:
    """The report of ``table`` (a paper table or a grid) at ``scale`` from ``cells``
    (load_cells' frame, any tables)."""
    table.scale(scale)  # raises for an unknown scale
    if len(cells):
        mine = cells[(cells["grid"] == table.slug) & (cells["scale"] == scale)]
    else:
        mine = cells
    if not len(mine):
        raise ValueError(
            f"no cells of {_what(table)} ({table.name}) at the {scale} scale in the given "
            f"stores: run `sdiff ablate {_ablate_name(table)} --scale {scale}` first"
        )
    table, mine = _fold_axes(table, scale, mine)
    _check_variants(table, scale, mine)
    extra: list[tuple[str, PrintedTable]] = []
    if table.number == 7:
        printed = _ours_table(table, cells[cells["grid"] == "table7"])
        literature = f"Literature ({LITERATURE_SOURCE}; not run here)"
        extra.append((literature, _literature_table(table)))
    elif table.compute is not None:
        printed = _per_side_table(table, scale, mine)
    else:
        printed = _grid_table(table, scale, mine)
    return TableReport(table, scale, mine, printed, _header(table, scale, mine), extra)


# --------------------------------------------------------------------------------------------
# Plots of a table


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layout(cells: pd.DataFrame, table=None, scale: str | None = None):
    """The rows and columns to plot as (name, title) pairs, in the table's order with its
    labels (``Axis.title``); without a table, the cells' own names in the order met."""
    if table is not None:
        s = table.scale(scale)
        return [(r.name, r.title) for r in s.rows], [(c.name, c.title) for c in s.columns]
    rows = list(dict.fromkeys(cells["row"])) if len(cells) else []
    columns = list(dict.fromkeys(cells["column"])) if len(cells) else []
    return [(r, r) for r in rows], [(c, c) for c in columns]


def _read_curve(run_dir: str) -> tuple[list[float], list[float]]:
    """(images seen, loss) from a cell's metrics.csv; empty when it has none."""
    f = Path(run_dir) / "metrics.csv"
    if not f.is_file():
        return [], []
    with open(f, newline="") as fh:
        rows = [q for q in csv.DictReader(fh) if q.get("loss") not in (None, "")]
    return [float(q["images"]) for q in rows], [float(q["loss"]) for q in rows]


def plot_curves(cells: pd.DataFrame, path: str | Path, title: str, table=None, scale=None):
    """Training loss against images seen on a log y axis: one panel per column of the table
    (e.g. per resolution), one line per cell, coloured by the table's row (a seed per line
    style). Returns the figure (closed after saving) or None when no cell has a curve."""
    plt = _plt()
    rows, columns = _layout(cells, table, scale)
    curves = {}  # (column, row) -> [(seed, x, y)]
    for _, r in cells.iterrows():
        x, y = _read_curve(r["run_dir"])
        if x:
            seed = None if pd.isna(r["seed"]) else int(r["seed"])
            curves.setdefault((r["column"], r["row"]), []).append((seed, x, y))
    panels = [(name, t) for name, t in columns if any(k[0] == name for k in curves)]
    if not panels:
        return None
    seeds = sorted({s for drawn in curves.values() for s, _, _ in drawn}, key=str)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False, sharey=True
    )
    for ax, (col, col_title) in zip(axes[0], panels, strict=True):
        for i, (row, row_title) in enumerate(rows):
            for seed, x, y in curves.get((col, row), []):
                label = row_title + (f" (seed {seed})" if len(seeds) > 1 else "")
                style = ("-", "--", ":", "-.")[seeds.index(seed) % 4]
                ax.plot(x, y, marker="o", ms=3, color=f"C{i}", ls=style, label=label)
        _log_y(ax)
        ax.set_title("training loss" + ("" if col == "all" else f", {col_title}"), fontsize=10)
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss (mean over each logging interval, log scale)")
    fig.suptitle(title, fontsize=10)
    _save(fig, Path(path))
    return fig


def _bar_values(done: pd.DataFrame, metric: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(row, column) -> (mean, error bar) of the metric over the done cells: the sample std
    over seeds, or for one seed the KID's own subset std (0 for other metrics)."""
    info = metric_info(metric)
    bars = {}
    for (row, col), here in done.groupby(["row", "column"], sort=False):
        vals = [v * info.scale for v in _metric_values(here, metric)]
        if not vals:
            continue
        mean, std = _mean_std(vals)
        if len(vals) == 1 and metric == "kid_mean":
            std = (_metric_values(here, "kid_std") or [0.0])[0]
        bars[(row, col)] = (mean, std)
    return bars


def plot_metrics(
    cells: pd.DataFrame,
    path: str | Path,
    title: str,
    metrics: Sequence[str] | None = None,
    table=None,
    scale=None,
):
    """Each metric per cell as bars with their values written on them: one panel per metric
    (y label with its direction), bars grouped by the table's column, coloured by its row
    (the legend names the rows by their labels; a cell without a done value is marked "not
    done"); the mean over seeds with their sample std as error bar, or the KID's subset std
    for one seed. ``metrics``: default the table's (FID and KID without a table). Returns the
    figure (closed after saving) or None when no cell has these metrics."""
    plt = _plt()
    done = cells[cells["status"] == "done"] if len(cells) else cells
    wanted = metrics or (table.metrics if table is not None else ("fid", "kid_mean"))
    present = [m for m in wanted if _metric_values(done, m)]
    if not present:
        return None
    rows, columns = _layout(cells, table, scale)
    run = set(zip(cells["row"], cells["column"], strict=True))
    fig, axes = plt.subplots(1, len(present), figsize=(4.4 * len(present), 4.2), squeeze=False)
    width = 0.8 / max(1, len(rows))
    for ax, metric in zip(axes[0], present, strict=True):
        values = _bar_values(done, metric)
        decimals = column_decimals([m for m, _ in values.values()])
        for i, (row, _) in enumerate(rows):
            for j, (col, _) in enumerate(columns):
                x = j + (i - (len(rows) - 1) / 2) * width
                if (row, col) not in values:
                    if (row, col) in run:
                        ax.text(x, 0, "not done", rotation=90, ha="center", va="bottom",
                                fontsize=7, color="0.4")  # fmt: skip
                    continue
                mean, err = values[(row, col)]
                bar = ax.bar(x, mean, width=width * 0.95, color=f"C{i}",
                             yerr=err if err > 0 else None, capsize=3)  # fmt: skip
                ax.bar_label(bar, labels=[f"{mean:.{decimals}f}"], fontsize=7)
        ax.set_xlim(-0.5, len(columns) - 0.5)  # room for the "not done" marks too
        if len(columns) > 1:
            ax.set_xticks(range(len(columns)), [t for _, t in columns], fontsize=8)
        else:
            ax.set_xticks([])
        ax.set_ylabel(metric_info(metric).axis_label)
        ax.set_title(metric_info(metric).label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(rows))]
    fig.legend(handles, [t for _, t in rows], loc="lower center", ncol=min(3, len(rows)),
               fontsize=8, frameon=False)  # fmt: skip
    fig.suptitle(f"{title}\nerror bars: sample std over seeds (one seed: the KID's subset std)",
                 fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(rows) - 1) // 3), 1, 1))
    _save(fig, Path(path), tight=False)
    return fig


def _log_y(ax) -> None:
    """A log y axis labelled with plain numbers at 1, 2, 5 x powers of ten."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


# --------------------------------------------------------------------------------------------
# Plots of the benchmarks


def _read_csvs(paths: Iterable[Path]) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in paths if Path(p).is_file() and Path(p).stat().st_size]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _memory_files(bench: Path) -> list[Path]:
    """The memory estimates with their measurements (``sdiff bench memory --measure --json``)."""
    return sorted([*bench.glob("gpu/memory*.json"), *bench.glob("bench/memory*.json")])


def _memory_records(bench: Path) -> list[dict[str, Any]]:
    records = []
    for f in _memory_files(bench):
        data = json.loads(f.read_text())
        records += data if isinstance(data, list) else [data]
    return [r for r in records if isinstance(r, dict) and "weights" in r]


def bench_plots(bench: str | Path, out: str | Path) -> list[Path]:
    """Plots of the benchmark files under ``bench`` (its bench/ and gpu/ folders): throughput,
    MFU and peak memory of training against resolution (``throughput.csv``), the memory
    estimate beside its measurement (``memory*.json``), attention TFLOP/s per backend
    (``attention.csv``). Returns the files written."""
    bench, out = Path(bench), Path(out)
    written: list[Path] = []
    tp = _read_csvs([bench / "bench" / "throughput.csv", bench / "gpu" / "throughput.csv"])
    if len(tp) and "train_img_s" in tp.columns:
        tp = tp[(tp["status"] == "ok") & tp["train_img_s"].notna()].copy()
        if len(tp):
            tp["compiled"] = tp["compiled"].astype(str).str.lower().isin(["true", "1"])
            written.append(plot_throughput(tp, out / "bench-throughput.png")[0])
    records = _memory_records(bench)
    if records:
        written.append(plot_memory(records, out / "bench-memory.png")[0])
    at = _read_csvs([bench / "gpu" / "attention.csv"])
    if len(at) and "tflops" in at.columns:
        at = at[at["status"] == "ok"]
        if len(at):
            written.append(plot_attention(at, out / "bench-attention.png")[0])
    return written


THROUGHPUT_PANELS = (
    ("train_img_s", "training throughput, img/s\n(higher is better; log scale)", 1.0),
    ("mfu", "MFU, % of the device's peak\n(higher is better)", 100.0),
    ("peak_mem_gib", "peak memory of a training step, GiB", 1.0),
)


def _pow2_ticks(ax, values: Iterable[float]) -> None:
    """A log-2 x axis labelled with the values themselves (256, 1024), not 2^8, 2^10."""
    ticks = sorted({int(v) for v in values})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
    ax.minorticks_off()


def plot_throughput(rows: pd.DataFrame, path: Path):
    """Against resolution, one column of panels per device: training img/s, MFU (where an
    ``mfu`` column has values) and peak memory (where recorded). Colour: preset and attention
    backend; marker: batch size; compiled: open marker and dashed line, eager: filled marker
    and solid line (so that a single point shows it too). Returns (path, figure)."""
    plt = _plt()
    from matplotlib.lines import Line2D

    devices = sorted({str(d) for d in rows["device"]})
    panels = [p for p in THROUGHPUT_PANELS if p[0] in rows.columns and rows[p[0]].notna().any()]
    kinds = sorted({_preset_label(r) for _, r in rows.iterrows()})
    batches = sorted({int(b) for b in rows["batch"]})
    markers = dict(zip(batches, itertools.cycle("osD^v<>p*"), strict=False))
    fig, axes = plt.subplots(
        len(panels), len(devices), figsize=(5.0 * len(devices) + 2.4, 3.2 * len(panels)),
        squeeze=False,
    )  # fmt: skip
    for j, dev in enumerate(devices):
        on_device = rows[rows["device"].astype(str) == dev]
        for i, (what, ylabel, factor) in enumerate(panels):
            ax = axes[i][j]
            have = on_device[on_device[what].notna()]
            if not len(have):
                ax.text(0.5, 0.5, f"no {what} recorded on this device", ha="center",
                        va="center", transform=ax.transAxes, fontsize=8, color="0.4")  # fmt: skip
                ax.set_xticks([])
                ax.set_yticks([])
            keys = ["preset", "backend", "batch", "compiled"]
            for (preset, backend, batch, compiled), g in have.groupby(keys, sort=True):
                g = g.sort_values("resolution").drop_duplicates("resolution", keep="last")
                colour = f"C{kinds.index(_preset_label({'preset': preset, 'backend': backend}))}"
                style = {"ls": "--", "mfc": "white"} if compiled else {"ls": "-", "mfc": colour}
                ax.plot(g["resolution"], g[what] * factor, color=colour,
                        marker=markers[int(batch)], **style)  # fmt: skip
            if len(have):
                _pow2_ticks(ax, have["resolution"])
                if what == "train_img_s":
                    _log_y(ax)
                ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(dev, fontsize=9)
            if i == len(panels) - 1:
                ax.set_xlabel("resolution (px)")
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    handles = [Line2D([], [], color=f"C{k}", lw=2, label=kind) for k, kind in enumerate(kinds)]
    handles += [Line2D([], [], color="0.3", marker=m, ls="", label=f"batch {b}")
                for b, m in markers.items()]  # fmt: skip
    handles += [Line2D([], [], color="0.3", marker="o", ls="-", label="eager"),
                Line2D([], [], color="0.3", marker="o", mfc="white", ls="--",
                       label="compiled (torch.compile)")]  # fmt: skip
    fig.legend(handles=handles, loc="center right", fontsize=7, frameon=False)
    fig.suptitle("training throughput per preset, batch size and compilation", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.3 / (5.0 * len(devices) + 2.4), 1))
    return _save(fig, path, tight=False), fig


def _preset_label(r) -> str:
    backend = str(r["backend"])
    return str(r["preset"]) + ("" if backend == "auto" else f" ({backend} attention)")


GIB = 2**30
ESTIMATE_PARTS = (
    ("weights", "weights"),
    ("gradients", "gradients"),
    ("optimizer", "optimizer (Adam)"),
    ("ema", "EMA"),
    ("activations", "activations"),
)


def _memory_bars(r: dict[str, Any]) -> list[tuple[str, list[tuple[str, float]]]]:
    """(bar, [(part, GiB)]) for one record: the estimate's parts summing to its peak, and the
    measurement's, which records the model state as one number."""
    estimate = [(label, r[key] / GIB) for key, label in ESTIMATE_PARTS if key in r]
    rest = (r.get("peak", 0) - sum(r[key] for key, _ in ESTIMATE_PARTS if key in r)) / GIB
    if rest > 0:
        estimate.append((f"more at the peak ({r.get('peak_phase', '?')})", rest))
    bars = [("estimate", estimate)]
    m = r.get("measured")
    if m and m.get("peak"):
        static, end = m.get("static", 0), m.get("forward_end", m["peak"])
        bars.append((
            "measured",
            [("model state, not split (weights + gradients + optimizer + EMA)", static / GIB),
             ("activations", (end - static) / GIB),
             ("more at the peak", (m["peak"] - end) / GIB)],
        ))  # fmt: skip
    return bars


MEMORY_COLOURS = {
    "weights": "C0",
    "gradients": "C1",
    "optimizer (Adam)": "C2",
    "EMA": "C3",
    "activations": "C4",
    "model state, not split (weights + gradients + optimizer + EMA)": "0.55",
}


def plot_memory(records: list[dict[str, Any]], path: Path):
    """Peak training memory, estimated beside measured, as stacked parts (weights, gradients,
    optimizer, EMA, activations; the measurement has the model state as one number), with each
    bar's total written on it and the memory budget (80 GiB) as a line; one pair of bars per
    record (e.g. with and without activation checkpointing). Returns (path, figure)."""
    plt = _plt()
    import textwrap

    fig, ax = plt.subplots(figsize=(4.5 + 2.0 * len(records), 5.0))
    ticks, seen = [], set()
    shared = {k: records[0].get(k) for k in ("model", "resolution", "batch", "dtype")}
    same = all(all(r.get(k) == v for k, v in shared.items()) for r in records)
    for k, r in enumerate(records):
        bars = _memory_bars(r)
        for b, (bar, parts) in enumerate(bars):
            x = 2.6 * k + b
            bottom = 0.0
            for label, gib in parts:
                if gib <= 0:
                    continue
                colour = MEMORY_COLOURS.get(label, "0.85")
                hatch = "//" if label.startswith(("more", "model state")) else None
                ax.bar(x, gib, bottom=bottom, color=colour, hatch=hatch, edgecolor="white",
                       label=None if label in seen else label, width=0.9)  # fmt: skip
                seen.add(label)
                bottom += gib
            ax.text(x, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
            ticks.append((x, bar))
        if len(bars) == 1:
            ax.text(2.6 * k + 1, 1, "no measurement\nrecorded", ha="center", fontsize=7)
        group = f"checkpointing {'on' if r.get('checkpoint') else 'off'}"
        if not same:
            group = f"{r.get('model')} {r.get('resolution')} px b{r.get('batch')}\n{group}"
        ax.annotate(group, xy=(2.6 * k + 0.5, 0), xycoords=("data", "axes fraction"),
                    xytext=(0, -24), textcoords="offset points", ha="center", va="top",
                    fontsize=8)  # fmt: skip
    budget = records[0].get("budget_gib")
    if budget:
        ax.axhline(budget, color="red", ls="--", lw=1, label=f"{budget:g} GiB budget")
    ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks], fontsize=7)
    ax.set_ylabel("memory, GiB (bar height: peak of a training step)")
    title = "training memory, estimated vs measured"
    if same:
        title = (f"{shared['model']} at {shared['resolution']} px, batch {shared['batch']}, "
                 f"{shared['dtype']}: {title}")  # fmt: skip
    ax.set_title(textwrap.fill(title, 60), fontsize=9)
    method = (records[0].get("measured") or {}).get("method", "?")
    note = (f"measured: {method}; the measurement records the model state as one number "
            "(weights, gradients, optimizer and EMA are not recorded separately)")  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False,
              title=textwrap.fill(note, 40), title_fontsize=6.5, alignment="left")  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    ax.margins(x=0.08)
    fig.tight_layout()
    return _save(fig, path, tight=False), fig


def _attention_ratios(rows: pd.DataFrame) -> pd.Series:
    """Each row's TFLOP/s over the fastest SDPA backend's at the same shape (mode, head dim,
    sequence length, batch, heads, dtype where given; the fastest backend when no SDPA one
    ran there)."""
    shape = [c for c in ("mode", "head_dim", "seq_len", "batch", "heads", "dtype") if c in rows]
    sdpa = rows["backend"].astype(str).str.startswith("sdpa")
    best_sdpa = rows["tflops"].where(sdpa).groupby([rows[c] for c in shape]).transform("max")
    best_any = rows.groupby(shape)["tflops"].transform("max")
    return rows["tflops"] / best_sdpa.fillna(best_any)


def plot_attention(rows: pd.DataFrame, path: Path):
    """Attention TFLOP/s against sequence length, one panel per mode and head dim, one line
    per backend; below, each backend relative to the fastest SDPA backend at that shape (1 =
    as fast). Returns (path, figure)."""
    plt = _plt()
    rows = rows.assign(ratio=_attention_ratios(rows))
    panels = sorted({(m, int(d)) for m, d in zip(rows["mode"], rows["head_dim"], strict=True)})
    backends = sorted({str(b) for b in rows["backend"]})
    fig, axes = plt.subplots(
        2, len(panels), figsize=(4.0 * len(panels), 6.4), squeeze=False, sharex="col",
        gridspec_kw={"height_ratios": (3, 2)},
    )  # fmt: skip
    for j, (mode, d) in enumerate(panels):
        g = rows[(rows["mode"] == mode) & (rows["head_dim"] == d)]
        for backend, gb in g.groupby("backend", sort=True):
            gb = gb.sort_values("seq_len")
            style = {"color": f"C{backends.index(str(backend))}", "marker": "o", "ms": 3}
            axes[0][j].plot(gb["seq_len"], gb["tflops"], label=backend, **style)
            axes[1][j].plot(gb["seq_len"], gb["ratio"], **style)
        axes[0][j].set_title(f"{mode}, head dim {d}", fontsize=9)
        axes[1][j].axhline(1.0, color="0.3", lw=0.8)
        _pow2_ticks(axes[1][j], g["seq_len"])
        axes[1][j].set_xlabel("sequence length (tokens)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
    dtype = ", ".join(sorted({str(x) for x in rows["dtype"]})) if "dtype" in rows else "bf16"
    axes[0][0].set_ylabel(f"TFLOP/s ({dtype}; higher is better)", fontsize=8)
    axes[1][0].set_ylabel("relative to the fastest\nSDPA backend (higher is better)", fontsize=8)
    axes[0][-1].legend(fontsize=7)
    device = str(rows["device"].iloc[0]) if "device" in rows.columns and len(rows) else ""
    fig.suptitle(f"attention, {device}", fontsize=10)
    return _save(fig, path), fig


def _save(fig, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


# --------------------------------------------------------------------------------------------
# Writing


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")


def report_stem(report: TableReport) -> str:
    """What names a table report's files (tables/, plots/, samples/): ``table<N>-<scale>``."""
    return f"{report.table.slug}-{report.scale}"


def _title(report: TableReport) -> str:
    t = report.table
    return f"Table {t.number}: {t.title}" if t.number else f"Grid {t.name}: {t.title}"


# A report's sample grids are shrunk to this many pixels on their long side: a grid of 100
# samples at 256 px is 2560 px wide and, for an undertrained model's noise, ~5 MB of PNG.
GRID_MAX_PX = 768


def copy_grid(src: Path, dest: Path, max_px: int = GRID_MAX_PX) -> Path:
    """Copy a sample grid, shrunk (Lanczos) to at most ``max_px`` on its long side; a smaller
    one is copied byte for byte."""
    from PIL import Image

    with Image.open(src) as image:
        if max(image.size) <= max_px:
            shutil.copyfile(src, dest)
            return dest
        scale = max_px / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = image.resize(size, Image.Resampling.LANCZOS)
    return atomic_write_with(dest, lambda tmp: small.save(tmp, format="PNG", optimize=True))


def _copy_grids(report: TableReport, out: Path) -> list[tuple[str, Path]]:
    grids = []
    rows, columns = _layout(report.cells, report.table, report.scale)
    row_titles, column_titles = dict(rows), dict(columns)
    for _, r in report.cells[report.cells["status"] == "done"].iterrows():
        found = sorted((Path(r["run_dir"]) / "samples").glob("grid-*.png"))
        if not found:
            continue
        seed = "" if pd.isna(r["seed"]) else f"-seed{int(r['seed'])}"
        name = f"{_slug(r['row'])}-{_slug(r['column'])}{seed}.png"
        dest = out / "samples" / report_stem(report) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        copy_grid(found[-1], dest)
        caption = row_titles.get(r["row"], r["row"])
        if r["column"] != "all":
            caption += f", {column_titles.get(r['column'], r['column'])}"
        grids.append((caption + ("" if not seed else f", seed {int(r['seed'])}"), dest))
    return grids


PLOTS = (("curves", "training loss per cell"), ("metrics", "metrics per cell"))


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
    stem = report_stem(report)
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


def _table_plots(report: TableReport, out: Path, stem: str) -> dict[str, Path]:
    """The training curves and the metrics bars of a trained table (none for a computed one)."""
    if report.table.compute is not None:
        return {}
    paths = {}
    name = f"{_title(report)} ({report.scale})"
    where = {"table": report.table, "scale": report.scale}
    curves = out / "plots" / f"{stem}-curves.png"
    if plot_curves(report.cells, curves, name, **where) is not None:
        paths["curves"] = curves
    bars = out / "plots" / f"{stem}-metrics.png"
    if plot_metrics(report.cells, bars, name, **where) is not None:
        paths["metrics"] = bars
    return paths


def _printed_markdown(printed: PrintedTable) -> list[str]:
    """A printed table in markdown with its notes under it."""
    return [to_markdown(printed).rstrip("\n"), "", *[f"{n}  " for n in printed.notes], ""]


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
    md += _printed_markdown(report.printed)
    for caption, printed in report.extra:
        md += [f"## {caption}", "", *_printed_markdown(printed)]
    if figures:
        md += ["## Plots", ""] + [f"![{c}]({rel(p)})" for c, p in figures] + [""]
    if grids:
        md += ["## Sample grids (EMA model, end of training)", ""]
        md += [f"**{c}**  \n![{c}]({rel(p)})\n" for c, p in grids]
    return "\n".join(md)


def _latex_text(report: TableReport, origin: str) -> str:
    scale, title, stem = report.scale, _title(report), report_stem(report)
    date = time.strftime("%Y-%m-%d")
    caption = f"{title} ({scale} scale; ours beside the paper's)"
    tex = [
        f"% {title} ({scale}); generated by `sdiff report` on {date} {origin}",
        r"% needs \usepackage{booktabs} and \usepackage{graphicx}",
        to_latex(report.printed, caption, f"tab:{stem}"),
    ]
    for caption, printed in report.extra:
        name = _slug(caption.split(" (")[0]).lower()  # "Literature (as cited ...)": literature
        tex.append(to_latex(printed, caption, f"tab:{stem}-{name}"))
    return "\n".join(tex)


# --------------------------------------------------------------------------------------------
# The index

HEADLINE_ROWS = 6  # a table with more rows shows its best row per column in the index


def headline(printed: PrintedTable) -> str:
    """A table's headline for the index, in markdown: the whole table when it has at most
    ``HEADLINE_ROWS`` rows; else the best row of each column with a direction; else its first
    ``HEADLINE_ROWS`` rows."""
    frame = printed.frame
    if len(frame) <= HEADLINE_ROWS:
        return to_markdown(printed)
    best = [
        (column.name, label, f"**{frame.loc[label, column.name]}**")
        for column in printed.columns
        for label in frame.index[printed.best[column.name].to_numpy()]
    ]
    if best:
        return markdown_table(["column", "best", "value"], best)
    first = PrintedTable(frame.head(HEADLINE_ROWS), printed.columns,
                         printed.best.head(HEADLINE_ROWS))  # fmt: skip
    return to_markdown(first) + f"\n(the first {HEADLINE_ROWS} of {len(frame)} rows)\n"


def entry_title(report: TableReport) -> str:
    """A table report's name in the index."""
    return f"{_title(report)} ({report.scale})"


LINK_NAMES = {"markdown": "markdown", "latex": "latex", "curves": "training loss plot",
              "metrics": "metrics plot", "samples": "sample grids"}  # fmt: skip


def _link(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def write_index(
    out: str | Path,
    entries: list[tuple[TableReport, dict[str, Path]]],
    extra: list[Path],
    *,
    bench: str | Path | None = None,
    allow_dirty: bool = False,
    origin: str | None = None,
) -> Path:
    """``index.md`` under ``out``: each table report's headline (``headline``) with links to
    its files, and the benchmarks' summary (from ``bench``) with links to ``extra`` (plots and
    benchmark files). ``allow_dirty``, ``origin``: as for ``write_table_report``. No entries:
    a ValueError, and nothing is written (an index without tables would replace a useful one)."""
    out = Path(out)
    origin = origin or generated_from(out, allow_dirty)
    if not entries:
        raise ValueError(f"no table reports to index: {out / 'index.md'} not written")
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
    for report, paths in entries:
        links = [f"[{LINK_NAMES.get(k, k)}]({_link(p, out)})" for k, p in paths.items()]
        lines += [f"### {entry_title(report)}", "", " · ".join(links), ""]
        lines += [headline(report.printed).rstrip("\n"), ""]
        lines += [f"{n}  " for n in report.printed.notes] + ([""] if report.printed.notes else [])
    summary = bench_summary(bench) if bench is not None else []
    if summary or extra:
        lines += ["## Benchmarks", "", *summary]
        lines += [f"- [{_link(p, out)}]({_link(p, out)})" for p in extra]
    return atomic_write_text(out / "index.md", "\n".join(lines).rstrip("\n") + "\n")


def bench_summary(bench: str | Path) -> list[str]:
    """Markdown lines for the index, from the benchmark files under ``bench``: the fastest
    training step per device and preset, the memory estimates beside their measurements,
    each attention backend's TFLOP/s at the longest sequence."""
    bench = Path(bench)
    return [*_throughput_summary(bench), *_memory_summary(bench), *_attention_summary(bench)]


def _throughput_summary(bench: Path) -> list[str]:
    tp = _read_csvs([bench / "bench" / "throughput.csv", bench / "gpu" / "throughput.csv"])
    if not len(tp) or not {"train_img_s", "device", "preset"} <= set(tp.columns):
        return []
    tp = tp[(tp["status"] == "ok") & tp["train_img_s"].notna()]
    if not len(tp):
        return []
    fastest = tp.loc[tp.groupby(["device", "preset"])["train_img_s"].idxmax()]
    rows = [
        [r["device"], r["preset"], int(r["resolution"]), int(r["batch"]),
         "compiled" if str(r["compiled"]).lower() in ("true", "1") else "eager",
         f"{r['train_img_s']:.1f}", _optional(r, "mfu", 100), _optional(r, "peak_mem_gib")]
        for _, r in fastest.iterrows()
    ]  # fmt: skip
    header = ["device", "preset", "px", "batch", "mode", "train img/s ↑", "MFU % ↑", "peak GiB"]
    table = markdown_table(header, rows, right=[2, 3, 5, 6, 7]).rstrip("\n")
    return ["Fastest training step per device and preset (`sdiff bench throughput`):", "",
            table, ""]  # fmt: skip


def _memory_summary(bench: Path) -> list[str]:
    lines = []
    for r in _memory_records(bench):
        m = r.get("measured") or {}
        measured = f"{m['peak'] / GIB:.1f} GiB measured" if m.get("peak") else "not measured"
        lines.append(
            f"- Training memory of {r.get('model')} at {r.get('resolution')} px, batch "
            f"{r.get('batch')}, checkpointing {'on' if r.get('checkpoint') else 'off'}: peak "
            f"{r.get('peak', 0) / GIB:.1f} GiB estimated, {measured}; largest batch within "
            f"{r.get('budget_gib', '?')} GiB (estimated): {r.get('largest_batch', '?')}."
        )
    return [*lines, ""] if lines else []


def _attention_summary(bench: Path) -> list[str]:
    """TFLOP/s of each backend (columns) at the longest sequence per mode and head dim (rows),
    the fastest in bold."""
    at = _read_csvs([bench / "gpu" / "attention.csv"])
    if not len(at) or not {"tflops", "mode", "head_dim", "seq_len", "backend"} <= set(at.columns):
        return []
    at = at[at["status"] == "ok"]
    longest = at[at["seq_len"] == at.groupby(["mode", "head_dim"])["seq_len"].transform("max")]
    if not len(longest):
        return []
    wide = longest.pivot_table(index=["mode", "head_dim", "seq_len"], columns="backend",
                               values="tflops", aggfunc="max")  # fmt: skip
    rows = []
    for (mode, d, n), values in wide.iterrows():
        top = values.max()
        shown = [DASH if pd.isna(v) else f"**{v:.1f}**" if v == top else f"{v:.1f}"
                 for v in values]  # fmt: skip
        rows.append([mode, int(d), int(n), *shown])
    header = ["mode", "head dim", "tokens", *wide.columns]
    table = markdown_table(header, rows, right=range(1, len(header))).rstrip("\n")
    return ["Attention TFLOP/s at the longest sequence, the fastest backend in bold "
            "(`sdiff bench attention`):", "", table, ""]  # fmt: skip


def _optional(r: pd.Series, key: str, factor: float = 1.0, decimals: int = 1) -> str:
    """A number of a benchmark row, or a dash where it was not recorded."""
    value = r.get(key)
    return DASH if value is None or pd.isna(value) else f"{float(value) * factor:.{decimals}f}"


# --------------------------------------------------------------------------------------------
# CLI


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help with each option's default (those that have one), and the description's
    examples as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    intro, examples = __doc__.split("\n\n")[:2]
    p = argparse.ArgumentParser(
        prog="sdiff report",
        description=f"{intro}\n\n{examples}",
        epilog="exit status: 0 all written; 1 --all skipped a table; 2 a usage error (nothing\n"
        "to report, a missing or foreign store, an unknown table, a dirty tree writing into\n"
        "reports/).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("table", nargs="?",
                   help="table number 1-8 or alias, a shipped grid's name or a grid file "
                   "(omit with --all)")  # fmt: skip
    p.add_argument("--all", action="store_true",
                   help="every table with a store under --runs, bench plots, index")  # fmt: skip
    p.add_argument("--scale", default=None,
                   help="which scale's cells to report: smoke, gpu, paper, a grid's own scale, "
                   "or all (default: smoke, or a grid's only scale)")  # fmt: skip
    p.add_argument("--store", nargs="+", action=ExtendList, default=None,
                   help="results stores (files or `sdiff ablate --out` folders); default for "
                   f"TABLE: {DEFAULT_ROOT}/table<N>-<scale>, for --all: every store under "
                   "--runs")  # fmt: skip
    p.add_argument("--runs", default=DEFAULT_ROOT, help="where --all looks for stores")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="the report folder (tables/, plots/, samples/, index.md); the "
                   "repository's committed reports/ only when named: --out reports")  # fmt: skip
    p.add_argument("--bench", default=DEFAULT_BENCH,
                   help="folder whose bench/ and gpu/ hold the benchmark files")  # fmt: skip
    p.add_argument("--allow-dirty", action="store_true",
                   help="write into the repository's committed reports/ from a tree with "
                   "uncommitted changes (the files say so)")  # fmt: skip
    return p


def report_main(argv: list[str] | None = None) -> int:
    """``sdiff report``: 0 when every report was written; 1 when ``--all`` skipped a table; 2
    for a usage error (nothing to report, a missing or foreign store, an unknown table, cells
    that differ beyond their seed, a dirty tree writing into the committed reports/)."""
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


def _make_a_store(runs: str) -> str:
    """The command that makes a store ``sdiff report --all --runs RUNS`` finds."""
    command = "sdiff ablate 2 --scale smoke"
    if Path(runs) != Path(DEFAULT_ROOT):
        command += f" --out {Path(runs) / 'table2-smoke'}"
    return f"`{command}` makes one (minutes on a CPU)"


def _report_all(args: argparse.Namespace) -> int:
    """Every table and scale found in the stores, the benchmark plots, the index. Every
    report is built before the first file is written: with none, nothing is written."""
    from sdiff.ablations import EXTRA_GRIDS, TABLES, get_table

    out = Path(args.out)
    args.scale = args.scale or "smoke"
    stores = [_store_path(s) for s in args.store] if args.store else find_stores(args.runs)
    if not stores:
        raise ValueError(
            f"nothing to report: no results stores under {args.runs} (looked for "
            f"{Path(args.runs) / '*' / STORE_NAME}); {_make_a_store(args.runs)}, or name "
            f"stores with --store. Nothing written."
        )
    cells = load_cells(stores)
    scales = [*SCALES, "custom"] if args.scale == "all" else [args.scale]
    reports, skipped = [], 0
    grids = [t for _, t in sorted(TABLES.items())] + [get_table(g) for g in EXTRA_GRIDS]
    known = {t.slug for t in grids}
    for slug in sorted(set(cells["grid"]) - known) if len(cells) else []:
        print(f"sdiff report: grid {slug!r} is not shipped: report it with `sdiff report "
              f"{slug}.yaml` (its grid file)", file=sys.stderr)  # fmt: skip
    for table in grids:
        for scale in scales:
            if scale not in table.scales:
                continue
            if (
                not len(cells)
                or not ((cells["grid"] == table.slug) & (cells["scale"] == scale)).any()
            ):
                continue
            try:
                reports.append(build_table_report(table, scale, cells))
            except ValueError as err:  # one table's problem does not stop the others
                print(f"sdiff report: skipped: {err}", file=sys.stderr)
                skipped += 1
    if not reports:
        found = sorted(set(cells["scale"])) if len(cells) else []
        why = "every table was skipped (above)" if skipped else (
            f"they hold no cells at the {args.scale} scale (scales found: "
            f"{', '.join(found) or 'none'}; choose with --scale)"
        )  # fmt: skip
        raise ValueError(
            f"nothing to report from the {len(stores)} store(s) under "
            f"{args.runs if not args.store else 'given'}: {why}. Nothing written."
        )
    entries = [(r, write_table_report(r, out, origin=args.origin)) for r in reports]
    bench = Path(args.bench)
    extra = bench_plots(bench, out / "plots")
    for f in ("gpu/README.md", "bench/throughput.csv", "gpu/throughput.csv", "gpu/attention.csv"):
        if (bench / f).is_file():
            extra.append(bench / f)
    extra += _memory_files(bench)
    index = write_index(out, entries, extra, bench=bench, origin=args.origin)
    reported = {r.table.number for r in reports}
    missing = sorted(set(TABLES) - reported)
    print(f"{len(entries)} table reports, {len(extra)} benchmark files; index: {index.resolve()}")
    if missing:
        print(f"no stores for table(s) {missing} under {args.runs}")
    return 1 if skipped else 0


def _report_tables(args: argparse.Namespace) -> int:
    """One table at one scale (or every scale with a store)."""
    from sdiff.ablations import get_table

    table = get_table(args.table)
    written = []
    if args.scale == "all":
        scales = list(table.scales)
    else:
        scales = [args.scale or default_scale(table)]
    for scale in scales:
        stores = args.store or [default_out(table, scale)]
        if args.scale == "all" and not args.store and not _store_path(stores[0]).exists():
            continue
        report = build_table_report(table, scale, load_cells(stores))
        paths = write_table_report(report, args.out, origin=args.origin)
        written.append(paths["markdown"])
        print("\n".join(_printed_markdown(report.printed)))
    if not written:
        raise ValueError(
            f"no stores for {table.slug} under {DEFAULT_ROOT} at any scale: run "
            f"`sdiff ablate {_ablate_name(table)}` first, or pass --store"
        )
    for p in written:
        print(f"report: {p.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(report_main())
