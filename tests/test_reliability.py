"""Reliability: what a hostile but fair user tries, and the guards that stop each kind of fault.

One test (or more) per defect found by such a run, each written before its fix and seen failing
on the code before it:

1. a repeated list option (``--set a=1 --set b=2``) keeps every value, in every parser;
2. non-finite weights are never checkpointed, and "last good" means all tensors finite;
3. ``sdiff sample``/``eval`` of a run folder refuse a checkpoint of another config;
4. ``sdiff eval --checkpoint FILE`` records next to the file (``--run FILE`` is refused);
5. one process owns a run folder at a time (a killed owner's folder is free at once);
6. an ablation runner that lost its claim stops the cell; a live runner is not taken over early;
7. expected failures (missing files, read-only folders, full disks, devices) are one line on
   stderr with a distinct exit code, and a traceback only under ``--debug``;
8. a full disk under an existing results store says "disk is full";
9. resume skips a damaged newest checkpoint with a warning and uses the previous good one;
11. error messages name the file, and never advise ``weights_only=False``;
12. resuming a finished run in a read-only folder works, and ``bench/compare.py`` refuses a
    revision that looks like an option.

(Defect 10, validation of every numeric config field, is tested in test_config_validation.py.)
Real faults (a full tmpfs, a read-only bind mount) run in a child process in a private mount
namespace: see the ``sandbox`` fixture in conftest.py.
"""

from __future__ import annotations

import ast
import csv
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from test_ablation_runner import TINY, subprocess_env
from test_train import CONFIG, assert_same_state, final_state

from sdiff.cli import build_parser, main, resolve_run_config
from sdiff.training.checkpoint import list_checkpoints, load_checkpoint
from sdiff.training.config import apply_overrides, to_json
from sdiff.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# The documented exit codes (README, "Reliability"): a contract, so spelled out here.
EXIT_USAGE, EXIT_STOPPED, EXIT_IO, EXIT_DEVICE, EXIT_BUSY = 2, 3, 4, 5, 6


def error_line(err: str, *fragments: str) -> str:
    """The CLI's error: its last stderr line, no traceback, holding every fragment."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    for f in fragments:
        assert f in line, (f, line)
    return line


def metric_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv", newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """CONFIG trained without interruption (12 steps, checkpoints every 3, keep 2)."""
    run = tmp_path_factory.mktemp("reference")
    Trainer(CONFIG, run, progress=False).run()
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run folder of CONFIG stopped after 3 steps (one checkpoint)."""
    run = tmp_path_factory.mktemp("trained")
    Trainer(CONFIG, run, progress=False).run(max_steps=3)
    return run


def test_exit_codes_are_the_documented_ones():
    from sdiff.util import errors

    documented = (EXIT_USAGE, EXIT_STOPPED, EXIT_IO, EXIT_DEVICE, EXIT_BUSY)
    names = ("EXIT_USAGE", "EXIT_STOPPED", "EXIT_IO", "EXIT_DEVICE", "EXIT_BUSY")
    assert tuple(getattr(errors, n) for n in names) == documented


# -- 1. repeated list options ----------------------------------------------------------------------
def test_repeated_set_options_all_apply(capsys):
    argv = ["--set", "train.lr=0.5", "--set", "train.batch_size=8"]
    assert main(["train", "--run-preset", "digits", *argv, "--dry-run"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["train"]["lr"] == 0.5 and config["train"]["batch_size"] == 8
    demo = resolve_run_config(build_parser().parse_args(["demo", *argv]))
    assert demo.train.lr == 0.5 and demo.train.batch_size == 8
    # a default list is replaced by what is given, then extended by repeats
    evaluation = build_parser().parse_args(["eval", "--metrics", "kid", "--metrics", "fid"])
    assert evaluation.metrics == ["kid", "fid"]
    assert build_parser().parse_args(["eval"]).metrics == ["fid", "kid", "prc"]


def _list_options(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, option, action) of every ``add_argument("--x", nargs="+" or "*")`` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant)]
        kw = {k.arg: k.value for k in node.keywords}
        nargs = kw.get("nargs")
        if not (names and str(names[0]).startswith("-") and isinstance(nargs, ast.Constant)):
            continue
        if nargs.value in ("+", "*"):
            action = kw.get("action")
            label = ast.unparse(action) if action is not None else None
            found.append((node.lineno, names[0], label))
    return found


