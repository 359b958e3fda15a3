"""dicomenc writes the same elements pydicom reads back; scp.find's answers decode to their rows.

Pure tests (no peers): the bytes are decoded by pydicom, an independent implementation, and compared
with the values the layout was given.
"""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag

from qrproxy.net import dicomenc
from qrproxy.net import dimse


def _decode(data: bytes, explicit: bool, charset: str | None = None) -> Dataset:
    ds = read_dataset(BytesIO(data), is_implicit_VR=not explicit, is_little_endian=True)
    if charset:
        ds.decode()
    return ds


@pytest.mark.parametrize("explicit", [True, False], ids=["explicit", "implicit"])
def test_layout_round_trip(explicit: bool) -> None:
    slots = [
        dicomenc.Slot(Tag("PatientName"), "PN", column=0),
        dicomenc.Slot(Tag("SpecificCharacterSet"), "CS",
                      constant=dicomenc.element(Tag("SpecificCharacterSet"), "CS", "ISO_IR 192", explicit)),
        dicomenc.Slot(Tag("StudyInstanceUID"), "UI", column=1),
        dicomenc.Slot(Tag("NumberOfStudyRelatedInstances"), "IS", column=2),
        dicomenc.Slot(Tag("ModalitiesInStudy"), "CS", column=3),
        dicomenc.Slot(Tag("StudyDescription"), "LO"),  # never filled: zero length
        dicomenc.Slot(Tag("OtherPatientIDsSequence"), "SQ"),
        dicomenc.Slot(Tag("Rows"), "US", column=4),
        dicomenc.Slot(Tag("StudyComments"), "LT", column=5),
    ]
    layout = dicomenc.Layout(slots, explicit)
    rows = [
        ("Müller^Jürgen=ミュラー", "1.2.3.4", 12, ["CT", "MR"], 512, "odd"),
        ("DOE^J", "1.2.3", None, "CT", None, ""),
    ]
    for row in rows:
        ds = _decode(layout.encode(row), explicit, "utf8")
        assert [int(t) for t in ds.keys()] == sorted(int(s.tag) for s in slots)
        assert str(ds.PatientName) == row[0]
        assert ds.StudyInstanceUID == row[1]
        assert (ds.NumberOfStudyRelatedInstances if row[2] is not None else None) == row[2] or \
            (row[2] is None and ds["NumberOfStudyRelatedInstances"].is_empty)
        mods = ds.ModalitiesInStudy
        assert (list(mods) if not isinstance(mods, str) else [mods]) == (row[3] if isinstance(row[3], list) else [row[3]])
        assert ds["StudyDescription"].is_empty
        assert ds["OtherPatientIDsSequence"].VR == "SQ" and len(ds.OtherPatientIDsSequence) == 0
        assert (ds.Rows if row[4] is not None else None) == row[4]
        assert (ds.StudyComments or "") == row[5]


def test_strict_codec_raises_for_a_name_outside_latin1() -> None:
    layout = dicomenc.Layout([dicomenc.Slot(Tag("PatientName"), "PN", column=0)], True, "latin_1", "strict")
    assert _decode(layout.encode(["Müller"]), True).PatientName.original_string == "Müller".encode("latin_1")
    with pytest.raises(UnicodeEncodeError):
        layout.encode(["山田^太郎"])


def find_pending_command(sop_class: str, message_id: int) -> bytes:
    request = dimse.Command(CommandField=dimse.C_FIND, MessageID=message_id, AffectedSOPClassUID=sop_class)
    return dimse.response(request, 0xFF00, has_dataset=True)


def test_pending_command_decodes() -> None:
    cmd = _decode(find_pending_command("1.2.840.10008.5.1.4.1.2.2.1", 7), explicit=False)
    assert cmd.CommandField == 0x8020 and cmd.MessageIDBeingRespondedTo == 7 and cmd.Status == 0xFF00
    assert cmd.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.2.2.1"
    assert cmd.CommandDataSetType != 0x0101
    body = find_pending_command("1.2.840.10008.5.1.4.1.2.2.1", 7)[12:]
    assert cmd.CommandGroupLength == len(body)


@pytest.mark.parametrize("sop_instance,source", [("1.2.3.4", "MODCT"), ("1.2.840.113619.2.55.3.12345", ""),
                                                  ("1.22", "SIXTEEN_CHARS_AE"), ("2.25.1", "ODD")])
def test_file_meta_is_what_pydicom_writes(sop_instance: str, source: str) -> None:
    """scp/store.py encodes the file meta of a received instance with struct; pydicom's writer is
    the reference (odd and even UID lengths, with and without a source AE)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from qrproxy.net import pdu
    from qrproxy.scp.store import file_meta

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    meta.ImplementationClassUID = pdu.IMPLEMENTATION_UID
    meta.ImplementationVersionName = pdu.IMPLEMENTATION_VERSION
    if source:
        meta.SourceApplicationEntityTitle = source
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    expected = b"\0" * 128 + b"DICM" + fp.getvalue()
    assert file_meta("1.2.840.10008.5.1.4.1.1.2", sop_instance, "1.2.840.10008.1.2.1", source) == expected
