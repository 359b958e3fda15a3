"""Relays recorded MPPS messages (mpps_queue) to the `mpps` nodes: one thread, strictly in order per
node, so that an N-SET never reaches a node before the N-CREATE of its step.

The forward queue's rules apply (forwarder.classify / backoff, `forward.*` settings): a node that
cannot be reached backs off as a whole and its messages wait, attempts unchanged; a failure status
retries the message with backoff (transient) or holds it at once (permanent), and after
`forward.max_attempts` it is held; a held message holds the later messages of its step too (the
node could not apply them). `qrproxy status` shows the depths and held reasons.

Messages are marked sent after the node answered; a crash in between sends that one message again
at the next start: a repeated N-CREATE is answered 0x0111 (duplicate), which counts as delivered,
and a repeated N-SET sets the same values again. Runs in one process only (worker 0), which keeps
the per-node order without locks.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from pynetdicom.sop_class import ModalityPerformedProcedureStep
from sqlalchemy import select, update

from qrproxy.index.models import ForwardState, MppsMessage, utcnow
from qrproxy.logs import kv
from qrproxy.query import worklist
from qrproxy.scu.forward import backoff, classify
from qrproxy.scu.upstream import UpstreamError, associate

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.mpps")

MPPS = str(ModalityPerformedProcedureStep)
_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
# N-CREATE / N-SET statuses (PS3.7 C) that no retry will change.
PERMANENT = {0x0105, 0x0106, 0x0112, 0x0117, 0x0118, 0x0119, 0x0120, 0x0121, 0x0122, 0x0123, 0x0124}
WARNINGS = {0x0001, 0x0107, 0x0116}
BATCH = 100


def outcome(operation: str, status: int | None) -> str:
    """'sent', 'transient' or 'permanent' for a node's answer to one message."""
    if status is None:
        return "transient"
    if status in WARNINGS or (operation == "create" and status == 0x0111):
        return "sent"  # 0x0111: created before (a resend after a crash)
    if status in PERMANENT:
        return "permanent"
    return classify(status)


