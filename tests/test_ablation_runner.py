"""The ablation runner: grids and their hashes, the results store (claiming rules, schema
versions, a full disk), resuming a killed cell, concurrent runners, failing cells, the
executors (worker processes, submitit, torchrun) and the command line.

The tables here are tiny: mostly ``compute`` tables (a parameter count; a seed written to a
log file, optionally after a sleep or with an error for one seed), and one tiny U-ViT trained
for 12 steps on the bundled digits, evaluated with 8 samples (KID only: the FID's 2048 x 2048
matrix square roots alone take half a minute on 2 cores).
"""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import sdiff.ablations.cell as cell_mod
import sdiff.ablations.store as store_mod
from sdiff.ablations.grid import Axis, Scale, Table, expand
from sdiff.ablations.runner import ablate_main, dry_run, run_grid
from sdiff.ablations.store import (
    SCHEMA_VERSION,
    OwnershipLost,
    ResultsStore,
    StoreError,
    new_owner,
    owner_alive,
    retire_owner,
)
from sdiff.data.datasets import DataConfig
from sdiff.eval.spec import EvalSpec
from sdiff.models.presets import build_model
from sdiff.models.uvit import UViTConfig
from sdiff.training.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from sdiff.training.config import RunConfig, TrainConfig, config_hash, get_run_preset
from sdiff.training.trainer import Trainer

TESTS = Path(__file__).resolve().parent


# -- tiny tables (module level, so worker processes can import them) ------------------------------
def digits() -> RunConfig:
    return get_run_preset("digits")


def param_count(config: RunConfig) -> dict[str, float]:
    return {"params": float(sum(p.numel() for p in build_model(config.model).parameters()))}


def logged_seed(config: RunConfig) -> dict[str, float]:
    """Sleeps ``$SDIFF_TEST_SLEEP`` s, appends the seed to ``$SDIFF_TEST_LOG`` (one line per
    execution), fails for seed ``$SDIFF_TEST_FAIL_SEED``. With ``$SDIFF_TEST_MEET`` (a file),
    first waits until two processes have started a cell, so that both take part."""
    seed = config.train.seed
    meet = os.environ.get("SDIFF_TEST_MEET")
    if meet:
        with open(meet, "a") as f:
            f.write(f"{os.getpid()}\n")
        deadline = time.time() + 60
        while len(set(Path(meet).read_text().split())) < 2 and time.time() < deadline:
            time.sleep(0.01)
    time.sleep(float(os.environ.get("SDIFF_TEST_SLEEP", "0")))
    with open(os.environ["SDIFF_TEST_LOG"], "a") as f:
        f.write(f"{seed}\n")
    if str(seed) == os.environ.get("SDIFF_TEST_FAIL_SEED"):
        raise ValueError(f"seed {seed} fails on purpose")
    blob = "x" * 50_000 if seed == 9 else ""  # a result that needs new pages in the store
    return {"seed": float(seed), **({"blob": blob} if blob else {})}


WIDTHS = (Axis("w32", ("model.width=32",)), Axis("w64", ("model.width=64",)))
DEPTHS = (Axis("d1", ("model.depth=1",)), Axis("d2", ("model.depth=2",)))
COUNT = Table(
    101, "count", "parameter count", ("params",),
    {"smoke": Scale(digits, rows=WIDTHS, columns=DEPTHS)},
    aliases=("params",), compute=param_count,
)  # fmt: skip
SEEDS = Table(
    102, "seeds", "logged seeds", ("seed",),
    {"smoke": Scale(digits, rows=tuple(Axis(f"s{i}", (f"train.seed={i}",)) for i in range(6))),
     "big": Scale(digits, rows=tuple(Axis(f"s{i}", (f"train.seed={i}",)) for i in (0, 1, 9)))},
    compute=logged_seed,
)  # fmt: skip


