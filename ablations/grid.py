"""An ablation grid (a paper table or a user's grid file) and its expansion into cells.

A ``Table`` names its rows and columns, and optionally further axes; each entry is a list of
``--set``-style overrides (``sdiff.training.config.apply_overrides``) applied to the scale's
base config: the scale's own overrides, then columns, rows, extra axes, and the seed last
(``train.seed``, one cell per seed). Grid files (``ablations.gridfile``) declare them. A
``Scale`` (``smoke``, ``gpu``, ``paper``) gives the base config, the rows and columns run at
that scale, and how cells are evaluated. Expanding a table at a scale gives
``Cell``s; a cell is identified by the hash of its ``spec``: the resolved run config, the
evaluation settings (``eval_identity``: the fields of its ``sdiff.eval.spec.EvalSpec`` that
decide the numbers) and the kind of work (train+evaluate, or a computation such as Table 1's).
Same spec, same hash; any change of config or evaluation, a new hash, so a results store can
tell finished work from work still to do.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sdiff.eval.spec import EvalSpec
from sdiff.training.config import RunConfig, apply_overrides, identity_dict

__all__ = [
    "DEFAULT_EVAL",
    "Axis",
    "Cell",
    "EvalSpec",
    "Scale",
    "Table",
    "cell_hash",
    "eval_identity",
    "expand",
]

SCALES = ("smoke", "gpu", "paper")


@dataclass(frozen=True)
class Axis:
    """One row or column: a label and the overrides that make it."""

    name: str
    overrides: tuple[str, ...] = ()
    label: str = ""  # as printed in the table (defaults to name)

    @property
    def title(self) -> str:
        return self.label or self.name


# A scale's evaluation unless it names one: 300 samples against 600 training images, 32 steps.
DEFAULT_EVAL = EvalSpec(n=300, reference_n=600, steps=32, metrics=("fid", "kid"))

# The evaluation fields every cell's hash holds. Any other field of the spec that decides the
# numbers enters the hash only when it is set away from its default, so that adding such a
# field (with a default) leaves the cells of existing results stores with their hashes.
ALWAYS_HASHED = ("n", "reference_n", "steps", "guidance", "metrics")


def eval_identity(spec: EvalSpec) -> dict[str, Any]:
    """The part of a cell's spec that says how it is evaluated (see ``ALWAYS_HASHED``)."""
    fields = spec.result_fields()
    defaults = EvalSpec().result_fields()
    return {k: v for k, v in fields.items() if k in ALWAYS_HASHED or v != defaults[k]}


@dataclass(frozen=True)
class Scale:
    base: Callable[[], RunConfig]
    rows: tuple[Axis, ...]
    columns: tuple[Axis, ...] = (Axis("all"),)
    eval: EvalSpec = DEFAULT_EVAL
    cost: str = ""  # expected cost, for the docstring and --list
    needs: tuple[str, ...] = ()  # overrides the user must give, e.g. ("data.root",)
    axes: tuple[tuple[str, tuple[Axis, ...]], ...] = ()  # extra axes: (axis name, values)
    seeds: tuple[int, ...] = ()  # one cell per seed (train.seed); () keeps the base's seed
    overrides: tuple[str, ...] = ()  # applied to the base before columns and rows


@dataclass(frozen=True)
class Table:
    number: int
    name: str  # short alias, e.g. "schedule"
    title: str
    metrics: tuple[str, ...]  # what the table reports, in order
    scales: dict[str, Scale]
    aliases: tuple[str, ...] = ()
    # the paper's numbers: {(row name, column name): {metric: value}}; blank where unknown
    paper: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    # a computation instead of training (Table 1): (RunConfig) -> metrics
    compute: Callable[[RunConfig], dict[str, float]] | None = None
    notes: str = ""
    grid: str = ""  # a user grid's name (its store folder is <grid>-<scale>); "" for tables
    source: str = ""  # the grid file it was read from

    @property
    def slug(self) -> str:
        """What names its store folder and report files: ``table2``, or the grid's name."""
        return self.grid or f"table{self.number}"

    def scale(self, name: str) -> Scale:
        if name not in self.scales:
            what = f"table {self.number} ({self.name})" if self.number else f"grid {self.name}"
            raise ValueError(f"{what} has no scale {name!r}; choose one of {sorted(self.scales)}")
        return self.scales[name]


