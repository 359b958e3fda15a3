"""Storage Commitment Push Model SCP (1.2.840.10008.1.20.1): N-ACTION from modalities, and
N-EVENT-REPORT from `commitment` nodes answering qrproxy's own requests (scu/commitment.py).

N-ACTION (Request Storage Commitment, action type 1): the transaction and one row per referenced
instance are committed before the response (under `local` policy each instance is decided there
and then, jobs/commitment.py), so a restart after the response still owes the report. Answered
at once; the report follows from commitment.py, on this association while the requester keeps it
open (once the response is out: EVT_DIMSE_SENT), else on a new one.

Refusals: action type other than 1 0x0123 (no such action); no Transaction UID or an empty
Referenced SOP Sequence 0x0115 (invalid argument value); a calling AE that is no configured node
0x0110 (there would be no address for the report); the database unusable 0x0110. A repeated
N-ACTION with a known Transaction UID is answered Success and changes nothing (its report is
owed, or was delivered, once).

Contexts accept both roles (scu_role and scp_role True): a modality asking for commitment proposes
the default roles, a node sending its report on a new association may propose the SCP role.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from sqlalchemy import select

from qrproxy.index.models import CommitmentItem, CommitmentRequest, utcnow
from qrproxy.jobs.commitment import SCPM, SYNTAXES, decide_local
from qrproxy.logs import kv
from qrproxy.scp.associations import called_ae_title
from qrproxy.scp.responses import Refused
from qrproxy.scp.responses import status as _status

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.jobs.commitment import Commitment
    from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy.commitment")

N_ACTION = 0x0130  # PS3.7 E.1 command field

NO_SUCH_ACTION = 0x0123
INVALID_ARGUMENT = 0x0115
PROCESSING_FAILURE = 0x0110


class CommitmentSCP:
    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool, engine: Commitment):
        self.config = config
        self.sessions = sessions
        self.spool = spool
        self.engine = engine  # the transaction thread (jobs/commitment.py): decides and reports

    def on_action(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        t0 = time.monotonic()
        cfg = self.config
        calling = (event.assoc.requestor.ae_title or "").strip()
        line: dict[str, Any] = {"event": "commitment-request", "calling": calling,
                                "called": called_ae_title(event.assoc)}
        try:
            if event.request.ActionTypeID != 1:
                raise Refused(NO_SUCH_ACTION, f"action type {event.request.ActionTypeID}: only 1 is defined")
            ds = event.action_information
            uid = str(ds.get("TransactionUID", "") or "").strip()
            refs = list(ds.get("ReferencedSOPSequence", None) or [])
            line["transaction"] = uid
            pairs = [(str(r.get("ReferencedSOPClassUID", "") or ""), str(r.get("ReferencedSOPInstanceUID", "") or ""))
                     for r in refs]
            if not uid or not pairs or any(not c or not i for c, i in pairs):
                raise Refused(INVALID_ARGUMENT, "Transaction UID and Referenced SOP Sequence items are required")
            found = cfg.node_for_ae(calling)
            if found is None:
                raise Refused(PROCESSING_FAILURE, f"calling AE {calling} is not a configured node")
            node = found[0]
            policy, deadline = cfg.commitment_policy(node)
            duplicate = False
            with self.sessions.begin() as s:
                if s.execute(select(CommitmentRequest.id).where(CommitmentRequest.transaction_uid == uid)).first():
                    duplicate = True
                else:
                    now = utcnow()
                    req = CommitmentRequest(transaction_uid=uid, direction="in", node=node, requester_ae=calling[:16],
                                            policy=policy, received_at=now, next_attempt_at=now,
                                            deadline_at=now + dt.timedelta(seconds=deadline))
                    items = []
                    for sop_class, sop_instance in pairs:
                        d = decide_local(self.spool, s, sop_class, sop_instance, self.engine.supported, policy)
                        items.append(CommitmentItem(sop_class_uid=sop_class[:64], sop_instance_uid=sop_instance[:64],
                                                    state=d.state, failure_reason=d.failure_reason, reason=d.reason))
                    req.items = items
                    req.state = "pending" if any(i.state == "pending" for i in items) else "ready"
                    s.add(req)
        except Exception as exc:
            if isinstance(exc, Refused):
                log.warning(kv(**line, status=f"0x{exc.status:04X}", reason=str(exc)))
                return _status(exc.status, exc.comment), None
            log.exception("storage commitment request not recorded")
            comment = f"not recorded: {type(exc).__name__}"
            log.error(kv(**line, status=f"0x{PROCESSING_FAILURE:04X}", reason=comment))
            return _status(PROCESSING_FAILURE, comment), None
        if not duplicate:
            self.engine.register(uid, event.assoc)
        failed = sum(1 for i in items if i.state == "failed") if not duplicate else 0
        log.info(kv(**line, status="0x0000", node=node, policy=policy, instances=len(pairs), failed=failed,
                    duplicate=str(duplicate).lower(), ms=int((time.monotonic() - t0) * 1000)))
        return 0x0000, None

    # association observer: once the N-ACTION response is out, the report may use the association
    def on_dimse_sent(self, assoc: Any, request: Any, status: int) -> None:
        if request.field == N_ACTION:
            self.engine.response_sent(assoc)

    def on_released(self, assoc: Any) -> None:
        self.engine.forget(assoc)

    on_aborted = on_close = on_released

    def on_event_report(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        """A node's report on qrproxy's own commitment request, on a new association."""
        calling = (event.assoc.requestor.ae_title or "").strip()
        try:
            info = event.event_information
            status, comment = self.engine.scu.record_report(calling, int(event.request.EventTypeID or 0), info,
                                                            "new-association")
        except Exception as exc:
            log.exception("storage commitment report not recorded")
            return _status(PROCESSING_FAILURE, f"not recorded: {type(exc).__name__}"), None
        if status != 0x0000:
            return _status(status, comment), None
        return 0x0000, None


def contexts() -> list[tuple[str, list[str]]]:
    return [(SCPM, SYNTAXES)]


def service(config: Config, sessions: sessionmaker[Session], spool: Spool, engine: Commitment) -> CommitmentSCP:
    """The N-ACTION and N-EVENT-REPORT service; it also observes associations (on_dimse_sent, ...)."""
    return CommitmentSCP(config, sessions, spool, engine)
