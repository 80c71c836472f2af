"""One cell cache across grids: a cell done in any results store under the same root (or in a
cache folder given by ``sdiff ablate --cache``) is not trained again.

A cell's hash is the hash of everything that decides its result (``ablations.grid``), so the
same hash in another store is the same experiment, whatever table or grid declared it. The
runner looks the grid's not-yet-done cells up here before it runs anything; a hit is
``adopt``-ed by the grid's own store (status ``done``, the other store's metrics, device, SHA
and wall time, ``source`` naming that store) and the cell's run folder is linked to the other
grid's (a relative symlink ``cells/<hash> -> ../../<other grid>/cells/<hash>``), so the
report's curves and sample grids are the ones the result came from, and the report says where
each cached cell came from.

Other stores are read through SQLite's read-only mode: looking never writes to, creates or
upgrades another grid's store. A hit whose own row was itself cached names the store that ran
it, not the one in between.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdiff.ablations.store import STORE_NAME, cell_dir, read_only_rows

__all__ = ["CachedCell", "find_cached", "link_cell", "search_stores"]


class CachedCell(dict):
    """A done row of another store (``store``: its path; ``run_dir``: its cell folder)."""

    @property
    def store(self) -> Path:
        return Path(self["_store"])

    @property
    def run_dir(self) -> Path:
        return cell_dir(self.store.parent, self["hash"])


def search_stores(roots: Iterable[str | os.PathLike[str]], exclude: Path | None) -> list[Path]:
    """The results stores under each root (the root's own, and one and two levels down),
    without ``exclude`` (the grid's own store), each once, in a stable order."""
    seen: dict[Path, None] = {}
    for root in roots:
        root = Path(root)
        for pattern in (STORE_NAME, f"*/{STORE_NAME}", f"*/*/{STORE_NAME}"):
            for path in sorted(root.glob(pattern)):
                real = path.resolve()
                if exclude is not None and real == exclude.resolve():
                    continue
                seen.setdefault(real)
    return list(seen)


def _done_rows(store: Path, hashes: list[str]) -> list[dict[str, Any]]:
    """The done rows of ``hashes`` in ``store`` (metrics and versions decoded), read-only; []
    for a store that cannot be read (a cache is an optimisation: an unreadable store is
    skipped, not an error)."""
    out = []
    try:
        for i in range(0, len(hashes), 500):  # SQLite's bound-parameter limit
            part = hashes[i : i + 500]
            marks = ",".join("?" * len(part))
            sql = f"SELECT * FROM cells WHERE status = 'done' AND hash IN ({marks})"
            out += read_only_rows(store, sql, part)
    except sqlite3.Error:
        return []
    for row in out:
        for key in ("metrics", "versions"):
            if isinstance(row.get(key), str):
                row[key] = json.loads(row[key])
    return out


def find_cached(
    hashes: Iterable[str], roots: Iterable[str | os.PathLike[str]], exclude: Path | None = None
) -> dict[str, CachedCell]:
    """For each hash done in some store under ``roots``: that row (metrics etc. decoded), with
    ``_store`` its store. The first store in ``search_stores`` order that ran the cell itself
    wins; a row that was itself adopted from elsewhere points at its source when that source
    still has it."""
    wanted = list(dict.fromkeys(hashes))
    found: dict[str, CachedCell] = {}
    adopted: dict[str, CachedCell] = {}
    for store in search_stores(roots, exclude):
        left = [h for h in wanted if h not in found]
        if not left:
            break
        for row in _done_rows(store, left):
            hit = CachedCell(row, _store=str(store))
            source = row.get("source")
            if source and Path(source).is_file():
                original = _done_rows(Path(source), [row["hash"]])
                if original:
                    hit = CachedCell(original[0], _store=str(Path(source).resolve()))
            if source:
                adopted.setdefault(row["hash"], hit)
            else:
                found[row["hash"]] = hit
    for h, hit in adopted.items():
        found.setdefault(h, hit)
    return found


def link_cell(grid_dir: str | os.PathLike[str], hit: CachedCell) -> Path | None:
    """Link the grid's ``cells/<hash>`` to the cached cell's run folder (a relative symlink).
    Nothing is replaced: an existing folder or link is left as it is (None returned)."""
    here = cell_dir(grid_dir, hit["hash"])
    if here.exists() or here.is_symlink() or not hit.run_dir.is_dir():
        return None
    here.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(hit.run_dir.resolve(), here.parent.resolve())
    try:
        here.symlink_to(target, target_is_directory=True)
    except OSError:
        return None
    return here
