"""Writing worklist items into the index: a refresh's answers replace the node's items inside the
refreshed window, old items are pruned, and items whose procedure the proxy saw done are marked.

Each function runs inside the caller's transaction, so a refresh writes all of its answers or none
(a failed or cancelled run leaves the previous items as they were).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.index.dsmerge import fill_missing
from qrproxy.index.models import WorklistItem, utcnow
from qrproxy.index.session import read_only
from qrproxy.index.writers import dialect_insert
from qrproxy.logs import kv
from qrproxy.query import worklist
from qrproxy.query.matching import QueryError, matches_in_python, parse_query, residual_keys, select_matching

log = logging.getLogger("qrproxy.worklist")

_UPDATED = ("patient_id", "patient_name_norm", "accession_number", "requested_procedure_id", "study_instance_uid",
            "scheduled_station_ae", "scheduled_station_name", "modality", "sps_id", "sps_start_date",
            "sps_start_time", "identifier", "refreshed_at")


@dataclass
class Replaced:
    listed: int = 0
    new: int = 0
    updated: int = 0  # held already and changed
    unchanged: int = 0  # held already, answered the same
    removed: int = 0
    pruned: int = 0


def item_row(node: str, ds: Dataset, now: dt.datetime) -> dict[str, Any]:
    """The WorklistItem row of one (already mutated) item."""
    data = worklist.encode(ds)
    return {"source_node": node, "item_key": worklist.item_key(ds, data), "identifier": data,
            "status": "scheduled", "refreshed_at": now, **worklist.columns(ds)}


def _window(session: Session, node: str, identifier: Dataset) -> dict[str, int] | None:
    """item_key -> id of the node's items that the refresh query selects; None when the query
    cannot be applied to the index (then nothing is removed on a guess)."""
    try:
        query = parse_query(identifier, None, "worklist")
    except QueryError as exc:
        log.warning(kv(event="worklist-no-removal", node=node, reason=exc.comment))
        return None
    stmt = (select_matching(query).with_only_columns(WorklistItem.id, WorklistItem.item_key, WorklistItem.identifier)
            .where(WorklistItem.source_node == node))
    residual = bool(residual_keys(query))
    out = {}
    for pk, key, data in session.execute(stmt):
        if residual and not matches_in_python(query, worklist.decode(data)):
            continue
        out[key] = pk
    return out


def replace(session: Session, node: str, identifier: Dataset, rows: list[dict[str, Any]]) -> Replaced:
    """Make the node's items inside the window of `identifier` exactly `rows`: upsert them (an item
    already marked done stays done) and delete the node's other items in that window."""
    result = Replaced(listed=len(rows))
    unique: dict[str, dict[str, Any]] = {}
    for row in rows:
        unique[row["item_key"]] = row  # an upstream listing one step twice: the last answer wins
    window = _window(session, node, identifier)
    held: dict[str, bytes] = {}
    keys = list(unique)
    for i in range(0, len(keys), 500):
        held.update(session.execute(select(WorklistItem.item_key, WorklistItem.identifier).where(
            WorklistItem.source_node == node, WorklistItem.item_key.in_(keys[i:i + 500]))).all())
    known = set(held)
    for key, old in held.items():
        # A key this answer left out or empty keeps the value an earlier answer gave (dsmerge).
        row = unique[key]
        answer = worklist.decode(row["identifier"])
        if fill_missing(answer, worklist.decode(old)):
            unique[key] = dict(item_row(node, answer, row["refreshed_at"]), item_key=key)
    # "updated" counts items whose content changed: a refresh that finds the same items says so
    result.updated = sum(1 for key, old in held.items() if bytes(unique[key]["identifier"]) != bytes(old))
    result.unchanged = len(known) - result.updated
    result.new = len(unique) - len(known)
    if unique:
        ins = dialect_insert(session)(WorklistItem)
        stmt = ins.on_conflict_do_update(index_elements=["source_node", "item_key"],
                                         set_={k: ins.excluded[k] for k in _UPDATED})
        values = list(unique.values())
        for i in range(0, len(values), 500):
            session.execute(stmt, values[i:i + 500])
    if window:
        gone = [pk for key, pk in window.items() if key not in unique]
        for i in range(0, len(gone), 500):
            session.execute(delete(WorklistItem).where(WorklistItem.id.in_(gone[i:i + 500])))
        result.removed = len(gone)
    return result


