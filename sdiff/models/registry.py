"""The one model registry: ``kind -> (Config, Module)``.

Every place that needs to know which kinds of model exist asks here: run configs serialise and
load a model config through ``kind`` (``sdiff.training.config``), ``build_model`` builds the
registered module, and presets, FLOP counts, memory and throughput benches build through it.
Adding a kind is one ``register`` call; no other code switches on the kind.

What differs between kinds is behaviour of the config classes, not ``isinstance`` tests at the
call sites. A registered config class is a frozen dataclass with

- ``kind: ClassVar[str]`` (the registered name, written as ``"kind"`` in ``config.json``),
- ``resolution``, ``in_channels``, ``num_classes`` fields,
- ``text_conditioned`` (a property: cond carries ``text_dim``-d text embeddings),

and, to be usable by the benches and ablations, the per-kind methods of the U-Net / U-ViT
configs (``sdiff.models.unet.LevelsMixin``): ``level_sides()``, ``attention_sides()``,
``dropout_sides()``, ``transformer_level``, ``patch_size_at(resolution)``,
``at_resolution(resolution)`` and ``with_checkpointing(on)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from sdiff.models.unet import UNet, UNetConfig
from sdiff.models.uvit import UViT, UViTConfig

__all__ = [
    "MODELS",
    "ModelKind",
    "build_model",
    "config_class",
    "is_model_config",
    "is_model_config_class",
    "model_kind",
    "register",
]


@dataclass(frozen=True)
class ModelKind:
    """A registered kind: its name, its config class and the module built from a config."""

    kind: str
    config_cls: type
    module_cls: type[nn.Module]


MODELS: dict[str, ModelKind] = {}


def register(kind: str, config_cls: type, module_cls: type[nn.Module]) -> ModelKind:
    """Register ``kind``: ``config_cls(...)`` configs build ``module_cls(config)``.

    ``config_cls.kind`` must equal ``kind`` (it is what a saved config records). Registering the
    same triple again is a no-op; another class under a taken kind is an error.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a model kind is a non-empty string; got {kind!r}")
    if getattr(config_cls, "kind", None) != kind:
        raise ValueError(
            f"{config_cls.__name__}.kind is {getattr(config_cls, 'kind', None)!r}, "
            f"not the kind {kind!r} it is registered under"
        )
    entry = ModelKind(kind, config_cls, module_cls)
    if kind in MODELS and MODELS[kind] != entry:
        old = MODELS[kind]
        raise ValueError(
            f"model kind {kind!r} is already registered to "
            f"({old.config_cls.__name__}, {old.module_cls.__name__})"
        )
    MODELS[kind] = entry
    return entry


def _known() -> list[str]:
    return sorted(MODELS)


def model_kind(config_or_kind: Any) -> ModelKind:
    """The registry entry of a kind name or of a config instance (its class's ``kind``)."""
    if isinstance(config_or_kind, str):
        if config_or_kind not in MODELS:
            raise ValueError(f"unknown model kind {config_or_kind!r}; known kinds: {_known()}")
        return MODELS[config_or_kind]
    entry = MODELS.get(getattr(type(config_or_kind), "kind", None))
    if entry is None or not isinstance(config_or_kind, entry.config_cls):
        raise ValueError(
            f"not a model config: {type(config_or_kind).__name__} (known kinds: {_known()})"
        )
    return entry


def config_class(kind: str) -> type:
    """The config class registered for ``kind``."""
    return model_kind(kind).config_cls


def is_model_config_class(cls: Any) -> bool:
    """Whether ``cls`` is a registered config class."""
    return any(cls is entry.config_cls for entry in MODELS.values())


def is_model_config(obj: Any) -> bool:
    """Whether ``obj`` is a config of a registered kind (what ``model_kind`` accepts)."""
    entry = MODELS.get(getattr(type(obj), "kind", None))
    return entry is not None and isinstance(obj, entry.config_cls)


def build_model(config: Any) -> nn.Module:
    """The registered module of ``config``'s kind, built from it (on the default device)."""
    return model_kind(config).module_cls(config)


register("unet", UNetConfig, UNet)
register("uvit", UViTConfig, UViT)
