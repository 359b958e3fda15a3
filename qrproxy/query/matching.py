"""C-FIND attribute matching (PS3.4 C.2.2.2): identifier -> `Query` -> SQL, plus a Python reference matcher.

The cache answers C-FIND and MWL queries from the index, so the matching rules must be written down once
and applied identically on two paths: `where_clauses()` turns the keys that are indexed columns into SQL,
and `matches_in_python()` evaluates every key on a decoded dataset. The Python path is the reference; the
tests check that both select the same rows. Keys the SQL cannot decide exactly are listed by
`residual_keys()`: the caller then decodes the candidate rows and filters them with `matches_in_python()`:

    query = parse_query(identifier, None, "study")          # QueryError -> failure status + comment
    rows = session.scalars(select_matching(query)).all()    # or select(...).where(*where_clauses(query))
    if residual_keys(query):
        rows = [r for r in rows if matches_in_python(query, decoded(r))]
    # answer with query.return_keys

Semantics, chosen to answer like Orthanc (the upstream PACS the tests compare against) where PS3.4 leaves
a choice, and like PS3.4 elsewhere:

- Person names (PN) match case-insensitively on the whole normalised value, all component groups
  included, as Orthanc does (CaseSensitivePN=false): `Yamada*` matches `Yamada^Tarou=山田^太郎=やまだ^たろう`,
  `山田*` does not (the ideographic group is not the start of the value), and `YAMADA^TAROU` without a
  wildcard does not match a value that has other groups; `*=山田^太郎=*` does. Checked against Orthanc
  1.10.1, which differs only where qrproxy normalises more: spaces around components and trailing empty
  components/groups are ignored (`index.normalize_name`: `DOE^JOHN` matches `Doe^John^^`, Orthanc does
  not), `?` is one character (Orthanc: one byte, so `M?LLER` misses `Müller` there), and upper-casing is
  Python's full Unicode mapping (`STRASSE` matches `Straße`; Orthanc keeps `ß`).
- Other strings match case-sensitively (PS3.4 C.2.2.2.1); leading and trailing spaces are insignificant.
- `*` and `?` are wildcards for AE CS LO LT PN SH ST UC UR UT; a value of only `*` is universal matching
  for any VR (Orthanc fails `StudyDate=*` with 0xC000). Other wildcards on other VRs are refused
  (0xA900), as is a range on a UI; a '-' in other VRs is a literal character.
- Backslash-separated values are "any of" (UID list matching for UI; for other VRs this follows
  Orthanc, which treats `CT\\MR` as a list). A multi-valued attribute in the entity matches when any of
  its values does.
- A non-universal key never matches an entity where the attribute is absent or empty.
- Ranges compare the DICOM strings: `lower <= value`, and the upper bound applies at its own precision,
  so `-1015` includes 10:15:59 (the value is cut to the bound's length before comparing). Orthanc compares whole strings, so there `-1015` excludes `101500`, and an empty value matches
  any `-upper` range; both agree with qrproxy for full-precision bounds and non-empty values. DA/TM/DT
  pairs are matched independently unless `combined_datetime=True` (the Combined Date Time Matching
  extended negotiation, C.2.2.2.5.2), where `StudyDate=20260101-20260102, StudyTime=2200-0600` means
  from 1 Jan 22:00 to 2 Jan 06:00, and the boundary days need a time.
- Sequence matching: the query item's keys must all match one item of the entity's sequence; an empty
  query sequence, or one empty item, is universal. The entity lacking the sequence does not match
  (Orthanc's worklist plugin lets it match; worklist items always carry the step sequence).
- Hierarchical queries (the default) follow C.4.1.2.2.1: the unique key of every higher level must be
  present with a single value (a UID list is tolerated), and non-unique keys of higher levels may only be
  empty (they are then return keys). Wildcards on PatientID are tolerated at the PATIENT level. With
  `relational=True` (Orthanc's behaviour, or relational-query extended negotiation), higher-level keys
  of any kind are matched. Non-empty keys below the query level are always refused.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from sqlalchemy import Boolean, ColumnElement, Select, String, and_, func, or_, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import aliased
from sqlalchemy.sql.visitors import InternalTraversal

from qrproxy.index.columns import ENTITIES, QR_COLUMNS, SPS, WORKLIST_COLUMNS, Column
from qrproxy.index.models import Instance, Patient, Series, Study, WorklistItem
from qrproxy.index.writers import normalize_name

IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900
UNABLE_TO_PROCESS = 0xC000

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
MODELS = ("patient", "study", "worklist")
UNIQUE_KEYS = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
               "IMAGE": "SOPInstanceUID"}


class QueryError(Exception):
    """A C-FIND identifier qrproxy must refuse: `status` goes in the C-FIND response, `comment` in
    Error Comment (0000,0902), which is an LO, hence at most 64 characters."""

    def __init__(self, status: int, comment: str):
        super().__init__(f"0x{status:04X}: {comment}")
        self.status = status
        self.comment = comment[:64]


class MatchKind(enum.Enum):
    UNIVERSAL = "universal"  # empty value: return key only
    SINGLE = "single"  # one literal value
    WILDCARD = "wildcard"  # one value with * or ?
    LIST = "list"  # backslash-separated values, any of which may match (UID list matching for UI)
    RANGE = "range"  # DA/TM/DT lower-upper, either side open
    SEQUENCE = "sequence"  # the single query item's keys, matched against the entity's items


@dataclass(frozen=True)
class Key:
    """One matching key. `values` are normalised (PN upper-cased, DA without dots, TM without colons)
    so that the SQL and the Python path compare the very same strings."""

    tag: int
    keyword: str
    vr: str
    kind: MatchKind
    values: tuple[str, ...] = ()
    lower: str | None = None
    upper: str | None = None
    item: Query | None = None
    level: str | None = None
    path: str = ""
    matchable: bool = True  # False: return-only (counts, private tags, binary VRs, QueryRetrieveLevel ...)

    @property
    def active(self) -> bool:
        """Whether this key restricts the answer at all."""
        return self.matchable and self.kind is not MatchKind.UNIVERSAL


@dataclass(frozen=True)
class CombinedRange:
    """A date/time pair matched as one range (C.2.2.2.5.2); a bound is (date, time or None)."""

    date: str
    time: str
    lower: tuple[str, str | None] | None
    upper: tuple[str, str | None] | None


@dataclass(frozen=True)
class ReturnKey:
    """An attribute the response must carry; a sequence lists the sub-keys of its query item."""

    tag: int
    keyword: str
    vr: str
    children: tuple[ReturnKey, ...] = ()


@dataclass(frozen=True)
class Query:
    model: str
    level: str | None
    keys: dict[str, Key]
    return_keys: tuple[ReturnKey, ...]
    combined: tuple[CombinedRange, ...] = ()

    def __getitem__(self, name: str) -> Key:
        return self.keys[name]

    @property
    def active_keys(self) -> list[Key]:
        return [k for k in self.keys.values() if k.active]


# --- attribute tables ---------------------------------------------------------------------------

_LEVEL_KEYWORDS = {
    "PATIENT": """PatientName PatientID IssuerOfPatientID IssuerOfPatientIDQualifiersSequence OtherPatientIDsSequence
        OtherPatientNames PatientBirthDate PatientBirthTime PatientSex EthnicGroup PatientComments TypeOfPatientID
        PatientSpeciesDescription PatientBreedDescription ResponsiblePerson PatientIdentityRemoved
        PatientMotherBirthName NumberOfPatientRelatedStudies NumberOfPatientRelatedSeries
        NumberOfPatientRelatedInstances""",
    "STUDY": """StudyInstanceUID StudyDate StudyTime AccessionNumber IssuerOfAccessionNumberSequence StudyID
        StudyDescription ReferringPhysicianName ModalitiesInStudy SOPClassesInStudy AnatomicRegionsInStudyCodeSequence
        NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances OtherStudyNumbers ProcedureCodeSequence
        NameOfPhysiciansReadingStudy AdmittingDiagnosesDescription PatientAge PatientSize PatientWeight Occupation
        AdditionalPatientHistory ReferencedStudySequence ReferencedPatientSequence""",
    "SERIES": """SeriesInstanceUID Modality SeriesNumber SeriesDescription SeriesDate SeriesTime BodyPartExamined
        Laterality ProtocolName PerformedProcedureStepStartDate PerformedProcedureStepStartTime
        PerformedProcedureStepID RequestAttributesSequence NumberOfSeriesRelatedInstances OperatorsName
        PerformingPhysicianName StationName Manufacturer ManufacturerModelName InstitutionName
        InstitutionalDepartmentName FrameOfReferenceUID""",
    "IMAGE": """SOPInstanceUID SOPClassUID InstanceNumber ContentDate ContentTime AcquisitionDate AcquisitionTime
        AcquisitionDateTime AcquisitionNumber ImageType NumberOfFrames Rows Columns ImageComments
        ConceptNameCodeSequence ContentTemplateSequence CompletionFlag VerificationFlag ObservationDateTime
        DocumentTitle ContentLabel ContentDescription ContentCreatorName InstanceCreationDate
        InstanceCreationTime PresentationCreationDate PresentationCreationTime""",
}
_KEYWORD_LEVEL = {kw: level for level, text in _LEVEL_KEYWORDS.items() for kw in text.split()}

# Return-only: answered by the SCP, never matched (PS3.4 allows only universal matching on these).
_RETURN_ONLY = set("""QueryRetrieveLevel SpecificCharacterSet RetrieveAETitle InstanceAvailability
    StorageMediaFileSetID StorageMediaFileSetUID TimezoneOffsetFromUTC QueryRetrieveView RetrieveURL RetrieveURI
    NumberOfPatientRelatedStudies NumberOfPatientRelatedSeries NumberOfPatientRelatedInstances
    NumberOfStudyRelatedSeries NumberOfStudyRelatedInstances NumberOfSeriesRelatedInstances
    SOPClassesInStudy""".split())

_WILDCARD_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UR", "UT"}
_RANGE_VRS = {"DA", "TM", "DT"}
_NUMERIC_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
_TEXT_VRS = _WILDCARD_VRS | _RANGE_VRS | _NUMERIC_VRS | {"UI", "AS"}

# Date/time pairs that combined date-time matching joins into one range.
_DATETIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime"),
                   ("AcquisitionDate", "AcquisitionTime"), ("PatientBirthDate", "PatientBirthTime"),
                   ("ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime"),
                   ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"),
                   ("InstanceCreationDate", "InstanceCreationTime"))

_DA = re.compile(r"\d{8}")
_TM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_DT = re.compile(r"\d{4}(\d{2}){0,5}(\.\d{1,6})?")
_IS = re.compile(r"[+-]?\d{1,12}")
_DT_OFFSET = re.compile(r"[+-]\d{4}$")
_DT_RANGE = re.compile(r"(\d[\d.]*(?:[+-]\d{4})?)?-(\d[\d.]*(?:[+-]\d{4})?)?")


# --- parsing ------------------------------------------------------------------------------------


def parse_query(identifier: Dataset, level: str | None, model: str, *, relational: bool = False,
                combined_datetime: bool = False) -> Query:
    """Parse a C-FIND identifier of `model` ("patient" | "study" root, or "worklist") at `level`
    (PATIENT/STUDY/SERIES/IMAGE; None: the identifier's QueryRetrieveLevel; ignored for worklists).

    Raises QueryError with 0xA900 for what PS3.4 forbids (bad level, a range on a UI, wildcards on a DA,
    keys at the wrong level, several items in a query sequence) and 0xC000 for values that cannot be
    parsed (a DA that is not a date)."""
    if model not in MODELS:
        raise ValueError(f"unknown information model {model!r}")
    level = None if model == "worklist" else _query_level(identifier, level, model)
    keys, returns, combined = _parse_item(identifier, model, level, "", combined_datetime)
    if level is not None:
        _check_levels(keys, model, level, relational)
    return Query(model, level, keys, returns, combined)


def _query_level(identifier: Dataset, level: str | None, model: str) -> str:
    """The level to answer at: the caller's, else the identifier's; it must exist in the model."""
    if level is None:
        level = str(identifier.get("QueryRetrieveLevel", "") or "").strip()
    level = level.upper()
    allowed = LEVELS if model == "patient" else LEVELS[1:]
    if level not in allowed:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"QueryRetrieveLevel {level!r} invalid for {model} root")
    return level


def _parse_item(ds: Dataset, model: str, level: str | None, prefix: str,
                combined_datetime: bool) -> tuple[dict[str, Key], tuple[ReturnKey, ...], tuple[CombinedRange, ...]]:
    """Keys and return keys of one dataset (the identifier, or a query sequence item)."""
    keys: dict[str, Key] = {}
    returns: list[ReturnKey] = []
    for tag in sorted(ds.keys()):
        tag = Tag(tag)
        if tag.element == 0:  # group lengths carry nothing
            continue
        key = _parse_key(ds, tag, model, level, prefix, combined_datetime)
        keys[key.keyword] = key
        children = key.item.return_keys if key.item is not None else ()
        returns.append(ReturnKey(int(tag), key.keyword, key.vr, children))
    combined = _combine(keys) if combined_datetime else ()
    return keys, tuple(returns), combined


def _parse_key(ds: Dataset, tag: BaseTag, model: str, level: str | None, prefix: str,
               combined_datetime: bool) -> Key:
    """Classify one element into a Key."""
    vr, value = _element(ds, tag)
    keyword = keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})"
    path = f"{prefix}{keyword}"
    key_level = None
    if level is not None:
        key_level = _KEYWORD_LEVEL.get(keyword, level)
        if model == "study" and key_level == "PATIENT":
            key_level = "STUDY"
    base = {"tag": int(tag), "keyword": keyword, "vr": vr, "level": key_level, "path": path}
    if vr == "SQ":
        return _parse_sequence(value, model, path, base, combined_datetime)
    texts = _texts(value)
    if tag.is_private or keyword in _RETURN_ONLY or vr not in _TEXT_VRS or texts is None:
        return Key(kind=MatchKind.UNIVERSAL, matchable=False, values=tuple(texts or ()), **base)
    return Key(**_classify(path, vr, texts), **base)


def _element(ds: Dataset, tag: BaseTag) -> tuple[str, Any]:
    """VR and value of an element; a value pydicom cannot convert (an IS of `5*`) is returned as text so
    that classification can refuse it with the right status."""
    try:
        elem = ds[tag]
        return elem.VR, elem.value
    except (ValueError, TypeError):
        raw = ds.get_item(tag)
        data = raw.value if raw is not None else b""
        text = data.decode("ascii", "replace") if isinstance(data, bytes) else str(data)
        return str(getattr(raw, "VR", None) or "UN"), text.rstrip("\x00 ")


def _texts(value: Any) -> list[str] | None:
    """The element's values as strings ([] when empty); None for binary values, which cannot match."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [_one_text(v) for v in value]
    text = _one_text(value)
    return [text] if text else []


def _one_text(value: Any) -> str:
    original = getattr(value, "original_string", None)
    return (original if isinstance(original, str) else str(value)).strip()


def _parse_sequence(value: Any, model: str, path: str, base: dict[str, Any], combined_datetime: bool) -> Key:
    """Sequence matching: zero items, or one empty item, is universal; one item is matched; more is refused."""
    items = list(value or [])
    if len(items) > 1:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{base['keyword']}: more than one item")
    item_ds = items[0] if items else Dataset()
    keys, returns, combined = _parse_item(item_ds, model, None, path + ".", combined_datetime)
    item = Query(model, None, keys, returns, combined)
    kind = MatchKind.SEQUENCE if any(k.active for k in keys.values()) else MatchKind.UNIVERSAL
    return Key(kind=kind, item=item, **base)


def _classify(path: str, vr: str, texts: list[str]) -> dict[str, Any]:
    """Match kind and normalised values of a non-sequence key, refusing what PS3.4 does not define."""
    if vr == "PN":
        texts = [normalize_name(t) or "" for t in texts]
    texts = [t for t in texts if t]
    if not texts or all(_only_stars(t) for t in texts):
        return {"kind": MatchKind.UNIVERSAL}
    if len(texts) > 1:
        values = tuple(_single(path, vr, t, in_list=True)[1] for t in texts)
        return {"kind": MatchKind.LIST, "values": values}
    text = texts[0]
    if vr in _RANGE_VRS and _is_range(vr, text):
        lower, upper = _parse_range(path, vr, text)
        if lower is None and upper is None:
            return {"kind": MatchKind.UNIVERSAL}
        return {"kind": MatchKind.RANGE, "lower": lower, "upper": upper}
    kind, value = _single(path, vr, text)
    return {"kind": kind, "values": (value,)}


def _only_stars(text: str) -> bool:
    return set(text) == {"*"}


def _is_range(vr: str, text: str) -> bool:
    """A '-' makes a DA/TM value a range; in a DT it may also start a UTC offset."""
    return "-" in text if vr != "DT" else _DT_RANGE.fullmatch(text) is not None and not _is_dt(text)


def _is_dt(text: str) -> bool:
    return _DT.fullmatch(_DT_OFFSET.sub("", text)) is not None


def _single(path: str, vr: str, text: str, in_list: bool = False) -> tuple[MatchKind, str]:
    """One literal or wildcard value, validated for its VR."""
    if "*" in text or "?" in text:
        if vr not in _WILDCARD_VRS:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{path}: wildcards not allowed for {vr}")
        return MatchKind.WILDCARD, text
    if vr in _RANGE_VRS and in_list and _is_range(vr, text):
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{path}: range inside a value list")
    if vr == "UI" and "-" in text:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{path}: range matching not allowed for UI")
    return MatchKind.SINGLE, _normalise_value(path, vr, text)


def _normalise_value(path: str, vr: str, text: str) -> str:
    """Canonical form of a literal: DA without ACR-NEMA dots, TM without colons, DT without offset."""
    if vr == "DA":
        text = text.replace(".", "")
        ok = _DA.fullmatch(text)
    elif vr == "TM":
        text = text.replace(":", "")
        ok = _TM.fullmatch(text)
    elif vr == "DT":
        text = _DT_OFFSET.sub("", text)
        ok = _DT.fullmatch(text)
    elif vr == "IS":
        ok = _IS.fullmatch(text)
    elif vr in _NUMERIC_VRS:
        ok = _number(text) is not None
    else:
        return text
    if not ok:
        raise QueryError(UNABLE_TO_PROCESS, f"{path}: invalid {vr} value {text[:24]!r}")
    return text


def _parse_range(path: str, vr: str, text: str) -> tuple[str | None, str | None]:
    """`lower-upper`, either side possibly empty; both sides are validated like single values."""
    if vr == "DT":
        match = _DT_RANGE.fullmatch(text)
        assert match is not None
        low, high = match.group(1) or "", match.group(2) or ""
    else:
        low, _, high = text.partition("-")
        if "-" in high:
            raise QueryError(UNABLE_TO_PROCESS, f"{path}: invalid {vr} range {text[:24]!r}")
    lower = _normalise_value(path, vr, low.strip()) if low.strip() else None
    upper = _normalise_value(path, vr, high.strip()) if high.strip() else None
    return lower, upper


def _combine(keys: dict[str, Key]) -> tuple[CombinedRange, ...]:
    """Pair date and time keys for combined matching when the time is a range and the date is a range
    or a single value (a single date D means D-D); other shapes stay independent."""
    out = []
    for date_kw, time_kw in _DATETIME_PAIRS:
        date, time = keys.get(date_kw), keys.get(time_kw)
        if date is None or time is None or time.kind is not MatchKind.RANGE:
            continue
        if date.kind is MatchKind.SINGLE:
            d_low = d_high = date.values[0]
        elif date.kind is MatchKind.RANGE:
            d_low, d_high = date.lower, date.upper
        else:
            continue
        lower = (d_low, time.lower) if d_low is not None else None
        upper = (d_high, time.upper) if d_high is not None else None
        out.append(CombinedRange(date_kw, time_kw, lower, upper))
    return tuple(out)


def _check_levels(keys: dict[str, Key], model: str, level: str, relational: bool) -> None:
    """Hierarchical rules: unique keys of higher levels as single values, nothing else above the query
    level unless relational, and nothing below it in any case (empty keys are only return keys)."""
    depth = LEVELS.index(level)
    first = 0 if model == "patient" else 1
    for key in keys.values():
        if key.active and key.level is not None and LEVELS.index(key.level) > depth:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{key.keyword} is below the {level} level")
    if relational:
        return
    uniques = {UNIQUE_KEYS[lv] for lv in LEVELS[first:depth]}
    for unique in sorted(uniques):
        key = keys.get(unique)
        if key is None or key.kind not in (MatchKind.SINGLE, MatchKind.LIST):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{unique} needs a single value at {level} level")
    for key in keys.values():
        if key.active and key.keyword not in uniques and LEVELS.index(key.level or level) < depth:
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"{key.keyword}: key above the {level} level")


