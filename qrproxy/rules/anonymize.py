"""DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, for `anonymize` mutations.

Which attribute gets which action (X remove, Z empty, D dummy, U new UID, and the X/Z, X/D, Z/D,
X/Z/D, X/Z/U* choices) comes from Table E.1-1 as the `dicom-anonymizer` package ships it, generated
from the standard's own table (edition 2026c, ~650 attributes including the 50xx/60xx repeating
groups). Its action *functions* are not used: they work on the top level only (a
ReferencedSOPInstanceUID inside ReferencedImageSequence would keep its original value) and keep the
UID map in a process-global dict, which cannot keep a study's UIDs the same after a restart or across
workers. Here the table is applied recursively to every item of every sequence, and new UIDs and
patient ID pseudonyms come from a `Pseudonyms` callable (qrproxy/uidmap.py stores them in the
database; tests pass a dict-backed one).

Choices the standard leaves to the implementation (the IOD is not known here, so the choice that is
valid for every attribute Type is taken): X/Z -> Z; X/D, Z/D, X/Z/D -> D; X/Z/U* -> U for UIDs, the
sequence kept and cleaned item by item, Z otherwise. D on a sequence keeps it and cleans its items;
Z on a sequence leaves it with no items. Private attributes are removed (Table E.1-1 "Private
attributes: X") unless `keep_private`. Burned-in pixel annotations are not detected: pixel data is
never changed.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from qrproxy.config.tags import tag_label

if TYPE_CHECKING:
    from qrproxy.config.schema import Anonymize

# kind ("uid" or "patient_id"), originals -> {original: replacement}; the same original always gets
# the same replacement.
Pseudonyms = Callable[[str, Collection[str]], dict[str, str]]

TABLE_EDITION = "dicomfields_2026c"
_CATEGORY_ACTION = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D", "X_Z_TAGS": "Z",
    "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U*",
}
DATE_VRS = ("DA", "DT", "TM")
_DUMMY = {
    "AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED",
    "SH": "ANONYMIZED", "ST": "ANONYMIZED", "UC": "ANONYMIZED", "UT": "ANONYMIZED",
    "UR": "http://anonymized.invalid",
}
_NUMERIC_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV")

# CID 7050 De-identification Method codes (scheme DCM).
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
RETAIN_UIDS_CODE = ("113110", "Retain UIDs Option")
RETAIN_DATES_CODE = ("113106", "Retain Longitudinal Temporal Information Full Dates Option")

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
SOP_INSTANCE_UID = 0x00080018


@lru_cache(maxsize=1)
def profile_table() -> tuple[dict[int, str], tuple[tuple[int, int, int, int, str], ...]]:
    """({tag: action}, ((group, element, group mask, element mask, action), ...)) of Table E.1-1."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    db = dicom_anonymization_database_selector(TABLE_EDITION)
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for category, action in _CATEGORY_ACTION.items():
        for entry in db[category]:
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return exact, tuple(masked)


def action_for(tag: int) -> str | None:
    exact, masked = profile_table()
    action = exact.get(tag)
    if action is not None:
        return action
    group, element = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, act in masked:
        if group & gm == g & gm and element & em == e & em:
            return act
    return None


class AnonymizeError(Exception):
    """The dataset could not be anonymized; it must then not be sent at all."""


def anonymize(ds: Dataset, options: Anonymize, pseudonyms: Pseudonyms) -> list[str]:
    """Apply the profile to `ds` in place; returns one summary line per kind of change."""
    keep = frozenset(options.keep_tags())
    original_pid = str(ds.get(PATIENT_ID).value or "") if PATIENT_ID in ds else ""
    uid_map: dict[str, str] = {}
    if not options.retain_uids:
        uid_map = pseudonyms("uid", sorted(_collect_uids(ds, keep, options)))
    pid_map: dict[str, str] = {}
    if options.patient_id == "pseudonym" and original_pid:
        pid_map = pseudonyms("patient_id", [original_pid])
    counts = {"removed": 0, "emptied": 0, "replaced": 0, "uids": 0, "private": 0}
    try:
        _clean(ds, options, keep, uid_map, counts)
        _patient(ds, options, original_pid, pid_map)
        _mark(ds, options, keep)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise AnonymizeError(f"{type(exc).__name__}: {exc}") from exc
    meta = getattr(ds, "file_meta", None)
    if meta is not None and SOP_INSTANCE_UID in ds and "MediaStorageSOPInstanceUID" in meta:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return [f"anonymized (PS3.15 E.1 Basic Profile): {counts['removed']} removed, {counts['emptied']} emptied, "
            f"{counts['replaced']} dummy values, {counts['uids']} UIDs remapped, {counts['private']} private "
            f"removed, patient ID {options.patient_id}"]


