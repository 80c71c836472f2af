"""Portable models: a folder with the weights as safetensors and the config that rebuilds them.

    p = sdiff.load_pretrained("exports/digits")          # a Pretrained: model in eval mode, ...
    x = sample_ddpm(p.denoiser(), torch.randn(8, 1, 32, 32), schedule=p.schedule, steps=64,
                    cond=torch.arange(8))

A training checkpoint holds the optimizer, RNG states and the run's config, and loads through
the training code; an export holds only what inference needs and loads with ``sdiff.models``
and ``sdiff.diffusion`` alone. The layout (``save_pretrained`` writes it, ``load_pretrained``
reads it):

``model.safetensors``
    The state dict: tensors contiguous, dtype as saved (``dtype=`` converts the floating ones),
    each storage once (a tensor tied to another is stored once, its other names listed under
    ``"tied"`` in ``config.json``). Header metadata: ``format`` ("sdiff-pretrained"),
    ``format_version`` and the ``sdiff`` version.
``config.json``
    ``format``, ``format_version``; ``model``: the model config as run configs record it
    (``{"kind": "uvit", ...}``, the kind picks the class through ``sdiff.models.registry``);
    ``diffusion``: what a sampler needs, ``{"schedule": {...}, "prediction": "v"}`` (null when
    not given); ``tied``; ``provenance``: the caller's ``metadata`` (an export from a run adds
    its source, step, images, EMA or raw weights, config hash and run config) and the export's
    own sdiff version, torch version, date and git SHA (``sdiff.util.provenance``).

The folder is written as a whole: both files go into a hidden temporary folder beside it, which
is then renamed into place (an existing export there is moved aside first and removed after).
A crash leaves either the old export, the new one, or no folder, never a half export that
loads; leftovers of a crashed write are removed by the next write beside them. A folder that
holds anything else is never replaced.
"""

from __future__ import annotations

import json
import os
import shutil
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdiff import __version__
from sdiff.diffusion.process import PREDICTIONS, DiffusionConfig
from sdiff.diffusion.samplers import Denoiser, x_predictor
from sdiff.diffusion.schedules import LogSNRFn, ScheduleConfig
from sdiff.models.registry import MODELS, build_model, config_class, is_model_config
from sdiff.util.provenance import provenance
from sdiff.util.runlock import pid_alive

__all__ = [
    "CONFIG_NAME",
    "DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "Pretrained",
    "load_pretrained",
    "model_config_from_dict",
    "model_config_to_dict",
    "save_pretrained",
]

FORMAT = "sdiff-pretrained"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# the names the command line gives the export dtypes
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Pretrained:
    """A loaded export: the model (eval mode) and what sampling from it needs.

    ``schedule_config`` and ``prediction`` are None for an export written without diffusion
    settings; ``schedule`` and ``denoiser()`` then raise a ValueError saying so.
    """

    model: nn.Module
    model_config: Any
    schedule_config: ScheduleConfig | None
    prediction: str | None
    provenance: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None

    @property
    def schedule(self) -> LogSNRFn:
        """t -> logSNR of the training run, at the model's resolution."""
        if self.schedule_config is None:
            raise ValueError(f"the export {self.folder} records no diffusion schedule")
        return self.schedule_config.build(self.model_config.resolution)

    def denoiser(self) -> Denoiser:
        """``denoise(z, logsnr, cond) -> x_hat`` for ``sdiff.diffusion.samplers``."""
        if self.prediction is None:
            raise ValueError(f"the export {self.folder} records no prediction type")
        return x_predictor(self.model, self.prediction)


# -- model configs as JSON --------------------------------------------------------------------
def model_config_to_dict(config: Any) -> dict[str, Any]:
    """A registered model config as a run's ``config.json`` records it: ``kind`` first, then
    every field, tuples as lists."""
    if not is_model_config(config):
        raise ValueError(f"not a model config of a registered kind: {type(config).__name__}")

    def plain(value: Any) -> Any:
        return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value

    return {"kind": config.kind, **{f.name: plain(getattr(config, f.name)) for f in fields(config)}}


