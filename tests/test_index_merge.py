"""What the index believes (docs/dicom.md): C-FIND answers merge into the index, they never overwrite it.

The rules are exercised on the real writers (index.py, refresh.write_study, querythrough.remember,
worklist_index.replace) against SQLite and PostgreSQL; the end-to-end sequence with DCMTK dcmqrscp
as the upstream that leaves keys out is tests/test_dcmqrscp.py.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from qrproxy.query import through as querythrough, worklist
from qrproxy.index.models import Instance, Patient, Series, SpoolObject, Study, WorklistItem
from qrproxy.index.session import make_engine, make_sessionmaker, upgrade
from qrproxy.index.dsmerge import fill_missing, is_empty
from qrproxy.index.writers import found_study_header
from qrproxy.jobs.refresh import write_study
from qrproxy.query.worklist_index import item_row, replace

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


# --- dsmerge: pure ------------------------------------------------------------------------------


def test_fill_missing_keeps_what_the_answer_gives_and_fills_the_rest() -> None:
    held = Dataset()
    held.PatientName = "DOE^JANE"
    held.StudyDescription = "CT HEAD"
    held.AccessionNumber = "A1"
    new = Dataset()
    new.PatientName = "DOE^JANE^M"  # the answer's own value stays
    new.StudyDescription = ""  # empty: filled
    filled = fill_missing(new, held)  # AccessionNumber absent: filled
    assert sorted(filled) == ["AccessionNumber", "StudyDescription"]
    assert new.PatientName == "DOE^JANE^M"
    assert new.StudyDescription == "CT HEAD" and new.AccessionNumber == "A1"


def test_fill_missing_inside_single_item_sequences_and_across_charsets() -> None:
    held = Dataset()
    held.SpecificCharacterSet = "ISO_IR 100"
    held.PatientName = "Müller^Hans"
    step = Dataset()
    step.ScheduledStationAETitle = "CT1"
    step.Modality = "CT"
    held.ScheduledProcedureStepSequence = [step]
    new = Dataset()
    new.PatientName = ""
    answer_step = Dataset()
    answer_step.Modality = "CT"
    answer_step.ScheduledStationAETitle = ""
    new.ScheduledProcedureStepSequence = [answer_step]
    filled = fill_missing(new, held)
    assert "PatientName" in filled and "ScheduledProcedureStepSequence>ScheduledStationAETitle" in filled
    assert new.SpecificCharacterSet == "ISO_IR 192"  # holds both sets' text
    assert str(new.PatientName) == "Müller^Hans"
    assert new.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT1"
    # written and read back, the name survives in the new character set
    back = worklist.decode(worklist.encode(new))
    assert str(back.PatientName) == "Müller^Hans"


def test_is_empty() -> None:
    ds = Dataset()
    ds.PatientName = ""
    ds.OtherPatientIDsSequence = []
    ds.InstanceNumber = None
    ds.Modality = "CT"
    assert is_empty(None) and is_empty(ds["PatientName"]) and is_empty(ds["OtherPatientIDsSequence"])
    assert is_empty(ds["InstanceNumber"]) and not is_empty(ds["Modality"])


def test_restrict_answers_left_out_keys_from_what_is_held() -> None:
    request = Dataset()
    request.QueryRetrieveLevel = "IMAGE"
    request.SOPInstanceUID = ""
    request.SOPClassUID = ""
    request.InstanceNumber = ""
    request.ImageComments = ""
    match = Dataset()  # what dcmqrscp answers: the keys it indexes only
    match.QueryRetrieveLevel = "IMAGE"
    match.SOPInstanceUID = "1.2.3.4"
    match.InstanceNumber = "7"
    held = Dataset()
    held.SOPInstanceUID = "1.2.3.4"
    held.SOPClassUID = CT
    held.InstanceNumber = 9  # the upstream's own value wins where it gave one
    out = querythrough.restrict(match, request, "QRPROXY", held)
    assert out.SOPClassUID == CT
    assert str(out.InstanceNumber) == "7"
    assert "ImageComments" in out and is_empty(out["ImageComments"])  # nobody knows it: empty, not invented
    assert out.RetrieveAETitle == "QRPROXY"
    bare = querythrough.restrict(match, request, "QRPROXY", None)
    assert is_empty(bare["SOPClassUID"])


# --- the index writers --------------------------------------------------------------------------


@pytest.fixture
def sessions(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield make_sessionmaker(engine)
    engine.dispose()


def _instance_ds(study: str, series: str, sop: str, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.PatientID = "P1"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = sop
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


def _hold_locally(sessions: sessionmaker[Session], sop: str, sop_class: str) -> None:
    """What C-STORE leaves: a spool object linked to the instance row."""
    with sessions.begin() as s:
        obj = SpoolObject(sop_instance_uid=sop, sop_class_uid=sop_class, study_instance_uid=None,
                          transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"objects/00/{sop}.dcm", size=1,
                          sha256="0" * 64, origin="received")
        s.add(obj)
        s.flush()
        s.execute(update(Instance).where(Instance.sop_instance_uid == sop).values(object_pk=obj.id))


def _refresh(sessions: sessionmaker[Session], study: Dataset, series: list[tuple[Dataset, list[Dataset]]]) -> None:
    with sessions.begin() as s:
        write_study(s, "PACS", found_study_header(study), series)


def _row(sessions: sessionmaker[Session], sop: str) -> Any:
    with sessions() as s:
        return s.execute(
            select(Instance.sop_class_uid, Instance.instance_number, Instance.updated_at, Series.modality,
                   Series.series_description, Study.study_description, Study.number_of_instances,
                   Patient.patient_name)
            .join(Series, Series.id == Instance.series_pk).join(Study, Study.id == Series.study_pk)
            .join(Patient, Patient.id == Study.patient_pk).where(Instance.sop_instance_uid == sop)
        ).one()


def test_refresh_never_erases_and_held_files_outrank_c_find(sessions: sessionmaker[Session]) -> None:
    # First the upstream tells everything (as Orthanc would) ...
    study = _instance_ds("1.9.1", "", "", PatientName="DOE^JOHN", StudyDescription="CT CHEST",
                         NumberOfStudyRelatedInstances=2)
    series = _instance_ds("1.9.1", "1.9.1.1", "", Modality="CT", SeriesDescription="AXIAL")
    images = [_instance_ds("1.9.1", "1.9.1.1", "1.9.1.1.1", SOPClassUID=CT, InstanceNumber=1),
              _instance_ds("1.9.1", "1.9.1.1", "1.9.1.1.2", SOPClassUID=CT, InstanceNumber=2)]
    _refresh(sessions, study, [(series, images)])
    first = _row(sessions, "1.9.1.1.1")
    assert (first.sop_class_uid, first.instance_number, first.modality) == (CT, 1, "CT")

    # ... then, as dcmqrscp does, answers without SOPClassUID and with empty descriptions.
    bare_study = _instance_ds("1.9.1", "", "", PatientName="", StudyDescription="", NumberOfStudyRelatedInstances=2)
    bare_series = _instance_ds("1.9.1", "1.9.1.1", "", Modality="CT")
    bare_images = [_instance_ds("1.9.1", "1.9.1.1", uid, InstanceNumber=n)
                   for n, uid in ((1, "1.9.1.1.1"), (2, "1.9.1.1.2"))]
    _refresh(sessions, bare_study, [(bare_series, bare_images)])
    again = _row(sessions, "1.9.1.1.1")
    assert again.sop_class_uid == CT, "an omitted SOPClassUID erased the one the index held"
    assert again.series_description == "AXIAL" and again.study_description == "CT CHEST"
    assert again.patient_name == "DOE^JOHN"
    assert again.updated_at == first.updated_at, "a refresh that learnt nothing moved updated_at"

    # A held copy: its values outrank a C-FIND answer that differs; counts follow the upstream.
    _hold_locally(sessions, "1.9.1.1.2", CT)
    wrong_study = _instance_ds("1.9.1", "", "", PatientName="OTHER^NAME", StudyDescription="RENAMED",
                               NumberOfStudyRelatedInstances=3)
    wrong_series = _instance_ds("1.9.1", "1.9.1.1", "", Modality="MR", SeriesDescription="CHANGED")
    wrong_images = [_instance_ds("1.9.1", "1.9.1.1", "1.9.1.1.2", SOPClassUID=MR, InstanceNumber=5)]
    _refresh(sessions, wrong_study, [(wrong_series, wrong_images)])
    held = _row(sessions, "1.9.1.1.2")
    assert (held.sop_class_uid, held.instance_number) == (CT, 2)
    assert (held.modality, held.series_description) == ("CT", "AXIAL")
    assert (held.study_description, held.patient_name) == ("CT CHEST", "DOE^JOHN")
    assert held.number_of_instances == 3  # no file holds the upstream's count
    with sessions() as s:  # the instance the node no longer lists and no file backs is gone
        assert s.execute(select(Instance.id).where(Instance.sop_instance_uid == "1.9.1.1.1")).first() is None


def test_query_through_fills_but_does_not_overwrite(sessions: sessionmaker[Session]) -> None:
    study = _instance_ds("1.8.1", "", "", PatientName="ROE^ANN", StudyDescription="")
    querythrough.remember(sessions, "PACS", "STUDY", [study])
    querythrough.remember(sessions, "PACS", "SERIES", [_instance_ds("1.8.1", "1.8.1.1", "", Modality="MR")])
    querythrough.remember(sessions, "PACS", "IMAGE", [_instance_ds("1.8.1", "1.8.1.1", "1.8.1.1.1", InstanceNumber=4)])
    assert _row(sessions, "1.8.1.1.1").sop_class_uid is None  # nobody said it
    querythrough.remember(sessions, "PACS", "IMAGE", [_instance_ds("1.8.1", "1.8.1.1", "1.8.1.1.1", SOPClassUID=MR)])
    row = _row(sessions, "1.8.1.1.1")
    assert (row.sop_class_uid, row.instance_number) == (MR, 4)  # filled, and the number kept
    querythrough.remember(sessions, "PACS", "STUDY", [_instance_ds("1.8.1", "", "", StudyDescription="MR KNEE")])
    assert _row(sessions, "1.8.1.1.1").study_description == "MR KNEE"
    assert _row(sessions, "1.8.1.1.1").patient_name == "ROE^ANN"


def test_worklist_refresh_keeps_values_an_answer_leaves_empty(sessions: sessionmaker[Session]) -> None:
    def item(station: str, name: str) -> Dataset:
        ds = Dataset()
        ds.PatientID = "W1"
        ds.PatientName = name
        ds.AccessionNumber = "ACC1"
        ds.StudyInstanceUID = "1.7.1"
        step = Dataset()
        step.ScheduledStationAETitle = station
        step.ScheduledProcedureStepID = "S1"
        step.ScheduledProcedureStepStartDate = "20261204"
        step.Modality = "CT"
        ds.ScheduledProcedureStepSequence = [step]
        return ds

    window = Dataset()
    window.ScheduledProcedureStepSequence = [Dataset()]
    now = dt.datetime.now(dt.timezone.utc)
    with sessions.begin() as s:
        replace(s, "RIS", window, [item_row("RIS", item("CT1", "DOE^JOHN"), now)])
    with sessions.begin() as s:
        replace(s, "RIS", window, [item_row("RIS", item("", ""), now)])
    with sessions() as s:
        rows = s.execute(select(WorklistItem.identifier, WorklistItem.scheduled_station_ae)).all()
    assert len(rows) == 1
    kept = worklist.decode(rows[0].identifier)
    assert str(kept.PatientName) == "DOE^JOHN"
    assert kept.ScheduledProcedureStepSequence[0].ScheduledStationAETitle == "CT1"
    assert rows[0].scheduled_station_ae == "CT1"
