"""The command line: values printed and files written are the library's, errors are readable."""

import argparse
import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from sdiff.cli import main


def test_schedule_csv(tmp_path):
    path = tmp_path / "s.csv"
    assert main(["schedule", "--res", "512", "--points", "3", "--csv", str(path)]) == 0
    df = pd.read_csv(path)
    assert df["t"].tolist() == [0.0, 0.5, 1.0]
    # shifted from base 64 at 512: [-19.16, 10.84], and lambda(0.5) = 0 + 2 log(1/8)
    assert df["logsnr"].tolist() == pytest.approx(
        [10.8411, 2 * math.log(1 / 8), -19.1589], abs=1e-4
    )
    assert ((df["alpha"] ** 2 + df["sigma"] ** 2) - 1).abs().max() < 1e-12


def test_sampler_check_writes_results(tmp_path):
    out = tmp_path / "check"
    assert main(["sampler-check", "--steps", "2", "--n", "500", "--out", str(out)]) == 0
    df = pd.read_csv(out / "sampler_check.csv")
    assert set(df["case"]) == {"mixture", "guided"} and set(df["sampler"]) == {"ddpm", "ddim"}
    # two steps are far too few: the variance shortfall shows up as a large |z|
    assert df.loc[df["statistic"] == "variance", "z"].abs().min() > 4
    assert (out / "sampler_check.md").read_text().startswith("# Samplers")


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["schedule", "--res", "0"]) == 2
    assert "resolution must be a positive" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["schedule", "--name", "linear"])
    assert err.value.code == 2
    assert "invalid choice: 'linear'" in capsys.readouterr().err


def test_module_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "sdiff", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("sdiff ")


def test_the_parsers_names_are_the_registries():
    """The parser keeps the schedule and sampler names itself (it imports no torch): they must
    be the registries' names."""
    from sdiff.cli import SAMPLER_NAMES, SCHEDULE_NAMES
    from sdiff.diffusion.samplers import SAMPLERS
    from sdiff.diffusion.schedules import SCHEDULES

    assert SCHEDULE_NAMES == tuple(sorted(SCHEDULES))
    assert SAMPLER_NAMES == tuple(sorted(SAMPLERS))


@pytest.mark.parametrize(
    "argv",
    [
        ["ablate", "--set", "train.lr=1e-4", "2", "--dry-run"],
        ["train", "--set", "train.lr=1e-4", "runs/x", "--dry-run"],
        ["ablate", "2", "--executor-opt", "cluster=local", "gpu", "--dry-run"],
    ],
)
def test_a_positional_swallowed_by_a_key_value_list_is_named(argv, capsys):
    """argparse gives a positional after ``--set a=1`` to ``--set``: the parser says so
    (exit 2) instead of the run failing on an override that names no field."""
    try:
        code = main(argv)
    except SystemExit as stop:  # the top parser's usage errors exit as argparse does
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err
    option = "--executor-opt" if "--executor-opt" in argv else "--set"
    swallowed = argv[argv.index(option) + 2]
    assert f"{option} takes KEY=VALUE items, and {swallowed!r} is not one" in err
    assert f"put positional arguments before {option}" in err


def test_key_value_lists_still_extend(capsys):
    from sdiff.util.cli_args import KeyValueList

    parser = argparse.ArgumentParser()
    parser.add_argument("--set", nargs="+", action=KeyValueList, default=[])
    args = parser.parse_args(["--set", "a=1", "b=[2, 3]", "--set", "c.d=x=y"])
    assert args.set == ["a=1", "b=[2, 3]", "c.d=x=y"]