def _skip(tag: int, vr: str, keep: frozenset[int], options: Anonymize) -> bool:
    if tag in keep:
        return True
    if options.retain_dates and vr in DATE_VRS:
        return True
    return options.retain_uids and vr == "UI"


def _collect_uids(ds: Dataset, keep: frozenset[int], options: Anonymize) -> set[str]:
    out: set[str] = set()
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.tag.is_private and not options.keep_private:
            continue
        action = action_for(tag)
        if elem.VR == "SQ":
            if action not in ("X", "Z") or tag in keep:
                for item in elem.value or []:
                    out |= _collect_uids(item, keep, options)
        elif elem.VR == "UI" and action in ("U", "U*", "D") and tag not in keep:
            out.update(_values(elem))
    return out


def _values(elem: DataElement) -> list[str]:
    v = elem.value
    if v is None or v == "":
        return []
    return [str(x) for x in v] if isinstance(v, (list, MultiValue)) else [str(v)]


def _clean(ds: Dataset, options: Anonymize, keep: frozenset[int], uid_map: dict[str, str],
           counts: dict[str, int], top: bool = True) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        if elem.tag.is_private and not options.keep_private:
            del ds[tag]
            counts["private"] += 1
            continue
        if top and tag in (PATIENT_ID, PATIENT_NAME):
            continue  # _patient() applies the options; nested copies follow the table
        action = action_for(tag)
        if elem.VR == "SQ":
            if action in ("X", "Z") and tag not in keep:
                if action == "X":
                    del ds[tag]
                    counts["removed"] += 1
                else:
                    elem.value = DicomSequence([])
                    counts["emptied"] += 1
                continue
            for item in elem.value or []:  # kept, D or U*: cleaned item by item (K cleans too)
                _clean(item, options, keep, uid_map, counts, top=False)
            continue
        if action is None or _skip(tag, elem.VR, keep, options):
            continue
        if action == "X":
            del ds[tag]
            counts["removed"] += 1
        elif action == "Z" or (action == "U*" and elem.VR != "UI"):
            elem.value = None
            counts["emptied"] += 1
        elif elem.VR == "UI":
            values = [uid_map.get(v, v) for v in _values(elem)]
            elem.value = values if len(values) > 1 else (values[0] if values else None)
            counts["uids"] += len(values)
        else:
            elem.value = _dummy(elem.VR)
            counts["replaced"] += 1


def _dummy(vr: str) -> Any:
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in _NUMERIC_VRS:
        return 0
    return None  # OB/OW/UN/AT...: zero length


def _patient(ds: Dataset, options: Anonymize, original_pid: str, pid_map: dict[str, str]) -> None:
    if PATIENT_ID not in options.keep_tags():
        if options.patient_id == "pseudonym" and original_pid:
            ds.PatientID = pid_map[original_pid]
        elif options.patient_id == "empty" or not original_pid:
            ds.PatientID = ""
    if PATIENT_NAME not in options.keep_tags():
        ds.PatientName = options.patient_name


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _mark(ds: Dataset, options: Anonymize, keep: frozenset[int]) -> None:
    """PatientIdentityRemoved, DeidentificationMethod (text, one value per option, each <= 64
    characters) and the CID 7050 codes of the options honoured in full."""
    codes = [BASIC_PROFILE_CODE]
    text = ["PS3.15 E.1 Basic Profile (qrproxy)"]
    if options.retain_uids:
        codes.append(RETAIN_UIDS_CODE)
        text.append("Retain UIDs")
    if options.retain_dates:
        codes.append(RETAIN_DATES_CODE)
        text.append("Retain Longitudinal Full Dates")
    if options.patient_id != "empty":
        text.append(f"Patient ID {'kept' if options.patient_id == 'keep' else 'pseudonymized'}")
    if options.keep_private:
        text.append("Private attributes kept")
    if keep:
        text.append(("Kept: " + ", ".join(tag_label(t).split(" ")[0] for t in sorted(keep)))[:64])
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [t[:64] for t in text]
    ds.DeidentificationMethodCodeSequence = DicomSequence([_code(v, m) for v, m in codes])
    ds.LongitudinalTemporalInformationModified = "UNMODIFIED" if options.retain_dates else "REMOVED"
