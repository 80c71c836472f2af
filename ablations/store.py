"""The results store: one SQLite file per ablation output folder, one row per cell.

    store = ResultsStore("runs/ablate/table2-smoke/results.sqlite")
    store.add(cells)                              # pending rows; existing rows untouched
    owner = new_owner()                           # "host:pid:token"
    if store.claim(cell.hash, owner):             # atomic (BEGIN IMMEDIATE)
        ...                                       # store.heartbeat(cell.hash, owner) meanwhile
        store.finish(cell.hash, owner, metrics, wall_s=..., device=..., versions=...,
                     git_sha=...)                 # sdiff.util.provenance.git_sha()

Append-safe. Rows are only ever inserted (``INSERT OR IGNORE``: a cell already in the store is
never touched by ``add``) and then moved through ``pending -> running -> done | failed``; every
write is one transaction, so a crash, a kill or a full disk leaves every committed row as it
was. Several processes (the runners of ``sdiff ablate``, their workers, SLURM jobs) share one
store: WAL journal (readers never block the writer), a busy timeout, and ``BEGIN IMMEDIATE``
around each read-decide-write so that two claimants of one cell cannot both win.

Claiming (``claim``/``claim_next``): a ``pending`` cell can be claimed; a ``failed`` one only
with ``retry_failed``; a ``done`` one never; a ``running`` one only when its owner is gone. An
owner on this host is gone when its process no longer exists (or, for an owner inside this very
process, its runner has ended); while its process exists, a stale heartbeat alone does not
count, since the process may only be stopped (Ctrl-Z, a paused VM), until the heartbeat is
older than ``live_grace_s`` (hours). An owner on another host is gone when its heartbeat is
older than ``stale_after_s``. ``heartbeat``, ``finish``, ``fail`` and ``release`` take effect
only for the current owner, so a runner whose claim was taken over cannot overwrite the new
owner's result; its heartbeat learns of the loss and its cell stops at the next step
(``ablations.executors``), and the cell folder's own lock (``sdiff.util.runlock``) keeps the new
owner out of the folder until the old one has let go of it.

The file carries a schema version in its ``meta`` table. Version 2 added four nullable columns
(``grid``, ``axes``, ``seed``, ``source``: the grid a cell was declared in, its extra axes, its
seed, and the store a cached result was copied from); a version-1 store is upgraded in place by
adding them, in one transaction that changes no existing value. A store of any other version is
refused with both versions named, never migrated or overwritten.

A cell done in another store (``sdiff ablate --cache``, or any store under the same root) is
``adopt``-ed: its row is inserted ``done`` with the other store's metrics, wall time, device,
versions and SHA, and ``source`` naming that store.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sdiff.util.errors import EXIT_BUSY, EXIT_IO, EXIT_USAGE, is_disk_full
from sdiff.util.runlock import pid_alive

__all__ = [
    "SCHEMA_VERSION",
    "STATUSES",
    "STORE_NAME",
    "OwnershipLost",
    "ResultsStore",
    "StoreError",
    "cell_dir",
    "new_owner",
    "owner_alive",
    "owner_state",
    "read_only_rows",
    "retire_owner",
]

SCHEMA_VERSION = 2
STALE_AFTER_S = 600.0  # a heartbeat this old means a remote owner is gone
LIVE_GRACE_S = 3600.0  # a local owner whose process exists: only a heartbeat this old
STORE_NAME = "results.sqlite"  # a grid folder: STORE_NAME beside cells/<hash>/ run folders
STATUSES = ("pending", "running", "done", "failed")

_SCHEMA = """
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
    heartbeat REAL,                  -- unix time, refreshed while running
    grid TEXT,                       -- the grid's slug: table2, or a grid file's name (v2)
    axes TEXT,                       -- JSON {axis: value} of axes beyond row and column (v2)
    seed INTEGER,                    -- train.seed of the cell's config (v2)
    source TEXT                      -- a cached result: the store it was copied from (v2)
);
CREATE INDEX IF NOT EXISTS cells_by_table ON cells (table_number, scale);
"""

_JSON_FIELDS = ("spec", "metrics", "versions", "axes")
# columns version 2 added to version 1 (all nullable): ``_upgrade_v1`` adds them
_V2_COLUMNS = (("grid", "TEXT"), ("axes", "TEXT"), ("seed", "INTEGER"), ("source", "TEXT"))

# Owners (runners) alive in this process: a claim whose owner names this process is live only
# while its runner is (a runner that raised and ended left its claim behind).
_LIVE_TOKENS: set[str] = set()
_HOST = socket.gethostname()


def cell_dir(grid_dir: str | os.PathLike[str], hash: str) -> Path:
    """The run folder of cell ``hash`` in the grid folder holding its store."""
    return Path(grid_dir) / "cells" / hash


class StoreError(RuntimeError):
    """The results store cannot be opened or written (named in the message)."""

    def __init__(self, message: str, exit_code: int = EXIT_IO) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # sdiff.util.errors: a file-system failure unless said otherwise


class OwnershipLost(StoreError):
    """A write by a runner that no longer owns the cell (another runner took it over)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_BUSY)


