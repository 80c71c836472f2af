"""Portable exports: a tiny trained run exported and loaded back gives its checkpoint's model bit
for bit (EMA or raw, fp32 or bf16), in a process that never imports the training code; damaged
or foreign files are refused naming them; the folder is written as a whole."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import sdiff
from sdiff.cli import main
from sdiff.data.datasets import DataConfig
from sdiff.diffusion.process import DiffusionConfig
from sdiff.diffusion.samplers import sample_ddim, x_predictor
from sdiff.diffusion.schedules import ScheduleConfig
from sdiff.models.presets import PRESETS, build_model
from sdiff.models.pretrained import (
    load_pretrained,
    model_config_from_dict,
    model_config_to_dict,
    save_pretrained,
)
from sdiff.models.uvit import UViTConfig
from sdiff.training.checkpoint import list_checkpoints, load_checkpoint
from sdiff.training.config import ModelConfig, RunConfig, TrainConfig, from_dict, to_dict
from sdiff.training.export import ema_snapshot_path, export_run, save_ema_snapshot
from sdiff.training.trainer import Trainer

MODEL = UViTConfig(
    resolution=32, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,), blocks_up=(1,),
    transformer_resolution=8, width=32, depth=1, head_dim=16, num_classes=10, norm_groups=4,
)  # fmt: skip
CONFIG = RunConfig(
    model=MODEL,
    # not the defaults, so that the export must carry them
    diffusion=DiffusionConfig(schedule=ScheduleConfig(name="interpolated"), prediction="eps"),
    data=DataConfig(name="mnist", resolution=32, channels=1),
    train=TrainConfig(total_images=32, batch_size=8, checkpoint_every_images=16, ema_decay=0.5,
                      sample_every_images=0),
)  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    Trainer(CONFIG, run, progress=False).run()
    return run


@pytest.fixture(scope="module")
def newest(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(3, 1, 32, 32, generator=gen)
    return z, torch.tensor([-5.0, 0.0, 5.0]), torch.tensor([1, 4, 10])  # 10: the null class


def reference(state: dict, key: str) -> torch.nn.Module:
    """The checkpoint's model the way the training code builds it."""
    model = build_model(from_dict(RunConfig, json.loads(state["config"])).model)
    model.load_state_dict(state[key])
    return model.eval()


@pytest.mark.parametrize("raw", [False, True])
def test_export_loads_the_checkpoints_model_bit_for_bit(run_dir, newest, tmp_path, raw):
    out = export_run(run_dir, tmp_path / "export", ema=not raw)
    p = load_pretrained(out)
    key = "model" if raw else "ema"
    assert not torch.equal(newest["ema"]["head.conv.weight"], newest["model"]["head.conv.weight"])
    assert p.model.state_dict().keys() == newest[key].keys()
    assert all(torch.equal(v, newest[key][k]) for k, v in p.model.state_dict().items())
    assert not p.model.training and p.model_config == MODEL
    with torch.no_grad():
        assert torch.equal(p.model(*inputs()), reference(newest, key)(*inputs()))
    # what sampling needs is the run's: its schedule at the model's resolution, its prediction
    assert p.schedule_config == CONFIG.diffusion.schedule and p.prediction == "eps"
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(p.schedule(t), CONFIG.diffusion.schedule.build(32)(t))
    noise = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    cond = torch.tensor([1, 2])
    ours = sample_ddim(p.denoiser(), noise, schedule=p.schedule, steps=3, cond=cond)
    theirs = sample_ddim(x_predictor(reference(newest, key), "eps"), noise, steps=3,
                         schedule=CONFIG.diffusion.schedule.build(32), cond=cond)  # fmt: skip
    assert torch.equal(ours, theirs)
    # provenance
    prov = p.provenance
    assert prov["weights"] == ("raw" if raw else "ema") and prov["step"] == newest["step"] == 4
    assert prov["images"] == 32 and prov["checkpoint"] == "ckpt-000000000004.pt"
    assert prov["config_hash"] == newest["config_hash"] and prov["sdiff"] == sdiff.__version__
    assert prov["source"] == str(run_dir.resolve()) and prov["run_config"] == to_dict(CONFIG)
    assert {"date", "git_sha", "torch"} <= set(prov)


