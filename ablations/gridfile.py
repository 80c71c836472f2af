"""Grid files: an ablation declared in YAML, read into a ``Table`` (``ablations.grid``).

    sdiff ablate my-grid.yaml --dry-run          # one line per cell: overrides, status, cost
    sdiff ablate my-grid.yaml --seeds 0 1 2      # every cell once per seed

The paper's eight tables are grid files of this format too (``ablations/grids/``), and so are
the grids beyond the paper (``ablations/grids/extra/``). A grid file::

    name: shift-vs-resolution         # the store folder is runs/ablate/<name>-<scale>
    title: "Schedule shift at four resolutions (FID)"
    metrics: [fid, kid_mean]          # what the report shows, in order
    base: smoke                       # smoke | gpu | a run preset (sdiff presets) | module:function
    set: {train.total_images: 10000}  # overrides of every cell (before columns and rows)
    seeds: [0, 1]                     # optional: one cell per seed (train.seed)
    eval: {n: 200, guidance: 0.0}     # EvalSpec fields over the base's evaluation
    cost: "8 cells x 2 minutes on 2 CPU cores"
    rows:                             # name -> {label, set}; set: {key: value} or [key=value]
      cosine: {label: cosine, set: {diffusion.schedule.name: cosine}}
      shifted: {set: {diffusion.schedule.name: shifted, diffusion.schedule.base: 16}}
    columns:                          # optional; like rows
      "32": {label: 32 px, set: {model.resolution: 32, data.resolution: 32}}
    axes:                             # optional further axes: axis -> values like rows
      lr: {low: {set: {train.lr: 1.0e-3}}, high: {set: {train.lr: 3.0e-3}}}
    paper: {shifted: {"32": {fid: 3.1}}}   # the paper's numbers where known: row -> column
    scales:                           # optional: per scale, any of base, set, eval, cost,
      smoke: {}                       # needs, seeds, rows, columns, axes (replacing the
      gpu: {base: gpu, set: {...}}    # top-level ones; set and eval add to them)

Without ``scales`` the file has one scale, named after its base: ``smoke`` (the smoke base
and the digits presets), ``gpu``, ``paper`` (the ImageNet presets) or ``custom``. A scale's
evaluation and what it needs default from its base: ``gpu`` evaluates as the gpu tables do
(10k samples) and the ImageNet run presets as the paper (50k), and those two need
``--set data.root=...``; any other base as the smoke tables (200 samples), needing nothing.
Override values are written as on the command line: a scalar's text is parsed exactly as
``--set key=text`` would (JSON, else a string), so ``base: 16`` is the integer 16 and
``name: cosine`` the string, whatever YAML would make of them.

Why YAML, read through PyYAML's node tree: every key and value keeps its line, so a schema
error (an unknown key, a wrong type, a duplicate row, an override of a field that does not
exist, an empty axis) is one line naming the file, the line and the key; a duplicate key, which
a plain YAML load silently keeps the last of, is an error. Nothing is written before the file
has been read and every cell's config built.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from sdiff.ablations.grid import Axis, Scale, Table, expand
from sdiff.eval.spec import EvalSpec

__all__ = ["Base", "GridFileError", "load_grid", "shipped_grids"]

GRIDS_DIR = Path(__file__).with_name("grids")

TOP_KEYS = {
    "name": "a short name: letters, digits, '-', '_' (names the store folder)",
    "title": "the table's title",
    "table": "the paper table's number (the shipped tables only)",
    "aliases": "other names for `sdiff ablate`",
    "metrics": "the metrics the report shows, in order",
    "notes": "a note printed under the table",
    "compute": "module:function computing a cell's metrics instead of training it",
    "paper": "the paper's numbers: row -> column -> metric -> value",
    "scales": "per-scale settings",
}
SCALE_KEYS = {
    "base": "smoke | gpu | a run preset | module:function",
    "set": "overrides of every cell",
    "eval": "evaluation settings (EvalSpec fields)",
    "cost": "the expected cost, in words",
    "needs": "overrides the user must give, e.g. [data.root]",
    "seeds": "a list of seeds",
    "rows": "the rows",
    "columns": "the columns",
    "axes": "further axes",
}
AXIS_KEYS = {"label": "as printed in the table", "set": "the overrides that make it"}
EVAL_FIELDS = {f.name for f in fields(EvalSpec)} - {"device"}


class GridFileError(ValueError):
    """A grid file that cannot be used: ``file:line: key: problem`` on one line."""


@dataclass(frozen=True)
class Base:
    """A scale's base config by name (picklable, so worker processes can rebuild the grid)."""

    name: str

    def __call__(self):
        from sdiff.ablations import scales
        from sdiff.training.config import RUN_PRESETS, get_run_preset

        if self.name == "smoke":
            return scales.smoke_base()
        if self.name == "gpu":
            return scales.gpu_base()
        if self.name in RUN_PRESETS:
            return get_run_preset(self.name)
        return _import(self.name)()

    def default_eval(self) -> EvalSpec:
        from sdiff.ablations import scales

        if self.name == "gpu":
            return scales.GPU_EVAL
        if self.name.startswith("imagenet"):
            return scales.PAPER_EVAL
        return scales.SMOKE_EVAL

    def scale_name(self) -> str:
        """The scale a file without ``scales`` runs at: smoke for the smoke base and the digits
        presets, gpu for gpu, paper for the ImageNet presets, else custom."""
        if self.name in ("smoke", "gpu"):
            return self.name
        if self.name.startswith("digits"):
            return "smoke"
        return "paper" if self.name.startswith("imagenet") else "custom"

    def default_needs(self) -> tuple[str, ...]:
        return ("data.root",) if self.name == "gpu" or self.name.startswith("imagenet") else ()


