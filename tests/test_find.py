"""C-FIND from the local index (the cache side of `query.mode`), against real peers on loopback.

The site's instances (Latin-1, UTF-8 and ISO 2022 IR 87 Japanese names) go to an Orthanc, and into
qrproxy's index either by a refresh job from that Orthanc (`qrproxy refresh`) or by DCMTK storescu
(indexed on receipt); then DCMTK findscu runs a table of query shapes (patient and study root, every
level, values encoded in the query's Specific Character Set) against both, and the matched sets (by the
level's unique key) and the decoded values of the returned keys must agree. The expected matches are
also written down per query, so that both peers agreeing on a wrong answer still fails. Shapes where
Orthanc is no valid reference (docs/dicom.md "Query matching", matching.py's docstring) are checked against
the generated data only (DOCUMENTED, the Japanese IR 13 test, sequence matching); the hierarchical
refusals are asserted explicitly below. C-CANCEL and failure statuses are checked with a pynetdicom
SCU, which sees the status codes themselves.

Each test runs on SQLite and on PostgreSQL (``db_url``).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import PersonName
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

import dicomgen
from peers import LOCALHOST, OrthancServer, dcmtk
from support import assert_all_success, dcmtk_env, proxy_config, storescu, wait_orthanc_has, wait_until

FINDSCU = dcmtk("findscu")
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
# Returned values compared between qrproxy and Orthanc when the query asks for them (decoded: both
# answer in ISO_IR 192, Orthanc because the test runs it with DefaultEncoding Utf8, see ORTHANC_CONFIG).
# Not compared: sequences (the index does not hold their items; Orthanc reads them from its storage).
COMPARED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
            "StudyTime", "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
            "SeriesInstanceUID", "Modality", "ModalitiesInStudy", "SeriesDescription", "BodyPartExamined",
            "SOPInstanceUID", "SOPClassUID", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
            "NumberOfPatientRelatedInstances", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
            "NumberOfSeriesRelatedInstances", "SeriesNumber", "InstanceNumber")
# Orthanc 1.10 answers C-FIND in its DefaultEncoding (Latin1 unless configured) whatever the query's
# Specific Character Set, dropping every character Latin-1 lacks (Wąsik -> Wsik, the kanji and kana of
# a Japanese name vanish). With Utf8 it answers ISO_IR 192 and is a valid reference for values.
ORTHANC_CONFIG = {"DefaultEncoding": "Utf8"}


# --- the site: 5 patients, 6 studies, 8 series, 14 instances -------------------------------------------

JAPANESE = "Yamada^Tarou=山田^太郎=やまだ^たろう"  # PS3.5 H.3.1
PATIENTS = {
    # Latin-1 (dicomgen's default ISO_IR 100) with umlauts
    "P1": {"patient_id": "FINDP1", "patient_name": "Müller^Jürgen", "PatientBirthDate": "19610203",
           "PatientSex": "M"},
    "P2": {"patient_id": "FINDP2", "patient_name": "Doe^John", "PatientBirthDate": "19750505", "PatientSex": "M"},
    # UTF-8, ASCII only and with letters that Latin-1 lacks
    "P3": {"patient_id": "FINDP3", "patient_name": "Smith^Anna", "PatientBirthDate": "19880808",
           "PatientSex": "F", "SpecificCharacterSet": "ISO_IR 192"},
    "P4": {"patient_id": "FINDP4", "patient_name": "Wąsik^Łukasz", "PatientBirthDate": "19990101",
           "PatientSex": "M", "SpecificCharacterSet": "ISO_IR 192"},
    # ISO 2022 IR 6 (default repertoire) + ISO 2022 IR 87 (JIS X 0208 kanji and kana), PS3.5 H.3.1
    "P5": {"patient_id": "FINDP5", "patient_name": JAPANESE, "PatientBirthDate": "19700707", "PatientSex": "O",
           "SpecificCharacterSet": ["", "ISO 2022 IR 87"]},
}
# study label -> patient, date, time, accession, description, referring physician, [(modality, instances)]
STUDIES = {
    "A": ("P1", "20240115", "083000", "ACC100", "CT HEAD", "Welby^Marcus", [("CT", 2), ("CT", 2)]),
    "B": ("P1", "20240320", "141500", "ACC101", "MR Brain", "Welby^Marcus", [("MR", 2)]),
    "C": ("P2", "20231201", "230000", "ACC200", "CT+MR", "REF^DOCTOR", [("CT", 1), ("MR", 1)]),
    "D": ("P3", "20250601", "070000", "ACC300", "MR Knee", "REF^DOCTOR", [("MR", 3)]),
    "E": ("P4", "20240320", "093000", "ACC400", "US Abdomen", "Kowalski^Jan", [("US", 1)]),
    "F": ("P5", "20240321", "120000", "ACC500", "CT Chest", "REF^DOCTOR", [("CT", 1)]),
}
ALL_STUDIES = set(STUDIES)
NAMES = {attrs["patient_id"]: attrs["patient_name"] for attrs in PATIENTS.values()}
ALL_PATIENTS = set(PATIENTS)


@dataclass
class Site:
    datasets: list[Dataset]
    files: list[Path]
    uid: dict[str, str] = field(default_factory=dict)  # label (A, A1, A1_2, P1) -> unique key value

    def label(self, value: str) -> str:
        return next((k for k, v in self.uid.items() if v == value), value)


def make_site(folder: Path, studies: dict[str, Any] | None = None) -> Site:
    datasets: list[Dataset] = []
    uid: dict[str, str] = {p: attrs["patient_id"] for p, attrs in PATIENTS.items()}
    for study, (patient, date, time_, accession, description, referring, series) in (studies or STUDIES).items():
        uid[study] = generate_uid()
        for n, (modality, count) in enumerate(series, start=1):
            uid[f"{study}{n}"] = generate_uid()
            for i in range(1, count + 1):
                ds = dicomgen.make_ct(study_uid=uid[study], series_uid=uid[f"{study}{n}"], series_number=n,
                                      instance_number=i, rows=8, cols=8, accession=accession, StudyDate=date,
                                      StudyTime=time_, StudyDescription=description,
                                      ReferringPhysicianName=referring, Modality=modality,
                                      SeriesDescription=f"{modality} SERIES {n}", **PATIENTS[patient])
                uid[f"{study}{n}_{i}"] = ds.SOPInstanceUID
                datasets.append(ds)
    return Site(datasets, dicomgen.write_all(datasets, folder), uid)


# --- the query table ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Q:
    name: str
    root: str  # "P" | "S"
    level: str
    keys: dict[str, str]  # keyword -> value ("" = return key); "{A}" etc. are replaced by UIDs
    expect: set[str]  # labels of the matches


RETURN_STUDY = {"PatientName": "", "PatientID": "", "StudyDate": "", "StudyTime": "", "AccessionNumber": ""}
UTF8 = {"SpecificCharacterSet": "ISO_IR 192"}
LATIN1 = {"SpecificCharacterSet": "ISO_IR 100"}
JIS = {"SpecificCharacterSet": "\\ISO 2022 IR 87"}  # first value empty: ISO 2022 IR 6 (PS3.5 H.3.1)

QUERIES = [
    # --- study root, STUDY level
    Q("universal", "S", "STUDY", {**RETURN_STUDY}, ALL_STUDIES),
    Q("patient-id", "S", "STUDY", {**RETURN_STUDY, "PatientID": "FINDP1", "ModalitiesInStudy": ""}, {"A", "B"}),
    Q("patient-id-other-case", "S", "STUDY", {**RETURN_STUDY, "PatientID": "findp1"}, set()),  # LO: case-sensitive
    Q("patient-id-question", "S", "STUDY", {**RETURN_STUDY, "PatientID": "FINDP?"}, ALL_STUDIES),
    Q("patient-id-list", "S", "STUDY", {**RETURN_STUDY, "PatientID": "FINDP2\\FINDP4"}, {"C", "E"}),
    Q("name-prefix-utf8", "S", "STUDY", {**UTF8, **RETURN_STUDY, "PatientName": "MÜ*"}, {"A", "B"}),
    Q("name-exact-latin1-lower", "S", "STUDY", {**LATIN1, **RETURN_STUDY, "PatientName": "müller^jürgen"},
      {"A", "B"}),
    Q("name-infix", "S", "STUDY", {**RETURN_STUDY, "PatientName": "*ller*"}, {"A", "B"}),
    Q("name-lower-case", "S", "STUDY", {**RETURN_STUDY, "PatientName": "doe*"}, {"C"}),
    Q("name-question-ascii", "S", "STUDY", {**RETURN_STUDY, "PatientName": "D?E^*"}, {"C"}),
    Q("name-exact-other-case", "S", "STUDY", {**RETURN_STUDY, "PatientName": "SMITH^ANNA"}, {"D"}),
    # letters outside Latin-1, matched case-insensitively by both (Orthanc upper-cases Ą and Ł too)
    Q("name-utf8-lower", "S", "STUDY", {**UTF8, **RETURN_STUDY, "PatientName": "wąsik*"}, {"E"}),
    Q("name-utf8-upper-suffix", "S", "STUDY", {**UTF8, **RETURN_STUDY, "PatientName": "*^ŁUKASZ"}, {"E"}),
    # ISO 2022 IR 87 in the query and in the stored data (PS3.5 H.3.1)
    Q("name-jis-exact", "S", "STUDY", {**JIS, **RETURN_STUDY, "PatientName": JAPANESE}, {"F"}),
    Q("name-jis-ideographic-group", "S", "STUDY", {**JIS, **RETURN_STUDY, "PatientName": "*=山田^太郎=*"}, {"F"}),
    Q("name-jis-phonetic-suffix", "S", "STUDY", {**JIS, **RETURN_STUDY, "PatientName": "*=やまだ^たろう"}, {"F"}),
    # the ideographic group is not the start of the value: no match in either (matching.py's docstring)
    Q("name-jis-ideographic-prefix", "S", "STUDY", {**JIS, **RETURN_STUDY, "PatientName": "山田*"}, set()),
    Q("name-jis-data-ascii-query", "S", "STUDY", {**RETURN_STUDY, "PatientName": "yamada^tarou=*"}, {"F"}),
    Q("name-utf8-query-jis-data", "S", "STUDY", {**UTF8, **RETURN_STUDY, "PatientName": "*太郎*"}, {"F"}),
    Q("date-closed", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240101-20241231"}, {"A", "B", "E", "F"}),
    Q("date-open-upper", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240301-"}, {"B", "D", "E", "F"}),
    Q("date-open-lower", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "-20231231"}, {"C"}),
    Q("date-single", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240320"}, {"B", "E"}),
    Q("date-none-in-range", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "19900101-19901231"}, set()),
    Q("time-closed", "S", "STUDY", {**RETURN_STUDY, "StudyTime": "080000-100000"}, {"A", "E"}),
    Q("time-open-upper", "S", "STUDY", {**RETURN_STUDY, "StudyTime": "140000-"}, {"B", "C"}),
    Q("time-open-lower", "S", "STUDY", {**RETURN_STUDY, "StudyTime": "-083000"}, {"A", "D"}),
    # date and time ranges together: each matched on its own (no combined date-time negotiation)
    Q("date-and-time", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240101-20241231", "StudyTime": "090000-"},
      {"B", "E", "F"}),
    Q("date-single-and-time", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240320", "StudyTime": "-120000"},
      {"E"}),
    Q("accession", "S", "STUDY", {**RETURN_STUDY, "AccessionNumber": "ACC101"}, {"B"}),
    Q("accession-wildcard", "S", "STUDY", {**RETURN_STUDY, "AccessionNumber": "ACC1*"}, {"A", "B"}),
    Q("accession-question", "S", "STUDY", {**RETURN_STUDY, "AccessionNumber": "ACC?00"}, {"A", "C", "D", "E", "F"}),
    Q("accession-list", "S", "STUDY", {**RETURN_STUDY, "AccessionNumber": "ACC100\\ACC300"}, {"A", "D"}),
    Q("modalities-mr", "S", "STUDY", {**RETURN_STUDY, "ModalitiesInStudy": "MR",
                                      "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""},
      {"B", "C", "D"}),
    Q("modalities-ct", "S", "STUDY", {**RETURN_STUDY, "ModalitiesInStudy": "CT"}, {"A", "C", "F"}),
    Q("modalities-list", "S", "STUDY", {**RETURN_STUDY, "ModalitiesInStudy": "US\\MR"}, {"B", "C", "D", "E"}),
    Q("modalities-none", "S", "STUDY", {**RETURN_STUDY, "ModalitiesInStudy": "XA"}, set()),
    Q("date-and-modality", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240101-", "ModalitiesInStudy": "MR"},
      {"B", "D"}),
    Q("description-wildcard", "S", "STUDY", {**RETURN_STUDY, "StudyDescription": "MR*"}, {"B", "D"}),
    Q("description-case-sensitive", "S", "STUDY", {**RETURN_STUDY, "StudyDescription": "*brain*"}, set()),
    Q("referring-pn-lower", "S", "STUDY", {**RETURN_STUDY, "ReferringPhysicianName": "welby*"}, {"A", "B"}),
    Q("patient-sex", "S", "STUDY", {**RETURN_STUDY, "PatientSex": "F"}, {"D"}),
    Q("uid-list", "S", "STUDY", {**RETURN_STUDY, "StudyInstanceUID": "{A}\\{C}"}, {"A", "C"}),
    Q("uid-list-three", "S", "STUDY", {**RETURN_STUDY, "StudyInstanceUID": "{B}\\{E}\\{F}"}, {"B", "E", "F"}),
    Q("uid-single", "S", "STUDY", {**RETURN_STUDY, "StudyInstanceUID": "{D}"}, {"D"}),
    Q("all-empty-return-keys", "S", "STUDY",
      {**RETURN_STUDY, "PatientBirthDate": "", "StudyDescription": "", "ModalitiesInStudy": "",
       "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "", "StudyID": ""},
      ALL_STUDIES),
    # empty keys of more VRs: PN, CS, DS, AS, LO the data lacks (returned zero-length by both)
    Q("empty-keys-more-vrs", "S", "STUDY",
      {**UTF8, "PatientName": "", "ReferringPhysicianName": "", "PatientSex": "", "PatientWeight": "",
       "PatientAge": "", "IssuerOfPatientID": "", "AdmittingDiagnosesDescription": ""}, ALL_STUDIES),
    # a sequence as a return key: Orthanc answers the item from its storage; the index does not hold the
    # sequence and answers it empty, so only the matched set is compared (values: see COMPARED)
    Q("sequence-return-key", "S", "STUDY", {**RETURN_STUDY, "ProcedureCodeSequence": ""}, ALL_STUDIES),
    # --- study root, SERIES and IMAGE levels
    Q("series-of-study", "S", "SERIES", {"StudyInstanceUID": "{A}", "Modality": "", "SeriesNumber": "",
                                         "NumberOfSeriesRelatedInstances": ""}, {"A1", "A2"}),
    Q("series-modality", "S", "SERIES", {"StudyInstanceUID": "{C}", "Modality": "MR"}, {"C2"}),
    Q("series-modality-list", "S", "SERIES", {"StudyInstanceUID": "{C}", "Modality": "CT\\MR"}, {"C1", "C2"}),
    Q("series-of-study-list", "S", "SERIES", {"StudyInstanceUID": "{A}\\{C}", "Modality": ""},
      {"A1", "A2", "C1", "C2"}),
    Q("series-uid", "S", "SERIES", {"StudyInstanceUID": "{A}", "SeriesInstanceUID": "{A2}", "Modality": ""},
      {"A2"}),
    Q("series-number", "S", "SERIES", {"StudyInstanceUID": "{A}", "SeriesNumber": "2", "SeriesDescription": ""},
      {"A2"}),
    Q("series-description-wildcard", "S", "SERIES",
      {"StudyInstanceUID": "{C}", "SeriesDescription": "MR SERIES*", "BodyPartExamined": ""}, {"C2"}),
    Q("images-of-series", "S", "IMAGE", {"StudyInstanceUID": "{A}", "SeriesInstanceUID": "{A1}",
                                         "SOPInstanceUID": "", "InstanceNumber": ""}, {"A1_1", "A1_2"}),
    Q("image-uid-list", "S", "IMAGE", {"StudyInstanceUID": "{D}", "SeriesInstanceUID": "{D1}",
                                       "SOPInstanceUID": "{D1_1}\\{D1_3}", "InstanceNumber": ""},
      {"D1_1", "D1_3"}),
    Q("image-number", "S", "IMAGE", {"StudyInstanceUID": "{D}", "SeriesInstanceUID": "{D1}",
                                     "InstanceNumber": "2", "SOPClassUID": ""}, {"D1_2"}),
    # --- patient root
    Q("patient-universal", "P", "PATIENT", {"PatientName": "", "PatientBirthDate": "", "PatientSex": ""},
      ALL_PATIENTS),
    Q("patient-exact", "P", "PATIENT", {"PatientID": "FINDP1", "PatientName": "", "PatientBirthDate": "",
                                        "NumberOfPatientRelatedStudies": "", "NumberOfPatientRelatedSeries": "",
                                        "NumberOfPatientRelatedInstances": ""}, {"P1"}),
    Q("patient-name-infix", "P", "PATIENT", {"PatientID": "", "PatientName": "*LLER*"}, {"P1"}),
    Q("patient-name-jis", "P", "PATIENT", {**JIS, "PatientName": "*=山田^*", "PatientBirthDate": ""}, {"P5"}),
    Q("patient-id-wildcard", "P", "PATIENT", {"PatientID": "FIND*", "PatientName": "",
                                              "NumberOfPatientRelatedStudies": ""}, ALL_PATIENTS),
    Q("patient-id-list", "P", "PATIENT", {"PatientID": "FINDP1\\FINDP4", "PatientName": ""}, {"P1", "P4"}),
    Q("patient-birth-range", "P", "PATIENT", {"PatientID": "", "PatientName": "",
                                              "PatientBirthDate": "19700101-19801231"}, {"P2", "P5"}),
    Q("patient-birth-open-lower", "P", "PATIENT", {"PatientName": "", "PatientBirthDate": "19850101-"},
      {"P3", "P4"}),
    Q("patient-birth-open-upper", "P", "PATIENT", {"PatientName": "", "PatientBirthDate": "-19700707"},
      {"P1", "P5"}),
    Q("patient-sex", "P", "PATIENT", {"PatientName": "", "PatientSex": "M"}, {"P1", "P2", "P4"}),
    Q("patient-studies", "P", "STUDY", {"PatientID": "FINDP2", "StudyInstanceUID": "", "StudyDate": "",
                                        "AccessionNumber": "", "ModalitiesInStudy": ""}, {"C"}),
    Q("patient-studies-date", "P", "STUDY", {"PatientID": "FINDP1", "StudyDate": "20240301-20240331",
                                             "AccessionNumber": ""}, {"B"}),
    Q("patient-studies-accession", "P", "STUDY", {"PatientID": "FINDP1", "AccessionNumber": "ACC100",
                                                  "StudyDescription": ""}, {"A"}),
    Q("patient-series", "P", "SERIES", {"PatientID": "FINDP2", "StudyInstanceUID": "{C}", "Modality": ""},
      {"C1", "C2"}),
    Q("patient-series-modality-question", "P", "SERIES",
      {"PatientID": "FINDP2", "StudyInstanceUID": "{C}", "Modality": "M?"}, {"C2"}),
    Q("patient-images", "P", "IMAGE", {"PatientID": "FINDP3", "StudyInstanceUID": "{D}",
                                       "SeriesInstanceUID": "{D1}", "SOPInstanceUID": "", "InstanceNumber": ""},
      {"D1_1", "D1_2", "D1_3"}),
    Q("patient-images-uid-list", "P", "IMAGE", {"PatientID": "FINDP1", "StudyInstanceUID": "{A}",
                                                "SeriesInstanceUID": "{A2}", "SOPInstanceUID": "{A2_2}"},
      {"A2_2"}),
]

# Shapes where Orthanc 1.10 is not a valid reference (it deviates from PS3.4, or qrproxy deliberately
# answers differently: matching.py's docstring, docs/dicom.md "Query matching"): checked against the set derived
# from the generated data above, on qrproxy only.
DOCUMENTED = [
    # trailing empty components are ignored (Orthanc: no match)
    Q("pn-trailing-empty-components", "S", "STUDY", {**UTF8, "PatientName": "MÜLLER^JÜRGEN^^"}, {"A", "B"}),
    # '?' is one character, not one byte (Orthanc: no match, Ü is two bytes in its UTF-8)
    Q("pn-question-mark-is-a-character", "S", "STUDY", {"PatientName": "M?LLER*"}, {"A", "B"}),
    Q("pn-question-mark-utf8", "S", "STUDY", {**UTF8, "PatientName": "W?SIK^*"}, {"E"}),
    # an upper bound applies at its own precision: -1200 includes 12:00:00 (Orthanc: not F)
    Q("time-upper-bound-precision", "S", "STUDY", {"StudyTime": "-1200"}, {"A", "D", "E", "F"}),
    # '*' alone is universal matching for any VR (Orthanc: 0xC000)
    Q("date-only-star-is-universal", "S", "STUDY", {"StudyDate": "*"}, ALL_STUDIES),
    # counts are return keys only, never matched (Orthanc: matches them against absent tags, no match)
    Q("count-is-return-only", "S", "STUDY", {"NumberOfStudyRelatedInstances": "4"}, ALL_STUDIES),
]


# --- findscu --------------------------------------------------------------------------------------------


@dataclass
class FindResult:
    status: str  # e.g. "Success"
    responses: list[Dataset]
    log: str


def _encodings(keys: dict[str, str]) -> list[str]:
    """Python codecs of the query's Specific Character Set (UTF-8 when it has none: findscu's -k
    values then come from a UTF-8 command line, as a user's shell would send them)."""
    terms = keys.get("SpecificCharacterSet")
    return convert_encodings(terms.split("\\")) if terms else ["utf_8"]


