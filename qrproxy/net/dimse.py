"""PS3.7 section 9 and 10 and annex E: the DIMSE command set (group 0000), encoded and decoded here.

A command set is always implicit VR little endian and holds at most two dozen known elements, so
it is a dict of keywords to Python values (`Command`), encoded with `struct` in tag order with its
group length first. The hot responses (C-STORE-RSP Success, C-FIND-RSP Pending) are a handful of
bytes that change only in their message ID: `response()` builds them without any pydicom object.

Data sets (identifiers, N-ACTION information, ...) are decoded with pydicom's `read_dataset` in
the presentation context's transfer syntax, only when a service asks for them.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
NO_DATASET = 0x0101

# (element of group 0000) -> (keyword, VR); PS3.7 E.1 and E.2 (the retired elements are ignored).
ELEMENTS: dict[int, tuple[str, str]] = {
    0x0000: ("CommandGroupLength", "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0003: ("RequestedSOPClassUID", "UI"),
    0x0100: ("CommandField", "US"),
    0x0110: ("MessageID", "US"),
    0x0120: ("MessageIDBeingRespondedTo", "US"),
    0x0600: ("MoveDestination", "AE"),
    0x0700: ("Priority", "US"),
    0x0800: ("CommandDataSetType", "US"),
    0x0900: ("Status", "US"),
    0x0901: ("OffendingElement", "AT"),
    0x0902: ("ErrorComment", "LO"),
    0x0903: ("ErrorID", "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1001: ("RequestedSOPInstanceUID", "UI"),
    0x1002: ("EventTypeID", "US"),
    0x1005: ("AttributeIdentifierList", "AT"),
    0x1008: ("ActionTypeID", "US"),
    0x1020: ("NumberOfRemainingSuboperations", "US"),
    0x1021: ("NumberOfCompletedSuboperations", "US"),
    0x1022: ("NumberOfFailedSuboperations", "US"),
    0x1023: ("NumberOfWarningSuboperations", "US"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),
    0x1031: ("MoveOriginatorMessageID", "US"),
}
TAGS: dict[str, tuple[int, str]] = {kw: (elem, vr) for elem, (kw, vr) in ELEMENTS.items()}

# PS3.7 E.1 Command Field values.
C_STORE, C_GET, C_FIND, C_MOVE, C_ECHO, C_CANCEL = 0x0001, 0x0010, 0x0020, 0x0021, 0x0030, 0x0FFF
N_EVENT_REPORT, N_GET, N_SET, N_ACTION, N_CREATE, N_DELETE = 0x0100, 0x0110, 0x0120, 0x0130, 0x0140, 0x0150
RESPONSE = 0x8000
NAMES = {C_STORE: "C-STORE", C_GET: "C-GET", C_FIND: "C-FIND", C_MOVE: "C-MOVE", C_ECHO: "C-ECHO",
         C_CANCEL: "C-CANCEL", N_EVENT_REPORT: "N-EVENT-REPORT", N_GET: "N-GET", N_SET: "N-SET",
         N_ACTION: "N-ACTION", N_CREATE: "N-CREATE", N_DELETE: "N-DELETE"}
KNOWN_FIELDS = frozenset(NAMES) | frozenset(f | RESPONSE for f in NAMES if f != C_CANCEL)

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
CANCEL = 0xFE00


class CommandError(ValueError):
    """A command set that cannot be decoded or lacks what its command requires."""


class Command(dict):  # type: ignore[type-arg]
    """A decoded command set: keyword -> value; a missing element reads as None, as in pynetdicom's
    primitives, so services can say `cmd.MoveDestination` without guarding."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)

    @property
    def field(self) -> int:
        return int(self.get("CommandField") or 0)

    @property
    def name(self) -> str:
        f = self.field
        base = NAMES.get(f & ~RESPONSE, f"0x{f:04X}")
        return base + ("-RSP" if f & RESPONSE else "-RQ")

    @property
    def is_response(self) -> bool:
        return bool(self.field & RESPONSE) and self.field != C_CANCEL

    @property
    def has_dataset(self) -> bool:
        return self.get("CommandDataSetType", NO_DATASET) != NO_DATASET


_ELEMENT = struct.Struct("<HHL")


def decode(data: bytes | memoryview) -> Command:
    """A command set (implicit VR little endian) into a Command; CommandError when it is malformed,
    holds elements outside group 0000, or has no known Command Field."""
    cmd = Command()
    i, n = 0, len(data)
    while i < n:
        if n - i < 8:
            raise CommandError("truncated element header")
        group, elem, length = _ELEMENT.unpack_from(data, i)
        i += 8
        if group != 0:
            raise CommandError(f"element ({group:04X},{elem:04X}) outside the command group")
        if length > n - i:
            raise CommandError(f"element (0000,{elem:04X}) runs past the end")
        raw = bytes(data[i:i + length])
        i += length
        known = ELEMENTS.get(elem)
        if known is None:
            continue
        keyword, vr = known
        try:
            if vr == "US":
                if length != 2:
                    raise CommandError(f"{keyword} is {length} bytes, not 2")
                cmd[keyword] = struct.unpack("<H", raw)[0]
            elif vr == "UL":
                cmd[keyword] = struct.unpack("<L", raw)[0] if length == 4 else 0
            elif vr == "AT":
                cmd[keyword] = [struct.unpack_from("<HH", raw, k) for k in range(0, length - length % 4, 4)]
            else:
                cmd[keyword] = raw.rstrip(b"\0 ").decode("ascii", "replace").lstrip() if vr != "LO" else \
                    raw.decode("latin-1").strip("\0 ")
        except struct.error as exc:
            raise CommandError(f"{keyword}: {exc}") from None
    if cmd.get("CommandField") not in KNOWN_FIELDS:
        raise CommandError("no known Command Field")
    if "CommandDataSetType" not in cmd:
        raise CommandError("no Command Data Set Type")
    f = cmd.field
    if f == C_STORE and not (cmd.get("AffectedSOPClassUID") and cmd.get("AffectedSOPInstanceUID")):
        raise CommandError("C-STORE-RQ without Affected SOP Class and Instance UIDs")
    if not f & RESPONSE and f != C_CANCEL and "MessageID" not in cmd:
        raise CommandError("request without Message ID")
    return cmd


