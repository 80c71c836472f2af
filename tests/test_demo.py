"""`sdiff demo` and `sdiff eval` end to end at a tiny size (the real demo runs in `make demo`)."""

import json

import numpy as np
import torch
from PIL import Image

from sdiff.cli import main
from sdiff.data.datasets import DataConfig, build_dataset
from sdiff.data.images import save_folder, to_uint8

TINY = ["--set", "train.total_images=48", "train.batch_size=16", "train.sample_every_images=0",
        "--eval-n", "12", "--reference-n", "12", "--steps", "2", "--no-progress"]  # fmt: skip


def test_demo_trains_samples_evaluates_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert f"results: {out.resolve()}/" in printed
    grid = np.asarray(Image.open(out / "samples" / "final-grid.png"))
    assert grid.shape == (10 * 34 + 2, 10 * 34 + 2)  # 100 digits, one column per class
    record = json.loads((out / "metrics.json").read_text())["evaluations"][0]
    assert record["step"] == 3 and record["num_generated"] == 12
    assert record["reference"] == "train (n=12)"
    assert (
        record["fid"] > 0 and "fid-helper" in record["feature_extractor"]
    ) or "torch-fidelity" in record["feature_extractor"]
    summary = (out / "demo.md").read_text()
    assert f"FID {record['fid']:.2f}" in summary
    # a second run finds the finished training and only evaluates again
    assert main(["demo", "--out", str(out), *TINY]) == 0
    records = json.loads((out / "metrics.json").read_text())["evaluations"]
    assert len(records) == 2 and records[1]["step"] == 3
    assert records[1]["fid"] == records[0]["fid"]  # same checkpoint, seed and reference
    # `sdiff eval --run`: stdout is one JSON document (the location of the record on stderr)
    capsys.readouterr()
    assert main(["eval", "--run", str(out), "--n", "12", "--reference-n", "12",
                 "--steps", "2"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["num_generated"] == 12 and record["fid"] > 0
    assert "recorded in" in captured.err


def test_eval_of_two_folders(tmp_path, capsys):
    digits = build_dataset(DataConfig(name="mnist", resolution=32, channels=1))
    images = torch.stack([to_uint8(digits[i][0]) for i in range(0, 400, 25)])
    save_folder(images, tmp_path / "a")
    assert main(["eval", "--samples", str(tmp_path / "a"), "--reference", str(tmp_path / "a"),
                 "--metrics", "fid"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert abs(result["fid"]) < 1e-6
    assert main(["eval", "--samples", str(tmp_path / "a")]) == 2
    assert "--samples needs --reference" in capsys.readouterr().err
