"""`sdiff report`'s plots, read back from the matplotlib figures they return: labels with units
and directions, the values written on the bars, colours by the table's row and its labels,
log-scale loss panels per column, the benchmark plots' series, stacked memory parts and
attention ratios, each against numbers computed here."""

import csv

import numpy as np
import pandas as pd
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer
from PIL import Image

from sdiff.ablations import get_table
from sdiff.report import (
    GIB,
    bench_plots,
    plot_attention,
    plot_curves,
    plot_memory,
    plot_metrics,
    plot_throughput,
)

PNG = b"\x89PNG\r\n\x1a\n"


def cells_frame(tmp_path, cells):
    """load_cells' frame for hand-made cells: (row, column, seed, status, metrics, curve)."""
    records = []
    for i, (row, column, seed, status, metrics, curve) in enumerate(cells):
        run = tmp_path / "cells" / str(i)
        if curve:
            run.mkdir(parents=True)
            with open(run / "metrics.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["step", "images", "loss"])
                w.writerows([k + 1, 100 * (k + 1), loss] for k, loss in enumerate(curve))
        rec = {"row": row, "column": column, "seed": seed, "status": status, "run_dir": str(run)}
        records.append(rec | {f"m.{k}": v for k, v in metrics.items()})
    return pd.DataFrame.from_records(records)


TABLE2 = get_table(2)
ROW_TITLES = ["cosine", "shifted (base 16)"]  # the table's labels of rows cosine, shifted
COLUMN_TITLES = ["32 px (shift -1.39)", "64 px (shift -2.77)"]


def test_the_table_labels_are_the_ones_tested():
    s = TABLE2.scale("smoke")
    assert [r.title for r in s.rows] == ROW_TITLES and [r.name for r in s.rows][1] == "shifted"
    assert [c.title for c in s.columns] == COLUMN_TITLES


def test_metric_bars_carry_values_directions_and_row_colours(tmp_path):
    cells = cells_frame(tmp_path, [
        ("cosine", "32", 0, "done", {"fid": 10.0, "kid_mean": 0.02, "kid_std": 0.001}, None),
        ("cosine", "32", 1, "done", {"fid": 10.5, "kid_mean": 0.03, "kid_std": 0.001}, None),
        ("cosine", "64", 0, "done", {"fid": 120.0, "kid_mean": 0.2, "kid_std": 0.004}, None),
        ("shifted", "32", 0, "done", {"fid": 9.5, "kid_mean": 0.01, "kid_std": 0.002}, None),
        ("shifted", "64", 0, "failed", {}, None),
    ])  # fmt: skip
    fig = plot_metrics(cells, tmp_path / "m.png", "Table 2", table=TABLE2, scale="smoke")
    fid, kid = fig.axes
    assert fid.get_ylabel() == "FID (lower is better)"
    assert kid.get_ylabel() == "KID (lower is better)"
    # bars: cosine 32 (mean of two seeds), cosine 64, shifted 32; shifted 64 failed
    want = [np.mean([10.0, 10.5]), 120.0, 9.5]
    assert [p.get_height() for p in fid.patches] == want
    # the values on the bars, every one with the decimals of the smallest (9.5: two)
    texts = [t.get_text() for t in fid.texts]
    assert texts == ["10.25", "120.00", "9.50", "not done"]
    # colour by the table's row: cosine's two bars share one, shifted's differs
    colours = [to_hex(p.get_facecolor()) for p in fid.patches]
    assert colours[0] == colours[1] != colours[2]
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ROW_TITLES  # labels, not "shifted"
    assert [to_hex(h.get_facecolor()) for h in legend.legend_handles] == colours[1:]
    assert [t.get_text() for t in fid.get_xticklabels()] == COLUMN_TITLES
    # error bars: the sample std over the seeds; one seed's KID: its subset std
    assert np.isclose(error_bar(fid, 0), np.std([10.0, 10.5], ddof=1))
    assert error_bar(fid, 1) == 0  # one seed: no error bar for FID
    assert np.isclose(error_bar(kid, 1), 0.004)
    assert (tmp_path / "m.png").read_bytes()[:8] == PNG


def error_bar(ax, i):
    """Half the length of the error bar on the ``i``-th bar of ``ax`` (0 without one)."""
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    if bars[i].errorbar is None:
        return 0
    ((_, low), (_, high)), = bars[i].errorbar.lines[2][0].get_segments()  # fmt: skip
    return (high - low) / 2


def test_loss_curves_one_log_panel_per_column(tmp_path):
    curves = {("cosine", "32"): [0.9, 0.5, 0.3], ("shifted", "32"): [0.8, 0.6],
              ("cosine", "64"): [1.2, 0.7]}  # fmt: skip
    cells = cells_frame(tmp_path, [
        (row, col, 0, "done", {"fid": 1.0}, curve) for (row, col), curve in curves.items()
    ])  # fmt: skip
    fig = plot_curves(cells, tmp_path / "c.png", "Table 2", table=TABLE2, scale="smoke")
    assert len(fig.axes) == 2  # one per resolution (column of the table)
    for ax, col, title in zip(fig.axes, ["32", "64"], COLUMN_TITLES, strict=True):
        assert ax.get_yscale() == "log"
        assert ax.get_title() == f"training loss, {title}"
        lines = {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
        want = {ROW_TITLES[["cosine", "shifted"].index(r)]: y
                for (r, c), y in curves.items() if c == col}  # fmt: skip
        assert lines == want
    assert "log scale" in fig.axes[0].get_ylabel() and fig.axes[0].get_xlabel()
    width, height = fig.get_size_inches() * 110
    assert Image.open(tmp_path / "c.png").size == (round(width), round(height))


def throughput_rows():
    rows = []
    for batch in (8, 32):
        for compiled in (False, True):
            for res in (32, 64):
                ips = 100.0 * batch / res * (1.5 if compiled else 1.0)
                rows.append({"preset": "uvit-tiny-32", "resolution": res, "batch": batch,
                             "backend": "auto", "compiled": compiled, "train_img_s": ips,
                             "mfu": ips / 10000, "status": "ok", "device": "GPU X"})  # fmt: skip
    return pd.DataFrame(rows)


def test_throughput_plot_separates_batch_and_compilation_and_has_mfu(tmp_path):
    rows = throughput_rows()
    _, fig = plot_throughput(rows, tmp_path / "t.png")
    speed, mfu = fig.axes  # no peak memory column: two panels
    assert speed.get_yscale() == "log" and "img/s" in speed.get_ylabel()
    assert "higher is better" in speed.get_ylabel() and "MFU" in mfu.get_ylabel()
    lines = speed.get_lines()
    assert len(lines) == 4  # batch 8 and 32, eager and compiled
    styles = {(line.get_marker(), line.get_linestyle()) for line in lines}
    assert len({m for m, _ in styles}) == 2 and {s for _, s in styles} == {"-", "--"}
    # the MFU panel draws the same series, in percent: 100 x (img/s / 10000), as made above
    for fast, util in zip(lines, mfu.get_lines(), strict=True):
        assert (util.get_marker(), util.get_linestyle()) == (
            fast.get_marker(), fast.get_linestyle())  # fmt: skip
        assert np.allclose(util.get_ydata(), 100 * np.asarray(fast.get_ydata()) / 10000)
        assert list(util.get_xdata()) == [32, 64]
    compiled = [line for line in lines if line.get_linestyle() == "--"]
    assert all(line.get_markerfacecolor() == "white" for line in compiled)


def test_memory_plot_stacks_the_estimate_beside_the_measurement(tmp_path):
    record = {
        "model": "uvit-l-512", "resolution": 512, "batch": 32, "dtype": "bf16",
        "checkpoint": False, "weights": 1 * GIB, "gradients": 1 * GIB, "optimizer": 2 * GIB,
        "ema": 1 * GIB, "activations": 3 * GIB, "peak": 9 * GIB, "peak_phase": "backward",
        "budget_gib": 80.0,
        "measured": {"static": 5.5 * GIB, "forward_end": 8.25 * GIB, "peak": 9.125 * GIB,
                     "method": "torch.cuda.max_memory_allocated"},
    }  # fmt: skip
    _, fig = plot_memory([record], tmp_path / "mem.png")
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    # estimate: weights, gradients, optimizer, EMA, activations, then up to the peak (1 GiB);
    # measured: the model state (5.5), activations (8.25 - 5.5), the rest of the peak
    assert np.allclose(heights, [1, 1, 2, 1, 3, 1, 5.5, 2.75, 0.875])
    assert [t.get_text() for t in ax.texts][:2] == ["9.0", "9.1"]  # totals on the bars
    assert any(list(line.get_ydata()) == [80.0, 80.0] for line in ax.get_lines())
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    for part in ("weights", "gradients", "optimizer (Adam)", "EMA", "activations"):
        assert part in labels
    assert "80 GiB budget" in labels
    assert "not recorded separately" in legend.get_title().get_text().replace("\n", " ")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["estimate", "measured"]


def test_attention_plot_has_a_ratio_panel(tmp_path):
    tflops = {("triton", 256): 300.0, ("sdpa-flash", 256): 200.0, ("sdpa-cudnn", 256): 250.0,
              ("triton", 1024): 320.0, ("sdpa-flash", 1024): 400.0,
              ("sdpa-cudnn", 1024): 380.0}  # fmt: skip
    rows = pd.DataFrame([
        {"backend": b, "mode": "fwd", "seq_len": n, "head_dim": 64, "tflops": t,
         "status": "ok", "device": "GPU X"} for (b, n), t in tflops.items()
    ])  # fmt: skip
    _, fig = plot_attention(rows, tmp_path / "a.png")
    top, ratio = fig.axes
    assert "TFLOP/s" in top.get_ylabel() and "fastest" in ratio.get_ylabel()
    best_sdpa = {256: 250.0, 1024: 400.0}  # by hand: the faster of flash and cudnn
    checked = 0
    for line in ratio.get_lines():
        if list(line.get_ydata()) == [1.0, 1.0] and line.get_marker() in ("None", ""):
            continue  # the line at 1
        backend = next(b for b in ("triton", "sdpa-flash", "sdpa-cudnn")
                       if to_hex(line.get_color()) == to_hex(colour_of(top, b)))  # fmt: skip
        want = [tflops[(backend, n)] / best_sdpa[n] for n in (256, 1024)]
        assert np.allclose(line.get_ydata(), want)
        checked += 1
    assert checked == 3
    assert [t.get_text() for t in ratio.get_xticklabels()] == ["256", "1024"]


def colour_of(ax, label):
    return next(line.get_color() for line in ax.get_lines() if line.get_label() == label)


def test_bench_plots_writes_the_files_it_finds(tmp_path):
    (tmp_path / "gpu").mkdir()
    throughput_rows().to_csv(tmp_path / "gpu" / "throughput.csv", index=False)
    written = bench_plots(tmp_path, tmp_path / "plots")
    assert [p.name for p in written] == ["bench-throughput.png"]  # no memory, no attention
    assert Image.open(written[0]).format == "PNG"


def test_a_large_sample_grid_is_shrunk_and_a_small_one_copied_as_is(tmp_path):
    from PIL import Image

    from sdiff.report import GRID_MAX_PX, copy_grid

    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (1200, 2560), dtype=np.uint8)).save(big)
    small = tmp_path / "small.png"
    Image.fromarray(rng.integers(0, 255, (64, 96), dtype=np.uint8)).save(small)
    with Image.open(copy_grid(big, tmp_path / "a.png")) as out:
        assert out.size == (GRID_MAX_PX, round(1200 * GRID_MAX_PX / 2560))
    assert copy_grid(small, tmp_path / "b.png").read_bytes() == small.read_bytes()
