"""Modality worklist items as pure functions: the refresh identifier, one item per scheduled step,
its identity and index columns, the answer to a modality's query, and the MPPS references that
close an item.

Why pure: the same functions serve the refresh job, the MWL SCP, the MPPS SCP and the tests, and they
need no database or network to be checked. Matching itself is `matching.py`'s (model "worklist"):
PS3.4 K.6 puts the step's keys inside the Scheduled Procedure Step Sequence, and one stored item is
one step, so those keys are columns of the item's row and SQL decides them; what SQL cannot decide
is matched in Python on the decoded item (`matching.matches_in_python`).

Items are stored whole, as the upstream answered them (explicit VR little endian dataset bytes with
their Specific Character Set), so an answer carries exactly what the upstream said, in the same
character set. Return keys follow DCMTK wlmscpfs and PS3.4 C.2.2.1.3: a requested key the item lacks
comes back zero-length; a sequence key with no item (or one empty item) returns the whole sequence,
a sequence key with sub-keys returns every item of the sequence reduced to those sub-keys.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from qrproxy.config.tags import parse_tag
from qrproxy.config.units import is_relative_date, resolve_relative_date
from qrproxy.index.writers import normalize_name, text_of
from qrproxy.query.matching import ReturnKey

SPS = "ScheduledProcedureStepSequence"

# Keys of the Scheduled Procedure Step item (PS3.4 Table K.6-1). A refresh `query` may name them at
# the top level (`Modality: CT`): they are moved into the step item, where PS3.4 puts them.
SPS_KEYS = (
    "ScheduledStationAETitle", "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime", "Modality",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription", "ScheduledStationName",
    "ScheduledProcedureStepLocation", "ScheduledProtocolCodeSequence", "PreMedication",
    "ScheduledProcedureStepID", "RequestedContrastAgent", "ScheduledProcedureStepStatus",
    "CommentsOnTheScheduledProcedureStep",
)

# Top-level return keys a refresh asks for, so that the stored item holds whatever a modality may
# ask later (PS3.4 Table K.6-1 and the usual extras). Upstreams leave out what they do not hold.
ITEM_KEYS = (
    "SpecificCharacterSet", "AccessionNumber", "IssuerOfAccessionNumberSequence", "ReferringPhysicianName",
    "ReferencedStudySequence", "ReferencedPatientSequence", "PatientName", "PatientID", "IssuerOfPatientID",
    "OtherPatientIDsSequence", "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientNames",
    "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "PatientComments", "MedicalAlerts",
    "Allergies", "PregnancyStatus", "SpecialNeeds", "PatientState", "AdditionalPatientHistory",
    "ConfidentialityConstraintOnPatientDataDescription", "StudyInstanceUID", "StudyDate", "StudyTime",
    "RequestingPhysician", "RequestingService", "RequestedProcedureDescription", "RequestedProcedureCodeSequence",
    "RequestedProcedureID", "ReasonForTheRequestedProcedure", "RequestedProcedurePriority",
    "PatientTransportArrangements", "RequestedProcedureLocation", "RequestedProcedureComments",
    "ImagingServiceRequestComments", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "AdmissionID", "CurrentPatientLocation",
    "PatientInstitutionResidence", "InstitutionName", "InstitutionAddress", "AdmittingDiagnosesDescription",
    "NamesOfIntendedRecipientsOfResults",
)

DONE_STATUSES = ("COMPLETED", "DISCONTINUED")


# --- encoding ---------------------------------------------------------------------------------


def encode(ds: Dataset) -> bytes:
    """Dataset bytes, explicit VR little endian, no preamble or file meta."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def decode(data: bytes) -> Dataset:
    return read_dataset(BytesIO(data), is_implicit_VR=False, is_little_endian=True)


# --- the refresh identifier -------------------------------------------------------------------


def _value(tag: int, vr: str, value: Any, today: dt.date) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and vr == "DA" and is_relative_date(value):
        return resolve_relative_date(value, today)
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if isinstance(value, (int, float)) and vr not in ("US", "UL", "SS", "SL", "FL", "FD"):
        return str(value)
    return value


