"""`sdiff bench`: the throughput table on CPU, resolution scaling of presets, MFU bookkeeping."""

import csv

import pytest

from sdiff.bench.throughput import at_resolution, measure, peak_for_name
from sdiff.cli import main
from sdiff.models.presets import get_preset
from sdiff.util.provenance import device_label


def test_bench_prints_a_table_and_appends_rows(tmp_path, capsys):
    out = tmp_path / "t.csv"
    args = ["bench", "--model", "uvit-tiny-32", "unet-tiny-32", "--res", "32", "--batch", "4",
            "--steps", "2", "--warmup", "1", "--sample-steps", "8", "--csv", str(out)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train_img_s" in printed and "uvit-tiny-32" in printed
    rows = list(csv.DictReader(open(out)))
    assert [r["preset"] for r in rows] == ["uvit-tiny-32", "unet-tiny-32"]
    for r in rows:
        assert r["status"] == "ok" and float(r["train_img_s"]) > 0
        # img/s and ms/step describe the same median; sampling img/s = evaluations/s / steps
        assert float(r["train_img_s"]) == pytest.approx(4 / (float(r["train_ms"]) / 1000), rel=1e-3)
        assert float(r["sample_img_s"]) == pytest.approx(float(r["sample_evals_s"]) / 8, rel=1e-3)
        assert r["mfu"] == "" and r["peak_mem_gib"] == ""  # CPU: no peak, no CUDA allocator
        assert r["git_sha"] and r["torch"] and r["date"]
        assert r["device"] == device_label("cpu")  # sdiff.util.provenance's stamp
    assert main(args) == 0  # appends
    assert len(list(csv.DictReader(open(out)))) == 4


def test_training_flops_follow_the_mac_count():
    row = measure("uvit-tiny-32", 32, 2, compiled=False, device=__import__("torch").device("cpu"),
                  warmup=1, steps=2, sample_steps=4)  # fmt: skip
    from sdiff.models.flops import model_stats

    macs = model_stats(get_preset("uvit-tiny-32")).macs
    assert row["train_tflops"] == pytest.approx(
        6 * macs * row["train_img_s"] / 1e12, rel=1e-2, abs=1e-3
    )


def test_scaling_presets_across_resolutions():
    uvit = at_resolution(get_preset("uvit-l-256"), 512)
    assert uvit.patch_size == 4 and uvit.level_sides() == [128, 64, 32]
    assert at_resolution(get_preset("uvit-l-256"), 128).patch_size == 1
    with pytest.raises(ValueError, match="cannot reach"):
        at_resolution(get_preset("uvit-l-256"), 64)
    unet = at_resolution(get_preset("unet-128"), 512)
    assert (unet.downsample, unet.dwt_levels) == ("dwt", 2)
    assert unet.level_sides() == get_preset("unet-128").level_sides()
    small = at_resolution(get_preset("unet-tiny-32"), 16)
    assert small.attention_resolutions == (8,) and small.level_sides() == [16, 8]


def test_peaks_and_bad_rows(tmp_path, capsys):
    assert peak_for_name("NVIDIA H100 80GB HBM3") == 989.4
    assert peak_for_name("NVIDIA H100 PCIe") == 756.0
    assert peak_for_name("NVIDIA H200") == 989.4
    assert peak_for_name("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_for_name("NVIDIA GeForce GTX 1080") is None
    out = tmp_path / "t.csv"
    assert main(["bench", "--model", "uvit-l-256", "--res", "64", "--csv", str(out)]) == 0
    assert "unavailable: ValueError" in next(iter(csv.DictReader(open(out))))["status"]
    assert main(["bench", "--model", "uvit-tiny-32", "--time-budget", "0", "--csv", str(out)]) == 0
    assert list(csv.DictReader(open(out)))[-1]["status"] == "skipped: time budget"
    assert main(["bench", "--model", "nope"]) == 2
    assert "unknown model preset 'nope'" in capsys.readouterr().err
