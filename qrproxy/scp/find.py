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

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom import config as pydicom_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pynetdicom import _config, evt
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import distinct, func, literal_column, select
from sqlalchemy.orm import aliased

from ..db.models import Instance, Patient, Series, Study
from ..db.session import read_only
from ..logs import kv
from ..pynetdicom_tuning import let_peer_speak
from ..matching import (LEVELS, UNIQUE_KEYS, Query, QueryError, matches_in_python, parse_query, residual_keys,
                        select_matching)
from .associations import called_ae_title

if TYPE_CHECKING:
    from ..app import Proxy

CANCEL_CHECK_EVERY = 32  # responses between pauses that let an incoming C-CANCEL be read

log = logging.getLogger("qrproxy.find")

TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "patient",
    str(StudyRootQueryRetrieveInformationModelFind): "study",
}

PENDING = 0xFF00
CANCEL = 0xFE00
OUT_OF_RESOURCES = 0xA700
UNABLE_TO_PROCESS = 0xC000
CHARSET = "ISO_IR 192"

_IGNORE = pydicom_config.IGNORE
_QRLEVEL = Tag("QueryRetrieveLevel")
_CHARSET_TAG = Tag("SpecificCharacterSet")
_RETRIEVE_AE = Tag("RetrieveAETitle")
_ENTITIES = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}

# Index columns that answer a key, with the level whose row holds them. PatientName is returned as
# received (patient_name), matched on its normalised twin in SQL (matching.py).
_COLUMNS: dict[str, tuple[str, Any]] = {
    "PatientID": ("PATIENT", Patient.patient_id),
    "IssuerOfPatientID": ("PATIENT", Patient.issuer),
    "PatientName": ("PATIENT", Patient.patient_name),
    "PatientBirthDate": ("PATIENT", Patient.birth_date),
    "PatientSex": ("PATIENT", Patient.sex),
    "StudyInstanceUID": ("STUDY", Study.study_instance_uid),
    "StudyDate": ("STUDY", Study.study_date),
    "StudyTime": ("STUDY", Study.study_time),
    "AccessionNumber": ("STUDY", Study.accession_number),
    "StudyID": ("STUDY", Study.study_id),
    "StudyDescription": ("STUDY", Study.study_description),
    "ReferringPhysicianName": ("STUDY", Study.referring_physician_name),
    "SeriesInstanceUID": ("SERIES", Series.series_instance_uid),
    "Modality": ("SERIES", Series.modality),
    "SeriesNumber": ("SERIES", Series.series_number),
    "SeriesDescription": ("SERIES", Series.series_description),
    "BodyPartExamined": ("SERIES", Series.body_part_examined),
    "SOPInstanceUID": ("IMAGE", Instance.sop_instance_uid),
    "SOPClassUID": ("IMAGE", Instance.sop_class_uid),
    "InstanceNumber": ("IMAGE", Instance.instance_number),
}

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


def _computed(keyword: str, dialect: str) -> Any:
    """A correlated scalar subquery of the outer row (one SQL statement; the inner tables are aliased
    so that a series-level query's own series row is not reused). A study or series known only from
    an upstream answer has no local children: its stored count/modalities (from that answer) apply."""
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


def _vr(vr: str) -> str:
    """A concrete VR for an ambiguous dictionary VR ('US or SS', 'OB or OW')."""
    return vr.split(" or ")[0] if " or " in vr else vr


def plan(query: Query, dialect: str) -> tuple[Any, list[_Field]]:
    """The SELECT for `query` (its WHERE from matching.py, only the columns the answer needs) and the
    layout of each response identifier."""
    assert query.level is not None
    depth = LEVELS.index(query.level)
    entity = _ENTITIES[query.level]
    columns: list[Any] = [entity.id]
    fields: list[_Field] = []
    seen: set[int] = set()

    def add(tag: int, keyword: str, vr: str, sequence: bool = False) -> None:
        if tag in seen or tag in (_QRLEVEL, _CHARSET_TAG, _RETRIEVE_AE):
            return
        seen.add(tag)
        col = None
        if not sequence:
            where = _COLUMNS.get(keyword)
            level = where[0] if where else _COMPUTED.get(keyword)
            if level is not None and LEVELS.index(level) <= depth:
                columns.append(where[1] if where else _computed(keyword, dialect))
                col = len(columns) - 1
        fields.append(_Field(Tag(tag), keyword, _vr(vr), col, sequence))

    unique = UNIQUE_KEYS[query.level]
    add(Tag(unique), unique, "UI" if unique != "PatientID" else "LO")
    for rk in query.return_keys:
        add(rk.tag, rk.keyword, rk.vr, rk.vr == "SQ")
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
        return raw.split("\\")  # multi-valued strings are stored backslash-joined (index._s)
    return raw