def _import(spec: str):
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{spec!r} is not module:function")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {spec!r}: {err}") from err


# -- reading YAML nodes with their lines ------------------------------------------------------
class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, node: yaml.Node | None, key: str, problem: str) -> GridFileError:
        line = node.start_mark.line + 1 if node is not None else 1
        return GridFileError(f"{self.path}:{line}: {key}: {problem}")

    def mapping(self, node: yaml.Node, key: str, known: dict[str, str] | None = None):
        """(key, key node, value node) of a mapping, duplicates and unknown keys refused."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, key, f"expected a mapping, got {_kind(node)}")
        out, seen = [], {}
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                raise self.error(k, key, "a key must be a plain name")
            name = k.value
            if name in seen:
                raise self.error(
                    k, f"{key}.{name}" if key else name,
                    f"duplicate (first on line {seen[name].start_mark.line + 1})",
                )  # fmt: skip
            seen[name] = k
            if known is not None and name not in known:
                raise self.error(
                    k, f"{key}.{name}" if key else name,
                    f"unknown key; known: {', '.join(sorted(known))}",
                )  # fmt: skip
            out.append((name, k, v))
        return out

    def scalar(self, node: yaml.Node, key: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, key, f"expected a single value, got {_kind(node)}")
        return node.value

    def text(self, node: yaml.Node, key: str) -> str:
        value = self.scalar(node, key)
        if not value.strip():
            raise self.error(node, key, "must not be empty")
        return value

    def integer(self, node: yaml.Node, key: str) -> int:
        value = self.scalar(node, key)
        try:
            return int(value)
        except ValueError:
            raise self.error(node, key, f"expected an integer, got {value!r}") from None

    def sequence(self, node: yaml.Node, key: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, key, f"expected a list, got {_kind(node)}")
        return list(node.value)

    def texts(self, node: yaml.Node, key: str) -> list[str]:
        return [self.text(n, key) for n in self.sequence(node, key)]

    def value(self, node: yaml.Node, key: str) -> Any:
        """A plain Python value (numbers typed as JSON would type them)."""
        if isinstance(node, yaml.ScalarNode):
            return _parse(node.value)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(n, key) for n in node.value]
        return {k: self.value(v, f"{key}.{k}") for k, _, v in self.mapping(node, key)}

    def overrides(self, node: yaml.Node, key: str) -> list[tuple[str, yaml.Node]]:
        """``set``: {key: value} or [key=value, ...] -> [(override text, its node)]."""
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return []
        if isinstance(node, yaml.SequenceNode):
            out = []
            for item in node.value:
                text = self.text(item, key)
                if "=" not in text or not text.partition("=")[0]:
                    raise self.error(item, key, f"{text!r} is not of the form key=value")
                out.append((text, item))
            return out
        out = []
        for name, k, v in self.mapping(node, key):
            text = v.value if isinstance(v, yaml.ScalarNode) else json.dumps(self.value(v, key))
            out.append((f"{name}={text}", k))
        return out


def _kind(node: yaml.Node) -> str:
    return {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list"}.get(
        type(node), f"{node.value!r}"
    )


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# -- the file -> Table ------------------------------------------------------------------------
@dataclass
class _Located:
    """An axis entry and the nodes of its overrides (for errors naming their lines)."""

    axis: Axis
    nodes: tuple[yaml.Node, ...]
    node: yaml.Node


def load_grid(path: str | Path) -> Table:
    """The ``Table`` a grid file declares, every scale's cells built once to check it
    (``GridFileError`` naming file, line and key for anything wrong)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise GridFileError(f"{path}: cannot read the grid file ({err.strerror})") from err
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(err, "problem", None) or str(err)
        raise GridFileError(f"{path}:{line}: not valid YAML: {problem}") from None
    r = _Reader(path)
    if root is None:
        raise GridFileError(f"{path}:1: the grid file is empty")
    items = r.mapping(root, "", {**TOP_KEYS, **SCALE_KEYS})
    top = {name: (k, v) for name, k, v in items}
    for required in ("title", "metrics"):
        if required not in top:
            raise r.error(root, required, "missing (every grid file needs one)")
    number = r.integer(top["table"][1], "table") if "table" in top else 0
    if "name" not in top:
        raise r.error(root, "name", "missing (every grid file needs one)")
    name = r.text(top["name"][1], "name")
    if not all(ch.isalnum() or ch in "-_" for ch in name):
        raise r.error(top["name"][1], "name", f"{name!r}: letters, digits, '-' and '_' only")
    metrics = r.texts(top["metrics"][1], "metrics")
    if not metrics:
        raise r.error(top["metrics"][1], "metrics", "must not be empty")
    compute = None
    if "compute" in top:
        spec = r.text(top["compute"][1], "compute")
        try:
            compute = _import(spec)
        except ValueError as err:
            raise r.error(top["compute"][1], "compute", str(err)) from None
    shared = {k: v for k, v in top.items() if k in SCALE_KEYS}
    if "scales" in top:
        per_scale = {n: v for n, _, v in r.mapping(top["scales"][1], "scales")}
        if not per_scale:
            raise r.error(top["scales"][1], "scales", "must not be empty")
    else:
        base_node = shared.get("base", (None, None))[1]
        base_name = r.text(base_node, "base") if base_node is not None else ""
        per_scale = {Base(base_name).scale_name(): None}
    scales, located = {}, {}
    for scale_name, node in per_scale.items():
        own = {}
        if node is not None:
            own = {k: (kn, v) for k, kn, v in r.mapping(node, f"scales.{scale_name}", SCALE_KEYS)}
        scales[scale_name], located[scale_name] = _scale(r, scale_name, shared, own)
    table = Table(
        number=number,
        name=name,
        title=r.text(top["title"][1], "title"),
        metrics=tuple(metrics),
        scales=scales,
        aliases=tuple(r.texts(top["aliases"][1], "aliases")) if "aliases" in top else (),
        paper=_paper(r, top["paper"][1]) if "paper" in top else {},
        compute=compute,
        notes=r.text(top["notes"][1], "notes") if "notes" in top else "",
        grid="" if number else name,
        source=str(path),
    )
    for scale_name in scales:
        _check_cells(r, table, scale_name, located[scale_name])
    return table