# --- the Python reference matcher ---------------------------------------------------------------


def matches_in_python(query: Query, ds: Dataset) -> bool:
    """Whether the entity `ds` (its attributes and those of its parents, decoded) matches every key.

    Study-level ModalitiesInStudy is matched against `ds.ModalitiesInStudy`, which must therefore list
    the modalities of the study's series."""
    return _matches_item(query, ds)


def _matches_item(query: Query, ds: Dataset) -> bool:
    combined = {kw for c in query.combined for kw in (c.date, c.time)}
    for key in query.keys.values():
        if key.active and key.keyword not in combined and not _matches_key(key, ds):
            return False
    return all(_matches_combined(c, ds) for c in query.combined)


def _matches_key(key: Key, ds: Dataset) -> bool:
    if key.kind is MatchKind.SEQUENCE:
        assert key.item is not None
        elem = ds.get(key.tag)
        items = elem.value if elem is not None and elem.VR == "SQ" else None
        return any(_matches_item(key.item, item) for item in items or ())
    return any(_matches_value(key, v) for v in _entity_values(ds, key.tag, key.vr))


def _entity_values(ds: Dataset, tag: int, vr: str) -> list[str]:
    """The entity's values of `tag` as the index stores them (PN normalised, DT without its UTC offset:
    ranges ignore offsets); [] when absent or empty."""
    elem = ds.get(tag)
    if elem is None:
        return []
    try:
        texts = _texts(elem.value) or []
    except (ValueError, TypeError):
        return []
    if vr == "PN":
        texts = [normalize_name(t) or "" for t in texts]
    elif vr == "DT":
        texts = [_DT_OFFSET.sub("", t) for t in texts]
    return [t for t in texts if t]


