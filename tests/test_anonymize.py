"""Anonymized forwarding against real peers: DCMTK storescu -> qrproxy (on: store mutation with
`anonymize` for node PACS) -> Orthanc. Everything is checked on the files Orthanc stored, against the
original data sets the test generated; instances are paired by their pixel data (unique per instance,
and the one thing that must not change). SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import dicomgen
from peers import OrthancServer
from support import assert_all_success, node, proxy_config, storescu, wait_until

SECRET_PRIVATE = "PRIVATE-SECRET-VALUE"


def phi_study(patient_id: str, accession: str, n_series: int = 2, per_series: int = 2) -> list[Dataset]:
    """A study full of Basic Profile attributes; instance 2.. of each series refers to instance 1."""
    study = dicomgen.make_study(n_series, per_series, patient_id=patient_id, patient_name="SECRET^PATIENT^X",
                                accession=accession, InstitutionName="ST ELSEWHERE HOSPITAL",
                                OperatorsName="OPERATOR^OLGA", PatientAddress="1 SECRET ROAD",
                                OtherPatientIDs="OTHERID77", ImageComments="comment about the patient")
    firsts: dict[str, Dataset] = {}
    for ds in study:
        first = firsts.setdefault(str(ds.SeriesInstanceUID), ds)
        ds.private_block(0x0009, "QRPROXY TEST", create=True).add_new(0x01, "LO", SECRET_PRIVATE)
        if first is not ds:
            ref = Dataset()
            ref.ReferencedSOPClassUID = first.SOPClassUID
            ref.ReferencedSOPInstanceUID = first.SOPInstanceUID
            ref.OperatorsName = "NESTED^OPERATOR"
            ds.ReferencedImageSequence = Sequence([ref])
            src = Dataset()
            src.ReferencedSOPClassUID = first.SOPClassUID
            src.ReferencedSOPInstanceUID = first.SOPInstanceUID
            ds.SourceImageSequence = Sequence([src])
    return study


def phi_values(study: list[Dataset]) -> set[str]:
    """Every identifying value of the originals, as text (values of 4+ characters)."""
    out: set[str] = set()
    for ds in study:
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                   "OperatorsName", "PatientAddress", "OtherPatientIDs", "ReferringPhysicianName",
                   "StudyDescription", "SeriesDescription", "ImageComments", "SOPInstanceUID",
                   "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "StudyDate"):
            out.add(str(ds[kw].value))
        out |= {"SECRET", "NESTED^OPERATOR", SECRET_PRIVATE}
    return {v for v in out if len(v) >= 4}


def all_texts(ds: Dataset) -> list[tuple[str, str]]:
    out = []
    for elem in ds.iterall():
        if elem.tag == 0x7FE00010 or elem.VR == "SQ":
            continue
        value = elem.value
        text = value.decode("latin-1", "replace") if isinstance(value, bytes) else str(value)
        out.append((str(elem.tag), text))
    return out


def removed_tags() -> set[int]:
    """Attributes Table E.1-1 says to remove (X), straight from the table's published form."""
    table = dicom_anonymization_database_selector("dicomfields_2026c")
    return {(g << 16) | e for g, e, *rest in table["X_TAGS"] if not rest}


def orthanc_files(orthanc: OrthancServer, count: int) -> list[Dataset]:
    wait_until(lambda: len(orthanc.instances()) >= count, 90,
               lambda: f"Orthanc has {len(orthanc.instances())} of {count} instances")
    return [pydicom.dcmread(io.BytesIO(orthanc.instance_file(i))) for i in orthanc.instances()]


def by_pixels(originals: list[Dataset], stored: list[Dataset]) -> list[tuple[Dataset, Dataset]]:
    index = {bytes(ds.PixelData): ds for ds in originals}
    pairs = []
    for got in stored:
        orig = index.get(bytes(got.PixelData))
        assert orig is not None, f"an instance at Orthanc has pixel data unlike every original ({got.SOPInstanceUID})"
        pairs.append((orig, got))
    assert len({id(o) for o, _ in pairs}) == len(originals) == len(stored)
    return pairs


