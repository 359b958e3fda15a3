"""C-FIND from the local index (the cache side of `query.mode`), against real peers on loopback.

The same instances go by DCMTK storescu to a qrproxy (which indexes them on receipt) and straight to
an Orthanc; then DCMTK findscu runs a table of query shapes (patient and study root, every level)
against both, and the matched sets (by the level's unique key) and the values of a few returned keys
must agree. The expected matches are also written down per query, so that both peers agreeing on a
wrong answer still fails. Shapes where qrproxy deliberately differs from Orthanc (matching.py's
docstring: hierarchical key rules, PN normalisation, time ranges) are not in the table; the
hierarchical refusals are asserted explicitly below. C-CANCEL and failure statuses are checked with a
pynetdicom SCU, which sees the status codes themselves.

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
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PATIENT_ROOT,
    StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT,
)

import dicomgen
from peers import LOCALHOST, OrthancServer, dcmtk
from test_store_forward import assert_all_success, dcmtk_env, proxy_config, storescu, wait_orthanc_has, wait_until

FINDSCU = dcmtk("findscu")
UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
# Returned values compared between qrproxy and Orthanc when the query asks for them.
COMPARED = ("PatientName", "PatientID", "StudyDate", "AccessionNumber", "Modality", "ModalitiesInStudy",
            "NumberOfPatientRelatedStudies", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
            "NumberOfSeriesRelatedInstances", "SeriesNumber", "InstanceNumber")


# --- the site: 3 patients, 4 studies, 6 series, 11 instances -------------------------------------------

PATIENTS = {
    # Latin-1 (dicomgen's default ISO_IR 100) with umlauts
    "P1": {"patient_id": "FINDP1", "patient_name": "Müller^Jürgen", "PatientBirthDate": "19610203"},
    "P2": {"patient_id": "FINDP2", "patient_name": "Doe^John", "PatientBirthDate": "19750505"},
    # UTF-8
    "P3": {"patient_id": "FINDP3", "patient_name": "Smith^Anna", "PatientBirthDate": "19880808",
           "SpecificCharacterSet": "ISO_IR 192"},
}
# study label -> patient, date, accession, [(modality, instances)] per series
STUDIES = {
    "A": ("P1", "20240115", "ACC100", [("CT", 2), ("CT", 2)]),
    "B": ("P1", "20240320", "ACC101", [("MR", 2)]),
    "C": ("P2", "20231201", "ACC200", [("CT", 1), ("MR", 1)]),
    "D": ("P3", "20250601", "ACC300", [("MR", 3)]),
}


@dataclass
class Site:
    datasets: list[Dataset]
    files: list[Path]
    uid: dict[str, str] = field(default_factory=dict)  # label (A, A1, A1_2, P1) -> unique key value

    def label(self, value: str) -> str:
        return next((k for k, v in self.uid.items() if v == value), value)


def make_site(folder: Path) -> Site:
    datasets: list[Dataset] = []
    uid: dict[str, str] = {p: attrs["patient_id"] for p, attrs in PATIENTS.items()}
    for study, (patient, date, accession, series) in STUDIES.items():
        uid[study] = generate_uid()
        for n, (modality, count) in enumerate(series, start=1):
            uid[f"{study}{n}"] = generate_uid()
            for i in range(1, count + 1):
                ds = dicomgen.make_ct(study_uid=uid[study], series_uid=uid[f"{study}{n}"], series_number=n,
                                      instance_number=i, rows=16, cols=16, accession=accession, StudyDate=date,
                                      Modality=modality, **PATIENTS[patient])
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


RETURN_STUDY = {"PatientName": "", "PatientID": "", "StudyDate": "", "AccessionNumber": ""}
UTF8 = {"SpecificCharacterSet": "ISO_IR 192"}

QUERIES = [
    # study root, STUDY level
    Q("patient-id", "S", "STUDY", {**RETURN_STUDY, "PatientID": "FINDP1", "ModalitiesInStudy": ""}, {"A", "B"}),
    Q("name-prefix-utf8", "S", "STUDY", {**UTF8, **RETURN_STUDY, "PatientName": "MÜ*"}, {"A", "B"}),
    Q("name-infix", "S", "STUDY", {**RETURN_STUDY, "PatientName": "*ller*"}, {"A", "B"}),
    Q("name-lower-case", "S", "STUDY", {**RETURN_STUDY, "PatientName": "doe*"}, {"C"}),
    Q("name-exact-other-case", "S", "STUDY", {**RETURN_STUDY, "PatientName": "SMITH^ANNA"}, {"D"}),
    Q("date-closed", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240101-20241231"}, {"A", "B"}),
    Q("date-open-upper", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240301-"}, {"B", "D"}),
    Q("date-open-lower", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "-20231231"}, {"C"}),
    Q("date-single", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240115"}, {"A"}),
    Q("date-none-in-range", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "19900101-19901231"}, set()),
    Q("accession", "S", "STUDY", {**RETURN_STUDY, "AccessionNumber": "ACC101"}, {"B"}),
    Q("accession-wildcard", "S", "STUDY", {**RETURN_STUDY, "AccessionNumber": "ACC1*"}, {"A", "B"}),
    Q("modalities-mr", "S", "STUDY", {**RETURN_STUDY, "ModalitiesInStudy": "MR",
                                      "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": ""},
      {"B", "C", "D"}),
    Q("modalities-ct", "S", "STUDY", {**RETURN_STUDY, "ModalitiesInStudy": "CT"}, {"A", "C"}),
    Q("date-and-modality", "S", "STUDY", {**RETURN_STUDY, "StudyDate": "20240101-", "ModalitiesInStudy": "MR"},
      {"B", "D"}),
    Q("uid-list", "S", "STUDY", {**RETURN_STUDY, "StudyInstanceUID": "{A}\\{C}"}, {"A", "C"}),
    Q("all-empty-return-keys", "S", "STUDY",
      {**RETURN_STUDY, "PatientBirthDate": "", "StudyTime": "", "StudyDescription": "", "ModalitiesInStudy": "",
       "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "", "StudyID": ""},
      {"A", "B", "C", "D"}),
    # study root, SERIES and IMAGE levels
    Q("series-of-study", "S", "SERIES", {"StudyInstanceUID": "{A}", "Modality": "", "SeriesNumber": "",
                                         "NumberOfSeriesRelatedInstances": ""}, {"A1", "A2"}),
    Q("series-modality", "S", "SERIES", {"StudyInstanceUID": "{C}", "Modality": "MR"}, {"C2"}),
    Q("series-of-study-list", "S", "SERIES", {"StudyInstanceUID": "{A}\\{C}", "Modality": ""},
      {"A1", "A2", "C1", "C2"}),
    Q("series-uid", "S", "SERIES", {"StudyInstanceUID": "{A}", "SeriesInstanceUID": "{A2}", "Modality": ""},
      {"A2"}),
    Q("images-of-series", "S", "IMAGE", {"StudyInstanceUID": "{A}", "SeriesInstanceUID": "{A1}",
                                         "SOPInstanceUID": "", "InstanceNumber": ""}, {"A1_1", "A1_2"}),
    Q("image-uid-list", "S", "IMAGE", {"StudyInstanceUID": "{D}", "SeriesInstanceUID": "{D1}",
                                       "SOPInstanceUID": "{D1_1}\\{D1_3}", "InstanceNumber": ""},
      {"D1_1", "D1_3"}),
    # patient root
    Q("patient-exact", "P", "PATIENT", {"PatientID": "FINDP1", "PatientName": "", "PatientBirthDate": "",
                                        "NumberOfPatientRelatedStudies": ""}, {"P1"}),
    Q("patient-name-infix", "P", "PATIENT", {"PatientID": "", "PatientName": "*LLER*"}, {"P1"}),
    Q("patient-id-wildcard", "P", "PATIENT", {"PatientID": "FIND*", "PatientName": "",
                                              "NumberOfPatientRelatedStudies": ""}, {"P1", "P2", "P3"}),
    Q("patient-birth-range", "P", "PATIENT", {"PatientID": "", "PatientName": "",
                                              "PatientBirthDate": "19700101-19801231"}, {"P2"}),
    Q("patient-studies", "P", "STUDY", {"PatientID": "FINDP2", "StudyInstanceUID": "", "StudyDate": "",
                                        "AccessionNumber": ""}, {"C"}),
    Q("patient-studies-date", "P", "STUDY", {"PatientID": "FINDP1", "StudyDate": "20240301-20240331",
                                             "AccessionNumber": ""}, {"B"}),
    Q("patient-series", "P", "SERIES", {"PatientID": "FINDP2", "StudyInstanceUID": "{C}", "Modality": ""},
      {"C1", "C2"}),
    Q("patient-images", "P", "IMAGE", {"PatientID": "FINDP3", "StudyInstanceUID": "{D}",
                                       "SeriesInstanceUID": "{D1}", "SOPInstanceUID": "", "InstanceNumber": ""},
      {"D1_1", "D1_2", "D1_3"}),
]

# Shapes where qrproxy answers differently from Orthanc 1.10 on purpose (matching.py's docstring, probed
# against Orthanc): checked against qrproxy only, with qrproxy's documented answer.
DOCUMENTED = [
    # trailing empty components are ignored (Orthanc: no match)
    Q("pn-trailing-empty-components", "S", "STUDY", {**UTF8, "PatientName": "MÜLLER^JÜRGEN^^"}, {"A", "B"}),
    # '?' is one character, not one byte (Orthanc: no match, Ü is two bytes in its UTF-8)
    Q("pn-question-mark-is-a-character", "S", "STUDY", {"PatientName": "M?LLER*"}, {"A", "B"}),
    # an upper bound applies at its own precision: -1200 includes 12:00:00 (Orthanc: no match)
    Q("time-upper-bound-precision", "S", "STUDY", {"StudyTime": "-1200"}, {"A", "B", "C", "D"}),
    # '*' alone is universal matching for any VR (Orthanc: 0xC000)
    Q("date-only-star-is-universal", "S", "STUDY", {"StudyDate": "*"}, {"A", "B", "C", "D"}),
    # counts are return keys only, never matched (Orthanc: matches them against absent tags, no match)
    Q("count-is-return-only", "S", "STUDY", {"NumberOfStudyRelatedInstances": "4"}, {"A", "B", "C", "D"}),
]


# --- findscu --------------------------------------------------------------------------------------------


@dataclass
class FindResult:
    status: str  # e.g. "Success"
    responses: list[Dataset]
    log: str


def findscu(port: int, aec: str, root: str, level: str, keys: dict[str, str], out: Path) -> FindResult:
    out.mkdir(parents=True, exist_ok=True)
    args = [FINDSCU, "-v", f"-{root}", "-aet", "FINDSCU", "-aec", aec, "-X", "-od", str(out),
            "-k", f"QueryRetrieveLevel={level}"]
    for k, v in keys.items():
        args += ["-k", f"{k}={v}" if v else k]
    res = subprocess.run([*args, LOCALHOST, str(port)], capture_output=True, text=True, timeout=60,
                         env=dcmtk_env())
    log = res.stdout + res.stderr
    m = re.search(r"Received Final Find Response \(([^)]*)\)", log)
    assert res.returncode == 0 and m, f"findscu failed (exit {res.returncode}):\n{log[-3000:]}"
    responses = [pydicom.dcmread(p, force=True) for p in sorted(out.glob("rsp*.dcm"))]
    return FindResult(m.group(1), responses, log)


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


@pytest.mark.orthanc
def test_find_matches_orthanc(db_url: str, orthanc: OrthancServer, qrproxy: Any, tmp_path: Path) -> None:
    site = make_site(tmp_path / "site")
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
            if ds.get("SpecificCharacterSet") != "ISO_IR 192" or ds.get("RetrieveAETitle") != proxy.ae_title:
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
    assert len([s for s, _, _ in rsp if s == 0xFF00]) == 4
    # a key the index does not hold never matches a value (unknown, not absent from the study)
    rsp = _scu_find(proxy.port, _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID="",
                                            StudyComments="x*"))
    assert [s for s, _, _ in rsp] == [0x0000]


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
    wait_until(lambda: "event=c-find" in proxy.log_text() and "status=0xA900" in proxy.log_text(), 10,
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

    from qrproxy.db.models import Instance, Series

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
    wait_until(lambda: "status=0xFE00" in proxy.log_text(), 10, "the cancelled c-find in the log")
