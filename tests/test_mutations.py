"""Mutation actions (set with templates, map, replace, remove, generate_uid, sequence paths,
anonymize) as pure functions, config validation of each, the uid_map table on SQLite and
PostgreSQL, and `qrproxy rules test` as a CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import dicomgen
from qrproxy.rules.anonymize import action_for
from qrproxy.cli.load import ConfigError, load_config
from qrproxy.index.session import make_engine, make_sessionmaker, upgrade
from qrproxy.rules.routes import apply_mutations, mutations_for
from qrproxy.index.uidmap import DbPseudonyms, MemoryPseudonyms

NODES = {"PACS": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "roles": ["store"]}}


def cfg_from(tmp_path: Path, mutations: list[dict[str, Any]] | str):  # type: ignore[no-untyped-def]
    p = tmp_path / "q.yml"
    if isinstance(mutations, str):
        p.write_text(mutations)
    else:
        p.write_text(yaml.safe_dump({"nodes": NODES, "mutations": mutations}, sort_keys=False))
    return load_config(p)


def worklist_item(**kw: Any) -> Dataset:
    d = Dataset()
    d.PatientName = kw.pop("PatientName", "DOE^JANE^Q")
    d.PatientID = kw.pop("PatientID", "P100")
    d.AccessionNumber = kw.pop("AccessionNumber", "ACC555")
    sps = Dataset()
    sps.Modality = kw.pop("Modality", "CT")
    sps.ScheduledStationAETitle = kw.pop("ScheduledStationAETitle", "RISDEFAULT")
    sps.ScheduledProcedureStepStartDate = "20260101"
    d.ScheduledProcedureStepSequence = Sequence([sps])
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def run(cfg, on: str, ds: Dataset, node: str | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    return apply_mutations(ds, mutations_for(cfg, on, node, ds))


# --- worklist actions ----------------------------------------------------------------------------


def test_contract_example_sets_station_inside_the_sps_item(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "station", "on": "worklist", "when": {"Modality": "CT"},
                               "set": {"ScheduledStationAETitle": "CT1"}}])
    ct, mr = worklist_item(Modality="CT"), worklist_item(Modality="MR")
    run(cfg, "worklist", ct)
    run(cfg, "worklist", mr)
    assert ct.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT1"
    assert "ScheduledStationAETitle" not in ct  # not at the top level
    assert mr.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "RISDEFAULT"


def test_templates_and_name_components(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "t", "on": "worklist", "set": {
        "OtherPatientIDs": "{PatientID}",
        "PatientName": "{PatientName.given}^{PatientName.family}^{PatientName.middle}",
        "RequestedProcedureID": "{AccessionNumber}-{{x}}",
        "ScheduledProcedureStepSequence[0].ScheduledStationName": "{Modality}{PatientID}",
    }}])
    d = worklist_item()
    run(cfg, "worklist", d)
    assert d.OtherPatientIDs == "P100"
    assert str(d.PatientName) == "JANE^DOE^Q"  # swapped, read from the value before `set`
    assert d.RequestedProcedureID == "ACC555-{x}"
    assert d.ScheduledProcedureStepSequence[0].ScheduledStationName == "CTP100"


def test_map_values_with_and_without_default(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [
        {"name": "ae", "on": "worklist", "map": {"ScheduledStationAETitle": {
            "from": "Modality", "values": {"CT": "CT1", "MR": "MR1"}, "default": "OTHER"}}},
        {"name": "name", "on": "worklist", "map": {"ScheduledStationName": {
            "from": "Modality", "values": {"CT": "ROOM1"}}}},
    ])
    got = {}
    for modality in ("CT", "MR", "US"):
        d = worklist_item(Modality=modality)
        run(cfg, "worklist", d)
        sps = d.ScheduledProcedureStepSequence[0]
        got[modality] = (sps.ScheduledStationAETitle, sps.get("ScheduledStationName"))
    assert got == {"CT": ("CT1", "ROOM1"), "MR": ("MR1", None), "US": ("OTHER", None)}


def test_regex_replace_with_groups_splits_a_name(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "r", "on": "worklist", "replace": {
        "AccessionNumber": {"pattern": "^ACC", "with": ""},
        "PatientName": {"pattern": r"^(\S+) (\S+)$", "with": r"\2^\1"},
    }}])
    d = worklist_item(PatientName="JANE DOE")
    run(cfg, "worklist", d)
    assert d.AccessionNumber == "555" and str(d.PatientName) == "DOE^JANE"


def test_remove_at_top_level_and_inside_items(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "rm", "on": "worklist",
                               "remove": ["AccessionNumber", "ScheduledProcedureStepStartDate"]}])
    d = worklist_item()
    changes = run(cfg, "worklist", d)
    assert "AccessionNumber" not in d
    assert "ScheduledProcedureStepStartDate" not in d.ScheduledProcedureStepSequence[0]
    assert len(changes) == 2


def test_generate_study_uid_is_stable_and_only_when_missing(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "g", "on": "worklist",
                               "generate_uid": {"StudyInstanceUID": ["AccessionNumber", "PatientID"]}}])
    a1, a2 = worklist_item(), worklist_item()          # the same item seen by two refreshes
    b = worklist_item(AccessionNumber="ACC556")        # another order
    has = worklist_item(StudyInstanceUID="1.2.3.4")
    for d in (a1, a2, b, has):
        run(cfg, "worklist", d)
    assert a1.StudyInstanceUID == a2.StudyInstanceUID != b.StudyInstanceUID
    assert str(a1.StudyInstanceUID).startswith("2.25.") and len(a1.StudyInstanceUID) <= 64
    assert has.StudyInstanceUID == "1.2.3.4"
    # a fresh config load (another process, another day) derives the same UID
    again = worklist_item()
    run(cfg_from(tmp_path / ".." / tmp_path.name, [{"name": "g", "on": "worklist", "generate_uid": {
        "StudyInstanceUID": ["AccessionNumber", "PatientID"]}}]), "worklist", again)
    assert again.StudyInstanceUID == a1.StudyInstanceUID


def test_generate_uid_without_sources_leaves_the_item_alone(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "g", "on": "worklist",
                               "generate_uid": {"StudyInstanceUID": ["AccessionNumber"]}}])
    d = worklist_item(AccessionNumber="")
    changes = run(cfg, "worklist", d)
    assert "StudyInstanceUID" not in d and "not generated" in changes[0]


def test_run_time_problems_are_reported_not_raised(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "n", "on": "store", "set": {
        "Rows": "{PatientID}", "StationName": "{PatientID}{PatientID}{PatientID}"}}])
    d = dicomgen.make_ct(patient_id="NOTANUMBER")
    changes = run(cfg, "store", d, "PACS")
    assert d.Rows == 64 and any("not a number" in c for c in changes)
    assert d.StationName == ("NOTANUMBER" * 3)[:16] and any("cut to 16" in c for c in changes)


def test_set_numeric_and_multivalue(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "n", "on": "store", "set": {
        "ImageType": ["DERIVED", "SECONDARY"], "SeriesNumber": 7, "InstitutionName": None}}])
    d = dicomgen.make_ct(InstitutionName="X")
    run(cfg, "store", d, "PACS")
    assert list(d.ImageType) == ["DERIVED", "SECONDARY"] and d.SeriesNumber == 7
    assert d.InstitutionName in (None, "")


def test_actions_run_in_the_documented_order(tmp_path: Path) -> None:
    cfg = cfg_from(tmp_path, [{"name": "o", "on": "worklist",
                               "set": {"AccessionNumber": "ACC-{PatientID}"},
                               "replace": {"AccessionNumber": {"pattern": "-", "with": "_"}},
                               "remove": ["PatientName"]}])
    d = worklist_item()
    run(cfg, "worklist", d)
    assert d.AccessionNumber == "ACC_P100" and "PatientName" not in d


# --- anonymize (pure, with a dict-backed pseudonym map) --------------------------------------------


def _anon_cfg(tmp_path: Path, options: Any = True, **extra: Any):  # type: ignore[no-untyped-def]
    return cfg_from(tmp_path, [{"name": "anon", "on": "store", "anonymize": options, **extra}])


def test_anonymize_follows_the_table_recursively(tmp_path: Path) -> None:
    cfg = _anon_cfg(tmp_path)
    d = dicomgen.make_ct(InstitutionName="HOSP", OperatorsName="OP^X", patient_name="DOE^JOHN")
    ref = Dataset()
    ref.ReferencedSOPClassUID = dicomgen.CT_IMAGE_STORAGE
    ref.ReferencedSOPInstanceUID = "1.2.3.99"
    ref.OperatorsName = "NESTED^OP"
    d.ReferencedImageSequence = Sequence([ref])
    d.OtherPatientIDsSequence = Sequence([Dataset()])
    d.add_new(0x00091010, "LO", "secret")
    before = copy.deepcopy(d)
    pm = MemoryPseudonyms()
    apply_mutations(d, cfg.mutations, pseudonyms=pm)
    assert d.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in d.DeidentificationMethodCodeSequence] == ["113100"]
    assert d.LongitudinalTemporalInformationModified == "REMOVED"
    assert not any(e.tag.is_private for e in d.iterall())
    assert "OtherPatientIDsSequence" not in d and "SeriesDescription" not in d
    for kw in ("StudyDate", "AccessionNumber", "PatientBirthDate", "ReferringPhysicianName", "PatientName"):
        assert d.get(kw) in (None, ""), kw
    assert d.InstitutionName != "HOSP" and d.ReferencedImageSequence[0].OperatorsName != "NESTED^OP"
    for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert d[kw].value == pm.table[("uid", before[kw].value)] != before[kw].value, kw
    assert d.ReferencedImageSequence[0].ReferencedSOPInstanceUID == pm.table[("uid", "1.2.3.99")]
    assert d.SOPClassUID == before.SOPClassUID and d.PixelData == before.PixelData
    assert d.PatientID == pm.table[("patient_id", "SFPAT1")]
    assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID


def test_anonymize_options(tmp_path: Path) -> None:
    cfg = _anon_cfg(tmp_path, {"retain_uids": True, "retain_dates": True, "patient_id": "keep",
                               "patient_name": "ANON", "keep_private": True, "keep": ["SeriesDescription"]},
                    set={"PatientComments": "{PatientID}"})
    d = dicomgen.make_ct()
    d.add_new(0x00091010, "LO", "private kept")
    before = copy.deepcopy(d)
    apply_mutations(d, cfg.mutations, pseudonyms=MemoryPseudonyms())
    assert d.StudyInstanceUID == before.StudyInstanceUID and d.SOPInstanceUID == before.SOPInstanceUID
    assert d.StudyDate == before.StudyDate and d.ContentTime == before.ContentTime
    assert d.PatientID == before.PatientID and d.PatientComments == before.PatientID
    assert d.PatientName == "ANON" and d.SeriesDescription == before.SeriesDescription
    assert d[0x00091010].value == "private kept"
    assert [c.CodeValue for c in d.DeidentificationMethodCodeSequence] == ["113100", "113110", "113106"]
    assert d.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert d.AccessionNumber in (None, "")


def test_anonymize_patient_id_empty(tmp_path: Path) -> None:
    d = dicomgen.make_ct()
    apply_mutations(d, _anon_cfg(tmp_path, {"patient_id": "empty"}).mutations)
    assert d.PatientID == ""


def test_profile_table_is_the_standard_one() -> None:
    """Spot checks against PS3.15 Table E.1-1 as printed in the standard."""
    assert action_for(0x00100010) == "Z"        # Patient's Name
    assert action_for(0x00080018) == "U"        # SOP Instance UID
    assert action_for(0x00081155) == "U"        # Referenced SOP Instance UID
    assert action_for(0x00081030) == "X"        # Study Description
    assert action_for(0x60004000) == "X"        # Overlay Comments, and the whole 60xx group
    assert action_for(0x60024000) == "X"
    assert action_for(0x00080016) is None       # SOP Class UID is kept
    assert action_for(0x7FE00010) is None       # Pixel Data is kept


# --- uid_map on both databases ---------------------------------------------------------------------


def test_db_pseudonyms_are_stable_and_race_safe(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        uids = [f"1.2.3.{i}" for i in range(50)]
        results: list[dict[str, str]] = []
        errors: list[BaseException] = []

        def worker() -> None:
            try:  # each thread its own engine: as separate processes would
                eng = make_engine(db_url)
                results.append(DbPseudonyms(make_sessionmaker(eng))("uid", uids))
                eng.dispose()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert all(r == results[0] for r in results)
        assert len(set(results[0].values())) == 50 and not set(results[0].values()) & set(uids)
        fresh = DbPseudonyms(make_sessionmaker(engine))
        assert fresh("uid", uids[:3]) == {u: results[0][u] for u in uids[:3]}
        pid = fresh("patient_id", ["1.2.3.0"])["1.2.3.0"]   # kinds do not share values
        assert pid != results[0]["1.2.3.0"] and pid.startswith("ANON")
    finally:
        engine.dispose()


# --- config validation ---------------------------------------------------------------------------


BAD = [
    ({"set": {"NoSuchKeyword": "x"}}, "mutations[0].set.NoSuchKeyword", "neither a DICOM keyword"),
    ({"set": {"PatientName": "{NoSuchKeyword}"}}, "mutations[0].set.PatientName", "field {NoSuchKeyword}"),
    ({"set": {"PatientName": "{PatientID"}}, "mutations[0].set.PatientName", "unmatched"),
    ({"set": {"PatientName": "{PatientID.given}"}}, "mutations[0].set.PatientName", "person names"),
    ({"set": {"Rows": "many"}}, "mutations[0].set.Rows", "not a number"),
    ({"set": {"ScheduledProcedureStepSequence": "x"}}, "ScheduledProcedureStepSequence", "sequence"),
    ({"set": {"PatientName[0].X": "x"}}, "mutations[0].set", "not a sequence"),
    ({"replace": {"AccessionNumber": {"pattern": "(", "with": ""}}},
     "mutations[0].replace.AccessionNumber.pattern", "bad regular expression"),
    ({"replace": {"AccessionNumber": {"pattern": "^A(C)", "with": r"\2"}}},
     "mutations[0].replace.AccessionNumber.with", "group '2'"),
    ({"map": {"ScheduledStationAETitle": {"from": "Modalty", "values": {"CT": "CT1"}}}},
     "mutations[0].map.ScheduledStationAETitle.from", "Modalty"),
    ({"map": {"ScheduledStationAETitle": {"values": {"CT": "CT1"}, "colour": 1}}},
     "mutations[0].map.ScheduledStationAETitle.colour", "unknown key"),
    ({"generate_uid": {"AccessionNumber": ["PatientID"]}}, "mutations[0].generate_uid.AccessionNumber",
     "makes UIDs"),
    ({"remove": ["Nope"]}, "mutations[0].remove[0]", "Nope"),
    ({"when": {"Modality": "("}}, "mutations[0].when.Modality", "bad regular expression"),
    ({"anonymize": True}, "mutations[0].anonymize", "on: store only"),
    ({}, "mutations[0]", "needs at least one"),
]


@pytest.mark.parametrize("extra,where,message", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_mutations_are_config_errors_with_key_and_line(tmp_path: Path, extra: dict[str, Any],
                                                           where: str, message: str) -> None:
    text = yaml.safe_dump({"nodes": NODES, "mutations": [{"name": "m", "on": "worklist", **extra}]},
                          sort_keys=False)
    with pytest.raises(ConfigError) as exc:
        cfg_from(tmp_path, text)
    problems = exc.value.problems
    assert any(where in p and message in p for p in problems), problems
    line = next(p for p in problems if where in p).split(":")[1]
    assert line.isdigit() and int(line) > 1, problems


def test_anonymize_options_are_validated(tmp_path: Path) -> None:
    for options, message in (({"patient_id": "hash"}, "patient_id"), ({"keep": ["Nope"]}, "keep[0]"),
                             ({"retain_uid": True}, "retain_uid")):
        with pytest.raises(ConfigError) as exc:
            _anon_cfg(tmp_path, options)
        assert any(message in p for p in exc.value.problems), exc.value.problems


def test_check_exits_2_naming_key_and_line(tmp_path: Path) -> None:
    p = tmp_path / "q.yml"
    p.write_text("nodes: {}\nmutations:\n  - name: m\n    on: worklist\n"
                 "    set:\n      PatientName: \"{PatiendID}^X\"\n")
    res = subprocess.run([sys.executable, "-m", "qrproxy", "-c", str(p), "check"], capture_output=True, text=True)
    assert res.returncode == 2, res
    assert f"{p}:6: mutations[0].set.PatientName" in res.stderr and "PatiendID" in res.stderr, res.stderr


# --- rules test CLI ------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qrproxy", *args], capture_output=True, text=True)


def test_rules_test_worklist_json_and_dicom_file(tmp_path: Path) -> None:
    p = tmp_path / "q.yml"
    p.write_text(yaml.safe_dump({"nodes": NODES, "mutations": [
        {"name": "station", "on": "worklist", "when": {"Modality": "CT"}, "set": {"ScheduledStationAETitle": "CT1"}},
        {"name": "anon", "on": "store", "nodes": ["PACS"], "anonymize": {"patient_name": "NOBODY"}},
    ]}, sort_keys=False))
    item = worklist_item()
    (tmp_path / "wl.json").write_text(json.dumps([json.loads(item.to_json()), json.loads(worklist_item(
        Modality="MR").to_json())]))
    res = _cli("-c", str(p), "rules", "test", str(tmp_path / "wl.json"))
    assert res.returncode == 0, res.stderr
    assert "ScheduledProcedureStepSequence[0].ScheduledStationAETitle (0040,0001): 'RISDEFAULT' -> 'CT1'" \
        in res.stdout, res.stdout
    assert "item 2 of 2" in res.stdout and "mutations on worklist: none" in res.stdout

    ct = dicomgen.make_ct(patient_name="SMITH^ANNA")
    f = dicomgen.write_dataset(ct, tmp_path / "ct.dcm")
    res = _cli("-c", str(p), "rules", "test", str(f))
    assert res.returncode == 0, res.stderr
    assert "mutations for PACS: anon" in res.stdout
    assert "PatientName (0010,0010): 'SMITH^ANNA' -> 'NOBODY'" in res.stdout, res.stdout
    assert f"SOPInstanceUID (0008,0018): '{ct.SOPInstanceUID}' -> '2.25." in res.stdout
    res = _cli("-c", str(p), "rules", "test", "--on", "worklist", str(f))
    assert res.returncode == 0 and "mutations on worklist: none" in res.stdout, res.stdout
    (tmp_path / "bad.json").write_text("{not json")
    res = _cli("-c", str(p), "rules", "test", str(tmp_path / "bad.json"))
    assert res.returncode == 1 and "cannot read" in res.stderr
