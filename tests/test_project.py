"""Project set-up promises: the README's first commands, CI calling them, the package layout."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```")[1]
    commands = [line.strip() for line in first_block.splitlines()[1:] if line.strip()]
    assert commands[:2] == ["make demo", "make test"]


def test_ci_runs_make_test():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in lines


def test_kernels_folder_is_installed_as_sdiff_kernels():
    import sdiff.kernels

    assert Path(sdiff.kernels.__file__).resolve().parent == ROOT / "kernels"


# torch-free: run with -S, where no site-packages (torch, numpy) are importable
SOURCE_IMPORT = """\
import importlib.util, sys
import sdiff.bench.gpu, sdiff.errors
specs = [importlib.util.find_spec(m) for m in ("sdiff", "sdiff.kernels", "sdiff.ablations")]
print(*[s.origin for s in specs], sdiff.bench.gpu.__file__)
print(sdiff.errors.__name__, sys.modules["sdiff.errors"] is sys.modules["sdiff.util.errors"])
"""


@pytest.mark.parametrize("where", ["this checkout", "a copy"])
def test_the_source_tree_imports_as_installed_from_its_root(tmp_path, where):
    """From a repository root, with no install (``-S``: no site-packages, so no editable
    install's hook either), ``sdiff.kernels``, ``sdiff.bench`` and ``sdiff.ablations`` are that
    tree's top-level folders; old module names are the moved modules themselves."""
    import shutil
    import subprocess
    import sys

    root = ROOT
    if where == "a copy":
        root = tmp_path / "tree"
        for folder in ("sdiff", "kernels", "bench", "ablations"):
            shutil.copytree(ROOT / folder, root / folder,
                            ignore=shutil.ignore_patterns("__pycache__", "asv"))  # fmt: skip
    out = subprocess.run([sys.executable, "-S", "-c", SOURCE_IMPORT], cwd=root,
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert [Path(f).relative_to(root).as_posix() for f in out[:4]] == [
        "sdiff/__init__.py", "kernels/__init__.py", "ablations/__init__.py",
        "bench/gpu/__init__.py"]  # fmt: skip
    assert out[4:] == ["sdiff.util.errors", "True"]


def test_sdiff_is_the_only_top_level_package():
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = config["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} == {"sdiff"}


def test_the_gpu_scripts_call_modules_that_exist():
    """bench/gpu/*.sh run `python3 -m sdiff....` and pytest on test files from the repository
    root; every module and file they name must exist (they cannot be run here)."""
    import importlib.util
    import re

    scripts = sorted((ROOT / "bench" / "gpu").glob("*.sh"))
    modules, files = set(), set()
    for script in scripts:
        text = script.read_text()
        modules |= set(re.findall(r"python3 -m (sdiff(?:\.\w+)+)", text))
        files |= set(re.findall(r"\b(tests/test_\w+\.py)\b", text))
        for sourced in re.findall(r'source "\$\(dirname "\$0"\)/(\S+)"', text):
            assert (script.parent / sourced).is_file(), f"{script.name} sources {sourced}"
    assert "sdiff.bench.throughput" in modules and "sdiff.bench.gpu.memory_cap" in modules
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert missing == []
    assert [f for f in sorted(files) if not (ROOT / f).is_file()] == []


def test_every_subpackage_is_installed():
    """A wheel holds only the packages pyproject.toml lists: every folder of sdiff/ with an
    __init__.py must be one of them (or the wheel would miss it)."""
    tomllib = pytest.importorskip("tomllib")
    packages = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                   ["packages"])  # fmt: skip
    inits = (ROOT / "sdiff").rglob("__init__.py")
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
    assert found - packages == set()


def test_every_shipped_grid_file_is_installed():
    """A grid file missing from the wheel would make `sdiff ablate 2` fail once installed:
    every YAML file under ablations/grids matches a package-data pattern of sdiff.ablations."""
    import re

    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["sdiff.ablations"]
    folder = ROOT / config["package-dir"]["sdiff.ablations"]
    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*.yaml")]
    assert len(files) >= 11  # the 8 tables and the 3 grids beyond the paper
    # setuptools globs: "*" does not cross a folder
    regexes = [re.compile(re.escape(pat).replace(r"\*", "[^/]*") + "$") for pat in patterns]
    missing = [f for f in files if not any(r.match(f) for r in regexes)]
    assert not missing, f"grid files not in package-data: {missing}"
