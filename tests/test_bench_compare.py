"""bench/compare.py: the comparison rules on synthetic pytest-benchmark files, and whole runs
on fake git repositories (one of them made slower, which the gate must fail) and on this
repository (BASE=HEAD, two benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdiff.bench import compare as cmp

ROOT = Path(__file__).resolve().parents[1]


def bench_json(path: Path, medians: dict[str, float], sdiff_file: str | None = None) -> Path:
    """A pytest-benchmark JSON file holding only what compare.py reads."""
    benchmarks = [
        {"name": name.split("::")[-1], "fullname": name, "stats": {"median": m, "mean": m}}
        for name, m in medians.items()
    ]
    data = {"machine_info": {"node": "n"}, "benchmarks": benchmarks}
    if sdiff_file:
        data["sdiff_file"] = sdiff_file
    path.write_text(json.dumps(data))
    return path


# -- the rules -------------------------------------------------------------------------------


def test_median_of_medians_over_interleaved_rounds(tmp_path):
    runs = [
        cmp.load_medians(bench_json(tmp_path / f"r{i}.json", {"p.py::a": a, "p.py::b": 1.0}))
        for i, a in enumerate([0.010, 0.030, 0.011])
    ]
    assert cmp.median_of_medians(runs) == {"p.py::a": 0.011, "p.py::b": 1.0}  # 0.030 is outvoted


def test_verdicts_at_the_threshold():
    base = {"ok": 1.0, "edge": 1.0, "slow": 1.0, "fast": 1.0, "gone": 1.0}
    head = {"ok": 1.05, "edge": 1.1, "slow": 1.2, "fast": 0.5, "added": 2.0}
    rows = {r.name: r for r in cmp.compare(base, head, threshold=0.10)}
    assert {n: r.verdict for n, r in rows.items()} == {
        "ok": "ok",
        "edge": "ok",  # exactly at the threshold passes
        "slow": "SLOWER",
        "fast": "faster",
        "gone": "FAILED",  # ran on base, not on head
        "added": "new",
    }
    assert rows["slow"].ratio == pytest.approx(1.2)
    assert rows["added"].base is None and rows["gone"].head is None
    assert cmp.exit_code(list(rows.values())) == 1
    # a looser threshold lets the 20% slow-down through; a failed benchmark still fails
    loose = cmp.compare(base, head, threshold=0.25)
    assert [r.name for r in loose if r.verdict in cmp.FAILING] == ["gone"]
    assert cmp.exit_code([r for r in loose if r.name != "gone"]) == 0


def test_table_lists_every_benchmark_with_medians_ratio_and_verdict():
    rows = cmp.compare(
        {"bench/perf/test_perf.py::test_a[x]": 0.002, "bench/perf/test_perf.py::test_b": 1.5},
        {"bench/perf/test_perf.py::test_a[x]": 0.0025, "bench/perf/test_perf.py::test_b": 1.5},
        threshold=0.10,
    )
    table = cmp.format_table(rows, 0.10)
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [
        " benchmark ",
        " base median ",
        " head median ",
        " head/base ",
        " verdict ",
    ]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in lines[2:4]}  # fmt: skip
    assert cells["test_a[x]"] == ["2 ms", "2.5 ms", "1.250", "SLOWER"]
    assert cells["test_b"] == ["1.5 s", "1.5 s", "1.000", "ok"]
    assert lines[-1] == "1 of 2 benchmarks regressed (threshold 10%); largest head/base 1.250"


def test_names_keep_the_file_when_two_files_share_a_test_name():
    names = cmp.short_names(["a/test_x.py::test_t", "a/test_y.py::test_t", "a/test_y.py::test_u"])
    assert names == {"a/test_x.py::test_t": "test_x.py::test_t",
                     "a/test_y.py::test_t": "test_y.py::test_t",
                     "a/test_y.py::test_u": "test_y.py::test_u"}  # fmt: skip


def test_time_units():
    assert [cmp.fmt_time(s) for s in (2.5, 0.0123, 4.2e-5, 3e-9, None)] == [
        "2.5 s", "12.3 ms", "42 us", "3 ns", "-"
    ]  # fmt: skip


# -- assembling a side ------------------------------------------------------------------------


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_checkout_without_sdiff_is_refused(tmp_path):
    """A side runs in its checkout: one without sdiff/ (a revision before the package, or the
    wrong repository) is bad input, before any pytest starts."""
    (tmp_path / "tree" / "bench" / "perf").mkdir(parents=True)
    with pytest.raises(cmp.BadInput, match=r"has no sdiff/__init__\.py"):
        cmp.run_side(python=sys.executable, tree=tmp_path / "tree",
                     perf_dir=tmp_path / "tree/bench/perf", out_json=tmp_path / "o.json",
                     select=None)  # fmt: skip


# -- whole runs on fake repositories -----------------------------------------------------------

FAKE_PERF = """\
import sdiff


def test_work(benchmark):
    benchmark.pedantic(sdiff.work, rounds=5, warmup_rounds=1, iterations=1)
