"""A large instance is streamed in and out: qrproxy's peak memory stays far below the instance size."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from support import node, proxy_config, storescu, wait_until

SIZE_MB = 300


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def big_instance(path: Path) -> Dataset:
    frames = SIZE_MB * 4  # 512 x 512 x 8-bit = 256 KiB per frame
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # multi-frame grayscale byte SC
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "LARGE^INSTANCE", "BIG1"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    frame = np.arange(512 * 512, dtype=np.uint32).astype(np.uint8).tobytes()
    ds.PixelData = frame * frames
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.mark.orthanc
def test_large_instance_keeps_memory_flat(tmp_path: Path, qrproxy, storescp, db_url: str) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "big.dcm"
    ds = big_instance(src)
    size = src.stat().st_size
    proc = qrproxy(proxy_config(db_url, {"SINK": node(storescp)}))
    before = rss_kb(proc.pid, "VmRSS")
    res = storescu(proc.port, [src], aec="QRPROXY", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: storescp.received_files(), 300, "the large instance at storescp")
    received = storescp.received_files()[0]
    wait_until(lambda: received.stat().st_size >= size - 1024, 300, "storescp to finish writing")
    peak = rss_kb(proc.pid, "VmHWM")
    grown_mb = (peak - before) / 1024
    print(f"peak RSS growth {grown_mb:.1f} MB for {size / 1e6:.0f} MB")
    assert grown_mb < SIZE_MB / 3, f"qrproxy peak RSS grew by {grown_mb:.0f} MB for a {size / 1e6:.0f} MB instance"

    def pixel_hash(p: Path) -> str:
        data = p.read_bytes()
        return hashlib.sha256(data[data.rindex(b"\xe0\x7f\x10\x00"):]).hexdigest()

    assert pixel_hash(received) == pixel_hash(src), "pixel data changed on the way"
    del ds
