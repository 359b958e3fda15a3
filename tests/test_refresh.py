"""Refresh jobs (kind: studies) against a real Orthanc as the upstream PACS.

Studies are uploaded to Orthanc over REST; `qrproxy refresh` runs as a CLI subprocess; what the index
holds is read straight from the database and compared with what Orthanc's REST API says. The
scheduler test runs `Refresher` in-process (no qrproxy server needed). SQLite and PostgreSQL (db_url).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import Session

import dicomgen
from peers import OrthancServer, run_cli
from qrproxy.cli.load import load_config
from qrproxy.index.models import Instance, Patient, RefreshRun, Series, SpoolObject, Study
from qrproxy.index.session import make_engine, make_sessionmaker, upgrade
from qrproxy.jobs.refresh import Refresher, study_identifier

NON_ASCII_NAME = "MÜLLER^JOSÉ"


def _day(days_ago: int) -> str:
    return (dt.date.today() - dt.timedelta(days=days_ago)).strftime("%Y%m%d")


def _upload_study(orthanc: OrthancServer, days_ago: int, tag: str, **kw: Any) -> dict[str, Any]:
    datasets = dicomgen.make_study(n_series=2, per_series=2, patient_id=f"RF{tag}", accession=f"ACC{tag}",
                                   StudyDate=_day(days_ago), StudyDescription=f"STUDY {tag}", **kw)
    answers = [orthanc.upload(dicomgen.encode(ds)) for ds in datasets]
    return {"uid": datasets[0].StudyInstanceUID, "id": answers[0]["ParentStudy"], "datasets": datasets}


def _write_config(tmp_path: Path, db_url: str, orthanc: OrthancServer, **job: Any) -> Path:
    cfg = {
        "ae_title": "QRPROXY",
        "host": "127.0.0.1",
        "port": 11112,
        "database": db_url,
        "spool_dir": "spool",
        "nodes": {"PACS": {"ae_title": orthanc.aet, "host": orthanc.host, "port": orthanc.dicom_port,
                           "roles": ["query"], "timeout": "5s"}},
        "refresh": [{"name": "recent", "node": "PACS", "kind": "studies", "every": "1h",
                     "query": {"StudyDate": "-7d"}} | job],
    }
    path = tmp_path / "qrproxy.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return path


def _index(db_url: str) -> dict[str, dict[str, Any]]:
    """study uid -> its columns, patient, series (uid -> columns) and instances (uid -> columns)."""
    engine = create_engine(db_url)
    out: dict[str, dict[str, Any]] = {}
    try:
        with Session(engine) as s:
            for study, patient in s.execute(select(Study, Patient).join(Study.patient)):
                series = {}
                for se in s.scalars(select(Series).where(Series.study_pk == study.id)):
                    insts = {i.sop_instance_uid: {"sop_class_uid": i.sop_class_uid,
                                                  "instance_number": i.instance_number, "object_pk": i.object_pk}
                             for i in s.scalars(select(Instance).where(Instance.series_pk == se.id))}
                    series[se.series_instance_uid] = {
                        "modality": se.modality, "series_number": se.series_number,
                        "series_description": se.series_description, "body_part_examined": se.body_part_examined,
                        "number_of_instances": se.number_of_instances, "instances": insts}
                out[study.study_instance_uid] = {
                    "study_date": study.study_date, "study_time": study.study_time,
                    "accession_number": study.accession_number, "study_id": study.study_id,
                    "study_description": study.study_description,
                    "referring_physician_name": study.referring_physician_name,
                    "modalities_in_study": study.modalities_in_study, "number_of_series": study.number_of_series,
                    "number_of_instances": study.number_of_instances, "source_node": study.source_node,
                    "refreshed_at": study.refreshed_at, "patient_id": patient.patient_id,
                    "patient_name": patient.patient_name, "birth_date": patient.birth_date, "sex": patient.sex,
                    "series": series}
    finally:
        engine.dispose()
    return out


def _runs(db_url: str) -> list[RefreshRun]:
    engine = create_engine(db_url)
    try:
        with Session(engine) as s:
            return list(s.scalars(select(RefreshRun).order_by(RefreshRun.id)))
    finally:
        engine.dispose()


def _check_against_orthanc(orthanc: OrthancServer, row: dict[str, Any], orthanc_id: str) -> None:
    study = orthanc.get(f"/studies/{orthanc_id}")
    tags, ptags = study["MainDicomTags"], study["PatientMainDicomTags"]
    assert row["source_node"] == "PACS" and row["refreshed_at"] is not None
    assert row["patient_id"] == ptags["PatientID"]
    assert row["patient_name"] == ptags["PatientName"]
    assert row["birth_date"] == ptags["PatientBirthDate"]
    assert row["sex"] == ptags["PatientSex"]
    assert row["study_date"] == tags["StudyDate"]
    assert row["study_time"] == tags["StudyTime"]
    assert row["accession_number"] == tags["AccessionNumber"]
    assert row["study_id"] == tags["StudyID"]
    assert row["study_description"] == tags["StudyDescription"]
    assert row["referring_physician_name"] == tags["ReferringPhysicianName"]
    o_series = orthanc.get(f"/studies/{orthanc_id}/series")
    n_instances = sum(len(se["Instances"]) for se in o_series)
    assert row["number_of_series"] == len(o_series)
    assert row["number_of_instances"] == n_instances
    assert row["modalities_in_study"] == "CT"
    assert set(row["series"]) == {se["MainDicomTags"]["SeriesInstanceUID"] for se in o_series}
    for se in o_series:
        mt = se["MainDicomTags"]
        mine = row["series"][mt["SeriesInstanceUID"]]
        assert mine["modality"] == mt["Modality"]
        assert mine["series_number"] == int(mt["SeriesNumber"])
        assert mine["series_description"] == mt["SeriesDescription"]
        assert mine["body_part_examined"] == mt["BodyPartExamined"]
        assert mine["number_of_instances"] == len(se["Instances"])
        o_inst = orthanc.get(f"/series/{se['ID']}/instances")
        assert set(mine["instances"]) == {i["MainDicomTags"]["SOPInstanceUID"] for i in o_inst}
        for i in o_inst:
            got = mine["instances"][i["MainDicomTags"]["SOPInstanceUID"]]
            assert got["instance_number"] == int(i["MainDicomTags"]["InstanceNumber"])
            assert got["sop_class_uid"] == orthanc.instance_tags(i["ID"])["SOPClassUID"]


def test_study_identifier_resolves_relative_dates() -> None:
    today = dt.date(2026, 11, 23)
    ds = study_identifier({"StudyDate": "-7d", "0008,0061": "CT", "PatientName": "MÜLLER*"}, today)
    assert ds.QueryRetrieveLevel == "STUDY"
    assert ds.StudyDate == "20261116-20261123"
    assert ds.ModalitiesInStudy == "CT"
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert "NumberOfStudyRelatedInstances" in ds and ds.StudyInstanceUID == ""
    assert study_identifier({"StudyDate": "-1d..+1d"}, today).StudyDate == "20261122-20261124"
    assert study_identifier({"StudyDate": "today"}, today).StudyDate == "20261123"
    assert study_identifier({"StudyDate": "20260101-20260102"}, today).StudyDate == "20260101-20260102"


def test_refresh_studies_from_orthanc(tmp_path: Path, db_url: str, orthanc: OrthancServer) -> None:
    a = _upload_study(orthanc, 0, "A", patient_name=NON_ASCII_NAME)
    b = _upload_study(orthanc, 3, "B")
    old = _upload_study(orthanc, 30, "OLD")
    cfg = _write_config(tmp_path, db_url, orthanc)

    # 1. first run: the two recent studies, complete and as Orthanc has them; not the old one
    r = run_cli(cfg, "refresh", "recent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "recent: node PACS, rows 2, new studies 2, updated 0, removed 0, ok" in r.stdout
    index = _index(db_url)
    assert set(index) == {a["uid"], b["uid"]}
    assert old["uid"] not in index
    assert index[a["uid"]]["patient_name"] == NON_ASCII_NAME
    _check_against_orthanc(orthanc, index[a["uid"]], a["id"])
    _check_against_orthanc(orthanc, index[b["uid"]], b["id"])
    assert all(i["object_pk"] is None for s in index.values() for se in s["series"].values()
               for i in se["instances"].values())

    # 2. B grows upstream, and one of its instances has a local copy here: B is read again, the
    #    new instance appears, the local copy stays linked
    local_uid = b["datasets"][0].SOPInstanceUID
    engine = make_engine(db_url)
    with make_sessionmaker(engine).begin() as s:
        obj = SpoolObject(sop_instance_uid=local_uid, sop_class_uid=b["datasets"][0].SOPClassUID,
                          study_instance_uid=b["uid"], transfer_syntax_uid="1.2.840.10008.1.2.1",
                          path="objects/00/local.dcm", size=1, sha256="0" * 64, origin="received")
        s.add(obj)
        s.flush()
        s.execute(update(Instance).where(Instance.sop_instance_uid == local_uid).values(object_pk=obj.id))
        obj_id = obj.id
    engine.dispose()
    extra = dicomgen.make_ct(study_uid=b["uid"], patient_id="RFB", accession="ACCB", StudyDate=_day(3),
                             StudyDescription="STUDY B", series_number=3)
    orthanc.upload(dicomgen.encode(extra))
    r = run_cli(cfg, "refresh", "recent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rows 2, new studies 0, updated 1, removed 0, ok" in r.stdout
    index = _index(db_url)
    _check_against_orthanc(orthanc, index[b["uid"]], b["id"])
    insts = {u: i for se in index[b["uid"]]["series"].values() for u, i in se["instances"].items()}
    assert len(insts) == 5 and extra.SOPInstanceUID in insts
    assert insts[local_uid]["object_pk"] == obj_id

    # 3. both recent studies deleted in Orthanc: A leaves the index, B stays (a local copy exists)
    orthanc.delete(f"/studies/{a['id']}")
    orthanc.delete(f"/studies/{b['id']}")
    r = run_cli(cfg, "refresh", "recent")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "rows 0, new studies 0, updated 0, removed 1, ok" in r.stdout
    index = _index(db_url)
    assert set(index) == {b["uid"]}
    insts = {u: i for se in index[b["uid"]]["series"].values() for u, i in se["instances"].items()}
    assert insts[local_uid]["object_pk"] == obj_id

    # 4. Orthanc down: exit 1, the error is recorded, the index is unchanged
    orthanc.stop()
    before = _index(db_url)
    r = run_cli(cfg, "refresh")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "recent: node PACS, rows 0" in r.stdout and "error:" in r.stdout
    runs = _runs(db_url)
    assert [run.status for run in runs] == ["ok", "ok", "ok", "error"]
    assert runs[-1].error and "PACS" in runs[-1].error and runs[-1].finished_at is not None
    assert runs[0].rows == 2 and runs[0].finished_at is not None
    assert _index(db_url) == before

    # 5. status shows the job's last run
    r = run_cli(cfg, "status", "--no-echo")
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("recent "))
    assert "every 1h" in line and "error" in line and "PACS (ORTHANC@" in line, r.stdout

    # 6. unknown job name: usage error naming the known jobs
    r = run_cli(cfg, "refresh", "nosuchjob")
    assert r.returncode == 2
    assert "nosuchjob" in r.stderr and "known: recent" in r.stderr


def test_refresher_runs_on_schedule(tmp_path: Path, db_url: str, orthanc: OrthancServer) -> None:
    study = _upload_study(orthanc, 1, "S")
    cfg = load_config(_write_config(tmp_path, db_url, orthanc, every="1s"))
    engine = make_engine(cfg.database)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    refresher = Refresher(cfg, sessions, first_run_delay=0.1)
    refresher.start()
    try:
        deadline = time.monotonic() + 90
        while True:
            with sessions.begin() as s:
                done = s.scalar(select(func.count()).select_from(RefreshRun).where(RefreshRun.status == "ok"))
            if done >= 2:
                break
            assert time.monotonic() < deadline, f"only {done} refresh runs within 90 s"
            time.sleep(0.2)
    finally:
        refresher.stop()
    runs = _runs(db_url)
    assert all(run.job_name == "recent" and run.rows == 1 for run in runs if run.status == "ok")
    assert set(_index(db_url)) == {study["uid"]}
    engine.dispose()


def test_a_job_never_overlaps_itself(tmp_path: Path) -> None:
    from qrproxy.jobs.refresh import _job_lock, run_job

    cfg = load_config(_write_config(tmp_path, f"sqlite:///{tmp_path / 'q.sqlite3'}",
                                    SimpleNamespace(aet="ORTHANC", host="127.0.0.1", dicom_port=9)))
    lock = _job_lock("recent")
    with lock:  # a run in progress
        r = run_job(cfg, None, cfg.refresh[0])
    assert r.skipped and not r.ok and "still running" in (r.error or "")


# --- several associations over a far link (issue 18) -------------------------------------------


def _tree_of_index(db_url: str) -> dict[str, dict[str, set[str]]]:
    """study uid -> series uid -> SOP Instance UIDs, as the index holds them."""
    return {uid: {se: set(row["instances"]) for se, row in study["series"].items()}
            for uid, study in _index(db_url).items()}


def _tree_of_orthanc(orthanc: OrthancServer) -> dict[str, dict[str, set[str]]]:
    """The same, as Orthanc's REST API lists what it holds."""
    out: dict[str, dict[str, set[str]]] = {}
    for study_id in orthanc.studies():
        study = orthanc.get(f"/studies/{study_id}")
        out[study["MainDicomTags"]["StudyInstanceUID"]] = {
            se["MainDicomTags"]["SeriesInstanceUID"]: {
                i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get(f"/series/{se['ID']}/instances")}
            for se in orthanc.get(f"/studies/{study_id}/series")}
    return out


