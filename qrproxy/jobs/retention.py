"""Retention: evicting local copies of studies under the `retention` limits (docs/operations.md "Retention").

What goes is a study's local copy: its spool files (and their converted variants) and their
spool_objects rows. The index rows (patient, study, series, instance) stay, with
instances.object_pk set NULL by the foreign key, so C-FIND still finds the study and C-MOVE knows
to retrieve it through.

A study is evictable when none of its copies is still owed to anyone: no forward row pending,
in flight or held, no instance in a storage commitment request not yet reported, and it is not
pinned (studies.pinned_until in the future: prefetch sets it). Least recently used goes first:
a study's last use is the latest of studies.last_access_at (set by `touch_study` when C-MOVE/C-GET
serve it), the newest received_at of its copies, and the last_access_at of its copies (an
identical re-send of an instance already held sets it, see index.record_received).

One pass: read what is held per study (one grouped SELECT), plan (age limits, then per-node size,
then global size, then free space), and evict each planned study in its own transaction that
re-checks everything under a lock on the study row (PostgreSQL) or the single writer slot
(SQLite): a C-STORE, a touch or a new forward row that got in first wins, and the study is
skipped. The files are unlinked after the commit; a crash in between leaves orphan files that
maintenance.remove_orphans deletes.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.config.schema import Config
from qrproxy.index.models import (CommitmentItem, CommitmentRequest, ForwardItem, ForwardState, SpoolObject, Study,
                                  utcnow)
from qrproxy.logs import kv
from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy.retention")

OWED_STATES = (ForwardState.pending, ForwardState.inflight, ForwardState.held)


def _aware(when: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands timestamps back naive (they are UTC); PostgreSQL aware."""
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=dt.timezone.utc)
    return when


def _latest(*values: dt.datetime | None) -> dt.datetime | None:
    present = [v for v in map(_aware, values) if v is not None]
    return max(present) if present else None


# --- the API for the services that use a study ------------------------------------------------


def touch_study(session_or_sessions: Any, study_uid: str, when: dt.datetime | None = None) -> bool:
    """Record that `study_uid` was used now (C-MOVE/C-GET serving it): it becomes the most recently
    used study for retention. Given a Session, runs in the caller's transaction; given a
    sessionmaker, commits its own. Returns False when the index has no such study.

    Call it (committed) before reading the study's instance rows to serve them: a retention pass
    that planned the study before the touch sees the touch when it re-checks and skips it; one that
    evicted it before the touch has already set instances.object_pk NULL, so the reader sees the
    copy is gone (retrieve through) instead of a file that vanishes under it."""
    stmt = (
        update(Study)
        .where(Study.study_instance_uid == study_uid)
        # updated_at keeps its value: a use is not a change of what the index says about the study.
        .values(last_access_at=when or utcnow(), updated_at=Study.updated_at)
        .execution_options(synchronize_session=False)
    )
    if isinstance(session_or_sessions, Session):
        return bool(session_or_sessions.execute(stmt).rowcount)
    with session_or_sessions.begin() as s:
        return bool(s.execute(stmt).rowcount)


# --- what is held -----------------------------------------------------------------------------


@dataclass
class Holding:
    """One study's local copy."""

    study_uid: str
    study_pk: int | None
    bytes: int
    objects: int
    last_used: dt.datetime | None
    pinned: bool = False
    owed_forward: bool = False
    owed_commitment: bool = False
    senders: set[str] = field(default_factory=set)  # calling AE titles of its copies

    @property
    def owed(self) -> bool:
        return self.owed_forward or self.owed_commitment

    @property
    def evictable(self) -> bool:
        return self.study_pk is not None and not self.pinned and not self.owed


