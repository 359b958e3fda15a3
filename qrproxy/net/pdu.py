"""PS3.8 section 9: the seven PDUs, their encoding and decoding, and the reader that frames them.

Owned here rather than taken from pynetdicom's PDU classes: an A-ASSOCIATE-RQ of a modality that
offers every storage class is a few hundred items, and pynetdicom's item objects (one per item,
each UID a pydicom UID) cost milliseconds per association; the decode below is a loop over a
bytes object. Everything is decoded defensively: a malformed PDU raises `PduError` with what is
wrong, which the association answers with A-ABORT (source 2, reason given), never a traceback.

`Reader` reads PDUs with `recv_into` into one buffer it reuses for the whole association (64 KiB to
start, so an association that only echoes or queries costs no megabyte to zero; grown to twice the
largest PDU seen) and hands out memoryview slices of it: a P-DATA-TF body is never copied before its PDVs reach their writer.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
PDU_NAMES = {1: "A-ASSOCIATE-RQ", 2: "A-ASSOCIATE-AC", 3: "A-ASSOCIATE-RJ", 4: "P-DATA-TF", 5: "A-RELEASE-RQ",
             6: "A-RELEASE-RP", 7: "A-ABORT"}
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = "2.25.96965431911597784823854078164390277088"  # UUID v5 (ISO/IEC 9834-8): unique without a registered root
IMPLEMENTATION_VERSION = "QRPROXY_2"

CONTROL_PDU_LIMIT = 1 << 20  # any PDU but P-DATA-TF (every storage class, ten syntaxes each: ~100 KB)
UNLIMITED_PDU_CEILING = 128 << 20  # a P-DATA-TF when "unlimited" (0) was announced
PDV_HEADER = 6  # item length (4), presentation context ID (1), message control header (1)

_HEADER = struct.Struct(">BBL")
_PDV = struct.Struct(">LBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">L")

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result, source, reason/diag.
REJECTED_PERMANENT, REJECTED_TRANSIENT = 1, 2
# A-ABORT (PS3.8 9.3.8) source: 0 service-user, 2 service-provider; reasons for source 2.
ABORT_USER, ABORT_PROVIDER = 0, 2
REASON_NOT_SPECIFIED, UNRECOGNIZED_PDU, UNEXPECTED_PDU, UNRECOGNIZED_PARAMETER, UNEXPECTED_PARAMETER, \
    INVALID_PARAMETER = 0, 1, 2, 4, 5, 6


class PduError(Exception):
    """A PDU that breaks PS3.8: answered with A-ABORT from the service provider with `reason`."""

    def __init__(self, detail: str, reason: int = INVALID_PARAMETER):
        super().__init__(detail)
        self.reason = reason


class PeerClosed(ConnectionError):
    """The peer closed the connection (end of stream) where a PDU was expected."""


# --- A-ASSOCIATE ---------------------------------------------------------------------------------


@dataclass
class Context:
    """A presentation context: as proposed (`transfer_syntaxes` offered), or as negotiated (`result`
    0 accepted with `transfer_syntax`, 1 user-rejected, 2 no reason, 3 abstract syntax not supported,
    4 transfer syntaxes not supported). `as_scu`/`as_scp` are this side's roles on it."""

    context_id: int
    abstract_syntax: str = ""
    transfer_syntaxes: list[str] = field(default_factory=list)
    result: int = 0
    transfer_syntax: str = ""
    as_scu: bool = True
    as_scp: bool = True

    @property
    def accepted(self) -> bool:
        return self.result == 0


@dataclass
class UserIdentity:
    kind: int  # 1 username, 2 username+passcode, 3 Kerberos, 4 SAML, 5 JWT
    response_requested: bool
    primary: bytes
    secondary: bytes = b""