def test_every_repeatable_list_option_extends():
    """The guard for the whole class: every option taking a list, in every parser of the
    project, accumulates repeats (``ExtendList``) instead of keeping only the last one."""
    folders = ("sdiff", "bench", "ablations", "kernels")
    files = [p for d in folders for p in (ROOT / d).rglob("*.py")]
    options = {(str(p.relative_to(ROOT)), *o) for p in files for o in _list_options(p)}
    assert len(options) > 10  # the scan sees the parsers
    extending = ("ExtendList", "cli_args.ExtendList", "KeyValueList", "cli_args.KeyValueList")
    # a renamed option's action wraps its own: renamed("--old", action=ExtendList)
    renamed = re.compile(r"renamed\(.*action=(cli_args\.)?(ExtendList|KeyValueList)\)")
    wrong = sorted(
        o for o in options if o[3] not in extending and not renamed.fullmatch(o[3] or "")
    )
    assert not wrong, f"list options that drop earlier repeats: {wrong}"


# -- 2. non-finite weights -------------------------------------------------------------------------
def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    cfg = apply_overrides(CONFIG, ["train.checkpoint_every_images=8"])  # a checkpoint every step
    trainer = Trainer(cfg, tmp_path, progress=False)
    real_step = trainer.opt.step

    def poisoned_step(*args, **kwargs):  # gradients are finite; the update of step 3 is not
        out = real_step(*args, **kwargs)
        if trainer.step == 2:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("inf"))
        return out

    trainer.opt.step = poisoned_step
    with pytest.raises(FloatingPointError, match="non-finite parameters after step 3") as err:
        trainer.run()
    saved = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in saved] == ["ckpt-000000000001.pt", "ckpt-000000000002.pt"]
    assert f"last good checkpoint: {saved[-1]}" in str(err.value)
    for path in saved:
        state = load_checkpoint(path)
        assert all(torch.isfinite(v).all() for v in state["model"].values())