def holdings(session: Session, now: dt.datetime | None = None) -> list[Holding]:
    """Every study the spool holds copies of, least recently used first."""
    now = now or utcnow()
    so = SpoolObject
    rows = session.execute(
        select(so.study_instance_uid, func.count(), func.sum(so.size), func.max(so.received_at),
               func.max(so.last_access_at))
        .where(so.study_instance_uid.is_not(None))
        .group_by(so.study_instance_uid)
    ).all()
    studies = {
        r.study_instance_uid: r
        for r in session.execute(select(Study.id, Study.study_instance_uid, Study.last_access_at, Study.pinned_until)
                                 .where(Study.study_instance_uid.in_(select(so.study_instance_uid).distinct())))
    }
    owed_fwd = set(session.execute(
        select(so.study_instance_uid).distinct().join(ForwardItem, ForwardItem.object_pk == so.id)
        .where(ForwardItem.state.in_(OWED_STATES))).scalars())
    owed_commit = set(session.execute(
        select(so.study_instance_uid).distinct()
        .join(CommitmentItem, CommitmentItem.sop_instance_uid == so.sop_instance_uid)
        .join(CommitmentRequest, CommitmentRequest.id == CommitmentItem.request_pk)
        .where(CommitmentRequest.reported_at.is_(None))).scalars())
    senders: dict[str, set[str]] = {}
    for uid, ae in session.execute(select(so.study_instance_uid, so.calling_ae).distinct()
                                   .where(so.calling_ae.is_not(None))):
        senders.setdefault(uid, set()).add(ae)
    out = []
    for uid, n, size, newest, obj_access in rows:
        st = studies.get(uid)
        out.append(Holding(
            study_uid=uid,
            study_pk=st.id if st else None,
            bytes=int(size or 0),
            objects=int(n),
            last_used=_latest(newest, obj_access, st.last_access_at if st else None),
            pinned=bool(st and st.pinned_until is not None and _aware(st.pinned_until) > now),
            owed_forward=uid in owed_fwd,
            owed_commitment=uid in owed_commit,
            senders=senders.get(uid, set()),
        ))
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    out.sort(key=lambda h: (h.last_used or epoch, h.study_uid))
    return out


def summary(session: Session, now: dt.datetime | None = None) -> dict[str, int]:
    """Spool usage for `status`: bytes and objects in the spool, studies held, and of those how many
    (and bytes) are evictable, pinned, or owed (a forward or a commitment still pending)."""
    total_bytes, total_objects = session.execute(
        select(func.coalesce(func.sum(SpoolObject.size), 0), func.count()).select_from(SpoolObject)).one()
    out = {"bytes": int(total_bytes), "objects": int(total_objects), "studies": 0}
    for kind in ("evictable", "pinned", "owed"):
        out[kind] = out[f"{kind}_bytes"] = 0
    for h in holdings(session, now):
        out["studies"] += 1
        kind = "owed" if h.owed else "pinned" if h.pinned else "evictable" if h.evictable else None
        if kind:
            out[kind] += 1
            out[f"{kind}_bytes"] += h.bytes
    return out


# --- planning ---------------------------------------------------------------------------------


@dataclass
class Planned:
    holding: Holding
    reason: str          # age | size | free | node-age | node-size
    node: str | None = None


@dataclass
class Plan:
    evict: list[Planned] = field(default_factory=list)
    short: list[str] = field(default_factory=list)  # limits this pass cannot meet (all that is left is kept)