def tiny_base() -> RunConfig:
    # test_train's model and schedule of checkpoints: 12 steps, a checkpoint every 3
    model = UViTConfig(
        resolution=32, in_channels=1, patch_size=2, channels=(8,), blocks_down=(1,),
        blocks_up=(1,), transformer_resolution=8, width=32, depth=1, head_dim=16, dropout=0.2,
        dropout_resolutions=(16, 8), num_classes=10, norm_groups=4,
    )  # fmt: skip
    return RunConfig(
        model=model,
        data=DataConfig(name="mnist", resolution=32, channels=1, random_flip=True),
        train=TrainConfig(
            total_images=8 * 12, batch_size=8, lr=1e-3, warmup_images=24, ema_decay=0.9,
            log_every_images=8, checkpoint_every_images=24, keep_checkpoints=10,
            sample_every_images=0, deterministic=True, label_dropout=0.3,
        ),
    )  # fmt: skip


TINY = Table(
    103, "tiny", "a tiny trained cell", ("kid_mean",),
    {"smoke": Scale(tiny_base, rows=(Axis("a"),),
                    eval=EvalSpec(n=8, reference_n=8, steps=2, metrics=("kid",)))},
)  # fmt: skip
# the same with FID and KID: half a minute of evaluation to kill
TINY_FID = replace(
    TINY, number=104, name="tiny-fid",
    scales={"smoke": replace(TINY.scales["smoke"],
                             eval=EvalSpec(n=8, reference_n=8, steps=2, metrics=("fid", "kid")))},
)  # fmt: skip
FAKE_TABLES = {t.number: t for t in (COUNT, SEEDS, TINY, TINY_FID)}


@pytest.fixture
def seed_log(tmp_path, monkeypatch):
    path = tmp_path / "executions.log"
    monkeypatch.setenv("SDIFF_TEST_LOG", str(path))
    monkeypatch.delenv("SDIFF_TEST_FAIL_SEED", raising=False)
    monkeypatch.delenv("SDIFF_TEST_SLEEP", raising=False)
    monkeypatch.delenv("SDIFF_TEST_MEET", raising=False)
    return lambda: sorted(int(x) for x in path.read_text().split()) if path.exists() else []


def subprocess_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def statuses(rows):
    return {r["row_name"]: r["status"] for r in rows}


