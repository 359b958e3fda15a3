"""Housekeeping that keeps the spool and the index telling the same story.

- At start, and then hourly: files in objects/ with no spool_objects row were placed by a C-STORE whose
  index commit never happened (a crash between rename and commit), so they were never acknowledged:
  delete them. Files in incoming/ untouched for an hour belong to transfers that died without a
  clean close: delete them.
- Superseded copies (the same SOP Instance UID received again with other content) are deleted once
  no destination still owes them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, exists, select

from qrproxy.index.models import ForwardItem, ForwardState, SpoolObject
from qrproxy.logs import kv

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy.maintenance")

STALE_INCOMING = 3600.0


def sweep_incoming(spool: Spool, max_age: float = STALE_INCOMING) -> int:
    now = time.time()
    removed = 0
    for entry in os.scandir(spool.incoming):
        try:
            if entry.is_file() and now - entry.stat().st_mtime > max_age:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            pass
    if removed:
        log.info(kv(event="incoming-swept", removed=removed, reason="stale partial transfers"))
    return removed


def remove_orphans(spool: Spool, sessions: sessionmaker[Session], min_age: float = 60.0) -> int:
    """Delete objects/ files that no row references (older than `min_age`, so a C-STORE between its
    rename and its commit is left alone)."""
    now = time.time()
    removed = 0
    objects = spool.objects
    for fan in sorted(os.scandir(objects), key=lambda e: e.name):
        if not fan.is_dir():
            continue
        names = {}
        for entry in os.scandir(fan.path):
            try:
                if entry.is_file() and now - entry.stat().st_mtime > min_age:
                    names[f"{fan.name}/{entry.name}"] = entry.path
            except FileNotFoundError:
                continue
        if not names:
            continue
        with sessions() as s:
            known = set(s.execute(select(SpoolObject.path).where(SpoolObject.path.in_(list(names)))).scalars())
        for rel, full in names.items():
            if rel not in known:
                try:
                    os.unlink(full)
                    removed += 1
                except FileNotFoundError:
                    pass
    if removed:
        log.warning(kv(event="orphans-removed", files=removed,
                       reason="spool files without index rows (never acknowledged)"))
    return removed


def drop_superseded(spool: Spool, sessions: sessionmaker[Session]) -> int:
    """Delete superseded copies that no destination still owes."""
    owed = exists().where(
        and_(ForwardItem.object_pk == SpoolObject.id,
             ForwardItem.state.in_([ForwardState.pending, ForwardState.inflight, ForwardState.held]))
    )
    with sessions.begin() as s:
        rows = s.execute(
            select(SpoolObject.id, SpoolObject.path).where(SpoolObject.origin == "superseded", ~owed).limit(1000)
        ).all()
        if not rows:
            return 0
        s.execute(delete(SpoolObject).where(SpoolObject.id.in_([r.id for r in rows])))
    for r in rows:
        spool.remove(r.path)
    log.info(kv(event="superseded-removed", files=len(rows)))
    return len(rows)


class Maintenance(threading.Thread):
    def __init__(self, spool: Spool, sessions: sessionmaker[Session], every: float = 3600.0):
        super().__init__(name="maintenance", daemon=True)
        self.spool = spool
        self.sessions = sessions
        self.every = every
        self.stopping = threading.Event()

    def run_once(self) -> None:
        tasks = (("remove_orphans", lambda: remove_orphans(self.spool, self.sessions)),
                 ("sweep_incoming", lambda: sweep_incoming(self.spool)),
                 ("drop_superseded", lambda: drop_superseded(self.spool, self.sessions)))
        for name, task in tasks:
            if self.stopping.is_set():
                return
            try:
                task()
            except Exception:
                log.exception("maintenance task %s failed", name)

    def run(self) -> None:
        while not self.stopping.is_set():
            self.run_once()
            self.stopping.wait(self.every)

    def stop(self) -> None:
        self.stopping.set()
