"""Storage commitment toward modalities: deciding each instance and delivering each report once.

A modality's N-ACTION (scp/commitment.py) is recorded with one row per instance before it is
answered. Under `local` policy every instance is decided there and then; under `upstream` the
instances that are in the spool wait until every `commitment` node they were forwarded to confirmed
them through its own storage commitment (scu/commitment.py asks and records the answers). This
module's thread (worker 0; `Commitment.run_once`) moves transactions along:

    pending --(every item decided, or the deadline)--> ready --(claimed)--> reporting
        --(the requester answered the N-EVENT-REPORT)--> reported
        --(not delivered within commitment.report_expire)--> expired

Delivery: on the requester's own association while it is still open (the N-ACTION response must be
out first: `ResponseSent`), else on a new association to the requesting node, qrproxy proposing the
SCP role for the Storage Commitment SOP class (PS3.4 J.3.3, SCP/SCU role selection). A failed
attempt is retried with backoff (`report_retry_min` .. `report_retry_max`).

Exactly once: a report is built from committed rows, claimed (ready -> reporting, one winner even
with several workers or proxies on one database) and marked reported only after the requester's
N-EVENT-REPORT response. A restart puts this proxy's `reporting` rows back to `ready`; the only
window for a second copy is a crash between the requester's response and the commit of `reported`.

Failure reasons (PS3.4 J.3.2.1.2 / PS3.7 C): 0x0122 the SOP class is not one qrproxy stores,
0x0112 no such instance (not in the spool, or the node reported it missing), 0x0119 the SOP class
differs from the stored instance's, 0x0110 processing failure (held forwarding, the deadline).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select, update

from qrproxy.index.models import CommitmentItem, CommitmentRequest, ForwardItem, ForwardState, SpoolObject, utcnow
from qrproxy.logs import kv
from qrproxy.scu.commitment import PROCESSING_FAILURE, SCPM, SYNTAXES, WELL_KNOWN_INSTANCE, CommitmentSCU, items_of
from qrproxy.scu.forward import backoff
from qrproxy.scu.upstream import UpstreamError, associate

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy.commitment")

NO_SUCH_OBJECT = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
SOP_CLASS_NOT_SUPPORTED = 0x0122
LEASE_SECONDS = 120.0


def aware(when: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands back naive UTC timestamps, PostgreSQL aware ones."""
    if when is not None and when.tzinfo is None:
        return when.replace(tzinfo=dt.timezone.utc)
    return when


@dataclass
class Decision:
    state: str  # committed | failed | pending
    failure_reason: int | None = None
    reason: str | None = None
    object_pk: int | None = None


def spool_object(session: Any, sop_instance_uid: str) -> SpoolObject | None:
    return session.execute(select(SpoolObject).where(
        SpoolObject.sop_instance_uid == sop_instance_uid, SpoolObject.origin != "superseded")
        .order_by(SpoolObject.id.desc()).limit(1)).scalar()