# -- grids and hashes -----------------------------------------------------------------------------
def test_grid_is_rows_times_columns_with_stable_hashes():
    cells = expand(COUNT, "smoke")
    assert [(c.row, c.column) for c in cells] == [
        ("w32", "d1"), ("w32", "d2"), ("w64", "d1"), ("w64", "d2")
    ]  # fmt: skip
    assert [(c.config.model.width, c.config.model.depth) for c in cells] == [
        (32, 1), (32, 2), (64, 1), (64, 2)
    ]  # fmt: skip
    hashes = [c.hash for c in cells]
    assert len(set(hashes)) == 4 and all(len(h) == 16 and int(h, 16) >= 0 for h in hashes)
    assert [c.hash for c in expand(COUNT, "smoke")] == hashes  # rerun: same hashes
    assert [c["hash"] for c in dry_run(COUNT, "smoke")] == hashes
    # another process with another string-hash seed: same hashes (no set or id order inside)
    code = (
        "import test_ablation_runner as t; from sdiff.ablations.grid import expand; "
        "print(' '.join(c.hash for c in expand(t.COUNT, 'smoke')))"
    )
    env = subprocess_env(PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == hashes


def test_every_change_gives_a_new_hash_and_equal_configs_the_same():
    (cell,) = expand(TINY, "smoke")
    # an override, however it is spelled, is keyed by the value it resolves to
    assert expand(TINY, "smoke", overrides=["train.lr=0.001"])[0].hash == cell.hash
    assert expand(TINY, "smoke", overrides=["train.lr=1e-3"])[0].hash == cell.hash
    assert expand(TINY, "smoke", overrides=["train.lr=0.002"])[0].hash != cell.hash
    # the evaluation settings that decide the numbers; not those of where and how fast
    scale = TINY.scales["smoke"]

    def with_eval(**change):
        other = replace(TINY, scales={"smoke": replace(scale, eval=replace(scale.eval, **change))})
        return expand(other, "smoke")[0]

    for change in ({"n": 9}, {"steps": 3}, {"reference_n": 16}, {"metrics": ("kid", "fid")},
                   {"sampler": "ddim"}, {"seed": 1}, {"weights": "fid-helper"},
                   {"guidance_interval": (-5.0, 5.0)}, {"kid_subsets": 10}):  # fmt: skip
        assert with_eval(**change).hash != cell.hash, change
    for change in ({"device": "cuda"}, {"batch_size": 7}, {"eval_batch_size": 7},
                   {"num_workers": 2}, {"compile": True}):  # fmt: skip
        assert with_eval(**change).hash == cell.hash, change
    # a field at its default is left out of the spec, so that adding one keeps old hashes
    assert set(cell.spec["eval"]) == {"n", "reference_n", "steps", "guidance", "metrics"}
    assert with_eval(sampler="ddim").spec["eval"]["sampler"] == "ddim"

    # the base config
    def base2():
        return replace(tiny_base(), train=replace(tiny_base().train, seed=1))

    other = replace(TINY, scales={"smoke": replace(scale, base=base2)})
    assert expand(other, "smoke")[0].hash != cell.hash
    # a compute cell is keyed by its config only (its eval settings are never used)
    c1 = expand(COUNT, "smoke")[0]
    s = COUNT.scales["smoke"]
    other = replace(COUNT, scales={"smoke": replace(s, eval=replace(s.eval, n=1))})
    assert expand(other, "smoke")[0].hash == c1.hash


def test_duplicate_cells_unknown_rows_and_presets_are_errors(capsys):
    same = Table(
        104, "same", "two rows, one config", ("params",),
        {"smoke": Scale(digits, rows=(Axis("a", ("train.lr=0.001",)),
                                      Axis("b", ("train.lr=1e-3",))))},
        compute=param_count,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"cells .a. and .b. resolve to the same config"):
        expand(same, "smoke")
    with pytest.raises(ValueError, match=r"no row\(s\) \['nope'\]"):
        expand(COUNT, "smoke", rows=["nope"])
    with pytest.raises(ValueError, match="has no scale 'paper'"):
        expand(COUNT, "paper")
    for argv, message in [
        (["count", "--rows", "nope", "--dry-run"], "no row(s) ['nope']"),
        (["count", "--scale", "paper", "--dry-run"], "has no scale 'paper'"),
        (["99", "--dry-run"], "unknown table '99'"),
        (["--dry-run"], "give a table"),
        (["count", "--set", "train.nope=1", "--dry-run"], "has no field 'nope'"),
    ]:
        assert ablate_main(argv, tables=FAKE_TABLES) == 2, argv
        assert message in capsys.readouterr().err, argv


# -- the store ------------------------------------------------------------------------------------
def test_claiming_rules(tmp_path):
    store = ResultsStore(tmp_path / "results.sqlite", stale_after_s=60)
    cells = expand(SEEDS, "smoke")
    assert store.add(cells) == 6 and store.add(cells) == 0  # existing rows are not touched
    h = [c.hash for c in cells]
    a, b = new_owner(), new_owner()
    assert store.claim(h[0], a) and not store.claim(h[0], b)  # a live owner keeps it
    store.heartbeat(h[0], a)
    with pytest.raises(OwnershipLost, match=f"{b} no longer owns it"):
        store.finish(h[0], b, {"x": 1.0})
    store.finish(h[0], a, {"x": 1.0}, wall_s=0.5, device="cpu", git_sha="abc")
    row = store.get(h[0])
    assert (row["status"], row["metrics"], row["attempts"], row["owner"]) == (
        "done",
        {"x": 1.0},
        1,
        a,
    )
    assert not store.claim(h[0], b, retry_failed=True)  # done: never again
    # failed: only with retry_failed
    assert store.claim(h[1], a)
    store.fail(h[1], a, "Traceback ...\nValueError: no")
    assert not store.claim(h[1], b) and store.claim(h[1], b, retry_failed=True)
    row = store.get(h[1])  # the last attempt's error stays until the cell succeeds
    assert row["attempts"] == 2 and row["error"].endswith("ValueError: no")
    # a runner of this process that has ended leaves a claim anyone can take
    assert store.claim(h[2], a)
    retire_owner(a)
    assert not owner_alive(a, time.time(), 60) and store.claim(h[2], b)
    # an owner on this host whose process is gone
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = store_mod._HOST

    def set_running(hash, owner, heartbeat):
        with sqlite3.connect(store.path) as conn:
            conn.execute("UPDATE cells SET status='running', owner=?, heartbeat=? WHERE hash=?",
                         (owner, heartbeat, hash))  # fmt: skip

    set_running(h[3], f"{host}:{gone.pid}:dead", time.time())
    assert store.claim(h[3], b)
    # another machine: alive while its heartbeat is fresh, abandoned when it is stale
    set_running(h[4], "elsewhere:1:x", time.time())
    assert not store.claim(h[4], b)
    set_running(h[4], "elsewhere:1:x", time.time() - 61)
    assert store.claim(h[4], b)
    # claim_next takes the first claimable in the order given
    assert store.claim_next(h, b) == h[5] and store.claim_next(h, b) is None
    rows = store.rows(table=102, scale="smoke")
    assert [r["hash"] for r in rows] == h
    assert [r["config_hash"] for r in rows] == [config_hash(c.config) for c in cells]
    retire_owner(b)
    store.close()


# The schema of version 1 (sdiff.ablations.store before grids, seeds and the cell cache)
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY,           -- Cell.hash: sha256 of the spec's canonical JSON
    table_number INTEGER NOT NULL,
    scale TEXT NOT NULL,
    row_name TEXT NOT NULL,
    column_name TEXT NOT NULL,
    kind TEXT NOT NULL,              -- "train" or "compute"
    spec TEXT NOT NULL,              -- Cell.spec as JSON: resolved config (+ eval settings)
    config_hash TEXT NOT NULL,       -- sdiff.training.config.config_hash: the one checkpoints carry
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    metrics TEXT,                    -- JSON object, when done
    wall_s REAL,                     -- seconds of the last attempt
    attempts INTEGER NOT NULL DEFAULT 0,
    added_at REAL NOT NULL,          -- unix times
    started_at REAL,
    finished_at REAL,
    device TEXT,
    versions TEXT,                   -- JSON: sdiff, python, torch, cuda, triton
    git_sha TEXT,                    -- sdiff.util.provenance.git_sha() of the runner
    error TEXT,                      -- traceback of the last failed attempt
    owner TEXT,                      -- "host:pid:token" of the runner that claimed it last
    heartbeat REAL                   -- unix time, refreshed while running
);
CREATE INDEX IF NOT EXISTS cells_by_table ON cells (table_number, scale);
"""


def test_a_version_1_store_is_upgraded_in_place_and_its_rows_kept(tmp_path):
    """A store written by version 1: its done result is found by the cell cache as it is
    (read-only, nothing upgraded), then opening it adds the four columns and changes no value."""
    from sdiff.ablations.cache import find_cached

    path = tmp_path / "old" / "results.sqlite"
    path.parent.mkdir()
    cells = expand(SEEDS, "smoke", rows=["s1", "s2"])
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
        conn.executemany("INSERT INTO meta VALUES (?, ?)", [("schema_version", "1")])
        for c, status in zip(cells, ("done", "pending"), strict=True):
            conn.execute(
                "INSERT INTO cells (hash, table_number, scale, row_name, column_name, kind, spec, "
                "config_hash, status, metrics, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (c.hash, c.table, c.scale, c.row, c.column, c.kind, json.dumps(c.spec), "x",
                 status, json.dumps({"seed": 1.0}) if status == "done" else None, 1.5),
            )  # fmt: skip
    before = sqlite3.connect(path).execute("SELECT * FROM cells ORDER BY rowid").fetchall()
    hit = find_cached([c.hash for c in cells], [tmp_path])
    assert list(hit) == [cells[0].hash] and hit[cells[0].hash]["metrics"] == {"seed": 1.0}
    assert sqlite3.connect(path).execute("SELECT value FROM meta").fetchone() == ("1",)
    with ResultsStore(path) as store:
        assert store.schema_version() == 2
        rows = store.rows()
    after = sqlite3.connect(path).execute("SELECT * FROM cells ORDER BY rowid").fetchall()
    assert [r[: len(before[0])] for r in after] == before  # every old value as it was
    assert [(r["grid"], r["seed"], r["axes"], r["source"]) for r in rows] == [
        ("table102", 1, {}, None), ("table102", 2, {}, None)
    ]  # fmt: skip


def test_another_schema_version_is_refused_not_migrated(tmp_path):
    path = tmp_path / "results.sqlite"
    with ResultsStore(path) as store:
        store.add(expand(SEEDS, "smoke"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError) as err:
        ResultsStore(path)
    assert f"{path} has schema version 99" in str(err.value)
    assert f"writes version {SCHEMA_VERSION}" in str(err.value)
    with sqlite3.connect(path) as conn:  # untouched
        assert conn.execute("SELECT count(*) FROM cells").fetchone()[0] == 6
        assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            "99",
        )
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE runs (x)")
    with pytest.raises(StoreError, match="not a results store"):
        ResultsStore(other)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a results store"):
        ResultsStore(junk)


@pytest.mark.parametrize("how", ["sqlite page limit", "patched execute"])
def test_full_disk_on_finish_is_reported_and_loses_nothing(
    tmp_path, seed_log, monkeypatch, capsys, how
):
    out = tmp_path / "grid"
    argv = ["seeds", "--scale", "big", "--out", str(out), "--no-progress"]
    assert ablate_main([*argv, "--rows", "s0", "s1"], tables=FAKE_TABLES) == 0
    before = {r["hash"]: r for r in ResultsStore(out / "results.sqlite").rows()}
    if how == "sqlite page limit":  # SQLite's own SQLITE_FULL: the file may not grow any more
        real_finish = ResultsStore.finish

        def finish_on_a_full_disk(self, *args, **kwargs):
            pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
            self._conn.execute(f"PRAGMA max_page_count = {pages}")
            return real_finish(self, *args, **kwargs)

        monkeypatch.setattr(ResultsStore, "finish", finish_on_a_full_disk)
    else:

        def execute(self, sql, *args):
            if sql.lstrip().startswith("UPDATE cells SET status = 'done'"):
                raise sqlite3.OperationalError("database or disk is full")
            return sqlite3.Connection.execute(self, sql, *args)

        monkeypatch.setattr(store_mod._Connection, "execute", execute)
    capsys.readouterr()
    assert ablate_main(argv, tables=FAKE_TABLES) == 4  # sdiff.util.errors.EXIT_IO: a full disk
    err = capsys.readouterr().err
    assert f"results store {out / 'results.sqlite'}: recording the result failed" in err
    assert "disk is full" in err and "results recorded earlier are intact" in err
    monkeypatch.undo()
    monkeypatch.setenv("SDIFF_TEST_LOG", str(tmp_path / "executions.log"))
    with ResultsStore(out / "results.sqlite") as store:
        rows = store.rows()
        assert statuses(rows) == {"s0": "done", "s1": "done", "s9": "running"}  # not done
        for r in rows[:2]:
            assert r == before[r["hash"]]  # earlier results intact, to the byte
        assert not owner_alive(rows[2]["owner"], rows[2]["heartbeat"], store.stale_after_s)
    # with space again, a rerun takes the abandoned cell over and records it
    assert ablate_main(argv, tables=FAKE_TABLES) == 0
    assert seed_log() == [0, 1, 9, 9]
    assert ResultsStore(out / "results.sqlite").get(rows[2]["hash"])["metrics"]["blob"][:3] == "xxx"


# -- failures, concurrency, resume ----------------------------------------------------------------
def test_a_failing_cell_is_recorded_and_the_others_run(tmp_path, seed_log, monkeypatch):
    monkeypatch.setenv("SDIFF_TEST_FAIL_SEED", "3")
    lines = []
    rows = run_grid(SEEDS, "smoke", tmp_path / "grid", progress=False, log=lines.append)
    assert statuses(rows) == {f"s{i}": "failed" if i == 3 else "done" for i in range(6)}
    assert seed_log() == [0, 1, 2, 3, 4, 5]
    failed = rows[3]
    assert (
        "Traceback" in failed["error"] and "ValueError: seed 3 fails on purpose" in failed["error"]
    )
    assert failed["metrics"] is None and failed["finished_at"] and failed["versions"]["torch"]
    assert rows[0]["metrics"]["seed"] == 0 and rows[0]["device"].startswith("cpu")
    assert "1 failed" in lines[-1] and "--retry-failed reruns them" in lines[-1]
    # a rerun reports the failed cell and leaves it alone
    lines.clear()
    rows = run_grid(SEEDS, "smoke", tmp_path / "grid", progress=False, log=lines.append)
    assert seed_log() == [0, 1, 2, 3, 4, 5] and rows[3]["status"] == "failed"
    assert "5 done already (skipped); 1 failed before (not rerun; --retry-failed" in lines[0]
    # ... unless asked to: it runs once more (and now succeeds)
    monkeypatch.delenv("SDIFF_TEST_FAIL_SEED")
    rows = run_grid(
        SEEDS, "smoke", tmp_path / "grid", progress=False, retry_failed=True, log=lines.append
    )
    assert seed_log() == [0, 1, 2, 3, 3, 4, 5]
    assert rows[3]["status"] == "done" and rows[3]["attempts"] == 2 and rows[3]["error"] is None


def test_an_interrupted_runner_gives_its_cell_back(tmp_path, seed_log, monkeypatch):
    real_execute = cell_mod.execute

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cell_mod, "execute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(SEEDS, "smoke", tmp_path / "grid", rows=["s0"], progress=False, log=lambda s: None)
    (row,) = ResultsStore(tmp_path / "grid" / "results.sqlite").rows()
    assert (row["status"], row["attempts"], row["heartbeat"]) == ("pending", 1, None)
    monkeypatch.setattr(cell_mod, "execute", real_execute)
    (row,) = run_grid(
        SEEDS, "smoke", tmp_path / "grid", rows=["s0"], progress=False, log=lambda s: None
    )
    assert (row["status"], row["attempts"]) == ("done", 2) and seed_log() == [0]


def test_two_runners_on_one_store_run_each_cell_once(tmp_path, seed_log):
    out = tmp_path / "grid"
    code = (
        "import test_ablation_runner as t\nfrom sdiff.ablations.runner import run_grid\n"
        f"rows = run_grid(t.SEEDS, 'smoke', {str(out)!r}, progress=False, heartbeat_s=0.2,"
        " stale_after_s=30)\n"
        "assert all(r['status'] == 'done' for r in rows), [r['status'] for r in rows]\n"
    )
    env = subprocess_env(SDIFF_TEST_SLEEP="0.3", SDIFF_TEST_MEET=str(tmp_path / "meet"))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert seed_log() == [0, 1, 2, 3, 4, 5]  # each cell executed exactly once
    rows = ResultsStore(out / "results.sqlite").rows()
    assert [r["status"] for r in rows] == ["done"] * 6 and {r["attempts"] for r in rows} == {1}
    assert sorted(r["metrics"]["seed"] for r in rows) == [0, 1, 2, 3, 4, 5]
    pids = {int(r["owner"].split(":")[1]) for r in rows}
    assert pids == {p.pid for p in procs}  # both took part


def test_local_worker_processes_share_the_grid(tmp_path, seed_log, monkeypatch):
    monkeypatch.setenv("SDIFF_TEST_SLEEP", "0.3")
    monkeypatch.setenv("SDIFF_TEST_MEET", str(tmp_path / "meet"))
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])
    rows = run_grid(
        SEEDS, "smoke", tmp_path / "grid", workers=2, progress=False, log=lambda s: None
    )
    assert [r["status"] for r in rows] == ["done"] * 6 and seed_log() == [0, 1, 2, 3, 4, 5]
    pids = {int(r["owner"].split(":")[1]) for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer state {i}.{k} differs"


def run_and_kill(table: Table, out: Path, until) -> int:
    """Run ``table``'s grid in a subprocess and SIGKILL it once ``until()`` holds; its pid."""
    code = (
        "import test_ablation_runner as t\nfrom sdiff.ablations.runner import run_grid\n"
        f"run_grid(t.{table.name.upper().replace('-', '_')}, 'smoke', {str(out)!r}, "
        "progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env())
    deadline = time.time() + 120
    while not until() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return proc.pid


def assert_left_running_by(out: Path, hash: str, pid: int) -> None:
    with ResultsStore(out / "results.sqlite") as store:
        row = store.get(hash)
        assert row["status"] == "running" and row["owner"].split(":")[1] == str(pid)
        assert not owner_alive(row["owner"], row["heartbeat"], store.stale_after_s)


@pytest.fixture
def trainer_starts(monkeypatch):
    """The step each Trainer.run starts from."""
    starts = []
    real_run = Trainer.run

    def recording_run(self, *args, **kwargs):
        starts.append(self.step)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run", recording_run)
    return starts


@pytest.mark.filterwarnings("ignore:torch-fidelity's Inception weights could not be downloaded")
def test_a_killed_runner_s_cell_resumes_from_its_checkpoint(tmp_path, trainer_starts):
    out = tmp_path / "grid"
    (cell,) = expand(TINY, "smoke")
    checkpoints = out / "cells" / cell.hash / "checkpoints"
    pid = run_and_kill(TINY, out, until=lambda: list_checkpoints(checkpoints))
    resume_step = load_checkpoint(list_checkpoints(checkpoints)[-1])["step"]
    assert 3 <= resume_step < 12, "the kill should land in the middle of training"
    assert_left_running_by(out, cell.hash, pid)

    lines = []
    (row,) = run_grid(TINY, "smoke", out, progress=False, log=lines.append)
    assert "1 interrupted (resumed from their checkpoints)" in lines[0]
    assert trainer_starts == [resume_step]  # not from step 0
    assert row["status"] == "done" and row["attempts"] == 2
    m = row["metrics"]
    assert m["train_images"] == 96 and m["num_generated"] == 8 and 0 <= m["kid_mean"] < 10
    reference = tmp_path / "uninterrupted"
    Trainer(cell.config, reference, progress=False).run()
    assert_same_state(
        load_checkpoint(list_checkpoints(reference / "checkpoints")[-1]),
        load_checkpoint(list_checkpoints(checkpoints)[-1]),
    )
    cell_json = json.loads((out / "cells" / cell.hash / "cell.json").read_text())
    assert cell_json["hash"] == cell.hash and cell_json["spec"] == json.loads(json.dumps(cell.spec))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:torch-fidelity's Inception weights could not be downloaded")
def test_a_runner_killed_while_evaluating_only_evaluates_again(tmp_path, trainer_starts):
    """Killed after training, during the FID evaluation: the rerun trains no further step."""
    out = tmp_path / "grid"
    (cell,) = expand(TINY_FID, "smoke")
    run = out / "cells" / cell.hash

    def evaluating() -> bool:
        if not checkpoint_path(run / "checkpoints", 12).exists():  # the last one
            return False
        time.sleep(2)  # into sampling / feature extraction / the FID's matrix square roots
        return True

    pid = run_and_kill(TINY_FID, out, until=evaluating)
    assert not (run / "metrics.json").exists(), "the kill should land during the evaluation"
    assert_left_running_by(out, cell.hash, pid)
    (row,) = run_grid(TINY_FID, "smoke", out, progress=False, log=lambda s: None)
    assert trainer_starts == [12]
    assert row["status"] == "done" and row["attempts"] == 2
    assert row["metrics"]["fid"] > 0 and row["metrics"]["kid_mean"] is not None


# -- executors ------------------------------------------------------------------------------------
def test_submitit_local_round_trip(tmp_path, seed_log, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])  # jobs import this module
    lines = []
    opts = {"cluster": "local", "timeout_min": 5}
    rows = run_grid(SEEDS, "smoke", tmp_path / "grid", rows=["s0", "s1"], executor="slurm",
                    executor_options=opts, progress=False, log=lines.append)  # fmt: skip
    assert [r["status"] for r in rows] == ["done", "done"] and seed_log() == [0, 1]
    assert any(line.startswith("submitted 2 local job(s)") for line in lines)
    pids = {int(r["owner"].split(":")[1]) for r in rows}
    assert len(pids) == 2 and os.getpid() not in pids  # each job ran its own cell
    assert list((tmp_path / "grid" / "submitit").glob("*/*_log.out"))
    lines.clear()
    rows = run_grid(SEEDS, "smoke", tmp_path / "grid", rows=["s0", "s1"], executor="slurm",
                    executor_options=opts, progress=False, log=lines.append)  # fmt: skip
    assert not any("submitted" in line for line in lines) and seed_log() == [0, 1]
    with pytest.raises(ValueError, match="submitit rejected the executor options"):
        run_grid(SEEDS, "smoke", tmp_path / "grid", executor="slurm", progress=False,
                 executor_options={**opts, "no_such_option": 1}, log=lines.append)  # fmt: skip


