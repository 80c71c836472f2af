"""Numeric config fields are checked at parse time, one rules table per section.

Three layers: the defects as a user meets them (``sdiff train --dry-run`` with a bad ``--set``);
guards for the whole class (every float of every run preset rejects NaN and infinities, every
numeric field of every config dataclass has a rule, and each table is wired into its
``__post_init__``); and the rule mechanism itself on its boundaries.
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from dataclasses import fields, is_dataclass, replace
from typing import Any

import pytest

from sdiff.cli import main
from sdiff.data.datasets import DATA_RULES, DataConfig
from sdiff.diffusion.process import DIFFUSION_RULES, DiffusionConfig
from sdiff.diffusion.schedules import SCHEDULE_RULES, ScheduleConfig
from sdiff.eval.spec import EVAL_RULES, EvalSpec
from sdiff.models.presets import get_preset
from sdiff.models.text import TEXT_RULES, TextConfig
from sdiff.models.unet import UNET_RULES, UNetConfig
from sdiff.models.uvit import UVIT_RULES, UViTConfig
from sdiff.training.config import (
    RUN_PRESETS,
    TRAIN_RULES,
    RunConfig,
    TrainConfig,
    apply_overrides,
    to_dict,
)
from sdiff.util.validation import Range, check_fields

# ------------------------------------------------------------------------------------------
# The defects, through the CLI.

DEFECTS = [
    "train.grad_clip=NaN",
    "train.lr=Infinity",
    "train.lr=-Infinity",
    "train.lr=NaN",
    "train.betas=[1.0,0.99]",
    "train.betas=[0.9,-0.1]",
    "train.eps=0",
    "train.eps=-1e-8",
    "train.weight_decay=-0.1",
    "train.weight_decay=NaN",
    "train.ema_decay=NaN",
    "model.head_dim=0",
    "model.mlp_ratio=NaN",
    "diffusion.sigmoid_bias=Infinity",
    "diffusion.schedule.logsnr_min=NaN",
]


@pytest.mark.parametrize("override", DEFECTS)
def test_dry_run_rejects_the_bad_number_in_one_line(override, capsys):
    assert main(["train", "--run-preset", "digits", "--set", override, "--dry-run"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    field = override.partition("=")[0]
    assert len(lines) == 1 and field in lines[0], captured.err
    assert captured.out == ""


def test_dry_run_accepts_a_valid_override(capsys):
    argv = ["train", "--run-preset", "digits", "--set", "train.lr=3e-4", "--dry-run"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["train"]["lr"] == 3e-4 and captured.err == ""


def test_messages_name_the_field_the_item_and_the_value():
    with pytest.raises(ValueError, match=r"^train\.lr must be > 0 and finite; got inf$"):
        TrainConfig(lr=math.inf)
    with pytest.raises(ValueError, match=r"^train\.betas\[1\] must lie in \[0, 1\); got -0\.1$"):
        TrainConfig(betas=(0.9, -0.1))
    with pytest.raises(ValueError, match=r"^train\.betas must be two numbers"):
        TrainConfig(betas=(0.9, 0.99, 0.999))
    with pytest.raises(ValueError, match=r"^diffusion\.schedule: need logsnr_min < logsnr_max"):
        ScheduleConfig(logsnr_min=15.0, logsnr_max=-15.0)
    with pytest.raises(ValueError, match=r"^model\.channels\[1\] must be an integer >= 1; got 0"):
        replace(get_preset("unet-tiny-32"), channels=(32, 0))


# ------------------------------------------------------------------------------------------
# Guards for the whole class.


def _numeric_kind(annotation: Any) -> tuple[type, bool] | None:
    """(int or float, whether a tuple of them) for a numeric field, Optional or not; else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    is_tuple = typing.get_origin(annotation) is tuple
    if is_tuple:
        items = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        if len(items) != 1:
            return None
        (annotation,) = items
    return (annotation, is_tuple) if annotation in (int, float) else None