def _poison(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    name = next(iter(state["ema"]))
    state["ema"][name] = torch.full_like(state["ema"][name], float("nan"))
    torch.save(state, path)


def test_resume_skips_a_non_finite_newest_checkpoint(tmp_path, reference):
    Trainer(CONFIG, tmp_path, progress=False).run(max_steps=6)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    assert newest.name == "ckpt-000000000006.pt"
    _poison(newest)
    with pytest.warns(UserWarning, match=f"{newest}.*non-finite"):
        trainer = Trainer(CONFIG, tmp_path, progress=False)
    assert trainer.step == 3
    trainer.run()
    assert_same_state(final_state(reference), final_state(tmp_path))


# -- 9. a damaged newest checkpoint ----------------------------------------------------------------
def test_resume_skips_a_truncated_newest_checkpoint(tmp_path, reference):
    Trainer(CONFIG, tmp_path, progress=False).run(max_steps=6)
    newest = list_checkpoints(tmp_path / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[:2000])
    with pytest.warns(UserWarning, match=f"skipped {newest}"):
        trainer = Trainer(CONFIG, tmp_path, progress=False)
    assert trainer.step == 3
    trainer.run()
    assert_same_state(final_state(reference), final_state(tmp_path))


def test_no_good_checkpoint_names_every_damaged_file(tmp_path):
    Trainer(CONFIG, tmp_path, progress=False).run(max_steps=6)
    paths = list_checkpoints(tmp_path / "checkpoints")
    paths[0].write_bytes(b"junk")
    _poison(paths[1])
    with pytest.raises(ValueError, match="no good checkpoint") as err:
        Trainer(CONFIG, tmp_path, progress=False)
    assert all(str(p) in str(err.value) for p in paths) and "remove" in str(err.value)


# -- 3. and 4. sampling and evaluating a run -------------------------------------------------------
def test_sample_and_eval_refuse_a_checkpoint_of_another_config(tmp_path, trained, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    other = apply_overrides(CONFIG, ["train.lr=0.01", "model.depth=2"])
    Trainer(other, tmp_path / "other", progress=False).run(max_steps=3)
    foreign = run / "checkpoints" / "ckpt-000000000099.pt"
    shutil.copy(list_checkpoints(tmp_path / "other" / "checkpoints")[-1], foreign)
    grid = tmp_path / "grid.png"
    sampling = ["--n", "2", "--steps", "1", "--grid", str(grid)]
    assert main(["sample", "--run", str(run), *sampling]) == EXIT_USAGE
    error_line(capsys.readouterr().err, str(foreign), "model.depth", "train.lr")
    assert not grid.exists()
    assert main(["eval", "--run", str(run), "--n", "2", "--steps", "1"]) == EXIT_USAGE
    error_line(capsys.readouterr().err, str(foreign), "model.depth")
    assert not (run / "metrics.json").exists()
    # named explicitly, a checkpoint file is used as it is
    assert main(["sample", "--checkpoint", str(foreign), *sampling]) == 0
    assert grid.exists()


def test_eval_of_a_checkpoint_file_records_next_to_it(tmp_path, trained, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    checkpoint = list_checkpoints(run / "checkpoints")[-1]
    args = ["--n", "8", "--reference-n", "8", "--steps", "1", "--metrics", "kid"]
    assert main(["eval", "--checkpoint", str(checkpoint), *args]) == 0
    capsys.readouterr()
    records = json.loads((checkpoint.parent / "metrics.json").read_text())["evaluations"]
    assert [r["checkpoint"] for r in records] == [str(checkpoint)]
    assert not (run / "metrics.json").exists() and not (tmp_path / "metrics.json").exists()
    assert main(["eval", "--run", str(checkpoint), *args]) == EXIT_USAGE
    error_line(capsys.readouterr().err, "--checkpoint")


# -- 5. one owner per run folder -------------------------------------------------------------------
def test_one_trainer_per_run_folder_in_one_process(tmp_path):
    from sdiff.util.errors import RunFolderBusy

    first = Trainer(CONFIG, tmp_path, progress=False)
    with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
        Trainer(CONFIG, tmp_path, progress=False)
    first.run()
    finished = Trainer(CONFIG, tmp_path, progress=False)  # released when the run ended
    assert finished.step == 12
    finished.run()
    assert metric_steps(tmp_path) == [2, 4, 6, 8, 10, 12]


def test_a_second_process_is_refused_and_a_killed_owner_frees_the_folder(tmp_path, capsys):
    cfg = apply_overrides(CONFIG, ["train.total_images=800000"])  # far longer than the test
    (tmp_path / "cfg.json").write_text(to_json(cfg))
    run = tmp_path / "run"
    train = [sys.executable, "-m", "sdiff", "train", "--config", str(tmp_path / "cfg.json"),
             "--out", str(run), "--no-progress"]  # fmt: skip
    owner = subprocess.Popen(train)
    try:
        deadline = time.time() + 120
        while not list_checkpoints(run / "checkpoints") and time.time() < deadline:
            time.sleep(0.05)
        second = subprocess.run(train, capture_output=True, text=True, timeout=120)
        assert second.returncode == EXIT_BUSY, second.stderr
        error_line(second.stderr, str(run), f"pid {owner.pid}")
        # sampling the folder a trainer owns: refused, with the way to do it anyway
        assert main(["sample", "--run", str(run), "--n", "1", "--steps", "1",
                     "--grid", str(tmp_path / "g.png")]) == EXIT_BUSY  # fmt: skip
        error_line(capsys.readouterr().err, f"pid {owner.pid}", "--checkpoint")
    finally:
        owner.kill()
        owner.wait()
    resumed = Trainer(cfg, run, progress=False)  # a killed owner holds nothing
    assert resumed.step >= 3
    resumed.run(max_steps=4)
    steps = metric_steps(run)
    assert steps == sorted(set(steps))


def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path):
    from sdiff.util.runlock import LOCK_NAME

    code = (
        "import sys, os; from sdiff.util.runlock import RunLock; "
        "RunLock(sys.argv[1], 'test').acquire(); os._exit(0)"  # exits holding it: no release
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] != os.getpid()
    Trainer(CONFIG, tmp_path, progress=False).run(max_steps=1)


# -- 6. ablation cells: claims that hold -----------------------------------------------------------
def _set_running(store, hash: str, owner: str, age_s: float) -> None:
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "UPDATE cells SET status = 'running', owner = ?, heartbeat = ? WHERE hash = ?",
            (owner, time.time() - age_s, hash),
        )


def test_a_live_local_runner_is_not_taken_over_before_the_grace_period(tmp_path):
    from sdiff.ablations.grid import expand
    from sdiff.ablations.store import ResultsStore, new_owner

    (cell,) = expand(TINY, "smoke")
    store = ResultsStore(tmp_path / "results.sqlite", stale_after_s=1.0, live_grace_s=30.0)
    store.add([cell])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        stalled = f"{socket.gethostname()}:{sleeper.pid}:0badc0de"
        _set_running(store, cell.hash, stalled, age_s=5.0)  # stale heartbeat, live process
        assert not store.claim(cell.hash, new_owner())
        _set_running(store, cell.hash, stalled, age_s=60.0)  # beyond the grace period
        assert store.claim(cell.hash, new_owner())
    finally:
        sleeper.kill()
        sleeper.wait()
    _set_running(store, cell.hash, stalled, age_s=0.0)  # fresh, but its process is dead
    assert store.claim(cell.hash, new_owner())
    store.close()


def test_a_runner_that_loses_its_claim_stops_the_cell_at_the_next_step(tmp_path):
    from sdiff.ablations.executors import GridJob, run_claimed
    from sdiff.ablations.store import ResultsStore, new_owner

    overrides = ("train.total_images=4000", "train.checkpoint_every_images=8",
                 "train.keep_checkpoints=1000")  # fmt: skip
    job = GridJob(table=TINY, scale="smoke", rows=None, overrides=overrides,
                  out_dir=str(tmp_path), heartbeat_s=0.05, stale_after_s=1.0)  # fmt: skip
    _, (cell,) = job.resolve()
    store = job.open_store()
    store.add([cell])
    owner = new_owner()
    assert store.claim(cell.hash, owner)
    run_dir = job.cell_dir(cell.hash)
    stolen_at = []

    def steal() -> None:  # another runner takes the cell over after 5 checkpoints
        deadline = time.time() + 120
        while len(list_checkpoints(run_dir / "checkpoints")) < 5 and time.time() < deadline:
            time.sleep(0.005)
        _set_running(store, cell.hash, "elsewhere:1:cafe", age_s=0.0)
        stolen_at.append(len(list_checkpoints(run_dir / "checkpoints")))

    thief = threading.Thread(target=steal)
    thief.start()
    outcome = run_claimed(store, owner, cell, TINY, job, log=lambda _: None)
    thief.join()
    assert outcome == "lost"
    written = len(list_checkpoints(run_dir / "checkpoints"))
    assert written <= stolen_at[0] + 10, (written, stolen_at)  # 500 steps without the stop
    assert not (run_dir / "metrics.json").exists()
    with ResultsStore(tmp_path / "results.sqlite") as s:
        row = s.get(cell.hash)
    assert row["status"] == "running" and row["owner"] == "elsewhere:1:cafe"
    store.close()


RUNNER = """
import sys
from sdiff.ablations.runner import run_grid
from test_ablation_runner import TINY
run_grid(TINY, "smoke", sys.argv[1], overrides=sys.argv[2:], progress=False, heartbeat_s=0.1,
         stale_after_s=1.0, live_grace_s=4.0, poll_s=0.1)
"""


def stop_outside_a_transaction(process: subprocess.Popen, store: Path) -> None:
    """SIGSTOP ``process`` while this test holds the store's write lock, so the stopped
    process cannot be inside a write transaction (it is at most waiting for the lock, holding
    none). A process stopped mid-transaction would keep the lock and block every other one:
    sqlite's limit, not the runner's, and not what this test is about."""
    conn = sqlite3.connect(store, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        process.send_signal(signal.SIGSTOP)
        deadline = time.time() + 10
        while not all(  # every thread stopped (state T) before the lock is let go
            (t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
            for t in Path(f"/proc/{process.pid}/task").iterdir()
        ):
            assert time.time() < deadline
            time.sleep(0.001)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_a_stopped_runner_and_its_successor_never_share_the_cell_folder(tmp_path):
    """SIGSTOP a runner in the middle of a cell; a second runner waits out the grace period,
    takes the claim, then waits until the stopped one, continued, gives the folder up; the
    cell ends as if it had been trained once without interruption."""
    from sdiff.ablations.grid import expand
    from sdiff.ablations.store import ResultsStore, cell_dir

    overrides = ["train.total_images=960", "train.keep_checkpoints=1000"]  # 120 steps
    (cell,) = expand(TINY, "smoke", overrides=overrides)
    reference = tmp_path / "reference"
    Trainer(cell.config, reference, progress=False).run()
    out = tmp_path / "grid"
    command = [sys.executable, "-c", RUNNER, str(out), *overrides]
    first = subprocess.Popen(command, env=subprocess_env())
    run_dir = cell_dir(out, cell.hash)
    deadline = time.time() + 120
    while len(list_checkpoints(run_dir / "checkpoints")) < 3 and time.time() < deadline:
        time.sleep(0.01)
    stop_outside_a_transaction(first, out / "results.sqlite")
    stopped = time.time()
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    second = subprocess.Popen(command, env=subprocess_env())
    try:
        # past the grace period the second runner takes the claim, then waits for the folder
        with ResultsStore(out / "results.sqlite") as store:
            deadline = time.time() + 120
            while f":{second.pid}:" not in store.get(cell.hash)["owner"]:
                assert time.time() < deadline and second.poll() is None
                time.sleep(0.1)
            taken_over = time.time()
        # not before the grace period, which counts from the runner's last heartbeat: up to
        # one heartbeat interval (0.1 s) before the SIGSTOP this test times from
        assert taken_over - stopped >= 4.0 - 0.15
        time.sleep(1.0)  # waiting: the stopped runner still holds the cell folder
        assert list_checkpoints(run_dir / "checkpoints")[-1] == newest
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) == 0
        second.wait(timeout=300)
    finally:
        for p in (first, second):
            p.kill()
            p.wait()
    with ResultsStore(out / "results.sqlite") as store:
        row = store.get(cell.hash)
    assert row["status"] == "done" and f":{second.pid}:" in row["owner"]
    steps = metric_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 120
    assert_same_state(final_state(reference), final_state(run_dir))


# -- 7. one-line errors with distinct exit codes ---------------------------------------------------
def test_a_missing_or_invalid_config_file_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.json"
    assert main(["train", "--config", str(missing), "--out", str(tmp_path / "run")]) == EXIT_IO
    error_line(capsys.readouterr().err, str(missing))
    broken = tmp_path / "broken.json"
    broken.write_text('{"train": {"lr": 0.1,}}')
    assert main(["train", "--config", str(broken), "--dry-run"]) == EXIT_USAGE
    error_line(capsys.readouterr().err, str(broken), "line 1")
    with pytest.raises(FileNotFoundError):  # --debug: the exception itself, traceback and all
        main(["--debug", "train", "--config", str(missing), "--out", str(tmp_path / "run")])


def test_an_unavailable_device_is_one_line_before_anything_is_written(tmp_path, capsys, trained):
    run = tmp_path / "run"
    assert main(["train", "--run-preset", "digits", "--out", str(run), "--device", "tpu9"]) == (
        EXIT_DEVICE
    )
    error_line(capsys.readouterr().err, "tpu9")
    assert not run.exists()
    sampling = ["--run", str(trained), "--n", "1", "--steps", "1", "--grid", str(run / "g.png")]
    assert main(["sample", *sampling, "--device", "tpu9"]) == EXIT_DEVICE
    error_line(capsys.readouterr().err, "tpu9")
    assert main(["ablate", "1", "--out", str(run), "--device", "tpu9", "--no-progress"]) == (
        EXIT_DEVICE
    )
    error_line(capsys.readouterr().err, "tpu9")
    assert not run.exists()
    if not torch.cuda.is_available():
        assert main(["train", "--run-preset", "digits", "--out", str(run), "--device", "cuda"]) == (
            EXIT_DEVICE
        )
        error_line(capsys.readouterr().err, "cuda")
        assert main(["sample", *sampling, "--device", "cuda:0"]) == EXIT_DEVICE
        error_line(capsys.readouterr().err, "cuda")


def test_an_output_path_under_a_file_fails_before_sampling(tmp_path, trained, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    start = time.perf_counter()
    argv = ["sample", "--run", str(trained), "--n", "64", "--steps", "1000"]
    assert main([*argv, "--grid", str(blocker / "grid.png")]) == EXIT_IO
    error_line(capsys.readouterr().err, str(blocker))
    assert main([*argv, "--folder", str(blocker / "images")]) == EXIT_IO
    error_line(capsys.readouterr().err, str(blocker))
    assert time.perf_counter() - start < 30  # 64 x 1000 steps were not sampled first


SCRIPT_HEAD = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from pathlib import Path
from sdiff.cli import main
from conftest import fill_disk
"""


def trainer_script(tmp_path: Path) -> str:
    """SCRIPT_HEAD, with CONFIG written to tmp_path/cfg.json and loaded as ``cfg`` (its
    path in ``cfg_path``), and ``Trainer`` imported."""
    (tmp_path / "cfg.json").write_text(to_json(CONFIG))
    return SCRIPT_HEAD + (
        "import json\n"
        "from sdiff.training.config import RunConfig, from_dict\n"
        "from sdiff.training.trainer import Trainer\n"
        f"cfg_path = {str(tmp_path / 'cfg.json')!r}\n"
        "cfg = from_dict(RunConfig, json.loads(Path(cfg_path).read_text()))\n"
    )


def test_a_read_only_output_folder_is_one_line(tmp_path, sandbox):
    ro = tmp_path / "ro"
    ro.mkdir()
    script = SCRIPT_HEAD + (
        f"rc = main(['train', '--run-preset', 'digits', '--out', {str(ro / 'run')!r}, "
        "'--no-progress'])\n"
        f"if rc != {EXIT_IO}: sys.exit(f'train exited {{rc}}')\n"
        f"rc = main(['ablate', '1', '--out', {str(ro / 't1')!r}, '--no-progress'])\n"
        f"sys.exit(0 if rc == {EXIT_IO} else f'ablate exited {{rc}}')\n"
    )
    out = sandbox(script, readonly=[ro])
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 2 and "Traceback" not in out.stderr, out.stderr
    assert str(ro / "run") in lines[0] and "read-only" in lines[0]
    assert str(ro / "t1") in lines[1] and "read-only" in lines[1]


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_loses_nothing(tmp_path, sandbox):
    disk = tmp_path / "disk"
    run = disk / "run"
    script = trainer_script(tmp_path) + (
        f"Trainer(cfg, {str(run)!r}, progress=False).run(max_steps=2)\n"  # metrics, no checkpoint
        f"fill_disk(Path({str(disk)!r}), leave=64 * 1024)\n"  # room for rows, not a checkpoint
        f"rc = main(['train', '--config', cfg_path, '--out', {str(run)!r}, '--no-progress'])\n"
        f"print('left behind:', sorted(p.name for p in Path({str(run)!r}).rglob('*.tmp')))\n"
        f"print('rows:', Path({str(run / 'metrics.csv')!r}).read_text().count(chr(10)))\n"
        "sys.exit(rc)\n"
    )
    out = sandbox(script, full=[disk], tmpfs_kib=4096)
    assert out.returncode == EXIT_IO, out.stderr
    error_line(out.stderr, "disk is full", str(run / "checkpoints"))
    assert "left behind: []" in out.stdout and "rows: 2" in out.stdout  # header + step 2


def test_a_full_disk_while_writing_metrics_is_one_line(tmp_path, sandbox):
    disk = tmp_path / "disk"
    run = disk / "run"
    script = trainer_script(tmp_path) + (
        f"Trainer(cfg, {str(run)!r}, progress=False).close()\n"  # config.json, nothing else
        f"fill_disk(Path({str(disk)!r}))\n"
        f"sys.exit(main(['train', '--config', cfg_path, '--out', {str(run)!r}, "
        "'--no-progress']))\n"
    )
    out = sandbox(script, full=[disk], tmpfs_kib=4096)
    assert out.returncode == EXIT_IO, out.stderr
    error_line(out.stderr, "disk is full", str(run / "metrics.csv"))


# -- 8. a full disk under an existing results store ------------------------------------------------
def test_a_full_disk_under_an_existing_store_says_so(tmp_path, sandbox):
    disk = tmp_path / "disk"
    script = SCRIPT_HEAD + (
        "from sdiff.ablations.grid import expand\n"
        "from sdiff.ablations.store import ResultsStore, StoreError, new_owner\n"
        "from test_ablation_runner import COUNT\n"
        f"path = Path({str(disk)!r}) / 'results.sqlite'\n"
        "cells = expand(COUNT, 'smoke')\n"
        "with ResultsStore(path) as store:\n"
        "    store.add(cells)\n"
        f"fill_disk(Path({str(disk)!r}))\n"
        "try:\n"
        "    with ResultsStore(path) as store:\n"
        "        store.claim(cells[0].hash, new_owner())\n"
        "except StoreError as err:\n"
        "    print(err)\n"
        "    sys.exit(0)\n"
        "sys.exit('no error on a full disk')\n"
    )
    out = sandbox(script, full=[disk], tmpfs_kib=512)
    assert out.returncode == 0, out.stderr
    assert "disk is full" in out.stdout and "results recorded earlier are intact" in out.stdout


# -- 11. messages ----------------------------------------------------------------------------------
class NotAWeight:
    pass


def test_a_checkpoint_with_pickled_code_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "ckpt-000000000001.pt"
    torch.save({"model": {}, "step": 1, "payload": NotAWeight()}, path)
    with pytest.raises(ValueError) as err:
        load_checkpoint(path)
    text = str(err.value)
    assert str(path) in text and "weights-only" in text
    assert "weights_only=False" not in text and "will likely succeed" not in text


# -- 12. read-only finished runs; compare.py's revisions -------------------------------------------
def test_a_finished_run_resumes_and_samples_in_a_read_only_folder(tmp_path, reference, sandbox):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (tmp_path / "cfg.json").write_text(to_json(CONFIG))
    grid = tmp_path / "grid.png"
    script = SCRIPT_HEAD + (
        f"rc = main(['train', '--config', {str(tmp_path / 'cfg.json')!r}, '--out', {str(run)!r}, "
        "'--no-progress'])\n"
        "if rc: sys.exit(f'train exited {rc}')\n"
        f"sys.exit(main(['sample', '--run', {str(run)!r}, '--n', '2', '--steps', '1', "
        f"'--grid', {str(grid)!r}]))\n"
    )
    out = sandbox(script, readonly=[run])
    assert out.returncode == 0, out.stderr
    assert "already finished" in out.stdout and grid.exists()


def test_compare_refuses_a_revision_that_looks_like_an_option(tmp_path):
    from sdiff.bench import compare

    with pytest.raises(compare.BadInput, match="cannot start with '-'"):
        compare.resolve(ROOT, "--output=/tmp/x")