def _key_arg(keyword: str, value: str, encodings: list[str]) -> bytes:
    """One findscu -k argument, its value encoded in the query's character set (PN with the escape
    sequences reset at each component and group delimiter, PS3.5 6.1.2.5.3)."""
    if not value:
        return keyword.encode()
    if value.isascii() or keyword == "SpecificCharacterSet":
        return f"{keyword}={value}".encode()
    if dictionary_VR(keyword) == "PN":
        data = PersonName(value, encodings=encodings).encode()
    else:
        data = encode_string(value, encodings)
    return keyword.encode() + b"=" + data


def findscu(port: int, aec: str, root: str, level: str, keys: dict[str, str], out: Path) -> FindResult:
    out.mkdir(parents=True, exist_ok=True)
    encodings = _encodings(keys)
    args: list[str | bytes] = [FINDSCU, "-v", f"-{root}", "-aet", "FINDSCU", "-aec", aec, "-X", "-od", str(out),
                               "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", _key_arg(k, v, encodings)]
    res = subprocess.run([*args, LOCALHOST, str(port)], capture_output=True, timeout=60, env=dcmtk_env())
    log = (res.stdout + res.stderr).decode("utf-8", "replace")
    m = re.search(r"Received Final Find Response \(([^)]*)\)", log)
    assert res.returncode == 0 and m, f"findscu failed (exit {res.returncode}):\n{log[-3000:]}"
    responses = [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]
    return FindResult(m.group(1), responses, log)