def _numeric_fields(cls: type) -> dict[str, tuple[type, bool]]:
    hints = typing.get_type_hints(cls)
    kinds = {f.name: _numeric_kind(hints[f.name]) for f in fields(cls)}
    return {name: kind for name, kind in kinds.items() if kind is not None}


def _float_fields(config: Any, prefix: str = "") -> list[tuple[str, Any, bool]]:
    """(dotted path, value, is a tuple) of every float field, or tuple of floats, in the tree."""
    out = []
    numeric = _numeric_fields(type(config))
    for f in fields(config):
        value, path = getattr(config, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            out += _float_fields(value, f"{path}.")
        elif numeric.get(f.name, (None,))[0] is float:
            out.append((path, value, numeric[f.name][1]))
    return out


def _dotted(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


def _bad_overrides(path: str, value: Any, is_tuple: bool, bad: str) -> list[str]:
    """``path=bad``; for a tuple, one override per item with only that item bad."""
    if not is_tuple:
        return [f"{path}={bad}"]
    items = [json.dumps(v) for v in value or (1.0,)]  # an unset Optional tuple: one item
    return [f"{path}=[{','.join([*items[:i], bad, *items[i + 1 :]])}]" for i in range(len(items))]


@pytest.mark.parametrize("preset", sorted(RUN_PRESETS))
def test_every_float_of_every_run_preset_rejects_nan_and_infinities(preset):
    config = RUN_PRESETS[preset]()
    floats = _float_fields(config)
    paths = {path for path, _, _ in floats}
    assert paths <= _dotted(to_dict(config))
    assert {"train.lr", "train.betas", "diffusion.multiscale_weights"} <= paths
    for path, value, is_tuple in floats:
        for bad in ("NaN", "Infinity", "-Infinity"):
            for override in _bad_overrides(path, value, is_tuple, bad):
                with pytest.raises(ValueError, match=re.escape(path)):
                    apply_overrides(config, [override])


# Each section's dataclass, its rules table, the prefix its messages use, and a valid instance.
TABLES: dict[type, tuple[dict[str, Range], str, Any]] = {
    TrainConfig: (TRAIN_RULES, "train", TrainConfig()),
    DataConfig: (DATA_RULES, "data", DataConfig()),
    DiffusionConfig: (DIFFUSION_RULES, "diffusion", DiffusionConfig()),
    ScheduleConfig: (SCHEDULE_RULES, "diffusion.schedule", ScheduleConfig()),
    TextConfig: (TEXT_RULES, "text", TextConfig()),
    UNetConfig: (UNET_RULES, "model", get_preset("unet-tiny-32")),
    UViTConfig: (UVIT_RULES, "model", get_preset("uvit-tiny-32")),
    EvalSpec: (EVAL_RULES, "eval", EvalSpec()),
}


def _reachable_dataclasses(cls: type) -> set[type]:
    found = {cls}
    for annotation in typing.get_type_hints(cls).values():
        for tp in (annotation, *typing.get_args(annotation)):
            if isinstance(tp, type) and is_dataclass(tp) and tp not in found:
                found |= _reachable_dataclasses(tp)
    return found


def test_every_config_dataclass_has_a_table():
    reachable = _reachable_dataclasses(RunConfig)
    assert {UNetConfig, UViTConfig, ScheduleConfig} <= reachable  # both model kinds, nesting
    assert _numeric_fields(RunConfig) == {}
    assert reachable - {RunConfig} | {EvalSpec} == set(TABLES)


@pytest.mark.parametrize("cls", list(TABLES), ids=lambda c: c.__name__)
def test_every_numeric_field_has_a_rule_of_its_kind(cls):
    rules = TABLES[cls][0]
    numeric = _numeric_fields(cls)
    assert set(rules) == set(numeric), "numeric fields and rules differ"
    for name, (base, _) in numeric.items():
        assert rules[name].integer == (base is int), name


@pytest.mark.parametrize("cls", list(TABLES), ids=lambda c: c.__name__)
def test_every_table_is_applied_when_the_config_is_built(cls):
    rules, section, valid = TABLES[cls]
    numeric = _numeric_fields(cls)
    for name, rule in rules.items():
        bad = 1.5 if rule.integer else math.nan  # not an integer; not finite
        if numeric[name][1]:
            bad = (bad,)
        with pytest.raises(ValueError, match=rf"^{section}\.{name}\b"):
            replace(valid, **{name: bad})


# ------------------------------------------------------------------------------------------
# The rule mechanism.

TINY = 5e-324  # the smallest positive float


@pytest.mark.parametrize(
    ("rule", "value", "admitted"),
    [
        # [0, 1): each boundary, just inside, just outside
        (Range(ge=0, lt=1), 0.0, True),
        (Range(ge=0, lt=1), TINY, True),
        (Range(ge=0, lt=1), -TINY, False),
        (Range(ge=0, lt=1), 1.0, False),
        (Range(ge=0, lt=1), math.nextafter(1.0, 0.0), True),
        (Range(ge=0, lt=1), math.nextafter(1.0, 2.0), False),
        # (0, 2]
        (Range(gt=0, le=2), 0.0, False),
        (Range(gt=0, le=2), TINY, True),
        (Range(gt=0, le=2), 2.0, True),
        (Range(gt=0, le=2), math.nextafter(2.0, 3.0), False),
        (Range(gt=0, le=2), 2, True),  # ints are real numbers
        # integers >= 1
        (Range(ge=1, integer=True), 1, True),
        (Range(ge=1, integer=True), 0, False),
        (Range(ge=1, integer=True), 10**400, True),  # no float overflow
        (Range(ge=1, integer=True), 2.0, False),  # an integral float is not an int
        (Range(ge=1, integer=True), True, False),  # nor is a bool
        (Range(ge=0), False, False),
        (Range(ge=0), "1", False),
        # finiteness, whatever the bounds
        (Range(), 0.0, True),
        (Range(), -1e308, True),
        (Range(), math.nan, False),
        (Range(), math.inf, False),
        (Range(), -math.inf, False),
        (Range(ge=0), math.inf, False),
        (Range(le=0), -math.inf, False),
    ],
)
def test_range_admits(rule, value, admitted):
    assert rule.admits(value) is admitted


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        (Range(), "be finite"),
        (Range(gt=0), "be > 0 and finite"),
        (Range(ge=0), "be >= 0 and finite"),
        (Range(le=1), "be <= 1 and finite"),
        (Range(ge=0, lt=1), "lie in [0, 1)"),
        (Range(gt=0, le=1), "lie in (0, 1]"),
        (Range(integer=True), "be an integer"),
        (Range(ge=1, integer=True), "be an integer >= 1"),
        (Range(ge=0, lt=10, integer=True), "be an integer in [0, 10)"),
    ],
)
def test_range_describes_itself(rule, words):
    assert rule.describe() == words


def test_a_range_takes_one_bound_per_side():
    with pytest.raises(ValueError, match="ge or gt"):
        Range(ge=0, gt=0)
    with pytest.raises(ValueError, match="le or lt"):
        Range(le=1, lt=1)


def test_check_fields_items_optionals_and_order():
    obj = types.SimpleNamespace(a=(1, 2, 0), b=None, c=math.nan)
    rules = {"b": Range(ge=1), "a": Range(ge=1, integer=True), "c": Range()}
    with pytest.raises(ValueError) as err:
        check_fields(obj, "sec.sub", rules)
    # None is skipped, tuples are checked item by item, the first bad value in table order wins
    assert str(err.value) == "sec.sub.a[2] must be an integer >= 1; got 0"
    check_fields(types.SimpleNamespace(a=[3], b=None, c=0.5), "sec", rules)  # lists too
    with pytest.raises(ValueError, match=r"^sec\.c must be finite; got nan$"):
        check_fields(types.SimpleNamespace(a=(), b=2.0, c=math.nan), "sec", rules)
