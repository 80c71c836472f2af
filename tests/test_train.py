"""The trainer: exact resume (also after a crash inside a checkpoint write), the non-finite
stop, DDP equivalence with a single process, the data order, EMA and warm-up by hand."""

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import sdiff.training.checkpoint as ckpt_mod
from sdiff.data.datasets import DataConfig
from sdiff.models.presets import build_model
from sdiff.models.uvit import UViTConfig
from sdiff.training.checkpoint import list_checkpoints, load_checkpoint
from sdiff.training.config import RunConfig, TrainConfig, apply_overrides, to_json
from sdiff.training.trainer import Trainer, index_batches

MODEL = UViTConfig(
    resolution=32, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=8, width=32, depth=1, head_dim=16, dropout=0.2,
    dropout_resolutions=(16, 8), num_classes=10, norm_groups=4,
)  # fmt: skip
CONFIG = RunConfig(
    model=MODEL,
    data=DataConfig(name="mnist", resolution=32, channels=1, random_flip=True),
    train=TrainConfig(
        total_images=8 * 12, batch_size=8, lr=1e-3, warmup_images=24, ema_decay=0.9,
        log_every_images=16, checkpoint_every_images=24, keep_checkpoints=2,
        sample_every_images=0, deterministic=True, label_dropout=0.3,
    ),
)  # fmt: skip


def final_state(run_dir):
    state = load_checkpoint(list_checkpoints(Path(run_dir) / "checkpoints")[-1])
    return state


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"
    assert all(
        torch.equal(x["trainer"], y["trainer"]) for x, y in zip(a["rng"], b["rng"], strict=True)
    )


def losses(run_dir):
    with open(Path(run_dir) / "metrics.csv", newline="") as f:
        return [
            (int(r["step"]), float(r["loss"]), float(r["grad_norm"])) for r in csv.DictReader(f)
        ]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    result = Trainer(CONFIG, run, progress=False).run()
    assert result.step == 12 and not result.stopped_early
    return run


def test_resume_after_a_stop_is_bit_identical(reference_run, tmp_path):
    first = Trainer(CONFIG, tmp_path, progress=False).run(max_steps=5)  # "killed" after step 5
    assert first.stopped_early and first.step == 5
    assert [int(p.name[5:17]) for p in list_checkpoints(tmp_path / "checkpoints")] == [3]
    resumed = Trainer(CONFIG, tmp_path, progress=False)
    assert resumed.step == 3  # steps 4 and 5 are redone
    resumed.run()
    assert_same_state(final_state(reference_run), final_state(tmp_path))
    assert losses(tmp_path) == losses(reference_run)  # rows after step 3 dropped, then rewritten


class Crash(BaseException):
    """Stands for the process dying (not an Exception, so nothing catches it)."""


@pytest.mark.parametrize("where", ["inside torch.save", "before the rename"])
def test_crash_inside_a_checkpoint_write_loses_nothing(reference_run, tmp_path, monkeypatch, where):
    real_save, real_replace = torch.save, os.replace
    calls = {"n": 0}

    def half_save(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:  # the checkpoint of step 6: write half of it, then die
            real_save(obj, f)
            f.truncate(f.tell() // 2)
            raise Crash

        return real_save(obj, f)

    def dying_replace(src, dst):
        if str(dst).endswith("ckpt-000000000006.pt"):
            raise Crash
        return real_replace(src, dst)

    if where == "inside torch.save":
        monkeypatch.setattr(ckpt_mod.torch, "save", half_save)
    else:
        monkeypatch.setattr(ckpt_mod.os, "replace", dying_replace)
    with pytest.raises(Crash):
        Trainer(CONFIG, tmp_path, progress=False).run()
    monkeypatch.undo()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["ckpt-000000000003.pt", "ckpt-000000000006.pt.tmp"]
    load_checkpoint(tmp_path / "checkpoints" / names[0])  # the previous one is intact
    Trainer(CONFIG, tmp_path, progress=False).run()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    assert_same_state(final_state(reference_run), final_state(tmp_path))


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume(reference_run, tmp_path):
    """A real kill -9 of `python -m sdiff train` while it writes checkpoints every step."""
    cfg = apply_overrides(CONFIG, ["train.checkpoint_every_images=8", "train.keep_checkpoints=50"])
    ref = tmp_path / "ref"
    Trainer(cfg, ref, progress=False).run()
    (tmp_path / "cfg.json").write_text(to_json(cfg))
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sdiff", "train", "--config", str(tmp_path / "cfg.json"),
           "--out", str(run), "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 120
    while len(list_checkpoints(run / "checkpoints")) < 5 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list_checkpoints(run / "checkpoints"))
    assert 5 <= done < 12, "the kill should land in the middle of the run"
    subprocess.run(cmd, check=True)
    assert_same_state(final_state(ref), final_state(run))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(CONFIG, tmp_path, progress=False)
    model = trainer.model
    real_forward = model.forward

    def poisoned(z, logsnr, cond=None):
        out = real_forward(z, logsnr, cond)
        return out * float("nan") if trainer.step >= 4 else out  # step 5 goes wrong

    model.forward = poisoned
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 5") as err:
        trainer.run()
    assert trainer.step == 4
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt-000000000003.pt"]
    # the shared step stops before the update; the trainer adds which checkpoint is good
    last = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert str(err.value).endswith(f"stopped before the update; last good checkpoint: {last}")
    # the failed step did not touch the weights
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # steps 1-4 trained
    state = load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_different_config_in_the_same_folder_is_refused(tmp_path):
    Trainer(CONFIG, tmp_path, progress=False).run(max_steps=3)
    other = apply_overrides(CONFIG, ["train.lr=0.01"])
    with pytest.raises(ValueError, match=r"different config \(differs at \['train.lr'\]\)"):
        Trainer(other, tmp_path, progress=False)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    Trainer(CONFIG, tmp_path, progress=False).run(max_steps=3)
    path = list_checkpoints(tmp_path / "checkpoints")[-1]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"cannot read checkpoint {path}"):
        Trainer(CONFIG, tmp_path, progress=False)


