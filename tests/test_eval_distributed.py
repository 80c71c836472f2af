"""Sampling and evaluation under torchrun: the same images and metrics from any number of
processes, and the ADM sample batch (.npz).

- Noise: each image is a function of the seed and its global index (per-chunk seeds), checked
  against a chunk drawn by hand from its documented seed, against a shorter draw, and against
  what each of two ranks draws.
- Two gloo processes (``torchrun``, as a user runs it) against one process (in this process,
  with one thread as each torchrun worker has): bit-identical uint8 images in the grid, the
  folder and the .npz, the same FID and KID, one record, one summary, output from rank 0 only.
- The .npz: ``np.load`` reads back the images and labels that were written.

Inception costs about 0.2 s per image on 2 CPU cores, so the evaluation uses 13 tiny samples
(4 per chunk: the last chunk is short and the two processes draw 8 and 5) against 6 digits.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdiff.cli import main
from sdiff.data.datasets import DataConfig
from sdiff.data.images import to_uint8
from sdiff.diffusion.samplers import sample_ddpm, x_predictor
from sdiff.eval.adm_batch import NpzImageWriter, SampleBatchSink
from sdiff.eval.distributed import World
from sdiff.eval.run_eval import evaluate_run, training_reference
from sdiff.eval.sample import chunk_seed, generate, load_trained, sample_chunks
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
    train=TrainConfig(total_images=16, batch_size=8, checkpoint_every_images=16, ema_decay=0.5,
                      sample_every_images=0),
)  # fmt: skip
# 13 images in chunks of 4: 4 chunks, the last of one image; rank 0 draws 0 and 2, rank 1 1, 3
SPEC = EvalSpec(n=13, batch_size=4, steps=3, seed=3)
SAMPLING = ["--n", "13", "--batch-size", "4", "--steps", "3", "--seed", "3"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    Trainer(CONFIG, run, progress=False).run()
    return run


@contextlib.contextmanager
def one_thread():
    """As a torchrun worker runs (OMP_NUM_THREADS=1), so that float sums split alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    # "--": torchrun's own parser would read --run and --n as abbreviations of its options
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
           f"--master-port={free_port()}", "-m", "sdiff", "--", *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(Image.open(f)) for f in sorted(folder.glob("*.png"))}


# ---------------------------------------------------------------------------------------------
# The noise: a function of the seed and the global index


def test_images_depend_on_the_seed_and_the_global_index_only(run_dir):
    model, config, _ = load_trained(run_dir)
    images, labels = generate(model, config, SPEC)  # (13, 1, 32, 32)
    assert images.shape == (13, 1, 32, 32) and labels.tolist() == [*range(10), 0, 1, 2]
    # chunk 1 (images 4..7) by hand: one generator seeded with chunk_seed(3, 1) draws the
    # initial noise, then DDPM's per-step noise
    gen = torch.Generator().manual_seed(chunk_seed(3, 1))
    noise = torch.randn(4, 1, 32, 32, generator=gen)
    denoise = x_predictor(model, config.diffusion.prediction)
    x = sample_ddpm(denoise, noise, schedule=config.diffusion.schedule.build(32), steps=3,
                    cond=torch.arange(4, 8), generator=gen)  # fmt: skip
    assert torch.equal(to_uint8(x), images[4:8])
    # a shorter draw is the start of a longer one (8: a multiple of the chunk)
    first, _ = generate(model, config, replace(SPEC, n=8))
    assert torch.equal(first, images[:8])
    # what each of two processes draws is its chunks of the one-process draw
    for rank in (0, 1):
        chunks = list(sample_chunks(model, config, SPEC, world=World(rank, 2)))
        assert [c.index for c in chunks] == [rank, rank + 2]
        for c in chunks:
            assert torch.equal(c.images, images[c.start : c.start + len(c.images)])
            assert torch.equal(c.labels, labels[c.start : c.start + len(c.images)])
    # chunks are not copies of each other, and the seed matters
    assert not torch.equal(images[0:4], images[4:8])
    other, _ = generate(model, config, replace(SPEC, seed=4, n=4))
    assert not torch.equal(other, images[:4])
    seeds = {chunk_seed(s, c) for s in range(3) for c in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**64 for s in seeds)


# ---------------------------------------------------------------------------------------------
# The ADM sample batch


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)  # (N, H, W, C)
    labels = rng.integers(0, 1000, 7)
    writer = NpzImageWriter(tmp_path / "batch.npz", images.shape)
    for start in range(0, 7, 3):  # chunks of 3, 3, 1
        writer.write(images[start : start + 3])
    assert not (tmp_path / "batch.npz").exists()  # only the temporary file until close
    writer.close(labels)
    with np.load(tmp_path / "batch.npz") as f:
        assert sorted(f.keys()) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and np.array_equal(f["arr_0"], images)
        assert f["arr_1"].dtype == np.int64 and np.array_equal(f["arr_1"], labels)
    with zipfile.ZipFile(tmp_path / "batch.npz") as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["batch.npz"]

    # (C, H, W) tensors of the sampler, one process, no labels (an unconditional model)
    sink = SampleBatchSink(tmp_path / "u.npz", 7, 3, (3, 5, 6))
    for start in range(0, 7, 3):
        sink.add(torch.from_numpy(images[start : start + 3]).permute(0, 3, 1, 2))
    sink.finish(None)
    with np.load(tmp_path / "u.npz") as f:
        assert list(f.keys()) == ["arr_0"] and np.array_equal(f["arr_0"], images)

    # a short batch is refused and leaves nothing behind
    short = NpzImageWriter(tmp_path / "short.npz", images.shape)
    short.write(images[:3])
    with pytest.raises(ValueError, match="has 3 of its 7 images"):
        short.close()
    short.abort()
    with pytest.raises(ValueError, match=r"must be uint8 \(b, 5, 6, 3\)"):
        NpzImageWriter(tmp_path / "x.npz", images.shape).write(images[:, :4])
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        NpzImageWriter(tmp_path / "x.npy", images.shape)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == [f".x.{os.getpid()}.tmp.npz"]  # the writer left open above, not a batch