def _answer_charset(request_charset: Any, ds: Dataset) -> str:
    """The Specific Character Set qrproxy must answer `ds` in (docs/dicom.md "Query matching"): the request's
    own when it is one single-valued set the answer encoder knows and every text value of the row
    fits it, else ISO_IR 192. Computed from the decoded values pydicom read, not from qrproxy."""
    from qrproxy.net.dicomenc import CODECS

    cs = request_charset if isinstance(request_charset, str) else ""
    if not cs or "\\" in cs or cs not in CODECS or cs in ("ISO_IR 6", "ISO_IR 192"):
        return "ISO_IR 192"
    for elem in ds:
        if elem.VR in ("PN", "LO", "SH", "ST", "LT", "UT", "UC") and elem.value not in (None, ""):
            values = elem.value if elem.VM > 1 else [elem.value]
            try:
                for v in values:
                    str(v).encode(CODECS[cs])
            except UnicodeEncodeError:
                return "ISO_IR 192"
    return cs


def _value(ds: Dataset, keyword: str) -> Any:
    elem = ds[keyword] if keyword in ds else None
    if elem is None or elem.value in (None, ""):
        return None
    value = elem.value
    if keyword == "ModalitiesInStudy":
        return sorted(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [str(value)]
    if keyword.startswith("NumberOf") or keyword in ("SeriesNumber", "InstanceNumber"):
        return int(value)
    return str(value).strip()


def _by_unique(result: FindResult, level: str) -> dict[str, Dataset]:
    return {str(ds.get(UNIQUE[level], "")): ds for ds in result.responses}


# --- fixtures -------------------------------------------------------------------------------------------


def _store_everywhere(site: Site, proxy: Any, orthanc: OrthancServer | None) -> None:
    res = storescu(proxy.port, site.files, aec=proxy.ae_title)
    assert_all_success(res, site.files)
    if orthanc is not None:
        res = storescu(orthanc.dicom_port, site.files, aec=orthanc.aet)
        assert_all_success(res, site.files)
        wait_orthanc_has(orthanc, [ds.SOPInstanceUID for ds in site.datasets])


def _scu_find(port: int, identifier: Dataset, model: str = STUDY_ROOT,
              aec: str = "QRPROXY") -> list[tuple[int, Dataset | None, Dataset]]:
    """(status, identifier, status dataset) of every response, with a pynetdicom SCU."""
    ae = AE(ae_title="PYFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(model)
    assoc = ae.associate(LOCALHOST, port, ae_title=aec)
    assert assoc.is_established
    try:
        return [(int(st.Status), ident, st) for st, ident in assoc.send_c_find(identifier, model) if st]
    finally:
        assoc.release()


def _identifier(**keys: Any) -> Dataset:
    ds = Dataset()
    for k, v in keys.items():
        setattr(ds, k, v)
    return ds


# --- tests ----------------------------------------------------------------------------------------------


def _refresh_config(db_url: str, orthanc: OrthancServer) -> dict[str, Any]:
    """qrproxy with Orthanc as its `query` node and one refresh job that asks for every study."""
    return proxy_config(db_url, {"PACS": {"ae_title": orthanc.aet, "host": orthanc.host, "port": orthanc.dicom_port,
                                          "roles": ["query"]}},
                        refresh=[{"name": "all", "node": "PACS", "kind": "studies", "every": "1d", "query": {}}])


@pytest.mark.orthanc
@pytest.mark.parametrize("fill", ["refresh", "store"])
def test_find_matches_orthanc(db_url: str, orthanc_factory: Any, qrproxy: Any, tmp_path: Path, fill: str) -> None:
    """The table of QUERIES, through qrproxy and straight to Orthanc. `fill`: the cache is filled by a
    refresh job from that Orthanc (`qrproxy refresh`, the issue's set-up), or by C-STORE of the same files
    into qrproxy (indexed on receipt)."""
    orthanc = orthanc_factory(config_overrides=ORTHANC_CONFIG)
    site = make_site(tmp_path / "site")
    if fill == "refresh":
        res = storescu(orthanc.dicom_port, site.files, aec=orthanc.aet)
        assert_all_success(res, site.files)
        wait_orthanc_has(orthanc, [ds.SOPInstanceUID for ds in site.datasets])
        proxy = qrproxy(_refresh_config(db_url, orthanc), start=False)
        r = proxy.cli("refresh", "all")
        assert r.returncode == 0 and f"rows {len(STUDIES)}, new studies {len(STUDIES)}" in r.stdout, \
            r.stdout + r.stderr
        proxy.start()
    else:
        proxy = qrproxy(proxy_config(db_url, {}))
        _store_everywhere(site, proxy, orthanc)

    problems: list[str] = []
    for n, q in enumerate(QUERIES):
        # Orthanc adds the level's unique key only when asked for it; qrproxy always does
        keys = {UNIQUE[q.level]: "", **{k: v.format(**site.uid) for k, v in q.keys.items()}}
        ours = findscu(proxy.port, proxy.ae_title, q.root, q.level, keys, tmp_path / f"q{n}" / "qrproxy")
        theirs = findscu(orthanc.dicom_port, orthanc.aet, q.root, q.level, keys, tmp_path / f"q{n}" / "orthanc")
        where = f"[{q.name}] {q.root}/{q.level} {keys}"
        if ours.status != "Success" or theirs.status != "Success":
            problems.append(f"{where}: final status qrproxy={ours.status!r} orthanc={theirs.status!r}")
            continue
        got, want = _by_unique(ours, q.level), _by_unique(theirs, q.level)
        got_labels = {site.label(u) for u in got}
        if set(got) != set(want):
            problems.append(f"{where}: qrproxy matched {sorted(got_labels)}, "
                            f"Orthanc {sorted(site.label(u) for u in want)}")
        if got_labels != q.expect:
            problems.append(f"{where}: qrproxy matched {sorted(got_labels)}, expected {sorted(q.expect)}")
        if len(got) != len(ours.responses):
            problems.append(f"{where}: qrproxy answered {len(ours.responses)} responses for {len(got)} entities")
        for unique, ds in got.items():
            other = want.get(unique)
            # names decoded as generated, whatever character set the data and the query used
            pid = str(ds.get("PatientID", ""))
            if "PatientName" in keys and pid in NAMES and str(ds.get("PatientName", "")) != NAMES[pid]:
                problems.append(f"{where}: {site.label(unique)} PatientName {str(ds.PatientName)!r}, "
                                f"generated {NAMES[pid]!r}")
            for kw in COMPARED:
                if kw in keys and other is not None and _value(ds, kw) != _value(other, kw):
                    problems.append(f"{where}: {site.label(unique)} {kw}: qrproxy {_value(ds, kw)!r}, "
                                    f"Orthanc {_value(other, kw)!r}")
            # exactly the requested keys, plus level, unique key, character set and retrieve AE title
            expected_keys = set(keys) | {"QueryRetrieveLevel", UNIQUE[q.level], "SpecificCharacterSet",
                                         "RetrieveAETitle"}
            present = {e.keyword for e in ds}
            if present != expected_keys:
                problems.append(f"{where}: keys {sorted(present ^ expected_keys)} differ from the request")
            if ds.get("SpecificCharacterSet") != _answer_charset(keys.get("SpecificCharacterSet"), ds) \
                    or ds.get("RetrieveAETitle") != proxy.ae_title:
                problems.append(f"{where}: charset {ds.get('SpecificCharacterSet')!r}, "
                                f"retrieve AE {ds.get('RetrieveAETitle')!r}")
            if ds.get("QueryRetrieveLevel") != q.level:
                problems.append(f"{where}: QueryRetrieveLevel {ds.get('QueryRetrieveLevel')!r}")
    for n, q in enumerate(DOCUMENTED):
        keys = {UNIQUE[q.level]: "", **q.keys}
        ours = findscu(proxy.port, proxy.ae_title, q.root, q.level, keys, tmp_path / f"d{n}")
        got_labels = {site.label(u) for u in _by_unique(ours, q.level)}
        if ours.status != "Success" or got_labels != q.expect:
            problems.append(f"[{q.name}] {keys}: qrproxy {ours.status} {sorted(got_labels)}, "
                            f"documented {sorted(q.expect)}")
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems)

    # one log line per C-FIND, with model, level, matches and time
    log = proxy.log_text()
    lines = [ln for ln in log.splitlines() if "event=c-find" in ln]
    assert len(lines) >= len(QUERIES), log[-3000:]
    assert any("model=patient" in ln and "level=IMAGE" in ln and "matches=3" in ln for ln in lines), lines
    assert all(re.search(r" ms=\d+", ln) for ln in lines)


def test_find_values_from_the_index(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    """Non-ASCII names come back as stored, in the request's character set when they fit it (ISO_IR
    100 here); keys the index does not hold come back empty; counts and ModalitiesInStudy are
    computed per study."""
    site = make_site(tmp_path / "site")
    proxy = qrproxy(proxy_config(db_url, {}))
    _store_everywhere(site, proxy, None)
    rsp = _scu_find(proxy.port, _identifier(
        QueryRetrieveLevel="STUDY", SpecificCharacterSet="ISO_IR 100", PatientName="müller*", StudyInstanceUID="",
        ModalitiesInStudy="", NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="",
        InstitutionName="", StudyComments="", OtherPatientIDsSequence=[], PatientBirthDate=""))
    statuses = [s for s, _, _ in rsp]
    assert statuses == [0xFF00, 0xFF00, 0x0000], statuses
    answers = {str(ds.StudyInstanceUID): ds for s, ds, _ in rsp if s == 0xFF00}
    a, b = answers[site.uid["A"]], answers[site.uid["B"]]
    assert a.SpecificCharacterSet == "ISO_IR 100"
    assert str(a.PatientName) == "Müller^Jürgen"
    assert a.ModalitiesInStudy == "CT"
    assert (int(a.NumberOfStudyRelatedSeries), int(a.NumberOfStudyRelatedInstances)) == (2, 4)
    assert (int(b.NumberOfStudyRelatedSeries), int(b.NumberOfStudyRelatedInstances)) == (1, 2)
    assert a.PatientBirthDate == "19610203"
    for kw in ("InstitutionName", "StudyComments"):
        assert kw in a and a[kw].value in (None, ""), kw
    assert "OtherPatientIDsSequence" in a and len(a.OtherPatientIDsSequence) == 0
    # a study with two modalities lists both
    rsp = _scu_find(proxy.port, _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=site.uid["C"],
                                            ModalitiesInStudy=""))
    assert sorted(rsp[0][1].ModalitiesInStudy) == ["CT", "MR"]
    # a key only Python can decide (ReferringPhysicianName, stored as received) still matches
    rsp = _scu_find(proxy.port, _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                                            ReferringPhysicianName="ref^doctor"))
    want = {site.uid[k] for k, study in STUDIES.items() if study[5] == "REF^DOCTOR"}
    assert {str(ds.StudyInstanceUID) for s, ds, _ in rsp if s == 0xFF00} == want
    # a key the index does not hold never matches a value (unknown, not absent from the study)
    rsp = _scu_find(proxy.port, _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                                            StudyComments="x*"))
    assert [s for s, _, _ in rsp] == [0x0000]


