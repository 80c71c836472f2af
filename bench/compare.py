"""Time a base revision and the working tree side by side; fail when a benchmark got slower.

    python bench/compare.py BASE [--threshold 0.10] [--rounds 3] [--out DIR] [-k EXPR]
    make bench-compare BASE=HEAD~1

The benchmarks are the working tree's ``bench/perf`` (pytest-benchmark); only the library under
test differs between the sides. BASE is checked out with ``git worktree add --detach`` (removed
afterwards); each side's pytest runs with that checkout as its working directory, where
``python`` finds the checkout's own ``sdiff/`` first and sdiff's import hook maps the
checkout's ``kernels/``, ``bench/`` and ``ablations/`` into it (a source tree imports as
installed: README, "Layout"). pytest runs with ``--import-mode=importlib`` so that no other
folder lands on ``sys.path``, and a probe records the files of the ``sdiff`` modules each
side imported: the run stops if one came from another tree (for instance a BASE older than
the import hook, whose ``sdiff.kernels`` would come from the editable install).

Noise: the sides alternate, base/head then head/base (ABBA), for ``--rounds`` rounds, all in
this one job on one machine; a benchmark's figure is the median over rounds of the per-run
medians, and ratio = head / base. On this project's shared 2-core CPU machine, comparing a
revision with itself gave |ratio - 1| up to 5.9% with 3 rounds and 8.2% with 1 round
(bench/perf/README.md), hence the defaults: 3 rounds (about 85 s) and a 10% threshold.

Verdicts: ``ok`` within the threshold, ``faster`` below 1 - threshold, ``SLOWER`` above
1 + threshold, ``new`` (ran only on the head side: a new benchmark, or one BASE cannot run),
``FAILED`` (ran on BASE, not on the head side). Exit status: 0 no regression, 1 a ``SLOWER``
or ``FAILED`` row, 2 bad input (unknown revision, not a git repository, a tree without
sdiff/, no benchmark selected, a side that imported another tree's sdiff).

Writes ``<out>/{base,head}-r<i>.json`` (pytest-benchmark), ``compare.json`` (rows, revisions,
device, versions) and ``compare.md`` (the table), by default under runs/bench/compare/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sdiff.util.cli_args import show_defaults
from sdiff.util.tables import markdown_table

FAILING = ("SLOWER", "FAILED")
# Run as ``python -c PROBE <pytest args>`` in a side's checkout: pytest with a plugin that
# records the files of the sdiff modules the run imported.
PROBE = textwrap.dedent("""\
    import sys

    import pytest


    class Probe:
        def pytest_benchmark_update_json(self, config, benchmarks, output_json):
            import sdiff

            output_json["sdiff_file"] = sdiff.__file__
            output_json["sdiff_modules"] = sorted(
                {m.__file__ for n, m in list(sys.modules.items())
                 if n.split(".")[0] == "sdiff" and getattr(m, "__file__", None)}
            )


    sys.exit(pytest.main(sys.argv[1:], plugins=[Probe()]))
    """)


class BadInput(Exception):
    """A comparison that cannot be made (exit status 2)."""


@dataclass(frozen=True)
class Row:
    name: str
    base: float | None  # seconds, median of the per-round medians
    head: float | None
    ratio: float | None  # head / base
    verdict: str


# -- git -------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    except OSError as err:
        raise BadInput(f"cannot run git: {err}") from err
    if out.returncode:
        raise BadInput(f"git {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def resolve(repo: Path, rev: str) -> str:
    """The commit ``rev`` names. A user's revision never reaches git where an option could
    stand: one starting with '-' is refused, and ``--end-of-options`` ends git's options."""
    if rev.startswith("-"):
        raise BadInput(f"a revision cannot start with '-': {rev!r}")
    try:
        return git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options",
                   f"{rev}^{{commit}}")  # fmt: skip
    except BadInput:
        raise BadInput(f"unknown revision {rev!r} in {repo}") from None


# -- running and reading pytest-benchmark ----------------------------------------------------


