"""`sdiff report`: paper-layout tables from results stores, plots, index; checked against
numbers computed here (numpy), the values cited by simple diffusion (arXiv 2301.11093) and the
files' own contents; the commit each file names, and the committed reports/ folder refused to a
tree with uncommitted changes."""

import csv
import json

import numpy as np
import pytest

from sdiff.ablations import get_table
from sdiff.ablations.grid import expand
from sdiff.ablations.store import ResultsStore, new_owner
from sdiff.cli import main
from sdiff.report import (
    Column,
    Entry,
    bench_plots,
    build_table_report,
    committed_reports,
    fmt_cell,
    load_cells,
    plot_curves,
    plot_metrics,
    print_table,
    to_latex,
    to_markdown,
    write_index,
    write_table_report,
)
from sdiff.util import provenance

PNG = b"\x89PNG\r\n\x1a\n"
DIRTY_ORIGIN = "from 0123456789ab+dirty: uncommitted changes, not reproducible from a commit"


def table_row(markdown: str, first: str) -> list[str]:
    """The cells of the markdown table row whose first cell is ``first``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{markdown}")


def fill_store(folder, table, scale="smoke", overrides=(), metrics=None, fail=(), curves=None):
    """A results store with the table's cells finished with the given metrics
    ({(row, column): {...}}), some failed, and optional metrics.csv curves per cell."""
    cells = expand(table, scale, overrides=list(overrides))
    owner = new_owner()
    with ResultsStore(folder / "results.sqlite") as store:
        store.add(cells)
        for c in cells:
            assert store.claim(c.hash, owner)
            key = (c.row, c.column)
            if key in fail:
                store.fail(c.hash, owner, "Traceback ...\nRuntimeError: boom", wall_s=1.0)
                continue
            store.finish(c.hash, owner, (metrics or {}).get(key, {}), wall_s=60.0,
                         device="cpu (2 threads)", git_sha="abc123")  # fmt: skip
            if curves and key in curves:
                run = folder / "cells" / c.hash
                run.mkdir(parents=True)
                with open(run / "metrics.csv", "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["step", "images", "loss"])
                    for i, loss in enumerate(curves[key]):
                        w.writerow([i + 1, 100 * (i + 1), loss])
    return cells


def table2_metrics(offset):
    return {
        (r, c): {
            "fid": 90.0 + offset + 3 * i + j,
            "kid_mean": 0.07 + offset / 100 + i / 1000,
            "kid_std": 0.002,
            "num_generated": 200,
        }
        for i, r in enumerate(["cosine", "shifted"])
        for j, c in enumerate(["32", "64"])
    }


def test_seeds_are_averaged_with_sample_std(tmp_path):
    table = get_table(2)
    m0, m1 = table2_metrics(0.0), table2_metrics(5.0)
    fill_store(tmp_path / "s0", table, metrics=m0)
    fill_store(tmp_path / "s1", table, overrides=["train.seed=1"], metrics=m1)
    report = build_table_report(table, "smoke", load_cells([tmp_path / "s0", tmp_path / "s1"]))
    frame = report.frame
    assert list(frame.index) == ["cosine", "shifted (base 16)"]
    for i, row in enumerate(["cosine", "shifted"]):
        for col, title in (("32", "32 px (shift -1.39)"), ("64", "64 px (shift -2.77)")):
            fids = np.array([m0[(row, col)]["fid"], m1[(row, col)]["fid"]])
            # means 92.5-98.5: three significant figures = one decimal, for the std too
            want = f"{fids.mean():.1f} ± {fids.std(ddof=1):.1f} (n=2)"
            assert frame.loc[frame.index[i], f"{title}: FID ↓ (ours)"] == want
            assert f"{title}: FID ↓ (paper)" not in frame.columns  # all dashes: left out
    assert any("Seeds: 0, 1" in line for line in report.header)
    assert any("200 generated samples against 500 training images" in h for h in report.header)


def test_fmt_cell_single_and_several():
    assert fmt_cell("fid", [12.345]) == "12.3"
    assert fmt_cell("kid_mean", [0.1, 0.3]) == "0.200 ± 0.141 (n=2)"  # std: the mean's decimals
    assert fmt_cell("fid", [9.5, 10.2], decimals=2) == "9.85 ± 0.49 (n=2)"
    assert fmt_cell("params", [1.5e6]) == "1.50"  # in millions: the header says "params (M)"
    assert fmt_cell("fid", []) == "–"


def test_failed_and_missing_cells_are_labelled(tmp_path):
    table = get_table(3)
    cells = expand(table, "smoke")
    metrics = {(c.row, c.column): {"fid": 50.0 + i} for i, c in enumerate(cells)}
    fill_store(tmp_path, table, metrics=metrics, fail=[(cells[1].row, cells[1].column)])
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    values = report.frame.iloc[:, 0].tolist()
    assert values[0] == "50.0" and values[1] == "1 failed" and values[2] == "52.0"
    assert any("Failed:" in h and "RuntimeError: boom" in h for h in report.header)


def test_table7_places_ours_beside_the_literature(tmp_path):
    table = get_table(7)
    fill_store(tmp_path, table, metrics={("digits", "all"): {"fid": 40.0, "kid_mean": 0.03}})
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    ours = report.frame
    assert ours.loc["sdiff U-ViT digits (smoke, MNIST 32 px)", "FID ↓ (ours, vs train)"] == "40.0"
    assert ours.iloc[0]["scale"] == "smoke" and ours.iloc[0]["guidance w"] == "3"
    (caption, lit), = report.extra  # fmt: skip
    row = lit.frame.loc["simple diffusion U-ViT L, 256 px"]  # Table 7: 2.77 / 3.75 (IS 211.8)
    assert (row["FID train ↓"], row["FID eval ↓"], row["IS ↑"]) == ("2.77", "3.75", "211.8")
    # cited numbers keep their digits: 4.30 as 4.30 (two decimals in the column), 1.48
    assert lit.frame.loc["simple diffusion U-Net, 512 px", "FID train ↓"] == "4.30"
    assert lit.frame.loc["SiD2, 512 px", "FID train ↓"] == "1.48"
    assert set(lit.frame["scale"]) == {"literature"}
    # the best cited FID train (lowest: SiD2 256 px, 1.38) and IS (highest: 256.3) are marked
    assert list(lit.frame.index[lit.best["FID train ↓"]]) == ["SiD2, 256 px"]
    assert lit.frame.loc[lit.best["IS ↑"], "IS ↑"].tolist() == ["256.3"]
    assert not report.printed.best.to_numpy().any()  # ours: rows of several scales, no mark
    assert "simple diffusion (arXiv 2301.11093)" in caption and "SiD2 (arXiv 2410.19324)" in caption


def test_table1_per_level_layout(tmp_path):
    from sdiff.ablations.runner import run_grid

    table = get_table(1)
    run_grid(table, "smoke", tmp_path, progress=False, log=lambda s: None)
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    # U-ViT L's transformer at 16x16: a 2048 x 2048 fp32 projection = 16 MiB; (1024, 256, 2048)
    # bf16 activations = 1 GiB; ratio 64 (hand computation)
    row = report.frame.loc["U-ViT L 512, 16x16"]
    # one decimals count per column, from its smallest value to three significant figures:
    # kernels from 0.5625 MiB (3), feature maps from 0.125 GiB (3), ratios from 3.556 (2)
    assert row["kernel MiB (ours)"] == "16.000" and row["feature map GiB (ours)"] == "1.000"
    assert row["feature / kernel (ours)"] == "64.00"
    # each model lists only its own levels: U-Net 512 ... 8 (7), U-ViT L 128 ... 16 (4)
    assert len(report.frame) == 11 and "U-ViT L 512, 512x512" not in report.frame.index
    assert report.frame.loc[
        "U-Net 512 (channels 128..1024), 512x512", "feature / kernel (ours)"
    ] == (f"{1024 * 128 * 512 * 512 * 2 / (9 * 128 * 128 * 4):.2f}")


def test_latex_is_escaped_and_complete(tmp_path):
    table = get_table(2)
    fill_store(tmp_path / "a", table, metrics=table2_metrics(0))
    fill_store(tmp_path / "b", table, overrides=["train.seed=1"], metrics=table2_metrics(1))
    report = build_table_report(table, "smoke", load_cells([tmp_path / "a", tmp_path / "b"]))
    tex = to_latex(report.printed, "a_b & 100%", "tab:x")
    assert r"a\_b \& 100\%" in tex and r"$\pm$" in tex and "±" not in tex
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    assert len(body) == len(report.frame) and all(line.endswith(r"\\") for line in body)
    assert all(line.count("&") == len(report.frame.columns) for line in body)
    assert to_latex(report.frame, "plain", "tab:y").count(r"\multicolumn") == 0  # no groups


def test_plots_hold_the_data(tmp_path):
    table = get_table(2)
    curves = {("cosine", "32"): [0.9, 0.5, 0.3], ("shifted", "64"): [0.8, 0.4]}
    fill_store(tmp_path, table, metrics=table2_metrics(0), curves=curves)
    cells = load_cells([tmp_path])
    fig = plot_curves(cells, tmp_path / "c.png", "t")
    lines = [line for ax in fig.axes for line in ax.get_lines()]  # a panel per column
    assert sorted(list(line.get_ydata()) for line in lines) == sorted(curves.values())
    assert (tmp_path / "c.png").read_bytes()[:8] == PNG
    fig = plot_metrics(cells, tmp_path / "m.png", "t")
    heights = [p.get_height() for p in fig.axes[0].patches]
    order = [("cosine", "32"), ("cosine", "64"), ("shifted", "32"), ("shifted", "64")]
    assert heights == [table2_metrics(0)[key]["fid"] for key in order]
    assert plot_curves(cells.iloc[0:0], tmp_path / "none.png", "t") is None


def test_bench_plots_from_csvs(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "gpu").mkdir()
    with open(tmp_path / "bench" / "throughput.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["preset", "resolution", "batch", "backend", "compiled", "train_img_s",
                    "peak_mem_gib", "status", "device"])  # fmt: skip
        for res, ips in ((32, 100.0), (64, 30.0)):
            w.writerow(["uvit-tiny-32", res, 8, "auto", False, ips, "", "ok", "cpu (x, 2)"])
    with open(tmp_path / "gpu" / "attention.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backend", "mode", "seq_len", "head_dim", "tflops", "status", "device"])
        for b in ("triton", "sdpa-flash"):
            for n in (256, 1024):
                w.writerow([b, "fwd", n, 64, 100.0 + n / 10, "ok", "NVIDIA H200"])
    written = bench_plots(tmp_path, tmp_path / "plots")
    names = sorted(p.name for p in written)
    assert names == ["bench-attention.png", "bench-throughput.png"]  # no memory column values
    assert all(p.read_bytes()[:8] == PNG for p in written)
    assert bench_plots(tmp_path / "nothing", tmp_path / "p2") == []


def test_cli_report_one_table_all_and_errors(tmp_path, capsys):
    table = get_table(2)
    fill_store(tmp_path / "runs" / "table2-smoke", table, metrics=table2_metrics(0))
    out = tmp_path / "reports"
    assert main(["report", "2", "--store", str(tmp_path / "runs" / "table2-smoke"),
                 "--out", str(out)]) == 0  # fmt: skip
    md = (out / "tables" / "table2-smoke.md").read_text()
    # paper columns (all dashes) left out; cosine has the lower FID and KID: bold
    assert table_row(md, "cosine")[:4] == ["cosine", "**90.0**", "**0.0700**", "**91.0**"]
    assert table_row(md, "shifted (base 16)")[1] == "93.0"
    assert (out / "tables" / "table2-smoke.tex").read_text().count(r"\\") >= 3
    no_bench = ["--bench", str(tmp_path / "no-bench")]  # benchmark plots: tested below
    assert main(["report", "--all", "--runs", str(tmp_path / "runs"), "--out", str(out),
                 *no_bench]) == 0  # fmt: skip
    index = (out / "index.md").read_text()
    assert "[markdown](tables/table2-smoke.md)" in index
    capsys.readouterr()
    # a missing store, a file that is not a store, an unknown table: exit 2 naming the problem
    assert main(["report", "2", "--store", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "no results store at" in capsys.readouterr().err
    bad = tmp_path / "bad.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    assert main(["report", "2", "--store", str(bad), "--out", str(out)]) == 2
    assert "not a results store" in capsys.readouterr().err
    assert main(["report", "9", "--out", str(out)]) == 2
    assert "unknown table" in capsys.readouterr().err
    argv = ["report", "3", "--store", str(tmp_path / "runs" / "table2-smoke"), "--out", str(out)]
    assert main(argv) == 2
    assert "no cells of table 3" in capsys.readouterr().err
    # the store was only read: its cells are unchanged
    with ResultsStore(tmp_path / "runs" / "table2-smoke" / "results.sqlite") as store:
        assert [r["status"] for r in store.rows()] == ["done"] * 4


@pytest.mark.parametrize("n", [3])
def test_std_matches_numpy_for_three_seeds(tmp_path, n):
    table = get_table(6)
    fids = []
    folders = []
    for seed in range(n):
        cells = expand(table, "smoke", overrides=[f"train.seed={seed}"])
        metrics = {(c.row, c.column): {"fid": 10.0 + seed**2 + k} for k, c in enumerate(cells)}
        fids.append(metrics[(cells[0].row, cells[0].column)]["fid"])
        fill_store(tmp_path / str(seed), table, overrides=[f"train.seed={seed}"], metrics=metrics)
        folders.append(tmp_path / str(seed))
    report = build_table_report(table, "smoke", load_cells(folders))
    a = np.array(fids)
    assert report.frame.iloc[0, 0] == f"{a.mean():.1f} ± {a.std(ddof=1):.1f} (n=3)"
    json.dumps(report.header)  # plain strings


def test_demo_table_runs_the_grid_and_prints_the_report(tmp_path, capsys):
    """`make demo`'s command: the grid into OUT/table<N>-smoke, the report into OUT/report
    (Table 1 here: computed, so the wiring is tested without training)."""
    out = tmp_path / "demo"
    assert main(["demo", "--table", "1", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    md = out / "report" / "tables" / "table1-smoke.md"
    assert f"results: {md.resolve()}" in printed and "2 of 2 cells done" in printed
    assert table_row(md.read_text(), "U-ViT L 512, 16x16")[:2] == ["U-ViT L 512, 16x16", "16.000"]
    with ResultsStore(out / "table1-smoke" / "results.sqlite") as store:
        assert [r["status"] for r in store.rows()] == ["done", "done"]


def test_cells_that_differ_beyond_the_seed_are_not_averaged(tmp_path, capsys):
    table = get_table(2)
    fill_store(tmp_path / "a", table, metrics=table2_metrics(0))
    fill_store(tmp_path / "b", table, overrides=["train.total_images=40000"],
               metrics=table2_metrics(9))  # fmt: skip
    with pytest.raises(ValueError, match="differ in more than the seed"):
        build_table_report(table, "smoke", load_cells([tmp_path / "a", tmp_path / "b"]))
    argv = ["report", "2", "--store", str(tmp_path / "a"), str(tmp_path / "b")]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "report them separately" in capsys.readouterr().err
    # --all reports the other tables and says which one it skipped (exit 1)
    fill_store(tmp_path / "c", get_table(3), metrics={})
    out = tmp_path / "out"
    argv = ["report", "--all", "--store", *(str(tmp_path / x) for x in "abc"), "--out", str(out),
            "--bench", str(tmp_path / "no-bench")]  # fmt: skip
    assert main(argv) == 1
    assert "skipped: table 2" in capsys.readouterr().err
    assert (out / "tables" / "table3-smoke.md").exists()
    assert not (out / "tables" / "table2-smoke.md").exists()


def test_markdown_is_one_padded_pipe_table_per_frame(tmp_path):
    table = get_table(3)
    cells = expand(table, "smoke")
    metrics = {(c.row, c.column): {"fid": 50.0 + i} for i, c in enumerate(cells)}
    fill_store(tmp_path, table, metrics=metrics)
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    lines = to_markdown(report.frame).splitlines()
    assert len(lines) == 2 + len(report.frame) and set(lines[1]) <= {"|", "-", ":"}
    assert len({len(line) for line in lines}) == 1  # columns padded to one width
    assert table_row("\n".join(lines), report.frame.index[0])[1] == "50.0"


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A fake sdiff checkout (its committed reports/ under tmp_path); ``sha`` sets its state."""
    root = tmp_path / "checkout"
    monkeypatch.setattr(provenance, "source_root", lambda: root)

    def at(sha):
        monkeypatch.setattr(provenance, "git_sha", lambda: sha)
        return root

    return at


