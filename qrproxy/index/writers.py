"""Writing what qrproxy learns into the index: received instances, their hierarchy, and forward rows.

Every path that learns something (C-STORE in, refresh, retrieve-through) comes through here, so that
the patient/study/series/instance rows are built one way. Inserts race between associations (two
modalities sending the same new study), so parents are created with INSERT .. ON CONFLICT DO NOTHING
and then read back, on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from qrproxy.index.models import ForwardItem, ForwardState, Instance, Patient, Series, SpoolObject, Study, utcnow
from qrproxy.store.spool import Committed


def text_of(ds: Dataset, keyword: str, limit: int | None = None) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    text = text.strip()
    if not text:
        return None
    return text[:limit] if limit else text


def int_of(ds: Dataset, keyword: str) -> int | None:
    try:
        v = ds.get(keyword)
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError):
        return None


# Study-level sequences kept (in Study.identifier) so that C-FIND can return them and match inside
# their items (PS3.4 C.2.2.2.6): the ones modalities and viewers ask for.
STUDY_SEQUENCES = ("ProcedureCodeSequence", "ReferencedStudySequence")


def study_sequences(ds: Dataset) -> bytes | None:
    """The study-level sequences of `ds`, encoded explicit VR little endian in UTF-8 (decoded from the
    instance's own character set), or None when it has none."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    present = [kw for kw in STUDY_SEQUENCES if kw in ds]
    if not present:
        return None
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    try:
        for kw in present:
            elem = ds[kw]
            if elem.VR != "SQ" or not elem.value:
                continue
            elem.is_undefined_length = False
            for item in elem.value:
                item.is_undefined_length_sequence_item = False
            write_data_element(fp, elem, ["utf_8"])
    except Exception:  # a malformed optional sequence never costs the instance its index row
        return None
    return fp.getvalue() or None


def read_sequences(data: bytes | None) -> Dataset:
    """`study_sequences`' bytes back as a Dataset (values decoded)."""
    from io import BytesIO

    from pydicom.filereader import read_dataset

    ds = read_dataset(BytesIO(data or b""), is_implicit_VR=False, is_little_endian=True)
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.decode()
    return ds


def normalize_name(name: str | None) -> str | None:
    """Upper case, trailing empty components dropped: `Doe^John^^` and `DOE^JOHN` compare equal."""
    if not name:
        return None
    groups = []
    for group in name.split("="):
        groups.append("^".join(c.strip() for c in group.split("^")).rstrip("^"))
    return "=".join(groups).rstrip("=").upper() or None


@dataclass
class Header:
    """The attributes of one instance that the index and the routing need, read once on receipt."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    patient: dict[str, Any] = field(default_factory=dict)
    study: dict[str, Any] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Header:
        name = text_of(ds, "PatientName", 324)
        return cls(
            sop_class_uid=text_of(ds, "SOPClassUID", 64) or "",
            sop_instance_uid=text_of(ds, "SOPInstanceUID", 64) or "",
            study_instance_uid=text_of(ds, "StudyInstanceUID", 64),
            series_instance_uid=text_of(ds, "SeriesInstanceUID", 64),
            patient={
                "patient_id": text_of(ds, "PatientID", 64) or "",
                "issuer": text_of(ds, "IssuerOfPatientID", 64) or "",
                "patient_name": name,
                "patient_name_norm": normalize_name(name),
                "birth_date": text_of(ds, "PatientBirthDate", 8),
                "sex": text_of(ds, "PatientSex", 16),
            },
            study={
                "study_date": text_of(ds, "StudyDate", 8),
                "study_time": text_of(ds, "StudyTime", 16),
                "accession_number": text_of(ds, "AccessionNumber", 16),
                "study_id": text_of(ds, "StudyID", 16),
                "study_description": text_of(ds, "StudyDescription", 64),
                "referring_physician_name": text_of(ds, "ReferringPhysicianName", 324),
                "identifier": study_sequences(ds),
            },
            series={
                "modality": text_of(ds, "Modality", 16),
                "series_number": int_of(ds, "SeriesNumber"),
                "series_description": text_of(ds, "SeriesDescription", 64),
                "body_part_examined": text_of(ds, "BodyPartExamined", 16),
            },
            instance={"sop_class_uid": text_of(ds, "SOPClassUID", 64), "instance_number": int_of(ds, "InstanceNumber")},
        )


def dialect_insert(session: Session):  # type: ignore[no-untyped-def]
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


# Columns no file holds: what the upstream counts for the whole study or series. An answer's value
# replaces the stored one even for a study held locally (the PACS may hold more of it than we do).
UPSTREAM_COUNTS = frozenset({"number_of_series", "number_of_instances", "modalities_in_study"})


def held_locally(session: Session, model: Any, row_id: int) -> bool:
    """Whether an instance at or under this index row has a copy in the spool: then the row's values
    were read from that file, which outranks what any C-FIND answer says (docs/dicom.md "What the index
    believes")."""
    q = select(Instance.id).where(Instance.object_pk.is_not(None))
    if model is Instance:
        q = q.where(Instance.id == row_id)
    elif model is Series:
        q = q.where(Instance.series_pk == row_id)
    elif model is Study:
        q = q.join(Series, Series.id == Instance.series_pk).where(Series.study_pk == row_id)
    elif model is Patient:
        q = (q.join(Series, Series.id == Instance.series_pk).join(Study, Study.id == Series.study_pk)
             .where(Study.patient_pk == row_id))
    else:
        return False
    return session.execute(q.limit(1)).first() is not None


def merge_row(session: Session, model: Any, key: dict[str, Any], values: dict[str, Any], *,
                   found: bool = False, always: dict[str, Any] | None = None) -> int:
    """Id of the row with `key`, created with `values` (and `always`) if missing.

    An existing row is merged, never overwritten: an empty value (None) replaces nothing, and with
    `found` (the values come from a C-FIND answer, which may leave out keys or differ from the
    files) a row held locally only has its empty columns filled. `always` (bookkeeping such as
    source_node, refreshed_at) is written whenever given. updated_at moves only when an attribute
    changed, so a refresh that learns nothing new leaves the row as it was."""
    cols = [getattr(model, k) for k in key]
    where = [c == v for c, v in zip(cols, key.values())]
    names = list(values)
    extra = {k: v for k, v in (always or {}).items() if v is not None}
    row = session.execute(select(model.id, *[getattr(model, k) for k in names]).where(*where)).first()
    if row is None:
        stmt = (dialect_insert(session)(model).values(**key, **values, **extra)
                .on_conflict_do_nothing(index_elements=list(key)))
        session.execute(stmt)
        return int(session.execute(select(model.id).where(*where)).scalar_one())
    row_id = int(row[0])
    current = dict(zip(names, row[1:]))
    fill_only = found and held_locally(session, model, row_id)
    changed = {k: v for k, v in values.items()
               if v is not None and current[k] != v
               and not (fill_only and current[k] is not None and k not in UPSTREAM_COUNTS)}
    if changed:
        session.execute(update(model).where(model.id == row_id).values(**changed, **extra, updated_at=utcnow()))
    elif extra:
        # Bookkeeping only: updated_at keeps its value (the column's onupdate would move it).
        session.execute(update(model).where(model.id == row_id).values(**extra, updated_at=model.updated_at))
    return row_id


def upsert_series(session: Session, hdr: Header, source_node: str | None = None, refreshed: bool = False,
                  found: bool = False) -> int | None:
    """Patient -> study -> series rows for `hdr`; the series id, or None when its UIDs are missing.
    `found`: `hdr` was read from a C-FIND answer (see `merge_row`)."""
    if not (hdr.study_instance_uid and hdr.series_instance_uid):
        return None
    patient_pk = merge_row(
        session, Patient, {"patient_id": hdr.patient["patient_id"], "issuer": hdr.patient["issuer"]},
        {k: v for k, v in hdr.patient.items() if k not in ("patient_id", "issuer")},
        found=found, always={"source_node": source_node},
    )
    always: dict[str, Any] = {"source_node": source_node}
    if refreshed:
        always["refreshed_at"] = utcnow()
    study_pk = merge_row(session, Study, {"study_instance_uid": hdr.study_instance_uid},
                              dict(hdr.study, patient_pk=patient_pk), found=found, always=always)
    return merge_row(session, Series, {"series_instance_uid": hdr.series_instance_uid},
                          dict(hdr.series, study_pk=study_pk), found=found)


_FOUND_INSTANCE_COLUMNS = ("series_pk", "sop_class_uid", "instance_number")


def merge_found_instances(session: Session, rows: list[dict[str, Any]]) -> list[str]:
    """Write instance rows learned from C-FIND answers (sop_instance_uid, series_pk, sop_class_uid,
    instance_number), merged like `merge_row(found=True)`: new instances are inserted, known
    ones only gain what they lack, and an instance held in the spool keeps the values read from its
    file (dcmqrscp, for one, leaves SOPClassUID out of its IMAGE-level answers). Returns the UIDs
    the index now holds for these rows."""
    if not rows:
        return []
    now = utcnow()
    by_uid = {r["sop_instance_uid"]: r for r in rows}
    uids = list(by_uid)
    existing: dict[str, Any] = {}
    for i in range(0, len(uids), 500):
        for r in session.execute(
            select(Instance.sop_instance_uid, Instance.id, Instance.object_pk,
                   *[getattr(Instance, k) for k in _FOUND_INSTANCE_COLUMNS])
            .where(Instance.sop_instance_uid.in_(uids[i:i + 500]))
        ):
            existing[r.sop_instance_uid] = r
    new = [{"sop_instance_uid": uid, **{k: r.get(k) for k in _FOUND_INSTANCE_COLUMNS}, "updated_at": now}
           for uid, r in by_uid.items() if uid not in existing]
    for i in range(0, len(new), 500):
        session.execute(dialect_insert(session)(Instance).on_conflict_do_nothing(index_elements=["sop_instance_uid"]),
                        new[i:i + 500])
    for uid, cur in existing.items():
        local = cur.object_pk is not None
        changed = {}
        for k in _FOUND_INSTANCE_COLUMNS:
            value, held = by_uid[uid].get(k), getattr(cur, k)
            if value is None or value == held or (local and held is not None):
                continue
            changed[k] = value
        if changed:
            session.execute(update(Instance).where(Instance.id == cur.id).values(**changed, updated_at=now))
    return uids


@dataclass
class Received:
    object_pk: int
    duplicate_of: int | None
    enqueued: list[str]
    superseded: int | None = None


class IndexWriter:
    """Records received instances. Holds a small cache of series already written with the same
    patient/study/series attributes, so the 2nd..Nth instance of a series costs four statements
    (previous copy, spool object, instance upsert, forward rows) instead of a dozen: C-STORE throughput
    is bounded by this transaction. A stale entry (series removed meanwhile) shows up as an
    IntegrityError; the caller then calls `forget()` and retries."""

    def __init__(self, size: int = 2048):
        from cachetools import LRUCache

        self._series: LRUCache[str, tuple[int, int]] = LRUCache(maxsize=size)
        self._stmts: dict[str, dict[str, Any]] = {}

    def forget(self) -> None:
        self._series.clear()

    def _series_pk(self, session: Session, hdr: Header) -> int | None:
        if not (hdr.study_instance_uid and hdr.series_instance_uid):
            return None
        fingerprint = hash((tuple(hdr.patient.items()), tuple(hdr.study.items()), tuple(hdr.series.items()),
                            hdr.study_instance_uid))
        cached = self._series.get(hdr.series_instance_uid)
        if cached is not None and cached[1] == fingerprint:
            return cached[0]
        series_pk = upsert_series(session, hdr)
        assert series_pk is not None
        self._series[hdr.series_instance_uid] = (series_pk, fingerprint)
        return series_pk

    def _statements(self, dialect: str) -> dict[str, Any]:
        """Statements built once per dialect and executed with parameters, so SQLAlchemy compiles each
        once: building statement objects per instance cost more than executing them."""
        st = self._stmts.get(dialect)
        if st is None:
            ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
            upsert = ins(Instance)
            upsert = upsert.on_conflict_do_update(
                index_elements=["sop_instance_uid"],
                # The file's own values win, but an attribute the file lacks keeps what was known.
                set_={**{k: upsert.excluded[k] for k in ("series_pk", "object_pk", "updated_at")},
                      **{k: func.coalesce(upsert.excluded[k], getattr(Instance, k))
                         for k in ("sop_class_uid", "instance_number")}},
            )
            st = {
                "previous": select(SpoolObject.id, SpoolObject.sha256)
                .where(SpoolObject.sop_instance_uid == bindparam("uid"), SpoolObject.origin != "superseded")
                .order_by(SpoolObject.id.desc())
                .limit(1),
                "object": insert(SpoolObject).returning(SpoolObject.id),
                "touch": update(SpoolObject).where(SpoolObject.id == bindparam("pk"))
                .values(last_access_at=bindparam("touched")),
                "instance": upsert,
                "forward": insert(ForwardItem),
            }
            self._stmts[dialect] = st
        return st

    def record_received(
        self,
        session: Session,
        hdr: Header,
        committed: Committed,
        transfer_syntax_uid: str,
        calling_ae: str,
        called_ae: str,
        peer: str,
        destinations: list[str],
        origin: str = "received",
        priority: int = 0,
    ) -> Received:
        """Index a file just committed to the spool and queue it for `destinations`, in the caller's
        transaction. A byte-identical copy of an instance already held is recorded as a duplicate and
        queued nowhere; a different copy supersedes the old one, whose unsent rows are dropped."""
        conn = session.connection()
        st = self._statements(conn.dialect.name)
        previous = conn.execute(st["previous"], {"uid": hdr.sop_instance_uid}).first()
        now = utcnow()
        if previous is not None and previous.sha256 == committed.sha256:
            # The identical copy held counts as used now (retention's LRU). Stamping its row also
            # settles a race with a retention pass evicting it: if the pass deleted it first, no row
            # is stamped and this copy is stored as new; if we stamp first, the pass keeps the study.
            if conn.execute(st["touch"], {"pk": previous.id, "touched": now}).rowcount:
                return Received(previous.id, previous.id, [])
            previous = None
        object_pk = conn.execute(
            st["object"],
            {
                "sop_instance_uid": hdr.sop_instance_uid,
                "sop_class_uid": hdr.sop_class_uid,
                "study_instance_uid": hdr.study_instance_uid,
                "series_instance_uid": hdr.series_instance_uid,
                "transfer_syntax_uid": transfer_syntax_uid,
                "path": committed.relpath,
                "size": committed.size,
                "sha256": committed.sha256,
                "key_id": None,
                "calling_ae": calling_ae or None,
                "called_ae": called_ae or None,
                "peer_address": peer,
                "origin": origin,
                "received_at": now,
                "last_access_at": None,
            },
        ).scalar_one()
        superseded = None
        if previous is not None:
            conn.execute(update(SpoolObject).where(SpoolObject.id == previous.id).values(origin="superseded"))
            conn.execute(
                delete(ForwardItem).where(
                    ForwardItem.object_pk == previous.id,
                    ForwardItem.state.in_([ForwardState.pending, ForwardState.held]),
                )
            )
            superseded = previous.id
        series_pk = self._series_pk(session, hdr)
        if series_pk is not None:
            conn.execute(
                st["instance"],
                {
                    "sop_instance_uid": hdr.sop_instance_uid,
                    "series_pk": series_pk,
                    "object_pk": object_pk,
                    "sop_class_uid": hdr.instance["sop_class_uid"],
                    "instance_number": hdr.instance["instance_number"],
                    "identifier": None,
                    "updated_at": now,
                },
            )
        if destinations:
            conn.execute(
                st["forward"],
                [
                    {
                        "object_pk": object_pk,
                        "node": node,
                        "state": ForwardState.pending,
                        "calling_ae": calling_ae or None,
                        "study_instance_uid": hdr.study_instance_uid,
                        "attempts": 0,
                        "priority": priority,
                        "next_attempt_at": now,
                        "lease_until": None,
                        "lease_owner": None,
                        "last_error": None,
                        "last_status": None,
                        "created_at": now,
                        "sent_at": None,
                    }
                    for node in destinations
                ],
            )
        return Received(object_pk, None, list(destinations), superseded)


# --- what an upstream's C-FIND answers say (refresh, query-through) ---------------------------------


def found_study_header(match: Dataset) -> Header:
    """The Header of a STUDY-level C-FIND answer, with the counts only an upstream knows."""
    hdr = Header.from_dataset(match)
    hdr.study |= {
        "modalities_in_study": text_of(match, "ModalitiesInStudy", 128),
        "number_of_series": int_of(match, "NumberOfStudyRelatedSeries"),
        "number_of_instances": int_of(match, "NumberOfStudyRelatedInstances"),
    }
    return hdr


def upsert_found_study(session: Session, hdr: Header, node: str) -> int:
    """The patient and study rows of a STUDY-level C-FIND answer, merged into what the index holds
    (merge_row with found=True: nothing the answer leaves out or left empty is erased,
    and a study held locally keeps the values read from its files)."""
    patient_pk = merge_row(
        session, Patient, {"patient_id": hdr.patient["patient_id"], "issuer": hdr.patient["issuer"]},
        {k: v for k, v in hdr.patient.items() if k not in ("patient_id", "issuer")},
        found=True, always={"source_node": node},
    )
    return merge_row(session, Study, {"study_instance_uid": hdr.study_instance_uid},
                          dict(hdr.study, patient_pk=patient_pk), found=True,
                          always={"source_node": node, "refreshed_at": utcnow()})