def _matches_value(key: Key, value: str) -> bool:
    if key.kind is MatchKind.RANGE:
        return _in_range(value, key.lower, key.upper)
    return any(_matches_literal(key.vr, q, value) for q in key.values)


def _matches_literal(vr: str, query: str, value: str) -> bool:
    if "*" in query or "?" in query:
        return _wildcard_regex(query).fullmatch(value) is not None
    if vr in _NUMERIC_VRS:
        return _number(value) == _number(query)
    return value == query


def _in_range(value: str, lower: str | None, upper: str | None) -> bool:
    """Lower bound as a string comparison; the upper bound at its own precision (see module docstring)."""
    return (lower is None or value >= lower) and (upper is None or value[: len(upper)] <= upper)


def _matches_combined(c: CombinedRange, ds: Dataset) -> bool:
    """Combined date-time range: after (date, time) of the lower bound and before that of the upper."""
    dates = _entity_values(ds, Tag(c.date), "DA")
    times = _entity_values(ds, Tag(c.time), "TM")
    if not dates:
        return False
    date, time = dates[0], (times[0] if times else None)
    if c.lower is not None:
        d, t = c.lower
        if not (date > d or (date == d and (t is None or (time is not None and time >= t)))):
            return False
    if c.upper is not None:
        d, t = c.upper
        if not (date < d or (date == d and (t is None or (time is not None and time[: len(t)] <= t)))):
            return False
    return True


