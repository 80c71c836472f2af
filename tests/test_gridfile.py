"""Grid files (sdiff.ablations.gridfile) and what the runner does with them: the paper's tables
expand to the cell hashes their Python modules gave (tests/data/paper_grid_hashes.json, written
by those modules before they were replaced); a bad file is one line naming file, line and key,
and writes nothing; a grid written by hand runs with seeds, resumes after a SIGKILL, takes a
cell done in another store from the cell cache, and exports one row per cell."""

import csv
import io
import json
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdiff.ablations import TABLES, get_table
from sdiff.ablations.grid import expand
from sdiff.ablations.gridfile import GridFileError, load_grid
from sdiff.ablations.runner import ablate_main
from sdiff.ablations.store import ResultsStore
from sdiff.cli import main
from sdiff.training.checkpoint import list_checkpoints, load_checkpoint
from sdiff.training.trainer import Trainer

HASHES = Path(__file__).parent / "data" / "paper_grid_hashes.json"
ROOT = Path(__file__).resolve().parents[1]


# -- the paper's tables ---------------------------------------------------------------------------
def test_paper_tables_expand_to_the_hashes_of_the_modules_they_replace():
    expected = json.loads(HASHES.read_text())
    got = {}
    for number, table in TABLES.items():
        for scale, s in table.scales.items():
            cells = expand(table, scale, overrides=[f"{k}=/data/placeholder" for k in s.needs])
            got[f"{number}/{scale}"] = {f"{c.row}/{c.column}": c.hash for c in cells}
    assert got == expected
    assert sum(len(v) for v in expected.values()) == 59


@pytest.mark.parametrize("number", range(1, 9))
def test_ablate_dry_run_json_gives_the_same_smoke_hashes(number, capsys):
    assert main(["ablate", str(number), "--scale", "smoke", "--dry-run", "--json"]) == 0
    cells = json.loads(capsys.readouterr().out)
    expected = json.loads(HASHES.read_text())[f"{number}/smoke"]
    assert {f"{c['row']}/{c['column']}": c["hash"] for c in cells} == expected


def test_table7_literature_rows_come_from_its_grid_file():
    paper = get_table(7).paper
    # as cited in simple diffusion (arXiv 2301.11093), Table 7, and SiD2 (arXiv 2410.19324)
    assert paper[("simple diffusion U-ViT L", "512")] == {
        "fid_train": 3.54, "fid_eval": 4.53, "isc": 205.3
    }  # fmt: skip
    assert paper[("SiD2", "256")]["fid_train"] == 1.38 and len(paper) == 17


def test_extra_grids_are_addressable_and_share_cells_with_the_tables():
    shift = get_table("shift-resolution")
    base16 = {c.column: c.hash for c in expand(shift, "smoke") if c.row == "base16"}
    table2 = {c.column: c.hash for c in expand(get_table(2), "smoke") if c.row == "shifted"}
    assert base16["32"] == table2["32"] and base16["64"] == table2["64"]
    dropout = {(c.row, c.column): c.hash for c in expand(get_table("dropout-size"), "smoke")}
    table3 = {c.row: c.hash for c in expand(get_table(3), "smoke")}
    assert dropout[("from8", "depth4")] == table3["from8"]
    assert len(dropout) == 9 and len(set(dropout.values())) == 9
    for name in ("shift-resolution", "multiscale-resolution", "dropout-size"):
        assert set(get_table(name).scales) == {"smoke", "gpu"}


# -- a grid written by hand -----------------------------------------------------------------------
GRID = """\
# two learning rates x two EMA decays x two seeds of a tiny digits U-ViT
name: {name}
title: A hand-written grid
metrics: [kid_mean, final_loss]
base: digits
set:
  model.channels: [8]
  model.width: 32
  model.depth: 1
  model.head_dim: 16
  model.norm_groups: 4
  train.total_images: 96
  train.batch_size: 8
  train.warmup_images: 24
  train.log_every_images: 8
  train.checkpoint_every_images: 24
  train.keep_checkpoints: 10
  train.sample_every_images: 0
  train.deterministic: true
eval: {{n: 8, reference_n: 8, steps: 2, metrics: [kid]}}
seeds: [0, 1]
rows:
{rows}
columns:
  ema9: {{label: EMA 0.9, set: {{train.ema_decay: 0.9}}}}
  ema99: {{label: EMA 0.99, set: {{train.ema_decay: 0.99}}}}
"""
ROWS = """\
  slow: {label: lr 1e-3, set: {train.lr: 1.0e-3}}
  fast: {label: lr 3e-3, set: {train.lr: 3.0e-3}}
"""


def write_grid(folder: Path, name: str = "mine", rows: str = ROWS) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(GRID.format(name=name, rows=rows))
    return path