def run_side(
    *, python: str, tree: Path, perf_dir: Path, out_json: Path, select: str | None
) -> None:
    """One pytest-benchmark run of ``perf_dir`` importing sdiff from the checkout ``tree``."""
    if not (tree / "sdiff" / "__init__.py").is_file():
        raise BadInput(f"{tree} has no sdiff/__init__.py: nothing to benchmark there")
    env = dict(os.environ)
    env.pop("PYTHONSTARTUP", None)
    # `python -c` puts the working directory (the checkout) first on sys.path; the importlib
    # import mode keeps pytest from adding the benchmarks' folders
    cmd = [python, "-c", PROBE, str(perf_dir), "-q", "-p", "no:cacheprovider",
           "--import-mode=importlib", f"--rootdir={perf_dir}", f"--benchmark-json={out_json}",
           "--benchmark-disable-gc", "--benchmark-sort=fullname"]  # fmt: skip
    if select:
        cmd += ["-k", select]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    if proc.returncode == 5:
        raise BadInput(
            f"no benchmark selected in {perf_dir}" + (f" by -k {select!r}" * bool(select))
        )
    if proc.returncode not in (0, 1) or not out_json.is_file():
        raise BadInput(f"pytest failed (exit {proc.returncode}) in {tree}:\n{tail}")
    if proc.returncode == 1:
        print(f"  some benchmarks failed with sdiff from {tree}:\n{textwrap.indent(tail, '    ')}")
    data = json.loads(out_json.read_text())
    if not data.get("sdiff_file"):
        raise BadInput(f"the run in {tree} recorded no sdiff import")
    for imported in [data["sdiff_file"], *data.get("sdiff_modules", [])]:
        if not Path(imported).resolve().is_relative_to(tree.resolve()):
            raise BadInput(
                f"the run meant for {tree} imported sdiff from {imported}: another tree leaked "
                f"in (a conftest changing sys.path, or a revision older than sdiff's import hook)"
            )


def load_medians(path: Path) -> dict[str, float]:
    """fullname -> median seconds of one pytest-benchmark JSON file."""
    data = json.loads(Path(path).read_text())
    return {b["fullname"]: float(b["stats"]["median"]) for b in data.get("benchmarks", [])}


def median_of_medians(runs: list[dict[str, float]]) -> dict[str, float]:
    names = dict.fromkeys(n for run in runs for n in run)
    return {n: statistics.median(run[n] for run in runs if n in run) for n in names}


# -- the comparison ------------------------------------------------------------------------


def verdict(ratio: float, threshold: float) -> str:
    if ratio > 1 + threshold:
        return "SLOWER"
    if ratio < 1 - threshold:
        return "faster"
    return "ok"


def compare(base: dict[str, float], head: dict[str, float], threshold: float) -> list[Row]:
    rows = []
    for name in dict.fromkeys([*base, *head]):
        b, h = base.get(name), head.get(name)
        if b is None:
            rows.append(Row(name, None, h, None, "new"))
        elif h is None:
            rows.append(Row(name, b, None, None, "FAILED"))
        else:
            ratio = h / b if b > 0 else float("inf")
            rows.append(Row(name, b, h, ratio, verdict(ratio, threshold)))
    return rows


def exit_code(rows: list[Row]) -> int:
    return 1 if any(r.verdict in FAILING for r in rows) else 0


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.4g} {unit}"
    return f"{seconds / 1e-9:.4g} ns"


def short_names(names: list[str]) -> dict[str, str]:
    """'dir/test_x.py::test_y[p]' -> 'test_y[p]' unless two files share a test name."""
    short = {n: n.split("::", 1)[-1] for n in names}
    clash = len(set(short.values())) < len(short)
    return {n: (n.rsplit("/", 1)[-1] if clash else s) for n, s in short.items()}


def format_table(rows: list[Row], threshold: float) -> str:
    names = short_names([r.name for r in rows])
    header = ["benchmark", "base median", "head median", "head/base", "verdict"]
    body = [[names[r.name], fmt_time(r.base), fmt_time(r.head),
             "-" if r.ratio is None else f"{r.ratio:.3f}", r.verdict] for r in rows]  # fmt: skip
    worst = max((r.ratio for r in rows if r.ratio is not None), default=None)
    n_bad = sum(r.verdict in FAILING for r in rows)
    summary = (
        f"{n_bad} of {len(rows)} benchmarks regressed (threshold {threshold:.0%})"
        if n_bad
        else f"no regression beyond {threshold:.0%} in {len(rows)} benchmarks"
    )
    if worst is not None:
        summary += f"; largest head/base {worst:.3f}"
    return markdown_table(header, body, right=(1, 2, 3)) + "\n" + summary


# -- the job ---------------------------------------------------------------------------