def plan(cfg: Config, held: list[Holding], total_bytes: int, free_bytes: int | None,
         now: dt.datetime) -> Plan:
    """Which studies to evict and why. `held` least recently used first; `total_bytes` is every
    spool object (also those without a study); `free_bytes` the spool filesystem's free space."""
    ret = cfg.retention
    out = Plan()
    if ret is None:
        return out
    chosen: dict[str, Planned] = {}

    def take(h: Holding, reason: str, node: str | None = None) -> None:
        if h.study_uid not in chosen:
            chosen[h.study_uid] = Planned(h, reason, node)
            out.evict.append(chosen[h.study_uid])

    def older_than(h: Holding, seconds: float) -> bool:
        return h.last_used is None or h.last_used < now - dt.timedelta(seconds=seconds)

    def node_studies(name: str) -> list[Holding]:
        ae = cfg.nodes[name].ae_title
        return [h for h in held if ae in h.senders]

    def shrink(pool: Iterable[Holding], used: int, limit: int, reason: str, node: str | None, label: str) -> None:
        for h in pool:
            if used <= limit:
                return
            if h.evictable and h.study_uid not in chosen:
                take(h, reason, node)
                used -= h.bytes
        if used > limit:
            out.short.append(f"{label}: still {used - limit} bytes over; what is left is owed or pinned")

    def freed(pool: Iterable[Holding]) -> int:
        return sum(h.bytes for h in pool if h.study_uid in chosen)

    evictable = [h for h in held if h.evictable]
    if ret.max_age is not None:
        for h in evictable:
            if older_than(h, ret.max_age):
                take(h, "age")
    for name, limits in ret.nodes.items():
        if limits.max_age is not None:
            for h in node_studies(name):
                if h.evictable and older_than(h, limits.max_age):
                    take(h, "node-age", name)
    for name, limits in ret.nodes.items():
        if limits.max_bytes is not None:
            mine = node_studies(name)
            shrink(mine, sum(h.bytes for h in mine) - freed(mine), limits.max_bytes, "node-size", name,
                   f"retention.nodes.{name}.max_bytes")
    if ret.max_bytes is not None:
        shrink(held, total_bytes - freed(held), ret.max_bytes, "size", None, "retention.max_bytes")
    if ret.min_free is not None and free_bytes is not None:
        # Freeing N bytes of spool files gives the filesystem about N bytes back: `used` is the deficit.
        shrink(held, ret.min_free - free_bytes - freed(held), 0, "free", None, "retention.min_free")
    return out


# --- evicting ---------------------------------------------------------------------------------


@dataclass
class _Skip(Exception):
    """Raised inside the eviction transaction to roll it back; the message says why."""


@dataclass
class Evicted:
    study_uid: str
    bytes: int
    objects: int
    reason: str
    node: str | None


@dataclass
class PassResult:
    evicted: list[Evicted] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (study, why) raced since planned
    short: list[str] = field(default_factory=list)
    planned: list[Planned] = field(default_factory=list)


def _evict_rows(sessions: sessionmaker[Session], h: Holding, now: dt.datetime) -> list[Any]:
    """The database half of an eviction, in one transaction: re-check, delete the spool_objects rows
    (instances.object_pk goes NULL, sent forward rows go with them). Raises _Skip to roll back."""
    so = SpoolObject
    with sessions.begin() as s:
        lock = select(Study.last_access_at, Study.pinned_until).where(Study.id == h.study_pk)
        if s.get_bind().dialect.name == "postgresql":
            lock = lock.with_for_update()  # a concurrent touch_study waits for us, or we for it
        st = s.execute(lock).first()
        if st is None:
            raise _Skip("study row gone")
        if st.pinned_until is not None and _aware(st.pinned_until) > now:
            raise _Skip("pinned")
        objects = s.execute(select(so.id, so.path, so.size, so.received_at, so.last_access_at)
                            .where(so.study_instance_uid == h.study_uid)).all()
        if not objects:
            raise _Skip("nothing held")
        last_used = _latest(st.last_access_at, *(o.received_at for o in objects),
                            *(o.last_access_at for o in objects))
        if h.last_used is not None and last_used is not None and last_used > h.last_used:
            raise _Skip("used since planned")
        ids = [o.id for o in objects]
        if s.execute(select(exists().where(ForwardItem.object_pk.in_(ids), ForwardItem.state.in_(OWED_STATES)))).scalar():
            raise _Skip("forward owed")
        if s.execute(select(exists().where(
                CommitmentItem.sop_instance_uid.in_(select(so.sop_instance_uid).where(so.id.in_(ids))),
                CommitmentItem.request_pk == CommitmentRequest.id,
                CommitmentRequest.reported_at.is_(None)))).scalar():
            raise _Skip("commitment owed")
        # An identical re-send that reached an object after our read stamps its last_access_at;
        # then not every row matches and the whole study stays (rollback).
        cutoff = last_used or now
        gone = s.execute(delete(so).where(so.id.in_(ids),
                                          or_(so.last_access_at.is_(None), so.last_access_at <= cutoff))
                         .execution_options(synchronize_session=False)).rowcount
        if gone != len(ids):
            raise _Skip("re-sent since planned")
    return list(objects)