# ---------------------------------------------------------------------------------------------
# One process against two


def test_sample_two_processes_equal_one(run_dir, tmp_path, capsys):
    def args(out: Path, *extra: str) -> list[str]:
        return ["sample", "--run", str(run_dir), *SAMPLING, "--grid", str(out / "grid.png"),
                "--folder", str(out / "png"), "--npz", str(out / "s.npz"), *extra]  # fmt: skip

    with one_thread():
        assert main(args(tmp_path / "one", "--no-progress")) == 0
    assert "sample:" not in capsys.readouterr().err
    two = torchrun(args(tmp_path / "two"))
    assert two.stdout.count("grid: ") == 1 and "2 processes" in two.stdout  # rank 0 only
    # the bar, on by default, on rank 0 only: its 8 images (chunks 0 and 2)
    assert two.stderr.count("sample: 100%") == 1 and "8/8" in two.stderr

    model, config, _ = load_trained(run_dir)
    images, labels = generate(model, config, SPEC)
    with np.load(tmp_path / "one" / "s.npz") as a, np.load(tmp_path / "two" / "s.npz") as b:
        assert np.array_equal(a["arr_0"], images.permute(0, 2, 3, 1).numpy())
        assert np.array_equal(b["arr_0"], a["arr_0"]) and np.array_equal(b["arr_1"], labels)
    one_png, two_png = pngs(tmp_path / "one" / "png"), pngs(tmp_path / "two" / "png")
    assert list(one_png) == [f"{i:06d}.png" for i in range(13)] == list(two_png)
    assert all(np.array_equal(one_png[k], two_png[k]) for k in one_png)
    grid_one = np.asarray(Image.open(tmp_path / "one" / "grid.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "two" / "grid.png")), grid_one)
    assert not [p for p in (tmp_path / "two").iterdir() if "part" in p.name]  # parts removed


def test_eval_two_processes_equal_one(run_dir, tmp_path, capsys):
    # an ADM-style reference batch: images plus mu/sigma from "another network" (here: wrong
    # on purpose), which are recomputed from the images by default
    digits = training_reference(CONFIG, 6)  # uint8 (6, 1, 32, 32)
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=digits.permute(0, 2, 3, 1).numpy(), mu=np.zeros(2048),
             sigma=np.eye(2048))  # fmt: skip

    def args(out: Path, *extra: str) -> list[str]:
        return ["eval", "--run", str(run_dir), *SAMPLING, "--metrics", "fid", "kid",
                "--weights", "fid-helper", "--eval-batch-size", "3", "--reference",
                str(reference), "--save-npz", str(out / "s.npz"), "--save-samples",
                str(out / "png"), *extra]  # fmt: skip

    metrics = run_dir / "metrics.json"
    before = len(json.loads(metrics.read_text())["evaluations"]) if metrics.exists() else 0
    with one_thread():
        assert main(args(tmp_path / "one")) == 0
    out = capsys.readouterr()
    one = json.loads(out.out)
    for bar in ("sample + features: 100%", "reference features: 100%"):
        assert bar in out.err
    two_run = torchrun(args(tmp_path / "two", "--no-progress"))
    two = json.loads(two_run.stdout)  # one JSON document: the other rank printed nothing
    for line in ("sdiff: warning: FID of 13 samples is biased", " of 13 samples against 6 "):
        assert out.err.count(line) == 1 and two_run.stderr.count(line) == 1, line
    assert "features:" not in two_run.stderr

    assert one["processes"] == 1 and two["processes"] == 2
    assert one["num_generated"] == two["num_generated"] == 13
    assert one["noise"] == two["noise"] == "per-chunk seeds" and two["sample_batch_size"] == 4
    assert two["reference_stats"] == "recomputed from arr_0" and two["num_reference"] == 6
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)
    assert two["kid_mean"] == pytest.approx(one["kid_mean"], rel=1e-6, abs=1e-9)
    assert one["fid"] < 1e4  # not against the zero mean of the stored statistics
    with np.load(tmp_path / "one" / "s.npz") as a, np.load(tmp_path / "two" / "s.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and a["arr_0"].shape == (13, 32, 32, 1)
    assert pngs(tmp_path / "one" / "png").keys() == pngs(tmp_path / "two" / "png").keys()
    records = json.loads(metrics.read_text())["evaluations"]
    assert len(records) == before + 2 and records[-1]["fid"] == two["fid"]


def test_what_cannot_be_measured_fails_before_sampling(run_dir, tmp_path):
    def sampled() -> bool:
        raise AssertionError("sampling started")

    missing = replace(SPEC, reference=str(tmp_path / "missing.npz"), weights="fid-helper")
    with pytest.raises(ValueError, match=r"missing\.npz' does not exist"):
        evaluate_run(run_dir, missing, should_stop=sampled)
    with pytest.raises(ValueError, match="prc needs at least 4 generated images"):
        evaluate_run(run_dir, replace(SPEC, n=2, metrics=("prc",)), should_stop=sampled)
