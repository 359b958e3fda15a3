"""Storage commitment toward the `commitment` nodes (qrproxy as SCU), for the `upstream` policy.

commitment.py says which forwarded instances need a node's confirmation; this module asks: one
N-ACTION per batch (`commitment.upstream_batch` instances, one batch per modality transaction as
they arrive), recorded as an "out" transaction (state new) *before* it is sent, so a crash re-sends
the same Transaction UID rather than forgetting it. The node's N-EVENT-REPORT may come on the same
association (qrproxy listens for REPORT_WAIT seconds after its N-ACTIONs) or on a new one to
qrproxy's port (scp/commitment.py; the calling AE must be the node's); either way `record_report`
writes each instance's outcome. An instance the node reports failed is forwarded again by
commitment.py (`upstream_resend` times) and asked about again; a node that stays silent for
`upstream_wait` is asked again with a new transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select, update

from qrproxy.index.models import CommitmentItem, CommitmentRequest, utcnow
from qrproxy.logs import kv
from qrproxy.net import dimse
from qrproxy.scu.forward import backoff
from qrproxy.scu.upstream import UpstreamError, associate

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.commitment")

SCPM = str(StorageCommitmentPushModel)
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # Storage Commitment Push Model SOP Instance
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
PROCESSING_FAILURE = 0x0110


def items_of(session: Any, request_pk: int) -> list[CommitmentItem]:
    return list(session.execute(select(CommitmentItem).where(CommitmentItem.request_pk == request_pk)
                                .order_by(CommitmentItem.id)).scalars())


REPORT_WAIT = 2.0  # seconds a node may take to answer on the N-ACTION's own association


class CommitmentSCU:
    def __init__(self, config: Config, sessions: sessionmaker[Session], on_change: Callable[[], None]):
        self.config = config
        self.sessions = sessions
        self.on_change = on_change  # the transaction thread (jobs/commitment.py) looks again
        self._backoff_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def run(self, needs: dict[str, list[tuple[str, str]]]) -> float:
        self.expire()
        self.create(needs)
        return self.send_new()

    # --- the database side ----------------------------------------------------------------------

    def create(self, needs: dict[str, list[tuple[str, str]]]) -> None:
        batch = self.config.commitment.upstream_batch
        for node, pairs in needs.items():
            for i in range(0, len(pairs), batch):
                with self.sessions.begin() as s:
                    req = CommitmentRequest(transaction_uid=generate_uid(), direction="out", node=node,
                                            requester_ae=self.config.ae_title, state="new")
                    req.items = [CommitmentItem(sop_class_uid=c, sop_instance_uid=u, state="pending")
                                 for c, u in pairs[i:i + batch]]
                    s.add(req)

    def expire(self) -> None:
        """A node that has not reported within `upstream_wait` is asked again (commitment.py sees the
        items expired and asks for them in a new transaction)."""
        limit = utcnow() - dt.timedelta(seconds=self.config.commitment.upstream_wait)
        with self.sessions.begin() as s:
            ids = list(s.execute(select(CommitmentRequest.id).where(
                CommitmentRequest.direction == "out", CommitmentRequest.state == "requested",
                CommitmentRequest.received_at < limit)).scalars())
            if not ids:
                return
            s.execute(update(CommitmentRequest).where(CommitmentRequest.id.in_(ids)).values(
                state="expired", last_error="no report within commitment.upstream_wait"))
            s.execute(update(CommitmentItem).where(CommitmentItem.request_pk.in_(ids),
                                                   CommitmentItem.state == "pending").values(
                state="expired", reason="no report from the node"))
        log.warning(kv(event="commitment-upstream-expired", transactions=len(ids), action="ask again"))

    def record_report(self, calling_ae: str, event_type: int, info: Dataset, via: str) -> tuple[int, str]:
        """Write a node's N-EVENT-REPORT; returns the (status, comment) to answer it with."""
        uid = str(info.get("TransactionUID", "") or "")
        ok = {str(r.get("ReferencedSOPInstanceUID", "")) for r in info.get("ReferencedSOPSequence", None) or []}
        failed = {str(r.get("ReferencedSOPInstanceUID", "")): int(r.get("FailureReason", PROCESSING_FAILURE) or
                                                                   PROCESSING_FAILURE)
                  for r in info.get("FailedSOPSequence", None) or []}
        with self.sessions.begin() as s:
            req = s.execute(select(CommitmentRequest).where(CommitmentRequest.transaction_uid == uid,
                                                            CommitmentRequest.direction == "out")).scalar()
            if req is None:
                log.warning(kv(event="commitment-report-unknown", calling=calling_ae, transaction=uid, via=via))
                return PROCESSING_FAILURE, "unknown Transaction UID"
            node = self.config.nodes.get(req.node or "")
            if node is None or node.ae_title != calling_ae.strip():
                log.warning(kv(event="commitment-report-refused", calling=calling_ae, transaction=uid, node=req.node))
                return PROCESSING_FAILURE, "transaction belongs to another node"
            if req.state in ("done", "expired"):
                return 0x0000, ""  # a repeated report (the node did not see our answer)
            counts = {"committed": 0, "failed": 0}
            for item in s.execute(select(CommitmentItem).where(CommitmentItem.request_pk == req.id)).scalars():
                if item.sop_instance_uid in failed:
                    code = failed[item.sop_instance_uid]
                    item.state, item.failure_reason = "failed", code
                    item.reason = f"reported failed with reason 0x{code:04X}"
                elif item.sop_instance_uid in ok:
                    item.state = "committed"
                else:
                    item.state, item.failure_reason = "failed", PROCESSING_FAILURE
                    item.reason = "missing from the node's report"
                counts[item.state] += 1
            req.state, req.reported_at = "done", utcnow()
            node_name = req.node
        log.info(kv(event="commitment-upstream-report", node=node_name, transaction=uid, via=via,
                    event_type=event_type, committed=counts["committed"], failed=counts["failed"]))
        self.on_change()
        return 0x0000, ""

    # --- the wire side --------------------------------------------------------------------------

    def send_new(self) -> float:
        """Send the N-ACTIONs not yet answered; returns seconds until a node in backoff is due."""
        with self.sessions.begin() as s:
            rows = s.execute(select(CommitmentRequest.id, CommitmentRequest.node).where(
                CommitmentRequest.direction == "out", CommitmentRequest.state == "new")
                .order_by(CommitmentRequest.id).limit(100)).all()
        by_node: dict[str, list[int]] = {}
        for rid, node in rows:
            by_node.setdefault(node, []).append(rid)
        wait = 3600.0
        for node, ids in by_node.items():
            left = self._backoff_until.get(node, 0.0) - time.monotonic()
            if left > 0:
                wait = min(wait, left)
                continue
            if node not in self.config.nodes:
                continue
            try:
                self._send(node, ids)
                self._failures[node] = 0
            except UpstreamError as exc:
                fails = self._failures[node] = self._failures.get(node, 0) + 1
                cfg = self.config.forward
                delay = backoff(fails, cfg.retry_min, cfg.retry_max)
                self._backoff_until[node] = time.monotonic() + delay
                wait = min(wait, delay)
                log.warning(kv(event="node-down", node=node, service="commitment", reason=str(exc),
                               retry_in=f"{delay:.1f}s", pending=len(ids)))
        return wait

    def _send(self, node: str, ids: list[int]) -> None:
        asked: set[str] = set()
        with associate(self.config, node, [(SCPM, SYNTAXES)]) as assoc:
            if not any(cx.abstract_syntax == SCPM for cx in assoc.accepted_contexts):
                self._refused(ids, "the node does not accept Storage Commitment Push Model")
                return
            for rid in ids:
                with self.sessions.begin() as s:
                    req = s.get(CommitmentRequest, rid)
                    if req is None or req.state != "new":
                        continue
                    items = items_of(s, rid)
                    uid = req.transaction_uid
                ds = Dataset()
                ds.TransactionUID = uid
                refs = []
                for item in items:
                    ref = Dataset()
                    ref.ReferencedSOPClassUID = item.sop_class_uid
                    ref.ReferencedSOPInstanceUID = item.sop_instance_uid
                    refs.append(ref)
                ds.ReferencedSOPSequence = refs
                try:
                    status, _ = assoc.send_n_action(ds, 1, SCPM, WELL_KNOWN_INSTANCE)
                except (OSError, RuntimeError, ValueError) as exc:
                    raise UpstreamError(f"{node}: N-ACTION: {exc}") from exc
                code = getattr(status, "Status", None)
                if code is None:
                    raise UpstreamError(f"{node}: no N-ACTION response")
                if code != 0x0000:
                    self._refused([rid], f"N-ACTION status 0x{int(code):04X}", int(code))
                    continue
                with self.sessions.begin() as s:
                    s.execute(update(CommitmentRequest).where(CommitmentRequest.id == rid,
                                                              CommitmentRequest.state == "new")
                              .values(state="requested", received_at=utcnow()))
                asked.add(uid)
                log.info(kv(event="commitment-requested", node=node, transaction=uid, instances=len(items)))
            self._await_reports(assoc, node, asked)

    def _refused(self, ids: list[int], why: str, code: int = PROCESSING_FAILURE) -> None:
        """The node will not commit these: their items fail (and count toward upstream_resend)."""
        with self.sessions.begin() as s:
            s.execute(update(CommitmentRequest).where(CommitmentRequest.id.in_(ids)).values(
                state="done", reported_at=utcnow(), last_error=why))
            s.execute(update(CommitmentItem).where(CommitmentItem.request_pk.in_(ids)).values(
                state="failed", failure_reason=code if code in (0x0110, 0x0112, 0x0119, 0x0122) else PROCESSING_FAILURE,
                reason=why))
        log.warning(kv(event="commitment-request-refused", transactions=len(ids), reason=why))
        self.on_change()

    def _await_reports(self, assoc: Any, node: str, asked: set[str]) -> None:
        """Serve N-EVENT-REPORTs the node sends on this association for up to REPORT_WAIT seconds
        (answered on the association, in its own thread)."""
        calling = self.config.nodes[node].ae_title
        deadline = time.monotonic() + REPORT_WAIT
        while asked and assoc.is_established and time.monotonic() < deadline:
            req = assoc.next_request(max(0.05, min(0.25, deadline - time.monotonic())))
            if req is None:
                asked = self._still_open(asked)
                continue
            if req.request.field != dimse.N_EVENT_REPORT or req.raw is None:
                log.warning(kv(event="commitment-unexpected-message", node=node, message=req.request.name))
                assoc.respond(req, 0x0211 if req.request.field & 0x0100 else 0xC000)  # unrecognised operation
                continue
            info = req.event_information
            status, _ = self.record_report(calling, int(req.request.EventTypeID or 0), info, "same-association")
            assoc.respond(req, status)
            asked.discard(str(info.get("TransactionUID", "")))
        assoc.dimse_timeout = self.config.nodes[node].timeout

    def _still_open(self, asked: set[str]) -> set[str]:
        """Drop the transactions already reported on another association."""
        with self.sessions.begin() as s:
            return set(s.execute(select(CommitmentRequest.transaction_uid).where(
                CommitmentRequest.transaction_uid.in_(asked), CommitmentRequest.state == "requested")).scalars())


__all__ = ["CommitmentSCU", "REPORT_WAIT"]
