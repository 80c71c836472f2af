"""The command line: values printed and files written are the library's, errors are readable."""

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