def test_answer_keys_charset_and_retrieve_ae(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    """Every Pending identifier holds exactly the requested keys, the level's unique key (added when the
    request lacks it; the higher levels' unique keys come from the request), QueryRetrieveLevel,
    SpecificCharacterSet and RetrieveAETitle (qrproxy's own AE title, whatever AE title was called), at
    every level of both models, including a request with no key but the level."""
    site = make_site(tmp_path / "site")
    proxy = qrproxy(proxy_config(db_url, {}))
    _store_everywhere(site, proxy, None)
    always = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}
    cases = [
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY"}, {"StudyInstanceUID"}, len(STUDIES)),
        (STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientName": "müller*", "SpecificCharacterSet": "ISO_IR 100"},
         {"StudyInstanceUID", "PatientName"}, 2),
        (STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": site.uid["A"], "SeriesDate": "",
                      "Modality": ""}, {"StudyInstanceUID", "SeriesInstanceUID", "SeriesDate", "Modality"}, 2),
        (STUDY_ROOT, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": site.uid["D"],
                      "SeriesInstanceUID": site.uid["D1"], "InstanceNumber": "", "ContentDate": ""},
         {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "InstanceNumber", "ContentDate"}, 3),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientBirthDate": "19700101-19801231"},
         {"PatientID", "PatientBirthDate"}, 2),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "PatientID": "FINDP1", "StudyDate": ""},
         {"PatientID", "StudyInstanceUID", "StudyDate"}, 2),
        (PATIENT_ROOT, {"QueryRetrieveLevel": "IMAGE", "PatientID": "FINDP1", "StudyInstanceUID": site.uid["A"],
                        "SeriesInstanceUID": site.uid["A2"]},
         {"PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"}, 2),
    ]
    problems = []
    for called in ("QRPROXY", "SOMEALIAS"):
        for model, keys, want_keys, count in cases:
            rsp = _scu_find(proxy.port, _identifier(**keys), model, aec=called)
            pending = [ds for s, ds, _ in rsp if s == 0xFF00]
            if len(pending) != count or rsp[-1][0] != 0x0000:
                problems.append(f"{called} {keys}: {len(pending)} matches, want {count}; final {rsp[-1][0]:#06x}")
            for ds in pending:
                present = {e.keyword for e in ds}
                if present != want_keys | always:
                    problems.append(f"{called} {keys}: keys differ by {sorted(present ^ (want_keys | always))}")
                if (ds.SpecificCharacterSet, ds.RetrieveAETitle, ds.QueryRetrieveLevel) != \
                        (_answer_charset(keys.get("SpecificCharacterSet"), ds), "QRPROXY", keys["QueryRetrieveLevel"]):
                    problems.append(f"{called} {keys}: {ds.SpecificCharacterSet!r} {ds.RetrieveAETitle!r} "
                                    f"{ds.QueryRetrieveLevel!r}")
                if "PatientName" in want_keys and str(ds.PatientName) != "Müller^Jürgen":
                    problems.append(f"{called} {keys}: PatientName {str(ds.PatientName)!r}")
    assert not problems, "\n".join(problems)