def decide_local(spool: Spool, session: Any, sop_class: str, sop_instance: str, supported: set[str],
                 policy: str) -> Decision:
    """What the spool says about one referenced instance; `pending` under upstream policy when the
    spool holds it (the nodes decide then)."""
    if sop_class not in supported:
        return Decision("failed", SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not stored by qrproxy")
    obj = spool_object(session, sop_instance)
    if obj is None:
        return Decision("failed", NO_SUCH_OBJECT, "not in the spool")
    if obj.sop_class_uid != sop_class:
        return Decision("failed", CLASS_INSTANCE_CONFLICT, f"stored as SOP class {obj.sop_class_uid}")
    if not os.path.exists(spool.path(obj.path)):
        return Decision("failed", PROCESSING_FAILURE, "spool file missing")
    if policy == "upstream":
        return Decision("pending", object_pk=obj.id)
    return Decision("committed", object_pk=obj.id)


def event_information(req: CommitmentRequest, items: list[CommitmentItem]) -> tuple[int, Dataset]:
    """(event type, Event Information) of the report for `req` (PS3.4 J.3.3.1.1)."""
    ds = Dataset()
    ds.TransactionUID = req.transaction_uid
    ok, failed = [], []
    for item in items:
        ref = Dataset()
        ref.ReferencedSOPClassUID = item.sop_class_uid
        ref.ReferencedSOPInstanceUID = item.sop_instance_uid
        if item.state == "committed":
            ok.append(ref)
        else:
            ref.FailureReason = item.failure_reason or PROCESSING_FAILURE
            failed.append(ref)
    if ok:
        ds.ReferencedSOPSequence = ok
    if failed:
        ds.FailedSOPSequence = failed
    return (2 if failed else 1), ds


@dataclass
class OpenAssociation:
    """The requester's association, usable for the report once the N-ACTION response is out."""

    assoc: Any
    response_sent: threading.Event = field(default_factory=threading.Event)


class Commitment:
    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool, supported: set[str],
                 notify_forward: Callable[[list[str]], None], worker: int = 0):
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.notify_forward = notify_forward  # the forwarder: an instance a node lost is queued again
        self.primary = worker == 0
        self.owner = f"{socket.gethostname()}:{config.port}:{worker}"
        self.supported = supported  # the storage SOP classes qrproxy accepts (scp/store.py)
        self.scu = CommitmentSCU(config, sessions, on_change=self.notify)
        self.open: dict[str, OpenAssociation] = {}  # transaction UID -> requester's association
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the requester's association (filled by scp/commitment.py) ------------------------------

    def register(self, transaction_uid: str, assoc: Any) -> None:
        with self._lock:
            self.open[transaction_uid] = OpenAssociation(assoc)

    def response_sent(self, assoc: Any) -> None:
        with self._lock:
            for entry in self.open.values():
                if entry.assoc is assoc:
                    entry.response_sent.set()
        self.notify()

    def forget(self, assoc: Any) -> None:
        with self._lock:
            for uid in [u for u, e in self.open.items() if e.assoc is assoc]:
                del self.open[uid]

    def _usable(self, transaction_uid: str) -> Any:
        with self._lock:
            entry = self.open.get(transaction_uid)
        if entry is None or not entry.response_sent.is_set():
            return None
        return None if entry.assoc.release_pending() else entry.assoc

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        if self.primary:
            self.recover()
        self._thread = threading.Thread(target=self._run, name="commitment", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def recover(self) -> int:
        """Reports this proxy was delivering when it stopped (or whose lease ran out) are owed again."""
        now = utcnow()
        with self.sessions.begin() as s:
            n = s.execute(update(CommitmentRequest).where(
                CommitmentRequest.direction == "in", CommitmentRequest.state == "reporting",
                (CommitmentRequest.lease_owner == self.owner) | (CommitmentRequest.lease_until < now)
                | CommitmentRequest.lease_owner.is_(None))
                .values(state="ready", lease_owner=None, lease_until=None, next_attempt_at=now)).rowcount
        if n:
            log.info(kv(event="commitment-recovered", transactions=n, reason="report in flight when the previous run stopped"))
        return n or 0

    def _run(self) -> None:
        poll = self.config.forward.poll
        while not self._stop.is_set():
            self._wake.clear()
            wait = poll
            try:
                wait = min(wait, self.run_once())
            except Exception:  # the database, a bug: keep the thread, try again at the next poll
                log.exception(kv(event="commitment-failed"))
            self._wake.wait(max(0.05, wait))

    def run_once(self) -> float:
        """One pass; returns seconds until something is due."""
        wait = 3600.0
        if self.primary:
            needs = self.resolve()
            wait = min(wait, self.scu.run(needs))
        return min(wait, self.deliver())

    # --- deciding -------------------------------------------------------------------------------

    def resolve(self) -> dict[str, list[tuple[str, str]]]:
        """Decide what can be decided of pending transactions; returns node -> [(SOP class, SOP
        instance)] that need a commitment request to that node."""
        now = utcnow()
        needs: dict[str, set[tuple[str, str]]] = {}
        with self.sessions.begin() as s:
            ids = list(s.execute(select(CommitmentRequest.id).where(
                CommitmentRequest.direction == "in", CommitmentRequest.state == "pending")
                .order_by(CommitmentRequest.id).limit(200)).scalars())
        for rid in ids:
            with self.sessions.begin() as s:
                req = s.get(CommitmentRequest, rid)
                if req is None or req.state != "pending":
                    continue
                items = items_of(s, rid)
                late = aware(req.deadline_at) is not None and now >= aware(req.deadline_at)  # type: ignore[operator]
                for item in items:
                    if item.state != "pending":
                        continue
                    decision, wanted = self._decide_upstream(s, item)
                    if decision is not None:
                        item.state, item.failure_reason, item.reason = (decision.state, decision.failure_reason,
                                                                        decision.reason)
                        continue
                    if late:
                        what = wanted if isinstance(wanted, str) else "commitment from " + ", ".join(sorted(wanted))
                        item.state, item.failure_reason = "failed", PROCESSING_FAILURE
                        item.reason = f"deadline reached waiting for {what}"
                        continue
                    if isinstance(wanted, dict):
                        for node, pair in wanted.items():
                            needs.setdefault(node, set()).add(pair)
                if all(i.state != "pending" for i in items):
                    req.state, req.next_attempt_at = "ready", now
                    failed = sum(1 for i in items if i.state == "failed")
                    log.info(kv(event="commitment-decided", transaction=req.transaction_uid, requester=req.requester_ae,
                                policy=req.policy, committed=len(items) - failed, failed=failed,
                                deadline="reached" if late else "-"))
        return {node: sorted(pairs) for node, pairs in needs.items()}

    def _decide_upstream(self, s: Any, item: CommitmentItem) -> tuple[Decision | None, Any]:
        """(a final Decision, None) or (None, what it waits for: text, or node -> (class, uid) to ask)."""
        obj = spool_object(s, item.sop_instance_uid)
        if obj is None:
            return Decision("failed", NO_SUCH_OBJECT, "no longer in the spool"), None
        nodes = set(self.config.nodes_with_role("commitment"))
        rows = [r for r in s.execute(select(ForwardItem).where(ForwardItem.object_pk == obj.id)).scalars()
                if r.node in nodes]
        if not rows:
            return Decision("failed", PROCESSING_FAILURE, "not forwarded to any commitment node"), None
        waiting: list[str] = []
        ask: dict[str, tuple[str, str]] = {}
        resend = self.config.commitment.upstream_resend
        for row in rows:
            if row.state == ForwardState.held:
                return Decision("failed", PROCESSING_FAILURE, f"{row.node}: forwarding held: {row.last_error}"), None
            if row.state != ForwardState.sent:
                waiting.append(f"forwarding to {row.node}")
                continue
            latest = s.execute(select(CommitmentItem, CommitmentRequest).join(CommitmentRequest).where(
                CommitmentRequest.direction == "out", CommitmentRequest.node == row.node,
                CommitmentItem.sop_instance_uid == item.sop_instance_uid)
                .order_by(CommitmentItem.id.desc()).limit(1)).first()
            if latest is None or latest[0].state == "expired":
                ask[row.node] = (obj.sop_class_uid, item.sop_instance_uid)
            elif latest[0].state == "committed":
                continue
            elif latest[0].state == "pending":
                waiting.append(f"commitment from {row.node}")
            else:  # failed
                out_item, out_req = latest
                failures = s.execute(select(func.count()).select_from(CommitmentItem).join(CommitmentRequest).where(
                    CommitmentRequest.direction == "out", CommitmentRequest.node == row.node,
                    CommitmentItem.sop_instance_uid == item.sop_instance_uid,
                    CommitmentItem.state == "failed")).scalar_one()
                if failures > resend:
                    return Decision("failed", out_item.failure_reason or PROCESSING_FAILURE,
                                    f"{row.node}: {out_item.reason or 'failed'}"), None
                reported = aware(out_req.reported_at)
                if reported is not None and aware(row.sent_at) is not None and aware(row.sent_at) > reported:  # type: ignore[operator]
                    ask[row.node] = (obj.sop_class_uid, item.sop_instance_uid)
                else:
                    self._resend(s, row, out_item)
                    waiting.append(f"forwarding to {row.node} again")
        if not waiting and not ask:
            return Decision("committed"), None
        if ask:
            return None, ask
        return None, ", ".join(waiting)

    def _resend(self, s: Any, row: ForwardItem, out_item: CommitmentItem) -> None:
        s.execute(update(ForwardItem).where(ForwardItem.id == row.id).values(
            state=ForwardState.pending, next_attempt_at=utcnow(), lease_owner=None, lease_until=None,
            last_error=f"commitment failed at {row.node} (0x{out_item.failure_reason or 0:04X}): sending again"))
        log.warning(kv(event="commitment-resend", node=row.node, sop=out_item.sop_instance_uid,
                       reason=f"0x{out_item.failure_reason or 0:04X} {out_item.reason or ''}".strip()))
        self.notify_forward([row.node])

    # --- delivering -----------------------------------------------------------------------------

    def deliver(self) -> float:
        """Send the reports that are due; returns seconds until the next one is."""
        now = utcnow()
        with self._lock:
            here = set(self.open)
        with self.sessions.begin() as s:
            q = select(CommitmentRequest.id, CommitmentRequest.transaction_uid, CommitmentRequest.next_attempt_at).where(
                CommitmentRequest.direction == "in", CommitmentRequest.state == "ready").order_by(
                CommitmentRequest.next_attempt_at).limit(100)
            rows = s.execute(q).all()
        wait = 3600.0
        for rid, uid, due in rows:
            if self._stop.is_set():
                break
            left = (aware(due) - now).total_seconds() if due is not None else 0.0  # type: ignore[operator]
            same = uid in here and self._usable(uid) is not None
            if not same and not self.primary:
                continue
            if left > 0 and not same:
                wait = min(wait, left)
                continue
            if self._claim(rid):
                self._report(rid, same)
        return wait

    def _claim(self, rid: int) -> bool:
        now = utcnow()
        with self.sessions.begin() as s:
            return s.execute(update(CommitmentRequest).where(
                CommitmentRequest.id == rid, CommitmentRequest.state == "ready").values(
                state="reporting", lease_owner=self.owner,
                lease_until=now + dt.timedelta(seconds=LEASE_SECONDS))).rowcount == 1

    def _report(self, rid: int, same: bool) -> None:
        with self.sessions.begin() as s:
            req = s.get(CommitmentRequest, rid)
            items = items_of(s, rid)
            s.expunge_all()
        event_type, info = event_information(req, items)  # type: ignore[arg-type]
        path = "-"
        try:
            assoc = self._usable(req.transaction_uid) if same else None  # type: ignore[union-attr]
            if assoc is not None:
                path = "same-association"
                status = _report_on(assoc, event_type, info)
            elif not self.primary:
                raise UpstreamError("the requester's association is closed")
            else:
                path = "new-association"
                status = self._report_new(req, event_type, info)  # type: ignore[arg-type]
        except (UpstreamError, OSError, RuntimeError, ValueError) as exc:
            self._retry(req, path, str(exc))  # type: ignore[arg-type]
            return
        if status is None or not (status == 0x0000 or 0x0001 <= status <= 0x00FF or 0xB000 <= status <= 0xBFFF):
            what = "no response" if status is None else f"status 0x{status:04X}"
            self._retry(req, path, f"N-EVENT-REPORT {what}")  # type: ignore[arg-type]
            return
        with self.sessions.begin() as s:
            s.execute(update(CommitmentRequest).where(CommitmentRequest.id == rid).values(
                state="reported", reported_at=utcnow(), lease_owner=None, lease_until=None,
                report_attempts=req.report_attempts + 1, last_error=None))  # type: ignore[union-attr]
        failed = sum(1 for i in items if i.state != "committed")
        log.info(kv(event="commitment-reported", transaction=req.transaction_uid, requester=req.requester_ae,  # type: ignore[union-attr]
                    via=path, event_type=event_type, committed=len(items) - failed, failed=failed,
                    status=f"0x{status:04X}"))

    def _report_new(self, req: CommitmentRequest, event_type: int, info: Dataset) -> int | None:
        cfg = self.config
        if req.node is None or req.node not in cfg.nodes:
            raise UpstreamError(f"requester {req.requester_ae} is not a configured node: no address for the report")
        # qrproxy is the requestor of this association but plays the SCP role (PS3.4 J.3.3)
        for roles in ({SCPM: (False, True)}, None):
            with associate(cfg, req.node, [(SCPM, SYNTAXES)], roles=roles) as assoc:
                if not any(cx.abstract_syntax == SCPM for cx in assoc.accepted_contexts):
                    continue  # some peers refuse role selection: once more with default roles
                return _report_on(assoc, event_type, info)
        raise UpstreamError(f"{req.node}: Storage Commitment Push Model not accepted")

    def _retry(self, req: CommitmentRequest, path: str, error: str) -> None:
        cfg = self.config.commitment
        attempts = req.report_attempts + 1
        now = utcnow()
        expired = (now - aware(req.received_at)).total_seconds() >= cfg.report_expire  # type: ignore[operator]
        delay = backoff(attempts, cfg.report_retry_min, cfg.report_retry_max)
        if path == "same-association" or not self.primary:
            delay = 0.0  # the requester left: try a new association at once
        with self.sessions.begin() as s:
            s.execute(update(CommitmentRequest).where(CommitmentRequest.id == req.id).values(
                state="expired" if expired else "ready", lease_owner=None, lease_until=None,
                report_attempts=attempts, last_error=f"{path}: {error}"[:500],
                next_attempt_at=now + dt.timedelta(seconds=delay)))
        self.forget_transaction(req.transaction_uid)
        log.log(logging.ERROR if expired else logging.WARNING,
                kv(event="commitment-report-failed", transaction=req.transaction_uid, requester=req.requester_ae,
                   via=path, attempts=attempts, action="expired" if expired else "retry",
                   retry_in=f"{delay:.1f}s", reason=error))

    def forget_transaction(self, uid: str) -> None:
        with self._lock:
            self.open.pop(uid, None)


def _report_on(assoc: Any, event_type: int, info: Dataset) -> int | None:
    status, _ = assoc.send_n_event_report(info, event_type, SCPM, WELL_KNOWN_INSTANCE)
    code = getattr(status, "Status", None)
    return None if code is None else int(code)


def pending_summary(session: Any, limit: int = 10) -> tuple[dict[str, int], list[dict[str, Any]], dict[str, dict[str, int]]]:
    """For `qrproxy status`: in-transaction counts by state, the oldest open ones, out requests
    per node and state."""
    req = CommitmentRequest
    counts = {state: n for state, n in session.execute(
        select(req.state, func.count()).where(req.direction == "in").group_by(req.state))}
    open_rows = []
    for r in session.execute(select(req).where(req.direction == "in", req.state.in_(("pending", "ready", "reporting",
                                                                                      "expired")))
                             .order_by(req.received_at).limit(limit)).scalars():
        states = dict(session.execute(select(CommitmentItem.state, func.count()).where(
            CommitmentItem.request_pk == r.id).group_by(CommitmentItem.state)).all())
        open_rows.append({"transaction": r.transaction_uid, "requester": r.requester_ae, "state": r.state,
                          "policy": r.policy or "-", "received_at": r.received_at, "items": states,
                          "attempts": r.report_attempts, "error": r.last_error or ""})
    out: dict[str, dict[str, int]] = {}
    for node, state, n in session.execute(select(req.node, req.state, func.count()).where(req.direction == "out")
                                          .group_by(req.node, req.state)):
        out.setdefault(node or "-", {})[state] = n
    return counts, open_rows, out


__all__ = ["Commitment", "decide_local", "event_information", "items_of", "pending_summary"]