"""


def git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def fake_repo(root: Path, sleep: float = 0.01) -> Path:
    """A git repository whose sdiff.work() sleeps; bench/perf times it."""
    write(root / "sdiff/__init__.py", f"import time\n\n\ndef work():\n    time.sleep({sleep})\n")
    write(root / "bench/perf/test_fake.py", FAKE_PERF)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "base")
    return root


def run_compare(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "bench/compare.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_a_slower_working_tree_fails_the_gate(tmp_path):
    repo = fake_repo(tmp_path / "repo", sleep=0.01)
    write(repo / "sdiff/__init__.py", "import time\n\n\ndef work():\n    time.sleep(0.03)\n")
    out = tmp_path / "out"
    proc = run_compare("HEAD", "--repo", str(repo), "--rounds", "1", "--out", str(out))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "test_work" in line)
    assert row.split("|")[-2].strip() == "SLOWER"
    assert "1 of 1 benchmarks regressed (threshold 10%)" in proc.stdout
    record = json.loads((out / "compare.json").read_text())
    assert record["rows"][0]["ratio"] > 2  # 30 ms against 10 ms
    # each side imported its own checkout, never the other's nor the editable install's
    base, head = (json.loads((out / f"{s}-r0.json").read_text())["sdiff_file"]
                  for s in ("base", "head"))  # fmt: skip
    assert Path(base).parts[-3:] == ("base-tree", "sdiff", "__init__.py")
    assert Path(head) == repo / "sdiff" / "__init__.py"


def test_an_unchanged_tree_passes(tmp_path):
    repo = fake_repo(tmp_path / "repo", sleep=0.01)
    proc = run_compare("HEAD", "--repo", str(repo), "--rounds", "2", "--threshold", "0.3",
                       "--out", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no regression beyond 30% in 1 benchmarks" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "base-r0.json", "base-r1.json", "compare.json", "compare.md", "head-r0.json",
        "head-r1.json"]  # fmt: skip
    assert git(repo, "worktree", "list").count("\n") == 0  # the checkout of BASE is gone


def test_a_side_importing_another_tree_is_refused(tmp_path):
    repo = fake_repo(tmp_path / "repo")
    # a conftest that puts the repository first on sys.path: the side would time the working
    # tree whatever BASE is, and compare.py must notice
    write(repo / "bench/perf/conftest.py",
          f"import sys\n\nsys.path.insert(0, {str(repo)!r})\n")  # fmt: skip
    proc = run_compare("HEAD", "--repo", str(repo), "--rounds", "1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "imported sdiff from" in proc.stderr and "another tree leaked in" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no-such-rev"], "unknown revision 'no-such-rev'"),
        (["HEAD", "-k", "nothing_matches"], "no benchmark selected"),
        (["HEAD", "--rounds", "0"], "--rounds be >= 1"),
    ],
)
def test_bad_input_exits_2(tmp_path, args, message):
    repo = fake_repo(tmp_path / "repo")
    proc = run_compare(*args, "--repo", str(repo), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_not_a_repository_exits_2(tmp_path):
    proc = run_compare("HEAD", "--repo", str(tmp_path))
    assert proc.returncode == 2 and "not a git repository" in proc.stderr


def test_this_repository_against_its_head(tmp_path):
    """BASE=HEAD on two of the real benchmarks: both sides run the real bench/perf, each with
    its own checkout of sdiff. Not a timing test: on a machine busy with other jobs even a
    huge threshold can be crossed by a 1-round comparison of a tree with itself, so a SLOWER
    verdict (exit 1) is accepted; anything else (exit 2: a side that could not run or that
    imported another tree) is not."""
    out = tmp_path / "out"
    select = "test_attention and sdpa and 256 or test_forward_uvit_digits"
    proc = run_compare("HEAD", "--repo", str(ROOT), "-k", select, "--rounds", "1",
                       "--threshold", "5", "--out", str(out))  # fmt: skip
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    record = json.loads((out / "compare.json").read_text())
    assert (proc.returncode == 1) == any(r["verdict"] == "SLOWER" for r in record["rows"])
    assert record["base_sha"] == git(ROOT, "rev-parse", "HEAD")
    rows = {r["name"].split("::")[-1]: r for r in record["rows"]}
    assert set(rows) == {"test_attention[sdpa-256]", "test_forward_uvit_digits"}
    assert all(r["verdict"] in ("ok", "faster", "SLOWER") and r["ratio"] > 0 for r in rows.values())
    for side, tree in (("base", "base-tree"), ("head", ROOT.name)):
        data = json.loads((out / f"{side}-r0.json").read_text())
        # sdiff from the side's checkout, and sdiff.kernels from its kernels/ folder
        assert Path(data["sdiff_file"]).parts[-3:] == (tree, "sdiff", "__init__.py")
        # every sdiff module the benchmarks imported (the models among them) from that checkout
        modules = [Path(f).resolve() for f in data["sdiff_modules"]]
        assert any(f.parent.name == "models" for f in modules)
        top = ROOT if side == "head" else Path(data["sdiff_file"]).resolve().parents[1]
        assert all(f.is_relative_to(top) for f in modules)
        assert data["sdiff_run"]["device"] in ("cpu", "cuda")
