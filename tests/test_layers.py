"""The layers point one way: kernels <- util <- core (diffusion <- models, data <- training <-
eval) <- applications (ablations, bench) <- report and CLI. An AST scan reads every import in
the source tree (module level and inside functions alike) and fails on an arrow that runs back;
a synthetic tree shows that it does fail. The CLI's parser imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
FOLDERS = {"sdiff": "sdiff", "kernels": "sdiff.kernels", "bench": "sdiff.bench",
           "ablations": "sdiff.ablations"}  # fmt: skip

CORE = {"diffusion", "models", "data", "training", "eval"}
BASE = {"kernels", "util"}
# layer -> the layers it may import ("root" is the package itself: sdiff.__version__)
ALLOWED = {
    "kernels": set(),
    "util": set(),
    "diffusion": {"util"},
    "models": {"util", "kernels", "diffusion"},
    "data": {"util"},
    "training": BASE | {"diffusion", "models", "data"},
    "eval": BASE | {"diffusion", "models", "data", "training"},
    "ablations": BASE | CORE,
    "bench": BASE | CORE,
    "report": BASE | CORE | {"ablations", "bench"},
    "cli": BASE | CORE | {"ablations", "bench", "report"},
    "main": {"cli"},
    "root": set(),
}


def layer(module: str) -> str:
    """sdiff.models.unet -> models; sdiff -> root; sdiff.__main__ -> main."""
    parts = module.split(".")
    if parts[0] != "sdiff":
        raise ValueError(module)
    if len(parts) == 1:
        return "root"
    return {"__main__": "main"}.get(parts[1], parts[1])


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root)
    package = FOLDERS[rel.parts[0]]
    parts = [*package.split("."), *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _from_root(name: str) -> str:
    """What ``from sdiff import name`` imports: a dunder (``__version__``) is the package
    itself, a lazy export (``build_model``) its module, anything else the submodule."""
    from sdiff import _EXPORTS

    if name.startswith("__"):
        return "sdiff"
    return _EXPORTS.get(name, f"sdiff.{name}")


def imports(path: Path, module: str) -> list[tuple[int, str, bool]]:
    """(line, imported sdiff module, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base] if base != "sdiff" else [_from_root(a.name) for a in node.names]
        else:
            continue
        for name in names:
            if name == "sdiff" or name.startswith("sdiff."):
                found.append((node.lineno, name, id(node) in top))
    return found


def violations(root: Path) -> list[str]:
    """Every import that runs against the layers, or uses a module's pre-subpackage name."""
    from sdiff import ALIASES

    out = []
    for folder in FOLDERS:
        for path in sorted((root / folder).rglob("*.py")):
            if {"asv", "perf", "gpu"} & set(path.relative_to(root).parts[1:-1]):
                continue  # scripts and suites outside the installed package: applications
            module = module_name(path, root)
            here = layer(module)
            for line, name, _ in imports(path, module):
                where = f"{path.relative_to(root)}:{line}"
                if name in ALIASES:
                    out.append(f"{where}: {name} is an old name; import {ALIASES[name]}")
                    continue
                there = layer(name)
                if there not in (here, "root") and there not in ALLOWED[here]:
                    out.append(f"{where}: {here} imports {name} ({there})")
    return out


def test_the_source_tree_keeps_the_layers():
    assert violations(ROOT) == []


def test_scripts_and_suites_only_use_the_library(tmp_path):
    """bench/asv, bench/perf and bench/gpu sit above the library: none may be imported by it."""
    for path in (ROOT / "sdiff").rglob("*.py"):
        for _, name, _ in imports(path, module_name(path, ROOT)):
            assert not name.startswith(("sdiff.bench.asv", "sdiff.bench.perf", "sdiff.bench.gpu"))


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_tree(tmp_path):
    """A minimal tree with one module per layer."""
    write(tmp_path / "sdiff/__init__.py")
    for sub in ["util", "diffusion", "models", "training", "eval"]:
        write(tmp_path / f"sdiff/{sub}/__init__.py")
    write(tmp_path / "kernels/__init__.py")
    write(tmp_path / "bench/__init__.py")
    write(tmp_path / "ablations/__init__.py")
    write(tmp_path / "sdiff/diffusion/schedules.py", "import math\nfrom sdiff.util import errors\n")
    write(tmp_path / "bench/throughput.py", "from sdiff.diffusion import schedules\n")
    return tmp_path


@pytest.mark.parametrize(
    ("path", "source", "message"),
    [
        # the core importing an application, at module level and lazily inside a function
        ("sdiff/diffusion/samplers.py", "from sdiff.ablations import runner\n",
         "diffusion imports sdiff.ablations (ablations)"),
        ("sdiff/eval/run.py", "def f():\n    import sdiff.bench.memory\n",
         "eval imports sdiff.bench.memory (bench)"),
        # a lower core layer importing a higher one; util importing the core
        ("sdiff/models/unet.py", "from sdiff.training.config import RunConfig\n",
         "models imports sdiff.training.config (training)"),
        ("sdiff/util/files.py", "from sdiff.models import presets\n",
         "util imports sdiff.models (models)"),
        # kernels import nothing of sdiff; applications never import each other or the CLI
        ("kernels/attention.py", "from ..util import errors\n",
         "kernels imports sdiff.util (util)"),
        ("ablations/cell.py", "from sdiff.bench.memory import estimate\n",
         "ablations imports sdiff.bench.memory (bench)"),
        ("bench/memory.py", "from sdiff import cli\n", "bench imports sdiff.cli (cli)"),
        ("sdiff/report.py", "from sdiff.cli import main\n", "report imports sdiff.cli (cli)"),
        # a module's old flat name
        ("sdiff/models/blocks.py", "from sdiff.wavelets import DWT\n",
         "sdiff.wavelets is an old name; import sdiff.models.wavelets"),
    ],
)  # fmt: skip
def test_an_arrow_back_fails_the_scan(fake_tree, path, source, message):
    assert violations(fake_tree) == []  # the clean fake tree passes
    write(fake_tree / path, source)
    found = violations(fake_tree)
    assert len(found) == 1 and found[0].endswith(message), found


def test_the_parser_imports_no_torch():
    """`sdiff --help` and parsing a command line load neither torch nor the core library."""
    code = (
        "import sys; from sdiff.cli import build_parser; "
        "build_parser().parse_args(['train', '--out', 'x']); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('sdiff.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (
        out.stdout.strip() == "['sdiff.cli', 'sdiff.util', 'sdiff.util.cli_args', "
        "'sdiff.util.errors']"
    )
