"""The GPU step-profile script's bookkeeping, run on the CPU with a tiny case (no GPU here)."""

from __future__ import annotations

import time

from sdiff.bench.gpu.step_profile import CASES, run_case


def test_a_tiny_case_fills_its_rows_and_ratios(tmp_path):
    case = ("tiny", "uvit-tiny-32", 32, 2, [
        ("eager", False, {}, True),
        ("eager, selective", False, {"checkpoint_plan": ("blocks=selective",)}, False),
        ("eager, bad plan", False, {"checkpoint_plan": ("blocks=half",)}, False),
        ("eager, channels_last", False, {"channels_last": True}, False),
    ])  # fmt: skip
    rows = []
    run_case(case, tmp_path, time.time() + 600, rows.append, "cpu", device="cpu")
    assert [r["status"] for r in rows[:2]] == ["ok", "ok"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 0
    assert rows[0]["estimate_gib"] > 0 and rows[1]["estimate_gib"] < rows[0]["estimate_gib"]
    assert rows[2]["status"].startswith("failed: ValueError") and "half" in rows[2]["status"]
    assert rows[3]["status"] == "ok"
    rows.clear()
    run_case(case, tmp_path, time.time() - 1, rows.append, "cpu", device="cpu")
    assert {r["status"] for r in rows} == {"skipped: time budget"}


def test_the_gpu_cases_are_valid_configs():
    from dataclasses import replace

    from sdiff.bench.throughput import at_resolution
    from sdiff.models.presets import get_preset

    for _, preset, res, _, variants in CASES:
        for _, _, overrides, _ in variants:
            fields = {k: v for k, v in overrides.items() if k != "channels_last"}
            replace(at_resolution(get_preset(preset), res), **fields)  # raises if invalid
