"""The one table of which C-FIND key lives in which index column.

Matching (query/matching.py: the SQL WHERE) and answering (scp/find.py: the SELECT of the returned
values) read the same entries, so a key added here is matched and answered alike; the refresh and
query-through ask an upstream for the keys that fill these columns (`STUDY_KEYS`, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qrproxy.index.models import Instance, Patient, Series, Study, WorklistItem

SPS = "ScheduledProcedureStepSequence"


@dataclass(frozen=True)
class Column:
    """Where a key lives in the index: the column compared in SQL, its table's level, and how it is
    compared; `shown` is the column answered when it is not the compared one (a PN as received,
    matched on its normalised twin)."""

    column: Any
    level: str | None
    how: str = "text"  # text | pn (normalised PN) | pn_raw (PN as received) | int | modalities
    shown: Any = None

    @property
    def answer(self) -> Any:
        """The column a C-FIND answer reads, or None for a value computed from other rows
        (ModalitiesInStudy: the modalities of the study's series)."""
        if self.how == "modalities":
            return None
        return self.column if self.shown is None else self.shown


QR_COLUMNS: dict[str, Column] = {
    "PatientID": Column(Patient.patient_id, "PATIENT"),
    "IssuerOfPatientID": Column(Patient.issuer, "PATIENT"),
    "PatientName": Column(Patient.patient_name_norm, "PATIENT", "pn", shown=Patient.patient_name),
    "PatientBirthDate": Column(Patient.birth_date, "PATIENT"),
    "PatientSex": Column(Patient.sex, "PATIENT"),
    "StudyInstanceUID": Column(Study.study_instance_uid, "STUDY"),
    "StudyDate": Column(Study.study_date, "STUDY"),
    "StudyTime": Column(Study.study_time, "STUDY"),
    "AccessionNumber": Column(Study.accession_number, "STUDY"),
    "StudyID": Column(Study.study_id, "STUDY"),
    "StudyDescription": Column(Study.study_description, "STUDY"),
    "ReferringPhysicianName": Column(Study.referring_physician_name, "STUDY", "pn_raw"),
    "ModalitiesInStudy": Column(Series.modality, "STUDY", "modalities"),
    "SeriesInstanceUID": Column(Series.series_instance_uid, "SERIES"),
    "Modality": Column(Series.modality, "SERIES"),
    "SeriesNumber": Column(Series.series_number, "SERIES", "int"),
    "SeriesDescription": Column(Series.series_description, "SERIES"),
    "BodyPartExamined": Column(Series.body_part_examined, "SERIES"),
    "SOPInstanceUID": Column(Instance.sop_instance_uid, "IMAGE"),
    "SOPClassUID": Column(Instance.sop_class_uid, "IMAGE"),
    "InstanceNumber": Column(Instance.instance_number, "IMAGE", "int"),
}

# One worklist row is one scheduled procedure step: the step's keys are columns of the row.
WORKLIST_COLUMNS: dict[str, Column] = {
    "PatientID": Column(WorklistItem.patient_id, None),
    "PatientName": Column(WorklistItem.patient_name_norm, None, "pn"),
    "AccessionNumber": Column(WorklistItem.accession_number, None),
    "RequestedProcedureID": Column(WorklistItem.requested_procedure_id, None),
    "StudyInstanceUID": Column(WorklistItem.study_instance_uid, None),
    f"{SPS}.ScheduledStationAETitle": Column(WorklistItem.scheduled_station_ae, None),
    f"{SPS}.ScheduledStationName": Column(WorklistItem.scheduled_station_name, None),
    f"{SPS}.Modality": Column(WorklistItem.modality, None),
    f"{SPS}.ScheduledProcedureStepID": Column(WorklistItem.sps_id, None),
    f"{SPS}.ScheduledProcedureStepStartDate": Column(WorklistItem.sps_start_date, None),
    f"{SPS}.ScheduledProcedureStepStartTime": Column(WorklistItem.sps_start_time, None),
}

ENTITIES = {"PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}

# What a refresh or a query-through asks an upstream for at each level: the keys that fill the
# columns above, and the counts no file holds.
STUDY_KEYS = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "BodyPartExamined",
               "NumberOfSeriesRelatedInstances")
IMAGE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