def _value(vr: str, value: Any) -> bytes:
    if vr == "US":
        return struct.pack("<H", int(value) & 0xFFFF)
    if vr == "UL":
        return struct.pack("<L", int(value))
    if vr == "AT":
        return b"".join(struct.pack("<HH", int(g), int(e)) for g, e in value)
    raw = str(value).encode("ascii" if vr != "LO" else "latin-1", "replace")
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def encode(fields: dict[str, Any]) -> bytes:
    """A command set from keyword -> value (None values are left out), group length first."""
    parts = []
    for elem, (kw, vr) in sorted(ELEMENTS.items()):
        if elem == 0:
            continue
        value = fields.get(kw)
        if value is None:
            continue
        raw = _value(vr, value)
        parts.append(_ELEMENT.pack(0, elem, len(raw)) + raw)
    body = b"".join(parts)
    return _ELEMENT.pack(0, 0, 4) + struct.pack("<L", len(body)) + body


def response(request: Command, status: int, has_dataset: bool = False, **extra: Any) -> bytes:
    """The response command set to `request` (PS3.7 9.3 / 10.3): its class and instance echoed as
    the response of that command defines them, plus `extra` (ErrorComment, sub-operation counts)."""
    f = request.field
    fields: dict[str, Any] = {
        "CommandField": f | RESPONSE,
        "MessageIDBeingRespondedTo": request.get("MessageID", 0),
        "CommandDataSetType": 0x0001 if has_dataset else NO_DATASET,
        "Status": status,
    }
    if f in (N_SET, N_ACTION, N_GET, N_DELETE):
        fields["AffectedSOPClassUID"] = request.get("RequestedSOPClassUID")
        fields["AffectedSOPInstanceUID"] = request.get("RequestedSOPInstanceUID")
    else:
        fields["AffectedSOPClassUID"] = request.get("AffectedSOPClassUID")
        if f in (C_STORE, N_EVENT_REPORT, N_CREATE):
            fields["AffectedSOPInstanceUID"] = request.get("AffectedSOPInstanceUID")
    if f == N_EVENT_REPORT:
        fields["EventTypeID"] = request.get("EventTypeID")
    if f == N_ACTION:
        fields["ActionTypeID"] = request.get("ActionTypeID")
    fields.update({k: v for k, v in extra.items() if v is not None})
    return encode(fields)


def status_fields(status: Any) -> tuple[int, dict[str, Any]]:
    """(status code, extra command elements) from what a service returns: an int, or a Dataset
    with Status and the optional ErrorComment / OffendingElement / ErrorID (PS3.7 C)."""
    if isinstance(status, Dataset):
        extra: dict[str, Any] = {}
        if "ErrorComment" in status and status.ErrorComment:
            extra["ErrorComment"] = str(status.ErrorComment)[:64]
        if "ErrorID" in status and status.ErrorID is not None:
            extra["ErrorID"] = int(status.ErrorID)
        if "OffendingElement" in status and status.OffendingElement:
            tags = status.OffendingElement
            tags = tags if isinstance(tags, (list, tuple)) or hasattr(tags, "__iter__") and not isinstance(tags, int) else [tags]
            extra["OffendingElement"] = [(int(t) >> 16, int(t) & 0xFFFF) for t in tags]
        return int(status.Status), extra
    return int(status), {}


def status_dataset(cmd: Command) -> Dataset:
    """A response's status as pynetdicom's SCU calls return it: a Dataset with Status and whatever
    of ErrorComment, sub-operation counts and the rest the peer sent."""
    ds = Dataset()
    ds.Status = int(cmd.get("Status") or 0)
    for kw in ("ErrorComment", "ErrorID", "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
               "NumberOfFailedSuboperations", "NumberOfWarningSuboperations", "AffectedSOPInstanceUID"):
        if cmd.get(kw) is not None:
            setattr(ds, kw, cmd[kw])
    return ds


def decode_dataset(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """A data set (no file meta) in `transfer_syntax`; deflated data sets are inflated first."""
    raw = bytes(data)
    if transfer_syntax == "1.2.840.10008.1.2.1.99":
        import zlib

        raw = zlib.decompress(raw, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(raw), transfer_syntax == IMPLICIT_LE, transfer_syntax != EXPLICIT_BE)


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_implicit_VR = transfer_syntax == IMPLICIT_LE
    fp.is_little_endian = transfer_syntax != EXPLICIT_BE
    write_dataset(fp, ds)
    raw = fp.getvalue()
    if transfer_syntax == "1.2.840.10008.1.2.1.99":
        import zlib

        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        raw = c.compress(raw) + c.flush()
    return raw