@dataclass(frozen=True)
class Cell:
    table: int
    scale: str
    row: str
    column: str
    config: RunConfig
    eval: EvalSpec
    kind: str  # "train" or "compute"
    grid: str = ""  # the Table's slug
    axes: tuple[tuple[str, str], ...] = ()  # (axis, value) of the extra axes
    seed: int | None = None  # given by the grid's seeds; None: the base's

    @property
    def label(self) -> str:
        """row / column [/ axis=value ...] [seed N]: the cell in words."""
        parts = [self.row] + ([self.column] if self.column != "all" else [])
        parts += [f"{a}={v}" for a, v in self.axes]
        return " / ".join(parts) + ("" if self.seed is None else f" seed {self.seed}")

    @property
    def spec(self) -> dict[str, Any]:
        """What fully determines the cell's result, as plain JSON."""
        spec = {"kind": self.kind, "config": identity_dict(self.config)}
        if self.kind == "train":
            spec["eval"] = eval_identity(self.eval)
        return spec

    @property
    def hash(self) -> str:
        return cell_hash(self.spec)


def cell_hash(spec: dict[str, Any], length: int = 16) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def expand(
    table: Table,
    scale: str,
    *,
    rows: list[str] | None = None,
    overrides: list[str] | None = None,
    seeds: list[int] | None = None,
) -> list[Cell]:
    """Every cell of ``table`` at ``scale`` (rows x columns x extra axes x seeds), optionally
    only some rows, with extra overrides applied after the grid's own (e.g. ``data.root=...``
    for the gpu and paper scales). ``seeds`` replaces the scale's seeds; without either a cell
    keeps its base's seed (and the hash it has always had)."""
    s = table.scale(scale)
    given = {o.partition("=")[0] for o in overrides or []}
    missing = [key for key in s.needs if key not in given]
    if missing:
        raise ValueError(
            f"table {table.number} at the {scale} scale needs "
            + " ".join(f"--set {key}=..." for key in missing)
            + (f" ({s.cost})" if s.cost else "")
        )
    known = [r.name for r in s.rows]
    if rows:
        unknown = sorted(set(rows) - set(known))
        if unknown:
            raise ValueError(
                f"table {table.number} has no row(s) {unknown} at {scale}; rows: {known}"
            )
    seed_list: list[int | None] = list(seeds if seeds else s.seeds) or [None]
    if len(set(seed_list)) != len(seed_list):
        raise ValueError(f"seeds {seed_list} repeat a seed")
    kind = "compute" if table.compute is not None else "train"
    base = s.base()
    cells = []
    for row in s.rows:
        if rows and row.name not in rows:
            continue
        for col in s.columns:
            for extra in itertools.product(*(values for _, values in s.axes)):
                names = tuple(
                    (axis, value.name) for (axis, _), value in zip(s.axes, extra, strict=True)
                )
                given = [*s.overrides, *col.overrides, *row.overrides]
                given += [o for value in extra for o in value.overrides]
                given += list(overrides or [])
                for seed in seed_list:
                    seeded = given if seed is None else [*given, f"train.seed={seed}"]
                    config = apply_overrides(base, seeded)
                    cells.append(
                        Cell(table.number, scale, row.name, col.name, config, s.eval, kind,
                             table.slug, names, seed)
                    )  # fmt: skip
    by_hash: dict[str, Cell] = {}
    for c in cells:
        if c.hash in by_hash:
            raise ValueError(
                f"{table.slug} at {scale}: cells {by_hash[c.hash].label!r} and {c.label!r} "
                f"resolve to the same config"
            )
        by_hash[c.hash] = c
    return cells