def prune(session: Session, keep_days: int, today: dt.date | None = None) -> int:
    """Delete items scheduled more than `keep_days` days before `today` (items without a date: not
    refreshed for that long)."""
    today = today or dt.date.today()
    cutoff = (today - dt.timedelta(days=keep_days)).strftime("%Y%m%d")
    stale = utcnow() - dt.timedelta(days=keep_days + 1)
    res = session.execute(delete(WorklistItem).where(or_(
        and_(WorklistItem.sps_start_date.is_not(None), WorklistItem.sps_start_date != "",
             WorklistItem.sps_start_date < cutoff),
        and_(or_(WorklistItem.sps_start_date.is_(None), WorklistItem.sps_start_date == ""),
             WorklistItem.refreshed_at < stale))))
    return int(res.rowcount or 0)  # type: ignore[attr-defined]


def mark_done(session: Session, refs: list[worklist.StepRef], reason: str) -> int:
    """Mark the items an MPPS refers to as done; returns how many."""
    ids: list[int] = []
    for ref in refs:
        cond = []
        if ref.study_instance_uid:
            cond.append(WorklistItem.study_instance_uid == ref.study_instance_uid)
        if ref.accession_number:
            cond.append(WorklistItem.accession_number == ref.accession_number)
        rows = session.execute(select(WorklistItem.id, WorklistItem.study_instance_uid, WorklistItem.accession_number,
                                      WorklistItem.requested_procedure_id, WorklistItem.sps_id)
                               .where(or_(*cond), WorklistItem.done_at.is_(None))).mappings().all()
        ids += [r["id"] for r in rows if worklist.ref_matches(ref, dict(r))]
    if ids:
        session.execute(update(WorklistItem).where(WorklistItem.id.in_(ids))
                        .values(done_at=utcnow(), done_reason=reason[:64], status="done"))
    return len(ids)


def open_items_for_study(session: Session, mode: str, study_uid: str | None, accession: str | None) -> list[int]:
    """Ids of items not done yet that a stored instance of this study (`mode`: study | accession)
    completes."""
    if mode == "study" and study_uid:
        cond = WorklistItem.study_instance_uid == study_uid
    elif mode == "accession" and accession:
        cond = WorklistItem.accession_number == accession
    else:
        return []
    return list(session.execute(select(WorklistItem.id).where(cond, WorklistItem.done_at.is_(None))).scalars())


__all__ = ["Replaced", "close_on_store", "item_row", "mark_done", "open_items_for_study", "prune", "replace"]


# --- the study arrived (worklist.remove_on_store) ---------------------------------------------

_seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
_seen_lock = threading.Lock()
_SEEN_MAX = 4096


def close_on_store(mode: str, engine: Engine, sessions: sessionmaker[Session], hdr: Any) -> int:
    """After a C-STORE committed: with `worklist.remove_on_store` (study | accession), the first
    instance of a study marks the open items of that study done. Later instances of the same study
    cost a dictionary lookup; a study without open items costs one read. Never raises: the
    instance is stored, this is bookkeeping."""
    if mode == "off":
        return 0
    value = hdr.study_instance_uid if mode == "study" else hdr.study.get("accession_number")
    if not value:
        return 0
    key = (str(engine.url), mode, value)
    with _seen_lock:
        if key in _seen:
            return 0
        _seen[key] = None
        while len(_seen) > _SEEN_MAX:
            _seen.popitem(last=False)
    try:
        with Session(read_only(engine)) as s:
            ids = open_items_for_study(s, mode, hdr.study_instance_uid, hdr.study.get("accession_number"))
        if not ids:
            return 0
        with sessions.begin() as s:
            s.execute(update(WorklistItem).where(WorklistItem.id.in_(ids), WorklistItem.done_at.is_(None))
                      .values(done_at=utcnow(), done_reason=f"stored ({mode})", status="done"))
        log.info(kv(event="worklist-done", reason=f"stored-{mode}", study=hdr.study_instance_uid, items=len(ids)))
        return len(ids)
    except Exception as exc:
        with _seen_lock:
            _seen.pop(key, None)
        log.error(kv(event="worklist-done-failed", study=hdr.study_instance_uid, error=f"{type(exc).__name__}: {exc}"))
        return 0