@functools.lru_cache(maxsize=1024)
def _wildcard_regex(pattern: str) -> re.Pattern[str]:
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.DOTALL)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


# --- SQL ----------------------------------------------------------------------------------------


def where_clauses(query: Query, level: str | None = None) -> list[ColumnElement[bool]]:
    """SQL conditions for the keys that are index columns, over Patient/Study/Series/Instance (joined
    by the caller, see `select_matching`) or WorklistItem. `level` (default: the query's) keeps only
    keys of that level and above. Keys left out, or translated as a superset, are `residual_keys()`."""
    return [clause for clause, _ in _translations(query, level) if clause is not None]


def residual_keys(query: Query, level: str | None = None) -> list[str]:
    """Paths of active keys that `where_clauses` does not decide exactly: when this is not empty, the
    SQL result is a superset and each candidate must pass `matches_in_python`."""
    out: list[str] = []
    for key in _level_keys(query, level):
        out.extend(_residual(key, query.model))
    return out


def key_clause(key: Key, model: str) -> ColumnElement[bool] | None:
    """The SQL condition of one key, or None when the key has no column (Python decides it)."""
    return _translate(key, _columns(model), key.path)[0]


def select_matching(query: Query) -> Select[Any]:
    """SELECT of the query level's rows (worklist items) joined to their parents, with `where_clauses`."""
    if query.model == "worklist":
        return select(WorklistItem).where(*where_clauses(query))
    entity = ENTITIES[query.level or "STUDY"]
    stmt = select(entity)
    if entity is Instance:
        stmt = stmt.join(Instance.series)
    if entity in (Instance, Series):
        stmt = stmt.join(Series.study)
    if entity is not Patient:
        stmt = stmt.join(Study.patient)
    return stmt.where(*where_clauses(query))


