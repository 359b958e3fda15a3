"""Modality Performed Procedure Step SCP (1.2.840.10008.3.1.2.3.3): N-CREATE and N-SET.

Each request is recorded in one transaction, together with one relay message per `mpps` node
(scu/mpps.py sends them, in order, with retries), before the modality gets Success: an
acknowledged step reaches the upstream after an outage or a restart. A step set to COMPLETED or
DISCONTINUED marks the worklist items it refers to (Scheduled Step Attributes Sequence) done in
the same transaction, so the next worklist query no longer lists them.

Statuses (PS3.4 F.7.2): N-CREATE with a status other than IN PROGRESS 0x0106 (invalid attribute
value), an existing instance 0x0111 (duplicate SOP instance); N-SET of an unknown instance 0x0112
(no such object instance), of a step already COMPLETED/DISCONTINUED 0x0110 (processing failure),
to an unknown status 0x0106; the database unusable 0x0110 (the modality retries later).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select

from qrproxy.index.models import MppsMessage, MppsStep
from qrproxy.index.writers import text_of
from qrproxy.logs import kv
from qrproxy.query import worklist
from qrproxy.query.worklist_index import mark_done
from qrproxy.scp.associations import called_ae_title
from qrproxy.scp.responses import Refused
from qrproxy.scp.responses import status as _status

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.scu.mpps import MppsRelay

log = logging.getLogger("qrproxy.mpps")

MPPS = str(ModalityPerformedProcedureStep)
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
STATUSES = ("IN PROGRESS", "COMPLETED", "DISCONTINUED")
INVALID_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE = 0x0111
NO_SUCH_INSTANCE = 0x0112


def merge(step: Dataset, modifications: Dataset) -> Dataset:
    """N-SET semantics (PS3.7 10.1.1): each attribute of the modification list replaces the step's."""
    for elem in modifications:
        step[elem.tag] = elem
    return step


def _refusal(exc: Exception, line: dict[str, Any], what: str) -> Dataset:
    """The status of an N-CREATE / N-SET that was not recorded, logged: a Refused one with its own
    status, anything else (a bug, the database) as a processing failure."""
    if isinstance(exc, Refused):
        log.warning(kv(**line, status=f"0x{exc.status:04X}", reason=exc.comment))
        return _status(exc.status, exc.comment)
    log.exception(f"MPPS {what} not recorded")
    comment = f"not recorded: {type(exc).__name__}"
    log.error(kv(**line, status=f"0x{PROCESSING_FAILURE:04X}", reason=comment))
    return _status(PROCESSING_FAILURE, comment)


class MppsSCP:
    def __init__(self, config: Config, sessions: sessionmaker[Session], relay: MppsRelay | None):
        self.sessions = sessions
        self.relay = relay  # forwards the messages to `mpps` nodes (worker 0 runs it)
        self.nodes = list(config.nodes_with_role("mpps"))

    def _enqueue(self, session: Any, step_pk: int, operation: str, uid: str, payload: bytes, calling: str) -> None:
        for node in self.nodes:
            session.add(MppsMessage(step_pk=step_pk, node=node, operation=operation, sop_instance_uid=uid,
                                    payload=payload, calling_ae=calling[:16] or None))

    def _notify(self) -> None:
        if self.relay is not None and self.nodes:
            self.relay.notify()

    def on_create(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        t0 = time.monotonic()
        calling = (event.assoc.requestor.ae_title or "").strip()
        given = event.request.AffectedSOPInstanceUID
        uid = str(given) if given else generate_uid()
        line: dict[str, Any] = {"event": "n-create", "calling": calling, "called": called_ae_title(event.assoc),
                                "sop": uid}
        try:
            ds = event.attribute_list
            state = str(ds.get("PerformedProcedureStepStatus", "") or "").strip().upper()
            if state != "IN PROGRESS":
                raise Refused(INVALID_VALUE, f"PerformedProcedureStepStatus {state!r}: must be IN PROGRESS")
            payload = worklist.encode(ds)
            with self.sessions.begin() as s:
                if s.execute(select(MppsStep.id).where(MppsStep.sop_instance_uid == uid)).first() is not None:
                    raise Refused(DUPLICATE, "MPPS instance exists already")
                step = MppsStep(sop_instance_uid=uid, calling_ae=calling[:16] or None, status=state,
                                attributes=payload, **_refs(ds))
                s.add(step)
                s.flush()
                self._enqueue(s, step.id, "create", uid, payload, calling)
        except Exception as exc:
            return _refusal(exc, line, "N-CREATE"), None
        self._notify()
        log.info(kv(**line, status="0x0000", state=state, relay=",".join(self.nodes) or "-",
                    ms=int((time.monotonic() - t0) * 1000)))
        reply = Dataset()
        if not given:
            reply.AffectedSOPInstanceUID = uid
        return 0x0000, reply

    def on_set(self, event: Any) -> tuple[int | Dataset, Dataset | None]:
        t0 = time.monotonic()
        calling = (event.assoc.requestor.ae_title or "").strip()
        uid = str(event.request.RequestedSOPInstanceUID or "")
        line: dict[str, Any] = {"event": "n-set", "calling": calling, "called": called_ae_title(event.assoc), "sop": uid}
        closed = 0
        try:
            mods = event.modification_list
            new_state = str(mods.get("PerformedProcedureStepStatus", "") or "").strip().upper()
            if new_state and new_state not in STATUSES:
                raise Refused(INVALID_VALUE, f"PerformedProcedureStepStatus {new_state!r} unknown")
            with self.sessions.begin() as s:
                step = s.execute(select(MppsStep).where(MppsStep.sop_instance_uid == uid)).scalar()
                if step is None:
                    raise Refused(NO_SUCH_INSTANCE, "no such MPPS instance")
                if step.status in worklist.DONE_STATUSES:
                    raise Refused(PROCESSING_FAILURE, f"Performed Procedure Step is {step.status}: no more updates")
                merged = merge(worklist.decode(step.attributes), mods)
                step.attributes = worklist.encode(merged)
                step.status = new_state or step.status
                for key, value in _refs(merged).items():
                    setattr(step, key, value)
                self._enqueue(s, step.id, "set", uid, worklist.encode(mods), calling)
                if step.status in worklist.DONE_STATUSES:
                    closed = mark_done(s, worklist.step_refs(merged), f"mpps {step.status.lower()}")
                state = step.status
        except Exception as exc:
            return _refusal(exc, line, "N-SET"), None
        self._notify()
        log.info(kv(**line, status="0x0000", state=state, worklist_done=closed, relay=",".join(self.nodes) or "-",
                    ms=int((time.monotonic() - t0) * 1000)))
        return 0x0000, None


def _refs(ds: Dataset) -> dict[str, Any]:
    first = (ds.get("ScheduledStepAttributesSequence") or [Dataset()])[0]
    return {"study_instance_uid": text_of(first, "StudyInstanceUID", 64), "accession_number": text_of(first, "AccessionNumber", 16),
            "patient_id": text_of(ds, "PatientID", 64)}


def contexts() -> list[tuple[str, list[str]]]:
    return [(MPPS, TRANSFER_SYNTAXES)]


def service(config: Config, sessions: sessionmaker[Session], relay: MppsRelay | None) -> MppsSCP:
    """The N-CREATE and N-SET service (`on_create`, `on_set`)."""
    return MppsSCP(config, sessions, relay)