def new_owner() -> str:
    """A fresh owner id for one runner or worker: ``host:pid:token``."""
    token = uuid.uuid4().hex[:8]
    _LIVE_TOKENS.add(token)
    return f"{_HOST}:{os.getpid()}:{token}"


def retire_owner(owner: str) -> None:
    """The runner that used ``owner`` has ended: its leftover claims become claimable."""
    _LIVE_TOKENS.discard(owner.rsplit(":", 1)[-1])


def owner_alive(
    owner: str | None,
    heartbeat: float | None,
    stale_after_s: float = STALE_AFTER_S,
    live_grace_s: float = LIVE_GRACE_S,
) -> bool:
    """Whether a running cell's claim still stands (see the module docstring)."""
    if not owner or heartbeat is None:
        return False
    age = time.time() - heartbeat
    host, _, rest = owner.partition(":")
    pid_text, _, token = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return age <= stale_after_s  # another machine: only its heartbeat tells
    if int(pid_text) == os.getpid():
        return token in _LIVE_TOKENS and age <= live_grace_s
    return pid_alive(int(pid_text)) and age <= live_grace_s


def owner_state(owner: str | None, heartbeat: float | None) -> str:
    """A few words on a claim's owner for messages: its pid, and how old its heartbeat is."""
    if not owner or heartbeat is None:
        return f"owner {owner}"
    age = time.time() - heartbeat
    return f"owner {owner}, last heartbeat {age:.0f} s ago"


def _is_disk_full(err: BaseException, path: Path) -> bool:
    """SQLITE_FULL, or an I/O error (a WAL store on a full disk fails to grow its shared-memory
    file: SQLITE_IOERR_SHMSIZE, "disk I/O error") where the disk has no space left."""
    name = getattr(err, "sqlite_errorname", "")
    if name == "SQLITE_FULL" or "disk is full" in str(err):
        return True
    return (name.startswith("SQLITE_IOERR") or "disk I/O error" in str(err)) and is_disk_full(path)


class _Connection(sqlite3.Connection):
    """A plain sqlite3 connection; a Python subclass so tests can patch ``execute``."""