def _columns(model: str) -> dict[str, Column]:
    return WORKLIST_COLUMNS if model == "worklist" else QR_COLUMNS


def _level_keys(query: Query, level: str | None) -> list[Key]:
    level = level or query.level
    depth = LEVELS.index(level) if level else len(LEVELS)
    cols = _columns(query.model)
    keep = []
    for key in query.active_keys:
        col = cols.get(key.path)
        key_level = col.level if col is not None else key.level
        if key_level is None or LEVELS.index(key_level) <= depth:
            keep.append(key)
    return keep


def _translations(query: Query, level: str | None) -> list[tuple[ColumnElement[bool] | None, bool]]:
    cols = _columns(query.model)
    keys = _level_keys(query, level)
    paired = {kw for c in query.combined for kw in (c.date, c.time)}
    out = [_translate(k, cols, k.path) for k in keys if k.keyword not in paired]
    present = {k.keyword for k in keys}
    out += [_combined_translation(c, cols, "") for c in query.combined if c.date in present]
    return out


def _translate(key: Key, cols: dict[str, Column], path: str) -> tuple[ColumnElement[bool] | None, bool]:
    """(clause or None, exact): exact means the clause alone decides the key."""
    if not key.active:
        return None, True
    if key.kind is MatchKind.SEQUENCE:
        return _sequence_translation(key, cols)
    col = cols.get(path)
    if col is None:
        return None, False
    if col.how == "modalities":
        return _modalities_clause(key), True
    if col.how == "pn_raw":
        return _pn_superset_clause(col.column, key), False
    return _value_clause(col.column, key, col.how), True