def test_a_dirty_tree_may_not_write_the_committed_reports(tmp_path, checkout, capsys):
    root = checkout("0123456789ab+dirty")
    fill_store(tmp_path / "runs" / "table2-smoke", get_table(2), metrics=table2_metrics(0))
    committed = root / "reports"
    assert committed_reports() == committed
    store = ["--store", str(tmp_path / "runs" / "table2-smoke")]
    for argv in (["report", "2", *store, "--out", str(committed)],
                 ["report", "--all", "--runs", str(tmp_path / "runs"), "--out", str(committed)],
                 ["report", "2", *store, "--out", str(committed / "tables" / "..")]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"refusing to write into {committed}" in err and "uncommitted changes" in err
        assert "Commit first, or pass --allow-dirty" in err
        assert not committed.exists()  # refused before anything was written
    report = build_table_report(get_table(2), "smoke", load_cells([store[1]]))
    with pytest.raises(ValueError, match="--allow-dirty"):
        write_table_report(report, committed)
    with pytest.raises(ValueError, match="--allow-dirty"):
        write_index(committed, [], [])
    # allowed when asked, and every file says it came from a dirty tree
    assert main(["report", "--all", "--runs", str(tmp_path / "runs"), "--out", str(committed),
                 "--allow-dirty", "--bench", str(tmp_path / "no-bench")]) == 0  # fmt: skip
    for name in ("tables/table2-smoke.md", "tables/table2-smoke.tex", "index.md"):
        assert DIRTY_ORIGIN in (committed / name).read_text(), name


def test_reports_elsewhere_are_written_from_any_tree(tmp_path, checkout):
    checkout("0123456789ab+dirty")
    fill_store(tmp_path / "runs", get_table(2), metrics=table2_metrics(0))
    out = tmp_path / "elsewhere"  # beside the checkout, not inside its reports/
    assert main(["report", "2", "--store", str(tmp_path / "runs"), "--out", str(out)]) == 0
    assert DIRTY_ORIGIN in (out / "tables" / "table2-smoke.md").read_text()
    checkout("0123456789ab")  # a clean tree writes the committed folder and names its commit
    committed = tmp_path / "checkout" / "reports"
    assert main(["report", "2", "--store", str(tmp_path / "runs"), "--out", str(committed)]) == 0
    for suffix in ("md", "tex"):
        text = (committed / "tables" / f"table2-smoke.{suffix}").read_text()
        assert "generated by `sdiff report` on " in text.lower()
        assert "from commit 0123456789ab" in text and "+dirty" not in text


def test_a_report_run_is_not_stopped_by_its_own_writes(tmp_path, checkout, monkeypatch):
    """`sdiff report --all` from a clean tree writes several files into the committed
    reports/; after the first, git sees the tree as changed. The origin is decided once, before
    any write, so every table and the index are written and name the clean commit."""
    root = checkout("0123456789ab")
    fill_store(tmp_path / "runs" / "table2-smoke", get_table(2), metrics=table2_metrics(0))
    fill_store(tmp_path / "runs" / "table3-smoke", get_table(3))
    answers = iter(["0123456789ab"])  # clean at the first look, dirty at every later one
    monkeypatch.setattr(provenance, "git_sha", lambda: next(answers, "0123456789ab+dirty"))
    committed = root / "reports"
    assert main(["report", "--all", "--runs", str(tmp_path / "runs"), "--out",
                 str(committed), "--bench", str(tmp_path / "no-bench")]) == 0  # fmt: skip
    for name in ("tables/table2-smoke.md", "tables/table3-smoke.md", "index.md"):
        text = (committed / name).read_text()
        assert "from commit 0123456789ab" in text and "+dirty" not in text, name


# -- printed tables: dropped columns, best marks, decimals, LaTeX ----------------------------


def table5_metrics(fids, img_s):
    """Table 5's three rows (patch, dwt, none) with the given FIDs and training img/s."""
    rows = ["patch", "dwt", "none"]
    return {
        (r, "all"): {"fid": f, "kid_mean": 0.1 + i / 100, "train_img_s": s, "gmacs": 0.07 * (i + 1)}
        for i, (r, f, s) in enumerate(zip(rows, fids, img_s, strict=True))
    }


def test_all_dash_columns_are_left_out_with_a_note():
    rows = ["a", "b"]
    data = {
        Column("FID ↓ (ours)", metric="fid"): [Entry([50.0]), Entry([60.0])],
        Column("FID ↓ (paper)", metric="fid", transcribed=True): [Entry(), Entry()],
        Column("KID ↓ (paper)", metric="kid_mean", transcribed=True): [Entry([0.25]), Entry()],
        Column("IS ↑ (ours)", metric="isc_mean"): [Entry(note="not run"), Entry()],
    }
    t = print_table(rows, data, dash_reasons={True: "not transcribed"})
    # the paper FID column is all dashes: gone; the paper KID column has one number: kept;
    # the IS column says "not run" in one entry: not a dash, kept
    assert list(t.frame.columns) == ["FID ↓ (ours)", "KID ↓ (paper)", "IS ↑ (ours)"]
    assert t.frame["KID ↓ (paper)"].tolist() == ["0.25", "–"]
    assert t.notes[0] == "Not shown, as every entry is a dash: FID ↓ (paper) (not transcribed)."
    md = to_markdown(t)
    assert "FID ↓ (paper)" not in md and "KID ↓ (paper)" in md


def test_a_report_says_which_paper_columns_it_left_out(tmp_path):
    table = get_table(2)
    fill_store(tmp_path, table, metrics=table2_metrics(0))
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    assert not any("(paper)" in c for c in report.frame.columns)
    assert len(report.frame.columns) == 4  # 2 resolutions x (FID, KID), ours only
    note = report.printed.notes[0]
    assert note.startswith("Not shown, as every entry is a dash: FID ↓ (paper), KID ↓ (paper)")
    assert "32 px (shift -1.39) and 64 px (shift -2.77)" in note and "not transcribed" in note
    out = tmp_path / "out"
    write_table_report(report, out)
    md = (out / "tables" / "table2-smoke.md").read_text()
    under = md.split(to_markdown(report.printed))[1].lstrip("\n").splitlines()[0]
    assert under.strip() == note  # the line right under the table
    assert note.replace("↓", r"$\downarrow$") in (out / "tables" / "table2-smoke.tex").read_text()


def test_best_is_the_numerically_best_done_value_in_the_metric_direction(tmp_path):
    """FID 10.2 vs 9.5: "10.2" < "9.5" as strings, 9.5 < 10.2 as numbers; the failed row's
    (none) would-be values do not count; img/s: higher is better, GMACs: no mark."""
    table = get_table(5)
    fids, img_s = [10.2, 9.5, 1.0], [100.0, 90.0, 500.0]
    fill_store(tmp_path, table, metrics=table5_metrics(fids, img_s), fail=[("none", "all")])
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    t = report.printed
    labels = list(t.frame.index)  # patching, DWT, none
    fid_col, speed_col, gmacs_col = "FID ↓ (ours)", "train img/s ↑ (ours)", "GMACs (ours)"
    assert t.best[fid_col].tolist() == [False, True, False]  # 9.5, not "10.2" nor the failed
    assert t.best[speed_col].tolist() == [True, False, False]  # 100 > 90 (500: failed cell)
    assert not t.best[gmacs_col].any()  # no direction, no mark
    assert t.frame.loc[labels[2], fid_col] == "1 failed"
    md = (write_table_report(report, tmp_path / "out")["markdown"]).read_text()
    assert table_row(md, labels[1])[1] == "**9.50**" and table_row(md, labels[0])[1] == "10.20"
    assert table_row(md, labels[0])[3] == "**100.0**"
    tex = (tmp_path / "out" / "tables" / "table5-smoke.tex").read_text()
    assert r"\textbf{9.50}" in tex and r"\textbf{100.0}" in tex and r"\textbf{10.20}" not in tex
    assert r"FID $\downarrow$ (ours)" in tex and r"train img/s $\uparrow$ (ours)" in tex


def test_ties_and_single_values_are_marked_as_numbers():
    rows = ["a", "b", "c"]
    col = Column("FID ↓", metric="fid")
    t = print_table(rows, {col: [Entry([2.0, 4.0]), Entry([3.0]), Entry([3.0])]})
    assert t.best["FID ↓"].tolist() == [True, True, True]  # means 3.0, 3.0, 3.0: a tie
    one = print_table(["a", "b"], {col: [Entry([5.0]), Entry(note="1 failed")]})
    assert not one.best["FID ↓"].any()  # one done value: nothing to compare with


def test_every_entry_of_a_column_has_the_same_decimals():
    values = [9.5, 10.2, 123.456, 0.0]
    rows = [f"r{i}" for i in range(len(values) + 1)]
    col = Column("FID ↓", metric="fid")
    entries = [Entry([v]) for v in values] + [Entry([1.25, 1.75])]
    t = print_table(rows, {col: entries})
    shown = t.frame["FID ↓"].tolist()
    # smallest nonzero magnitude 1.5 (the last row's mean) -> 3 significant figures: 2 decimals
    assert shown[:4] == ["9.50", "10.20", "123.46", "0.00"]
    std = np.std([1.25, 1.75], ddof=1)
    assert shown[4] == f"1.50 ± {std:.2f} (n=2)"
    decimals = {len(x.split(" ")[0].split(".")[1]) for x in shown}
    assert decimals == {2}
    assert [float(x.split(" ")[0]) for x in shown[:4]] == [round(v, 2) for v in values]


def latex_rows(tex: str) -> tuple[list[str], list[str]]:
    """(header lines between \\toprule and \\midrule, body lines up to \\bottomrule)."""
    head = tex.split(r"\toprule")[1].split(r"\midrule")[0].strip().splitlines()
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    return head, body


def test_latex_has_grouped_headers_balanced_braces_and_full_rows(tmp_path):
    table = get_table(2)
    fill_store(tmp_path, table, metrics=table2_metrics(0))
    report = build_table_report(table, "smoke", load_cells([tmp_path]))
    tex = to_latex(report.printed, "cap", "tab:x")
    head, body = latex_rows(tex)
    groups, rules, names = head
    # top level: the table's columns, each over its two metrics; ruled under each
    assert groups == (r"& \multicolumn{2}{c}{32 px (shift -1.39)} & "
                      r"\multicolumn{2}{c}{64 px (shift -2.77)} \\")  # fmt: skip
    assert rules == r"\cmidrule(lr){2-3} \cmidrule(lr){4-5}"
    assert names.split(" & ")[1:3] == [r"FID $\downarrow$ (ours)", r"KID $\downarrow$ (ours)"]
    ncols = 1 + len(report.frame.columns)
    assert tex.count(r"\begin{tabular}{l" + "r" * (ncols - 1) + "}") == 1
    for line in [names, *body]:
        assert line.count(" & ") == ncols - 1 and line.endswith(r"\\")
    plain = tex.replace(r"\{", "").replace(r"\}", "")
    assert plain.count("{") == plain.count("}")
    depth = 0
    for ch in plain:  # never closes more than it opened
        depth += {"{": 1, "}": -1}.get(ch, 0)
        assert depth >= 0
    assert r"\small" in tex and r"\resizebox{" in tex and r"\columnwidth" in tex
    assert r"\textbf{" in tex and r"\toprule" in tex and r"\bottomrule" in tex


# -- CLI: where reports go, nothing to report ------------------------------------------------


def test_all_without_stores_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "tables").mkdir(parents=True)
    (out / "index.md").write_text("the committed index, with links\n")
    (out / "tables" / "table2-smoke.md").write_text("a table\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    runs = tmp_path / "runs"
    assert main(["report", "--all", "--runs", str(runs), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(runs) in err and "`sdiff ablate 2 --scale smoke --out" in err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    new = tmp_path / "NEWDIR"  # a folder that does not exist: still a one-line error
    assert main(["report", "--all", "--runs", str(runs), "--out", str(new)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdiff report: nothing to report")
    assert not new.exists()
    with pytest.raises(ValueError, match="no table reports"):
        write_index(new, [], [])
    assert not new.exists()


def test_all_with_no_cells_at_the_scale_writes_nothing(tmp_path, capsys):
    fill_store(tmp_path / "runs" / "table2-smoke", get_table(2), metrics=table2_metrics(0))
    out = tmp_path / "out"
    argv = ["report", "--all", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert main([*argv, "--scale", "gpu"]) == 2
    err = capsys.readouterr().err
    assert "no cells at the gpu scale (scales found: smoke" in err
    assert not out.exists()


def test_default_out_is_runs_report_and_the_hint_names_the_ablate_command(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "2"]) == 2  # no store where `sdiff ablate 2 --preset smoke` writes
    err = capsys.readouterr().err
    assert "no results store at runs/ablate/table2-smoke/results.sqlite" in err
    assert "run `sdiff ablate 2 --scale smoke` first" in err
    fill_store(tmp_path / "runs" / "ablate" / "table2-smoke", get_table(2),
               metrics=table2_metrics(0))  # fmt: skip
    assert main(["report", "2"]) == 0
    assert (tmp_path / "runs" / "report" / "tables" / "table2-smoke.md").is_file()
    assert main(["report", "--all"]) == 0
    assert (tmp_path / "runs" / "report" / "index.md").is_file()
    assert not (tmp_path / "reports").exists()  # the committed folder only when named
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/report)" in help_text and "(default: runs/ablate)" in help_text
    assert "--out reports" in help_text


def test_index_shows_each_tables_headline(tmp_path):
    fill_store(tmp_path / "runs" / "table2-smoke", get_table(2), metrics=table2_metrics(0))
    fill_store(tmp_path / "runs" / "table5-smoke", get_table(5),
               metrics=table5_metrics([10.2, 9.5, 30.0], [100.0, 90.0, 50.0]))  # fmt: skip
    out = tmp_path / "out"
    argv = ["report", "--all", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert main([*argv, "--bench", str(tmp_path / "no-bench")]) == 0
    index = (out / "index.md").read_text()
    t2, t5 = index.split("### Table 2")[1].split("### Table 5")
    assert "[markdown](tables/table2-smoke.md)" in t2 and "[latex](tables/table2-smoke.tex)" in t2
    assert table_row(t2, "cosine")[1:3] == ["**90.0**", "**0.0700**"]
    assert table_row(t2, "shifted (base 16)")[1] == "93.0"
    dwt = get_table(5).scale("smoke").rows[1].title
    assert table_row(t5, dwt)[1] == "**9.50**"
    assert "Not shown, as every entry is a dash" in t5
    assert "## Benchmarks" not in index  # no benchmark files under --bench


def test_index_benchmark_summary(tmp_path):
    bench = tmp_path / "bench-files"
    (bench / "gpu").mkdir(parents=True)
    with open(bench / "gpu" / "attention.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["backend", "mode", "seq_len", "head_dim", "tflops", "status", "device"])
        for b, base in (("triton", 300.0), ("sdpa-flash", 200.0)):
            for n in (256, 1024):
                w.writerow([b, "fwd", n, 64, base + n / 100, "ok", "NVIDIA H200"])
    fill_store(tmp_path / "runs" / "table2-smoke", get_table(2), metrics=table2_metrics(0))
    out = tmp_path / "out"
    argv = ["report", "--all", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    assert main([*argv, "--bench", str(bench)]) == 0
    index = (out / "index.md").read_text()
    # at the longest sequence (1024): triton 310.24, sdpa-flash 210.24, the fastest in bold
    assert table_row(index, "fwd")[1:] == ["64", "1024", "210.2", "**310.2**"]
    assert "[plots/bench-attention.png](plots/bench-attention.png)" in index
    assert "(../bench-files/gpu/attention.csv)" in index