def _scale(r: _Reader, scale: str, shared: dict, own: dict) -> tuple[Scale, list[_Located]]:
    """One scale: its own keys over the file's shared ones."""
    where = f"scales.{scale}."

    def pick(key: str):
        if key in own:
            return own[key][1], where + key
        if key in shared:
            return shared[key][1], key
        return None, key

    base_node, key = pick("base")
    if base_node is None:
        raise r.error(None, f"{where}base", "missing: give base (smoke, gpu or a run preset)")
    base = Base(r.text(base_node, key))
    try:
        _check_base(base.name)
    except ValueError as err:
        raise r.error(base_node, key, str(err)) from None
    overrides: list[tuple[str, yaml.Node]] = []
    for source in (shared, own):  # the file's set, then the scale's
        if "set" in source:
            overrides += r.overrides(source["set"][1], "set")
    spec = base.default_eval()
    for source, prefix in ((shared, ""), (own, where)):
        if "eval" in source:
            spec = _eval(r, spec, source["eval"][1], prefix + "eval")
    cost_node, key = pick("cost")
    needs_node, needs_key = pick("needs")
    seeds_node, seeds_key = pick("seeds")
    seeds = []
    if seeds_node is not None:
        seeds = [r.integer(n, seeds_key) for n in r.sequence(seeds_node, seeds_key)]
        if not seeds:
            raise r.error(seeds_node, seeds_key, "an empty list: give at least one seed")
        if len(set(seeds)) != len(seeds):
            raise r.error(seeds_node, seeds_key, f"{seeds} repeats a seed")
    located: list[_Located] = []
    rows_node, rows_key = pick("rows")
    if rows_node is None:
        raise r.error(None, f"{where}rows", "missing: a grid needs rows")
    rows = _axis(r, rows_node, rows_key, located)
    cols_node, cols_key = pick("columns")
    columns = _axis(r, cols_node, cols_key, located) if cols_node is not None else (Axis("all"),)
    axes_node, axes_key = pick("axes")
    axes = []
    if axes_node is not None:
        for axis_name, k, v in r.mapping(axes_node, axes_key):
            if axis_name in ("row", "column", "seed"):
                raise r.error(k, f"{axes_key}.{axis_name}", "a reserved name: choose another")
            axes.append((axis_name, _axis(r, v, f"{axes_key}.{axis_name}", located)))
    built = Scale(
        base=base,
        rows=rows,
        columns=columns,
        eval=spec,
        cost=r.text(cost_node, key) if cost_node is not None else "",
        needs=(
            tuple(r.texts(needs_node, needs_key))
            if needs_node is not None
            else base.default_needs()
        ),
        axes=tuple(axes),
        seeds=tuple(seeds),
        overrides=tuple(o for o, _ in overrides),
    )
    nodes = tuple(n for _, n in overrides)
    located.append(_Located(Axis("(set)", built.overrides), nodes, base_node))
    return built, located


