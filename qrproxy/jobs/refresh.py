"""Refresh jobs: scheduled C-FIND queries to an upstream node whose answers keep the index fresh.

A `kind: worklist` job asks its `worklist` node for the items matching `query` (MWL C-FIND, see
worklist.py and worklist_index.py) and replaces that node's items in the query's window in one
transaction. A `kind: studies` job asks its node for the studies matching `query` (relative dates such as `-7d`
resolved against today), then, for every study that is new to the index or whose number of instances
changed, for its series and instances, and writes all of it through `index` (so the rows look the same
whichever path learnt them). Those series and instance queries go out on up to the node's
`associations` at once (jobs/learn.py, scu/findpool.py): over a far link each C-FIND is a round
trip, and one at a time they bound the run. Only when every request of the run succeeded are the studies that the
node no longer lists removed: those the same query selects in the index, that came from that node
(`source_node`), and of which no instance has a local copy in the spool. A failing or slow upstream
records the error in `refresh_runs` and leaves the index as it was (studies already written in that run
stay: each was complete).

Network waits never happen inside a database transaction: on SQLite a transaction holds the one
writer slot that C-STORE needs.

A job never runs twice at once: an in-process lock per job name, and across processes (a `qrproxy
refresh` next to the server) a `running` row in `refresh_runs` younger than the job's timeout.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.config.schema import Config, RefreshJob
from qrproxy.config.tags import parse_tag
from qrproxy.config.units import is_relative_date, resolve_relative_date
from qrproxy.index.columns import STUDY_KEYS
from qrproxy.index.models import Instance, Patient, RefreshRun, Series, Study, utcnow
from qrproxy.index.writers import Header, found_study_header, text_of, upsert_found_study
from qrproxy.jobs.learn import learn, learn_studies, write_study
from qrproxy.logs import kv
from qrproxy.query import worklist
from qrproxy.query.matching import QueryError, parse_query, residual_keys, select_matching
from qrproxy.query.worklist_index import item_row, prune, replace
from qrproxy.rules import routes as rules
from qrproxy.scu import upstream
from qrproxy.scu.findpool import FindPool

log = logging.getLogger("qrproxy.refresh")


# A `running` row older than the job's timeout plus this is a run that died (kill -9), not a run.
STALE_MARGIN = 60.0


@dataclass
class RefreshResult:
    job: str
    rows: int = 0  # studies (worklist: scheduled steps) the node listed
    new_studies: int = 0  # worklist: new items
    updated: int = 0  # studies already indexed whose series and instances were read again; worklist: changed items
    unchanged: int = 0  # worklist: items answered exactly as held
    removed: int = 0  # worklist: vanished from the window, plus pruned by age
    error: str | None = None
    skipped: bool = False  # not run: already running, or a kind not refreshed yet

    @property
    def ok(self) -> bool:
        return self.error is None


# --- identifiers ------------------------------------------------------------------------------


def study_identifier(query: dict[str, Any], today: dt.date | None = None) -> Dataset:
    """The STUDY-level C-FIND identifier of a job: its `query` keys (relative DA values resolved
    against `today`) and the return keys the index needs."""
    today = today or dt.date.today()
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    non_ascii = False
    for key, value in query.items():
        tag = parse_tag(key)
        vr = dictionary_VR(tag)
        if vr == "SQ":
            raise ValueError(f"refresh query key {key!r}: sequence keys are not supported")
        if value is None:
            value = ""
        if isinstance(value, str) and vr == "DA" and is_relative_date(value):
            value = resolve_relative_date(value, today)
        if isinstance(value, (list, tuple)):
            value = [str(v) for v in value] if vr not in ("US", "UL", "SS", "SL") else [int(v) for v in value]
        elif isinstance(value, (int, float)) and vr not in ("US", "UL", "SS", "SL", "FL", "FD"):
            value = str(value)
        text = "".join(value) if isinstance(value, list) and value and isinstance(value[0], str) else value
        if isinstance(text, str) and not text.isascii():
            non_ascii = True
        ds.add_new(tag, vr, value)
    for keyword in STUDY_KEYS:
        if keyword not in ds:
            setattr(ds, keyword, "")
    if non_ascii:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _remove_vanished(session: Session, job: RefreshJob, identifier: Dataset, seen: set[str]) -> int:
    """Delete the studies of `job.node` that the same query selects in the index but the node no
    longer listed, unless one of their instances has a local copy. 0 when the query cannot be
    decided exactly in SQL (nothing is removed on a guess)."""
    try:
        query = parse_query(identifier, "STUDY", "study")
    except QueryError as exc:
        log.warning(kv(event="refresh-no-removal", job=job.name, reason=str(exc)))
        return 0
    if residual_keys(query):
        log.warning(kv(event="refresh-no-removal", job=job.name,
                       reason=f"keys not decidable in the index: {','.join(residual_keys(query))}"))
        return 0
    local = (select(Instance.id).join(Series, Instance.series_pk == Series.id)
             .where(Series.study_pk == Study.id, Instance.object_pk.is_not(None)).exists())
    candidates = session.execute(
        select_matching(query).with_only_columns(Study.id, Study.study_instance_uid)
        .where(Study.source_node == job.node, ~local)
    ).all()
    gone = [pk for pk, uid in candidates if uid not in seen]
    if not gone:
        return 0
    for i in range(0, len(gone), 500):
        session.execute(delete(Study).where(Study.id.in_(gone[i:i + 500])))
    session.execute(
        delete(Patient).where(Patient.source_node == job.node,
                              ~select(Study.id).where(Study.patient_pk == Patient.id).exists())
    )
    return len(gone)


# --- one run ----------------------------------------------------------------------------------

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _job_lock(name: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def _begin_run(sessions: sessionmaker[Session], job: RefreshJob) -> int | None:
    """Insert the `running` row; None when another process runs this job right now."""
    now = utcnow()
    fresh = now - dt.timedelta(seconds=job.timeout + STALE_MARGIN)
    with sessions.begin() as s:
        other = s.execute(
            select(RefreshRun.id).where(RefreshRun.job_name == job.name, RefreshRun.status == "running",
                                        RefreshRun.started_at > fresh).limit(1)
        ).scalar()
        if other is not None:
            return None
        # Runs that died (kill -9) stay `running` forever otherwise.
        s.execute(update(RefreshRun).where(RefreshRun.job_name == job.name, RefreshRun.status == "running")
                  .values(status="error", error="abandoned (process ended during the run)"))
        run = RefreshRun(job_name=job.name, node=job.node, started_at=now, status="running", rows=0)
        s.add(run)
        s.flush()
        return run.id


def run_job(config: Config, sessions: sessionmaker[Session], job: RefreshJob, cancel: threading.Event | None = None,
            today: dt.date | None = None, log_skip: bool = True) -> RefreshResult:
    """Run `job` now, in the calling thread."""
    lock = _job_lock(job.name)
    if not lock.acquire(blocking=False):
        log.warning(kv(event="refresh-skipped", job=job.name, reason="previous run still running"))
        return RefreshResult(job.name, skipped=True, error="previous run still running")
    try:
        run_id = _begin_run(sessions, job)
        if run_id is None:
            if log_skip:
                log.warning(kv(event="refresh-skipped", job=job.name, reason="running in another process"))
            return RefreshResult(job.name, skipped=True, error="running in another process")
        t0 = time.monotonic()
        result = RefreshResult(job.name)
        try:
            run = _run_worklist if job.kind == "worklist" else _run_studies
            run(config, sessions, job, result, cancel, today)
        except upstream.UpstreamError as exc:
            result.error = str(exc)
        except Exception as exc:  # a bug or the database: record it, the scheduler keeps going
            log.exception(kv(event="refresh-failed", job=job.name))
            result.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        try:
            with sessions.begin() as s:
                s.execute(update(RefreshRun).where(RefreshRun.id == run_id).values(
                    finished_at=utcnow(), status="ok" if result.ok else "error", rows=result.rows,
                    error=result.error))
        except Exception as exc:
            log.error(kv(event="refresh-not-recorded", job=job.name, error=f"{type(exc).__name__}: {exc}"))
        log.log(logging.INFO if result.ok else logging.WARNING, kv(
            event="refresh", job=job.name, node=job.node, result="ok" if result.ok else "error", rows=result.rows,
            new=result.new_studies, updated=result.updated,
            **({"unchanged": result.unchanged} if job.kind == "worklist" else {}), removed=result.removed,
            ms=int((time.monotonic() - t0) * 1000), error=result.error))
        return result
    finally:
        lock.release()


def _run_studies(config: Config, sessions: sessionmaker[Session], job: RefreshJob, result: RefreshResult,
                 cancel: threading.Event | None, today: dt.date | None) -> None:
    """STUDY C-FIND, then every new or changed study learnt down to its instances on up to
    `nodes.NODE.associations` associations at once (jobs/learn.py: the index ends as if learnt one
    by one); then, only if every request succeeded, the studies the node no longer lists removed."""
    identifier = study_identifier(job.query, today)
    size = config.nodes[job.node].associations
    with FindPool(config, job.node, "study", size=size, timeout=job.timeout, cancel=cancel) as pool:
        studies = [m for m in pool.find(identifier) if text_of(m, "StudyInstanceUID")]
        result.rows = len(studies)
        headers = [found_study_header(m) for m in studies]
        del studies  # the headers hold what is needed; thousands of answers need not stay alive
        uids = [h.study_instance_uid for h in headers]
        with sessions.begin() as s:
            known: dict[str, int | None] = {}
            # A study known only from a query-through answer has its counts but no series yet: it
            # is not "unchanged" (its series and instances must still be fetched).
            has_series = select(Series.id).where(Series.study_pk == Study.id).exists()
            for i in range(0, len(uids), 500):
                known.update(s.execute(select(Study.study_instance_uid, Study.number_of_instances)
                                       .where(Study.study_instance_uid.in_(uids[i:i + 500]), has_series)).all())
        unchanged = [h for h in headers
                     if h.study_instance_uid in known and h.study["number_of_instances"] is not None
                     and known[h.study_instance_uid] == h.study["number_of_instances"]]
        unchanged_uids = {h.study_instance_uid for h in unchanged}
        if unchanged:
            with sessions.begin() as s:
                for h in unchanged:
                    upsert_found_study(s, h, job.node)

        def counted(h: Header) -> None:
            if h.study_instance_uid in known:
                result.updated += 1
            else:
                result.new_studies += 1

        learn(pool, sessions, job.node, [(h.study_instance_uid, h) for h in headers  # type: ignore[misc]
                                         if h.study_instance_uid not in unchanged_uids], counted)
    # Every request succeeded: what the node no longer lists is gone there.
    with sessions.begin() as s:
        result.removed = _remove_vanished(s, job, identifier, set(uids))  # type: ignore[arg-type]


def _run_worklist(config: Config, sessions: sessionmaker[Session], job: RefreshJob, result: RefreshResult,
                  cancel: threading.Event | None, today: dt.date | None) -> None:
    """MWL C-FIND to the job's node; every answer (one item per scheduled step, `on: worklist`
    mutations applied) replaces the node's items inside the query's window in one transaction, then
    items older than `worklist.keep_days` are pruned. Nothing is written unless the C-FIND completed."""
    identifier = worklist.refresh_identifier(job.query, today)
    with upstream.find_session(config, job.node, "worklist", timeout=job.timeout, cancel=cancel) as fs:
        answers = fs.find(identifier)
    now = utcnow()
    rows = []
    for answer in answers:
        for ds in worklist.split_steps(answer):
            rules.apply_mutations(ds, rules.mutations_for(config, "worklist", None, ds))
            rows.append(item_row(job.node, ds, now))
    with sessions.begin() as s:
        done = replace(s, job.node, identifier, rows)
        done.pruned = prune(s, config.worklist.keep_days, today)
    result.rows, result.new_studies, result.updated = done.listed, done.new, done.updated
    result.unchanged = done.unchanged
    result.removed = done.removed + done.pruned


# --- the schedule -----------------------------------------------------------------------------


class Refresher:
    """Runs `config.refresh` on their schedules in a background APScheduler, each job first run
    shortly after `start()`. Wire into the server: `start()` after the database is upgraded,
    `stop()` on shutdown (runs in progress are cancelled at their next C-FIND response)."""

    def __init__(self, config: Config, sessions: sessionmaker[Session], first_run_delay: float = 2.0):
        self.config = config
        self.sessions = sessions
        self.first_run_delay = first_run_delay
        self._cancel = threading.Event()
        self._scheduler: Any = None
        self._jobs = {job.name: job for job in config.refresh}

    def start(self) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        self._cancel.clear()
        scheduler = BackgroundScheduler(daemon=True)
        first = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.first_run_delay)
        for job in self._jobs.values():
            trigger = (IntervalTrigger(seconds=job.every) if job.every is not None
                       else CronTrigger.from_crontab(job.cron))
            scheduler.add_job(self._run, trigger, args=[job.name], id=job.name, name=f"refresh {job.name}",
                              max_instances=1, coalesce=True, misfire_grace_time=None, next_run_time=first)
        scheduler.start()
        self._scheduler = scheduler
        log.info(kv(event="refresh-scheduled", jobs=",".join(self._jobs) or "none"))

    def _run(self, name: str) -> None:
        if self._cancel.is_set():
            return
        try:
            run_job(self.config, self.sessions, self._jobs[name], cancel=self._cancel)
        except Exception:  # never let one run kill the schedule
            log.exception(kv(event="refresh-failed", job=name))

    def stop(self) -> None:
        self._cancel.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None


def last_runs(session: Session, names: Iterable[str]) -> dict[str, RefreshRun]:
    """The most recent run of each job name (for `status`)."""
    out: dict[str, RefreshRun] = {}
    for name in names:
        run = session.execute(select(RefreshRun).where(RefreshRun.job_name == name)
                              .order_by(RefreshRun.started_at.desc(), RefreshRun.id.desc()).limit(1)).scalar()
        if run is not None:
            out[name] = run
    return out


__all__ = ["RefreshResult", "Refresher", "run_job", "study_identifier", "last_runs", "learn_studies", "write_study"]