def test_a_hand_written_grid_expands_rows_columns_and_seeds(tmp_path):
    table = load_grid(write_grid(tmp_path))
    cells = expand(table, "smoke")
    assert table.slug == "mine" and list(table.scales) == ["smoke"]
    assert [(c.row, c.column, c.seed) for c in cells] == [
        (r, c, s) for r in ("slow", "fast") for c in ("ema9", "ema99") for s in (0, 1)
    ]
    for c in cells:
        assert c.config.train.lr == {"slow": 1e-3, "fast": 3e-3}[c.row]
        assert c.config.train.ema_decay == {"ema9": 0.9, "ema99": 0.99}[c.column]
        assert c.config.train.seed == c.seed and c.config.model.width == 32
        assert (c.eval.n, c.eval.steps, c.eval.metrics) == (8, 2, ("kid",))
    # --seeds replaces the file's seeds
    assert [c.seed for c in expand(table, "smoke", seeds=[5])] == [5, 5, 5, 5]


def test_compact_dry_run_shows_overrides_over_the_base_and_status(tmp_path, capsys):
    grid = write_grid(tmp_path)
    out = tmp_path / "runs" / "mine-smoke"
    assert ablate_main([str(grid), "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith(("slow", "fast"))]
    assert len(lines) == 8
    first = lines[0].split()
    assert first[:6] == ["slow", "/", "ema9", "/", "seed", "0"] and first[6] == "pending"
    # only the cell's own overrides, not the shared set nor the full config
    assert lines[0].endswith("train.ema_decay=0.9 train.lr=1.0e-3 train.seed=0")
    assert "model.width=32" in text.splitlines()[0]  # the shared set, once, in the header
    assert "TFLOP" in lines[0] and not out.exists()  # a dry run creates nothing


def run_and_kill(grid: Path, out: Path, until) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdiff", "ablate", str(grid), "--out", str(out), "--no-progress"],
        cwd=ROOT,
    )
    deadline = time.time() + 180
    while not until() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


@pytest.mark.filterwarnings("ignore:torch-fidelity's Inception weights could not be downloaded")
def test_a_hand_written_grid_runs_resumes_reuses_and_exports(tmp_path, monkeypatch, capsys):
    grid = write_grid(tmp_path)
    out = tmp_path / "runs" / "mine-smoke"
    cells = expand(load_grid(grid), "smoke")

    def mid_training() -> bool:  # some cell has a checkpoint but no result yet
        return any(
            list_checkpoints(out / "cells" / c.hash / "checkpoints")
            and not (out / "cells" / c.hash / "metrics.json").exists()
            for c in cells[1:]
        )

    run_and_kill(grid, out, mid_training)
    with ResultsStore(out / "results.sqlite") as store:
        killed = [r for r in store.rows() if r["status"] == "running"]
    assert len(killed) == 1, "the kill should land in the middle of a cell"
    resume_step = load_checkpoint(
        list_checkpoints(out / "cells" / killed[0]["hash"] / "checkpoints")[-1]
    )["step"]

    starts = []
    real_run = Trainer.run
    monkeypatch.setattr(
        Trainer, "run", lambda self, *a, **k: (starts.append(self.step), real_run(self, *a, **k))[1]
    )
    assert ablate_main([str(grid), "--out", str(out), "--no-progress"]) == 0
    rows = ResultsStore(out / "results.sqlite").rows()
    assert [r["status"] for r in rows] == ["done"] * 8
    assert {r["hash"]: r["attempts"] for r in rows}[killed[0]["hash"]] == 2
    assert resume_step in starts and 0 < resume_step < 12  # resumed, not restarted
    assert [r["seed"] for r in rows] == [0, 1] * 4 and {r["grid"] for r in rows} == {"mine"}

    # another grid sharing the "fast" row takes its cells from the first grid's store
    medium = "\n  medium: {set: {train.lr: 2.0e-3}}\n"
    other = write_grid(tmp_path, "other", ROWS.split("\n")[1] + medium)
    other_out = tmp_path / "runs" / "other-smoke"
    starts.clear()
    capsys.readouterr()
    assert ablate_main([str(other), "--out", str(other_out), "--no-progress"]) == 0
    assert "4 taken from the cell cache" in capsys.readouterr().out
    assert len(starts) == 4  # only the "medium" cells trained
    theirs = {r["hash"]: r for r in ResultsStore(out / "results.sqlite").rows()}
    for r in ResultsStore(other_out / "results.sqlite").rows():
        if r["row_name"] == "fast":
            assert r["source"] == str((out / "results.sqlite").resolve())
            assert r["metrics"] == theirs[r["hash"]]["metrics"]
            link = other_out / "cells" / r["hash"]
            assert link.is_symlink() and link.resolve() == (out / "cells" / r["hash"]).resolve()
        else:
            assert r["source"] is None and r["row_name"] == "medium"

    # the report: mean ± sample std (n=2) over the seeds of each row and column
    from sdiff.report import report_main

    assert report_main([str(grid), "--store", str(out), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "tables" / "mine-smoke.md").read_text()
    kid = [
        r["metrics"]["kid_mean"]
        for r in rows
        if (r["row_name"], r["column_name"]) == ("fast", "ema9")
    ]
    mean, std = statistics.fmean(kid), statistics.stdev(kid)
    line = next(x for x in md.splitlines() if x.startswith("| lr 3e-3"))
    assert "± " in line and "(n=2)" in line
    shown = re.search(r"([-0-9.]+) ± ([0-9.]+) \(n=2\)", line.split("|")[2])
    assert abs(float(shown[1]) - mean) <= 0.5 * 10 ** -len(shown[1].split(".")[1])
    assert abs(float(shown[2]) - std) <= 0.5 * 10 ** -len(shown[2].split(".")[1])
    assert report_main([str(other), "--store", str(other_out), "--out", str(tmp_path / "rep")]) == 0
    other_md = (tmp_path / "rep" / "tables" / "other-smoke.md").read_text()
    assert "From the cell cache: 4 of the 8 done cells" in other_md and str(out) in other_md

    # exports: one row per cell
    from sdiff.ablations.results import results_frame

    frame = results_frame(out)
    assert len(frame) == 8 and sorted(frame["seed"].tolist()) == [0] * 4 + [1] * 4
    assert frame.groupby(["row", "column"]).size().tolist() == [2, 2, 2, 2]
    capsys.readouterr()
    assert main(["results", str(out), "--format", "csv"]) == 0
    exported = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(exported) == 8
    assert {(e["row"], e["column"], e["seed"]) for e in exported} == {
        (c.row, c.column, str(c.seed)) for c in cells
    }


# -- bad grid files -------------------------------------------------------------------------------
BAD = {
    # name: (a change to the good file, the key the error names, text on the line it names)
    "unknown key": (("title: A hand-written grid", "title: x\ncolour: blue"), "colour", "colour"),
    "wrong type": (("seeds: [0, 1]", "seeds: [0, one]"), "seeds", "seeds"),
    "duplicate row": (
        ("  fast: {label: lr 3e-3", "  slow: {label: lr 3e-3"),
        "rows.slow",
        "  slow: {label: lr 3",
    ),
    "no such field": (("  model.width: 32", "  model.widht: 32"), "model.widht", "model.widht"),
    "empty axis": (("columns:\n  ema9", "columns: {}\n"), "columns", "columns: {}"),
    "empty seeds": (("seeds: [0, 1]", "seeds: []"), "seeds", "seeds: []"),
    "unknown base": (("base: digits", "base: digitz"), "base", "base: digitz"),
    "bad yaml": (("title: A hand-written grid", "title: [unclosed"), "", "metrics:"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_grid_file_is_one_line_naming_file_line_and_key(case, tmp_path, capsys):
    (old, new), key, marker = BAD[case]
    path = tmp_path / "bad.yaml"
    text = GRID.format(name="bad", rows=ROWS)
    assert old in text
    text = text.replace(old, new)
    if case == "empty axis":
        text = text.split("columns:")[0] + new
    path.write_text(text)
    lines = text.splitlines()
    line = next(i for i, s in enumerate(lines, 1) if s.lstrip().startswith(marker.strip()))
    with pytest.raises(GridFileError) as err:
        load_grid(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: {key}" if key else f"{path}:")
    if case == "bad yaml":
        assert "not valid YAML" in message
    out = tmp_path / "runs"
    capsys.readouterr()
    assert ablate_main([str(path), "--out", str(out / "x")]) == 2
    err_text = capsys.readouterr().err.strip()
    assert message in err_text and len(err_text.splitlines()) == 1
    assert not out.exists()  # nothing written


def test_extra_axes_are_reported_as_columns_per_axis_value(tmp_path):
    """rows x columns x an extra axis: the report's column groups are column x axis value,
    each cell's number where it belongs (values written into a store by hand)."""
    from sdiff.ablations.store import new_owner
    from sdiff.report import build_table_report, load_cells, to_markdown

    path = write_grid(tmp_path)
    text = path.read_text().replace("seeds: [0, 1]\n", "")
    text += (
        "axes:\n  width: {narrow: {set: {model.width: 32}},"
        " wide: {label: W64, set: {model.width: 64}}}\n"
    )
    path.write_text(text)
    table = load_grid(path)
    cells = expand(table, "smoke")
    assert len(cells) == 8 and cells[1].axes == (("width", "wide"),)
    owner = new_owner()
    with ResultsStore(tmp_path / "g" / "results.sqlite") as store:
        store.add(cells)
        for i, c in enumerate(cells):
            store.claim(c.hash, owner)
            store.finish(c.hash, owner, {"kid_mean": 0.01 * (i + 1), "final_loss": 1.0})
    report = build_table_report(table, "smoke", load_cells([tmp_path / "g"]))
    md = to_markdown(report.printed)
    # the cell (fast, ema99, wide) is the 8th: KID 0.08, under the group "EMA 0.99, width W64"
    assert "EMA 0.99, width W64" in md and "EMA 0.9, width narrow" in md
    row = next(x for x in md.splitlines() if x.startswith("| lr 3e-3")).split("|")
    header = next(x for x in md.splitlines() if x.startswith("|") and "KID" in x).split("|")
    assert len(row) == len(header)
    kid_columns = [i for i, h in enumerate(header) if "KID" in h]
    values = [float(re.sub(r"[^0-9.]", "", row[i])) for i in kid_columns]
    assert values == [0.05, 0.06, 0.07, 0.08]