@dataclass
class Associate:
    """An A-ASSOCIATE-RQ or -AC, decoded (PS3.8 9.3.2, 9.3.3 and annex D)."""

    called: str = ""
    calling: str = ""
    application_context: str = APPLICATION_CONTEXT
    contexts: list[Context] = field(default_factory=list)
    max_length: int = 0  # 0: no limit
    implementation_uid: str = ""
    implementation_version: str = ""
    async_window: tuple[int, int] | None = None  # (invoked, performed)
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)  # SOP class -> (SCU, SCP)
    extended: dict[str, bytes] = field(default_factory=dict)  # SOP class extended negotiation
    common_extended: list[bytes] = field(default_factory=list)  # raw 0x57 items (acknowledged by omission)
    user_identity: UserIdentity | None = None
    identity_response: bytes | None = None  # AC only: the server response (0x59)


def _uid(raw: bytes | memoryview) -> str:
    return bytes(raw).rstrip(b"\0 ").decode("ascii", "replace")


def _ae(raw: bytes | memoryview) -> str:
    return bytes(raw).decode("ascii", "replace").strip()


def _items(body: memoryview, start: int, end: int, header: int = 4):
    """(type, memoryview of the value) for each item in body[start:end]; header 4: type, reserved,
    2-byte length."""
    i = start
    while i < end:
        if end - i < header:
            raise PduError("truncated item header")
        kind = body[i]
        (length,) = _U16.unpack_from(body, i + 2)
        if i + header + length > end:
            raise PduError(f"item 0x{kind:02X} runs past the end of its PDU")
        yield kind, body[i + header:i + header + length]
        i += header + length


def decode_associate(body: memoryview, kind: int) -> Associate:
    """The body of an A-ASSOCIATE-RQ (`kind` 1) or -AC (2), after the 6-byte PDU header."""
    if len(body) < 68:
        raise PduError("A-ASSOCIATE shorter than its fixed fields")
    a = Associate(called=_ae(body[4:20]), calling=_ae(body[20:36]))
    seen_context_ids: set[int] = set()
    for item, value in _items(body, 68, len(body)):
        if item == 0x10:
            a.application_context = _uid(value)
        elif item in (0x20, 0x21):
            if len(value) < 4:
                raise PduError("presentation context item too short")
            cx = Context(context_id=value[0])
            if item == 0x21:
                cx.result = value[2]
            if kind == ASSOCIATE_RQ and (cx.context_id % 2 == 0 or cx.context_id in seen_context_ids):
                raise PduError(f"presentation context ID {cx.context_id} is even or repeated")
            seen_context_ids.add(cx.context_id)
            for sub, sv in _items(value, 4, len(value)):
                if sub == 0x30:
                    cx.abstract_syntax = _uid(sv)
                elif sub == 0x40:
                    cx.transfer_syntaxes.append(_uid(sv))
                    if item == 0x21:
                        cx.transfer_syntax = _uid(sv)
            a.contexts.append(cx)
        elif item == 0x50:
            _user_information(a, value)
    return a


