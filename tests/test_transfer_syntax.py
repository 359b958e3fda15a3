"""Per-destination transfer syntax: storescu -> qrproxy -> Orthanc, compressed on the way, pixels exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from test_codec import make_ct_signed, make_sr, make_us_rgb, save
from support import assert_all_success, node, proxy_config, storescu, wait_orthanc_has

from qrproxy.store.codec import convert_file

J2K, JLS, RLE, EXPLICIT = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1"


def orthanc_file(orthanc: Any, orthanc_id: str, tmp_path: Path) -> pydicom.Dataset:
    p = tmp_path / f"{orthanc_id}.dcm"
    p.write_bytes(orthanc.instance_file(orthanc_id))
    return pydicom.dcmread(p)


@pytest.mark.orthanc
@pytest.mark.parametrize("target,uid", [("jpeg2000-lossless", J2K), ("jpegls-lossless", JLS), ("rle-lossless", RLE)])
def test_forward_compressed_pixels_exact(db_url: str, orthanc: Any, qrproxy: Any, tmp_path: Path,
                                         target: str, uid: str) -> None:
    rng = np.random.default_rng(11)
    originals = [make_ct_signed(rng), make_us_rgb(rng), make_sr(rng)]
    files = [save(ds, tmp_path / f"in{i}.dcm") for i, ds in enumerate(originals)]
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc, transfer_syntax=target)}))
    res = storescu(proc.port, files, aec="QRPROXY")
    assert_all_success(res, files)
    index = wait_orthanc_has(orthanc, [str(d.SOPInstanceUID) for d in originals], timeout=90)
    for ds in originals:
        got = orthanc_file(orthanc, index[str(ds.SOPInstanceUID)], tmp_path)
        if "PixelData" not in ds:
            # an SR has nothing to compress: it travels uncompressed
            assert got.file_meta.TransferSyntaxUID in (EXPLICIT, "1.2.840.10008.1.2")
            assert got.ContentSequence[0].TextValue == ds.ContentSequence[0].TextValue
            continue
        assert got.file_meta.TransferSyntaxUID == uid, f"Orthanc stored {got.file_meta.TransferSyntaxUID}"
        assert np.array_equal(got.pixel_array, ds.pixel_array), "pixels changed on the way"
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert str(got.PatientName) == str(ds.PatientName)


@pytest.mark.orthanc
def test_compressed_input_arrives_decompressed(db_url: str, orthanc: Any, qrproxy: Any, tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    ds = make_ct_signed(rng)
    plain = save(ds, tmp_path / "plain.dcm")
    j2k = tmp_path / "j2k.dcm"
    assert convert_file(plain, j2k, J2K).ok
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc, transfer_syntax="explicit-little")}))
    res = storescu(proc.port, [j2k], aec="QRPROXY", extra=["-xv"])  # -xv: propose JPEG 2000 lossless
    assert_all_success(res, [j2k])
    index = wait_orthanc_has(orthanc, [str(ds.SOPInstanceUID)], timeout=90)
    got = orthanc_file(orthanc, index[str(ds.SOPInstanceUID)], tmp_path)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT
    assert np.array_equal(got.pixel_array, ds.pixel_array)