def _check_base(name: str) -> None:
    from sdiff.training.config import RUN_PRESETS

    if name in ("smoke", "gpu") or name in RUN_PRESETS:
        return
    if ":" not in name:
        raise ValueError(
            f"unknown base {name!r}; choose smoke, gpu, a run preset ({', '.join(RUN_PRESETS)}) "
            f"or module:function"
        )
    _import(name)


def _axis(r: _Reader, node: yaml.Node, key: str, located: list[_Located]) -> tuple[Axis, ...]:
    entries = r.mapping(node, key)
    if not entries:
        raise r.error(node, key, "an empty axis: give at least one entry")
    out = []
    for name, k, v in entries:
        here = f"{key}.{name}"
        if not name.strip() or "/" in name:
            raise r.error(k, here, "a name must be non-empty and without '/'")
        label, overrides = "", []
        if not (isinstance(v, yaml.ScalarNode) and v.value in ("", "~", "null")):
            fields_ = {f: val for f, _, val in r.mapping(v, here, AXIS_KEYS)}
            if "label" in fields_:
                label = r.text(fields_["label"], f"{here}.label")
            if "set" in fields_:
                overrides = r.overrides(fields_["set"], f"{here}.set")
        axis = Axis(name, tuple(o for o, _ in overrides), label)
        out.append(axis)
        located.append(_Located(axis, tuple(n for _, n in overrides), k))
    return tuple(out)


def _eval(r: _Reader, spec: EvalSpec, node: yaml.Node, key: str) -> EvalSpec:
    changes = {}
    for name, _, v in r.mapping(node, key, {f: "" for f in EVAL_FIELDS}):
        value = r.value(v, f"{key}.{name}")
        changes[name] = tuple(value) if isinstance(value, list) else value
    try:
        return replace(spec, **changes)
    except (TypeError, ValueError) as err:
        raise r.error(node, key, str(err)) from None


