"""Well-formed PDUs from pynetdicom's encoders, and a raw TCP peer that sends any bytes at all.

The well-formed bytes are the seed the fuzzer mutates: an A-ASSOCIATE-RQ from pynetdicom's
A_ASSOCIATE_RQ.encode(), P-DATA-TF PDUs framed here by PS3.8 9.3.5 (one PDV per PDU), command sets
encoded with pynetdicom's dsutils.encode (implicit VR little endian, group length first).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pynetdicom import dsutils
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 2, 3, 4, 5, 6, 7
RELEASE_RQ = bytes([5, 0, 0, 0, 0, 4, 0, 0, 0, 0])


def associate_rq(calling: str = "FUZZ", called: str = "QRPROXY",
                 contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, (IMPLICIT_LE,)),),
                 max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ PDU; context IDs 1, 3, 5, ... in the order given."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    cxs = []
    for i, (uid, syntaxes) in enumerate(contexts):
        cx = build_context(uid, list(syntaxes))
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    primitive.presentation_context_definition_list = cxs
    item = MaximumLengthNotification()
    item.maximum_length_received = max_pdu
    primitive.user_information = [item]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def pdu(pdu_type: int, body: bytes, length: int | None = None) -> bytes:
    """Any PDU: type, reserved byte, 4-byte length (the true one unless `length` lies)."""
    return struct.pack(">BBL", pdu_type, 0, len(body) if length is None else length) + body


def pdv(context_id: int, control: int, data: bytes, length: int | None = None) -> bytes:
    """One PDV item: length (context ID + control header + data), context ID, control header."""
    return struct.pack(">LBB", len(data) + 2 if length is None else length, context_id, control) + data


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    return pdu(P_DATA_TF, pdv(context_id, control, data))


def command(**elements: object) -> bytes:
    """A command set (implicit VR little endian, with CommandGroupLength)."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = dsutils.encode(ds, True, True)
    assert body is not None
    ds.CommandGroupLength = len(body)
    out = dsutils.encode(ds, True, True)
    assert out is not None
    return out


def echo_rq(message_id: int = 1) -> bytes:
    return command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=message_id,
                   CommandDataSetType=0x0101)


def store_rq(sop_instance: str, message_id: int = 1, sop_class: str = CT_IMAGE) -> bytes:
    return command(AffectedSOPClassUID=sop_class, CommandField=0x0001, MessageID=message_id, Priority=0,
                   CommandDataSetType=0x0000, AffectedSOPInstanceUID=sop_instance)


def find_rq(message_id: int = 1) -> bytes:
    return command(AffectedSOPClassUID=STUDY_ROOT_FIND, CommandField=0x0020, MessageID=message_id,
                   Priority=0, CommandDataSetType=0x0000)


@dataclass
class Pdu:
    type: int
    body: bytes


class RawPeer:
    """A TCP connection that sends whatever it is given and reads PDUs back with a timeout."""

    def __init__(self, host: str, port: int, *, source: str | None = None, timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout

    def send(self, data: bytes) -> bool:
        """False when the peer already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def _exact(self, n: int, deadline: float) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(n - len(buf))
            except (TimeoutError, OSError):
                return None
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def read_pdu(self, timeout: float | None = None, max_body: int = 1 << 24) -> Pdu | None:
        """The next PDU, or None on end of stream, reset or timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        head = self._exact(6, deadline)
        if head is None:
            return None
        pdu_type, _, length = struct.unpack(">BBL", head)
        if length > max_body:
            return None
        body = self._exact(length, deadline)
        return None if body is None else Pdu(pdu_type, body)

    def drain(self, timeout: float = 5.0) -> list[Pdu]:
        """Every PDU until the connection closes or nothing arrives for `timeout`."""
        out = []
        while (p := self.read_pdu(timeout)) is not None:
            out.append(p)
            if p.type in (A_ASSOCIATE_RJ, A_ABORT, A_RELEASE_RP):
                break
        return out

    def closed_by_peer(self, timeout: float = 10.0) -> bool:
        """True once the other side has closed (EOF or reset) within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def accepted_context_ids(ac_body: bytes) -> dict[int, int]:
    """Presentation context ID -> result, from an A-ASSOCIATE-AC body (items 0x21)."""
    out = {}
    i = 68  # protocol version, reserved, called/calling AE titles, reserved
    while i + 4 <= len(ac_body):
        item_type, length = ac_body[i], struct.unpack(">H", ac_body[i + 2:i + 4])[0]
        if item_type == 0x21 and i + 8 <= len(ac_body):
            out[ac_body[i + 4]] = ac_body[i + 6]
        i += 4 + length
    return out


def establish(host: str, port: int, *, calling: str = "FUZZ", called: str = "QRPROXY",
              contexts: Sequence[tuple[str, Sequence[str]]] = ((VERIFICATION, (IMPLICIT_LE,)),),
              source: str | None = None, timeout: float = 10.0) -> tuple[RawPeer, dict[int, int]]:
    """A raw peer with an established association, and the context results of the A-ASSOCIATE-AC."""
    peer = RawPeer(host, port, source=source, timeout=timeout)
    peer.send(associate_rq(calling, called, contexts))
    reply = peer.read_pdu()
    if reply is None or reply.type != A_ASSOCIATE_AC:
        peer.close()
        raise AssertionError(f"association not accepted: {reply}")
    return peer, accepted_context_ids(reply.body)
