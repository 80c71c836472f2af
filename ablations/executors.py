"""Executors: who runs a grid's cells, and where. All of them work the same way against the
results store (``ablations.store``): claim a cell, run it in ``<out>/cells/<hash>/`` with a
heartbeat thread refreshing the claim, record the result or the traceback. The store's atomic
claim is what keeps several workers (or runners, or SLURM jobs) from running a cell twice.

- ``local``: in this process, one cell after another (``workers=1``), or ``workers`` worker
  processes (multiprocessing, spawn) that each claim and run cells until none is left;
- ``gpus``: one such worker per visible GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``);
- ``torchrun``: each cell trained by ``torchrun --standalone --nproc_per_node=N -m sdiff train``
  in its folder, then evaluated here; the store bookkeeping stays in this process;
- ``slurm``: one submitit job per cell, each claiming and running its cell against the shared
  store (``cluster=local`` in the executor options runs the jobs as local processes instead).

Workers rebuild the grid from a ``GridJob`` (table, scale, rows, overrides), so a table whose
functions are lambdas travels by its registry name and is looked up again on the other side.

A cell runs only while its claim holds. When the heartbeat finds the claim taken over (this
runner was stopped or stalled long enough for another to take the cell), the cell is stopped
at its next step boundary (training step or sampling batch), before that step writes anything,
and its outcome is "lost". A runner that takes a cell over waits, before it starts, until the
cell folder's lock (``sdiff.util.runlock``) is free, that is until the previous owner has stopped
or died: two runners never write into one cell folder.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdiff.ablations import cell as cell_mod
from sdiff.ablations.grid import Cell, Table, expand
from sdiff.ablations.store import (
    LIVE_GRACE_S,
    STALE_AFTER_S,
    STORE_NAME,
    OwnershipLost,
    ResultsStore,
    StoreError,
    new_owner,
    owner_state,
    retire_owner,
)
from sdiff.ablations.store import (
    cell_dir as grid_cell_dir,
)
from sdiff.util.errors import RunFolderBusy, StopRequested
from sdiff.util.files import atomic_write_text
from sdiff.util.provenance import device_label, git_sha, provenance
from sdiff.util.runlock import RunLock

__all__ = ["EXECUTORS", "GridJob", "TorchrunExecute", "run_claimed", "work_loop"]

Progress = Callable[[], None]
Log = Callable[[str], None]


@dataclass(frozen=True)
class GridJob:
    """Everything a worker needs to find, claim and run a grid's cells (picklable)."""

    table: Table | str  # the Table, or its registry name when the Table cannot be pickled
    scale: str
    rows: tuple[str, ...] | None
    overrides: tuple[str, ...]
    out_dir: str
    seeds: tuple[int, ...] | None = None
    retry_failed_before: float | None = None  # retry cells that failed before this time
    device: str | None = None
    progress: bool = False  # the cell's own training bar
    heartbeat_s: float = 30.0
    stale_after_s: float = STALE_AFTER_S
    live_grace_s: float = LIVE_GRACE_S
    poll_s: float = 1.0  # how often a waiting runner looks again
    journal: str = "wal"
    git_sha: str | None = field(default_factory=git_sha)  # the runner's, for every result row

    def resolve(self) -> tuple[Table, list[Cell]]:
        table = self.table
        if isinstance(table, str):
            from sdiff.ablations import get_table

            table = get_table(table)
        rows = list(self.rows) if self.rows else None
        seeds = list(self.seeds) if self.seeds else None
        return table, expand(
            table, self.scale, rows=rows, overrides=list(self.overrides), seeds=seeds
        )

    def open_store(self) -> ResultsStore:
        return ResultsStore(
            Path(self.out_dir) / STORE_NAME,
            stale_after_s=self.stale_after_s,
            live_grace_s=self.live_grace_s,
            journal=self.journal,
        )

    def cell_dir(self, hash: str) -> Path:
        return grid_cell_dir(self.out_dir, hash)

    def for_workers(self) -> GridJob:
        """This job with the table as its registry name if the Table itself does not pickle
        (lambdas or local functions in it)."""
        if isinstance(self.table, str):
            return self
        try:
            pickle.dumps(self.table)
            return self
        except Exception as err:
            try:
                from sdiff.ablations import get_table

                registered = get_table(str(self.table.number)) is self.table
            except Exception:
                registered = False
            if not registered:
                raise ValueError(
                    f"table {self.table.number} cannot be sent to worker processes ({err}); "
                    f"define its functions at module level or register it in "
                    f"sdiff.ablations.TABLES"
                ) from err
            return replace(self, table=str(self.table.number))