@pytest.mark.skipif(bool(__import__("shutil").which("sbatch")), reason="SLURM is present")
def test_slurm_without_slurm_says_how_to_run_locally(tmp_path):
    with pytest.raises(ValueError, match=r"found no SLURM here.*cluster=local"):
        run_grid(SEEDS, "smoke", tmp_path / "grid", executor="slurm", progress=False,
                 log=lambda s: None)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_executor_without_gpus_is_a_clear_error(tmp_path, capsys):
    argv = ["count", "--out", str(tmp_path), "--executor", "gpus", "--no-progress"]
    assert ablate_main(argv, tables=FAKE_TABLES) == 2
    assert "--executor gpus needs CUDA GPUs" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpus_executor_gives_each_worker_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])
    rows = run_grid(COUNT, "smoke", tmp_path / "grid", executor="gpus", progress=False)
    assert [r["status"] for r in rows] == ["done"] * 4
    assert all(r["device"].startswith("cuda:0 (") for r in rows)  # each sees its GPU as 0


@pytest.mark.filterwarnings("ignore:torch-fidelity's Inception weights could not be downloaded")
def test_torchrun_executor_trains_with_two_processes(tmp_path):
    (row,) = run_grid(
        TINY, "smoke", tmp_path / "grid", executor="torchrun", workers=2, progress=False
    )
    assert row["status"] == "done", row["error"]
    assert row["device"].startswith("torchrun 2 x ") and row["metrics"]["num_generated"] == 8
    run = tmp_path / "grid" / "cells" / row["hash"]
    state = load_checkpoint(list_checkpoints(run / "checkpoints")[-1])
    assert state["step"] == 12 and len(state["rng"]) == 2  # trained by two processes
    assert "torch.distributed.run" in (run / "torchrun.log").read_text()


