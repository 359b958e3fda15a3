"""Operator actions on the forward queue (`qrproxy queue ...`), run against the database directly.

A running proxy picks changes up on its next poll (`forward.poll`): the queue's state lives in the
database, not in the process, so the CLI needs no channel to the server.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Select, delete, func, select, update
from sqlalchemy.orm import Session

from qrproxy.index.models import ForwardItem, ForwardState, SpoolObject, utcnow


@dataclass
class Filter:
    node: str | None = None
    state: str | None = None
    study: str | None = None
    unsent: bool = False  # every state but sent (`queue list` without --state)
    ids: list[int] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (self.node or self.state or self.study or self.ids)

    def where(self) -> list[Any]:
        w: list[Any] = []
        if self.node:
            w.append(ForwardItem.node == self.node)
        if self.state:
            w.append(ForwardItem.state == ForwardState(self.state))
        elif self.unsent:
            w.append(ForwardItem.state != ForwardState.sent)
        if self.study:
            w.append(ForwardItem.study_instance_uid == self.study)
        if self.ids:
            w.append(ForwardItem.id.in_(self.ids))
        return w


def _iso(when: Any) -> str | None:
    """UTC, marked: SQLite hands back naive UTC datetimes, PostgreSQL aware ones."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def list_rows(session: Session, f: Filter, limit: int = 200) -> list[dict[str, Any]]:
    q: Select[Any] = (
        select(ForwardItem, SpoolObject.sop_instance_uid)
        .join(SpoolObject, SpoolObject.id == ForwardItem.object_pk)
        .where(*f.where())
        .order_by(ForwardItem.id)
        .limit(limit)
    )
    out = []
    for item, sop in session.execute(q):
        out.append(
            {
                "id": item.id,
                "node": item.node,
                "state": item.state.value,
                "attempts": item.attempts,
                "next_attempt_at": _iso(item.next_attempt_at),
                "sop_instance_uid": sop,
                "study_instance_uid": item.study_instance_uid,
                "calling_ae": item.calling_ae,
                "last_status": item.last_status,
                "last_error": item.last_error,
                "sent_at": _iso(item.sent_at),
            }
        )
    return out


def depths(session: Session) -> dict[str, dict[str, int]]:
    """{node: {state: count}} for status and metrics."""
    out: dict[str, dict[str, int]] = {}
    for node, state, n in session.execute(
        select(ForwardItem.node, ForwardItem.state, func.count()).group_by(ForwardItem.node, ForwardItem.state)
    ):
        out.setdefault(node, {})[state.value] = n
    return out


def oldest_pending(session: Session) -> dict[str, dt.datetime]:
    rows = session.execute(
        select(ForwardItem.node, func.min(ForwardItem.created_at))
        .where(ForwardItem.state.in_([ForwardState.pending, ForwardState.inflight]))
        .group_by(ForwardItem.node)
    )
    return {node: ts for node, ts in rows}


def matching_ids(session: Session, f: Filter) -> list[int]:
    """Row ids the filter selects, in id order: bulk actions run over them in batches (with progress)."""
    return list(session.execute(select(ForwardItem.id).where(*f.where()).order_by(ForwardItem.id)).scalars())


def inflight_ids(session: Session, f: Filter) -> list[int]:
    """Rows of the filter a forwarder is sending right now (hold and purge leave those alone)."""
    return list(session.execute(select(ForwardItem.id).where(*f.where(), ForwardItem.state == ForwardState.inflight)
                                .order_by(ForwardItem.id)).scalars())


def retry(session: Session, f: Filter) -> int:
    """Pending or held rows: try again now (held rows keep their attempt count)."""
    states = [ForwardState.pending, ForwardState.held]
    return session.execute(
        update(ForwardItem)
        .where(*f.where(), ForwardItem.state.in_(states))
        .values(state=ForwardState.pending, next_attempt_at=utcnow())
    ).rowcount


def hold(session: Session, f: Filter, reason: str) -> int:
    return session.execute(
        update(ForwardItem)
        .where(*f.where(), ForwardItem.state == ForwardState.pending)
        .values(state=ForwardState.held, last_error=reason)
    ).rowcount


def release(session: Session, f: Filter) -> int:
    """Held rows back to pending with a fresh attempt budget."""
    return session.execute(
        update(ForwardItem)
        .where(*f.where(), ForwardItem.state == ForwardState.held)
        .values(state=ForwardState.pending, attempts=0, next_attempt_at=utcnow())
    ).rowcount


def purge(session: Session, f: Filter) -> int:
    """Delete rows (never in-flight ones): the instances are then owed to nobody for those nodes."""
    return session.execute(
        delete(ForwardItem).where(*f.where(), ForwardItem.state != ForwardState.inflight)
    ).rowcount
