"""Learning studies from an upstream node down to their instances: refresh and retrieve-through.

A study is learnt with hierarchical C-FINDs, as a strict PACS requires: SERIES with its Study
Instance UID, then IMAGE once per series (and, for retrieve-through, STUDY first by its UID). Over a
far link each is a round trip, so the queries of several studies, and the IMAGE queries of one
study's series, go out at once on the node's associations (`scu/findpool.py`, up to
`nodes.NAME.associations`), while this thread writes.

The index ends up exactly as when the studies were learnt one after another: each study is written,
in its own short transaction, only once all its answers are in, and studies are written in the
order they were given (a patient named differently in two studies ends with the name of the later
one, as before). No network wait happens inside a transaction: SQLite has one writer slot, which
C-STORE needs. At most `WINDOW_PER_ASSOCIATION` studies per association are in flight, so memory
does not grow with the size of the run. The first failure ends the learning (the pool cancels what
is queued and waits for what is running) and is raised to the caller; studies written before it
stay (each was complete).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.config.schema import Config
from qrproxy.index.columns import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS
from qrproxy.index.models import Instance, Series
from qrproxy.index.writers import (Header, found_study_header, int_of, merge_found_instances, merge_row,
                                   text_of, upsert_found_study)
from qrproxy.scu.findpool import FindPool

# Studies in flight per association: enough to keep every association busy while the oldest
# study's last answer is awaited (writes go in order), few enough to bound memory.
WINDOW_PER_ASSOCIATION = 4

# Queue priorities (lower first): finish the studies begun before starting new ones.
_IMAGE, _SERIES, _STUDY = 0, 1, 2


def level_identifier(level: str, keys: Iterable[str], **unique: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in unique.items():
        setattr(ds, keyword, value)
    for keyword in keys:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def write_study(session: Session, node: str, hdr: Header, series: list[tuple[Dataset, list[Dataset]]]) -> None:
    """A study with its complete series and instance lists: merge all into the index, drop what the
    node no longer lists (unless the spool holds a copy). Existing local copies (object_pk) are never
    touched, and values read from them are never replaced by the node's answers."""
    study_pk = upsert_found_study(session, hdr, node)
    kept_series: list[int] = []
    for series_ds, images in series:
        series_uid = text_of(series_ds, "SeriesInstanceUID", 64)
        if not (series_uid and hdr.study_instance_uid):
            continue
        s_hdr = Header.from_dataset(series_ds)
        s_hdr.series["number_of_instances"] = int_of(series_ds, "NumberOfSeriesRelatedInstances")
        # The patient and study rows were merged just above from the same answer: only the series
        # row is merged here (upsert_series would merge both again, once per series).
        series_pk = merge_row(session, Series, {"series_instance_uid": series_uid},
                              dict(s_hdr.series, study_pk=study_pk), found=True)
        kept_series.append(series_pk)
        rows = []
        for image in images:
            uid = text_of(image, "SOPInstanceUID", 64)
            if uid:
                rows.append({"sop_instance_uid": uid, "series_pk": series_pk,
                             "sop_class_uid": text_of(image, "SOPClassUID", 64),
                             "instance_number": int_of(image, "InstanceNumber")})
        listed = set(merge_found_instances(session, rows))
        stale = [pk for pk, uid in session.execute(
            select(Instance.id, Instance.sop_instance_uid)
            .where(Instance.series_pk == series_pk, Instance.object_pk.is_(None))) if uid not in listed]
        for i in range(0, len(stale), 500):
            session.execute(delete(Instance).where(Instance.id.in_(stale[i:i + 500])))
    local = select(Instance.id).where(Instance.series_pk == Series.id, Instance.object_pk.is_not(None)).exists()
    session.execute(delete(Series).where(Series.study_pk == study_pk, Series.id.not_in(kept_series), ~local))


@dataclass
class _Study:
    """One study on its way: what is known of it, and the answers still awaited."""

    uid: str
    hdr: Header | None = None
    series: list[Dataset] = field(default_factory=list)
    images: dict[int, list[Dataset]] = field(default_factory=dict)
    awaited: int = 0
    done: bool = False  # every answer in (or the node does not know it: hdr None)


def learn(pool: FindPool, sessions: sessionmaker[Session], node: str, studies: list[tuple[str, Header | None]],
          written: Callable[[Header], None] | None = None) -> int:
    """Learn `studies` ((uid, its STUDY-level header, or None to ask for it first)) through `pool`
    and write each complete study, in the given order; `written(hdr)` after each write. Returns how
    many the node knows. The first failure (UpstreamError, ...) is raised once the pool is stopped."""
    window = WINDOW_PER_ASSOCIATION * pool.size
    state = [_Study(uid, hdr) for uid, hdr in studies]
    waiting: dict[Future[Any], tuple[_Study, str, int]] = {}
    started = written_upto = found = 0

    def ask(st: _Study, kind: str, priority: int, query: Dataset, pos: int = 0) -> None:
        st.awaited += 1
        waiting[pool.submit(lambda fs: fs.find(query), priority)] = (st, kind, pos)

    def ask_series(st: _Study) -> None:
        ask(st, "series", _SERIES, level_identifier("SERIES", SERIES_KEYS, StudyInstanceUID=st.uid))

    while written_upto < len(state):
        while started < len(state) and started - written_upto < window:
            st = state[started]
            started += 1
            if st.hdr is None:
                ask(st, "study", _STUDY, level_identifier("STUDY", STUDY_KEYS, StudyInstanceUID=st.uid))
            else:
                ask_series(st)
        if waiting:
            done, _ = wait(list(waiting), return_when=FIRST_COMPLETED)
            for fut in done:
                st, kind, pos = waiting.pop(fut)
                answers = fut.result()  # raises the first failure; the caller's pool stops the rest
                st.awaited -= 1
                if kind == "study":
                    matches = [m for m in answers if text_of(m, "StudyInstanceUID") == st.uid]
                    if matches:
                        st.hdr = found_study_header(matches[0])
                        ask_series(st)
                elif kind == "series":
                    for series_ds in answers:
                        series_uid = text_of(series_ds, "SeriesInstanceUID")
                        if not series_uid:
                            continue
                        st.series.append(series_ds)
                        ask(st, "image", _IMAGE, level_identifier(
                            "IMAGE", IMAGE_KEYS, StudyInstanceUID=st.uid, SeriesInstanceUID=series_uid),
                            len(st.series) - 1)
                else:
                    st.images[pos] = answers
                st.done = st.awaited == 0
        while written_upto < len(state) and state[written_upto].done:
            st = state[written_upto]
            written_upto += 1
            if st.hdr is None:
                continue  # the node does not know this study
            found += 1
            with sessions.begin() as s:
                write_study(s, node, st.hdr, [(ds, st.images[i]) for i, ds in enumerate(st.series)])
            state[written_upto - 1] = _Study(st.uid, done=True)  # its answers are no longer needed
            if written is not None:
                written(st.hdr)
    return found


def learn_studies(config: Config, sessions: sessionmaker[Session], node: str, study_uids: Iterable[str],
                  timeout: float | None = None) -> int:
    """Ask `node` for these studies down to their instances and write what it lists into the index
    (C-MOVE/C-GET need the SOP Instance UIDs to count sub-operations before retrieving through).
    Returns how many of the studies the node knows; UpstreamError when it cannot be asked."""
    with FindPool(config, node, "study", size=config.nodes[node].associations, timeout=timeout) as pool:
        return learn(pool, sessions, node, [(uid, None) for uid in study_uids])


__all__ = ["learn", "learn_studies", "level_identifier", "write_study"]