def _wan_config(tmp_path: Path, db_url: str, aet: str, port: int, associations: int) -> Path:
    """One node behind the relay, and a job refreshing every study it holds."""
    cfg = {
        "ae_title": "QRPROXY", "host": "127.0.0.1", "port": 11112, "database": db_url, "spool_dir": "spool",
        "nodes": {"PACS": {"ae_title": aet, "host": "127.0.0.1", "port": port, "roles": ["query"],
                           "timeout": "30s", "associations": associations}},
        "refresh": [{"name": "all", "node": "PACS", "kind": "studies", "every": "1h", "query": {}}],
    }
    path = tmp_path / "qrproxy.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _upload_shapes(orthanc: OrthancServer, n: int, tag: str) -> list[dict[str, Any]]:
    """`n` studies of 1 to 3 series of 1 to 3 instances (so several IMAGE queries per study)."""
    out = []
    for i in range(n):
        datasets = dicomgen.make_study(n_series=1 + i % 3, per_series=1 + (i // 3) % 3, patient_id=f"W{tag}{i % 4}",
                                       accession=f"W{tag}{i}", StudyDescription=f"WAN {tag} {i}")
        answers = [orthanc.upload(dicomgen.encode(ds)) for ds in datasets]
        out.append({"uid": datasets[0].StudyInstanceUID, "id": answers[0]["ParentStudy"], "datasets": datasets})
    return out


def test_refresh_on_four_associations_through_a_wan(tmp_path: Path, db_url: str, orthanc: OrthancServer) -> None:
    from wan import WanRelay

    studies = _upload_shapes(orthanc, 14, "A")
    with WanRelay(target=(orthanc.host, orthanc.dicom_port), delay=0.02, rate=0) as wan:
        cfg = _wan_config(tmp_path, db_url, orthanc.aet, wan.port, associations=4)
        r = run_cli(cfg, "refresh", "all")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all: node PACS, rows 14, new studies 14, updated 0, removed 0, ok" in r.stdout
        # the queries did go out on several associations (the relay saw several connections)
        assert wan.connections >= 2
    assert _tree_of_index(db_url) == _tree_of_orthanc(orthanc)
    index = _index(db_url)
    for study in studies:
        _check_against_orthanc_shape(orthanc, index[study["uid"]], study["id"])


def _check_against_orthanc_shape(orthanc: OrthancServer, row: dict[str, Any], orthanc_id: str) -> None:
    """_check_against_orthanc for studies whose series count varies (it checks the counts too)."""
    o_series = orthanc.get(f"/studies/{orthanc_id}/series")
    assert row["number_of_series"] == len(o_series)
    assert row["number_of_instances"] == sum(len(se["Instances"]) for se in o_series)
    assert row["patient_id"] == orthanc.get(f"/studies/{orthanc_id}")["PatientMainDicomTags"]["PatientID"]
    for se in o_series:
        mine = row["series"][se["MainDicomTags"]["SeriesInstanceUID"]]
        assert mine["series_number"] == int(se["MainDicomTags"]["SeriesNumber"])
        assert mine["number_of_instances"] == len(se["Instances"])
        for i in orthanc.get(f"/series/{se['ID']}/instances"):
            got = mine["instances"][i["MainDicomTags"]["SOPInstanceUID"]]
            assert got["instance_number"] == int(i["MainDicomTags"]["InstanceNumber"])
            assert got["sop_class_uid"] == dicomgen.CT_IMAGE_STORAGE


def test_refresh_on_four_associations_from_dcmqrscp(tmp_path: Path, db_url: str, dcmqrscp: Any) -> None:
    """dcmqrscp answers only strictly hierarchical queries (SERIES needs the study, IMAGE the
    series) and leaves SOPClassUID out: the same index as one association would build."""
    from wan import WanRelay

    datasets = [ds for i in range(6) for ds in dicomgen.make_study(n_series=1 + i % 3, per_series=2,
                                                                   patient_id=f"WQ{i % 2}")]
    dcmqrscp.load(dicomgen.write_all(datasets, tmp_path / "files"))
    expected: dict[str, dict[str, set[str]]] = {}
    for ds in datasets:
        expected.setdefault(ds.StudyInstanceUID, {}).setdefault(ds.SeriesInstanceUID, set()).add(ds.SOPInstanceUID)
    with WanRelay(target=(dcmqrscp.host, dcmqrscp.port), delay=0.02, rate=0) as wan:
        cfg = _wan_config(tmp_path, db_url, dcmqrscp.aet, wan.port, associations=4)
        r = run_cli(cfg, "refresh", "all")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "all: node PACS, rows 6, new studies 6, updated 0, removed 0, ok" in r.stdout
        assert wan.connections >= 2
    assert _tree_of_index(db_url) == expected
    # and what dcmqrscp itself lists, asked directly
    for uid in expected:
        assert {i for se in _tree_of_index(db_url)[uid].values() for i in se} == dcmqrscp.instance_uids(uid)


@pytest.mark.parametrize("dies", ["link", "peer"])
def test_upstream_dying_mid_refresh_fails_the_run_and_removes_nothing(
        tmp_path: Path, db_url: str, orthanc: OrthancServer, dies: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import qrproxy.jobs.learn as learn_module
    from qrproxy.jobs.refresh import run_job
    from wan import WanRelay

    first = _upload_shapes(orthanc, 4, "F")
    wan = WanRelay(target=(orthanc.host, orthanc.dicom_port), delay=0.02, rate=0).start()
    try:
        cfg = load_config(_wan_config(tmp_path, db_url, orthanc.aet, wan.port, associations=4))
        engine = make_engine(cfg.database)
        upgrade(engine)
        sessions = make_sessionmaker(engine)
        assert run_job(cfg, sessions, cfg.refresh[0]).ok
        # Upstream now: one known study gone (a successful run would remove it), new ones to learn.
        orthanc.delete(f"/studies/{first[0]['id']}")
        _upload_shapes(orthanc, 12, "N")
        truth = _tree_of_orthanc(orthanc)
        before = _tree_of_index(db_url)

        # The link (or the PACS) goes away as soon as the first new study has been written.
        real_write = learn_module.write_study
        written: list[str] = []

        def write_then_die(session: Session, node: str, hdr: Any, series: Any) -> None:
            real_write(session, node, hdr, series)
            written.append(hdr.study_instance_uid)
            if len(written) == 1:
                wan.stop() if dies == "link" else orthanc.stop()

        monkeypatch.setattr(learn_module, "write_study", write_then_die)
        result = run_job(cfg, sessions, cfg.refresh[0])
        engine.dispose()
    finally:
        wan.stop()
    assert not result.ok and "PACS" in (result.error or ""), result
    assert result.removed == 0
    runs = _runs(db_url)
    assert [run.status for run in runs] == ["ok", "error"] and runs[-1].error == result.error
    after = _tree_of_index(db_url)
    # nothing removed: the study Orthanc no longer has is still there, as is everything else
    assert first[0]["uid"] in after
    assert all(after[uid] == tree for uid, tree in before.items())
    # what was written in the failed run is complete, exactly as Orthanc held it
    new = set(after) - set(before)
    assert written[0] in new and len(new) < 12
    for uid in new:
        assert after[uid] == truth[uid]
