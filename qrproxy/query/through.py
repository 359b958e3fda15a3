"""Query-through: asking the upstream on a modality's behalf, and keeping what it answered.

The upstream is asked the modality's own query plus the keys the index stores for that level, so
that what is written into the cache is a complete row (a study remembered from a query that asked
only for PatientName would otherwise sit in the index without its date, invisible to the next
date-range query). The modality gets back exactly the keys it asked for (PS3.4 C.4.1.1.3.2), plus
Query/Retrieve Level, Specific Character Set and qrproxy's own Retrieve AE Title: it retrieves
from the proxy, which retrieves through when it holds no copy.

Only what the index can place is written: patients and studies always; series and instances only
under a study the index already holds (a series answer carries its study's UID but not the patient,
and a study row without its patient would be an invention).
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.index.columns import IMAGE_KEYS, SERIES_KEYS, STUDY_KEYS
from qrproxy.index.dsmerge import is_empty
from qrproxy.index.models import Patient, Series, Study
from qrproxy.index.writers import (Header, found_study_header, int_of, merge_found_instances, merge_row, text_of,
                                   upsert_found_study, upsert_series)
from qrproxy.query.matching import UNIQUE_KEYS

PATIENT_KEYS = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex")
_LEVEL_KEYS = {
    "PATIENT": PATIENT_KEYS,
    "STUDY": STUDY_KEYS,
    "SERIES": SERIES_KEYS,
    "IMAGE": IMAGE_KEYS,
}
_ALWAYS = ("QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle")


def upstream_identifier(identifier: Dataset, level: str, model: str) -> Dataset:
    """The modality's query with the index's keys for `level` added as return keys (empty)."""
    ds = Dataset()
    for elem in identifier:
        ds.add(elem)
    keys = _LEVEL_KEYS.get(level, ())
    if model == "patient" and level == "STUDY":
        keys = tuple(k for k in keys if k not in PATIENT_KEYS or k == "PatientID")
    for keyword in keys:
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def restrict(match: Dataset, request: Dataset, ae_title: str, held: Dataset | None = None) -> Dataset:
    """`match` reduced to the keys of `request` (top level), with our Retrieve AE Title.

    A requested key the upstream left out or answered empty (PS3.4 C.4.1.1.3.2 lets an SCP return
    fewer keys; DCMTK's dcmqrscp returns only what it indexes) is answered from `held`, what qrproxy
    holds for the same entity, and zero-length when qrproxy does not know it either: nothing is
    invented."""
    out = Dataset()
    filled = False
    for elem in request:
        if elem.keyword in _ALWAYS:
            continue
        got = match[elem.tag] if elem.tag in match else None
        if is_empty(got) and held is not None and elem.tag in held and not is_empty(held[elem.tag]):
            got, filled = held[elem.tag], True
        if got is not None:
            out.add(got)
        else:
            vr = elem.VR if elem.VR else dictionary_VR(elem.tag)
            out.add(DataElement(elem.tag, vr, [] if vr == "SQ" else None))
    out.QueryRetrieveLevel = match.get("QueryRetrieveLevel") or request.get("QueryRetrieveLevel")
    if filled and held is not None and "SpecificCharacterSet" in held:
        # Every value above is decoded text; UTF-8 holds the upstream's and ours alike.
        out.SpecificCharacterSet = held.SpecificCharacterSet
    elif "SpecificCharacterSet" in match:
        out.SpecificCharacterSet = match.SpecificCharacterSet
    out.RetrieveAETitle = ae_title
    return out


def held_request(request: Dataset, level: str, uids: list[str]) -> Dataset:
    """The C-FIND identifier that asks the index for the entities with these unique keys of `level`
    (a list match), with every key of `request` as a return key."""
    ds = Dataset()
    for elem in request:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        vr = elem.VR if elem.VR else dictionary_VR(elem.tag)
        ds.add(DataElement(elem.tag, vr, [] if vr == "SQ" else None))
    ds.QueryRetrieveLevel = level
    setattr(ds, UNIQUE_KEYS[level], "\\".join(uids))
    return ds


def remember(sessions: sessionmaker[Session], node: str, level: str, matches: list[Dataset]) -> int:
    """Write the upstream's answers into the index (one transaction); returns the rows written."""
    written = 0
    with sessions.begin() as s:
        if level == "PATIENT":
            for m in matches:
                hdr = Header.from_dataset(m)
                if not hdr.patient["patient_id"]:
                    continue
                merge_row(s, Patient, {"patient_id": hdr.patient["patient_id"], "issuer": hdr.patient["issuer"]},
                               {k: v for k, v in hdr.patient.items() if k not in ("patient_id", "issuer")},
                               found=True, always={"source_node": node})
                written += 1
        elif level == "STUDY":
            for m in matches:
                hdr = found_study_header(m)
                if not hdr.study_instance_uid:
                    continue
                upsert_found_study(s, hdr, node)
                written += 1
        elif level == "SERIES":
            for m in matches:
                hdr = Header.from_dataset(m)
                if not (hdr.study_instance_uid and hdr.series_instance_uid) or not _known_study(s, hdr):
                    continue
                hdr.series["number_of_instances"] = int_of(m, "NumberOfSeriesRelatedInstances")
                if upsert_series(s, hdr, found=True) is not None:  # the study keeps its own source
                    written += 1
        elif level == "IMAGE":
            rows = []
            for m in matches:
                series_uid, uid = text_of(m, "SeriesInstanceUID", 64), text_of(m, "SOPInstanceUID", 64)
                if not (series_uid and uid):
                    continue
                series_pk = s.execute(select(Series.id).where(Series.series_instance_uid == series_uid)).scalar()
                if series_pk is None:
                    continue
                rows.append({"sop_instance_uid": uid, "series_pk": series_pk, "sop_class_uid": text_of(m, "SOPClassUID", 64),
                             "instance_number": int_of(m, "InstanceNumber")})
            written = len(merge_found_instances(s, rows))
    return written


def _known_study(session: Session, hdr: Header) -> bool:
    """Fill `hdr`'s patient and study from the index; False when the study is not there."""
    row = session.execute(
        select(Patient.patient_id, Patient.issuer, Study.study_date)
        .join(Study, Study.patient_pk == Patient.id)
        .where(Study.study_instance_uid == hdr.study_instance_uid)
    ).first()
    if row is None:
        return False
    hdr.patient = {"patient_id": row[0], "issuer": row[1]}
    hdr.study = {}
    return True