# PS3.5 H.3.2: JIS X 0201 (half-width katakana, ISO 2022 IR 13) as the default, JIS X 0208 by escape.
KATAKANA = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"


def test_find_japanese_character_sets(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    """Data in ISO 2022 IR 13\\ISO 2022 IR 87 (PS3.5 H.3.2) next to ISO 2022 IR 87 (H.3.1) and the other
    sets, queried by findscu in each of them. Orthanc 1.10 is no reference here: it decodes the
    ISO 2022 IR 13 + IR 87 name wrongly (the kanji and kana groups come out as raw JIS bytes,
    `ﾔﾏﾀﾞ^ﾀﾛｳ=;3ED^B@O:=$d$^$@^$?$m$&`), so qrproxy's answers are compared with the generated data."""
    site = make_site(tmp_path / "site")
    g_study, g_series = generate_uid(), generate_uid()
    katakana = dicomgen.make_ct(study_uid=g_study, series_uid=g_series, rows=8, cols=8, patient_id="FINDP6",
                                patient_name=KATAKANA, accession="ACC600", StudyDate="20240322",
                                SpecificCharacterSet=["ISO 2022 IR 13", "ISO 2022 IR 87"])
    files = [*site.files, *dicomgen.write_all([katakana], tmp_path / "katakana")]
    proxy = qrproxy(proxy_config(db_url, {}))
    assert_all_success(storescu(proxy.port, files, aec=proxy.ae_title), files)
    ir13 = {"SpecificCharacterSet": "ISO 2022 IR 13\\ISO 2022 IR 87"}
    cases = [
        ("exact-ir13", {**ir13, "PatientName": KATAKANA}, {g_study}),
        ("katakana-prefix", {**ir13, "PatientName": "ﾔﾏﾀﾞ*"}, {g_study}),
        ("kanji-group-both-sets", {**ir13, "PatientName": "*=山田^太郎=*"}, {g_study, site.uid["F"]}),
        ("kana-group-ir87", {**JIS, "PatientName": "*=やまだ^たろう"}, {g_study, site.uid["F"]}),
        ("kanji-utf8", {**UTF8, "PatientName": "*山田*"}, {g_study, site.uid["F"]}),
        ("exact-ir87", {**JIS, "PatientName": JAPANESE}, {site.uid["F"]}),
        ("latin1-query", {**LATIN1, "PatientName": "*ü*"}, {site.uid["A"], site.uid["B"]}),
    ]
    names = {**NAMES, "FINDP6": KATAKANA}
    problems = []
    for n, (name, keys, want) in enumerate(cases):
        keys = {"StudyInstanceUID": "", "PatientID": "", "AccessionNumber": "", **keys}
        res = findscu(proxy.port, proxy.ae_title, "S", "STUDY", keys, tmp_path / f"j{n}")
        got = {str(ds.StudyInstanceUID) for ds in res.responses}
        if res.status != "Success" or got != want:
            problems.append(f"{name}: {res.status} {sorted(site.label(u) for u in got)}, "
                            f"want {sorted(site.label(u) for u in want)}")
        for ds in res.responses:
            if ds.SpecificCharacterSet != _answer_charset(keys.get("SpecificCharacterSet"), ds) \
                    or str(ds.PatientName) != names[str(ds.PatientID)]:
                problems.append(f"{name}: {ds.SpecificCharacterSet!r} {str(ds.PatientName)!r}")
    assert not problems, "\n".join(problems)


def _code_item(value: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "99QRP", f"Procedure {value}"
    return item


@pytest.mark.orthanc
def test_sequence_keys_match_orthanc(db_url: str, orthanc_factory: Any, qrproxy: Any, tmp_path: Path) -> None:
    """Sequence matching (PS3.4 C.2.2.2.6) and sequence return keys. Orthanc answers sequence return keys
    from its storage (StorageAccessOnFind Always), so their items are compared with Orthanc's; but it does
    no sequence matching in Query/Retrieve (an item's values are ignored: `PX` matches both studies), so
    the matched sets are compared with the generated data."""
    orthanc = orthanc_factory(config_overrides=ORTHANC_CONFIG)
    studies = {label: generate_uid() for label in ("X", "Y")}
    datasets = [dicomgen.make_ct(study_uid=uid, rows=8, cols=8, patient_id="FINDSEQ", accession=f"SEQ{label}",
                                 ProcedureCodeSequence=[_code_item(f"P{label}")]) for label, uid in studies.items()]
    files = dicomgen.write_all(datasets, tmp_path / "seq")
    proxy = qrproxy(proxy_config(db_url, {}))
    _store_everywhere(Site(datasets, files), proxy, orthanc)
    problems = []
    for n, (name, keys, want) in enumerate([
        ("item-match", {"ProcedureCodeSequence[0].CodeValue": "PX"}, {studies["X"]}),
        ("item-wildcard", {"ProcedureCodeSequence[0].CodeValue": "P*",
                           "ProcedureCodeSequence[0].CodeMeaning": ""}, set(studies.values())),
        ("item-no-match", {"ProcedureCodeSequence[0].CodeValue": "PZ"}, set()),
        ("return-only", {"ProcedureCodeSequence": ""}, set(studies.values())),
    ]):
        keys = {"StudyInstanceUID": "", "PatientID": "FINDSEQ", **keys}
        ours = findscu(proxy.port, proxy.ae_title, "S", "STUDY", keys, tmp_path / f"s{n}" / "qrproxy")
        got = _by_unique(ours, "STUDY")
        if set(got) != want:
            problems.append(f"{name}: qrproxy matched {len(got)}, the data {len(want)}")
        if name != "return-only":
            continue
        theirs = _by_unique(findscu(orthanc.dicom_port, orthanc.aet, "S", "STUDY", keys,
                                    tmp_path / f"s{n}" / "orthanc"), "STUDY")
        for uid, ds in got.items():
            mine = [(i.get("CodeValue"), i.get("CodeMeaning")) for i in ds.get("ProcedureCodeSequence", [])]
            ref = [(i.get("CodeValue"), i.get("CodeMeaning")) for i in theirs[uid].get("ProcedureCodeSequence", [])]
            if mine != ref:
                problems.append(f"{name}: ProcedureCodeSequence qrproxy {mine}, Orthanc {ref}")
    assert not problems, "\n".join(problems)


REFUSED = [
    # PS3.4 C.4.1.1.3: a level is required, and must exist in the model
    ("no-level", STUDY_ROOT, {"PatientName": "DOE*"}, 0xA900),
    ("patient-level-in-study-root", STUDY_ROOT, {"QueryRetrieveLevel": "PATIENT", "PatientID": ""}, 0xA900),
    ("bad-level", PATIENT_ROOT, {"QueryRetrieveLevel": "FRAME", "PatientID": "X"}, 0xA900),
    # keys below the level, wildcards on a DA, a range on a UI, a DA that is no date
    ("key-below-level", STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "SeriesInstanceUID": "1.2.3"}, 0xA900),
    ("wildcard-date", STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024*"}, 0xA900),
    ("uid-range", STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2-1.3"}, 0xA900),
    ("invalid-date", STUDY_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": "2024AB01"}, 0xC000),
    # hierarchical rules (C.4.1.2.2.1), where Orthanc (relational) would answer: the unique keys of the
    # levels above are required, other keys of those levels may only be return keys
    ("series-without-study-uid", STUDY_ROOT, {"QueryRetrieveLevel": "SERIES", "Modality": "CT"}, 0xA900),
    ("patient-root-study-without-id", PATIENT_ROOT, {"QueryRetrieveLevel": "STUDY", "StudyDate": ""}, 0xA900),
    ("series-matching-patient-name", STUDY_ROOT,
     {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": "1.2.3", "PatientName": "DOE*"}, 0xA900),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_forbidden_queries_get_failure_status(db_url: str, qrproxy: Any) -> None:
    proxy = qrproxy(proxy_config(db_url, {}))
    ae = AE(ae_title="PYFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_ROOT)
    ae.add_requested_context(PATIENT_ROOT)
    assoc = ae.associate(LOCALHOST, proxy.port, ae_title="QRPROXY")
    assert assoc.is_established
    problems = []
    try:
        for name, model, keys, want in REFUSED:
            rsp = [(st, ident) for st, ident in assoc.send_c_find(_identifier(**keys), model) if st]
            codes = [int(st.Status) for st, _ in rsp]
            comment = str(rsp[-1][0].get("ErrorComment", "")) if rsp else ""
            if codes != [want] or not comment or rsp[-1][1] is not None:
                problems.append(f"{name}: statuses {[hex(c) for c in codes]} comment {comment!r}, want {want:#06x}")
        # the association stays usable after refusals
        ok = [int(st.Status) for st, _ in assoc.send_c_find(_identifier(QueryRetrieveLevel="STUDY",
                                                                         StudyInstanceUID=""), STUDY_ROOT)]
        assert ok == [0x0000]
    finally:
        assoc.release()
    assert not problems, "\n".join(problems)
    wait_until(lambda: "event=c-find" in proxy.log_text() and "status=0xA900" in proxy.log_text(), 30,
               "a c-find refusal in the log")
    assert re.search(r"event=c-find .*status=0xA900 .*reason=", proxy.log_text())


def test_cancel_stops_pending_responses(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    datasets = [dicomgen.make_ct(study_uid=study, series_uid=series, instance_number=i, rows=8, cols=8,
                                 patient_id="CANCEL1", patient_name="CANCEL^TEST") for i in range(1, 201)]
    files = dicomgen.write_all(datasets, tmp_path / "many")
    proxy = qrproxy(proxy_config(db_url, {}))
    assert_all_success(storescu(proxy.port, files, aec="QRPROXY"), files)
    query = _identifier(QueryRetrieveLevel="IMAGE", StudyInstanceUID=study, SeriesInstanceUID=series,
                        SOPInstanceUID="", InstanceNumber="")

    # without a cancel: all 200, then Success
    rsp = _scu_find(proxy.port, query)
    assert [s for s, _, _ in rsp].count(0xFF00) == 200 and rsp[-1][0] == 0x0000
    assert {str(ds.SOPInstanceUID) for s, ds, _ in rsp if s == 0xFF00} == {d.SOPInstanceUID for d in datasets}

    # C-CANCEL after the first pending response. 200 answers can all be on the wire before the cancel
    # arrives, so the series is first grown to 5000 instances (rows added to the index directly: test
    # data only, the answer still comes over DICOM).
    from sqlalchemy import create_engine, insert, select

    from qrproxy.index.models import Instance, Series

    eng = create_engine(db_url)
    try:
        with eng.begin() as conn:
            series_pk = conn.execute(select(Series.id).where(Series.series_instance_uid == series)).scalar_one()
            conn.execute(insert(Instance), [
                {"sop_instance_uid": f"1.2.826.0.1.3680043.10.1.{i}", "series_pk": series_pk,
                 "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "instance_number": 1000 + i}
                for i in range(4800)
            ])
    finally:
        eng.dispose()
    # rows written behind qrproxy's back: a PostgreSQL hot cache would hide them for query.cache_ttl
    time.sleep(2.5)
    ae = AE(ae_title="PYFIND")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(STUDY_ROOT)
    assoc = ae.associate(LOCALHOST, proxy.port, ae_title="QRPROXY")
    assert assoc.is_established
    try:
        context_id = next(cx.context_id for cx in assoc.accepted_contexts if cx.abstract_syntax == STUDY_ROOT)
        codes = []
        for st, _ in assoc.send_c_find(query, STUDY_ROOT, msg_id=7):
            codes.append(int(st.Status))
            if len(codes) == 1:
                assoc.send_c_cancel(7, context_id)
        # the association is still usable afterwards
        small = _identifier(QueryRetrieveLevel="SERIES", StudyInstanceUID=study, SeriesInstanceUID="")
        after = [int(st.Status) for st, _ in assoc.send_c_find(small, STUDY_ROOT, msg_id=8)]
    finally:
        assoc.release()
    assert codes[-1] == 0xFE00, [hex(c) for c in codes[-3:]]
    assert codes.count(0xFF00) < 5000
    assert after.count(0xFF00) == 1 and after[-1] == 0x0000
    wait_until(lambda: "status=0xFE00" in proxy.log_text(), 30, "the cancelled c-find in the log")
