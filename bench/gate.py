"""The deterministic regression gate: figures that must not grow unnoticed, checked on every CI run.

    python -m sdiff.bench.gate            # compare with bench/baseline.json; exit 1 on growth
    python -m sdiff.bench.gate --update   # rewrite the baseline on purpose (make bench-baseline)

Figures (all exact functions of the code, so any change is a real change, never noise):
- parameters and multiply-accumulates per forward of every model preset (meta device);
- graph breaks of the tiny U-ViT and U-Net under ``torch._dynamo.explain``, per attention
  backend the machine can run (sdpa, math, and triton when CUDA or the interpreter is there);
- the estimated peak training memory of U-ViT L at 512 px (``sdiff bench memory``), batch
  ``MEMORY_BATCH``, bf16, with and without activation checkpointing.
A figure fails the gate when it grows by more than its threshold (``THRESHOLDS``, relative;
graph breaks: any increase). Shrinking passes and is listed, so the baseline can be tightened
with ``--update``. New or removed figures are reported; a removed one fails (it may hide a
regression), a new one passes until the baseline is updated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BASELINE = Path(__file__).with_name("baseline.json")
MEMORY_BATCH = 32
THRESHOLDS = {"params": 0.0, "macs": 0.005, "memory": 0.01, "graph_breaks": 0.0}

__all__ = ["THRESHOLDS", "compare", "current_figures", "main"]


def _kind(key: str) -> str:
    return key.split("/")[0]


def current_figures(memory: bool = True) -> dict[str, float]:
    """Every gated figure, keyed "<kind>/<what>"."""
    from dataclasses import replace

    import torch

    from sdiff.kernels.attention import interpreting
    from sdiff.models.flops import example_inputs, model_stats
    from sdiff.models.presets import PRESETS, build_model, get_preset

    out: dict[str, float] = {}
    for name, cfg in PRESETS.items():
        stats = model_stats(cfg)
        out[f"params/{name}"] = stats.params
        out[f"macs/{name}"] = stats.macs
    backends = ["sdpa", "math"] + (
        ["triton"] if torch.cuda.is_available() or interpreting() else []
    )
    for preset in ("uvit-tiny-32", "unet-tiny-32"):
        for backend in backends:
            torch._dynamo.reset()
            cfg = replace(get_preset(preset), attention_backend=backend, dropout=0.0)
            model = build_model(cfg).eval()
            explained = torch._dynamo.explain(model)(*example_inputs(cfg, 2, device="cpu"))
            out[f"graph_breaks/{preset}/{backend}"] = explained.graph_break_count
    if memory:
        from sdiff.bench.memory import estimate_training_memory

        for ckpt in (False, True):
            report = estimate_training_memory(
                get_preset("uvit-l-512"), MEMORY_BATCH, dtype="bf16", checkpoint=ckpt
            )
            tag = "checkpointed" if ckpt else "plain"
            out[f"memory/uvit-l-512/batch{MEMORY_BATCH}/{tag}"] = report.total
    return out


def compare(
    baseline: dict[str, float], current: dict[str, float], thresholds: dict[str, float] = THRESHOLDS
) -> tuple[list[str], list[str]]:
    """(failures, notes): readable lines, one per figure that grew, vanished, shrank or is new."""
    failures, notes = [], []
    for key in sorted(set(baseline) | set(current)):
        old, new = baseline.get(key), current.get(key)
        if new is None:
            failures.append(f"{key}: in the baseline ({old:,}) but no longer measured")
            continue
        if old is None:
            notes.append(f"{key}: new figure {new:,} (not in the baseline yet)")
            continue
        limit = thresholds.get(_kind(key), 0.0)
        growth = (new - old) / old if old else (float("inf") if new > old else 0.0)
        if new > old and growth > limit:
            failures.append(
                f"{key}: {old:,} -> {new:,} (+{growth:.2%}, allowed +{limit:.2%})"
                if old else f"{key}: {old:,} -> {new:,} (allowed: no increase)"
            )  # fmt: skip
        elif new < old:
            notes.append(f"{key}: {old:,} -> {new:,} ({growth:.2%}); update the baseline")
    return failures, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sdiff.bench.gate", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--update", action="store_true", help="rewrite the baseline with today's figures"
    )
    p.add_argument("--baseline", default=str(BASELINE))
    from sdiff.util.cli_args import show_defaults

    args = show_defaults(p).parse_args(argv)
    if not Path("/dev/nvidiactl").exists():  # as tests/conftest.py: interpret Triton on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    current = current_figures()
    path = Path(args.baseline)
    if args.update:
        path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        print(f"baseline written: {path} ({len(current)} figures)")
        return 0
    if not path.exists():
        print(f"no baseline at {path}; create it with --update", file=sys.stderr)
        return 2
    failures, notes = compare(json.loads(path.read_text()), current)
    for line in notes:
        print(f"note: {line}")
    for line in failures:
        print(f"FAIL: {line}")
    print(f"{len(current)} figures checked against {path}: {len(failures)} regressions")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