class ResultsStore:
    """One SQLite results file shared by every runner of a grid (see the module docstring).

    ``stale_after_s``: a running cell of another host whose heartbeat is older than this is
    taken to be abandoned (runners refresh it every ``heartbeat_s`` of the runner, 30 s by
    default), so it must comfortably exceed the heartbeat interval. ``live_grace_s``: the same
    for an owner on this host whose process still exists (stopped, not dead): much longer.
    ``journal``: ``"wal"`` (default) for processes on one machine; ``"delete"`` (a rollback
    journal) for a store on a network filesystem shared by several machines, where WAL's shared
    memory does not work.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        stale_after_s: float = STALE_AFTER_S,
        live_grace_s: float = LIVE_GRACE_S,
        busy_timeout_s: float = 60.0,
        journal: str = "wal",
    ) -> None:
        if journal not in ("wal", "delete"):
            raise ValueError(f"journal must be 'wal' or 'delete'; got {journal!r}")
        if live_grace_s < stale_after_s:
            raise ValueError(
                f"live_grace_s ({live_grace_s}) must be at least stale_after_s ({stale_after_s})"
            )
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.live_grace_s = live_grace_s
        self.busy_timeout_s = busy_timeout_s
        self.journal = journal
        self._local = threading.local()  # one connection per thread (heartbeat thread)
        if not self.path.parent.is_dir():
            self.path.parent.mkdir(parents=True)
        try:
            self._init_schema()
        except BaseException:
            self.close()
            raise

    # -- connections and transactions ----------------------------------------------------
    def _open_connection(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=self.busy_timeout_s, isolation_level=None, factory=_Connection
        )
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        conn.execute("PRAGMA synchronous = FULL")  # a committed row survives a power cut
        return conn

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._open_connection()
            except sqlite3.OperationalError as err:
                raise self._error("opening", err) from err
            except sqlite3.DatabaseError as err:
                raise StoreError(
                    f"{self.path} is not a results store (sqlite: {err})", EXIT_USAGE
                ) from err
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``: the write lock is taken up front, so the
        reads inside it decide on data no one else can change before the commit)."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLITE_FULL has already rolled it back
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as err:
            raise self._error(what, err) from err
        except sqlite3.DatabaseError as err:
            raise StoreError(f"results store {self.path}: {what} failed: {err}") from err

    def _error(self, what: str, err: sqlite3.Error) -> StoreError:
        if _is_disk_full(err, self.path):
            return StoreError(
                f"results store {self.path}: {what} failed because the disk is full "
                f"(sqlite: {err}). Nothing was written by this attempt; results recorded "
                f"earlier are intact. Free some space and run again."
            )
        text = str(err)
        if "readonly" in text or "unable to open" in text:
            writable = os.access(self.path.parent, os.W_OK) and not _read_only(self.path.parent)
            if not writable:
                text += f" ({self.path.parent} cannot be written: a read-only folder?)"
        return StoreError(f"results store {self.path}: {what} failed: {text}")

    def _read(self, sql: str, params: Iterable[Any] = ()) -> list[dict[str, Any]]:
        try:
            cur = self._conn.execute(sql, tuple(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        except sqlite3.Error as err:
            raise StoreError(f"results store {self.path}: reading failed: {err}") from err

    def _init_schema(self) -> None:
        conn = self._conn
        try:
            mode = conn.execute(f"PRAGMA journal_mode = {self.journal}").fetchone()[0]
        except sqlite3.OperationalError as err:
            raise self._error("opening", err) from err
        except sqlite3.DatabaseError as err:
            raise StoreError(
                f"{self.path} is not a results store (sqlite: {err})", EXIT_USAGE
            ) from err
        if mode.lower() != self.journal:
            raise StoreError(
                f"results store {self.path}: cannot switch its journal to {self.journal!r} "
                f"(it is {mode!r}; another process probably has it open)"
            )
        with self._transaction("creating the schema") as conn:
            names = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            if names and "meta" not in names:
                raise StoreError(
                    f"{self.path} is an SQLite file but not a results store "
                    f"(tables {sorted(names)}, no meta table); use another --out folder",
                    EXIT_USAGE,
                )
            if not names:
                for statement in _SCHEMA.split(";\n"):  # not executescript: it would commit
                    if statement.strip():
                        conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("schema_version", str(SCHEMA_VERSION)), ("created_at", _now_text())],
                )
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row and row[0] == "1":
                _upgrade_v1(conn)
                row = (str(SCHEMA_VERSION),)
        found = row[0] if row else None
        if found != str(SCHEMA_VERSION):
            raise StoreError(
                f"results store {self.path} has schema version {found}, but this sdiff reads and "
                f"writes version {SCHEMA_VERSION}; it is neither migrated nor overwritten: use "
                f"the sdiff that wrote it, or another --out folder",
                EXIT_USAGE,
            )

    # -- writes ---------------------------------------------------------------------------
    def add(self, cells: Iterable[Any]) -> int:
        """Insert ``pending`` rows for cells not in the store yet; returns how many were new."""
        from sdiff.training.config import config_hash

        now = time.time()
        rows = [
            (
                c.hash,
                c.table,
                c.scale,
                c.row,
                c.column,
                c.kind,
                json.dumps(c.spec, sort_keys=True),
                config_hash(c.config),
                now,
                getattr(c, "grid", None) or f"table{c.table}",
                json.dumps(dict(getattr(c, "axes", ()) or ()), sort_keys=True),
                c.config.train.seed,
            )
            for c in cells
        ]
        with self._transaction("adding cells") as conn:
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO cells (hash, table_number, scale, row_name, column_name, "
                "kind, spec, config_hash, status, added_at, grid, axes, seed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
                rows,
            )
            return conn.total_changes - before

    def adopt(self, hash: str, done: dict[str, Any], source: str | os.PathLike[str]) -> bool:
        """Record cell ``hash`` (already added here) as done with the result of ``done``, the
        row of the same cell in another store (``source``), unless it is done or running here
        already. Returns whether it was adopted."""
        if done.get("status") != "done" or done.get("hash") != hash:
            raise ValueError(f"adopting cell {hash}: the source row is not that cell, done")
        with self._transaction("adopting a cached result") as conn:
            cur = conn.execute(
                "UPDATE cells SET status = 'done', metrics = ?, wall_s = ?, device = ?, "
                "versions = ?, git_sha = ?, started_at = ?, finished_at = ?, error = NULL, "
                "source = ? WHERE hash = ? AND status IN ('pending', 'failed')",
                (
                    json.dumps(done.get("metrics") or {}, sort_keys=True, default=str),
                    done.get("wall_s"),
                    done.get("device"),
                    json.dumps(done.get("versions") or {}, sort_keys=True),
                    done.get("git_sha"),
                    done.get("started_at"),
                    done.get("finished_at"),
                    str(source),
                    hash,
                ),
            )
            return cur.rowcount == 1

    def _claimable(
        self, row: dict[str, Any], retry_failed: bool, failed_before: float | None
    ) -> bool:
        status = row["status"]
        if status == "pending":
            return True
        if status == "failed":
            finished = row["finished_at"] or 0.0
            return retry_failed or (failed_before is not None and finished < failed_before)
        if status == "running":
            return not self.owner_alive(row)
        return False

    def owner_alive(self, row: dict[str, Any]) -> bool:
        """Whether the claim on a running row still stands (module docstring)."""
        return owner_alive(row["owner"], row["heartbeat"], self.stale_after_s, self.live_grace_s)

    def claim_next(
        self,
        hashes: Iterable[str],
        owner: str,
        *,
        retry_failed: bool = False,
        failed_before: float | None = None,
    ) -> str | None:
        """Claim the first claimable cell among ``hashes`` (in order) for ``owner``; None if
        there is none. Failed cells are claimable with ``retry_failed``, or when they failed
        before ``failed_before`` (a unix time: "what had failed when this run started", so a
        run retries each failed cell once, not again after it fails again)."""
        hashes = list(hashes)
        with self._transaction("claiming a cell") as conn:
            found = {}
            for i in range(0, len(hashes), 500):  # SQLite's bound-parameter limit
                part = hashes[i : i + 500]
                marks = ",".join("?" * len(part))
                cur = conn.execute(
                    "SELECT hash, status, owner, heartbeat, finished_at FROM cells "
                    f"WHERE hash IN ({marks})",
                    part,
                )
                for h, status, who, beat, finished in cur.fetchall():
                    found[h] = {
                        "status": status,
                        "owner": who,
                        "heartbeat": beat,
                        "finished_at": finished,
                    }
            for h in hashes:
                if h in found and self._claimable(found[h], retry_failed, failed_before):
                    now = time.time()
                    conn.execute(
                        "UPDATE cells SET status = 'running', owner = ?, heartbeat = ?, "
                        "started_at = ?, finished_at = NULL, attempts = attempts + 1 "
                        "WHERE hash = ?",
                        (owner, now, now, h),
                    )
                    return h
        return None

    def claim(self, hash: str, owner: str, *, retry_failed: bool = False) -> bool:
        """Atomically take ``hash`` for ``owner`` if the claiming rules allow it."""
        if self.get(hash) is None:
            raise KeyError(f"cell {hash} is not in results store {self.path}")
        return self.claim_next([hash], owner, retry_failed=retry_failed) == hash

    def _owned_update(self, what: str, hash: str, owner: str, sets: str, params: tuple) -> None:
        with self._transaction(what) as conn:
            cur = conn.execute(
                f"UPDATE cells SET {sets} WHERE hash = ? AND owner = ? AND status = 'running'",
                (*params, hash, owner),
            )
            if cur.rowcount == 1:
                return
            now = conn.execute("SELECT status, owner FROM cells WHERE hash = ?", (hash,)).fetchone()
        state = f"it is {now[0]}, owner {now[1]}" if now else "it is not in the store"
        raise OwnershipLost(
            f"results store {self.path}: {what} for cell {hash} refused: {owner} no longer "
            f"owns it ({state})"
        )

    def heartbeat(self, hash: str, owner: str) -> None:
        self._owned_update("heartbeat", hash, owner, "heartbeat = ?", (time.time(),))

    def finish(
        self,
        hash: str,
        owner: str,
        metrics: dict[str, Any],
        *,
        wall_s: float | None = None,
        device: str | None = None,
        versions: dict[str, str] | None = None,
        git_sha: str | None = None,
    ) -> None:
        """Record the result of a cell ``owner`` is running: status ``done``."""
        self._end(
            "recording the result", hash, owner, "done", "metrics",
            json.dumps(metrics, sort_keys=True, default=str), wall_s, device, versions, git_sha,
        )  # fmt: skip

    def fail(
        self,
        hash: str,
        owner: str,
        error: str,
        *,
        wall_s: float | None = None,
        device: str | None = None,
        versions: dict[str, str] | None = None,
        git_sha: str | None = None,
    ) -> None:
        """Record that the cell ``owner`` is running failed (``error``: the traceback)."""
        self._end("recording a failure", hash, owner, "failed", "error", error, wall_s, device,
                  versions, git_sha)  # fmt: skip

    def _end(self, what, hash, owner, status, field, value, wall_s, device, versions, git_sha):
        """The end of an attempt: ``status`` with its ``field`` (metrics, or error), the
        attempt's wall time, device, versions and SHA; a success also clears the old error."""
        clear = ", error = NULL" if status == "done" else ""
        self._owned_update(
            what,
            hash,
            owner,
            f"status = '{status}', {field} = ?, wall_s = ?, device = ?, versions = ?, "
            f"git_sha = ?{clear}, finished_at = ?, heartbeat = NULL",
            (value, wall_s, device, json.dumps(versions or {}, sort_keys=True), git_sha,
             time.time()),
        )  # fmt: skip

    def release(self, hash: str, owner: str) -> None:
        """Give a claim back (the runner was interrupted): ``pending`` again."""
        self._owned_update(
            "releasing a claim", hash, owner, "status = 'pending', heartbeat = NULL", ()
        )

    # -- reads ----------------------------------------------------------------------------
    def get(self, hash: str) -> dict[str, Any] | None:
        rows = self._read("SELECT * FROM cells WHERE hash = ?", (hash,))
        return _decode(rows[0]) if rows else None

    def rows(
        self,
        table: int | None = None,
        scale: str | None = None,
        hashes: Iterable[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows (JSON fields decoded) in the order the cells were added; ``hashes`` keeps its
        own order and skips hashes the store does not hold."""
        where, params = [], []
        if table is not None:
            where.append("table_number = ?")
            params.append(table)
        if scale is not None:
            where.append("scale = ?")
            params.append(scale)
        sql = "SELECT * FROM cells" + (f" WHERE {' AND '.join(where)}" if where else "")
        rows = [_decode(r) for r in self._read(sql + " ORDER BY rowid", params)]
        if hashes is None:
            return rows
        by_hash = {r["hash"]: r for r in rows}
        return [by_hash[h] for h in hashes if h in by_hash]

    def schema_version(self) -> int:
        return int(self._read("SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"])


def read_only_rows(
    path: str | os.PathLike[str], sql: str, params: Iterable[Any] = ()
) -> list[dict[str, Any]]:
    """Rows of ``sql`` on the SQLite file at ``path`` opened read-only: reading another
    grid's store (the cell cache, a dry run, an export) never creates, upgrades or locks it
    for writing. sqlite3.Error passes through (an unreadable file is the caller's call)."""
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
        cur = conn.execute(sql, tuple(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def _upgrade_v1(conn: sqlite3.Connection) -> None:
    """Version 1 -> 2 inside the caller's transaction: add the nullable columns, fill ``grid``
    and ``seed`` from what version 1 rows hold (their table and spec); nothing else changes."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(cells)")}
    for name, kind in _V2_COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE cells ADD COLUMN {name} {kind}")
    for hash, table, spec in conn.execute("SELECT hash, table_number, spec FROM cells").fetchall():
        seed = json.loads(spec).get("config", {}).get("train", {}).get("seed")
        conn.execute(
            "UPDATE cells SET grid = ?, seed = ?, axes = '{}' WHERE hash = ?",
            (f"table{table}", seed, hash),
        )
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    conn.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('upgraded_from_1_at', ?)", (_now_text(),)
    )


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_FIELDS:
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _now_text() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z")
