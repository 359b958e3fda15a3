"""DCMTK dcmqrscp as the upstream PACS: forward, refresh, query-through and retrieve-through.

dcmqrscp is the second kind of upstream after Orthanc, and a stricter one: it answers C-FIND with
only the keys its index holds. At IMAGE level that leaves out SOPClassUID (also ModalitiesInStudy
and the Number of ... Related ... counts at STUDY level, SeriesDescription and BodyPartExamined at
SERIES level). qrproxy must neither lose what it knows because of such an answer nor invent values.

The peers are real processes on loopback sockets (peers.DcmqrSCP, peers.StoreSCP, qrproxy serve);
the modality and workstation are DCMTK storescu / findscu / movescu. Expected values come from the
files the test generated or from dcmqrscp's own answers, never from qrproxy. Each test runs on
SQLite and PostgreSQL (``db_url``).

Product bugs that test_dcmqrscp_bug_report_sequence catches (it asserts the correct behaviour): a
refresh from dcmqrscp overwrote the SOP Class UID of instances qrproxy holds with NULL (the IMAGE
C-FIND then answered SOPClassUID empty); retrieve-through sent retrieved instances on with a guessed
SOP class (C-MOVE final status 0xA702, every sub-operation failed). Both fail on commit 6469319 and
pass from 7a876ec on.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

import dicomgen
from peers import LOCALHOST, DcmqrSCP, QrproxyProcess, StoreSCP, dcmtk, findscu
from support import (assert_all_success, cli, dcmtk_env, node, proxy_config, spool_files, storescu,
                                wait_until)

CT = dicomgen.CT_IMAGE_STORAGE

STUDY_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
              "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName",
              # dcmqrscp does not index these: its answers leave them out
              "ModalitiesInStudy", "NumberOfStudyRelatedInstances")


# --- helpers ----------------------------------------------------------------------------------


def _setup(db_url: str, dcmqrscp_factory: Any, storescp: StoreSCP | None, qrproxy: Any, *,
           roles: tuple[str, ...] = ("store", "query", "retrieve"), refresh: bool = True,
           **extra: Any) -> tuple[QrproxyProcess, DcmqrSCP]:
    """dcmqrscp (knowing qrproxy as a C-MOVE destination) as node PACS, storescp as node DEST."""
    cfg = proxy_config(db_url, {}, **extra)
    pacs = dcmqrscp_factory(peers={"qrproxy": (cfg["ae_title"], LOCALHOST, cfg["port"])})
    cfg["nodes"] = {"PACS": node(pacs, list(roles), timeout="30s")}
    if storescp is not None:
        cfg["nodes"]["DEST"] = node(storescp, ["modality"])
    if refresh:
        # every 1h: the server's own first run may come at start; `refresh_now` copes with it
        cfg["refresh"] = [{"name": "pacs", "node": "PACS", "kind": "studies", "every": "1h", "query": {}}]
    return qrproxy(cfg), pacs


def refresh_now(proc: QrproxyProcess, job: str) -> str:
    """`qrproxy refresh JOB` until it runs (not "skipped" because the server's own scheduled run of
    the job is in progress); returns its output."""
    last = [""]

    def done() -> bool:
        res = cli(proc, "refresh", job, timeout=180)
        last[0] = f"exit {res.returncode}\n{res.stdout}{res.stderr}"
        return res.returncode == 0

    wait_until(done, 120, lambda: f"qrproxy refresh {job}: {last[0]}", interval=1.0)
    assert re.search(rf"^{job}: node PACS, rows \d+", last[0], re.M), last[0]
    assert ", ok" in last[0], last[0]
    return last[0]


def image_answers(port: int, aec: str, study_uid: str, series_uids: list[str]) -> dict[str, Dataset]:
    """IMAGE-level study-root C-FIND (findscu) per series, asking SOPClassUID, InstanceNumber and
    SOPInstanceUID: SOP Instance UID -> answer identifier."""
    out: dict[str, Dataset] = {}
    for series_uid in series_uids:
        answers, _ = findscu(LOCALHOST, port, [("QueryRetrieveLevel", "IMAGE"), ("StudyInstanceUID", study_uid),
                                               ("SeriesInstanceUID", series_uid), ("SOPClassUID", ""),
                                               ("InstanceNumber", ""), ("SOPInstanceUID", "")], aec=aec)
        for ds in answers:
            out[str(ds.get("SOPInstanceUID", ""))] = ds
    return out


def study_answers(port: int, aec: str, **match: str) -> dict[str, dict[str, str]]:
    """STUDY-level study-root C-FIND (findscu) with STUDY_KEYS: study uid -> {key: value}."""
    keys = [("QueryRetrieveLevel", "STUDY"), ("StudyInstanceUID", match.pop("StudyInstanceUID", ""))]
    keys += [(k, match.get(k, "")) for k in STUDY_KEYS]
    answers, _ = findscu(LOCALHOST, port, keys, aec=aec)
    return {str(ds.StudyInstanceUID): {k: str(ds.get(k, "") or "") for k in STUDY_KEYS} for ds in answers}


def movescu(port: int, dest: str, keys: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """DCMTK movescu (study root) to qrproxy, debug log (it prints the sub-operation counts)."""
    argv = [dcmtk("movescu"), "-d", "-aet", "MOVER", "-aec", "QRPROXY", "-aem", dest, "-S"]
    for k, v in keys.items():
        argv += ["-k", f"{k}={v}"]
    argv += [LOCALHOST, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def final_move_response(log: str) -> dict[str, str]:
    """The last C-MOVE RSP movescu -d dumped: {'status': '0x0000', 'completed': '4', ...}."""
    blocks = re.findall(r"Message Type\s*:\s*C-MOVE RSP(.*?)END DIMSE MESSAGE", log, re.S)
    if not blocks:
        return {}
    block = blocks[-1]
    out = {}
    m = re.search(r"DIMSE Status\s*:\s*(0x[0-9A-Fa-f]{4})", block)
    if m:
        out["status"] = m.group(1).lower()
    for key, label in (("remaining", "Remaining"), ("completed", "Completed"), ("failed", "Failed"),
                       ("warning", "Warning")):
        m = re.search(rf"{label} Suboperations\s*:\s*(\S+)", block)
        if m:
            out[key] = m.group(1)
    return out


def received(scp: StoreSCP) -> dict[str, Path]:
    """SOP Instance UID -> file, of what storescp holds."""
    out = {}
    for p in scp.received_files():
        try:
            out[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        except Exception:  # noqa: BLE001 - a file still being written
            continue
    return out


# --- tests ------------------------------------------------------------------------------------


def test_forward_to_dcmqrscp_arrives_intact(db_url: str, dcmqrscp_factory: Any, qrproxy: Any,
                                            tmp_path: Path) -> None:
    """C-STORE to qrproxy, forwarded to dcmqrscp (role store): dcmqrscp's index lists exactly the
    instances sent, and its files hold the same SOP class, UIDs and pixel data."""
    proc, pacs = _setup(db_url, dcmqrscp_factory, None, qrproxy, roles=("store",), refresh=False)
    study = dicomgen.make_study(2, 3, patient_id="DQFWD1")
    sent = {str(ds.SOPInstanceUID): ds for ds in study}
    study_uid = str(study[0].StudyInstanceUID)
    files = dicomgen.write_all(study, tmp_path / "in")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)

    indexed = pacs.wait_for_instances(study_uid, sent, timeout=120)
    assert indexed == set(sent), f"dcmqrscp lists {len(indexed)} instances, {len(sent)} were sent"
    stored = pacs.stored_datasets()
    assert set(stored) == set(sent), f"dcmqrscp storage holds {sorted(stored)}, sent {sorted(sent)}"
    for uid, ds in sent.items():
        got = stored[uid]
        assert str(got.SOPClassUID) == str(ds.SOPClassUID) == CT
        assert str(got.file_meta.MediaStorageSOPClassUID) == CT
        assert str(got.StudyInstanceUID) == study_uid
        assert str(got.SeriesInstanceUID) == str(ds.SeriesInstanceUID)
        assert got.PixelData == ds.PixelData, f"{uid}: pixel data differ"
        assert dicomgen.compare_datasets(ds, got) == [], dicomgen.compare_datasets(ds, got)[:10]


def test_dcmqrscp_bug_report_sequence(db_url: str, dcmqrscp_factory: Any, storescp: StoreSCP, qrproxy: Any,
                                      tmp_path: Path) -> None:
    """The sequence of the bug report, against dcmqrscp as store/query/retrieve node:

    1. storescu a CT study to qrproxy, forwarded to dcmqrscp; `qrproxy refresh` from dcmqrscp;
       an IMAGE-level C-FIND through qrproxy must still answer the files' SOP Class UID (dcmqrscp
       answered none, so the refresh must not erase it).
    2. a second study only dcmqrscp holds: refresh, then C-MOVE through qrproxy to storescp; qrproxy
       retrieves it through from dcmqrscp (C-MOVE to its own AE) and every instance must arrive at
       storescp with its true SOP class; final status Success, completed == number of instances.

    Every check is made and all failures are reported together, so one bug does not hide the other.
    """
    proc, pacs = _setup(db_url, dcmqrscp_factory, storescp, qrproxy)
    problems: list[str] = []

    # -- 1. forward, refresh, IMAGE-level C-FIND
    study_a = dicomgen.make_study(2, 3, patient_id="DQBUG1", patient_name="DCMQR^FORWARDED")
    a_uid = str(study_a[0].StudyInstanceUID)
    a_series = sorted({str(ds.SeriesInstanceUID) for ds in study_a})
    a_sent = {str(ds.SOPInstanceUID): ds for ds in study_a}
    files_a = dicomgen.write_all(study_a, tmp_path / "a")
    assert_all_success(storescu(proc.port, files_a, aec="QRPROXY"), files_a)
    pacs.wait_for_instances(a_uid, a_sent, timeout=120)
    # what dcmqrscp itself answers: the point of this peer (if this changes, the test proves less)
    direct = image_answers(pacs.port, pacs.aet, a_uid, a_series)
    assert set(direct) == set(a_sent)
    assert all("SOPClassUID" not in ds or not ds.SOPClassUID for ds in direct.values()), \
        "dcmqrscp now answers SOPClassUID at IMAGE level: this test no longer covers the bug"

    refresh_now(proc, "pacs")

    through = image_answers(proc.port, "QRPROXY", a_uid, a_series)
    if set(through) != set(a_sent):
        problems.append(f"IMAGE C-FIND through qrproxy after refresh: {len(through)} answers, expected "
                        f"{len(a_sent)}; missing {sorted(set(a_sent) - set(through))[:3]}, "
                        f"extra {sorted(set(through) - set(a_sent))[:3]}")
    wrong_class = {uid: str(ds.get("SOPClassUID", "<absent>")) for uid, ds in through.items()
                   if uid in a_sent and str(ds.get("SOPClassUID", "")) != str(a_sent[uid].SOPClassUID)}
    if wrong_class:
        problems.append(f"IMAGE C-FIND through qrproxy after a refresh from dcmqrscp: SOPClassUID of "
                        f"{len(wrong_class)} of {len(a_sent)} instances is not {CT} (the class of the files "
                        f"sent): {sorted(set(wrong_class.values()))}")
    wrong_number = {uid for uid, ds in through.items()
                    if uid in a_sent and str(ds.get("InstanceNumber", "")) != str(a_sent[uid].InstanceNumber)}
    if wrong_number:
        problems.append(f"IMAGE C-FIND through qrproxy: InstanceNumber wrong for {len(wrong_number)} instances")

    # -- 2. a study only dcmqrscp holds: refresh, then retrieve-through by C-MOVE
    study_b = dicomgen.make_study(2, 2, patient_id="DQBUG2", patient_name="DCMQR^ONLY")
    b_uid = str(study_b[0].StudyInstanceUID)
    b_series = sorted({str(ds.SeriesInstanceUID) for ds in study_b})
    b_sent = {str(ds.SOPInstanceUID): ds for ds in study_b}
    pacs.load(dicomgen.write_all(study_b, tmp_path / "b"))
    pacs.wait_for_instances(b_uid, b_sent)

    refresh_now(proc, "pacs")
    listed = image_answers(proc.port, "QRPROXY", b_uid, b_series)
    assert set(listed) == set(b_sent), "the refresh did not list the second study's instances in qrproxy's index"

    res = movescu(proc.port, storescp.aet, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": b_uid})
    log = res.stdout + res.stderr
    final = final_move_response(log)
    if res.returncode != 0 or final.get("status") != "0x0000" or final.get("completed") != str(len(b_sent)):
        problems.append(f"C-MOVE of the dcmqrscp-only study through qrproxy: movescu exit {res.returncode}, final "
                        f"response {final or '(none)'}; expected status 0x0000 and completed {len(b_sent)}\n"
                        f"--- movescu (tail) ---\n{log[-2500:]}")
    try:
        storescp.wait_for_files(len(b_sent), timeout=30)
    except Exception:  # noqa: BLE001 - reported below with what did arrive
        pass
    got = received(storescp)
    if set(got) != set(b_sent):
        problems.append(f"storescp received {len(set(got) & set(b_sent))} of {len(b_sent)} instances of the "
                        f"retrieved-through study (extra: {len(set(got) - set(b_sent))})")
    for uid, path in sorted(got.items()):
        if uid not in b_sent:
            continue
        ds = pydicom.dcmread(path)
        meta_class = str(ds.file_meta.MediaStorageSOPClassUID)  # storescp: the C-STORE's Affected SOP Class
        if str(ds.SOPClassUID) != CT or meta_class != CT:
            problems.append(f"{uid} arrived at storescp as SOP class {meta_class} (dataset says "
                            f"{ds.SOPClassUID}); the file in dcmqrscp is {CT}")
        elif ds.PixelData != b_sent[uid].PixelData:
            problems.append(f"{uid} arrived at storescp with different pixel data")

    # once retrieved, qrproxy knows the class from the files (docs/dicom.md: what the index believes)
    if not any("C-MOVE of the dcmqrscp-only" in p for p in problems):
        after = image_answers(proc.port, "QRPROXY", b_uid, b_series)
        unknown = {uid for uid in b_sent if str(after.get(uid, Dataset()).get("SOPClassUID", "")) != CT}
        if unknown:
            problems.append(f"after retrieving the study through, an IMAGE C-FIND through qrproxy still does not "
                            f"answer SOPClassUID {CT} for {len(unknown)} of {len(b_sent)} instances")

    assert not problems, "\n\n".join(problems)


def test_query_through_to_dcmqrscp(db_url: str, dcmqrscp_factory: Any, qrproxy: Any, tmp_path: Path) -> None:
    """cache-first with an empty cache and dcmqrscp as the query node: a STUDY-level C-FIND through
    qrproxy answers what dcmqrscp answers to the same keys (keys dcmqrscp leaves out stay empty)."""
    proc, pacs = _setup(db_url, dcmqrscp_factory, None, qrproxy, roles=("query",), refresh=False,
                        query={"mode": "cache-first", "upstream_timeout": "20s"})
    study = dicomgen.make_study(1, 3, patient_id="DQQT1", patient_name="QUERY^THROUGH", accession="DQACC1",
                                StudyDescription="DCMQR QUERY THROUGH")
    uid = str(study[0].StudyInstanceUID)
    pacs.load(dicomgen.write_all(study, tmp_path / "q"))
    pacs.wait_for_instances(uid, [str(ds.SOPInstanceUID) for ds in study])
    assert spool_files(proc) == []

    expected = study_answers(pacs.port, pacs.aet, StudyInstanceUID=uid)
    assert list(expected) == [uid], expected
    assert expected[uid]["PatientID"] == "DQQT1" and expected[uid]["AccessionNumber"] == "DQACC1"

    got = study_answers(proc.port, "QRPROXY", StudyInstanceUID=uid)
    assert got == expected, f"through qrproxy: {got}\ndirect from dcmqrscp: {expected}"
    lines = [line for line in proc.log_text().splitlines() if "event=c-find" in line]
    assert lines and "source=upstream" in lines[-1], lines[-1:] or proc.log_tail(20)

    # matching on another key: the same answer
    assert study_answers(proc.port, "QRPROXY", PatientID="DQQT1") == \
        study_answers(pacs.port, pacs.aet, PatientID="DQQT1")


def test_upstream_first_answers_left_out_keys_from_the_index(db_url: str, dcmqrscp_factory: Any, qrproxy: Any,
                                                             tmp_path: Path) -> None:
    """upstream-first with dcmqrscp as the query node, for a study qrproxy received and forwarded: the
    answers come from dcmqrscp (`source=upstream`), and the keys it leaves out (ModalitiesInStudy and
    the instance count at STUDY level, SOPClassUID at IMAGE level) are answered from what qrproxy
    holds, equal to the files sent; a study qrproxy does not hold keeps them empty."""
    proc, pacs = _setup(db_url, dcmqrscp_factory, None, qrproxy, roles=("store", "query"), refresh=False,
                        query={"mode": "upstream-first", "upstream_timeout": "20s"})
    study = dicomgen.make_study(2, 2, patient_id="DQUF1", StudyDescription="UPSTREAM FIRST")
    uid = str(study[0].StudyInstanceUID)
    files = dicomgen.write_all(study, tmp_path / "in")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)
    pacs.wait_for_instances(uid, [str(ds.SOPInstanceUID) for ds in study], timeout=120)
    other = dicomgen.make_study(1, 2, patient_id="DQUF2")  # only dcmqrscp holds this one
    other_uid = str(other[0].StudyInstanceUID)
    pacs.load(dicomgen.write_all(other, tmp_path / "other"))
    pacs.wait_for_instances(other_uid, [str(ds.SOPInstanceUID) for ds in other])

    direct = study_answers(pacs.port, pacs.aet, StudyInstanceUID=uid)[uid]
    assert direct["ModalitiesInStudy"] == "" and direct["NumberOfStudyRelatedInstances"] == "", \
        f"dcmqrscp now answers these keys; this test no longer covers left-out keys: {direct}"
    got = study_answers(proc.port, "QRPROXY", StudyInstanceUID=uid)[uid]
    lines = [line for line in proc.log_text().splitlines() if "event=c-find" in line]
    assert lines and "source=upstream" in lines[-1], lines[-1:] or proc.log_tail(20)
    modalities = sorted({str(ds.Modality) for ds in study})
    assert got["ModalitiesInStudy"].split("\\") == modalities, got
    assert got["NumberOfStudyRelatedInstances"] == str(len(study)), got
    assert got["StudyDescription"] == "UPSTREAM FIRST" and got["PatientID"] == "DQUF1", got

    series = sorted({str(ds.SeriesInstanceUID) for ds in study})
    images = image_answers(proc.port, "QRPROXY", uid, series)
    assert set(images) == {str(ds.SOPInstanceUID) for ds in study}
    assert {str(ds.get("SOPClassUID", "")) for ds in images.values()} == {str(ds.SOPClassUID) for ds in study}

    unknown = study_answers(proc.port, "QRPROXY", StudyInstanceUID=other_uid)[other_uid]
    assert unknown["ModalitiesInStudy"] == "" and unknown["PatientID"] == "DQUF2", unknown