def test_data_order_is_a_function_of_seed_and_step():
    n, batch = 10, 4
    stream = [
        i
        for _, b in zip(range(5), index_batches(n, batch, seed=3, start_step=0), strict=False)
        for i in b
    ]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    # starting later gives the same continuation; ranks split each global batch
    later = next(index_batches(n, batch, seed=3, start_step=2))
    assert later == stream[8:12]
    r0 = next(index_batches(n, batch, seed=3, start_step=2, rank=0, world=2))
    r1 = next(index_batches(n, batch, seed=3, start_step=2, rank=1, world=2))
    assert r0 + r1 == later
    assert next(index_batches(n, batch, seed=4, start_step=0)) != stream[:4]


def test_ema_and_warmup_by_hand(tmp_path):
    trainer = Trainer(CONFIG, tmp_path, progress=False)
    w0 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    e0 = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    assert trainer.lr_at(0) == pytest.approx(1e-3 * 8 / 32)  # (images + B) / (warmup + B)
    assert trainer.lr_at(16) == pytest.approx(1e-3 * 24 / 32)
    assert trainer.lr_at(24) == 1e-3
    x, y = next(iter(torch.utils.data.DataLoader(trainer.dataset, batch_size=8)))
    trainer.train_step(*trainer.prepare_batch(x, y))
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * 8 / 32)
    for k, e in trainer.ema.state_dict().items():
        if e.is_floating_point():
            decay = min(0.9, (1 + 0) / (10 + 0))  # EMA warm-up at step 0
            expected = decay * e0[k] + (1 - decay) * trainer.model.state_dict()[k]
            torch.testing.assert_close(e, expected, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(w0[k], v) for k, v in trainer.model.state_dict().items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_CONFIG = replace(CONFIG, model=replace(MODEL, dropout=0.0))


def _fixed_batch():
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(8, 1, 32, 32, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (8,), generator=gen)
    t = torch.rand(8, generator=gen)
    noise = torch.randn(8, 1, 32, 32, generator=gen)
    return x, y, t, noise


def _parallel_worker(rank, world, port, mode, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    cfg = apply_overrides(DDP_CONFIG, [f"train.distributed={json.dumps(mode)}"])
    trainer = Trainer(cfg, run_dir, progress=False)
    x, y, t, noise = (v.chunk(world)[rank] for v in _fixed_batch())
    for _ in range(2):
        trainer.train_step(x, y, t=t, noise=noise)
    state = trainer.state_dict()  # full (gathered) weights, also under FSDP
    trainer.save()
    trainer.close()  # one Trainer owns a run folder at a time
    resumed = Trainer(cfg, run_dir, progress=False).state_dict()  # restores the checkpoint
    if rank == 0:
        torch.save({"trained": state["model"], "resumed": resumed["model"]}, out)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_parallel_step_equals_one_process_on_the_combined_batch(tmp_path, mode):
    """Two gloo processes with half the batch each = one process with all of it (two Adam
    steps); FSDP's checkpoint also round-trips through a resume."""
    out = tmp_path / "parallel.pt"
    args = (2, _free_port(), mode, str(tmp_path / "parallel"), str(out))
    mp.spawn(_parallel_worker, args=args, nprocs=2)
    single = Trainer(DDP_CONFIG, tmp_path / "single", progress=False)
    init = {k: v.clone() for k, v in single.model.state_dict().items()}
    x, y, t, noise = _fixed_batch()
    for _ in range(2):
        single.train_step(x, y, t=t, noise=noise)
    got = torch.load(out)
    for k, v in single.model.state_dict().items():
        torch.testing.assert_close(got["trained"][k], v, rtol=1e-5, atol=1e-6, msg=f"{k} differs")
        assert torch.equal(got["resumed"][k], got["trained"][k])
    assert any(not torch.equal(init[k], v) for k, v in single.model.state_dict().items())


def test_run_directory_contents(reference_run):
    cfg = json.loads((reference_run / "config.json").read_text())
    assert cfg["train"]["batch_size"] == 8 and cfg["model"]["kind"] == "uvit"
    rows = losses(reference_run)
    assert [r[0] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(torch.isfinite(torch.tensor(r[1])) for r in rows)
    assert len(list_checkpoints(reference_run / "checkpoints")) == 2  # keep_checkpoints


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path):
    """train.compile=true runs the same maths (inductor on CPU; tolerances for fused kernels)."""
    eager = Trainer(DDP_CONFIG, tmp_path / "eager", progress=False)
    compiled = Trainer(apply_overrides(DDP_CONFIG, ["train.compile=true"]), tmp_path / "compiled",
                       progress=False)  # fmt: skip
    x, y, t, noise = _fixed_batch()
    for _ in range(2):
        le, _ = eager.train_step(x, y, t=t, noise=noise)
        lc, _ = compiled.train_step(x, y, t=t, noise=noise)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
    for k, v in eager.model.state_dict().items():
        torch.testing.assert_close(compiled.model.state_dict()[k], v, rtol=1e-3, atol=1e-5)


def test_tensorboard_is_optional_and_named_when_missing(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = apply_overrides(CONFIG, ["train.tensorboard=true"])
    with pytest.raises(ValueError, match=r"pip install 'sdiff\[tensorboard\]'"):
        Trainer(cfg, tmp_path, progress=False).run(max_steps=1)


def test_sdiff_train_prints_a_header_then_resumes_with_it(tmp_path, capsys):
    """The header's numbers against the config and the data (5000 bundled digits), counted
    here; a second run of a finished folder says where it resumes."""
    from sdiff.cli import main

    (tmp_path / "cfg.json").write_text(to_json(CONFIG))
    argv = ["train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    params = sum(p.numel() for p in build_model(MODEL).parameters())
    assert out[0] == (f"sdiff train: uvit {params / 1e6:.2f}M parameters, 32 px, shifted schedule")
    assert out[1] == "  device cpu x 1 process(es), precision auto"
    assert out[2] == "  data mnist (5,000 images, 10 classes)"
    assert out[3] == "  96 images = 12 steps of batch 8 (8 per process), from scratch"
    assert out[4].endswith(f"logs {tmp_path / 'run' / 'metrics.csv'}")
    assert main(argv) == 0
    assert "resuming at step 12" in capsys.readouterr().out


def test_a_finished_run_is_extended_to_the_state_of_a_longer_run(reference_run, tmp_path):
    """Raise train.total_images on a finished run: it resumes at its last step, records the
    change, and ends bit-identical to a run that had the larger budget from the start; data
    loading and logging cadence may change on the way."""
    longer = apply_overrides(CONFIG, ["train.total_images=192"])
    run = tmp_path / "run"
    Trainer(CONFIG, run, progress=False).run()
    resumed = apply_overrides(longer, ["train.log_every_images=8", "train.keep_checkpoints=3"])
    trainer = Trainer(resumed, run, progress=False)
    assert trainer.step == 12
    trainer.run()
    fresh = tmp_path / "fresh"
    Trainer(longer, fresh, progress=False).run()
    assert_same_state(final_state(fresh), final_state(run))
    (record,) = [
        json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()
    ]
    assert record["step"] == 12 and record["changes"] == {
        "train.total_images": [96, 192], "train.log_every_images": [16, 8],
        "train.keep_checkpoints": [2, 3],
    }  # fmt: skip
    assert json.loads((run / "config.json").read_text())["train"]["total_images"] == 192
    # and again with the same config: nothing more recorded, resumes at the end
    assert Trainer(resumed, run, progress=False).step == 24
    assert len((run / "config_changes.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("override", "says"),
    [("train.lr=0.002", "differs at ['train.lr']"),
     ("train.total_images=48", "train.total_images 48 is less than the run's 96")],
)  # fmt: skip
def test_a_resume_refuses_changes_that_change_results(tmp_path, override, says):
    run = tmp_path / "run"
    Trainer(CONFIG, run, progress=False).run()

    def files():  # the run's own files (run.lock records who held the folder last)
        return {
            p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix != ".lock"
        }

    before = files()
    with pytest.raises(ValueError, match=re.escape(says)):
        Trainer(apply_overrides(CONFIG, [override]), run, progress=False)
    assert files() == before and "config_changes.jsonl" not in before
