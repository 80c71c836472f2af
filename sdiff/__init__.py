"""sdiff: pixel-space diffusion at high resolution, after simple diffusion (Hoogeboom, Heek,
Salimans, ICML 2023, arXiv 2301.11093) and SiD2 (arXiv 2410.19324).

Layers, each importing only the ones before it:

1. ``sdiff.kernels`` (the top-level ``kernels/`` folder): Triton kernels; imports nothing of sdiff.
2. ``sdiff.util``: errors and exit codes, atomic files, locks, devices, config validation,
   provenance; imports nothing else of sdiff.
3. The core library: ``sdiff.diffusion`` (schedules, process and losses, samplers, analytic
   references), ``sdiff.models`` (attention, blocks, wavelets, U-Net, U-ViT, the model registry,
   presets, FLOPs, compile), ``sdiff.data``, then ``sdiff.training`` (configs, the one
   training step, the trainer, checkpoints) and ``sdiff.eval`` (sampling from runs, FID & co.).
4. Applications: ``sdiff.ablations`` (``ablations/``) and ``sdiff.bench`` (``bench/``).
5. ``sdiff.report`` and ``sdiff.cli``, which import applications only inside a subcommand.

Importing ``sdiff`` itself is cheap (no torch): the names below load on first use. Modules that
moved into the subpackages keep their old names (``sdiff.schedules`` is
``sdiff.diffusion.schedules``, ``sdiff.attention_backends`` is ``sdiff.models.attention``, ...).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"

# Public names of the package root -> the module that defines them.
_EXPORTS = {
    "PRESETS": "sdiff.models.presets",
    "build_model": "sdiff.models.presets",
    "get_preset": "sdiff.models.presets",
    "attention": "sdiff.models.attention",
    "load_pretrained": "sdiff.models.pretrained",
}

# Modules that lived at the package root before the core was grouped into subpackages.
ALIASES = {
    "sdiff.errors": "sdiff.util.errors",
    "sdiff.files": "sdiff.util.files",
    "sdiff.validation": "sdiff.util.validation",
    "sdiff.runlock": "sdiff.util.runlock",
    "sdiff.devices": "sdiff.util.devices",
    "sdiff.cli_args": "sdiff.util.cli_args",
    "sdiff.schedules": "sdiff.diffusion.schedules",
    "sdiff.samplers": "sdiff.diffusion.samplers",
    "sdiff.analytic": "sdiff.diffusion.analytic",
    "sdiff.sampler_check": "sdiff.diffusion.sampler_check",
    "sdiff.attention_backends": "sdiff.models.attention",
    "sdiff.blocks": "sdiff.models.blocks",
    "sdiff.wavelets": "sdiff.models.wavelets",
    "sdiff.unet": "sdiff.models.unet",
    "sdiff.uvit": "sdiff.models.uvit",
    "sdiff.presets": "sdiff.models.presets",
    "sdiff.flops": "sdiff.models.flops",
    "sdiff.compile": "sdiff.models.compile",
    "sdiff.text": "sdiff.models.text",
    "sdiff.images": "sdiff.data.images",
    "sdiff.config": "sdiff.training.config",
    "sdiff.train": "sdiff.training.trainer",
    "sdiff.checkpoint": "sdiff.training.checkpoint",
    "sdiff.evaluate": "sdiff.eval.metrics",
    "sdiff.inception_weights": "sdiff.eval.inception",
    "sdiff.sample": "sdiff.eval.sample",
    "sdiff.run_eval": "sdiff.eval.run_eval",
}

# The folders beside sdiff/ that install as its subpackages (pyproject.toml's package-dir).
SOURCE_FOLDERS = {
    "sdiff.kernels": "kernels",
    "sdiff.bench": "bench",
    "sdiff.ablations": "ablations",
}


class _Alias(importlib.abc.Loader):
    """Loads an old module name as the module that now holds it (the same object)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        # the import system stamped the alias's spec on the module: give it its own back
        module.__spec__ = self.own_spec


class _Finder(importlib.abc.MetaPathFinder):
    """Old module names (``ALIASES``) and, in a source checkout, the top-level ``kernels/``,
    ``bench/`` and ``ablations/`` folders as ``sdiff.kernels``, ``sdiff.bench`` and
    ``sdiff.ablations``: the tree imports the way it installs, from the repository root, with
    no install, copy or PYTHONPATH (an installed wheel has them inside sdiff/ and skips this)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname in ALIASES:
            return importlib.util.spec_from_loader(fullname, _Alias(ALIASES[fullname]))
        folder = SOURCE_FOLDERS.get(fullname)
        if folder is None:
            return None
        here = self.root / folder
        if (Path(__file__).parent / folder).is_dir() or not (here / "__init__.py").is_file():
            return None  # installed layout, or not a checkout: the normal finders decide
        return importlib.util.spec_from_file_location(
            fullname, here / "__init__.py", submodule_search_locations=[str(here)]
        )


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder(Path(__file__).resolve().parent.parent))


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif f"sdiff.{name}" in ALIASES:
        value = importlib.import_module(f"sdiff.{name}")
    else:
        raise AttributeError(f"module 'sdiff' has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["PRESETS", "__version__", "attention", "build_model", "get_preset", "load_pretrained"]
