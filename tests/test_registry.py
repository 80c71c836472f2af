"""The model registry ``kind -> (Config, Module)``: each kind round-trips through build_model and
the run-config JSON, unknown kinds fail naming the known ones, a third kind registered here works
everywhere without touching presets or config code, and the per-kind config methods the benches
and ablations call (``at_resolution`` against hand-written configs, and the rest)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import pytest
import torch
from torch import nn

from sdiff.data.datasets import DataConfig
from sdiff.models import presets, registry
from sdiff.models.flops import example_inputs, model_stats
from sdiff.models.presets import PRESETS, ModelConfig, get_preset
from sdiff.models.registry import MODELS, ModelKind, config_class, model_kind, register
from sdiff.models.unet import UNet, UNetConfig
from sdiff.models.uvit import TextCondition, UViT, UViTConfig
from sdiff.training.config import (
    LATER_FIELDS,
    RunConfig,
    apply_overrides,
    from_dict,
    get_run_preset,
    to_dict,
    to_json,
)

KINDS = [("unet", "unet-tiny-32", UNetConfig, UNet), ("uvit", "uvit-tiny-32", UViTConfig, UViT)]


# -- the built-in kinds ---------------------------------------------------------------------------


def test_the_registry_holds_exactly_the_two_model_kinds():
    assert MODELS == {
        "unet": ModelKind("unet", UNetConfig, UNet),
        "uvit": ModelKind("uvit", UViTConfig, UViT),
    }


@pytest.mark.parametrize(
    ("kind", "preset", "config_cls", "module_cls"), KINDS, ids=[k[0] for k in KINDS]
)
def test_each_kind_round_trips(kind, preset, config_cls, module_cls):
    config = get_preset(preset)
    assert model_kind(config) is MODELS[kind] and model_kind(kind) is MODELS[kind]
    assert config_class(kind) is config_cls
    for build in (registry.build_model, presets.build_model):
        assert type(build(config)) is module_cls
    assert type(presets.build_model(preset)) is module_cls
    # to_dict records the kind next to the fields, exactly as LevelsMixin.to_dict (asdict) does
    as_dict = to_dict(config)
    assert as_dict["kind"] == kind
    assert as_dict == json.loads(json.dumps({"kind": kind, **asdict(config)}))
    back = from_dict(ModelConfig, as_dict)
    assert type(back) is config_cls and back == config
    # the kind in the dict wins over the class asked for (the other built-in kind here)
    other = UViTConfig if config_cls is UNetConfig else UNetConfig
    assert from_dict(other, as_dict) == config
    # and inside a run config, through its JSON
    run = RunConfig(model=replace(config, in_channels=1), data=DataConfig())
    loaded = from_dict(RunConfig, json.loads(to_json(run)))
    assert loaded == run and type(loaded.model) is config_cls


def test_a_saved_model_config_still_loads():
    """A model section as a config.json stores it (hand-written, every field, lists for tuples)."""
    saved = {
        "kind": "uvit", "resolution": 32, "in_channels": 1, "downsample": "patch",
        "patch_size": 2, "wavelet": "haar", "dwt_levels": 1, "channels": [32],
        "blocks_down": [1], "blocks_up": [1], "transformer_resolution": 8, "width": 128,
        "depth": 4, "head_dim": 32, "mlp_ratio": 4.0, "dropout": 0.0,
        "dropout_resolutions": [], "num_classes": 10, "text_dim": None, "residual": False,
        "emb_dim": None, "norm_groups": 8, "checkpoint_levels": [],
        "checkpoint_transformer": False, "attention_backend": "auto",
    }  # fmt: skip
    config = from_dict(ModelConfig, saved)
    assert config == get_preset("uvit-digits-32")
    # written back with the model fields added since, at their "as before" values
    later = {name: value for (section, name), value in LATER_FIELDS.items() if section == "model"}
    assert to_dict(config) == {**saved, **later}


def test_unknown_kinds_fail_naming_the_known_ones():
    known = r"known kinds: \['unet', 'uvit'\]"
    with pytest.raises(ValueError, match=rf"unknown model kind 'dit'; {known}"):
        model_kind("dit")
    with pytest.raises(ValueError, match=rf"unknown model kind 'dit'; {known}"):
        config_class("dit")
    with pytest.raises(ValueError, match=rf"config: unknown model kind 'dit'; {known}"):
        from_dict(ModelConfig, {"kind": "dit"})
    with pytest.raises(ValueError, match=rf"config: unknown model kind None; {known}"):
        from_dict(ModelConfig, {"resolution": 32})
    run = to_dict(get_run_preset("digits"))
    run["model"]["kind"] = "dit"
    with pytest.raises(ValueError, match=rf"config\.model: unknown model kind 'dit'; {known}"):
        from_dict(RunConfig, run)
    with pytest.raises(ValueError, match=rf"not a model config: dict \({known}\)"):
        registry.build_model({"kind": "unet"})
    with pytest.raises(ValueError, match="not a model config: int"):
        presets.build_model(3)


# -- a third kind, registered from outside --------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    kind: ClassVar[str] = "toy"

    resolution: int = 32
    in_channels: int = 1
    num_classes: int = 0
    width: int = 4
    gains: tuple[float, ...] = (1.0,)

    @property
    def text_conditioned(self) -> bool:
        return False


class ToyNet(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.inner = nn.Conv2d(config.in_channels, config.width, 1)
        self.outer = nn.Conv2d(config.width, config.in_channels, 1)

    def forward(self, z, logsnr, cond=None):
        return self.outer(self.inner(z))


@pytest.fixture
def toy_kind():
    entry = register("toy", ToyConfig, ToyNet)
    try:
        yield entry
    finally:
        MODELS.pop("toy", None)


def test_a_registered_third_kind_works_without_touching_presets_or_config(toy_kind):
    config = ToyConfig(width=6, gains=(0.5, 2.0))
    assert model_kind("toy") is toy_kind and model_kind(config) is toy_kind
    assert config_class("toy") is ToyConfig
    for build in (registry.build_model, presets.build_model):
        model = build(config)
        assert type(model) is ToyNet and model.inner.out_channels == 6
    assert model(torch.zeros(2, 1, 32, 32), torch.zeros(2)).shape == (2, 1, 32, 32)
    as_dict = to_dict(config)
    assert as_dict == {"kind": "toy", "resolution": 32, "in_channels": 1, "num_classes": 0,
                       "width": 6, "gains": [0.5, 2.0]}  # fmt: skip
    assert from_dict(ModelConfig, as_dict) == config
    # as the model of a run: JSON round trip and overrides, through RunConfig's ModelConfig field
    run = RunConfig(model=config, data=DataConfig())
    loaded = from_dict(RunConfig, json.loads(to_json(run)))
    assert loaded == run and type(loaded.model) is ToyConfig
    assert apply_overrides(run, ["model.width=9"]).model == replace(config, width=9)
    with pytest.raises(ValueError, match=r"model\.gains\[0\]: expected a number"):
        apply_overrides(run, ['model.gains=["x"]'])
    with pytest.raises(ValueError, match=r"known kinds: \['toy', 'unet', 'uvit'\]"):
        model_kind("dit")


def test_registering_checks_the_kind_and_refuses_a_taken_one(toy_kind):
    register("toy", ToyConfig, ToyNet)  # the same triple again: a no-op
    assert MODELS["toy"] is not None and len(MODELS) == 3
    with pytest.raises(ValueError, match=r"'toy' is already registered to \(ToyConfig, ToyNet\)"):
        register("toy", ToyConfig, UNet)
    with pytest.raises(ValueError, match=r"UNetConfig\.kind is 'unet', not the kind 'toy2'"):
        register("toy2", UNetConfig, UNet)
    with pytest.raises(ValueError, match="non-empty string"):
        register("", ToyConfig, ToyNet)
    assert set(MODELS) == {"toy", "unet", "uvit"}


def test_an_unregistered_kind_is_not_a_model_config():
    with pytest.raises(ValueError, match="not a model config: ToyConfig"):
        presets.build_model(ToyConfig())
    assert "kind" not in to_dict(ToyConfig())  # a plain dataclass to the serialiser


# -- per-kind behaviour of the configs -----------------------------------------------------------

TINY_UNET = UNetConfig(
    resolution=32,
    channels=(16, 32, 64),  # sides 32, 16, 8
    blocks_down=(1, 1, 2),
    blocks_up=(1, 1, 3),
    attention_resolutions=(16, 8),
    head_dim=16,
    dropout=0.1,
    dropout_resolutions=(32, 8),
    num_classes=5,
    norm_groups=4,
)


def test_unet_at_a_higher_resolution_adds_dwt_levels():
    assert TINY_UNET.at_resolution(32) is TINY_UNET
    # the same network behind two DWT levels (32 -> 128 px); every other field kept
    assert TINY_UNET.at_resolution(128) == replace(
        TINY_UNET, resolution=128, downsample="dwt", dwt_levels=2
    )
    # a DWT U-Net keeps its levels and adds to them: the presets are these moves
    assert get_preset("unet-128").at_resolution(256) == get_preset("unet-256")
    assert get_preset("unet-256").at_resolution(512) == get_preset("unet-512")
    assert get_preset("unet-128").at_resolution(512).dwt_levels == 2
    # not a power-of-two multiple: only the resolution moves, and the sides no longer fit
    with pytest.raises(ValueError, match=r"attention_resolutions \[8, 16\] are not feature-map"):
        TINY_UNET.at_resolution(96)


def test_unet_at_a_lower_resolution_scales_its_attention_and_dropout_sides():
    # half the image: attention at (16, 8) -> (8, 4), dropout at (32, 8) -> (16, 4)
    assert TINY_UNET.at_resolution(16) == replace(
        TINY_UNET, resolution=16, attention_resolutions=(8, 4), dropout_resolutions=(16, 4)
    )
    assert get_preset("unet-tiny-32").at_resolution(16) == replace(
        get_preset("unet-tiny-32"),
        resolution=16,
        attention_resolutions=(8,),
        dropout_resolutions=(8,),
    )


def test_a_patching_unet_keeps_its_patch_size():
    config = UNetConfig(resolution=32, downsample="patch", patch_size=2, norm_groups=8)
    assert config.patch_size_at(64) is None
    assert config.at_resolution(64) == replace(config, resolution=64)


def test_uvit_at_resolution_changes_the_patch_size():
    uvit_l = get_preset("uvit-l-256")
    assert uvit_l.patch_size_at(256) == 2 and uvit_l.patch_size_at(512) == 4
    assert uvit_l.at_resolution(512) == get_preset("uvit-l-512")
    assert get_preset("uvit-l-512").at_resolution(256) == uvit_l
    assert uvit_l.at_resolution(128).patch_size == 1
    tiny = get_preset("uvit-tiny-32")  # patch 2, one conv level, transformer at 8: inner 16
    # the same model with a 4x4 patch (64 -> 16 px); every other field kept
    assert tiny.at_resolution(64) == replace(tiny, resolution=64, patch_size=4)
    for unreachable in (200, 64):
        message = rf"{unreachable} px cannot reach this U-ViT's 16x16 transformer through its conv"
        with pytest.raises(ValueError, match=message):
            uvit_l.at_resolution(unreachable)


def test_a_dwt_uvit_only_moves_its_resolution():
    config = UViTConfig(resolution=32, downsample="dwt", dwt_levels=1, channels=(16,),
                        transformer_resolution=8, width=32, head_dim=16, norm_groups=4)  # fmt: skip
    assert config.patch_size_at(64) is None
    with pytest.raises(ValueError, match="reaches side 16, not the transformer resolution 8"):
        config.at_resolution(64)


def test_transformer_text_and_attention_answers_per_kind():
    unet, uvit = get_preset("unet-tiny-32"), get_preset("uvit-tiny-32")
    assert unet.transformer_level is None and uvit.transformer_level == (8, 64)
    assert get_preset("uvit-l-256").transformer_level == (16, 2048)
    assert unet.attention_sides() == (16,) and uvit.attention_sides() == (8,)
    assert TINY_UNET.attention_sides() == (16, 8) and TINY_UNET.dropout_sides() == (32, 8)
    assert replace(TINY_UNET, dropout=0.0).dropout_sides() == ()
    assert not unet.text_conditioned and not uvit.text_conditioned
    text = replace(uvit, text_dim=8)
    assert text.text_conditioned
    _, _, cond = example_inputs(text, 2, device="cpu")
    assert isinstance(cond, TextCondition) and cond.embeddings.shape == (2, 77, 8)
    assert torch.equal(cond.labels, torch.zeros(2, dtype=torch.long))
    stats = model_stats(get_preset("uvit-l-256"))
    assert stats.attention_resolutions == (16,) and stats.dropout_resolutions == (16,)


def test_with_checkpointing_per_kind():
    unet, uvit = get_preset("unet-tiny-32"), get_preset("uvit-l-256")
    assert unet.with_checkpointing(True) == replace(unet, checkpoint_levels=(0, 1))
    assert unet.with_checkpointing(True).with_checkpointing(False) == unet
    on = uvit.with_checkpointing(True)
    assert on == replace(uvit, checkpoint_levels=(0, 1, 2), checkpoint_transformer=True)
    assert on.with_checkpointing(False) == uvit


def test_every_preset_answers_every_per_kind_question():
    for name, config in PRESETS.items():
        assert model_kind(config).config_cls is type(config), name
        assert config.at_resolution(config.resolution) is config
        assert config.with_checkpointing(False) == config
        assert isinstance(config.attention_sides(), tuple)
        assert isinstance(config.text_conditioned, bool)