def test_the_safetensors_file_stands_alone(run_dir, newest, tmp_path):
    out = export_run(run_dir, tmp_path / "export")
    tensors = load_file(out / "model.safetensors")
    assert tensors.keys() == newest["ema"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in newest["ema"].items())
    with safe_open(out / "model.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "sdiff-pretrained", "format_version": "1", "sdiff": sdiff.__version__}
    document = json.loads((out / "config.json").read_text())
    assert document["model"] == to_dict(MODEL) and document["tied"] == {}
    assert document["diffusion"] == {"schedule": to_dict(CONFIG.diffusion.schedule),
                                     "prediction": "eps"}  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["export"]  # no temporary left


# torch-free until load_pretrained: sdiff's lazy export, and no training code on the way
FRESH = """\
import sys, torch
import sdiff
p = sdiff.load_pretrained(sys.argv[1])
z, logsnr, cond = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(p.model(z, logsnr, cond), sys.argv[3])
print(sorted({m for m in sys.modules if m.startswith(("sdiff.training", "sdiff.eval"))}))
"""


def test_load_pretrained_needs_no_training_code(run_dir, newest, tmp_path):
    out = export_run(run_dir, tmp_path / "export")
    torch.save(inputs(), tmp_path / "in.pt")
    result = subprocess.run(
        [sys.executable, "-c", FRESH, str(out), str(tmp_path / "in.pt"), str(tmp_path / "o.pt")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert result.stdout.strip() == "[]"
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "o.pt"), reference(newest, "ema")(*inputs()))


def test_bf16_export_round_trips_in_bf16(run_dir, newest, tmp_path):
    out = export_run(run_dir, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    p = load_pretrained(out)
    assert {t.dtype for t in p.model.state_dict().values()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in newest["ema"].items()}
    assert all(torch.equal(v, expected[k]) for k, v in p.model.state_dict().items())
    up = load_pretrained(out, dtype=torch.float32)  # asked for: converted on load
    assert all(torch.equal(v, expected[k].float()) for k, v in up.model.state_dict().items())
    z, logsnr, cond = inputs()
    with torch.no_grad():
        assert p.model(z.bfloat16(), logsnr, cond).dtype == torch.bfloat16


def test_damaged_and_foreign_exports_are_refused_naming_the_file(run_dir, tmp_path):
    good = export_run(run_dir, tmp_path / "good")
    weights, config = good / "model.safetensors", good / "config.json"

    def broken(name: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for f in (weights, config):
            (folder / f.name).write_bytes(f.read_bytes())
        return folder

    data = weights.read_bytes()
    truncated = broken("truncated")
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = broken("garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00" * 100)
    no_weights = broken("no-weights")
    (no_weights / "model.safetensors").unlink()
    bad_json = broken("bad-json")
    (bad_json / "config.json").write_text(config.read_text()[:-20])
    document = json.loads(config.read_text())
    cases = {
        truncated: truncated / "model.safetensors",
        garbage: garbage / "model.safetensors",
        no_weights: no_weights / "model.safetensors",
        bad_json: bad_json / "config.json",
    }
    for name, change in {
        "unknown-kind": {"model": {**document["model"], "kind": "dit"}},
        "not-an-export": {"format": "something-else"},
        "newer-format": {"format_version": 2},
        "bad-field": {"model": {**document["model"], "width": "wide"}},
        "bad-prediction": {"diffusion": {**document["diffusion"], "prediction": "score"}},
    }.items():
        folder = broken(name)
        (folder / "config.json").write_text(json.dumps({**document, **change}))
        cases[folder] = folder / "config.json"
    # a config that builds another shape: the weights do not fit it
    wider = broken("wider")
    (wider / "config.json").write_text(
        json.dumps({**document, "model": {**document["model"], "width": 48}})
    )
    cases[wider] = wider / "model.safetensors"
    for folder, named in cases.items():
        with pytest.raises(ValueError) as err:
            load_pretrained(folder)
        assert str(named) in str(err.value), (folder.name, str(err.value))
    with pytest.raises(ValueError, match="unknown model kind 'dit'"):
        load_pretrained(tmp_path / "unknown-kind")
    with pytest.raises(ValueError, match=r"size mismatch for .*32.*48|48.*32"):
        load_pretrained(wider)
    with pytest.raises(ValueError, match="no such folder"):
        load_pretrained(tmp_path / "nowhere")


def test_tied_and_strided_tensors(tmp_path):
    """Tensors sharing one storage are stored once and tied again on load; non-contiguous ones
    are stored contiguous; the weights must fit the config before anything is written."""
    config = replace(PRESETS["uvit-tiny-32"], depth=2)
    model = build_model(config)
    model.blocks[1].mlp[0].weight = model.blocks[0].mlp[0].weight  # tied
    w = model.blocks[0].mlp[3].weight
    w.data = w.data.t().contiguous().t()  # same values, transposed strides
    assert not w.is_contiguous()
    out = save_pretrained(model, config, tmp_path / "tied")
    stored = load_file(out / "model.safetensors")
    document = json.loads((out / "config.json").read_text())
    assert document["tied"] == {"blocks.1.mlp.0.weight": "blocks.0.mlp.0.weight"}
    assert "blocks.1.mlp.0.weight" not in stored and "blocks.0.mlp.0.weight" in stored
    p = load_pretrained(out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in p.model.state_dict().items())
    # saved without diffusion settings: sampling says what is missing
    assert p.schedule_config is None and p.prediction is None
    with pytest.raises(ValueError, match="records no diffusion schedule"):
        _ = p.schedule
    with pytest.raises(ValueError, match="records no prediction type"):
        p.denoiser()
    with pytest.raises(ValueError, match="is not JSON"):
        save_pretrained(model, config, tmp_path / "meta", metadata={"when": object()})
    state = model.state_dict()
    state.pop("blocks.0.mlp.0.weight")
    with pytest.raises(ValueError, match="do not fit the uvit config: missing"):
        save_pretrained(state, config, tmp_path / "short")
    assert not (tmp_path / "short").exists()


def test_the_folder_is_written_as_a_whole(run_dir, tmp_path, monkeypatch):
    out = export_run(run_dir, tmp_path / "export")
    before = (out / "model.safetensors").read_bytes()
    raw = export_run(run_dir, out, ema=False)  # an earlier export is replaced
    assert raw == out and (out / "model.safetensors").read_bytes() != before
    assert load_pretrained(out).provenance["weights"] == "raw"
    # a write that fails half way leaves the export there as it was, and no temporary folder
    import safetensors.torch

    def fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError, match="No space left"):
        export_run(run_dir, out)
    assert load_pretrained(out).provenance["weights"] == "raw"
    with pytest.raises(OSError):
        export_run(run_dir, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    monkeypatch.undo()
    # a folder that holds anything else is never replaced
    with pytest.raises(ValueError, match="holds more than an export"):
        export_run(run_dir, run_dir)
    # leftovers of a crashed writer (a process that is gone) are cleaned by the next write
    stale = tmp_path / ".export.999999999.tmp"
    stale.mkdir()
    export_run(run_dir, out)
    assert not stale.exists()


def test_which_checkpoint_is_exported(run_dir, newest, tmp_path):
    first = list_checkpoints(run_dir / "checkpoints")[0]
    by_step = load_pretrained(export_run(run_dir, tmp_path / "a", step=2))
    by_file = load_pretrained(export_run(run_dir, tmp_path / "b", checkpoint=first))
    alone = load_pretrained(export_run(first, tmp_path / "c"))  # a file: used as it is
    state = load_checkpoint(first)
    for p in (by_step, by_file, alone):
        assert p.provenance["step"] == 2
        assert all(torch.equal(v, state["ema"][k]) for k, v in p.model.state_dict().items())
    with pytest.raises(ValueError, match="no checkpoint of step 3 in"):
        export_run(run_dir, tmp_path / "d", step=3)
    # a checkpoint the run's config.json did not write is refused, naming the fields
    other = tmp_path / "other"
    other.mkdir()
    changed = replace(CONFIG, train=replace(CONFIG.train, lr=1e-3))
    (other / "config.json").write_text(json.dumps(to_dict(changed)))
    with pytest.raises(ValueError, match=r"differ at \['train.lr'\]"):
        export_run(other, tmp_path / "e", checkpoint=first)


def test_ema_snapshot_layout(run_dir, newest, tmp_path):
    model = reference(newest, "ema")
    folder = save_ema_snapshot(tmp_path / "run", model, CONFIG, step=4, images=32)
    assert folder == ema_snapshot_path(tmp_path / "run", 32) == tmp_path / "run/ema/000000000032"
    p = load_pretrained(folder)
    assert all(torch.equal(v, newest["ema"][k]) for k, v in p.model.state_dict().items())
    assert p.provenance["images"] == 32 and p.provenance["weights"] == "ema"
    assert p.provenance["config_hash"] == newest["config_hash"]


def test_exported_files_are_as_readable_as_any_new_file(run_dir, tmp_path):
    import os
    import stat

    out = export_run(run_dir, tmp_path / "export")
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json"):
        assert stat.S_IMODE((Path(out) / name).stat().st_mode) == 0o666 & ~mask


def test_the_trainer_writes_ema_snapshots_that_change_nothing(run_dir, tmp_path):
    """train.ema_snapshot_every_images=16: a snapshot after 16 and 32 images, each the EMA of
    the checkpoint of that step; the run's hash and final state are those of the run without
    snapshots (they report, they do not compute)."""
    from sdiff.training.config import apply_overrides, config_hash

    config = apply_overrides(CONFIG, ["train.ema_snapshot_every_images=16"])
    assert config_hash(config) == config_hash(CONFIG)
    run = tmp_path / "run"
    Trainer(config, run, progress=False).run()
    found = sorted(p.name for p in (run / "ema").iterdir())
    assert found == ["000000000016", "000000000032"]
    for ckpt in list_checkpoints(run / "checkpoints"):
        state = load_checkpoint(ckpt)
        snap = load_pretrained(ema_snapshot_path(run, state["images"]))
        assert snap.provenance["step"] == state["step"]
        got = snap.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in state["ema"].items())
    plain = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    final = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    for key in ("model", "ema"):
        assert all(torch.equal(final[key][k], v) for k, v in plain[key].items())


def test_export_command(run_dir, newest, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["export", str(run_dir), str(out), "--raw", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "exported step 4 (ckpt-000000000004.pt, raw weights, bf16)" in printed
    loaded = load_pretrained(out).model.state_dict()
    assert all(torch.equal(v, newest["model"][k].bfloat16()) for k, v in loaded.items())
    assert main(["export", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "neither a run folder (no config.json) nor a checkpoint" in capsys.readouterr().err
    assert main(["export", str(run_dir), str(tmp_path / "y"), "--step", "7"]) == 2
    assert "no checkpoint of step 7 in" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_configs_serialise_as_run_configs_do(name):
    config = PRESETS[name]
    data = model_config_to_dict(config)
    assert data == to_dict(config)  # the run config's form
    assert model_config_from_dict(json.loads(json.dumps(data))) == config
    assert from_dict(ModelConfig, data) == config


def test_model_config_types_are_checked():
    data = model_config_to_dict(PRESETS["unet-tiny-32"])
    for change, message in [
        ({"channels": [32, "64"]}, r"model.channels\[1\]: expected an integer"),
        ({"dropout": True}, "model.dropout: expected a number"),
        ({"emb_dim": 1.5}, "model.emb_dim: 1.5 does not fit"),
        ({"depth": 3}, r"unknown keys \['depth'\]"),
        ({"channels": [32]}, "one entry per level"),
    ]:
        with pytest.raises(ValueError, match=message):
            model_config_from_dict({**data, **change})
