"""Query/Retrieve C-FIND SCP (Patient Root and Study Root, all levels), answered from the local index.

This is the cache side of `query.mode`: the identifier is parsed by `matching.parse_query` (PS3.4
C.4.1 hierarchical rules; what it refuses is answered with its status and an Error Comment), the
matching rows are read with one SQL statement on a read-only connection (counts and ModalitiesInStudy
as correlated subqueries of that statement, never a query per row), rows that SQL cannot decide
exactly (`residual_keys`) are filtered with `matches_in_python`, and each match is answered with a
Pending response whose identifier holds:

- every key of the request, with the index's value or zero-length when the index does not hold it
  (the correct answer for an unknown value, PS3.4 C.2.2.1.3); keys below the query level are empty;
- QueryRetrieveLevel, the level's unique key, SpecificCharacterSet `ISO_IR 192` (the index holds
  decoded Python strings, so every answer is UTF-8) and RetrieveAETitle (qrproxy's own AE title).

C-CANCEL is checked before each Pending response and answered 0xFE00. The rows are fetched and the
connection released before the first response is sent, so a slow or stalled peer never holds a
database transaction open.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag, Tag
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind)
from sqlalchemy import distinct, func, literal_column, select
from sqlalchemy.orm import aliased

from qrproxy.index.columns import ENTITIES, QR_COLUMNS
from qrproxy.index.dsmerge import is_empty
from qrproxy.index.models import Instance, Patient, Series, Study, utcnow
from qrproxy.index.session import read_only
from qrproxy.index.writers import STUDY_SEQUENCES, read_sequences
from qrproxy.logs import kv
from qrproxy.net import dicomenc
from qrproxy.query import hotcache
from qrproxy.query import modes as querymode
from qrproxy.query import through as querythrough
from qrproxy.query.matching import (LEVELS, UNIQUE_KEYS, Query, QueryError, matches_in_python, parse_query,
                                    residual_keys, select_matching)
from qrproxy.scp import pending
from qrproxy.scp.associations import called_ae_title
from qrproxy.scp.responses import status as _status
from qrproxy.scu import upstream

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.find")

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "patient",
    str(StudyRootQueryRetrieveInformationModelFind): "study",
}

CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000
CHARSET = "ISO_IR 192"

_IGNORE = pydicom_config.IGNORE
_QRLEVEL = Tag("QueryRetrieveLevel")
_CHARSET_TAG = Tag("SpecificCharacterSet")
_RETRIEVE_AE = Tag("RetrieveAETitle")

# Computed keys and the level of the row they describe.
_COMPUTED = {
    "NumberOfPatientRelatedStudies": "PATIENT",
    "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT",
    "ModalitiesInStudy": "STUDY",
    "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY",
    "NumberOfSeriesRelatedInstances": "SERIES",
}


@functools.lru_cache(maxsize=None)
def _computed(keyword: str, dialect: str) -> Any:
    """A correlated scalar subquery of the outer row (one SQL statement; the inner tables are aliased
    so that a series-level query's own series row is not reused). A study or series known only from
    an upstream answer has no local children: its stored count/modalities (from that answer) apply.
    Built once per keyword and dialect: aliasing costs more than running a single-match query."""
    s, i, st = aliased(Series), aliased(Instance), aliased(Study)
    if keyword == "NumberOfPatientRelatedStudies":
        return select(func.count(st.id)).where(st.patient_pk == Patient.id).correlate(Patient).scalar_subquery()
    if keyword == "NumberOfPatientRelatedSeries":
        return (select(func.count(s.id)).join(st, s.study_pk == st.id).where(st.patient_pk == Patient.id)
                .correlate(Patient).scalar_subquery())
    if keyword == "NumberOfPatientRelatedInstances":
        return (select(func.count(i.id)).join(s, i.series_pk == s.id).join(st, s.study_pk == st.id)
                .where(st.patient_pk == Patient.id).correlate(Patient).scalar_subquery())
    if keyword == "NumberOfStudyRelatedSeries":
        n = select(func.count(s.id)).where(s.study_pk == Study.id).correlate(Study).scalar_subquery()
        return func.coalesce(func.nullif(n, 0), Study.number_of_series, 0)
    if keyword == "NumberOfStudyRelatedInstances":
        n = (select(func.count(i.id)).join(s, i.series_pk == s.id).where(s.study_pk == Study.id)
             .correlate(Study).scalar_subquery())
        return func.coalesce(func.nullif(n, 0), Study.number_of_instances, 0)
    if keyword == "NumberOfSeriesRelatedInstances":
        n = select(func.count(i.id)).where(i.series_pk == Series.id).correlate(Series).scalar_subquery()
        return func.coalesce(func.nullif(n, 0), Series.number_of_instances, 0)
    if keyword == "ModalitiesInStudy":
        # Modality is a CS: no commas in it, so ',' is a safe separator on both databases.
        if dialect == "postgresql":
            agg = func.string_agg(distinct(s.modality), literal_column("','"))
        else:
            agg = func.group_concat(distinct(s.modality))
        m = select(agg).where(s.study_pk == Study.id, s.modality.is_not(None)).correlate(Study).scalar_subquery()
        return func.coalesce(m, Study.modalities_in_study)
    raise KeyError(keyword)


@dataclass(frozen=True)
class _Field:
    """One attribute of the response: its tag and VR, and the index of its value in the SQL row
    (None: the index does not hold it, answered zero-length)."""

    tag: BaseTag  # Dataset._dict keys must be BaseTag (pydicom's writer reads tag.element)
    keyword: str
    vr: str
    column: int | None = None
    sequence: bool = False
    children: tuple[str, ...] = ()  # a sequence's requested item keys (empty: whole items)


def _vr(vr: str) -> str:
    """A concrete VR for an ambiguous dictionary VR ('US or SS', 'OB or OW')."""
    return vr.split(" or ")[0] if " or " in vr else vr


def plan(query: Query, dialect: str) -> tuple[Any, list[_Field]]:
    """The SELECT for `query` (its WHERE from matching.py, only the columns the answer needs) and the
    layout of each response identifier."""
    assert query.level is not None
    depth = LEVELS.index(query.level)
    entity = ENTITIES[query.level]
    columns: list[Any] = [entity.id]
    fields: list[_Field] = []
    seen: set[int] = set()

    def add(tag: int, keyword: str, vr: str, sequence: bool = False, children: tuple[str, ...] = ()) -> None:
        if tag in seen or tag in (_QRLEVEL, _CHARSET_TAG, _RETRIEVE_AE):
            return
        seen.add(tag)
        col = None
        if sequence and keyword in STUDY_SEQUENCES and depth >= LEVELS.index("STUDY"):
            columns.append(Study.identifier)  # the study's sequences (index.study_sequences)
            col = len(columns) - 1
        if not sequence:
            known = QR_COLUMNS.get(keyword)  # index/columns.py; PatientName answered as received
            answer = known.answer if known is not None else None
            level = known.level if answer is not None and known is not None else _COMPUTED.get(keyword)
            if level is not None and LEVELS.index(level) <= depth:
                columns.append(answer if answer is not None else _computed(keyword, dialect))
                col = len(columns) - 1
        fields.append(_Field(Tag(tag), keyword, _vr(vr), col, sequence, children))

    unique = UNIQUE_KEYS[query.level]
    add(Tag(unique), unique, "UI" if unique != "PatientID" else "LO")
    for rk in query.return_keys:
        add(rk.tag, rk.keyword, rk.vr, rk.vr == "SQ", tuple(c.keyword for c in rk.children))
    stmt = select_matching(query).with_only_columns(*columns).order_by(entity.id)
    return stmt, fields


def _value(field: _Field, raw: Any) -> Any:
    if raw is None or raw == "":
        return None
    if field.keyword == "ModalitiesInStudy":
        values = sorted({v for part in str(raw).replace("\\", ",").split(",") if (v := part.strip())})
        return values if len(values) > 1 else (values[0] if values else None)
    if field.vr in ("IS", "US", "UL", "SS", "SL"):
        return int(raw)
    if isinstance(raw, str) and "\\" in raw:
        return raw.split("\\")  # multi-valued strings are stored backslash-joined (index.text_of)
    return raw


def _items(field: _Field, blob: bytes | None) -> list[Dataset]:
    """The items of a stored study sequence, reduced to the requested item keys (all when none)."""
    if not blob:
        return []
    stored = read_sequences(blob)
    if field.keyword not in stored:
        return []
    items = []
    for item in stored[field.keyword].value:
        if field.children:
            reduced = Dataset()
            for kw in field.children:
                if kw in item:
                    reduced[kw] = item[kw]
                else:
                    reduced.add_new(kw, _vr(dictionary_VR(kw)), None)
            item = reduced
        items.append(item)
    return items


def _sequence_value(field: _Field, explicit: bool, charset: str, blob: bytes | None) -> bytes:
    """The value field of a sequence element for `dicomenc.Layout` (defined lengths throughout)."""
    items = _items(field, blob)
    if not items:
        return b""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, not explicit
    elem = DataElement(field.tag, "SQ", items)
    elem.is_undefined_length = False
    for item in elem.value:
        item.is_undefined_length_sequence_item = False
    write_data_element(fp, elem, [dicomenc.CODECS.get(charset, "utf_8")])
    return fp.getvalue()[12 if explicit else 8:]


def build(row: Any, fields: list[_Field], level: str, ae_title: str) -> Dataset:
    """The response identifier of one row, built element by element (no copy of the request)."""
    ds = Dataset()
    d = ds._dict  # tags are unique by construction; this skips Dataset.__setitem__'s checks
    d[_CHARSET_TAG] = DataElement(_CHARSET_TAG, "CS", CHARSET, validation_mode=_IGNORE)
    d[_QRLEVEL] = DataElement(_QRLEVEL, "CS", level, validation_mode=_IGNORE)
    d[_RETRIEVE_AE] = DataElement(_RETRIEVE_AE, "AE", ae_title, validation_mode=_IGNORE)
    for f in fields:
        if f.sequence:
            d[f.tag] = DataElement(f.tag, "SQ", _items(f, None if f.column is None else row[f.column]),
                                   validation_mode=_IGNORE)
            continue
        value = None if f.column is None else _value(f, row[f.column])
        d[f.tag] = DataElement(f.tag, f.vr, value, validation_mode=_IGNORE)
    # Dataset keeps its elements sorted on write; pydicom sorts _dict lazily, so order here is free.
    return ds


def layout(fields: list[_Field], level: str, ae_title: str, explicit: bool, charset: str,
           errors: str = "replace") -> dicomenc.Layout:
    """The byte layout of every identifier of one answer: the constant elements encoded once, and
    each field read from its SQL row column (zero-length when the index does not hold it)."""
    codec = dicomenc.CODECS[charset]
    slots = [
        dicomenc.Slot(_CHARSET_TAG, "CS", constant=dicomenc.element(_CHARSET_TAG, "CS", charset, explicit)),
        dicomenc.Slot(_QRLEVEL, "CS", constant=dicomenc.element(_QRLEVEL, "CS", level, explicit)),
        dicomenc.Slot(_RETRIEVE_AE, "AE", constant=dicomenc.element(_RETRIEVE_AE, "AE", ae_title, explicit)),
    ]
    for f in fields:
        if f.sequence and f.column is not None:
            slots.append(dicomenc.Slot(int(f.tag), "SQ", column=f.column,
                                       convert=functools.partial(_sequence_value, f, explicit, charset)))
        elif f.sequence or f.column is None:
            slots.append(dicomenc.Slot(int(f.tag), f.vr))
        else:
            convert = functools.partial(_value, f) if f.keyword == "ModalitiesInStudy" else None
            slots.append(dicomenc.Slot(int(f.tag), f.vr, column=f.column, convert=convert))
    return dicomenc.Layout(slots, explicit, codec, errors)


def answer_charset(identifier: Dataset) -> str:
    """The Specific Character Set of the answer: the request's own when it is a single-byte set the
    fast encoder knows (a Latin-1 modality gets Latin-1 back), else ISO_IR 192. Rows that do not fit
    the request's set are answered in ISO_IR 192 (`Answerer.encode`)."""
    raw = identifier.get("SpecificCharacterSet")
    values = [v for v in (raw if isinstance(raw, (list, tuple)) or type(raw).__name__ == "MultiValue" else [raw])
              if v] if raw else []
    if len(values) == 1 and str(values[0]).strip() in dicomenc.CODECS and str(values[0]).strip() not in ("", "ISO_IR 6"):
        return str(values[0]).strip()
    return CHARSET


class Answerer:
    """Encodes the rows of one answer: in the request's character set, a row that does not fit it in
    ISO_IR 192."""

    def __init__(self, fields: list[_Field], level: str, ae_title: str, explicit: bool, charset: str):
        self.primary = layout(fields, level, ae_title, explicit, charset, errors="strict")
        self.fallback = (self.primary if charset == CHARSET
                         else layout(fields, level, ae_title, explicit, CHARSET))

    def encode(self, row: Any) -> bytes:
        try:
            return self.primary.encode(row)
        except UnicodeEncodeError:
            return self.fallback.encode(row)


def query_node(config: Any, role: str = "query") -> str | None:
    """The upstream node C-FIND goes to in cache-first / upstream-first: the first with `role`."""
    return next(iter(config.nodes_with_role(role)), None)


class FindSCP:
    def __init__(self, config: Config, engine: Engine, sessions: sessionmaker[Session]):
        self.config = config
        self.sessions = sessions  # writes: query-through answers remembered in the index
        self.ae_title = config.ae_title
        self.engine = read_only(engine)
        self.dialect = engine.dialect.name
        self.node = query_node(config)
        self.hot = hotcache.HotCache(ttl=config.query.cache_ttl, probe=hotcache.version_probe(engine))
        hotcache.watch(engine)

    def cache_rows(self, query: Query) -> tuple[list[Any], list[_Field], dt.datetime | None]:
        """Every local row matching `query` (the read transaction ended before this returns), the
        response layout, and the oldest refresh time among rows that came from an upstream."""
        stmt, fields = plan(query, self.dialect)
        refreshed_col = None
        if query.level != "PATIENT":
            stmt = stmt.add_columns(Study.refreshed_at)
            refreshed_col = len(stmt.selected_columns) - 1
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        if residual_keys(query):
            # The response holds every requested key, so it is also the entity Python matches on.
            level = query.level or ""
            rows = [r for r in rows if matches_in_python(query, build(r, fields, level, self.ae_title))]
        oldest = None
        if refreshed_col is not None:
            stamps = [r[refreshed_col] for r in rows if r[refreshed_col] is not None]
            oldest = min(stamps) if stamps else None
        return rows, fields, oldest

    def cache_answer(self, query: Query, key: Any, explicit: bool, charset: str,
                     info: dict[str, Any]) -> list[bytes]:
        """The encoded identifiers of every local match, from the hot cache when an identical request
        was answered since the index last changed."""
        hit = self.hot.get(key)
        if hit is not None:
            info["hot"] = True
            info["oldest"] = hit[1]
            return hit[0]
        generation = self.hot.generation()
        rows, fields, oldest = self.cache_rows(query)
        answerer = Answerer(fields, query.level or "", self.ae_title, explicit, charset)
        encoded = [answerer.encode(r) for r in rows]
        info["oldest"] = oldest
        self.hot.put(key, (encoded, oldest), generation, size=sum(map(len, encoded)))
        return encoded

    def _upstream(self, identifier: Dataset, level: str, model: str) -> Any:
        if self.node is None:
            return None
        node, config = self.node, self.config
        request = querythrough.upstream_identifier(identifier, level, model)

        def ask(timeout: float) -> list[Dataset]:
            return upstream.find(config, node, model, request, timeout=timeout)

        return ask

    def _remember(self, level: str) -> Any:
        node, sessions = self.node, self.sessions

        def remember(matches: list[Dataset]) -> int:
            return querythrough.remember(sessions, node, level, matches)  # type: ignore[arg-type]

        return remember


    def held(self, request: Dataset, level: str, model: str, matches: list[Dataset]) -> dict[str, Dataset]:
        """What the index holds for the entities of these upstream answers, with `request`'s keys, by
        unique key: one query for the lot (an upstream such as dcmqrscp leaves ModalitiesInStudy out
        of every STUDY answer). Only answers that lack a requested key are looked up."""
        unique = UNIQUE_KEYS.get(level, "")
        wanted = sorted({str(m.get(unique, "") or "").strip() for m in matches
                         if any(is_empty(m[e.tag] if e.tag in m else None) for e in request
                                if e.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"))} - {""})
        wanted = [uid for uid in wanted if "\\" not in uid]
        if not wanted:
            return {}
        ident = querythrough.held_request(request, level, wanted)
        try:
            query = parse_query(ident, level, model, relational=True)  # the unique keys alone
            rows, fields, _ = self.cache_rows(query)
        except Exception as exc:  # the upstream's answers still go out, with the keys they gave
            log.warning(kv(event="held-values-unavailable", level=level, error=f"{type(exc).__name__}: {exc}"))
            return {}
        out: dict[str, Dataset] = {}
        for row in rows:
            ds = build(row, fields, level, self.ae_title)
            uid = str(ds.get(unique, "") or "").strip()
            if uid in out:
                out.pop(uid)  # two rows (a PatientID under two issuers): not one entity, fill nothing
                continue
            out[uid] = ds
        return out

    def completed(self, items: Any, request: Dataset, level: str, model: str) -> Iterator[Any]:
        """`items` with every upstream answer reduced to the request's keys (querythrough.restrict),
        the keys it left out answered from the index, looked up 200 answers at a time."""
        unique = UNIQUE_KEYS.get(level, "")
        batch: list[Dataset] = []

        def flush() -> Iterator[Dataset]:
            known = self.held(request, level, model, batch)
            for m in batch:
                uid = str(m.get(unique, "") or "").strip()
                yield querythrough.restrict(m, request, self.ae_title, known.get(uid))
            batch.clear()

        for item in items:
            if isinstance(item, bytes):
                yield from flush()
                yield item
                continue
            batch.append(item)
            if len(batch) >= 200:
                yield from flush()
        yield from flush()

    def handle(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        t0 = time.monotonic()
        assoc = event.assoc
        calling = (assoc.requestor.ae_title or "").strip()
        req = event.request
        sop_class = str(req.AffectedSOPClassUID)
        model = MODELS.get(sop_class, "study")
        fields: dict[str, Any] = {"level": "-", "matches": 0, "status": "0x0000", "reason": None}
        outcome = querymode.Answer()
        info: dict[str, Any] = {}
        try:
            try:
                identifier = event.identifier
            except Exception as exc:  # undecodable identifier
                fields.update(status=f"0x{UNABLE_TO_PROCESS:04X}", reason=f"cannot decode identifier: {exc}")
                yield _status(UNABLE_TO_PROCESS, fields["reason"]), None
                return
            try:
                query = parse_query(identifier, None, model)
            except QueryError as err:
                fields.update(status=f"0x{err.status:04X}", reason=err.comment)
                yield _status(err.status, err.comment), None
                return
            fields["level"] = query.level
            ts = event.context.transfer_syntax
            explicit = ts != dicomenc.IMPLICIT_LE
            charset = answer_charset(identifier)
            raw = event.raw
            key = (model, explicit, raw) if raw is not None else None

            def local() -> list[bytes]:
                return self.cache_answer(query, key, explicit, charset, info)

            items = querymode.answer(
                self.config.query.mode, local=local, upstream=self._upstream(identifier, query.level or "STUDY", model),
                timeout=self.config.query.upstream_timeout, remember=self._remember(query.level or "STUDY"),
                what=f"c-find {model}/{query.level}", outcome=outcome)
            try:
                yield from pending.stream(event, self.completed(items, identifier, query.level or "", model),
                                          fields, lambda item: item)
            except Exception as exc:
                log.exception("C-FIND from the index failed")
                fields.update(status=f"0x{OUT_OF_RESOURCES:04X}", reason=f"index unavailable: {type(exc).__name__}")
                yield _status(OUT_OF_RESOURCES, fields["reason"]), None
                return
        finally:
            level = logging.WARNING if fields["status"] not in ("0x0000", f"0x{CANCEL:04X}") else logging.INFO
            line = {"event": "c-find", "calling": calling, "called": called_ae_title(assoc), "model": model,
                    "level": fields["level"], "source": outcome.source, "matches": fields["matches"],
                    "status": fields["status"], "ms": int((time.monotonic() - t0) * 1000)}
            if info.get("hot"):
                line["hot"] = "yes"
            if outcome.upstream_ms is not None:
                line["upstream_ms"] = outcome.upstream_ms
            oldest = info.get("oldest")
            if outcome.source == "cache" and oldest is not None:
                if oldest.tzinfo is None:  # SQLite hands back naive UTC
                    oldest = oldest.replace(tzinfo=dt.timezone.utc)
                age = (utcnow() - oldest).total_seconds()
                if age > self.config.query.stale_after:
                    line["stale"] = f"{int(age)}s"
                    level = max(level, logging.WARNING)
            reason = fields["reason"] or outcome.reason
            if reason:
                line["reason"] = reason
            log.log(level, kv(**line))


def contexts() -> list[tuple[str, list[str]]]:
    return [(str(uid), TRANSFER_SYNTAXES) for uid in MODELS]


def handlers(config: Config, engine: Engine, sessions: sessionmaker[Session]) -> dict[str, Any]:
    """SOP class -> the C-FIND service for it."""
    scp = FindSCP(config, engine, sessions)
    return {uid: scp.handle for uid in MODELS}