def _paper(r: _Reader, node: yaml.Node) -> dict[tuple[str, str], dict[str, float]]:
    out = {}
    for row, _, by_column in r.mapping(node, "paper"):
        for column, _, values in r.mapping(by_column, f"paper.{row}"):
            here = f"paper.{row}.{column}"
            cell = {}
            for metric, k, v in r.mapping(values, here):
                value = r.value(v, f"{here}.{metric}")
                if value is not None and not isinstance(value, int | float):
                    raise r.error(k, f"{here}.{metric}", f"expected a number, got {value!r}")
                cell[metric] = value
            out[(row, column)] = cell
    return out


def _check_cells(r: _Reader, table: Table, scale: str, located: list[_Located]) -> None:
    """Every override names a field of the config it is applied to, and every cell's config
    builds (errors name the line of the override, or of the scale)."""
    from sdiff.training.config import to_dict

    s = table.scales[scale]
    scale_set, entries = located[-1], located[:-1]
    try:
        tree = to_dict(s.base())
    except Exception as err:  # a base function's own failure
        raise r.error(scale_set.node, f"{scale}: base", f"cannot build it: {err}") from None
    tree = _check_list(r, [tree], scale_set)
    # a row's key may exist only in the model another axis swaps in (model=<preset>)
    swapped = [_after(tree, e.axis.overrides) for e in entries if _swaps(e.axis.overrides)]
    for entry in entries:
        _check_list(r, [tree, *swapped], entry)
    needs = [f"{k}=/needs/a/value" for k in s.needs]
    try:
        expand(table, scale, overrides=needs)
    except (ValueError, TypeError) as err:
        key = f"scales.{scale}" if scale != "custom" else "base"
        raise r.error(scale_set.node, key, f"a cell cannot be built: {err}") from None


def _swaps(overrides: tuple[str, ...]) -> bool:
    return any(o.partition("=")[0] == "model" for o in overrides)


def _check_list(r: _Reader, trees: list[dict], entry: _Located) -> dict:
    """Check one entry's overrides in order (a ``model=`` swap changes what later keys may
    name); a key must name a field in at least one of ``trees``. Returns the first tree after
    the entry's swaps."""
    for text, node in zip(entry.axis.overrides, entry.nodes, strict=True):
        problems = [_missing_field(t, text) for t in trees]
        if all(problems):
            raise r.error(node, text.partition("=")[0], problems[0])
        trees = [_after(t, (text,)) for t in trees]
    return trees[0]


def _after(tree: dict, overrides: tuple[str, ...]) -> dict:
    """The config tree with ``model=<preset>`` swaps applied (the fields later keys may name)."""
    from sdiff.models.presets import get_preset
    from sdiff.training.config import to_dict

    tree = dict(tree)
    for text in overrides:
        key, _, value = text.partition("=")
        if key == "model":
            tree["model"] = to_dict(get_preset(str(_parse(value))))
    return tree


def _missing_field(tree: dict, text: str) -> str:
    """Why ``key=value`` names no field of ``tree`` ("" when it does), following model swaps
    made earlier in the same list."""
    key, _, value = text.partition("=")
    path = key.split(".")
    if path == ["model"]:
        from sdiff.models.presets import PRESETS

        name = str(_parse(value))
        return "" if name in PRESETS else f"unknown model preset {name!r}"
    node: Any = tree
    for depth, name in enumerate(path):
        if not isinstance(node, dict) or name not in node or name == "kind":
            known = sorted(k for k in node if k != "kind") if isinstance(node, dict) else []
            where = ".".join(path[:depth]) or "the config"
            return f"{where} has no field {name!r}; known: {', '.join(known)}"
        node = node[name]
    return ""


def shipped_grids() -> dict[str, Path]:
    """The grid files that ship with sdiff: the paper's tables and the extra grids, by stem."""
    found = sorted(GRIDS_DIR.glob("*.yaml")) + sorted((GRIDS_DIR / "extra").glob("*.yaml"))
    return {p.stem: p for p in found}
