"""Ablation grids: the paper's tables and users' own, declared in grid files
(``ablations.gridfile``; the shipped ones in ``ablations/grids/``), their expansion into cells
(``grid``, whose base configs are in ``scales``), running one cell (``cell``), the results store
(``store``), who runs the cells (``executors``), the runner behind ``sdiff ablate`` (``runner``)
and exports of a store (``results``).

Installed as ``sdiff.ablations`` (the top-level ``ablations/`` folder is mapped into the package
by pyproject.toml). ``TABLES`` maps the paper's table numbers to ``Table``s read from
``grids/table<N>.yaml``; ``get_table`` resolves a number, a name or alias ("2", "schedule",
"table2"), a shipped extra grid's name ("shift-resolution") or a grid file's path.

May import: the core library (``sdiff.diffusion``, ``sdiff.models``, ``sdiff.data``,
``sdiff.training``, ``sdiff.eval``) and ``sdiff.util``; never ``sdiff.bench``, ``sdiff.report``
or ``sdiff.cli``, which sit above it.

| table | grid file | what |
|---|---|---|
| 1 | table1.yaml, table1_memory.py | kernel vs feature-map memory per resolution (computed) |
| 2 | table2.yaml | cosine vs shifted noise schedule |
| 3 | table3.yaml | dropout placement |
| 4 | table4.yaml | blocks at the lowest resolution |
| 5 | table5.yaml | none vs DWT vs patching, FID and speed |
| 6 | table6.yaml | multiscale loss on/off |
| 7 | table7.yaml | comparison with the literature (its rows in the file) |
| 8 | table8.yaml | text-to-image |
"""

from __future__ import annotations

import functools
from pathlib import Path

from sdiff.ablations.grid import Table
from sdiff.ablations.gridfile import GRIDS_DIR, load_grid, shipped_grids

__all__ = ["EXTRA_GRIDS", "TABLES", "get_table", "load_grid"]


def _load() -> dict[int, Table]:
    tables = (load_grid(GRIDS_DIR / f"table{n}.yaml") for n in range(1, 9))
    return {t.number: t for t in tables}


TABLES: dict[int, Table] = _load()


@functools.cache
def _extra(name: str) -> Table:
    return load_grid(shipped_grids()[name])


EXTRA_GRIDS = tuple(name for name in shipped_grids() if not name.startswith("table"))


def get_table(name: str | int) -> Table:
    """A paper table by number (1-8), name or alias; a shipped extra grid by name; or the grid
    file at a path (``*.yaml``/``*.yml``)."""
    key = str(name).strip()
    if key.endswith((".yaml", ".yml")) or ("/" in key and Path(key).is_file()):
        return load_grid(key)
    key = key.lower()
    if key.isdigit() and int(key) in TABLES:
        return TABLES[int(key)]
    for table in TABLES.values():
        if key == table.name or key in table.aliases:
            return table
    if key in EXTRA_GRIDS:
        return _extra(key)
    names = ", ".join(f"{t.number} ({t.name})" for t in TABLES.values())
    extra = f"; grids: {', '.join(EXTRA_GRIDS)}" if EXTRA_GRIDS else ""
    raise ValueError(f"unknown table {name!r}; tables: {names}{extra}; or a grid file's path")
