"""Sharded checkpoints (torch.distributed.checkpoint under FSDP) and resuming on another number
of processes: 1 -> 2 -> 1 gloo processes carry weights, EMA and Adam state over exactly, the
same number resumes bit-identically, and a damaged shard is found and skipped."""

import json
import os
import shutil
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sdiff.data.datasets import DataConfig
from sdiff.models.uvit import UViTConfig
from sdiff.training.checkpoint import list_checkpoints, load_checkpoint, load_latest_good
from sdiff.training.config import RunConfig, TrainConfig
from sdiff.training.trainer import CHANGES_FILE, Trainer

MODEL = UViTConfig(
    resolution=16, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=4, width=32, depth=2, head_dim=16, dropout=0.1,
    dropout_resolutions=(8, 4), num_classes=10, norm_groups=4,
)  # fmt: skip
# FSDP under torchrun, a plain model in one process: the config is the same either way
CONFIG = RunConfig(
    model=MODEL,
    data=DataConfig(name="mnist", resolution=16, channels=1, random_flip=True),
    train=TrainConfig(
        total_images=8 * 12, batch_size=8, lr=1e-3, warmup_images=16, ema_decay=0.9,
        log_every_images=8, checkpoint_every_images=24, keep_checkpoints=3,
        sample_every_images=0, deterministic=True, label_dropout=0.3, distributed="fsdp",
    ),
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)


def _spawn(fn, *args) -> None:
    mp.spawn(fn, args=(2, _free_port(), *args), nprocs=2)


def _named(model_names: list[str], optimizer: dict) -> dict:
    """An optimizer state keyed by parameter name (a positional one is mapped through the
    model's parameter order)."""
    return {(model_names[k] if isinstance(k, int) else k): v for k, v in optimizer["state"].items()}


def assert_same(a: dict, b: dict, names: list[str]) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = _named(names, a["optimizer"]), _named(names, b["optimizer"])
    assert sa.keys() == sb.keys() and len(sa) == len(names)
    for p in sa:
        for k in sa[p]:
            assert torch.equal(torch.as_tensor(sa[p][k]), torch.as_tensor(sb[p][k])), (p, k)


def _copy(state: dict) -> dict:
    """A deep copy: a gathered state may share tensors (e.g. Adam's step) with the live ones."""
    return torch.utils._pytree.tree_map(
        lambda v: v.clone() if isinstance(v, torch.Tensor) else v, state
    )


def _resume_on_two(rank, world, port, run_dir, out):
    """1 -> 2: the single process's .pt resumed under FSDP; train on, save sharded."""
    _join(rank, world, port)
    trainer = Trainer(CONFIG, run_dir, progress=False)
    loaded = _copy(trainer.state_dict())  # gathered: what the shards hold after the resume
    step = trainer.step
    trainer.run(max_steps=3)
    trained = Trainer(CONFIG, run_dir, progress=False)  # same world size: from the .dcp
    state = trained.state_dict()
    trained.close()
    if rank == 0:
        torch.save({"loaded": loaded, "step": step, "trained": state}, out)
    torch.distributed.destroy_process_group()


def test_resume_one_to_two_to_one_process_carries_the_state_over(tmp_path):
    run = tmp_path / "run"
    first = Trainer(CONFIG, run, progress=False)
    names = [n for n, _ in first.model.named_parameters()]
    first.run(max_steps=3)  # step 3: ckpt-000000000003.pt, written by one process
    one = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert one["step"] == 3 and len(one["rng"]) == 1

    out = tmp_path / "two.pt"
    _spawn(_resume_on_two, str(run), str(out))
    two = torch.load(out, weights_only=True)
    assert two["step"] == 3
    assert_same(two["loaded"], one, names)  # 1 -> 2: every shard holds what the file held
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == "ckpt-000000000006.dcp" and newest.is_dir()
    assert two["trained"]["step"] == 6 and len(two["trained"]["rng"]) == 2

    # a sharded checkpoint read whole in one process (sampling, export) = the gathered state
    whole = load_checkpoint(newest)
    assert whole["step"] == 6 and whole["sharded"] == str(newest)
    assert_same(whole, two["trained"], names)
    ema_only = load_checkpoint(newest, full=("ema",))
    assert "ema" in ema_only and "model" not in ema_only
    # and exported from the run folder as portable weights
    from sdiff.models.pretrained import load_pretrained
    from sdiff.training.export import export_run

    export_run(run, tmp_path / "export")
    exported = load_pretrained(tmp_path / "export").model.state_dict()
    assert exported.keys() == whole["ema"].keys()
    assert all(torch.equal(exported[k], whole["ema"][k]) for k in exported)

    # 2 -> 1: the single process reads every shard into its whole tensors
    back = Trainer(CONFIG, run, progress=False)
    assert back.step == 6 and back.resharded_from == 2
    assert_same(back.state_dict(), two["trained"], names)
    result = back.run()
    assert result.step == 12 and not result.stopped_early
    records = [json.loads(line) for line in (run / CHANGES_FILE).read_text().splitlines()]
    assert [r["processes"] for r in records] == [[1, 2], [2, 1]]
    assert [r["step"] for r in records] == [3, 6]
    final = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert final["step"] == 12 and len(final["rng"]) == 1
    for v in final["model"].values():
        assert torch.isfinite(v).all()