# -- command line ---------------------------------------------------------------------------------
def test_dry_run_json_prints_every_cell_in_full(capsys):
    argv = ["params", "--dry-run", "--json", "--set", "train.lr=0.01", "--rows", "w64"]
    assert ablate_main(argv, tables=FAKE_TABLES) == 0
    cells = json.loads(capsys.readouterr().out)
    expected = expand(COUNT, "smoke", rows=["w64"], overrides=["train.lr=0.01"])
    assert [c["hash"] for c in cells] == [c.hash for c in expected]
    assert [(c["row"], c["column"], c["kind"]) for c in cells] == [
        ("w64", "d1", "compute"), ("w64", "d2", "compute")
    ]  # fmt: skip
    assert cells[0]["spec"]["config"]["train"]["lr"] == 0.01
    assert cells[0]["spec"]["config"]["model"]["width"] == 64


def test_list_names_every_table_and_preset(capsys):
    assert ablate_main(["--list"], tables=FAKE_TABLES) == 0
    out = capsys.readouterr().out
    assert "table 101: count (also params) - parameter count" in out
    assert "--scale smoke: 2 rows x 2 columns = 4 cells" in out
    assert "table 103: tiny - a tiny trained cell" in out and "trained + evaluated" in out
    import sdiff.ablations as registry

    if hasattr(registry, "TABLES"):  # the real registry, through `sdiff ablate`
        from sdiff.cli import main

        assert main(["ablate", "--list"]) == 0
        out = capsys.readouterr().out
        assert all(f"table {n}:" in out for n in registry.TABLES)


def test_a_run_through_the_command_line_prints_its_results(tmp_path, seed_log, capsys):
    argv = ["seeds", "--out", str(tmp_path / "grid"), "--rows", "s1", "s2", "--no-progress"]
    assert ablate_main(argv, tables=FAKE_TABLES) == 0
    out = capsys.readouterr().out
    assert "2 done, 0 failed" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("row ", "s1 ", "s2 "))]
    assert [line[:4] for line in table] == [
        ["row", "column", "status", "seed"], ["s1", "all", "done", "1"], ["s2", "all", "done", "2"]
    ]  # fmt: skip
    assert (tmp_path / "grid" / "results.sqlite").exists()
    assert sorted(p.name for p in (tmp_path / "grid" / "cells").iterdir()) == sorted(
        c.hash for c in expand(SEEDS, "smoke", rows=["s1", "s2"])
    )
