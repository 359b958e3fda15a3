"""The hot path of C-FIND: recent identical requests answered from memory until the index changes.

A PACS viewer or a modality often repeats the same query (a worklist screen refreshing, a study
list polled). The encoded answer is kept in a cachetools TTLCache keyed by the request's own bytes.

Invalidation: every committed write that touched the index tables (patients, studies, series,
instances, worklist items) bumps a process-wide generation (SQLAlchemy engine events, so no writer
has to remember to call anything), and an entry made under an older generation is never served.
The generation is read before the rows are, so a write that commits while an answer is being
built makes that answer stale at once.

Writes by other processes (`workers: N`, `qrproxy refresh` run from a shell): on SQLite the
database's own change counter (`PRAGMA data_version` on one dedicated connection, which changes
whenever another connection commits) is part of the generation, so they invalidate too. On
PostgreSQL there is no such counter; there the TTL (`query.cache_ttl`, default 2 s) bounds how long
another process's write can stay unseen by a repeated identical query.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from typing import Any

from cachetools import TTLCache
from sqlalchemy import event
from sqlalchemy.engine import Engine

MAX_ENTRIES = 256
MAX_ENTRY_BYTES = 32 * 1024 * 1024  # a bigger answer is not kept (memory over speed)

_INDEX_WRITE = re.compile(
    r"^\s*(INSERT|UPDATE|DELETE)\b.*?\b(patients|studies|series|instances|worklist_items)\b",
    re.IGNORECASE | re.DOTALL)

_generation = 0
_lock = threading.Lock()
_watched: set[int] = set()


def invalidate() -> None:
    global _generation
    with _lock:
        _generation += 1


def generation() -> int:
    return _generation


def _after_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
    if _INDEX_WRITE.match(statement):
        conn.info["qrproxy_index_dirty"] = True


def _on_commit(conn: Any) -> None:
    # SQLAlchemy's commit event fires just before the DBAPI commit: bump now (entries being built
    # stop counting) and again when the connection goes back to the pool, after the commit, so an
    # answer read between the two cannot be kept either.
    if conn.info.pop("qrproxy_index_dirty", False):
        conn.info["qrproxy_bump_on_checkin"] = True
        invalidate()


def _on_checkin(dbapi_conn: Any, record: Any) -> None:
    if record.info.pop("qrproxy_bump_on_checkin", False):
        invalidate()


def _after_rollback(conn: Any) -> None:
    conn.info.pop("qrproxy_index_dirty", None)


def watch(engine: Engine) -> None:
    """Bump the generation after every commit on `engine` that wrote index rows (idempotent)."""
    if id(engine) in _watched:
        return
    _watched.add(id(engine))
    event.listen(engine, "after_cursor_execute", _after_execute)
    event.listen(engine, "commit", _on_commit)
    event.listen(engine, "rollback", _after_rollback)
    event.listen(engine.pool, "checkin", _on_checkin)


class SqliteVersion:
    """`PRAGMA data_version` of one connection kept open for this: it changes whenever any other
    connection, in any process, commits to the database file."""

    def __init__(self, path: str):
        self._conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA data_version").fetchone()[0])


def version_probe(engine: Engine) -> Any:
    """A SqliteVersion for a file SQLite engine, else None."""
    url = engine.url
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        try:
            return SqliteVersion(url.database)
        except sqlite3.Error:
            return None
    return None


class HotCache:
    def __init__(self, ttl: float, maxsize: int = MAX_ENTRIES, probe: Any = None):
        self.enabled = ttl > 0
        self._cache: TTLCache[Any, tuple[Any, Any]] = TTLCache(maxsize=maxsize, ttl=max(ttl, 0.001))
        self._lock = threading.Lock()
        self._probe = probe

    def generation(self) -> Any:
        """Read before the rows of an answer are read; an entry is served only under the same value."""
        return (_generation, self._probe()) if self._probe is not None else _generation

    def get(self, key: Any) -> Any:
        if not self.enabled or key is None:
            return None
        with self._lock:
            hit = self._cache.get(key)
        if hit is None or hit[0] != self.generation():
            return None
        return hit[1]

    def put(self, key: Any, value: Any, gen: Any, size: int = 0) -> None:
        if not self.enabled or key is None or size > MAX_ENTRY_BYTES or gen != self.generation():
            return
        with self._lock:
            self._cache[key] = (gen, value)
