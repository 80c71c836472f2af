"""Variants of the real training step side by side on one GPU, and where its time goes.

    python3 -m sdiff.bench.gpu.step_profile --out DIR [--time-budget S]

For each case (model, resolution, batch) and variant (eager or compiled; ``kernels`` "torch"
or "triton": the fused LayerNorm + adaLN and GroupNorm + scale-shift + SiLU kernels; a
``checkpoint_plan``), the step of ``sdiff.bench.throughput`` (the trainer's ``prepare_batch``
and ``train_step`` on a fresh state, bf16 autocast, random images): median step time over a
few steps after warm-up, MFU (6 x forward MACs x images/s over the GPU's bf16 peak, as the
throughput benchmark), ``torch.cuda.max_memory_allocated``. The compiled step of the first
variants marked for it (the compiled U-ViT L 256 and U-Net 512 steps) are then profiled over two
steps with ``torch.profiler``: the top kernels by CUDA time go to DIR/profile_<case>.txt. Eager
rows also carry the memory estimator's peak for the same step (``estimate_gib``). Rows go to
DIR/step_profile.csv (one per variant, speed-ups against the case's first variant) as they are
measured, so a cut-off run keeps what it did.
"""

from __future__ import annotations

import argparse
import csv
import functools
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from sdiff.bench.memory import estimate_training_memory
from sdiff.bench.throughput import (
    _timed,
    at_resolution,
    make_train_step,
    peak_tflops,
    random_batch,
    run_config,
)
from sdiff.models.flops import model_stats
from sdiff.models.presets import get_preset
from sdiff.util.cli_args import ExtendList

# (case, preset, resolution, batch, [(variant, compiled, model overrides, profile it)]); the
# first variant of a case is the reference of its speed-up column; "channels_last" (not a config
# field) puts the model's weights and the images in NHWC. Compiling U-ViT L takes
# ~100 s on an H200, so compiled variants are few: this list fits the 8-minute suite.
SELECTIVE = ("levels=selective", "blocks=selective")
CASES = [
    ("uvit_l_256", "uvit-l-256", 256, 32, [
        ("compiled", True, {}, True),
        ("eager", False, {}, False),
        ("eager, triton norms", False, {"kernels": "triton"}, False),
        ("compiled, triton norms", True, {"kernels": "triton"}, False),
    ]),
    ("unet_512", "unet-512", 512, 8, [
        ("eager", False, {}, False),
        ("eager, triton norms", False, {"kernels": "triton"}, False),
        ("eager, channels_last", False, {"channels_last": True}, False),
        ("compiled", True, {}, True),
    ]),
    ("uvit_l_512", "uvit-l-512", 512, 32, [
        ("eager, plan level.0=selective", False, {"checkpoint_plan": ("level.0=selective",)},
         False),
        ("eager, selective everywhere", False, {"checkpoint_plan": SELECTIVE}, False),
        ("eager, full checkpointing", False, {"checkpoint_plan": ("levels=full", "blocks=full")},
         False),
    ]),
]  # fmt: skip
FIELDS = ["case", "variant", "status", "step_ms", "img_s", "mfu", "peak_gib", "estimate_gib",
          "speedup", "compile_s", "torch", "gpu"]  # fmt: skip


def _profile(one_step, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            one_step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    path.write_text(table)


def run_case(case, out: Path, deadline: float, writer, gpu: str, device: str = "cuda") -> None:
    """Measure one case's variants (module docstring); ``device`` other than cuda: tests."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    name, preset, res, batch, variants = case
    reference = None
    for variant, compiled, overrides, profiled in variants:
        row = {"case": name, "variant": variant, "torch": torch.__version__, "gpu": gpu}
        if time.time() > deadline:
            row["status"] = "skipped: time budget"
            writer(row)
            continue
        try:
            fields = {k: v for k, v in overrides.items() if k != "channels_last"}
            model = replace(at_resolution(get_preset(preset), res), **fields)
            macs = model_stats(model).macs
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            config = run_config(model, batch, compiled=compiled)
            state, step = make_train_step(config, dev)
            x, y = random_batch(model, batch, dev)
            if overrides.get("channels_last"):  # the convs' weights and the images in NHWC
                state.model.to(memory_format=torch.channels_last)
                x = x.contiguous(memory_format=torch.channels_last)
            one = functools.partial(step, x, y)
            first = _timed(one, dev)
            one()
            times = [_timed(one, dev) for _ in range(5)]
            step_s = statistics.median(times)
            img_s = batch / step_s
            peak = peak_tflops(dev)
            row |= {
                "status": "ok",
                "step_ms": round(1000 * step_s, 2),
                "img_s": round(img_s, 2),
                "mfu": round(6 * macs * img_s / 1e12 / peak, 4) if peak else None,
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                "compile_s": round(first - step_s, 1) if compiled else None,
            }
            if reference is None:
                reference = step_s
            row["speedup"] = round(reference / step_s, 3)
            if not compiled:  # the estimator models the eager step
                est = estimate_training_memory(model, batch, checkpoint=model.checkpoint_plan)
                row["estimate_gib"] = round(est.peak / 2**30, 4)
            if profiled and cuda and time.time() < deadline:
                _profile(one, out / f"profile_{name}.txt")
            del state, step, one
        except Exception as err:  # one variant must not stop the run
            text = str(err).splitlines()[0][:160] if str(err) else ""
            row["status"] = f"failed: {type(err).__name__}: {text}"
        finally:
            if cuda:
                torch.cuda.empty_cache()
        writer(row)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m sdiff.bench.gpu.step_profile")
    p.add_argument("--out", required=True)
    p.add_argument("--time-budget", type=float, default=240.0, help="seconds (default 240)")
    p.add_argument(
        "--cases", nargs="+", action=ExtendList, default=None, help="case names (default: all)"
    )
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("step_profile needs a CUDA GPU")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + a.time_budget
    gpu = torch.cuda.get_device_name(0)
    path = out / "step_profile.csv"
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()

        def writer(row: dict) -> None:
            w.writerow(row)
            f.flush()
            print(", ".join(f"{k}={row.get(k)}" for k in FIELDS[:8]), flush=True)

        for case in CASES:
            if a.cases is None or case[0] in a.cases:
                run_case(case, out, deadline, writer, gpu)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