def test_presets_lists_every_run_preset_with_its_config(capsys):
    from sdiff.models.presets import build_model
    from sdiff.training.config import RUN_PRESETS, get_run_preset

    assert main(["presets", "--json"]) == 0
    rows = {r["preset"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == list(RUN_PRESETS)
    for name, row in rows.items():
        c = get_run_preset(name)
        assert (row["px"], row["batch"], row["images"], row["lr"]) == (
            c.data.resolution, c.train.batch_size, c.train.total_images, c.train.lr
        )  # fmt: skip
        assert row["steps"] == math.ceil(c.train.total_images / c.train.batch_size)
    digits = build_model(get_run_preset("digits").model)  # real weights, counted here
    assert rows["digits"]["params_M"] == sum(p.numel() for p in digits.parameters()) / 1e6
    assert main(["presets"]) == 0
    assert "imagenet-uvit-l-512" in capsys.readouterr().out


def test_eval_summary_and_the_small_n_fid_warning():
    from sdiff.cli.commands import FID_MIN_SAMPLES, eval_summary, fid_sample_warning

    record = {"fid": 12.345, "kid_mean": 0.01234, "kid_std": 0.00056, "num_generated": 200,
              "num_reference": 500, "feature_extractor": "inception"}  # fmt: skip
    assert eval_summary(record) == (
        "FID 12.35; KID 0.0123 ± 0.0006 of 200 samples against 500 reference images (inception)"
    )
    assert "FID of 200 samples is biased upwards" in fid_sample_warning(record)
    assert fid_sample_warning({**record, "num_generated": FID_MIN_SAMPLES}) is None
    assert fid_sample_warning({"kid_mean": 0.1, "num_generated": 10}) is None  # no FID asked


def _parsers():
    from sdiff.ablations.runner import build_parser as ablate_parser
    from sdiff.cli import build_parser

    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {"sdiff": top, **{f"sdiff {k}": v for k, v in subs.choices.items()},
            "sdiff ablate": ablate_parser()}  # fmt: skip


class _Parser(Exception):
    def __init__(self, parser):
        self.parser = parser


def _bench_parsers(monkeypatch):
    """The parsers ``sdiff bench``'s commands build inside their mains, caught as they parse."""
    import importlib

    def catch(self, *args, **kwargs):
        raise _Parser(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    found = {}
    for module, entry in [
        ("bench_attention", "main"),
        ("compare", "parse_args"),
        ("gate", "main"),
        ("memory", "memory_main"),
        ("throughput", "main"),
    ]:
        with pytest.raises(_Parser) as caught:
            getattr(importlib.import_module(f"sdiff.bench.{module}"), entry)([])
        found[f"bench {module}"] = caught.value.parser
    return found


def test_every_option_with_a_default_says_it_in_help(monkeypatch):
    """`--help` shows each option's default: an option whose default is a value (not None,
    not a flag's False) has the word "default" in its help text, in every parser."""
    missing = []
    for name, parser in {**_parsers(), **_bench_parsers(monkeypatch)}.items():
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            if action.default in (None, False, argparse.SUPPRESS, "", []):
                continue
            if "default" not in (action.help or "").lower():
                missing.append(f"{name} {action.option_strings[0]}")
    assert not missing, missing
    text = _parsers()["sdiff eval"].format_help()
    assert "(default: 1000)" in text and "(default: fid kid prc)" in text


@pytest.mark.parametrize(
    "argv, dest, value, note",
    [
        (["train", "--preset", "digits"], "preset", "digits", "--preset is now --run-preset"),
        (["train", "--run-preset", "digits"], "preset", "digits", None),
        (["demo", "--preset", "digits-unet"], "preset", "digits-unet", "is now --run-preset"),
        (["models", "--preset", "a", "--preset", "b"], "preset", ["a", "b"], "is now --model"),
        (["models", "--model", "a", "b"], "preset", ["a", "b"], None),
    ],
)
def test_renamed_options_keep_their_old_spelling_with_a_note(argv, dest, value, note, capsys):
    """Run presets are --run-preset, model presets --model, scales --scale; the old spellings
    parse to the same value and print one note naming the new one."""
    from sdiff.cli import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    if note is None:
        assert err == ""
    else:
        assert err.count(note) == argv.count(argv[1]) and "old spelling still works" in err


def test_ablate_and_bench_take_scale_and_model(capsys):
    from sdiff.ablations.runner import build_parser as ablate_parser

    assert ablate_parser().parse_args(["2", "--scale", "gpu"]).preset == "gpu"
    assert capsys.readouterr().err == ""
    assert ablate_parser().parse_args(["2", "--preset", "gpu"]).preset == "gpu"
    assert "--preset is now --scale" in capsys.readouterr().err