def evict_study(sessions: sessionmaker[Session], spool: Spool, p: Planned, now: dt.datetime) -> Evicted | str:
    """Evict one planned study: DB first (one transaction, conditions re-checked), then files.
    Returns what was evicted, or why it was skipped."""
    h = p.holding
    try:
        objects = _evict_rows(sessions, h, now)
    except _Skip as why:
        return str(why)
    for o in objects:
        try:
            spool.remove(o.path)
        except OSError as exc:  # left for maintenance.remove_orphans
            log.warning(kv(event="evict-unlink-failed", path=o.path, error=exc))
    size = sum(o.size for o in objects)
    log.info(kv(event="evicted", study=h.study_uid, bytes=size, objects=len(objects), reason=p.reason,
                node=p.node or "-", last_used=h.last_used.isoformat() if h.last_used else "-"))
    return Evicted(h.study_uid, size, len(objects), p.reason, p.node)


def run_pass(config: Config, sessions: sessionmaker[Session], spool: Spool, dry_run: bool = False, now: dt.datetime | None = None,
             progress: Callable[[int, int], None] | None = None) -> PassResult:
    """One retention pass: plan from what is held now, then evict (unless `dry_run`). `progress`
    is called with (studies done, studies planned) after each eviction (`qrproxy retention run`)."""
    now = now or utcnow()
    result = PassResult()
    if config.retention is None:
        return result
    with sessions() as s:
        held = holdings(s, now)
        total = int(s.execute(select(func.coalesce(func.sum(SpoolObject.size), 0))).scalar_one())
    try:
        free: int | None = spool.free_bytes()
    except OSError:
        free = None
    pl = plan(config, held, total, free, now)
    result.planned, result.short = pl.evict, pl.short
    if progress is not None:
        progress(0 if not dry_run else len(pl.evict), len(pl.evict))
    if dry_run:
        return result
    for i, p in enumerate(pl.evict):
        if progress is not None and i:
            progress(i, len(pl.evict))
        outcome = evict_study(sessions, spool, p, now)
        if isinstance(outcome, Evicted):
            result.evicted.append(outcome)
        else:
            result.skipped.append((p.holding.study_uid, outcome))
            log.info(kv(event="evict-skipped", study=p.holding.study_uid, reason=p.reason, why=outcome))
    if progress is not None and pl.evict:
        progress(len(pl.evict), len(pl.evict))
    for text in pl.short:
        log.warning(kv(event="retention-short", detail=text))
    return result


class Retention(threading.Thread):
    """Runs a pass at start and then every `retention.every` (worker 0 only; app.py)."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool):
        super().__init__(name="retention", daemon=True)
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.stopping = threading.Event()

    def run(self) -> None:
        ret = self.config.retention
        assert ret is not None
        while not self.stopping.is_set():
            try:
                r = run_pass(self.config, self.sessions, self.spool)
                if r.evicted:
                    log.info(kv(event="retention-pass", evicted=len(r.evicted),
                                bytes=sum(e.bytes for e in r.evicted), skipped=len(r.skipped)))
            except Exception:
                log.exception("retention pass failed")
            self.stopping.wait(ret.every)

    def stop(self) -> None:
        self.stopping.set()
