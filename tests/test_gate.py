"""The deterministic regression gate against the committed baseline (bench/baseline.json).

If this fails because a change grew a figure on purpose, update the baseline with
`make bench-baseline` and commit it; the failure message lists every figure that grew.
"""

import json

import pytest

from sdiff.bench.gate import BASELINE, THRESHOLDS, compare, current_figures


@pytest.fixture(scope="module")
def figures():
    return current_figures()


def test_no_gated_figure_grew(figures):
    failures, notes = compare(json.loads(BASELINE.read_text()), figures)
    assert not failures, "regression gate:\n" + "\n".join(failures + notes)


def test_the_gate_can_fail(figures):
    grown = dict(figures)
    key = "macs/uvit-l-256"
    grown[key] = figures[key] * (1 + 2 * THRESHOLDS["macs"])
    grown["graph_breaks/uvit-tiny-32/sdpa"] = figures["graph_breaks/uvit-tiny-32/sdpa"] + 1
    failures, _ = compare(figures, grown)
    assert len(failures) == 2 and any(key in f and "+1.00%" in f for f in failures)
    within = dict(figures)
    within[key] = figures[key] * (1 + THRESHOLDS["macs"] / 2)
    assert compare(figures, within)[0] == []
    smaller = {k: v for k, v in figures.items() if k != key}
    assert any("no longer measured" in f for f in compare(figures, smaller)[0])
    assert any("update the baseline" in n for n in compare(grown, figures)[1])


def test_the_baseline_covers_every_figure(figures):
    assert set(json.loads(BASELINE.read_text())) == set(figures)