def refresh_identifier(query: dict[str, Any], today: dt.date | None = None) -> Dataset:
    """The MWL C-FIND identifier of a `kind: worklist` job: its `query` (step keys moved into the
    Scheduled Procedure Step item, relative DA values such as `today` or `-1d..+1d` resolved against
    `today`) plus every return key in ITEM_KEYS and SPS_KEYS. Sequences are asked for empty, which
    returns them whole."""
    today = today or dt.date.today()
    top, step = Dataset(), Dataset()
    for key, value in query.items():
        tag = parse_tag(key)
        vr = dictionary_VR(tag)
        if vr == "SQ":
            raise ValueError(f"worklist refresh query key {key!r}: sequence keys are not supported")
        value = _value(tag, vr, value, today)
        target = step if Tag(tag) in {Tag(k) for k in SPS_KEYS} else top
        target.add_new(tag, vr, value)
    for keyword in SPS_KEYS:
        if keyword not in step:
            step.add_new(Tag(keyword), dictionary_VR(Tag(keyword)), [] if keyword.endswith("Sequence") else None)
    for keyword in ITEM_KEYS:
        if keyword not in top and keyword != "SpecificCharacterSet":
            top.add_new(Tag(keyword), dictionary_VR(Tag(keyword)), [] if keyword.endswith("Sequence") else None)
    top.ScheduledProcedureStepSequence = [step]
    # Always UTF-8: an upstream that converts answers to the query's character set (Orthanc) would
    # otherwise fall back to its default (Latin-1) and lose what that cannot represent.
    top.SpecificCharacterSet = "ISO_IR 192"
    return top


# --- stored items -----------------------------------------------------------------------------


def split_steps(ds: Dataset) -> list[Dataset]:
    """One item per scheduled procedure step: PS3.4 K.6 answers carry one step each, but an upstream
    listing several steps in one answer gets one stored item (and one match) per step."""
    steps = list(ds.get(SPS) or [])
    if len(steps) <= 1:
        return [ds]
    out = []
    for step in steps:
        one = Dataset()
        for elem in ds:
            if elem.tag != Tag(SPS):
                one.add(elem)
        one.ScheduledProcedureStepSequence = [step]
        out.append(one)
    return out


def _step(ds: Dataset) -> Dataset:
    steps = ds.get(SPS)
    return steps[0] if steps else Dataset()


def item_key(ds: Dataset, encoded: bytes | None = None) -> str:
    """Identity of an item across refreshes: Study Instance UID, Accession Number, Requested Procedure
    ID and Scheduled Procedure Step ID; a content hash when the upstream gives none of them."""
    parts = [text_of(ds, "StudyInstanceUID", 64) or "", text_of(ds, "AccessionNumber", 16) or "",
             text_of(ds, "RequestedProcedureID", 16) or "", text_of(_step(ds), "ScheduledProcedureStepID", 16) or ""]
    if any(parts):
        return "|".join(parts)[:200]
    return "sha1:" + hashlib.sha1(encoded if encoded is not None else encode(ds)).hexdigest()


def columns(ds: Dataset) -> dict[str, Any]:
    """The WorklistItem columns that matching.py reads (matching._WORKLIST_COLUMNS)."""
    step = _step(ds)
    return {
        "patient_id": text_of(ds, "PatientID", 64),
        "patient_name_norm": normalize_name(text_of(ds, "PatientName", 324)),
        "accession_number": text_of(ds, "AccessionNumber", 16),
        "requested_procedure_id": text_of(ds, "RequestedProcedureID", 16),
        "study_instance_uid": text_of(ds, "StudyInstanceUID", 64),
        "scheduled_station_ae": text_of(step, "ScheduledStationAETitle", 16),
        "scheduled_station_name": text_of(step, "ScheduledStationName", 16),
        "modality": text_of(step, "Modality", 16),
        "sps_id": text_of(step, "ScheduledProcedureStepID", 16),
        "sps_start_date": (text_of(step, "ScheduledProcedureStepStartDate", 8) or "").replace(".", "")[:8] or None,
        "sps_start_time": (text_of(step, "ScheduledProcedureStepStartTime", 16) or "").replace(":", "")[:16] or None,
    }


