"""The command sets pynetdicom_tuning writes itself must be byte for byte what pynetdicom's own DIMSE
encoder writes for the same primitive (they replace it on the wire for speed)."""

from __future__ import annotations

from io import BytesIO

from pynetdicom.dimse_messages import C_MOVE_RSP, C_GET_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode

from qrproxy.net.tuning import retrieve_pending_command, store_command


def _pynetdicom_command(message, primitive) -> bytes:  # type: ignore[no-untyped-def]
    message.primitive_to_message(primitive)
    message._set_command_group_length()
    return encode(message.command_set, True, True)  # type: ignore[return-value]


def test_store_command_matches_pynetdicom() -> None:
    for originator in (None, "MOVER"):
        req = C_STORE()
        req.MessageID = 4321
        req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.123"  # odd length: padded
        req.Priority = 2
        req.MoveOriginatorApplicationEntityTitle = originator
        req.MoveOriginatorMessageID = 7 if originator else None
        req.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")  # a data set follows
        ours = store_command(str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID), 4321, 2,
                             originator, 7 if originator else None)
        assert ours == _pynetdicom_command(C_STORE_RQ(), req)


def test_pending_retrieve_commands_match_pynetdicom() -> None:
    for cls, message, field, uid in ((C_MOVE, C_MOVE_RSP, 0x8021, "1.2.840.10008.5.1.4.1.2.2.2"),
                                      (C_GET, C_GET_RSP, 0x8010, "1.2.840.10008.5.1.4.1.2.1.3")):
        rsp = cls()
        rsp.MessageIDBeingRespondedTo = 9
        rsp.AffectedSOPClassUID = uid
        rsp.Status = 0xFF00
        rsp.NumberOfRemainingSuboperations = 97
        rsp.NumberOfCompletedSuboperations = 2
        rsp.NumberOfFailedSuboperations = 1
        rsp.NumberOfWarningSuboperations = 0
        ours = retrieve_pending_command(uid, 9, field, 0xFF00, 97, 2, 1, 0)
        assert ours == _pynetdicom_command(message(), rsp)