# -- what each result row records about where it ran (sdiff.util.provenance) ---------------------
@functools.cache
def versions() -> dict[str, str | None]:
    """The versions of this process: sdiff, python, torch, CUDA, triton."""
    p = provenance()
    return {"sdiff": p.sdiff, "python": p.python, "torch": p.torch, "cuda": p.cuda,
            "triton": p.triton}  # fmt: skip


def describe_device(device: str | None) -> str:
    """``cuda:0 (NVIDIA H200)`` or ``cpu (x86_64, 2 threads)``: the device a cell ran on."""
    import torch

    from sdiff.util.devices import resolve_device

    d = resolve_device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        index = d.index if d.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({device_label(torch.device('cuda', index))})"
    return device_label(d) if d.type == "cpu" else str(d)


# -- one claimed cell ----------------------------------------------------------------------------
@contextlib.contextmanager
def _heartbeat(
    store: ResultsStore, hash: str, owner: str, every_s: float, lost: threading.Event, log: Log
) -> Iterator[None]:
    """Refresh the claim every ``every_s`` seconds from a thread (its own connection); set
    ``lost`` when another runner has taken the cell over."""
    stop = threading.Event()

    def beat() -> None:
        warned = False
        try:
            while not stop.wait(every_s):
                try:
                    store.heartbeat(hash, owner)
                except OwnershipLost as err:
                    log(f"{err}; stopping the cell at its next step")
                    lost.set()
                    return
                except StoreError as err:  # e.g. a full disk: keep trying, say it once
                    if not warned:
                        print(f"warning: heartbeat: {err}", file=sys.stderr)
                        warned = True
        finally:
            store.close()  # this thread's connection

    thread = threading.Thread(target=beat, name=f"heartbeat-{hash}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _write_cell_json(run_dir: Path, cell: Cell) -> None:
    """The cell's identity next to its run (config.json there is the trainer's)."""
    record = {
        "hash": cell.hash,
        "table": cell.table,
        "grid": cell.grid,
        "scale": cell.scale,
        "row": cell.row,
        "column": cell.column,
        "axes": dict(cell.axes),
        "seed": cell.seed,
        "kind": cell.kind,
        "spec": cell.spec,
    }
    atomic_write_text(run_dir / "cell.json", json.dumps(record, indent=2, sort_keys=True) + "\n")


Execute = Callable[..., dict[str, Any]]


def _wait_for_folder(run_dir: Path, lost: threading.Event, log: Log, poll_s: float) -> None:
    """Return once no other process holds the cell folder (a runner whose claim was taken over
    may still be finishing its step, or be stopped); ``StopRequested`` if this runner loses
    the claim meanwhile."""
    said = False
    while True:
        try:
            with RunLock(run_dir, "sdiff ablate"):
                return
        except RunFolderBusy as busy:
            if not said:
                log(f"waiting for the cell folder: {busy}")
                said = True
        if lost.wait(poll_s):
            raise StopRequested(f"{run_dir}: the claim was lost while waiting for the folder")


def run_claimed(
    store: ResultsStore,
    owner: str,
    cell: Cell,
    table: Table,
    job: GridJob,
    execute: Execute | None = None,
    log: Log = print,
) -> str:
    """Run a cell ``owner`` has claimed and record the outcome: "done", "failed", or "lost"
    (another runner took the claim over: the cell stops at its next step and the other
    runner's result is the one kept). ``execute(cell, table, run_dir, progress=, device=,
    should_stop=)`` must end with ``StopRequested`` once ``should_stop()`` is true. A store
    that cannot be written (full disk) raises ``StoreError``; an interrupt gives the claim
    back."""
    execute = execute or cell_mod.execute
    run_dir = job.cell_dir(cell.hash)
    where = {"device": _describe(execute, job), "versions": versions(), "git_sha": job.git_sha}
    start = time.perf_counter()
    lost = threading.Event()
    try:
        with _heartbeat(store, cell.hash, owner, job.heartbeat_s, lost, log):
            _wait_for_folder(run_dir, lost, log, job.poll_s)
            _write_cell_json(run_dir, cell)
            metrics = execute(cell, table, run_dir, progress=job.progress, device=job.device,
                              should_stop=lost.is_set)  # fmt: skip
    except StopRequested:
        log(f"cell {cell.hash} ({cell.row} / {cell.column}): another runner took it over; "
            f"stopped here (its result will be that runner's)")  # fmt: skip
        return "lost"
    except Exception:
        error = traceback.format_exc()
        last = error.strip().splitlines()[-1]
        log(f"cell {cell.hash} ({cell.row} / {cell.column}) failed: {last}")
        try:
            store.fail(cell.hash, owner, error, wall_s=time.perf_counter() - start, **where)
        except OwnershipLost as err:
            log(f"warning: {err}")
            return "lost"
        return "failed"
    except BaseException:  # KeyboardInterrupt, SystemExit: hand the cell back, then stop
        with contextlib.suppress(StoreError):
            store.release(cell.hash, owner)
        raise
    try:
        store.finish(cell.hash, owner, metrics, wall_s=time.perf_counter() - start, **where)
    except OwnershipLost as err:
        log(f"warning: {err}")
        return "lost"
    return "done"


def _describe(execute: Execute, job: GridJob) -> str:
    nproc = getattr(execute, "nproc", None)
    if nproc:
        return f"torchrun {nproc} x {describe_device(None)}"
    return describe_device(job.device)


def work_loop(
    job: GridJob,
    *,
    execute: Execute | None = None,
    wait: bool = False,
    on_progress: Progress | None = None,
    log: Log = print,
) -> Counter:
    """Claim and run the grid's cells until none is left for this worker. With ``wait``, also
    wait for cells other live runners hold, and take over those whose runner dies. Each cell
    is attempted at most once per call."""
    table, cells = job.resolve()
    by_hash = {c.hash: c for c in cells}
    store = job.open_store()
    owner = new_owner()
    counts: Counter = Counter()
    tried: set[str] = set()
    said_waiting = False
    try:
        while True:
            todo = [h for h in by_hash if h not in tried]
            h = store.claim_next(todo, owner, failed_before=job.retry_failed_before)
            if h is None:
                busy = [r for r in store.rows(hashes=todo) if r["status"] == "running"]
                if not (wait and busy):
                    break
                if not said_waiting:
                    owners = "; ".join(sorted({owner_state(r["owner"], r["heartbeat"])
                                               for r in busy}))  # fmt: skip
                    log(f"waiting for {len(busy)} cell(s) other runners hold ({owners}); a "
                        f"stopped runner (Ctrl-Z) of this host keeps its cells "
                        f"{job.live_grace_s:.0f} s: continue it (fg) or end it")  # fmt: skip
                    said_waiting = True
                if on_progress:
                    on_progress()
                time.sleep(job.poll_s)
                continue
            tried.add(h)
            counts[run_claimed(store, owner, by_hash[h], table, job, execute, log)] += 1
            if on_progress:
                on_progress()
    finally:
        retire_owner(owner)
        store.close()
    return counts


# -- local and gpus: worker processes ------------------------------------------------------------
def _worker_main(job: GridJob) -> None:
    work_loop(job, log=lambda text: print(f"[worker {os.getpid()}] {text}", flush=True))


def _run_workers(
    job: GridJob, envs: list[dict[str, str]], on_progress: Progress, log: Log, poll_s: float = 0.5
) -> None:
    """One spawned process per entry of ``envs`` (extra environment variables), each running
    ``work_loop``; returns when all have exited."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no forked torch/CUDA state, no forked locks
    job = replace(job.for_workers(), progress=False)  # one terminal, several trainers: no bars
    procs = []
    for env in envs:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # a spawned child takes its environment at start
        try:
            p = ctx.Process(target=_worker_main, args=(job,), name=f"ablate-worker-{len(procs)}")
            p.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        procs.append(p)
    try:
        while any(p.is_alive() for p in procs):
            on_progress()
            time.sleep(poll_s)
    except BaseException:
        for p in procs:
            p.terminate()  # SIGTERM: their cells stay claimed by dead owners, resumed next run
        raise
    finally:
        for p in procs:
            p.join()
    for p, env in zip(procs, envs, strict=True):
        if p.exitcode:
            where = f" ({', '.join(f'{k}={v}' for k, v in env.items())})" if env else ""
            log(f"worker {p.name}{where} exited with code {p.exitcode}")


def run_local(
    job: GridJob, *, workers: int | None, on_progress: Progress, log: Log, options: dict[str, Any]
) -> None:
    _no_options("local", options)
    workers = workers or 1
    if workers < 1:
        raise ValueError(f"--workers must be >= 1; got {workers}")
    if workers > 1:
        _run_workers(job, [{} for _ in range(workers)], on_progress, log)
    # here: everything with one worker; after several, what they left (a worker that died
    # leaves its cell to a dead owner) and cells other runners still hold
    work_loop(job, wait=True, on_progress=on_progress, log=log)


def visible_gpus() -> list[str]:
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise ValueError(
            "--executor gpus needs CUDA GPUs, but torch sees none (torch.cuda.device_count() "
            "is 0); use --executor local on this machine"
        )
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [x.strip() for x in listed.split(",") if x.strip()] if listed else []
    return ids[:n] if ids else [str(i) for i in range(n)]


def run_gpus(
    job: GridJob, *, workers: int | None, on_progress: Progress, log: Log, options: dict[str, Any]
) -> None:
    _no_options("gpus", options)
    gpus = visible_gpus()
    if workers and workers > len(gpus):
        raise ValueError(f"--workers {workers} but only {len(gpus)} GPU(s) are visible: {gpus}")
    gpus = gpus[: workers or len(gpus)]
    log(f"{len(gpus)} worker(s), one per GPU: CUDA_VISIBLE_DEVICES={', '.join(gpus)}")
    job = replace(job, device=job.device or "cuda")
    _run_workers(job, [{"CUDA_VISIBLE_DEVICES": g} for g in gpus], on_progress, log)
    work_loop(replace(job, device=None), wait=True, on_progress=on_progress, log=log)


# -- torchrun: multi-GPU training per cell, bookkeeping here -------------------------------------
def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this runner dies (Linux), so a killed runner
    does not leave a training run going on in a folder the next runner resumes."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def evaluate_trained(
    cell: Cell,
    run_dir: Path,
    device: str | None,
    train_s: float,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """``cell.execute``'s evaluation, for a run trained by other processes (a checkpoint
    written by N processes cannot be resumed by a one-process Trainer)."""
    from sdiff.util.devices import resolve_device

    device = str(resolve_device(device))
    start = time.perf_counter() - train_s
    return cell_mod.evaluate_cell(cell, run_dir, device=device, train_s=train_s, start=start,
                                  should_stop=should_stop)  # fmt: skip


class TorchrunExecute:
    """``cell.execute`` with the training done by ``torchrun -m sdiff train`` in the cell's
    folder (its output in ``torchrun.log`` there), the evaluation in this process."""

    def __init__(self, nproc: int) -> None:
        self.nproc = nproc

    def command(self, config_path: Path, run_dir: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={self.nproc}",
            "-m",
            "sdiff",
            "train",
            "--config",
            str(config_path),
            "--out",
            str(run_dir),
            "--no-progress",
        ]

    def __call__(
        self,
        cell: Cell,
        table: Table,
        run_dir: Path,
        *,
        progress: bool = False,
        device: str | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> dict[str, Any]:
        if cell.kind == "compute":
            return cell_mod.execute(cell, table, run_dir, progress=progress, device=device,
                                    should_stop=should_stop)  # fmt: skip
        from sdiff.training.config import to_json

        config_path = run_dir / "config.json"  # what the trainer writes and checks on resume
        if not config_path.exists():
            atomic_write_text(config_path, to_json(cell.config) + "\n")
        log_path = run_dir / "torchrun.log"
        start = time.perf_counter()
        with open(log_path, "a") as out:
            command = self.command(config_path, run_dir)
            out.write(f"\n$ {' '.join(command)}\n")
            out.flush()
            proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
            )
            while True:
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    if should_stop is not None and should_stop():
                        proc.terminate()  # its checkpoints so far stay for the new owner
                        proc.wait()
                        raise StopRequested(
                            f"torchrun training of cell {cell.hash} stopped"
                        ) from None
        if rc:
            raise RuntimeError(
                f"torchrun training of cell {cell.hash} exited with code {rc}; the end of "
                f"{log_path}:\n{_tail(log_path)}"
            )
        return evaluate_trained(cell, run_dir, device, time.perf_counter() - start, should_stop)


def run_torchrun(
    job: GridJob, *, workers: int | None, on_progress: Progress, log: Log, options: dict[str, Any]
) -> None:
    _no_options("torchrun", options)
    if workers is None:
        import torch

        workers = max(1, torch.cuda.device_count())
    if workers < 1:
        raise ValueError(f"--workers (processes per cell) must be >= 1; got {workers}")
    log(f"each cell trained by torchrun with {workers} process(es), evaluated here")
    work_loop(job, execute=TorchrunExecute(workers), wait=True, on_progress=on_progress, log=log)


# -- slurm: one submitit job per cell -----------------------------------------------------------
def slurm_cell_job(job: GridJob, hash: str) -> str:
    """A SLURM job's body: claim ``hash`` (waiting while another live runner holds it), run it,
    record it. Returns the cell's final status."""
    table, cells = job.resolve()
    cell = next((c for c in cells if c.hash == hash), None)
    if cell is None:
        raise ValueError(f"cell {hash} is not in the grid any more (did the code change?)")
    store = job.open_store()
    owner = new_owner()
    try:
        while True:
            if store.claim_next([hash], owner, failed_before=job.retry_failed_before):
                return run_claimed(store, owner, cell, table, job)
            row = store.get(hash)
            if row["status"] != "running":
                return row["status"]  # done, or failed and not to be retried
            if not store.owner_alive(row):
                continue
            time.sleep(min(job.heartbeat_s, 30.0))
    finally:
        retire_owner(owner)
        store.close()