def _sequence_translation(key: Key, cols: dict[str, Column]) -> tuple[ColumnElement[bool] | None, bool]:
    """A sequence whose item keys are columns of the row (the worklist's single step); else Python."""
    assert key.item is not None
    item = key.item
    paired = {kw for c in item.combined for kw in (c.date, c.time)}
    parts = [_translate(k, cols, k.path) for k in item.active_keys if k.keyword not in paired]
    parts += [_combined_translation(c, cols, key.path + ".") for c in item.combined]
    clauses = [c for c, _ in parts if c is not None]
    exact = all(e for _, e in parts)
    return (and_(*clauses) if clauses else None), exact


def _residual(key: Key, model: str) -> list[str]:
    if key.kind is MatchKind.SEQUENCE:
        assert key.item is not None
        if key.path != SPS or model != "worklist":
            return [key.path]
        out: list[str] = []
        for sub in key.item.active_keys:
            out.extend(_residual(sub, model))
        return out
    col = _columns(model).get(key.path)
    return [key.path] if col is None or col.how == "pn_raw" else []


def _value_clause(column: Any, key: Key, how: str) -> ColumnElement[bool]:
    if key.kind is MatchKind.RANGE:
        return _range_clause(column, key.lower, key.upper, key.vr)
    parts = [_literal_clause(column, v, how) for v in key.values]
    literal_values = [v for v in key.values if "*" not in v and "?" not in v]
    if len(parts) > 1 and len(literal_values) == len(parts):
        return column.in_([int(v) if how == "int" else v for v in literal_values])
    return parts[0] if len(parts) == 1 else or_(*parts)


