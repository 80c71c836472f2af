"""`sdiff sample` round trip on a tiny checkpoint."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdiff.cli import main
from sdiff.data.datasets import DataConfig
from sdiff.eval.sample import generate, load_trained
from sdiff.eval.spec import EvalSpec
from sdiff.models.uvit import UViTConfig
from sdiff.training.config import RunConfig, TrainConfig
from sdiff.training.trainer import Trainer

MODEL = UViTConfig(
    resolution=32, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=8, width=32, depth=1, head_dim=16, num_classes=10, norm_groups=4,
)  # fmt: skip
CONFIG = RunConfig(
    model=MODEL,
    data=DataConfig(name="mnist", resolution=32, channels=1),
    train=TrainConfig(total_images=32, batch_size=8, checkpoint_every_images=16, ema_decay=0.5,
                      sample_every_images=16, sample_count=4, sample_steps=2),
)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    Trainer(CONFIG, run, progress=False).run()
    return run


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_training_wrote_sample_grids(run_dir):
    grids = sorted((run_dir / "samples").glob("grid-*.png"))
    assert [g.name for g in grids] == ["grid-000000000016.png", "grid-000000000032.png"]
    assert read_png(grids[0]).shape == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 grid, 2 px padding


def test_sample_cli_round_trip(run_dir, tmp_path):
    grid, folder = tmp_path / "g.png", tmp_path / "imgs"
    args = ["sample", "--run", str(run_dir), "--n", "6", "--steps", "3", "--seed", "1"]
    assert main([*args, "--grid", str(grid), "--folder", str(folder)]) == 0
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(6)]
    assert read_png(files[0]).shape == (32, 32)
    # the CLI's images are the library's, and the same seed gives the same images
    model, config, step = load_trained(run_dir)
    assert step == 4
    images, labels = generate(model, config, EvalSpec(n=6, steps=3, seed=1))
    assert labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert all(np.array_equal(read_png(f), images[i, 0].numpy()) for i, f in enumerate(files))
    other, _ = generate(model, config, EvalSpec(n=6, steps=3, seed=2))
    assert not torch.equal(images, other)
    # guidance, an interval, labels, raw weights and the other sampler all run
    guided = tmp_path / "guided.png"
    assert main([*args, "--guidance", "2", "--guidance-interval", "-5", "5", "--labels", "3",
                 "--sampler", "ddim", "--no-ema", "--grid", str(guided)]) == 0  # fmt: skip
    assert guided.exists()


def test_sample_errors(run_dir, tmp_path, capsys):
    assert main(["sample", "--run", str(tmp_path), "--grid", str(tmp_path / "g.png")]) == 2
    assert "no checkpoint found" in capsys.readouterr().err
    assert main(["sample", "--run", str(run_dir)]) == 2
    assert "--grid PATH and/or --folder DIR and/or --npz" in capsys.readouterr().err
    assert main(["sample", "--run", str(run_dir), "--npz", str(tmp_path / "s.npy")]) == 2
    assert "--npz must name an .npz file" in capsys.readouterr().err
    assert main(["sample", "--run", str(run_dir), "--labels", "12", "--grid", "x.png"]) == 2
    assert "labels must lie in [0, 9]" in capsys.readouterr().err