def build(row: Any, fields: list[_Field], level: str, ae_title: str) -> Dataset:
    """The response identifier of one row, built element by element (no copy of the request)."""
    ds = Dataset()
    d = ds._dict  # tags are unique by construction; this skips Dataset.__setitem__'s checks
    d[_CHARSET_TAG] = DataElement(_CHARSET_TAG, "CS", CHARSET, validation_mode=_IGNORE)
    d[_QRLEVEL] = DataElement(_QRLEVEL, "CS", level, validation_mode=_IGNORE)
    d[_RETRIEVE_AE] = DataElement(_RETRIEVE_AE, "AE", ae_title, validation_mode=_IGNORE)
    for f in fields:
        if f.sequence:
            d[f.tag] = DataElement(f.tag, "SQ", [], validation_mode=_IGNORE)
            continue
        value = None if f.column is None else _value(f, row[f.column])
        d[f.tag] = DataElement(f.tag, f.vr, value, validation_mode=_IGNORE)
    # Dataset keeps its elements sorted on write; pydicom sorts _dict lazily, so order here is free.
    return ds


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class FindSCP:
    def __init__(self, proxy: Proxy):
        self.proxy = proxy
        self.ae_title = proxy.config.ae_title
        self.engine = read_only(proxy.engine)
        self.dialect = proxy.engine.dialect.name

    def cache_matches(self, query: Query) -> Iterator[Dataset]:
        """Every local match of `query`, as response identifiers. The rows are all read (and the read
        transaction ended) before this returns; each identifier is built when it is asked for, so the
        first response does not wait for the last one to be built."""
        stmt, fields = plan(query, self.dialect)
        with self.engine.connect() as conn:
            rows = conn.execute(stmt).all()
        return self._identifiers(query, rows, fields)

    def _identifiers(self, query: Query, rows: list[Any], fields: list[_Field]) -> Iterator[Dataset]:
        level = query.level or ""
        residual = bool(residual_keys(query))
        for row in rows:
            ds = build(row, fields, level, self.ae_title)
            # The response holds every requested key, so it is also the entity Python matches on.
            if residual and not matches_in_python(query, ds):
                continue
            yield ds

    def handle(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        t0 = time.monotonic()
        calling = (event.assoc.requestor.ae_title or "").strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        model = MODELS.get(sop_class, "study")
        fields: dict[str, Any] = {"level": "-", "matches": 0, "status": "0x0000", "reason": None}
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
            try:
                matches = self.cache_matches(query)
            except Exception as exc:
                log.exception("C-FIND from the index failed")
                fields.update(status=f"0x{OUT_OF_RESOURCES:04X}", reason=f"index unavailable: {type(exc).__name__}")
                yield _status(OUT_OF_RESOURCES, fields["reason"]), None
                return
            for n, ds in enumerate(matches):
                if n and n % CANCEL_CHECK_EVERY == 0:
                    let_peer_speak(event.assoc)
                if event.is_cancelled:
                    fields.update(status=f"0x{CANCEL:04X}", matches=n, reason="cancelled")
                    yield CANCEL, None
                    return
                fields["matches"] = n + 1
                yield PENDING, ds
            if event.is_cancelled:  # a C-CANCEL after the last match still gets its Cancel status
                fields.update(status=f"0x{CANCEL:04X}", reason="cancelled")
                yield CANCEL, None
        finally:
            level = logging.WARNING if fields["status"] not in ("0x0000", f"0x{CANCEL:04X}") else logging.INFO
            line = {"event": "c-find", "calling": calling, "called": called_ae_title(event.assoc), "model": model,
                    "level": fields["level"], "source": "cache", "matches": fields["matches"],
                    "status": fields["status"], "ms": int((time.monotonic() - t0) * 1000)}
            if fields["reason"]:
                line["reason"] = fields["reason"]
            log.log(level, kv(**line))


def contexts() -> list[tuple[str, list[str]]]:
    return [(str(uid), TRANSFER_SYNTAXES) for uid in MODELS]


def handlers(proxy: Proxy) -> list[tuple[Any, Any]]:
    # pynetdicom decodes and pretty-prints every request and response identifier for its own log
    # unless told not to; that costs more than building the answer. Only with log.dicom_debug.
    debug = proxy.config.log.dicom_debug
    _config.LOG_REQUEST_IDENTIFIERS = debug
    _config.LOG_RESPONSE_IDENTIFIERS = debug
    scp = FindSCP(proxy)
    return [(evt.EVT_C_FIND, scp.handle)]
