"""Size and time limits on what a peer sends, enforced on the socket before pynetdicom buffers it.

pynetdicom's DUL reads a PDU by its 4-byte length field into one bytearray (dul._read_pdu_data), so
a peer announcing and sending a 4 GB P-DATA-TF PDU grows the process by 4 GB whatever maximum
length qrproxy announced; a non-storage data set (a C-FIND identifier, an N-ACTION list) is
assembled in memory too; and an accepted client socket has no timeout, so a peer that stops in the
middle of a PDU holds the DUL thread in recv() for ever (the association's idle timer is only
checked between PDUs).

`GuardedSocket` wraps the accepted socket (through `GuardedRequestHandler`, the request handler
class pynetdicom's AssociationServer takes as a parameter) and follows the PDU and PDV framing of the
bytes it passes up, a few integer updates per recv() call. When a limit is crossed it writes an
A-ABORT PDU itself, logs `event=association-aborted reason=...`, shuts the connection down and
returns end-of-stream, which pynetdicom handles as a closed transport (Evt17): the association ends,
store.on_close removes a partial C-STORE file, the slot is freed. Limits (docs/operations.md "Security and
limits"):

- P-DATA-TF PDU longer than the maximum length qrproxy announced (`max_pdu`, plus one PDV item
  header of tolerance; 0 announces "unlimited", then `UNLIMITED_PDU_CEILING` applies);
- any other PDU longer than `CONTROL_PDU_LIMIT` (an A-ASSOCIATE-RQ with every storage SOP class and
  ten transfer syntaxes each is about 100 KB);
- a command set longer than `COMMAND_LIMIT`; a data set on a storage presentation context longer
  than `store.max_dataset_size` (streamed to disk, so only the disk is at stake); any other data set
  longer than `OTHER_DATASET_LIMIT` (held in memory);
- no byte for `idle_timeout` in the middle of a PDU (between PDUs pynetdicom's own idle timer aborts).
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import RequestHandler

from qrproxy.logs import kv

log = logging.getLogger("qrproxy.assoc")

CONTROL_PDU_LIMIT = 1 << 20
UNLIMITED_PDU_CEILING = 128 << 20
COMMAND_LIMIT = 64 << 10
OTHER_DATASET_LIMIT = 64 << 20
PDV_HEADER = 6  # item length (4), presentation context ID (1), message control header (1)

# A-ABORT PDU (PS3.8 9.3.8): source 0 service-user (qrproxy decided) or 2 service-provider (a bad
# PDU parameter, reason 6 invalid-PDU-parameter-value).
ABORT_USER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x00, 0x00])
ABORT_BAD_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])


@dataclass(frozen=True)
class Limits:
    max_pdu: int  # announced maximum P-DATA-TF length; 0: unlimited
    max_dataset_size: int  # on storage presentation contexts; 0: unlimited
    idle_timeout: float | None


class LimitExceeded(Exception):
    def __init__(self, reason: str, abort: bytes, **fields: Any):
        super().__init__(reason)
        self.reason = reason
        self.abort = abort
        self.fields = fields


# PS3.7 E.1: the command fields pynetdicom can decode; any other value stops its DUL thread with an
# uncaught exception (found by tests/test_fuzz.py), so such a command set is answered A-ABORT here.
COMMAND_FIELDS = frozenset({0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020, 0x0021, 0x8021, 0x0030, 0x8030,
                            0x0100, 0x8100, 0x0110, 0x8110, 0x0120, 0x8120, 0x0130, 0x8130, 0x0140, 0x8140,
                            0x0150, 0x8150, 0x0FFF})


def command_problem(data: bytes) -> str | None:
    """Why a complete command set (implicit VR little endian) cannot be decoded, or None."""
    i, values = 0, {}
    while i < len(data):
        if len(data) - i < 8:
            return "truncated element header"
        group, elem, length = struct.unpack_from("<HHL", data, i)
        i += 8
        if group != 0x0000:
            return f"element ({group:04X},{elem:04X}) outside the command group"
        if length > len(data) - i:
            return f"element (0000,{elem:04X}) runs past the end"
        values[elem] = data[i:i + length]
        i += length
    field = values.get(0x0100)
    if field is None or len(field) != 2 or struct.unpack("<H", field)[0] not in COMMAND_FIELDS:
        return "no known Command Field"
    if len(values.get(0x0800, b"")) != 2:
        return "no Command Data Set Type"
    if field == b"\x01\x00" and not (values.get(0x0002) and values.get(0x1000)):
        return "C-STORE-RQ without Affected SOP Class and Instance UIDs"
    return None


class _Framing:
    """Where the byte stream is: inside a PDU header, a PDV header, or PDV data."""

    def __init__(self, limits: Limits, dataset_limit: Callable[[int], int]):
        self.limits = limits
        self.dataset_limit = dataset_limit
        self.header = bytearray()  # PDU header being read
        self.pdu_type = 0
        self.pdu_left = 0  # bytes of the current PDU body still to come
        self.pdv_header = bytearray()
        self.pdv_left = 0  # data bytes of the current PDV item still to come
        self.pdv_context = 0
        self.pdv_control = 0
        self.command = bytearray()  # the command set being received (at most COMMAND_LIMIT)
        self.message = {0: 0, 1: 0}  # bytes so far of the data set (0) and command set (1) fragments
        self.mid_pdu = False

    def pdu_limit(self, pdu_type: int) -> int:
        if pdu_type != 0x04:
            return CONTROL_PDU_LIMIT
        if self.limits.max_pdu:
            return self.limits.max_pdu + PDV_HEADER
        return UNLIMITED_PDU_CEILING

    def feed(self, data: bytes) -> None:
        i, n = 0, len(data)
        while i < n:
            if self.pdu_left == 0:
                take = min(6 - len(self.header), n - i)
                self.header += data[i:i + take]
                i += take
                self.mid_pdu = True
                if len(self.header) == 6:
                    self.pdu_type, _, length = struct.unpack(">BBL", self.header)
                    self.header.clear()
                    limit = self.pdu_limit(self.pdu_type)
                    if length > limit:
                        raise LimitExceeded("pdu-too-long", ABORT_BAD_PDU, pdu_type=f"0x{self.pdu_type:02X}",
                                            length=length, limit=limit)
                    self.pdu_left = length
                    self.pdv_header.clear()
                    self.pdv_left = 0
                    self.mid_pdu = length > 0
                continue
            take = min(self.pdu_left, n - i)
            if self.pdu_type == 0x04:
                self._pdvs(data, i, i + take)
            i += take
            self.pdu_left -= take
            if self.pdu_left == 0:
                self.mid_pdu = False

    def _pdvs(self, data: bytes, i: int, end: int) -> None:
        while i < end:
            if self.pdv_left == 0 and len(self.pdv_header) < PDV_HEADER:
                take = min(PDV_HEADER - len(self.pdv_header), end - i)
                self.pdv_header += data[i:i + take]
                i += take
                if len(self.pdv_header) == PDV_HEADER:
                    length, self.pdv_context, self.pdv_control = struct.unpack(">LBB", self.pdv_header)
                    # A malformed item (length below 2) is pynetdicom's to report; count what is there.
                    self.pdv_left = max(0, length - 2)
                    self._count(self.pdv_left)
                    if self.pdv_left == 0:
                        self.pdv_header.clear()
                        self._command_done()
                continue
            take = min(self.pdv_left, end - i)
            if self.pdv_control & 0x01:
                self.command += data[i:i + take]
            i += take
            self.pdv_left -= take
            if self.pdv_left == 0:
                self.pdv_header.clear()
                self._command_done()

    def _command_done(self) -> None:
        if self.pdv_control & 0x03 == 0x03:
            problem = command_problem(bytes(self.command))
            self.command.clear()
            if problem:
                raise LimitExceeded("bad-command-set", ABORT_BAD_PDU, detail=problem)

    def _count(self, size: int) -> None:
        is_command = self.pdv_control & 0x01
        total = self.message[is_command] + size
        if is_command:
            limit = COMMAND_LIMIT
        else:
            limit = self.dataset_limit(self.pdv_context)
        if limit and total > limit:
            what = "command-too-long" if is_command else "dataset-too-large"
            raise LimitExceeded(what, ABORT_USER, context=self.pdv_context, bytes=total, limit=limit)
        self.message[is_command] = 0 if self.pdv_control & 0x02 else total


class GuardedSocket:
    """The accepted socket as pynetdicom's AssociationSocket uses it, with the limits above."""

    def __init__(self, sock: socket.socket, limits: Limits, peer: str):
        self._sock = sock
        self._limits = limits
        self._peer = peer
        self._closed = False
        self.storage_contexts: set[int] | None = None  # set by on_established; None: not yet known
        self._framing = _Framing(limits, self._dataset_limit)
        if limits.idle_timeout:
            sock.settimeout(limits.idle_timeout)

    def _dataset_limit(self, context_id: int) -> int:
        if self.storage_contexts is not None and context_id in self.storage_contexts:
            return self._limits.max_dataset_size
        return OTHER_DATASET_LIMIT

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def settimeout(self, value: float | None) -> None:
        """pynetdicom clears the timeout after its connect phase; a stalled peer must still time out."""
        self._sock.settimeout(self._limits.idle_timeout or value)

    def _abort(self, reason: str, abort: bytes, **fields: Any) -> bytes:
        log.warning(kv(event="association-aborted", reason=reason, peer=self._peer, **fields))
        self._closed = True
        try:
            self._sock.settimeout(1.0)
            self._sock.sendall(abort)
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        return b""

    def recv(self, bufsize: int, *args: Any) -> bytes:
        if self._closed:
            return b""
        try:
            data = self._sock.recv(bufsize, *args)
        except TimeoutError:
            reason = "idle-timeout-mid-pdu" if self._framing.mid_pdu else "idle-timeout"
            return self._abort(reason, ABORT_USER, timeout=self._limits.idle_timeout)
        try:
            self._framing.feed(data)
        except LimitExceeded as exc:
            return self._abort(exc.reason, exc.abort, **exc.fields)
        return data


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler with the accepted socket wrapped in a GuardedSocket. The limits
    come from the server (`Server.limits` in app.py)."""

    def setup(self) -> None:
        super().setup()
        limits = getattr(self.server, "limits", None)
        if limits is not None:
            host, port = self.client_address[0], self.client_address[1]
            self.request = GuardedSocket(self.request, limits, f"{host}:{port}")


def on_established(event: Any, storage_uids: set[str]) -> None:
    """Tell the association's GuardedSocket which context IDs carry storage SOP classes (their data
    sets are streamed to disk and bounded by store.max_dataset_size)."""
    assoc = event.assoc
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, GuardedSocket):
        sock.storage_contexts = {
            int(cx.context_id) for cx in assoc.accepted_contexts if str(cx.abstract_syntax) in storage_uids
        }


class _OneLineExceptions(logging.Filter):
    """pynetdicom logs a full traceback (LOGGER.exception) for every PDU it cannot decode and every
    connection a peer resets; it then answers A-ABORT as PS3.8 prescribes, so nothing is wrong in
    qrproxy. The traceback becomes one line ("...: ValueError: ..."), so the log of a port scan or
    a broken modality stays readable and a real qrproxy traceback still stands out."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {str(exc)[:200]})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_peer_errors() -> None:
    """Install the filter on every pynetdicom logger (a logger's filters see only its own records)."""
    flt = _OneLineExceptions()
    for name in list(logging.root.manager.loggerDict):
        if name == "pynetdicom" or name.startswith("pynetdicom."):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _OneLineExceptions) for f in logger.filters):
                logger.addFilter(flt)