class MppsRelay:
    def __init__(self, config: Config, sessions: sessionmaker[Session]):
        self.config = config
        self.sessions = sessions
        self.nodes = list(config.nodes_with_role("mpps"))
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._backoff_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def start(self) -> None:
        if not self.nodes:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mpps-relay", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 3.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        poll = self.config.forward.poll
        while not self._stop.is_set():
            self._wake.clear()
            wait = poll
            for node in self.nodes:
                try:
                    left = self._backoff_until.get(node, 0.0) - time.monotonic()
                    if left > 0:
                        wait = min(wait, left)
                        continue
                    due_in = self.drain(node)
                    if due_in is not None:
                        wait = min(wait, max(0.05, due_in))
                except Exception:  # the database, a bug: keep the thread, try again at the next poll
                    log.exception(kv(event="mpps-relay-failed", node=node))
            self._wake.wait(max(0.05, wait))

    def _pending(self, node: str) -> list[MppsMessage]:
        with self.sessions.begin() as s:
            return list(s.execute(select(MppsMessage).where(MppsMessage.node == node,
                                                            MppsMessage.state == ForwardState.pending)
                                  .order_by(MppsMessage.id).limit(BATCH)).scalars())

    def drain(self, node: str) -> float | None:
        """Send the node's pending messages in order until one must wait; returns seconds until the
        first waiting message is due (None: nothing waits)."""
        messages = self._pending(node)
        if not messages:
            return None
        first_due = _left(messages[0])
        if first_due > 0:
            return first_due
        cfg = self.config
        node_cfg = cfg.nodes[node]
        calling = messages[0].calling_ae if node_cfg.impersonate else None
        try:
            with associate(cfg, node, [(MPPS, _SYNTAXES)], calling_ae=calling) as assoc:
                if not any(cx.abstract_syntax == MPPS for cx in assoc.accepted_contexts):
                    raise UpstreamError(f"{node}: MPPS not accepted")
                for msg in messages:
                    if self._stop.is_set():
                        return None
                    if node_cfg.impersonate and msg.calling_ae != calling:
                        return 0.0  # the next association, with that modality's title
                    if _left(msg) > 0:
                        return _left(msg)
                    if self._behind_held(msg):
                        continue
                    status, comment = self._send(assoc, msg)
                    if status is None:
                        raise UpstreamError(f"{node}: no answer to N-{msg.operation.upper()}")
                    if not self._record(msg, status, comment):
                        return None if msg.state == ForwardState.held else self._due(msg)
        except UpstreamError as exc:
            fails = self._failures.get(node, 0) + 1
            self._failures[node] = fails
            delay = backoff(fails, cfg.forward.retry_min, cfg.forward.retry_max)
            self._backoff_until[node] = time.monotonic() + delay
            log.warning(kv(event="node-down", node=node, service="mpps", reason=str(exc), retry_in=f"{delay:.1f}s",
                           pending=len(messages)))
            return delay
        self._failures[node] = 0
        return 0.0 if len(messages) == BATCH else None

    def _behind_held(self, msg: MppsMessage) -> bool:
        """Hold a message whose step has an earlier message held on this node (the node refused
        that one, so it could not apply this one either)."""
        with self.sessions.begin() as s:
            held = s.execute(select(MppsMessage.last_error).where(
                MppsMessage.step_pk == msg.step_pk, MppsMessage.node == msg.node, MppsMessage.id < msg.id,
                MppsMessage.state == ForwardState.held).limit(1)).first()
            if held is None:
                return False
            s.execute(update(MppsMessage).where(MppsMessage.id == msg.id).values(
                state=ForwardState.held, last_error=f"an earlier message of this step is held: {held[0]}"[:500]))
        log.warning(kv(event="mpps-relay-held", node=msg.node, op=msg.operation, sop=msg.sop_instance_uid,
                       reason="an earlier message of this step is held"))
        return True

    @staticmethod
    def _due(msg: MppsMessage) -> float:
        return max(0.05, _left(msg))

    def _send(self, assoc: Any, msg: MppsMessage) -> tuple[int | None, str | None]:
        ds = worklist.decode(msg.payload)
        if msg.operation == "create":
            status, _ = assoc.send_n_create(ds, MPPS, msg.sop_instance_uid)
        else:
            status, _ = assoc.send_n_set(ds, MPPS, msg.sop_instance_uid)
        code = getattr(status, "Status", None)
        return code, (str(status.get("ErrorComment", "")) or None) if code is not None else None

    def _record(self, msg: MppsMessage, status: int, comment: str | None) -> bool:
        """Write the node's answer; True when the message was delivered."""
        cfg = self.config.forward
        kind = outcome(msg.operation, status)
        reason = f"N-{msg.operation.upper()} status 0x{status:04X}" + (f" ({comment})" if comment else "")
        now = utcnow()
        with self.sessions.begin() as s:
            if kind == "sent":
                s.execute(update(MppsMessage).where(MppsMessage.id == msg.id).values(
                    state=ForwardState.sent, sent_at=now, last_status=status, attempts=msg.attempts + 1))
                log.info(kv(event="mpps-relayed", node=msg.node, op=msg.operation, sop=msg.sop_instance_uid,
                            status=f"0x{status:04X}"))
                return True
            attempts = msg.attempts + 1
            held = kind == "permanent" or attempts >= cfg.max_attempts
            msg.attempts, msg.last_error = attempts, reason
            if held:
                msg.state = ForwardState.held
                s.execute(update(MppsMessage).where(MppsMessage.id == msg.id).values(
                    state=ForwardState.held, attempts=attempts, last_status=status, last_error=reason))
                s.execute(update(MppsMessage).where(
                    MppsMessage.step_pk == msg.step_pk, MppsMessage.node == msg.node, MppsMessage.id > msg.id,
                    MppsMessage.state == ForwardState.pending).values(
                    state=ForwardState.held, last_error=f"an earlier message of this step is held: {reason}"[:500]))
            else:
                msg.next_attempt_at = now + dt.timedelta(seconds=backoff(attempts, cfg.retry_min, cfg.retry_max))
                s.execute(update(MppsMessage).where(MppsMessage.id == msg.id).values(
                    attempts=attempts, last_status=status, last_error=reason, next_attempt_at=msg.next_attempt_at))
        log.warning(kv(event="mpps-relay-refused", node=msg.node, op=msg.operation, sop=msg.sop_instance_uid,
                       status=f"0x{status:04X}", action="held" if held else "retry", attempts=attempts, reason=comment))
        return False


def _left(msg: MppsMessage) -> float:
    """Seconds until the message is due (SQLite hands back naive UTC timestamps)."""
    when = msg.next_attempt_at
    if when is None:
        return 0.0
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return (when - utcnow()).total_seconds()


def depths(session: Any) -> dict[str, dict[str, int]]:
    """node -> state -> messages, for `qrproxy status`."""
    from sqlalchemy import func

    out: dict[str, dict[str, int]] = {}
    for node, state, n in session.execute(select(MppsMessage.node, MppsMessage.state, func.count())
                                          .group_by(MppsMessage.node, MppsMessage.state)):
        out.setdefault(node, {})[getattr(state, "value", str(state))] = n
    return out


__all__ = ["MppsRelay", "depths", "outcome"]
