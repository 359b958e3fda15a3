"""Synthetic DICOM objects for the store-and-forward tests (no pytest imports here).

Every function makes fresh UIDs unless told otherwise, so that tests (and both database
parametrizations of one test) never see each other's instances in a shared peer.

    make_ct(...)             a valid CT Image Storage instance, 64x64 16-bit by default
    make_study(...)          a multi-series CT study (list of datasets)
    make_basic_text_sr(...)  a minimal valid Basic Text SR (1.2.840.10008.5.1.4.1.1.88.11)
    write_dataset(ds, path)  Part 10 file, explicit VR little endian, with file meta
    write_all(dss, folder)   one file per dataset, named after the SOP Instance UID's tail
    body_bytes(data)         the bytes of a Part 10 file after its file meta group
    compare_datasets(a, b)   element-by-element differences (including PixelData), as text lines
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

_TODAY = dt.date.today().strftime("%Y%m%d")


def _pixels(seed: str, rows: int, cols: int) -> bytes:
    """Deterministic, instance-specific 12-bit values in 16-bit little-endian words."""
    out = bytearray()
    counter = 0
    need = rows * cols * 2
    while len(out) < need:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    words = struct.unpack(f"<{rows * cols}H", bytes(out[:need]))
    return struct.pack(f"<{rows * cols}H", *(w & 0x0FFF for w in words))


def phantom_pixels(seed: str, rows: int, cols: int) -> bytes:
    """A CT-like slice: air around an ellipse of soft tissue with a bony ring and a little noise,
    12-bit values. Compresses losslessly about as much as real CT (JPEG-LS ~2.9x at 512x512), unlike
    random values."""
    import numpy as np

    rng = np.random.default_rng(int(hashlib.sha256(seed.encode()).hexdigest()[:8], 16))
    y, x = np.mgrid[0:rows, 0:cols]
    r = ((x - cols / 2) / (cols * 0.42)) ** 2 + ((y - rows / 2) / (rows * 0.36)) ** 2
    img = np.where(r < 1.0, 1064.0, 24.0)  # water ~ HU 40, air ~ HU -1000 (intercept -1024)
    img = np.where((r > 0.85) & (r < 1.0), 1900.0, img)  # bone
    img += 40 * np.sin(x / 23.0 + rng.uniform(0, 6)) * (r < 0.85)
    img += rng.normal(0, 1, size=img.shape) * np.where(r < 1.0, 20.0, 3.0)
    return np.clip(img, 0, 4095).astype("<u2").tobytes()


def _file_meta(ds: Dataset) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_study(ds: Dataset, study_uid: str, patient_id: str, patient_name: str, accession: str) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = study_uid
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = _TODAY
    ds.StudyTime = "120000"
    ds.AccessionNumber = accession
    ds.StudyID = "1"
    ds.ReferringPhysicianName = "REF^DOCTOR"
    ds.StudyDescription = "QRPROXY TEST"
    ds.Manufacturer = "qrproxy-tests"


def make_ct(
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    rows: int = 64,
    cols: int = 64,
    patient_id: str = "SFPAT1",
    patient_name: str = "STORE^FORWARD",
    accession: str = "SFACC1",
    phantom: bool = False,
    **attrs: Any,
) -> Dataset:
    """A CT Image Storage instance with the General/CT Image modules filled; keywords override."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    _patient_study(ds, study_uid or generate_uid(), patient_id, patient_name, accession)
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CT"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = f"SERIES {series_number}"
    ds.BodyPartExamined = "HEAD"
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = instance_number
    ds.ContentDate = _TODAY
    ds.ContentTime = "120000"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness = 1.0
    ds.PixelSpacing = [0.5, 0.5]
    ds.KVP = 120
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = (phantom_pixels if phantom else _pixels)(ds.SOPInstanceUID, ds.Rows, ds.Columns)
    ds.file_meta = _file_meta(ds)
    return ds


