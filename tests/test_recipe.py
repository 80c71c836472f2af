"""The README's paper-scale recipe, end to end, at the size of the bundled digits: prepare the
data, train with torchrun (two gloo processes, FSDP, gradient accumulation, EMA snapshots),
resume on one process with a longer budget, evaluate with torchrun against an ADM-format
image batch writing the ADM sample batch, export, load the export. The same commands a user
types, in subprocesses; each step is checked by what it leaves behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--standalone", "-m", "sdiff"]  # fmt: skip
SDIFF = [sys.executable, "-m", "sdiff"]


def run(argv: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def test_the_recipe_end_to_end(tmp_path):
    # 1. prepare the data once (ADM center crop, uint8 shards)
    run([*SDIFF, "data", "prepare", "bundled:digits:1000", "digits-32", "--res", "32",
         "--channels", "1", "--no-progress"], tmp_path)  # fmt: skip
    manifest = json.loads((tmp_path / "digits-32" / "sdiff-prepared.json").read_text())
    assert manifest["count"] == 1000 and manifest["resolution"] == 32

    # 2. torchrun: FSDP on 2 processes, 32 images per process in micro-batches of 16
    train = ["train", "--run-preset", "digits", "--out", "run", "--no-progress", "--set",
             "data.name=folder", "data.root=digits-32", "train.batch_size=64",
             "train.batch_per_gpu=16", "train.distributed=fsdp", "train.total_images=768",
             "train.checkpoint_every_images=384", "train.sample_every_images=0",
             "train.ema_snapshot_every_images=384"]  # fmt: skip
    out = run([*TORCHRUN, *train], tmp_path)
    assert "x 2 process(es)" in out and "in micro-batches of 16" in out
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["ckpt-000000000006.dcp", "ckpt-000000000012.dcp"]

    # 3. resume on one process, extended: the sharded checkpoint is read whole
    out = run([*SDIFF, "train", "--out", "run", "--no-progress", "--set",
               "train.total_images=1152"], tmp_path)  # fmt: skip
    assert "written by 2 process(es), this run has 1" in out
    assert "trained (step 18, 1152 images)" in out
    changes = (tmp_path / "run" / "config_changes.jsonl").read_text().splitlines()
    assert [json.loads(c).get("processes") for c in changes] == [None, [2, 1]]
    snapshots = sorted(p.name for p in (tmp_path / "run" / "ema").iterdir())
    assert snapshots == ["000000000384", "000000000768", "000000001152"]

    # 4. torchrun eval against an ADM-format batch of images (arr_0 only), writing the
    # samples as an ADM batch beside the metrics
    from sdiff.data.prepared import PreparedDataset

    ref = PreparedDataset(tmp_path / "digits-32").read_uint8(list(range(0, 1000, 25)))
    np.savez(tmp_path / "ref.npz", arr_0=np.asarray(ref).transpose(0, 2, 3, 1))
    out = run([*TORCHRUN, "--", "eval", "--run", "run", "--n", "30", "--steps", "8",
               "--batch-size", "8", "--metrics", "fid", "--reference", "ref.npz",
               "--save-npz", "run/samples.npz", "--no-progress"], tmp_path)  # fmt: skip
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["evaluations"][-1]
    assert record["processes"] == 2 and record["num_generated"] == 30 and record["step"] == 18
    assert np.isfinite(record["fid"]) and record["fid"] > 0
    batch = np.load(tmp_path / "run" / "samples.npz")
    assert batch["arr_0"].shape == (30, 32, 32, 1) and batch["arr_0"].dtype == np.uint8
    assert batch["arr_1"].tolist() == [i % 10 for i in range(30)]

    # 5. export, and load with no training code
    run([*SDIFF, "export", "run", "exports/digits"], tmp_path)
    import sdiff
    from sdiff.training.checkpoint import list_checkpoints, load_checkpoint

    loaded = sdiff.load_pretrained(tmp_path / "exports" / "digits").model.state_dict()
    final = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[-1])
    assert all(torch.equal(loaded[k], v) for k, v in final["ema"].items())
