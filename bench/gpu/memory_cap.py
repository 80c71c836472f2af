"""The largest U-ViT L batch at 512 within a memory budget: the estimate, then a measured
training step at that batch (and one more) with the CUDA allocator capped at the budget.

    python -m sdiff.bench.gpu.memory_cap --model uvit-l-512 --budget-gib 80 --json out.json

``torch.cuda.set_per_process_memory_fraction`` caps this process at ``budget`` bytes, so a
card with more memory (an H200's 141 GB) answers for an 80 GB one: "fits" means the step ran
under the cap, "out of memory" that the allocator refused. Without checkpointing only (with it,
the largest batch is in the hundreds and its step takes too long for a GPU check).
"""

from __future__ import annotations

import argparse
import gc
import json
from pathlib import Path

import torch

from sdiff.bench.memory import GiB, estimate_training_memory, largest_batch, measure_training_memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="uvit-l-512")
    p.add_argument("--budget-gib", type=float, default=80.0)
    p.add_argument("--step", type=int, default=2, help="batch step between tries")
    p.add_argument("--tries", type=int, default=4)
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    budget = int(a.budget_gib * GiB)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)
    est = largest_batch(a.model, budget)
    rows: list[dict] = []

    def attempt(batch: int) -> bool:
        estimate = estimate_training_memory(a.model, batch).peak / GiB
        row = {"model": a.model, "budget_gib": a.budget_gib, "estimated_largest": est,
               "batch": batch, "estimated_peak_gib": estimate}  # fmt: skip
        try:
            m = measure_training_memory(a.model, batch)
            row |= {"status": "fits", "measured_peak_gib": m["peak"] / GiB, "step_s": m["step_s"]}
        except torch.OutOfMemoryError as err:
            row |= {"status": "out of memory", "error": str(err).splitlines()[0][:200]}
        finally:
            gc.collect()  # the failed step's tensors, held by reference cycles
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        return row["status"] == "fits"

    # from the estimate: up by ``step`` while it fits, else down until it does (a few tries)
    batch = est
    if attempt(batch):
        while len(rows) < a.tries and attempt(batch + a.step):
            batch += a.step
    else:
        while len(rows) < a.tries and batch - a.step >= 1 and not attempt(batch - a.step):
            batch -= a.step
    Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
