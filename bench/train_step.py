"""Cost of one training step (forward, backward, clip, Adam, EMA) per model preset.

    python bench/train_step.py --presets unet-tiny-32 uvit-tiny-32 uvit-digits-32 --batch 64

Runs the trainer's own ``train_step`` on random data of the preset's shape (so the number is
the model's, not the data loader's), warms up, then reports the median over the timed steps,
side by side in one process. Rows are appended to a CSV with the device, versions, git SHA and
date. The full benchmark suite (compile, memory, MFU, GPUs) arrives with the benchmarks issue.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

from sdiff.bench import git_sha
from sdiff.cli_args import ExtendList
from sdiff.config import RunConfig, TrainConfig
from sdiff.data import DataConfig
from sdiff.presets import get_preset
from sdiff.train import Trainer


def measure(preset: str, batch: int, warmup: int, steps: int, run_dir: Path) -> dict:
    model = get_preset(preset)
    data = DataConfig(name="mnist", resolution=model.resolution, channels=model.in_channels)
    if model.in_channels == 3:
        data = DataConfig(name="photos", resolution=model.resolution, channels=3, num_crops=64)
    config = RunConfig(model=model, data=data, train=TrainConfig(batch_size=batch))
    trainer = Trainer(config, run_dir / preset, progress=False)
    gen = torch.Generator().manual_seed(0)
    c, r = model.in_channels, model.resolution
    x = torch.rand(batch, c, r, r, generator=gen) * 2 - 1
    y = torch.randint(0, max(model.num_classes, 1), (batch,), generator=gen)
    y = y if model.num_classes else None
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        trainer.train_step(x, y)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    ms = statistics.median(times) * 1000
    return {
        "preset": preset,
        "batch": batch,
        "ms_per_step": round(ms, 2),
        "img_per_s": round(batch / ms * 1000, 1),
        "timed_steps": steps,
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": str(torch.__version__),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--presets",
        nargs="+",
        action=ExtendList,
        default=["unet-tiny-32", "uvit-tiny-32", "uvit-digits-32"],
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--csv", default="runs/bench/train_step_cpu.csv")
    p.add_argument("--work", default="runs/bench/train_step_runs")
    args = p.parse_args()
    rows = [measure(n, args.batch, args.warmup, args.steps, Path(args.work)) for n in args.presets]
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)
    for row in rows:
        print(
            f"{row['preset']:>16}  batch {row['batch']}: {row['ms_per_step']:8.1f} ms/step "
            f"({row['img_per_s']} img/s), median of {row['timed_steps']}"
        )
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
