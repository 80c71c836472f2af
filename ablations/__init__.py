"""The paper's tables as ablation grids: one module per table of simple diffusion (arXiv
2301.11093), the grid and its cells (``grid``, ``scales``), running one cell (``cell``), the
results store (``store``), who runs the cells (``executors``) and the runner behind
``sdiff ablate`` (``runner``).

Installed as ``sdiff.ablations`` (the top-level ``ablations/`` folder is mapped into the package
by pyproject.toml). ``TABLES`` maps table numbers to ``Table``s; ``get_table`` resolves a number
or an alias ("2", "schedule", "table2").

May import: the core library (``sdiff.diffusion``, ``sdiff.models``, ``sdiff.data``,
``sdiff.training``, ``sdiff.eval``) and ``sdiff.util``; never ``sdiff.bench``, ``sdiff.report``
or ``sdiff.cli``, which sit above it.

| table | module | what |
|---|---|---|
| 1 | table1_memory | memory of 3x3 kernels vs feature maps per resolution (computed) |
| 2 | table2_schedule | cosine vs shifted noise schedule |
| 3 | table3_dropout | dropout placement |
| 4 | table4_blocks | blocks at the lowest resolution |
| 5 | table5_downsampling | none vs DWT vs patching, FID and speed |
| 6 | table6_multiscale | multiscale loss on/off |
| 7 | table7_imagenet | comparison with the literature |
| 8 | table8_text | text-to-image |
"""

from __future__ import annotations

import importlib

from sdiff.ablations.grid import Table

__all__ = ["TABLES", "get_table"]


_MODULES = (
    "table1_memory",
    "table2_schedule",
    "table3_dropout",
    "table4_blocks",
    "table5_downsampling",
    "table6_multiscale",
    "table7_imagenet",
    "table8_text",
)


def _load() -> dict[int, Table]:
    tables = (importlib.import_module(f"sdiff.ablations.{m}").TABLE for m in _MODULES)
    return {t.number: t for t in tables}


TABLES: dict[int, Table] = _load()


def get_table(name: str | int) -> Table:
    """A table by number (1-8) or alias."""
    key = str(name).strip().lower()
    if key.isdigit() and int(key) in TABLES:
        return TABLES[int(key)]
    for table in TABLES.values():
        if key == table.name or key in table.aliases:
            return table
    names = ", ".join(f"{t.number} ({t.name})" for t in TABLES.values())
    raise ValueError(f"unknown table {name!r}; tables: {names}")