def _literal_clause(column: Any, value: str, how: str) -> ColumnElement[bool]:
    if how == "int":
        return column == int(float(value))
    if "*" in value or "?" in value:
        # Normalised PN values are upper case on both sides, so LIKE's ASCII case folding is moot.
        return column.like(_like_pattern(value), escape="\\") if how == "pn" else CaseSensitiveLike(column, value)
    return column == value


def _range_clause(column: Any, lower: str | None, upper: str | None, vr: str) -> ColumnElement[bool]:
    """Mirror of `_in_range`; empty strings never match, like absent values on the Python side."""
    parts: list[ColumnElement[bool]] = [column != ""]
    if lower is not None:
        parts.append(_ordered(column, vr) >= lower)
    if upper is not None:
        parts.append(_ordered(_prefix(column, upper, vr), vr) <= upper)
    return and_(*parts)


def _prefix(column: Any, bound: str, vr: str) -> Any:
    """The value cut to the bound's length; DA values have the bound's length already (and keep their index)."""
    return column if vr == "DA" else func.substr(column, 1, len(bound))


def _ordered(column: Any, vr: str) -> Any:
    """DA strings are digits only and order alike in every collation (and keep their index); TM and DT
    may hold a '.', which PostgreSQL's locale collations may skip."""
    return column if vr == "DA" else BinaryCollation(column)


def _combined_translation(c: CombinedRange, cols: dict[str, Column],
                          prefix: str) -> tuple[ColumnElement[bool] | None, bool]:
    date_col, time_col = cols.get(prefix + c.date), cols.get(prefix + c.time)
    if date_col is None or time_col is None:
        return None, False
    date, time = date_col.column, time_col.column
    parts: list[ColumnElement[bool]] = [date != ""]
    if c.lower is not None:
        d, t = c.lower
        parts.append(date >= d if t is None else
                     or_(date > d, and_(date == d, time != "", _ordered(time, "TM") >= t)))
    if c.upper is not None:
        d, t = c.upper
        parts.append(date <= d if t is None else
                     or_(date < d, and_(date == d, time != "", _ordered(_prefix(time, t, "TM"), "TM") <= t)))
    return and_(*parts), True