def _user_information(a: Associate, value: memoryview) -> None:
    for sub, sv in _items(value, 0, len(value)):
        if sub == 0x51:
            if len(sv) != 4:
                raise PduError("maximum length item is not 4 bytes")
            (a.max_length,) = _U32.unpack_from(sv)
        elif sub == 0x52:
            a.implementation_uid = _uid(sv)
        elif sub == 0x55:
            a.implementation_version = _ae(sv)
        elif sub == 0x53 and len(sv) == 4:
            a.async_window = (_U16.unpack_from(sv)[0], _U16.unpack_from(sv, 2)[0])
        elif sub == 0x54:
            if len(sv) < 4:
                raise PduError("role selection item too short")
            (n,) = _U16.unpack_from(sv)
            if len(sv) < 2 + n + 2:
                raise PduError("role selection item too short")
            a.roles[_uid(sv[2:2 + n])] = (bool(sv[2 + n]), bool(sv[3 + n]))
        elif sub == 0x56:
            if len(sv) >= 2:
                (n,) = _U16.unpack_from(sv)
                a.extended[_uid(sv[2:2 + n])] = bytes(sv[2 + n:])
        elif sub == 0x57:
            a.common_extended.append(bytes(sv))
        elif sub == 0x58:
            if len(sv) < 6:
                raise PduError("user identity item too short")
            kind, rsp = sv[0], sv[1]
            (n,) = _U16.unpack_from(sv, 2)
            if len(sv) < 4 + n + 2:
                raise PduError("user identity item too short")
            primary = bytes(sv[4:4 + n])
            (m,) = _U16.unpack_from(sv, 4 + n)
            a.user_identity = UserIdentity(kind, bool(rsp), primary, bytes(sv[6 + n:6 + n + m]))
        elif sub == 0x59 and len(sv) >= 2:
            (n,) = _U16.unpack_from(sv)
            a.identity_response = bytes(sv[2:2 + n])


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def _ae_field(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def _uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii", "replace")


def encode_associate(a: Associate, kind: int) -> bytes:
    """An A-ASSOCIATE-RQ (`kind` 1) or -AC (2) PDU. For the AC, each context's `result` and
    `transfer_syntax` are sent; for the RQ, its offered `transfer_syntaxes`."""
    parts = [_item(0x10, _uid_bytes(a.application_context))]
    for cx in a.contexts:
        if kind == ASSOCIATE_RQ:
            sub = _item(0x30, _uid_bytes(cx.abstract_syntax))
            sub += b"".join(_item(0x40, _uid_bytes(ts)) for ts in cx.transfer_syntaxes)
            parts.append(_item(0x20, bytes([cx.context_id, 0, 0, 0]) + sub))
        else:
            ts = cx.transfer_syntax or (cx.transfer_syntaxes[0] if cx.transfer_syntaxes else "")
            sub = _item(0x40, _uid_bytes(ts))
            parts.append(_item(0x21, bytes([cx.context_id, 0, cx.result, 0]) + sub))
    user = [_item(0x51, _U32.pack(a.max_length)), _item(0x52, _uid_bytes(a.implementation_uid or IMPLEMENTATION_UID))]
    if a.async_window is not None:
        user.append(_item(0x53, struct.pack(">HH", *a.async_window)))
    for uid, (scu, scp) in a.roles.items():
        u = _uid_bytes(uid)
        user.append(_item(0x54, _U16.pack(len(u)) + u + bytes([int(scu), int(scp)])))
    version = a.implementation_version or IMPLEMENTATION_VERSION
    user.append(_item(0x55, version.encode("ascii")[:16]))
    for uid, info in a.extended.items():
        u = _uid_bytes(uid)
        user.append(_item(0x56, _U16.pack(len(u)) + u + info))
    if kind == ASSOCIATE_RQ and a.user_identity is not None:
        ui = a.user_identity
        user.append(_item(0x58, bytes([ui.kind, int(ui.response_requested)]) + _U16.pack(len(ui.primary))
                          + ui.primary + _U16.pack(len(ui.secondary)) + ui.secondary))
    if kind == ASSOCIATE_AC and a.identity_response is not None:
        user.append(_item(0x59, _U16.pack(len(a.identity_response)) + a.identity_response))
    parts.append(_item(0x50, b"".join(user)))
    body = (_U16.pack(1) + b"\0\0" + _ae_field(a.called) + _ae_field(a.calling) + bytes(32) + b"".join(parts))
    return _HEADER.pack(kind, 0, len(body)) + body


def encode_reject(result: int, source: int, reason: int) -> bytes:
    return _HEADER.pack(ASSOCIATE_RJ, 0, 4) + bytes([0, result, source, reason])


def encode_abort(source: int = ABORT_USER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    return _HEADER.pack(ABORT, 0, 4) + bytes([0, 0, source, reason if source == ABORT_PROVIDER else 0])


RELEASE_RQ_PDU = _HEADER.pack(RELEASE_RQ, 0, 4) + bytes(4)
RELEASE_RP_PDU = _HEADER.pack(RELEASE_RP, 0, 4) + bytes(4)


def pdv_header(context_id: int, control: int, length: int) -> bytes:
    """A P-DATA-TF PDU header holding one PDV of `length` data bytes (PS3.8 9.3.5, E.2)."""
    return struct.pack(">BBLLBB", P_DATA_TF, 0, length + PDV_HEADER, length + 2, context_id, control)


def pdvs(body: memoryview):
    """(context ID, control header, data) of each PDV item of a P-DATA-TF body; data is a slice."""
    i, end = 0, len(body)
    if end == 0:
        raise PduError("P-DATA-TF without a presentation data value")
    while i < end:
        if end - i < PDV_HEADER:
            raise PduError("truncated PDV item header")
        length, context_id, control = _PDV.unpack_from(body, i)
        if length < 2 or i + 4 + length > end:
            raise PduError(f"PDV item length {length} does not fit its PDU")
        if control & 0xFC:
            raise PduError(f"PDV message control header 0x{control:02X} has reserved bits set")
        yield context_id, control, body[i + PDV_HEADER:i + 4 + length]
        i += 4 + length


# --- reading ---------------------------------------------------------------------------------------


class TooLong(PduError):
    def __init__(self, kind: int, length: int, limit: int):
        super().__init__(f"{PDU_NAMES.get(kind, hex(kind))} of {length} bytes, limit {limit}")
        self.kind, self.length, self.limit = kind, length, limit


class Reader:
    """PDUs from a socket, each as (type, memoryview body) valid until the next `read()`.

    One buffer, reused: `recv_into` fills it from `end`, a PDU is handed out as a slice, and the
    bytes after it (the start of the next PDU, read in the same call) are moved to the front only
    when the room left is too small for the next PDU. The socket's timeout bounds every wait, mid-PDU
    included (a peer that stops in the middle of a PDU)."""

    def __init__(self, sock: socket.socket, max_pdu: int, size: int = 64 << 10):
        self.sock = sock
        self.max_pdu = max_pdu  # what this side announced; 0: unlimited
        self.buf = bytearray(max(size, 64 << 10))
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0

    def buffered(self) -> bool:
        return self.end > self.start

    def limit(self, kind: int) -> int:
        if kind != P_DATA_TF:
            return CONTROL_PDU_LIMIT
        return self.max_pdu + PDV_HEADER if self.max_pdu else UNLIMITED_PDU_CEILING

    def _fill(self, need: int) -> None:
        """Make at least `need` bytes available from `start`."""
        if self.start + need > len(self.buf):
            if need > len(self.buf):
                # room for the PDU and the next one's start: large PDUs keep large reads
                grown = bytearray(max(2 * need, 2 * len(self.buf)))
                grown[:self.end - self.start] = self.view[self.start:self.end]
                self.buf = grown
                self.view = memoryview(self.buf)
            else:
                self.buf[:self.end - self.start] = bytes(self.view[self.start:self.end])
            self.end -= self.start
            self.start = 0
        while self.end - self.start < need:
            n = self.sock.recv_into(self.view[self.end:])
            if n == 0:
                raise PeerClosed("the peer closed the connection" + (" in the middle of a PDU"
                                                                    if self.end > self.start else ""))
            self.end += n

    def read(self) -> tuple[int, memoryview]:
        self._fill(6)
        kind, _, length = _HEADER.unpack_from(self.buf, self.start)
        if kind not in PDU_NAMES:
            raise PduError(f"unknown PDU type 0x{kind:02X}", UNRECOGNIZED_PDU)
        limit = self.limit(kind)
        if length > limit:
            raise TooLong(kind, length, limit)
        self._fill(6 + length)
        body = self.view[self.start + 6:self.start + 6 + length]
        self.start += 6 + length
        if self.start == self.end:
            self.start = self.end = 0
        return kind, body