def check_anonymized(originals: list[Dataset], stored: list[Dataset]) -> dict[str, str]:
    """Assert the profile held for every instance; returns original UID -> UID at Orthanc."""
    secrets = phi_values(originals)
    x_tags = removed_tags()
    mapping: dict[str, str] = {}
    pairs = by_pixels(originals, stored)
    for orig, got in pairs:
        leaks = [(tag, text) for tag, text in all_texts(got) for s in secrets if s in text]
        assert not leaks, f"PHI survived in {got.SOPInstanceUID}: {leaks[:5]}"
        survivors = [hex(int(e.tag)) for e in got.iterall() if int(e.tag) in x_tags]
        assert not survivors, f"attributes Table E.1-1 removes survived: {survivors}"
        assert not [e for e in got.iterall() if e.tag.is_private], "private attributes survived"
        assert got.PatientIdentityRemoved == "YES"
        assert got.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert got.DeidentificationMethodCodeSequence[0].CodingSchemeDesignator == "DCM"
        assert got.SOPClassUID == orig.SOPClassUID and got.Rows == orig.Rows
        for kw in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            new, old = str(got[kw].value), str(orig[kw].value)
            assert new != old and new.startswith("2.25.") and len(new) <= 64
            assert mapping.setdefault(old, new) == new, f"{kw} {old} mapped to two UIDs"
    for orig, got in pairs:  # references point at the remapped instances
        for seq in ("ReferencedImageSequence", "SourceImageSequence"):
            if seq in orig:
                want = mapping[str(orig[seq][0].ReferencedSOPInstanceUID)]
                assert got[seq][0].ReferencedSOPInstanceUID == want, seq
    assert len(set(mapping.values())) == len(mapping), "two originals share one new UID"
    return mapping


@pytest.mark.orthanc
def test_anonymized_forward_is_consistent_across_sends_and_restarts(
        db_url: str, orthanc: OrthancServer, qrproxy: Any, tmp_path: Path) -> None:
    cfg = proxy_config(db_url, {"PACS": node(orthanc)}, mutations=[
        {"name": "research copy", "on": "store", "nodes": ["PACS"], "anonymize": True}])
    study_a = phi_study("PHIPAT001", "ACCPHI01")
    files_a = dicomgen.write_all(study_a, tmp_path / "a")
    proc = qrproxy(cfg)
    assert_all_success(storescu(proc.port, files_a, aec="QRPROXY"), files_a)
    first = check_anonymized(study_a, orthanc_files(orthanc, len(study_a)))
    stored = orthanc_files(orthanc, len(study_a))
    assert len({str(d.StudyInstanceUID) for d in stored}) == 1
    assert len({str(d.SeriesInstanceUID) for d in stored}) == 2
    pseudonym = {str(d.PatientID) for d in stored}
    assert len(pseudonym) == 1 and "PHIPAT001" not in pseudonym

    # Restart, then send the same study again (a changed window makes qrproxy forward it anew) with
    # Orthanc emptied first, so what Orthanc then holds can only come from the second send.
    proc.stop()
    for study in orthanc.studies():
        orthanc.delete(f"/studies/{study}")
    for ds in study_a:
        ds.WindowCenter = 50
    files_a2 = dicomgen.write_all(study_a, tmp_path / "a2")
    proc2 = qrproxy(cfg)
    assert_all_success(storescu(proc2.port, files_a2, aec="QRPROXY"), files_a2)
    stored2 = orthanc_files(orthanc, len(study_a))
    assert {float(d.WindowCenter) for d in stored2} == {50.0}, "Orthanc does not hold the second send"
    assert check_anonymized(study_a, stored2) == first, "the second send mapped UIDs differently"

    # Another study of the same patient: new UIDs, the same patient pseudonym.
    study_b = phi_study("PHIPAT001", "ACCPHI02", n_series=1, per_series=2)
    files_b = dicomgen.write_all(study_b, tmp_path / "b")
    assert_all_success(storescu(proc2.port, files_b, aec="QRPROXY"), files_b)
    everything = orthanc_files(orthanc, len(study_a) + len(study_b))
    new_b = [d for d in everything if bytes(d.PixelData) in {bytes(o.PixelData) for o in study_b}]
    second = check_anonymized(study_b, new_b)
    assert not set(second.values()) & set(first.values()), "two studies share remapped UIDs"
    assert {str(d.StudyInstanceUID) for d in new_b} != {str(d.StudyInstanceUID) for d in stored2}
    assert {str(d.PatientID) for d in new_b} == pseudonym
