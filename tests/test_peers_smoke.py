"""The fixtures start real peers that answer: DCMTK tools (from /usr/bin) against Orthanc, storescp
and wlmscpfs, and Orthanc's REST API."""

from __future__ import annotations

import os
import subprocess
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from peers import dataset_bytes, dcmtk, make_ct_dataset, make_worklist_item, write_ct_file


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{argv} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def test_dcmtk_tools_come_from_usr_bin() -> None:
    for tool in ("echoscu", "storescu", "findscu", "movescu", "getscu"):
        assert dcmtk(tool) == f"/usr/bin/{tool}"
    out = subprocess.run([dcmtk("echoscu"), "--version"], capture_output=True, text=True).stdout
    assert "dcmtk" in out.lower()


def test_echo_orthanc_and_rest(orthanc) -> None:  # type: ignore[no-untyped-def]
    run(dcmtk("echoscu"), "-aet", "SMOKE", "-aec", orthanc.aet, orthanc.host, str(orthanc.dicom_port))
    system = orthanc.get("/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.instances() == []


def test_orthanc_upload_and_download(orthanc) -> None:  # type: ignore[no-untyped-def]
    ds = make_ct_dataset(PatientID="UPLOAD1")
    answer = orthanc.upload(dataset_bytes(ds))
    assert answer["Status"] == "Success"
    assert orthanc.instances() == [answer["ID"]]
    assert orthanc.instance_tags(answer["ID"])["SOPInstanceUID"] == ds.SOPInstanceUID
    back = pydicom.dcmread(BytesIO(orthanc.instance_file(answer["ID"])))
    assert back.PatientID == "UPLOAD1"


def test_echo_storescp(storescp) -> None:  # type: ignore[no-untyped-def]
    run(dcmtk("echoscu"), "-aet", "SMOKE", "-aec", storescp.aet, storescp.host, str(storescp.port))


def test_storescu_to_storescp(storescp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = write_ct_file(tmp_path / "ct.dcm", PatientID="STORE1")
    assert pydicom.dcmread(src).file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    run(dcmtk("storescu"), "-aet", "SMOKE", "-aec", storescp.aet, storescp.host, str(storescp.port), str(src))
    files = storescp.wait_for_files(1, timeout=60)
    assert len(files) == 1
    got = pydicom.dcmread(files[0])
    assert got.PatientID == "STORE1"
    assert got.SOPInstanceUID == pydicom.dcmread(src).SOPInstanceUID


def test_orthanc_stores_to_storescp(orthanc_factory, storescp) -> None:  # type: ignore[no-untyped-def]
    orthanc = orthanc_factory(modalities={"sink": (storescp.aet, storescp.host, storescp.port)})
    ds = make_ct_dataset()
    iid = orthanc.upload(dataset_bytes(ds))["ID"]
    orthanc.echo_modality("sink")
    orthanc.store_to_modality("sink", [iid])
    files = storescp.wait_for_files(1, timeout=60)
    assert pydicom.dcmread(files[0]).SOPInstanceUID == ds.SOPInstanceUID


def test_findscu_worklist(worklist_scp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    worklist_scp.add_item(make_worklist_item(PatientID="WL42", AccessionNumber="A42"))
    out = tmp_path / "rsp"
    out.mkdir()
    res = run(
        dcmtk("findscu"), "-W", "-aet", "SMOKE", "-aec", worklist_scp.aet,
        "-k", "PatientID", "-k", "PatientName", "-k", "AccessionNumber",
        "-k", "ScheduledProcedureStepSequence[0].Modality=CT",
        "-X", "-od", str(out),
        worklist_scp.host, str(worklist_scp.port),
    )  # fmt: skip
    responses = sorted(out.glob("rsp*.dcm"))
    assert len(responses) == 1, res.stdout + res.stderr
    rsp = pydicom.dcmread(responses[0])
    assert rsp.PatientID == "WL42"
    assert rsp.AccessionNumber == "A42"


def test_findscu_worklist_from_dump_text(worklist_scp, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    worklist_scp.add_item(
        "(0008,0050) SH  [DUMP1]\n"
        "(0010,0010) PN  [DUMP^PATIENT]\n"
        "(0010,0020) LO  [DUMPID]\n"
        "(0040,0100) SQ\n"
        "(fffe,e000) -\n"
        "(0008,0060) CS  [MR]\n"
        "(0040,0001) AE  [MR1]\n"
        "(0040,0002) DA  [20240101]\n"
        "(fffe,e00d) -\n"
        "(fffe,e0dd) -\n"
    )
    out = tmp_path / "rsp"
    out.mkdir()
    run(
        dcmtk("findscu"), "-W", "-aec", worklist_scp.aet,
        "-k", "PatientID=DUMPID", "-k", "AccessionNumber",
        "-X", "-od", str(out), worklist_scp.host, str(worklist_scp.port),
    )  # fmt: skip
    responses = sorted(out.glob("rsp*.dcm"))
    assert [pydicom.dcmread(p).AccessionNumber for p in responses] == ["DUMP1"]


def test_peer_stop_is_reliable(storescp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = storescp_factory()
    pid = scp.pid
    assert scp.running
    scp.stop()
    assert not scp.running
    assert scp.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "starting:" in scp.log_text()


def test_orthanc_worklist_plugin(orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc = orthanc_factory(worklists_dir=tmp_path / "orthanc-wl")
    orthanc.add_worklist(make_worklist_item(PatientID="OWL1", AccessionNumber="OA1"))
    out = tmp_path / "rsp"
    out.mkdir()
    run(
        dcmtk("findscu"), "-W", "-aec", orthanc.aet,
        "-k", "PatientID", "-k", "AccessionNumber", "-k", "ScheduledProcedureStepSequence[0].Modality",
        "-X", "-od", str(out), orthanc.host, str(orthanc.dicom_port),
    )  # fmt: skip
    responses = sorted(out.glob("rsp*.dcm"))
    assert [pydicom.dcmread(p).PatientID for p in responses] == ["OWL1"]
