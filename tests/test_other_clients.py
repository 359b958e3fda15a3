"""A modality that is not DCMTK: pynetdicom's bundled command-line apps against a qrproxy process.

``python -m pynetdicom storescu|findscu|movescu|getscu`` (run as subprocesses, over real loopback
sockets) is the modality; Orthanc is qrproxy's `store` node, a DCMTK storescp its C-MOVE destination.
Everything is compared with the generated ground truth (the datasets written to disk before they were
sent), never with what qrproxy says about itself.

The pynetdicom apps exit 0 whenever the association was established, whatever the DIMSE statuses, so
the statuses and sub-operation counts are read from their ``-v`` log ("Received Store Response
(Status: 0x0000 - Success)", "Find SCP Result: 0x0000 (Success)", "Move SCP Result: ...",
"Sub-Operations Remaining: 0, Completed: N, Failed: 0, Warning: 0").

Each test runs on SQLite and on PostgreSQL (``db_url``).
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

import dicomgen
from peers import LOCALHOST, OrthancServer, StoreSCP
from test_move import received
from support import node, proxy_config, wait_orthanc_has, wait_until

pytestmark = pytest.mark.orthanc

APP_TIMEOUT = 180  # s per app run: a hang fails the test instead of blocking the suite


# --- the site: 2 patients, 2 studies, 4 series, 8 instances (7 CT, 1 Basic Text SR) ----------------


def make_site(folder: Path) -> tuple[list[Dataset], list[Path]]:
    """Patient PYAPP1: study A with CT series 1 (3 instances), CT series 2 (3) and one Basic Text SR.
    Patient PYAPP2 (Latin-1 name): study B, one MR-modality series of 2 instances."""
    a = dicomgen.make_study(2, 3, patient_id="PYAPP1", patient_name="OTHER^CLIENT", accession="PYACC1")
    sr = dicomgen.make_basic_text_sr(study_uid=str(a[0].StudyInstanceUID), patient_id="PYAPP1",
                                     patient_name="OTHER^CLIENT", accession="PYACC1")
    b = dicomgen.make_study(1, 2, patient_id="PYAPP2", patient_name="Brünner^Eva", accession="PYACC2",
                            Modality="MR", StudyDescription="MR KNEE")
    datasets = [*a, sr, *b]
    return datasets, dicomgen.write_all(datasets, folder)


def _group(datasets: Sequence[Dataset], key: str) -> dict[str, list[Dataset]]:
    out: dict[str, list[Dataset]] = {}
    for ds in datasets:
        out.setdefault(str(ds.get(key)), []).append(ds)
    return out


# --- running the pynetdicom apps --------------------------------------------------------------------


def pynetdicom_app(app: str, *args: str, cwd: Path | None = None) -> tuple[int, str]:
    """``python -m pynetdicom APP -v ARGS``: (exit code, stdout + stderr)."""
    res = subprocess.run([sys.executable, "-m", "pynetdicom", app, "-v", *args], capture_output=True,
                         timeout=APP_TIMEOUT, cwd=str(cwd) if cwd else None)
    return res.returncode, (res.stdout + res.stderr).decode("utf-8", "replace")


def key_args(keys: dict[str, str]) -> list[str]:
    return [a for k, v in keys.items() for a in ("-k", f"{k}={v}")]


def app_findscu(port: int, root: str, level: str, keys: dict[str, str], out: Path) -> list[Dataset]:
    """pynetdicom findscu (``-P``/``-S``) with ``-w``: the response identifiers it wrote (rsp*.dcm in
    its working directory). Fails unless the final status is Success and every pending response was
    written."""
    out.mkdir(parents=True)
    code, log = pynetdicom_app("findscu", f"-{root}", "-aet", "PYFIND", "-aec", "QRPROXY", "-w",
                               *key_args({"QueryRetrieveLevel": level, **keys}), LOCALHOST, str(port), cwd=out)
    pending = re.findall(r"Find SCP Response: \d+ - 0xFF0[01] \(Pending\)", log)
    final = re.findall(r"Find SCP Result: (0x[0-9A-F]{4}) \((\w+)\)", log)
    files = sorted(out.glob("rsp*.dcm"))
    assert code == 0 and final == [("0x0000", "Success")] and len(files) == len(pending), (
        f"findscu -{root} {level} {keys}: exit {code}, final {final}, {len(pending)} pending, "
        f"{len(files)} files\n{log[-3000:]}")
    return [pydicom.dcmread(p) for p in files]


def assert_retrieve_ok(app: str, code: int, log: str, count: int) -> None:
    """movescu/getscu: exit 0, final status Success, and its last sub-operation line counts
    ``count`` completed, none failed or warned, none remaining."""
    name = {"movescu": "Move", "getscu": "Get"}[app]
    final = re.findall(rf"{name} SCP Result: (0x[0-9A-F]{{4}}) \((\w+)\)", log)
    subops = re.findall(r"Sub-Operations Remaining: (\d+), Completed: (\d+), Failed: (\d+), Warning: (\d+)", log)
    assert code == 0 and final == [("0x0000", "Success")] and subops and \
        subops[-1] == ("0", str(count), "0", "0"), (
        f"{app}: exit {code}, final {final}, last sub-operations {subops[-1:]} (expected 0/{count}/0/0)\n"
        f"{log[-3000:]}")


def assert_same_instances(expected: Sequence[Dataset], got: dict[str, Path], where: str) -> None:
    """``got`` (SOP Instance UID -> file) holds exactly ``expected``, element for element, with
    byte-identical PixelData."""
    want = {str(ds.SOPInstanceUID): ds for ds in expected}
    assert set(got) == set(want), (f"{where}: missing {sorted(set(want) - set(got))[:3]}, "
                                   f"unexpected {sorted(set(got) - set(want))[:3]}")
    bad = []
    for sop, ds in want.items():
        copy = pydicom.dcmread(got[sop])
        if "PixelData" in ds and copy.get("PixelData") != ds.PixelData:
            bad.append(f"{sop}: PixelData differs")
        diffs = dicomgen.compare_datasets(ds, copy)
        if diffs:
            bad.append(f"{sop}: {diffs[:4]}")
    assert not bad, f"{where}: {len(bad)} instances differ:\n" + "\n".join(bad)


# --- ground truth for C-FIND ---------------------------------------------------------------------------


def _norm(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, (list, MultiValue)):
        return sorted(str(v) for v in value)
    return str(value)


def answered(responses: Sequence[Dataset], unique: str, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """unique key value -> {key: value} of the findscu responses (counts as int, CS lists sorted).
    Fails on two responses for one entity."""
    out: dict[str, dict[str, Any]] = {}
    for ds in responses:
        uid = str(ds.get(unique, ""))
        assert uid not in out, f"two responses for {unique}={uid}"
        row = {}
        for k in keys:
            v = _norm(ds[k].value if k in ds else None)
            if k.startswith("NumberOf") or k in ("SeriesNumber", "InstanceNumber"):
                v = int(v) if v is not None else None
            elif k == "ModalitiesInStudy" and isinstance(v, str):
                v = sorted(v.split("\\"))
            row[k] = v
        out[uid] = row
    return out


def truth_patients(datasets: Sequence[Dataset]) -> dict[str, dict[str, Any]]:
    return {pid: {"PatientName": str(dss[0].PatientName), "PatientBirthDate": str(dss[0].PatientBirthDate),
                  "NumberOfPatientRelatedStudies": len(_group(dss, "StudyInstanceUID")),
                  "NumberOfPatientRelatedInstances": len(dss)}
            for pid, dss in _group(datasets, "PatientID").items()}


def truth_studies(datasets: Sequence[Dataset]) -> dict[str, dict[str, Any]]:
    return {uid: {"PatientID": str(dss[0].PatientID), "PatientName": str(dss[0].PatientName),
                  "AccessionNumber": str(dss[0].AccessionNumber), "StudyDate": str(dss[0].StudyDate),
                  "ModalitiesInStudy": sorted({str(ds.Modality) for ds in dss}),
                  "NumberOfStudyRelatedSeries": len(_group(dss, "SeriesInstanceUID")),
                  "NumberOfStudyRelatedInstances": len(dss)}
            for uid, dss in _group(datasets, "StudyInstanceUID").items()}


def truth_series(datasets: Sequence[Dataset]) -> dict[str, dict[str, Any]]:
    return {uid: {"Modality": str(dss[0].Modality), "SeriesNumber": int(dss[0].SeriesNumber),
                  "NumberOfSeriesRelatedInstances": len(dss)}
            for uid, dss in _group(datasets, "SeriesInstanceUID").items()}


def truth_images(datasets: Sequence[Dataset]) -> dict[str, dict[str, Any]]:
    return {str(ds.SOPInstanceUID): {"SOPClassUID": str(ds.SOPClassUID), "InstanceNumber": int(ds.InstanceNumber)}
            for ds in datasets}


def _subset(table: dict[str, dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {uid: {k: row[k] for k in keys} for uid, row in table.items()}


# --- the test ------------------------------------------------------------------------------------------


def test_pynetdicom_apps_store_find_move_get(db_url: str, orthanc: OrthancServer, storescp: StoreSCP,
                                             qrproxy: Any, tmp_path: Path) -> None:
    datasets, files = make_site(tmp_path / "site")
    by_patient = _group(datasets, "PatientID")
    study_a, study_b = (str(by_patient[p][0].StudyInstanceUID) for p in ("PYAPP1", "PYAPP2"))
    in_a = [ds for ds in datasets if str(ds.StudyInstanceUID) == study_a]
    in_b = by_patient["PYAPP2"]
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc, roles=["store"]),
                                         "DEST": node(storescp, roles=["modality"])},
                                query={"mode": "cache-only"}))

    # --- 1. C-STORE: pynetdicom storescu -> qrproxy -> Orthanc ------------------------------------------
    # Study A with -xe (Explicit VR Little Endian only, the files' own encoding); study B with the app's
    # default proposal (Explicit LE, Implicit LE, Deflated, Big Endian in one context; the acceptor
    # picks, and qrproxy prefers Explicit LE): both byte for byte at Orthanc.
    sent = {str(ds.SOPInstanceUID): path for ds, path in zip(datasets, files)}
    for study_uid, extra in ((study_a, ["-xe"]), (study_b, [])):
        paths = [sent[str(ds.SOPInstanceUID)] for ds in datasets if str(ds.StudyInstanceUID) == study_uid]
        code, log = pynetdicom_app("storescu", *extra, "-aet", "PYSTORE", "-aec", "QRPROXY", LOCALHOST,
                                   str(proc.port), *map(str, paths))
        statuses = Counter(re.findall(r"Received Store Response \(Status: ([^)]*)\)", log))
        assert code == 0 and statuses == Counter({"0x0000 - Success": len(paths)}), (
            f"storescu {extra}: exit {code}, store responses {dict(statuses)} (expected {len(paths)} "
            f"Success)\n{log[-3000:]}")

    index = wait_orthanc_has(orthanc, sent, timeout=120)
    assert set(index) == set(sent), f"Orthanc holds unexpected instances: {set(index) - set(sent)}"
    differ = []
    for ds in datasets:
        sop = str(ds.SOPInstanceUID)
        data = orthanc.instance_file(index[sop])
        if dicomgen.body_bytes(data) != dicomgen.body_bytes(sent[sop]):
            differ.append(f"{sop} (transfer syntax {dicomgen.transfer_syntax(data)}): not byte-identical")
        diffs = dicomgen.compare_datasets(ds, pydicom.dcmread(io.BytesIO(data)))
        if diffs:
            differ.append(f"{sop} (transfer syntax {dicomgen.transfer_syntax(data)}): {diffs[:4]}")
    assert not differ, f"{len(differ)} instances changed on the way to Orthanc:\n" + "\n".join(differ[:4])

    # --- 2. C-FIND, every level of both models, answered from qrproxy's index (cache-only) -----------
    n = iter(range(1000))

    def find(root: str, level: str, unique: str, keys: dict[str, str], returned: Sequence[str]
             ) -> dict[str, dict[str, Any]]:
        rsps = app_findscu(proc.port, root, level, keys, tmp_path / f"find{next(n)}-{root}-{level}")
        return answered(rsps, unique, returned)

    # patient root
    keys = ["PatientName", "PatientBirthDate", "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances"]
    got = find("P", "PATIENT", "PatientID", {"PatientID": "PYAPP*", **dict.fromkeys(keys, "")}, keys)
    assert got == truth_patients(datasets), "patient root PATIENT"

    keys = ["AccessionNumber", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances"]
    for pid, dss in by_patient.items():
        got = find("P", "STUDY", "StudyInstanceUID", {"PatientID": pid, "StudyInstanceUID": "",
                                                      **dict.fromkeys(keys, "")}, keys)
        assert got == _subset(truth_studies(dss), keys), f"patient root STUDY of {pid}"

    keys = ["Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
    got = find("P", "SERIES", "SeriesInstanceUID", {"PatientID": "PYAPP1", "StudyInstanceUID": study_a,
                                                    "SeriesInstanceUID": "", **dict.fromkeys(keys, "")}, keys)
    assert got == truth_series(in_a), "patient root SERIES of study A"

    keys = ["SOPClassUID", "InstanceNumber"]
    for series_uid, dss in _group(in_a, "SeriesInstanceUID").items():
        got = find("P", "IMAGE", "SOPInstanceUID",
                   {"PatientID": "PYAPP1", "StudyInstanceUID": study_a, "SeriesInstanceUID": series_uid,
                    "SOPInstanceUID": "", **dict.fromkeys(keys, "")}, keys)
        assert got == truth_images(dss), f"patient root IMAGE of series {series_uid}"

    # study root
    keys = ["PatientID", "PatientName", "AccessionNumber", "StudyDate", "ModalitiesInStudy",
            "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances"]
    got = find("S", "STUDY", "StudyInstanceUID", {"StudyInstanceUID": "", "PatientID": "PYAPP*",
                                                  **{k: "" for k in keys if k != "PatientID"}}, keys)
    assert got == truth_studies(datasets), "study root STUDY"
    got = find("S", "STUDY", "StudyInstanceUID", {"StudyInstanceUID": "", "ModalitiesInStudy": "SR",
                                                  "PatientID": "", "NumberOfStudyRelatedInstances": ""},
               ["PatientID", "NumberOfStudyRelatedInstances"])
    assert got == {study_a: {"PatientID": "PYAPP1", "NumberOfStudyRelatedInstances": len(in_a)}}, \
        "study root STUDY, ModalitiesInStudy=SR"

    keys = ["Modality", "SeriesNumber", "NumberOfSeriesRelatedInstances"]
    for study_uid, dss in ((study_a, in_a), (study_b, in_b)):
        got = find("S", "SERIES", "SeriesInstanceUID", {"StudyInstanceUID": study_uid, "SeriesInstanceUID": "",
                                                        **dict.fromkeys(keys, "")}, keys)
        assert got == truth_series(dss), f"study root SERIES of {study_uid}"

    keys = ["SOPClassUID", "InstanceNumber"]
    for series_uid, dss in _group(datasets, "SeriesInstanceUID").items():
        got = find("S", "IMAGE", "SOPInstanceUID",
                   {"StudyInstanceUID": str(dss[0].StudyInstanceUID), "SeriesInstanceUID": series_uid,
                    "SOPInstanceUID": "", **dict.fromkeys(keys, "")}, keys)
        assert got == truth_images(dss), f"study root IMAGE of series {series_uid}"

    # --- 3. C-MOVE: pynetdicom movescu -> qrproxy -> DCMTK storescp (node DEST) ------------------------
    def move(model: str, keys: dict[str, str], expected: Any, what: str) -> None:
        storescp.clear()
        code, log = pynetdicom_app("movescu", model, "-aet", "PYMOVE", "-aec", "QRPROXY", "-aem", storescp.aet,
                                   *key_args(keys), LOCALHOST, str(proc.port))
        assert_retrieve_ok("movescu", code, log, len(expected))
        wait_until(lambda: len(received(storescp)) >= len(expected), 120,
                   lambda: f"storescp holds {len(received(storescp))} of {len(expected)} instances ({what})")
        assert_same_instances(expected, received(storescp), what)

    move("-S", {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_a}, in_a, "C-MOVE study root STUDY")
    move("-P", {"QueryRetrieveLevel": "PATIENT", "PatientID": "PYAPP2"}, in_b, "C-MOVE patient root PATIENT")

    # --- 4. C-GET: pynetdicom getscu receives the instances on its own association --------------------
    def got_files(folder: Path) -> dict[str, Path]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in folder.iterdir() if p.is_file()}

    out = tmp_path / "get-study"
    out.mkdir()
    code, log = pynetdicom_app("getscu", "-S", "-aet", "PYGET", "-aec", "QRPROXY", "-od", str(out),
                               *key_args({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_a}),
                               LOCALHOST, str(proc.port))
    assert_retrieve_ok("getscu", code, log, len(in_a))
    assert_same_instances(in_a, got_files(out), "C-GET study root STUDY")

    out = tmp_path / "get-series"
    out.mkdir()
    series_b = str(in_b[0].SeriesInstanceUID)
    code, log = pynetdicom_app("getscu", "-P", "-aet", "PYGET", "-aec", "QRPROXY", "-od", str(out),
                               *key_args({"QueryRetrieveLevel": "SERIES", "PatientID": "PYAPP2",
                                          "StudyInstanceUID": study_b, "SeriesInstanceUID": series_b}),
                               LOCALHOST, str(proc.port))
    assert_retrieve_ok("getscu", code, log, len(in_b))
    assert_same_instances(in_b, got_files(out), "C-GET patient root SERIES")