def make_study(
    n_series: int = 3, per_series: int = 5, *, study_uid: str | None = None, **kw: Any
) -> list[Dataset]:
    study_uid = study_uid or generate_uid()
    out = []
    for s in range(1, n_series + 1):
        series_uid = generate_uid()
        for i in range(1, per_series + 1):
            out.append(make_ct(study_uid=study_uid, series_uid=series_uid, series_number=s, instance_number=i, **kw))
    return out


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def make_basic_text_sr(
    *,
    study_uid: str | None = None,
    text: str = "No acute findings.",
    patient_id: str = "SFPAT1",
    patient_name: str = "STORE^FORWARD",
    accession: str = "SFACC1",
    **attrs: Any,
) -> Dataset:
    """A minimal valid Basic Text SR: a CONTAINER root (Report, LOINC) holding one TEXT finding."""
    ds = Dataset()
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    _patient_study(ds, study_uid or generate_uid(), patient_id, patient_name, accession)
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.SeriesNumber = 99
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.InstanceNumber = 1
    ds.ContentDate = _TODAY
    ds.ContentTime = "121500"
    # SR Document General module
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    # SR Document Content module: root CONTAINER
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "LN", "Diagnostic Imaging Report")])
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([_code("121071", "DCM", "Finding")])
    item.TextValue = text
    ds.ContentSequence = DicomSequence([item])
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.file_meta = _file_meta(ds)
    return ds


def encode(ds: Dataset) -> bytes:
    """Part 10 bytes, explicit VR little endian, file meta as set on ``ds``."""
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(ds))
    return path


def write_all(datasets: Iterable[Dataset], folder: str | os.PathLike[str], prefix: str = "") -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        paths.append(write_dataset(ds, folder / f"{prefix}{n:04d}.dcm"))
    return paths


def meta_end(data: bytes) -> int:
    """Offset of the first byte after the file meta group (group 0002, always explicit VR LE)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM preamble)")
    pos = 132
    while pos + 8 <= len(data):
        group = struct.unpack_from("<H", data, pos)[0]
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = struct.unpack_from("<I", data, pos + 8)[0]
            pos += 12 + length
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            pos += 8 + length
    return pos


def body_bytes(data: bytes | os.PathLike[str] | str) -> bytes:
    """The data set bytes of a Part 10 file: everything after the file meta group."""
    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    return bytes(data[meta_end(bytes(data)) :])


def transfer_syntax(data: bytes) -> str:
    return str(pydicom.dcmread(BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def compare_datasets(expected: Dataset, got: Dataset, prefix: str = "") -> list[str]:
    """Differences between two datasets (data set elements only, recursing into sequences)."""
    diffs = []
    exp_tags = {e.tag for e in expected}
    got_tags = {e.tag for e in got}
    for tag in sorted(exp_tags - got_tags):
        diffs.append(f"{prefix}{tag} {expected[tag].keyword or ''} missing")
    for tag in sorted(got_tags - exp_tags):
        diffs.append(f"{prefix}{tag} {got[tag].keyword or ''} added: {got[tag].value!r:.80}")
    for tag in sorted(exp_tags & got_tags):
        a, b = expected[tag], got[tag]
        label = f"{prefix}{tag} {a.keyword or ''}"
        if a.VR == "SQ":
            if len(a.value) != len(b.value):
                diffs.append(f"{label}: {len(a.value)} items, got {len(b.value)}")
                continue
            for i, (ia, ib) in enumerate(zip(a.value, b.value)):
                diffs += compare_datasets(ia, ib, f"{label}[{i}].")
        elif a.value != b.value:
            va, vb = (f"{len(a.value)} bytes" if isinstance(a.value, bytes) else repr(a.value),
                      f"{len(b.value)} bytes" if isinstance(b.value, bytes) else repr(b.value))
            diffs.append(f"{label}: expected {va:.80}, got {vb:.80}")
    return diffs


def uids(datasets: Sequence[Dataset]) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in datasets]
