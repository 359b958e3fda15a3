"""Pseudonyms kept in the database (table uid_map), for `anonymize` mutations.

The same original UID or patient ID gets the same replacement on every send, after restarts and in
every process sharing the database. Insert-or-get is race-safe on both databases: new rows go in
with INSERT ... ON CONFLICT (kind, original) DO NOTHING and every answer is read back from the table,
so when two senders race the first committed row wins for both (PostgreSQL makes the second insert
wait on the unique index; SQLite has one writer at a time).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.index.models import UidMap

MAX_ORIGINAL = 255
_CHUNK = 400


def new_replacement(kind: str) -> str:
    """A fresh UID under the 2.25 root (PS3.5 B.2: a UUID as an integer), or a patient ID pseudonym."""
    if kind == "uid":
        return f"2.25.{uuid.uuid4().int}"
    return "ANON" + uuid.uuid4().hex[:12].upper()


def _key(original: str) -> str:
    """The stored key: the value itself, or a digest for values too long for the column."""
    if len(original) <= MAX_ORIGINAL:
        return original
    return "sha256:" + hashlib.sha256(original.encode("utf-8", "surrogateescape")).hexdigest()


class DbPseudonyms:
    """`Pseudonyms` (qrproxy/anonymize.py) backed by the uid_map table."""

    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def __call__(self, kind: str, originals: Collection[str]) -> dict[str, str]:
        keys = {o: _key(o) for o in originals if o}
        if not keys:
            return {}
        wanted = sorted(set(keys.values()))
        found: dict[str, str] = {}
        with self.sessions.begin() as s:
            for i in range(0, len(wanted), _CHUNK):
                found.update(self._lookup(s, kind, wanted[i:i + _CHUNK]))
            missing = [k for k in wanted if k not in found]
            if missing:
                dialect = s.get_bind().dialect.name
                if dialect == "postgresql":
                    from sqlalchemy.dialects.postgresql import insert
                else:
                    from sqlalchemy.dialects.sqlite import insert
                for i in range(0, len(missing), _CHUNK):
                    part = missing[i:i + _CHUNK]
                    s.execute(
                        insert(UidMap)
                        .values([{"kind": kind, "original": k, "replacement": new_replacement(kind)} for k in part])
                        .on_conflict_do_nothing(index_elements=["kind", "original"])
                    )
                    found.update(self._lookup(s, kind, part))
        return {o: found[k] for o, k in keys.items()}

    @staticmethod
    def _lookup(s: Session, kind: str, keys: list[str]) -> dict[str, str]:
        rows = s.execute(select(UidMap.original, UidMap.replacement)
                         .where(UidMap.kind == kind, UidMap.original.in_(keys)))
        return {r.original: r.replacement for r in rows}


class MemoryPseudonyms:
    """The same contract in a dict: for `rules test` (no database writes) and unit tests."""

    def __init__(self) -> None:
        self.table: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, originals: Collection[str]) -> dict[str, str]:
        return {o: self.table.setdefault((kind, o), new_replacement(kind)) for o in originals if o}