SLURM_DEFAULTS = {"timeout_min": 24 * 60}


def run_slurm(
    job: GridJob,
    *,
    workers: int | None,
    on_progress: Progress,
    log: Log,
    options: dict[str, Any],
    poll_s: float = 2.0,
) -> None:
    try:
        import submitit
    except ImportError as err:
        raise ValueError("--executor slurm needs submitit: pip install 'sdiff[slurm]'") from err
    options = dict(options)
    cluster = options.pop("cluster", None)
    if cluster is None:
        if submitit.AutoExecutor.which() != "slurm":
            raise ValueError(
                "--executor slurm found no SLURM here (no sbatch); to run the jobs as local "
                "processes through submitit, pass --executor-opt cluster=local"
            )
        cluster = "slurm"
    folder = Path(job.out_dir) / "submitit"
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
        table_number = job.table if isinstance(job.table, str) else job.table.number
        params = {**SLURM_DEFAULTS, "name": f"sdiff-ablate-{table_number}-{job.scale}"}
        if workers:
            params["slurm_array_parallelism"] = workers
        executor.update_parameters(**{**params, **options})
    except (NameError, AssertionError, TypeError, ValueError) as err:
        raise ValueError(f"submitit rejected the executor options {options}: {err}") from err

    job = replace(job.for_workers(), progress=False)
    _, cells = job.resolve()
    store = job.open_store()
    todo = []
    for row in store.rows(hashes=[c.hash for c in cells]):
        retry = row["status"] == "failed" and job.retry_failed_before is not None
        if row["status"] in ("pending", "running") or retry:
            todo.append(row["hash"])  # running: a live holder makes the job wait, then skip
    store.close()
    if not todo:
        return
    jobs = executor.map_array(slurm_cell_job, [job] * len(todo), todo)
    log(f"submitted {len(jobs)} {cluster} job(s) ({jobs[0].job_id} ...); logs in {folder}")
    try:
        while not all(j.done() for j in jobs):
            on_progress()
            time.sleep(poll_s)
    except BaseException:
        for j in jobs:
            with contextlib.suppress(Exception):
                j.cancel(check=False)
        raise
    on_progress()
    for j, h in zip(jobs, todo, strict=True):
        try:
            j.result()
        except Exception as err:  # the job itself died (cell errors are recorded, not raised)
            log(f"job {j.job_id} for cell {h} failed: {str(err).strip().splitlines()[-1]}")


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"--executor {name} takes no --executor-opt; got {sorted(options)}")


EXECUTORS: dict[str, Callable[..., None]] = {
    "local": run_local,
    "gpus": run_gpus,
    "torchrun": run_torchrun,
    "slurm": run_slurm,
}