# --- answers ----------------------------------------------------------------------------------


def _empty(tag: int, vr: str) -> DataElement:
    if vr == "SQ":
        return DataElement(tag, "SQ", Sequence())
    if " or " in vr:
        vr = vr.split(" or ")[0]
    return DataElement(tag, vr, None)


_CHARSET = Tag("SpecificCharacterSet")


def _reduce_in_place(item: Dataset, keys: Iterable[ReturnKey]) -> None:
    """Keep only the requested elements of a sequence item (zero-length ones added for those it
    lacks). In place: the item was read from the stored bytes with its parent's character set, so
    pydicom writes its raw elements back as they are."""
    wanted = {Tag(rk.tag): rk for rk in keys}
    d = item._dict
    for tag in [t for t in d if t not in wanted]:
        del d[tag]
    for tag, rk in wanted.items():
        elem = item.get_item(tag)
        if elem is None:
            d[tag] = _empty(tag, rk.vr)
        elif elem.VR == "SQ" and rk.children:
            for sub in item[tag].value:
                _reduce_in_place(sub, rk.children)


def response(item: Dataset, return_keys: Iterable[ReturnKey]) -> Dataset:
    """The answer to one match: the requested keys with the item's values (zero-length when it has
    none), sequences whole or reduced to the requested sub-keys, in the item's character set.

    Elements are copied without being decoded (raw elements of the stored bytes): pydicom writes
    raw elements as they are when the response's encoding and character set are the stored ones,
    which makes an answer cheap (explicit VR little endian, the usual negotiated syntax; pydicom
    converts for another). `item` is consumed (its sequences are reduced in place)."""
    out = Dataset()
    d = out._dict
    for rk in return_keys:
        tag = Tag(rk.tag)
        elem = item.get_item(tag)
        if elem is None:
            if tag != _CHARSET:
                d[tag] = _empty(tag, rk.vr)
        elif elem.VR == "SQ" and rk.children:
            seq = item[tag]
            for sub in seq.value:
                _reduce_in_place(sub, rk.children)
            d[tag] = seq
        else:
            d[tag] = elem
    charset = item.get_item(_CHARSET)
    if charset is not None:
        d[_CHARSET] = charset
    out.set_original_encoding(False, True, item._character_set)
    return out


# --- MPPS references --------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRef:
    """What an MPPS says it performed (one Scheduled Step Attributes Sequence item)."""

    study_instance_uid: str | None
    accession_number: str | None
    requested_procedure_id: str | None
    sps_id: str | None


def step_refs(mpps: Dataset) -> list[StepRef]:
    """The scheduled steps an MPPS refers to (PS3.4 F.7.2.1, Scheduled Step Attributes Sequence)."""
    refs = []
    for item in mpps.get("ScheduledStepAttributesSequence") or []:
        ref = StepRef(text_of(item, "StudyInstanceUID", 64), text_of(item, "AccessionNumber", 16),
                      text_of(item, "RequestedProcedureID", 16), text_of(item, "ScheduledProcedureStepID", 16))
        if ref.study_instance_uid or ref.accession_number:
            refs.append(ref)
    return refs


def ref_matches(ref: StepRef, row: dict[str, Any]) -> bool:
    """Whether a stored item (its columns) is the step `ref` names: the same study (UID, else
    accession), and the same requested procedure and step IDs where both sides have one. An MPPS
    for an unscheduled step (no references) closes nothing."""
    if ref.study_instance_uid and row.get("study_instance_uid"):
        if ref.study_instance_uid != row["study_instance_uid"]:
            return False
    elif not (ref.accession_number and ref.accession_number == row.get("accession_number")):
        return False
    for mine, theirs in ((ref.requested_procedure_id, row.get("requested_procedure_id")),
                         (ref.sps_id, row.get("sps_id"))):
        if mine and theirs and mine != theirs:
            return False
    return True


__all__ = ["SPS", "SPS_KEYS", "ITEM_KEYS", "DONE_STATUSES", "StepRef", "columns", "decode", "encode",
           "item_key", "ref_matches", "refresh_identifier", "response", "split_steps", "step_refs"]
