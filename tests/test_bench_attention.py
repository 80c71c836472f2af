"""The attention benchmark script runs end to end on CPU at toy sizes and writes its rows."""

import csv

from sdiff.bench import bench_attention as bench


def test_bench_attention_cpu_smoke(tmp_path):
    out, md = tmp_path / "a.csv", tmp_path / "a.md"
    args = ["--device", "cpu", "--dtype", "float32", "--head-dims", "32", "--lengths", "64",
            "--tokens", "128", "--width", "64", "--backends", "triton", "sdpa-math",
            "--csv", str(out), "--markdown", str(md)]  # fmt: skip
    assert bench.main(args) == 0
    rows = list(csv.DictReader(open(out)))
    assert {(r["backend"], r["mode"]) for r in rows} == {
        (b, m) for b in ("triton", "sdpa-math") for m in ("fwd", "fwd+bwd")
    }
    for r in rows:
        assert r["status"] == "ok" and float(r["tflops"]) > 0
        assert (int(r["batch"]), int(r["heads"]), int(r["seq_len"])) == (2, 2, 64)
        assert r["torch"] and r["git_sha"] and r["device"].startswith("cpu")
    fwd = {r["backend"]: float(r["tflops"]) for r in rows if r["mode"] == "fwd"}
    ratio = [
        float(r["ratio_best_sdpa"]) for r in rows if r["mode"] == "fwd" and r["backend"] == "triton"
    ]
    assert abs(ratio[0] - fwd["triton"] / fwd["sdpa-math"]) < 0.01
    assert md.read_text().startswith("# Attention TFLOP/s on cpu")


def test_unavailable_backend_is_a_row_not_a_crash(tmp_path):
    # head dim 24 is not one the triton kernel supports
    row = bench.bench_one("triton", "fwd", 1, 1, 16, 24, __import__("torch").float32, "cpu")
    assert row["tflops"] is None and row["status"].startswith("unavailable")
