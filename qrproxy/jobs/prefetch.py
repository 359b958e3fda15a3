"""Prefetch: the prior studies of patients on the cached worklist, retrieved ahead of time.

A rule runs on its schedule, only inside its `hours` window (night hours, when the WAN is idle):

1. plan: for every patient with a worklist item scheduled from today to today + `days_ahead` (items
   the proxy has not seen done), ask the rule's node for the patient's studies (one study-level
   C-FIND per patient on one association), keep those matching `modalities` and `max_age`, newest
   first, at most `max_studies`, and record each as a `prefetch_items` row (pending). The scheduled
   study itself is not a prior and is skipped.
2. fetch: each due row is listed down to its instances (refresh.learn_studies), checked against
   `body_parts`, and the instances the spool lacks are retrieved through retrieve.py (the same
   shared retrieval a C-MOVE would use, so a workstation asking meanwhile joins it). Done rows pin
   their study (`studies.pinned_until` = the day it is needed + `pin`), so retention keeps it.
   Failures are retried with backoff and held after `max_attempts`; `max_bytes` caps what one
   patient may take; retrievals are spaced so the average stays under the rule's `bandwidth` and
   the node's current `bandwidth`/`bandwidth_schedule` limit, the lower of the two (nobody waits on
   a prior: it yields the link; a retrieve-through, which a modality waits on, is never throttled).

The state of each prior is its row: a restart resumes where the last run stopped, and `qrproxy
status` shows the rows per state with the last error.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select, update

from qrproxy.config.schema import PrefetchRule
from qrproxy.index.models import Instance, PrefetchItem, Series, SpoolObject, Study, WorklistItem, utcnow
from qrproxy.index.writers import dialect_insert
from qrproxy.jobs import refresh
from qrproxy.logs import kv
from qrproxy.scu import upstream
from qrproxy.scu.pacing import limit_at
from qrproxy.scu.upstream import UpstreamError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.scu.retrieve import Retriever

log = logging.getLogger("qrproxy.prefetch")

RETRY_MIN, RETRY_MAX = 60.0, 3600.0
CLAIM_LEASE = 3600.0  # an item being fetched is not due for others this long (a killed fetch is retried after)


def receive_cap(rule_limit: int, node_limit: int) -> int:
    """Bytes/s a prefetch may average: the lower of the two limits that are set (0: none)."""
    limits = [v for v in (rule_limit, node_limit) if v > 0]
    return min(limits) if limits else 0


@dataclass
class PrefetchResult:
    rule: str
    skipped: str | None = None  # why the rule did not run (outside its hours)
    patients: int = 0
    planned: int = 0
    fetched: int = 0
    failed: int = 0
    held: int = 0
    bytes: int = 0


def in_window(hours: str, now: dt.datetime | None = None) -> bool:
    """Whether local time `now` is inside "HH:MM-HH:MM" (a window may wrap midnight)."""
    now = now or dt.datetime.now()
    start_s, end_s = hours.split("-")
    start = int(start_s[:2]) * 60 + int(start_s[3:])
    end = int(end_s[:2]) * 60 + int(end_s[3:])
    minute = now.hour * 60 + now.minute
    if start == end:
        return False
    if start < end:
        return start <= minute < end
    return minute >= start or minute < end


def choose_priors(matches: list[Dataset], rule: PrefetchRule, exclude: set[str], today: dt.date) -> list[Dataset]:
    """The studies of one patient worth fetching, newest first (a pure function of the C-FIND answers)."""
    oldest = (today - dt.timedelta(seconds=rule.max_age)).strftime("%Y%m%d")
    wanted = {m.upper() for m in rule.modalities}
    keep = []
    for m in matches:
        uid = str(m.get("StudyInstanceUID", "") or "").strip()
        if not uid or uid in exclude:
            continue
        date = str(m.get("StudyDate", "") or "").strip()
        if date and date < oldest:
            continue
        if wanted:
            raw = m.get("ModalitiesInStudy", "")
            mods = {str(x).upper() for x in (raw if not isinstance(raw, str) else raw.split("\\")) if str(x)}
            if mods and not mods & wanted:
                continue
        keep.append(m)
    keep.sort(key=lambda m: str(m.get("StudyDate", "") or ""), reverse=True)
    return keep[: rule.max_studies]


class Prefetcher:
    def __init__(self, config: Config, sessions: sessionmaker[Session], retriever: Retriever):
        self.config = config
        self.sessions = sessions
        self.retriever = retriever
        self.rules = {r.name: r for r in config.prefetch}
        self._stop = threading.Event()
        self._scheduler: Any = None
        self._locks = {name: threading.Lock() for name in self.rules}

    # --- schedule -----------------------------------------------------------------------------

    def start(self, first_run_delay: float = 3.0) -> None:
        if not self.rules:
            return
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        scheduler = BackgroundScheduler(daemon=True)
        first = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=first_run_delay)
        for rule in self.rules.values():
            scheduler.add_job(self._scheduled, IntervalTrigger(seconds=rule.every), args=[rule.name],
                              id=f"prefetch-{rule.name}", max_instances=1, coalesce=True,
                              misfire_grace_time=None, next_run_time=first)
        scheduler.start()
        self._scheduler = scheduler
        log.info(kv(event="prefetch-scheduled", rules=",".join(self.rules)))

    def _scheduled(self, name: str) -> None:
        try:
            self.run(name)
        except Exception:  # never let one run kill the schedule
            log.exception(kv(event="prefetch-failed", rule=name))

    def stop(self) -> None:
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    # --- one run --------------------------------------------------------------------------------

    def run(self, name: str, force: bool = False, today: dt.date | None = None) -> PrefetchResult:
        rule = self.rules[name]
        result = PrefetchResult(name)
        if not force and not in_window(rule.hours):
            result.skipped = f"outside its hours {rule.hours}"
            return result
        lock = self._locks[name]
        if not lock.acquire(blocking=False):
            result.skipped = "already running"
            return result
        try:
            today = today or dt.date.today()
            self._plan(rule, result, today)
            self._fetch(rule, result, force)
        finally:
            lock.release()
        log.info(kv(event="prefetch-run", rule=name, patients=result.patients, planned=result.planned,
                    fetched=result.fetched, failed=result.failed, held=result.held, bytes=result.bytes))
        return result

    def _plan(self, rule: PrefetchRule, result: PrefetchResult, today: dt.date) -> None:
        first = today.strftime("%Y%m%d")
        last = (today + dt.timedelta(days=rule.days_ahead)).strftime("%Y%m%d")
        with self.sessions() as s:
            rows = s.execute(
                select(WorklistItem.patient_id, WorklistItem.study_instance_uid, WorklistItem.sps_start_date)
                .where(WorklistItem.done_at.is_(None), WorklistItem.patient_id.is_not(None),
                       WorklistItem.patient_id != "", WorklistItem.sps_start_date >= first,
                       WorklistItem.sps_start_date <= last)
            ).all()
        patients: dict[str, tuple[str, set[str]]] = {}
        for pid, study_uid, day in rows:
            needed, scheduled = patients.get(pid, (day, set()))
            if study_uid:
                scheduled.add(study_uid)
            patients[pid] = (min(needed, day), scheduled)
        result.patients = len(patients)
        if not patients:
            return
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        for keyword in ("StudyInstanceUID", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
            setattr(ident, keyword, "")
        planned: list[dict[str, Any]] = []
        try:
            with upstream.find_session(self.config, rule.node, "study", cancel=self._stop) as fs:
                for pid, (needed, scheduled) in sorted(patients.items()):
                    ident.PatientID = pid
                    for m in choose_priors(fs.find(ident), rule, scheduled, today):
                        planned.append({"rule": rule.name, "node": rule.node, "patient_id": pid,
                                        "study_instance_uid": str(m.StudyInstanceUID).strip(),
                                        "study_date": str(m.get("StudyDate", "") or "")[:8] or None,
                                        "needed_on": needed, "state": "pending", "attempts": 0, "instances": 0,
                                        "bytes": 0, "next_attempt_at": utcnow(), "created_at": utcnow(),
                                        "updated_at": utcnow()})
        except UpstreamError as exc:
            log.warning(kv(event="prefetch-plan-failed", rule=rule.name, node=rule.node, reason=str(exc)))
        if planned:
            with self.sessions.begin() as s:
                ins = dialect_insert(s)(PrefetchItem).on_conflict_do_nothing(index_elements=["rule", "study_instance_uid"])
                n = s.connection().execute(ins, planned).rowcount  # new rows: known priors are kept
            result.planned = max(0, n or 0)

    def _fetch(self, rule: PrefetchRule, result: PrefetchResult, force: bool) -> None:
        with self.sessions() as s:
            due = s.execute(
                select(PrefetchItem.id).where(PrefetchItem.rule == rule.name,
                                              PrefetchItem.state.in_(["pending", "failed"]),
                                              PrefetchItem.next_attempt_at <= utcnow())
                .order_by(PrefetchItem.needed_on, PrefetchItem.study_date.desc())
            ).scalars().all()
        for item_id in due:
            if self._stop.is_set() or (not force and not in_window(rule.hours)):
                return
            t0 = time.monotonic()
            got = self._fetch_one(rule, item_id, result)
            cap = receive_cap(rule.bandwidth, limit_at(self.config.nodes[rule.node], dt.datetime.now()))
            if cap and got:
                pause = got / cap - (time.monotonic() - t0)
                if pause > 0:
                    self._stop.wait(pause)

    def _fetch_one(self, rule: PrefetchRule, item_id: int, result: PrefetchResult) -> int:
        """Fetch one prior; returns the bytes it brought."""
        if not self._claim(item_id):
            return 0  # another process (`qrproxy prefetch` next to the server) is fetching it
        with self.sessions() as s:
            item = s.get(PrefetchItem, item_id)
            if item is None:
                return 0
            uid, pid, needed, attempts = item.study_instance_uid, item.patient_id, item.needed_on, item.attempts
            spent = s.execute(select(func.coalesce(func.sum(PrefetchItem.bytes), 0))
                              .where(PrefetchItem.rule == rule.name, PrefetchItem.patient_id == pid,
                                     PrefetchItem.state == "done")).scalar_one()
        if spent >= rule.max_bytes:
            self._finish(item_id, "held", attempts, f"patient's max_bytes ({rule.max_bytes}) reached")
            result.held += 1
            return 0
        try:
            refresh.learn_studies(self.config, self.sessions, rule.node, [uid],
                                  timeout=self.config.nodes[rule.node].timeout)
        except UpstreamError as exc:
            return self._failed(rule, item_id, attempts, f"listing failed: {exc}", result)
        with self.sessions() as s:
            rows = s.execute(
                select(Instance.sop_instance_uid, Instance.sop_class_uid, Instance.object_pk, Series.body_part_examined)
                .join(Series, Series.id == Instance.series_pk).join(Study, Study.id == Series.study_pk)
                .where(Study.study_instance_uid == uid)).all()
        if not rows:
            return self._failed(rule, item_id, attempts, f"{rule.node} lists no instances for the study", result)
        if rule.body_parts:
            parts = {p.upper() for p in rule.body_parts}
            if not any((r.body_part_examined or "").upper() in parts for r in rows):
                self._finish(item_id, "held", attempts, f"no series with body part {', '.join(sorted(parts))}")
                result.held += 1
                return 0
        missing = [r.sop_instance_uid for r in rows if r.object_pk is None]
        retrieval = None
        if missing:
            retrieval = self.retriever.fetch(rule.node, "STUDY", {"StudyInstanceUID": [uid]},
                                                   {r.sop_class_uid for r in rows if r.sop_class_uid}, missing,
                                                   all(r.sop_class_uid for r in rows if r.object_pk is None))
            for _ in self.retriever.wait_for(retrieval, missing, cancelled=self._stop.is_set):
                pass
        with self.sessions() as s:
            local, size = s.execute(
                select(func.count(SpoolObject.id), func.coalesce(func.sum(SpoolObject.size), 0))
                .join(Instance, Instance.object_pk == SpoolObject.id).join(Series, Series.id == Instance.series_pk)
                .join(Study, Study.id == Series.study_pk).where(Study.study_instance_uid == uid)).one()
        if local < len(rows):
            why = (retrieval.error if retrieval is not None and retrieval.error else
                   f"{len(rows) - local} of {len(rows)} instances did not arrive")
            return self._failed(rule, item_id, attempts, why, result)
        pin_until = _day(needed) + dt.timedelta(days=1, seconds=rule.pin) if needed else utcnow() + dt.timedelta(seconds=rule.pin)
        with self.sessions.begin() as s:
            s.execute(update(Study).where(Study.study_instance_uid == uid).values(pinned_until=pin_until))
            s.execute(update(PrefetchItem).where(PrefetchItem.id == item_id).values(
                state="done", attempts=attempts + 1, instances=local, bytes=size, last_error=None, updated_at=utcnow()))
        result.fetched += 1
        result.bytes += size
        log.info(kv(event="prefetched", rule=rule.name, patient=pid, study=uid, instances=local, bytes=size,
                    retrieved=len(missing), pinned_until=pin_until.isoformat(timespec="minutes")))
        return size

    def _claim(self, item_id: int) -> bool:
        """Move the item's next attempt a lease ahead, if it is still due: the in-process lock of
        `run` does not see the server and a `qrproxy prefetch` command working on the same rule.
        Whoever finishes sets the state (and next attempt); a process killed mid-fetch leaves the
        item to be tried again when the lease runs out."""
        now = utcnow()
        with self.sessions.begin() as s:
            return s.execute(
                update(PrefetchItem)
                .where(PrefetchItem.id == item_id, PrefetchItem.state.in_(["pending", "failed"]),
                       PrefetchItem.next_attempt_at <= now)
                .values(next_attempt_at=now + dt.timedelta(seconds=CLAIM_LEASE), updated_at=now)
            ).rowcount == 1

    def _failed(self, rule: PrefetchRule, item_id: int, attempts: int, why: str, result: PrefetchResult) -> int:
        attempts += 1
        if attempts >= rule.max_attempts:
            self._finish(item_id, "held", attempts, f"gave up after {attempts} attempts: {why}")
            result.held += 1
        else:
            wait = min(RETRY_MAX, RETRY_MIN * 2 ** (attempts - 1))
            self._finish(item_id, "failed", attempts, why, utcnow() + dt.timedelta(seconds=wait))
            result.failed += 1
        log.warning(kv(event="prefetch-failed", rule=rule.name, item=item_id, attempts=attempts, reason=why))
        return 0

    def _finish(self, item_id: int, state: str, attempts: int, why: str, next_at: dt.datetime | None = None) -> None:
        values: dict[str, Any] = {"state": state, "attempts": attempts, "last_error": why, "updated_at": utcnow()}
        if next_at is not None:
            values["next_attempt_at"] = next_at
        with self.sessions.begin() as s:
            s.execute(update(PrefetchItem).where(PrefetchItem.id == item_id).values(**values))


def _day(yyyymmdd: str) -> dt.datetime:
    d = dt.datetime.strptime(yyyymmdd[:8], "%Y%m%d")
    return d.replace(tzinfo=dt.timezone.utc)


def summary(session: Any) -> list[tuple[str, str, int, int, str | None]]:
    """(rule, state, rows, bytes, latest error) for `qrproxy status`."""
    out = []
    rows = session.execute(
        select(PrefetchItem.rule, PrefetchItem.state, func.count(), func.coalesce(func.sum(PrefetchItem.bytes), 0))
        .group_by(PrefetchItem.rule, PrefetchItem.state).order_by(PrefetchItem.rule, PrefetchItem.state)).all()
    for rule, state, n, size in rows:
        err = None
        if state in ("failed", "held"):
            err = session.execute(select(PrefetchItem.last_error).where(PrefetchItem.rule == rule,
                                                                        PrefetchItem.state == state)
                                  .order_by(PrefetchItem.updated_at.desc()).limit(1)).scalar()
        out.append((rule, state, int(n), int(size), err))
    return out