def model_config_from_dict(data: Any, where: str = "model") -> Any:
    """The config ``model_config_to_dict`` wrote: the class registered for ``data["kind"]``,
    every key a field, every value of its field's type (lists become tuples); the class's own
    checks then run. Errors are ValueErrors that start with ``where``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object with a 'kind', got {data!r}")
    kind = data.get("kind")
    if not isinstance(kind, str) or kind not in MODELS:
        raise ValueError(f"{where}: unknown model kind {kind!r}; known kinds: {sorted(MODELS)}")
    cls = config_class(kind)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names - {"kind"})
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _decode(v, hints[k], f"{where}.{k}") for k, v in data.items() if k != "kind"}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from None


def _decode(value: Any, hint: Any, where: str) -> Any:
    """A JSON value as the annotated field type (the types model configs use)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _decode(value, arg, where)
                except ValueError:
                    pass
        raise ValueError(f"{where}: {value!r} does not fit {hint}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        return tuple(_decode(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is bool and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


# -- saving -----------------------------------------------------------------------------------
def save_pretrained(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    model_config: Any,
    folder: str | os.PathLike[str],
    *,
    diffusion: DiffusionConfig | None = None,
    metadata: Mapping[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the export of a model (or its state dict) built from ``model_config`` into
    ``folder`` (see the module docstring); return the folder.

    The weights must fit the config (checked against the model built on the meta device, so
    nothing is allocated) and ``metadata`` must be JSON; ``dtype`` converts the floating
    tensors (None: as they are). Provenance is ``metadata`` plus the export's own sdiff and
    torch versions, date and git SHA (which win over keys of the same name). An existing
    ``folder`` is replaced only if it is empty or holds an export.
    """
    folder = Path(folder)
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else dict(model_or_state_dict)
    )
    config = model_config_to_dict(model_config)
    _check_fits(state, model_config)
    tensors, tied = _unique_tensors(state, dtype)
    p = provenance()
    ours = {"sdiff": __version__, "torch": p.torch, "date": p.date, "git_sha": p.git_sha}
    sampling = None
    if diffusion is not None:
        sampling = {"schedule": diffusion.schedule.to_dict(), "prediction": diffusion.prediction}
    document = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config,
        "diffusion": sampling,
        "tied": tied,
        "provenance": {**dict(metadata or {}), **ours, "dirty": p.dirty},
    }
    try:
        text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata for {folder / CONFIG_NAME} is not JSON: {err}") from None
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "sdiff": __version__}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=header)
        (tmp / CONFIG_NAME).write_text(text)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            _fsync(tmp / name)

    _write_folder(folder, write)
    return folder


def _check_fits(state: dict[str, Any], model_config: Any) -> None:
    """The state dict has exactly the tensors, of the shapes, of the model the config builds."""
    bad = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise ValueError(f"the state dict holds non-tensors: {bad[:5]}")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(model_config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"the weights do not fit the {model_config.kind} config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )


def _unique_tensors(
    state: dict[str, Tensor], dtype: torch.dtype | None
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(name -> contiguous CPU tensor, each storage once; alias -> the name it is tied to).

    Tensors that are one view of one storage (tied weights) are stored once; tensors that
    share a storage otherwise (two slices of one buffer) are copied apart, as safetensors
    stores whole, disjoint tensors only."""
    tensors: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: dict[tuple, str] = {}
    for name, t in state.items():
        t = t.detach()
        if t.numel():
            storage = (t.device, t.untyped_storage().data_ptr())
            view = (*storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
            if view in views:
                tied[name] = views[view]
                continue
            views[view] = name
            if storage in storages:
                t = t.clone()
            storages[storage] = name
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[name] = t.to("cpu").contiguous()
    return tensors, tied


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform/filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Create ``folder`` as a whole: ``write(tmp)`` fills a hidden folder beside it, which is
    then renamed into place (see the module docstring)."""
    _check_replaceable(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, folder.name)
    tmp = parent / f".{folder.name}.{os.getpid()}.tmp"
    old = parent / f".{folder.name}.{os.getpid()}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        for file in tmp.iterdir():  # safetensors writes 0600: an export is as readable as a file
            os.chmod(file, 0o666 & ~mask)
        _fsync(tmp)
        if folder.exists():
            os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                os.replace(old, folder)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_replaceable(folder: Path) -> None:
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise ValueError(f"{folder} exists and is not a folder; choose another export folder")
    if folder.is_dir():
        ours = (WEIGHTS_NAME, CONFIG_NAME)
        others = sorted(p.name for p in folder.iterdir() if p.name not in ours)
        if others:
            raise ValueError(
                f"{folder} holds more than an export ({others[:3]}); an export replaces only "
                f"an empty folder or an earlier export, so choose a new folder"
            )


def _remove_leftovers(parent: Path, name: str) -> None:
    """Remove ``.<name>.<pid>.tmp`` / ``.old`` folders that a process that no longer runs left."""
    for path in parent.glob(f".{name}.*"):
        pid, _, end = path.name[len(name) + 2 :].partition(".")
        if end in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


# -- loading ----------------------------------------------------------------------------------
def load_pretrained(
    folder: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Pretrained:
    """The export in ``folder`` (see the module docstring): its model rebuilt from
    ``config.json`` through the model registry, the weights loaded strictly, in eval mode on
    ``device``, in ``dtype`` (None: the dtype the weights were saved in), and the diffusion
    settings sampling needs. A missing or damaged file, a config of an unknown kind or weights
    that do not fit it are a ValueError naming the file."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise ValueError(f"{folder} is not an export folder (no such folder)")
    document = _read_config(config_path)
    model_config = model_config_from_dict(document["model"], f"{config_path}: model")
    schedule_config, prediction = _read_diffusion(document.get("diffusion"), config_path)
    state = _read_weights(weights_path)
    for alias, source in (document.get("tied") or {}).items():
        if source not in state:
            raise ValueError(f"{config_path}: {alias!r} is tied to {source!r}, not in the weights")
        state[alias] = state[source]
    model = build_model(model_config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        problems = "; ".join(line.strip() for line in str(err).splitlines()[1:4])
        raise ValueError(
            f"{weights_path} does not fit the {model_config.kind} model of {config_path}: "
            f"{problems}"
        ) from None
    if dtype is None:
        saved = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = saved.pop() if len(saved) == 1 else None
    model = model.to(device=device, dtype=dtype).eval()
    return Pretrained(model, model_config, schedule_config, prediction,
                      dict(document.get("provenance") or {}), folder)  # fmt: skip


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist: not an sdiff export folder")
    try:
        document = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not the config of an sdiff export (no format {FORMAT!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {document.get('format_version')!r}; this sdiff "
            f"({__version__}) reads version {FORMAT_VERSION}"
        )
    if "model" not in document:
        raise ValueError(f"{path} has no model config")
    return document


def _read_diffusion(section: Any, path: Path) -> tuple[ScheduleConfig | None, str | None]:
    if section is None:
        return None, None
    where = f"{path}: diffusion"
    if not isinstance(section, dict) or set(section) != {"schedule", "prediction"}:
        raise ValueError(f"{where} must hold exactly 'schedule' and 'prediction'")
    prediction = section["prediction"]
    if prediction not in PREDICTIONS:
        raise ValueError(f"{where}.prediction: {prediction!r} is not one of {list(PREDICTIONS)}")
    schedule = section["schedule"]
    if not isinstance(schedule, dict):
        raise ValueError(f"{where}.schedule: expected an object, got {schedule!r}")
    hints = typing.get_type_hints(ScheduleConfig)
    known = {f.name for f in fields(ScheduleConfig)}
    if set(schedule) - known:
        raise ValueError(f"{where}.schedule: unknown keys {sorted(set(schedule) - known)}")
    try:
        kwargs = {k: _decode(v, hints[k], f"{where}.schedule.{k}") for k, v in schedule.items()}
        return ScheduleConfig(**kwargs), prediction
    except ValueError as err:
        message = str(err)
        raise ValueError(message if message.startswith(where) else f"{where}: {message}") from None


def _read_weights(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise ValueError(f"{path} does not exist: the export has no weights")
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for damaged files
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {reason}") from None