def _modalities_clause(key: Key) -> ColumnElement[bool]:
    """ModalitiesInStudy: some series of the study has a matching Modality (the study column may be NULL).
    An alias, correlated to the study only, so that a series-level query's own series row is not reused."""
    other = aliased(Series)
    inner = _value_clause(other.modality, key, "text")
    return select(other.id).where(other.study_pk == Study.id, inner).correlate(Study).exists()


# The characters whose Python upper case contains ASCII letters (ß -> SS, ﬁ -> FI, ı -> I ...): SQL's
# upper() may leave them alone, so a row holding one of them is always a candidate. Derived from
# `[c for c in all code points if not c.isascii() and any(u.isascii() for u in c.upper())]`.
_UPPER_TO_ASCII = "ßıŉſǰẖẗẘẙẚﬀﬁﬂﬃﬄﬅﬆ"


def _pn_superset_clause(column: Any, key: Key) -> ColumnElement[bool]:
    """A PN column stored as received: SQL cannot normalise it like Python does, so match a superset
    (spaces and empty components absorbed, non-ASCII letters left to Python) and let Python decide."""
    parts = [func.upper(column).like(_superset_pattern(v), escape="\\") for v in key.values]
    parts += [column.contains(ch, autoescape=True) for ch in _UPPER_TO_ASCII]
    return or_(*parts)


def _superset_pattern(value: str) -> str:
    out = ["%"]
    for ch in value:
        if ch in "*?" or not ch.isascii():
            out.append("%")
        elif ch in "^=":
            out.append("%" + ch + "%")
        else:
            out.append(_like_escape(ch))
    return "".join(out) + "%"


def _like_escape(ch: str) -> str:
    return "\\" + ch if ch in "\\%_" else ch


def _like_pattern(value: str) -> str:
    """DICOM wildcards to LIKE, with LIKE's own metacharacters in the literal parts escaped."""
    return "".join("%" if ch == "*" else "_" if ch == "?" else _like_escape(ch) for ch in value)


def _glob_pattern(value: str) -> str:
    """DICOM wildcards to SQLite GLOB (case-sensitive); `[` and `]` are GLOB's only other metacharacters."""
    return "".join("[[]" if ch == "[" else "[]]" if ch == "]" else ch for ch in value)


class CaseSensitiveLike(ColumnElement[bool]):
    """Case-sensitive wildcard matching: GLOB on SQLite (whose LIKE folds ASCII case), LIKE elsewhere."""

    type = Boolean()
    inherit_cache = True
    _is_implicitly_boolean = True  # a predicate already: no "= 1" appended on SQLite
    _traverse_internals = [("like", InternalTraversal.dp_clauseelement),
                           ("glob", InternalTraversal.dp_clauseelement)]

    def __init__(self, column: Any, pattern: str):
        self.like = column.like(_like_pattern(pattern), escape="\\")
        self.glob = column.op("GLOB", is_comparison=True)(_glob_pattern(pattern))


class BinaryCollation(ColumnElement[str]):
    """Code-point ordering for range comparisons: COLLATE "C" on PostgreSQL (whose locale collations may
    skip punctuation such as the '.' of a TM); SQLite's default collation already is binary."""

    type = String()
    inherit_cache = True
    _traverse_internals = [("inner", InternalTraversal.dp_clauseelement)]

    def __init__(self, inner: Any):
        self.inner = inner


@compiles(CaseSensitiveLike)
def _compile_like(element: CaseSensitiveLike, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.like, **kw))


@compiles(CaseSensitiveLike, "sqlite")
def _compile_glob(element: CaseSensitiveLike, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.glob, **kw))


@compiles(BinaryCollation)
def _compile_plain(element: BinaryCollation, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.inner, **kw))


@compiles(BinaryCollation, "postgresql")
def _compile_collate_c(element: BinaryCollation, compiler: Any, **kw: Any) -> str:
    return f'({compiler.process(element.inner, **kw)}) COLLATE "C"'


__all__ = [
    "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS", "UNABLE_TO_PROCESS", "LEVELS", "MODELS", "UNIQUE_KEYS",
    "CombinedRange", "Key", "MatchKind", "Query", "QueryError", "ReturnKey",
    "key_clause", "matches_in_python", "parse_query", "residual_keys", "select_matching", "where_clauses",
]