def _same_world_twice(rank, world, port, run_dir, out):
    """Two FSDP processes train 6 steps (sharded checkpoints at 3 and 6); the checkpoint of
    step 6 is removed and two new processes resume from step 3's: the same state at step 6."""
    _join(rank, world, port)
    first = Trainer(CONFIG, run_dir, progress=False)
    first.run(max_steps=6)
    reference = Trainer(CONFIG, run_dir, progress=False)
    ref_state = reference.state_dict()
    reference.close()
    if rank == 0:
        shutil.rmtree(Path(run_dir) / "checkpoints" / "ckpt-000000000006.dcp")
    torch.distributed.barrier()
    again = Trainer(CONFIG, run_dir, progress=False)
    resumed_at = again.step
    again.run(max_steps=3)
    final = Trainer(CONFIG, run_dir, progress=False)
    state = final.state_dict()
    final.close()
    if rank == 0:
        torch.save({"reference": ref_state, "resumed_at": resumed_at, "again": state}, out)
    torch.distributed.destroy_process_group()


def test_sharded_resume_on_the_same_processes_is_bit_identical(tmp_path):
    run, out = tmp_path / "run", tmp_path / "same.pt"
    _spawn(_same_world_twice, str(run), str(out))
    got = torch.load(out, weights_only=True)
    assert got["resumed_at"] == 3
    assert got["reference"]["step"] == got["again"]["step"] == 6
    names = [
        n for n, _ in Trainer(CONFIG, tmp_path / "names", progress=False).model.named_parameters()
    ]
    assert_same(got["again"], got["reference"], names)
    for a, b in zip(got["again"]["rng"], got["reference"]["rng"], strict=True):
        assert torch.equal(a["trainer"], b["trainer"]) and torch.equal(a["cpu"], b["cpu"])
    # no .tmp leftovers; every checkpoint a folder of shards plus meta.pt
    folder = run / "checkpoints"
    assert not list(folder.glob("*.tmp"))
    for ckpt in list_checkpoints(folder):
        assert ckpt.suffix == ".dcp" and (ckpt / "meta.pt").is_file()
        assert len(list(ckpt.glob("*.distcp"))) == 2  # one file of shards per process

    # a truncated shard is damage: named, and a resume falls back to the older checkpoint
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    newest = list_checkpoints(damaged)[-1]
    shard = sorted(newest.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"shard {shard.name} is truncated"):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match=rf"skipped {newest}"):
        path, state = load_latest_good(damaged, full=False)
    assert path == list_checkpoints(damaged)[-2] and state["step"] == 3
    (list_checkpoints(damaged)[-2] / ".metadata").unlink()
    with pytest.raises(ValueError, match="no good checkpoint"):
        load_latest_good(damaged)


def test_a_sharded_step_written_twice_replaces_the_older(tmp_path):
    """keep_checkpoints prunes .pt files and .dcp folders alike, oldest first."""
    from sdiff.training.checkpoint import save_checkpoint, save_sharded_checkpoint

    folder = tmp_path / "ckpt"
    save_checkpoint(folder, 1, {"model": {}, "step": 1}, keep=2)
    w = {"model": {"w": torch.arange(4.0)}, "ema": {}, "optimizer": {}}
    save_sharded_checkpoint(folder, 2, w, {"step": 2, "rng": []}, keep=2)
    save_sharded_checkpoint(folder, 3, w, {"step": 3, "rng": []}, keep=2)
    assert [p.name for p in list_checkpoints(folder)] == [
        "ckpt-000000000002.dcp", "ckpt-000000000003.dcp",
    ]  # fmt: skip
    w2 = {"model": {"w": torch.arange(4.0) + 1}, "ema": {}, "optimizer": {}}
    save_sharded_checkpoint(folder, 3, w2, {"step": 3, "rng": []}, keep=2)
    assert torch.equal(
        load_checkpoint(folder / "ckpt-000000000003.dcp")["model"]["w"], w2["model"]["w"]
    )
    assert not list(folder.glob("*.tmp"))


def test_a_config_change_is_still_refused_on_another_world_size(tmp_path):
    run = tmp_path / "run"
    Trainer(CONFIG, run, progress=False).run(max_steps=3)
    changed = replace(CONFIG, train=replace(CONFIG.train, lr=2e-3))
    with pytest.raises(ValueError, match=r"differs at \['train.lr'\]"):
        Trainer(changed, run, progress=False)


def test_a_full_disk_while_writing_shards_loses_nothing(tmp_path, sandbox):
    """A sharded write that runs out of space is an ENOSPC naming the checkpoint; its .tmp
    folder is gone and the older checkpoint still loads."""
    disk = tmp_path / "disk"
    script = (
        "import errno, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from pathlib import Path\n"
        "from conftest import fill_disk\n"
        "from sdiff.training.checkpoint import (list_checkpoints, load_checkpoint,\n"
        "    save_sharded_checkpoint)\n"
        f"folder = Path({str(disk)!r}) / 'ckpt'\n"
        "small = {'model': {'w': torch.ones(8)}, 'ema': {}, 'optimizer': {}}\n"
        "save_sharded_checkpoint(folder, 1, small, {'step': 1, 'rng': []})\n"
        f"fill_disk(Path({str(disk)!r}), leave=16 * 1024)\n"
        "big = {'model': {'w': torch.ones(1 << 20)}, 'ema': {}, 'optimizer': {}}\n"
        "try:\n"
        "    save_sharded_checkpoint(folder, 2, big, {'step': 2, 'rng': []})\n"
        "except OSError as err:\n"
        "    print('errno', err.errno == errno.ENOSPC, err.filename)\n"
        "print('left', sorted(p.name for p in folder.iterdir()))\n"
        "print('loads', load_checkpoint(list_checkpoints(folder)[-1])['step'])\n"
    )
    out = sandbox(script, full=[disk], tmpfs_kib=2048)
    assert out.returncode == 0, out.stderr
    assert f"errno True {disk / 'ckpt' / 'ckpt-000000000002.dcp'}" in out.stdout
    assert "left ['ckpt-000000000001.dcp']" in out.stdout and "loads 1" in out.stdout