def describe_run(path: Path) -> dict:
    data = json.loads(path.read_text())
    m = data.get("machine_info", {})
    return {"node": m.get("node"), "cpu": m.get("cpu", {}).get("brand_raw"),
            "python": m.get("python_version"), **data.get("sdiff_run", {})}  # fmt: skip


def run_comparison(args: argparse.Namespace) -> int:
    repo = Path(git(Path(args.repo), "rev-parse", "--show-toplevel"))
    base_sha = resolve(repo, args.base)
    head_sha = resolve(repo, args.head) if args.head else None
    perf_dir = Path(args.perf_dir).resolve() if args.perf_dir else repo / "bench" / "perf"
    if not perf_dir.is_dir():
        raise BadInput(f"no benchmark folder {perf_dir}")
    if not 0 < args.threshold < 10 or args.rounds < 1:
        raise BadInput("--threshold must lie in (0, 10) and --rounds be >= 1")
    current = git(repo, "rev-parse", "HEAD")
    dirty = bool(git(repo, "status", "--porcelain"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else repo / "runs/bench/compare" / f"{stamp}-{base_sha[:9]}"
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="sdiff-compare-") as tmp:
        trees, worktrees = {}, []
        try:
            for side, sha in (("base", base_sha), ("head", head_sha)):
                if sha is None:
                    trees[side] = repo  # the working tree, uncommitted changes included
                    continue
                trees[side] = Path(tmp) / f"{side}-tree"
                git(repo, "worktree", "add", "--detach", str(trees[side]), sha)
                worktrees.append(trees[side])
            head_label = (f"{args.head} ({head_sha[:9]})" if head_sha
                          else f"working tree ({current[:9]}{'+dirty' * dirty})")  # fmt: skip
            print(f"base {args.base} ({base_sha[:9]}) vs {head_label}: "
                  f"{args.rounds} interleaved round(s), benchmarks from {perf_dir}")  # fmt: skip
            runs: dict[str, list[dict[str, float]]] = {"base": [], "head": []}
            for r in range(args.rounds):
                for side in ("base", "head") if r % 2 == 0 else ("head", "base"):
                    path = out / f"{side}-r{r}.json"
                    start = time.perf_counter()
                    run_side(python=args.python, tree=trees[side], perf_dir=perf_dir,
                             out_json=path, select=args.select)  # fmt: skip
                    runs[side].append(load_medians(path))
                    print(f"  round {r + 1}/{args.rounds} {side}: "
                          f"{time.perf_counter() - start:.1f} s")  # fmt: skip
        finally:
            for tree in worktrees:
                subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)  # fmt: skip
            if worktrees:
                subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True)

    rows = compare(median_of_medians(runs["base"]), median_of_medians(runs["head"]), args.threshold)
    table = format_table(rows, args.threshold)
    run_info = describe_run(out / "head-r0.json")
    where = run_info.get("device_name")
    if run_info.get("device") == "cpu":
        where = f"cpu {run_info.get('cpu')}, {run_info.get('threads')} thread(s)"
    title = (
        f"base {args.base} ({base_sha[:9]}) vs {head_label}; {where}, torch "
        f"{run_info.get('torch')}; median of {args.rounds} interleaved round(s)"
    )
    print("\n" + title + "\n\n" + table)
    (out / "compare.md").write_text(f"# {title}\n\n{table}\n")
    record = {"base": args.base, "base_sha": base_sha, "head": args.head or "working tree",
              "head_sha": head_sha or current, "head_dirty": head_sha is None and dirty,
              "threshold": args.threshold, "rounds": args.rounds, "select": args.select,
              "run": run_info, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "rows": [asdict(r) for r in rows]}  # fmt: skip
    (out / "compare.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"results in {out}")
    return exit_code(rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="git revision to compare against (e.g. HEAD~1, origin/main)")
    p.add_argument("--head", help="a revision instead of the working tree")
    p.add_argument("--threshold", type=float, default=0.10, help="allowed slow-down (0.10: 10%%)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved base/head runs")
    p.add_argument("--out", help="results folder (default runs/bench/compare/<date>-<base>)")
    p.add_argument("-k", dest="select", help="pytest -k expression choosing benchmarks")
    p.add_argument("--repo", default=".", help="the git repository (default: the current one)")
    p.add_argument("--perf-dir", help="benchmark folder (default <repo>/bench/perf)")
    p.add_argument("--python", default=sys.executable, help="interpreter with torch and pytest")
    return show_defaults(p).parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_comparison(args)
    except BadInput as err:
        print(f"bench/compare.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
