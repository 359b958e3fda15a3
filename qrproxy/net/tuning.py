"""The one place where qrproxy reaches into pynetdicom internals, each with the measurement that
justifies it. Everything else uses pynetdicom's public API and event handlers.

Bounded send queue
    pynetdicom's DIMSE layer turns a dataset into P-DATA PDUs with a generator and puts each one on
    the DUL's `to_provider_queue`, an unbounded queue.Queue, while the DUL thread drains it at socket
    speed. Sending a spool file (STORE_SEND_CHUNKED_DATASET) reads the disk faster than the network
    takes it, so the whole instance piles up in memory: forwarding a 315 MB instance grew the
    process by 187 MB (tests/test_large_instance.py). A bounded queue makes `put()` block, which is
    the backpressure the generator lacks; RSS growth drops to a few MB.

Responses kept from the reactor
    On associations qrproxy opens, pynetdicom's reactor thread polls the DIMSE queue to serve requests
    from the peer and can take the response to our next request (pynetdicom #875); against Orthanc
    about one C-FIND in 40 lost a match. Applied to every association qrproxy opens.

Letting the peer speak
    The DUL loop reads the socket only when it has nothing to send. A C-FIND handler yielding
    thousands of pending responses keeps the send queue full, so a C-CANCEL stays unread until the
    last response is out (5000 matches: never cancelled). Pausing every few dozen responses until the
    queue is empty gives the DUL a turn to read.

Pending responses written as P-DATA
    pynetdicom's C-FIND service turns each yielded identifier into a pydicom Dataset write and each
    response primitive into a command Dataset write plus two P-DATA PDUs. For a 5000-study answer
    that was 6 of the 7.5 s the association thread spent (py-spy: 4 s in pydicom's write_dataset,
    1.2 s in the command set's group length). `send_pending` puts one P-DATA primitive holding the
    already encoded command set and identifier (two PDVs of one message, PS3.8 E.2) on the same DUL
    queue pynetdicom's own `send_msg` uses, so ordering with the final response it sends is kept and
    the state machine still frames and sends every PDU. One message per PDU: pynetdicom as a
    receiver drops PDVs that follow a complete message in the same PDU.

Cheap copies of presentation contexts
    Every accepted association deep-copies the server's supported contexts (transport.py,
    RequestHandler._create_association). qrproxy accepts every storage SOP class with every transfer
    syntax, several thousand UID objects: py-spy measured 0.13 s of deepcopy per association, more
    than a whole single-match C-FIND. `cheap_context_copies` gives PresentationContext a
    `__deepcopy__` that copies its fields and its transfer syntax list but shares the UIDs (immutable
    str subclasses), which is what the deep copy achieved.

Encrypted spool files (encryption.key_file)
    With STORE_RECV_CHUNKED_DATASET, pynetdicom's DIMSE layer writes each received data set to a file
    it creates itself, `tempfile.NamedTemporaryFile(delete=False)` in dimse_messages, fragment by
    fragment as P-DATA arrives; its handler API only ever sees the finished path. Nothing public lets
    those bytes be encrypted on the way to disk, and patient data must never rest there in clear, so
    that module's `NamedTemporaryFile` is replaced by a factory returning an encrypting writer in
    spool/incoming/ (same `name`/`write`/`file.flush`/`close` surface). The sending side reads a file
    it is given by path with the builtin `open` in dsutils.split_dataset and
    dimse_messages.encode_msg; there `open` is shadowed by one that returns the decrypted stream of a
    spool file, so forwarding still streams from disk chunk by chunk (a Dataset instead of a path
    would be encoded whole in memory). Both are process-wide and installed only when encryption is on.

C-STORE sub-operations written straight to the socket (C-MOVE / C-GET)
    pynetdicom's C-MOVE service only sends what the handler yields as a Dataset, which it encodes
    whole and hands to the DUL thread as one P-DATA primitive per PDU (max PDU 16 KiB at DCMTK
    storescp and Orthanc: 32 PDUs per 512 KiB CT image, each through the state machine). bench/move
    measured 14 ms per CT instance, 0.22x Orthanc's img/s. `FastStore` keeps pynetdicom's sub-
    operation machinery (counts, pending responses, Failed SOP Instance UID List, C-CANCEL) and only
    replaces, on that one association, send_c_store for the instances announced with `expect()`:
    its command set encoded here, the data set read from the spool file after the file meta
    information, both framed as P-DATA-TF PDUs of the peer's maximum length and written with
    sendall from the sending thread, then the response taken from the DIMSE queue as pynetdicom
    does, without pynetdicom's pause of the association reactor (on the destination association
    keep_responses_from_reactor already keeps it off the queue; on a C-GET association it is the
    thread running the handler). The DUL thread keeps reading; nothing else sends on the
    association while a sub-operation is out. The pending C-MOVE / C-GET responses after each
    sub-operation are queued as one P-DATA like C-FIND's (`fast_retrieve_pending`): pynetdicom's
    encoding of each response command set, group length included, cost about 1 ms.
    Together: local C-MOVE 70 -> 179 img/s (bench/move, 100 CT instances; Orthanc 435).
"""

from __future__ import annotations

import builtins
import os
import queue
import select
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, BinaryIO

from pynetdicom import _config, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

PENDING_AHEAD = 64  # C-FIND pending responses queued ahead of the DUL thread
SEND_QUEUE_PDUS = 16  # x max PDU size (<= 256 KiB here): at most a few MB in flight per association


class PeerGone(ConnectionAbortedError):
    """The peer can no longer take what is being sent: the association died under the message
    (peer killed, connection reset) or the peer took nothing for the stall time. Whatever was sent
    of the message is lost; the caller treats the node as unreachable."""


def _association_dead(assoc: Any) -> bool:
    dul = getattr(assoc, "dul", None)
    return bool(assoc.is_aborted or assoc.is_released or dul is None or not dul.is_alive())


def cut(assoc: Any) -> None:
    """Shut the association's socket down: a DUL thread blocked in send() to a peer that reads
    nothing gets an error at once, which pynetdicom's state machine turns into an abort."""
    try:
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    except (AttributeError, OSError):
        pass


class _SendQueue(queue.Queue):  # type: ignore[type-arg]
    """A bounded DUL send queue whose `put` never waits for good (bugs seen: a forwarder stuck for
    ever in put() after the PACS died in the middle of a 2 MB instance, the DUL thread that drains
    this queue gone with the connection). It waits in short steps and, between them, looks at the
    association: dead, it raises PeerGone for data (the sender stops) and makes room for an A-ABORT
    or A-RELEASE (nothing will send it, and the caller's teardown must not block); alive but not
    drained for `stall` seconds (a peer that reads nothing), it cuts the connection and raises."""

    def __init__(self, assoc: Any, maxsize: int, stall: float):
        super().__init__(maxsize)
        self._assoc = weakref.ref(assoc)
        self._stall = stall
        self._drained = time.monotonic()

    def _get(self) -> Any:
        self._drained = time.monotonic()
        return super()._get()

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                super().put(item, block, 0.25 if block else None)
                return
            except queue.Full:
                if not block or (deadline is not None and time.monotonic() >= deadline):
                    raise
            assoc = self._assoc()
            why = None
            if assoc is None or _association_dead(assoc):
                why = "the association ended while sending"
            elif time.monotonic() - self._drained > self._stall:
                why = f"the peer took no data for {self._stall:g}s"
                cut(assoc)
            if why is None:
                continue
            if isinstance(item, P_DATA):
                raise PeerGone(why)
            with self.mutex:
                self.queue.clear()
                self.not_full.notify_all()
            super().put(item, False)
            return


def bound_send_queue(assoc: Any, maxsize: int = SEND_QUEUE_PDUS, stall: float = 60.0) -> None:
    """Swap the association's DUL send queue for a bounded one (_SendQueue). Call on an established
    association whose own thread is idle (the A-ASSOCIATE exchange is over), so nothing is in the
    old queue."""
    dul = getattr(assoc, "dul", None)
    old = getattr(dul, "to_provider_queue", None)
    if old is None or getattr(old, "maxsize", 0):
        return
    new = _SendQueue(assoc, maxsize, stall)
    while True:
        try:
            new.put_nowait(old.get_nowait())
        except (queue.Empty, queue.Full):
            break
    dul.to_provider_queue = new


def keep_responses_from_reactor(assoc: Any) -> None:
    """Stop the association's reactor thread from taking DIMSE messages off the queue.

    pynetdicom's reactor polls the DIMSE queue (non-blocking) to serve requests the peer sends; its
    pause before each `send_c_find` has a window in which the reactor still takes the first response
    of the new request and drops it ("Received unexpected C-FIND service message", pynetdicom #875).
    Against Orthanc about one C-FIND in 40 lost a match that way. qrproxy never serves requests on an
    association it opened for C-FIND, so the reactor's poll is made to find nothing; the send_*
    methods wait with block=True and still get every message."""
    dimse = assoc.dimse
    blocking_get = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return blocking_get(block=True) if block else (None, None)

    dimse.get_msg = get_msg


def peer_has_spoken(assoc: Any) -> bool:
    """True when bytes from the peer wait unread on the association's socket (a C-CANCEL, an
    A-ABORT); a zero-timeout select, so checking costs one system call."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def let_peer_speak(assoc: Any, timeout: float = 5.0) -> None:
    """Wait (briefly) until the association's send queue is empty, so the DUL thread gets a loop in
    which it reads what the peer sent (a C-CANCEL, an A-ABORT)."""
    q = getattr(getattr(assoc, "dul", None), "to_provider_queue", None)
    if q is None:
        return
    deadline = time.monotonic() + timeout
    while not q.empty() and time.monotonic() < deadline and assoc.is_established:
        time.sleep(0.0005)
    time.sleep(0.002)  # one DUL loop: it sleeps 1 ms when idle, then checks the socket


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def find_pending_command(sop_class_uid: str, message_id: int, status: int = 0xFF00) -> bytes:
    """The encoded command set (implicit VR little endian, PS3.7 9.3.2.2) of a C-FIND-RSP with a
    data set; the same bytes serve every pending response to one request."""
    uid = sop_class_uid.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    body = (_implicit(0x00000002, uid)
            + _implicit(0x00000100, struct.pack("<H", 0x8020))
            + _implicit(0x00000120, struct.pack("<H", message_id))
            + _implicit(0x00000800, struct.pack("<H", 0x0001))
            + _implicit(0x00000900, struct.pack("<H", status)))
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def peer_max_pdu(assoc: Any) -> int:
    peer = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return int(peer.maximum_length or 0)


def send_pending(assoc: Any, context_id: int, command: bytes, identifier: bytes, max_pdu: int) -> None:
    """Queue one pending response (command + identifier) as P-DATA, fragmented to the peer's
    maximum PDU length like pynetdicom's encode_msg (PDV data <= max_pdu - 6). Waits while more than
    PENDING_AHEAD PDUs are queued: the answer never runs far ahead of the socket, so a C-CANCEL is
    read (and honoured) within a few dozen responses, and memory stays flat."""
    dul = assoc.dul
    q = dul.to_provider_queue
    while q.qsize() > PENDING_AHEAD and assoc.is_established:
        time.sleep(0.0002)
    send = dul.send_pdu
    if not max_pdu or len(command) + len(identifier) + 12 <= max_pdu:
        p = P_DATA()
        p.presentation_data_value_list = [[context_id, b"\x03" + command], [context_id, b"\x02" + identifier]]
        send(p)
        return
    room = max(max_pdu - 6, 1)
    for flag, data in ((1, command), (0, identifier)):
        for start in range(0, len(data), room):
            last = start + room >= len(data)
            p = P_DATA()
            p.presentation_data_value_list = [[context_id, bytes([flag | (2 if last else 0)]) + data[start:start + room]]]
            send(p)


def _context_copy(self: Any, memo: dict[int, Any]) -> Any:
    new = PresentationContext.__new__(PresentationContext)
    new.__dict__.update(self.__dict__)
    new._transfer_syntax = list(self._transfer_syntax)
    memo[id(self)] = new
    return new


def cheap_context_copies() -> None:
    """Install `_context_copy` as PresentationContext.__deepcopy__ (idempotent)."""
    if getattr(PresentationContext, "__deepcopy__", None) is not _context_copy:
        PresentationContext.__deepcopy__ = _context_copy  # type: ignore[attr-defined]


# --- encrypted spool files ---------------------------------------------------------------------


class _ReceivedFile:
    """What pynetdicom expects of its NamedTemporaryFile: `name`, `write`, `file.flush()`, `close()`."""

    def __init__(self, writer: BinaryIO):
        self._writer = writer
        self.name = writer.path  # type: ignore[attr-defined]
        self.file = self

    def write(self, data: bytes) -> int:
        return self._writer.write(data)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        with _receiving_lock:
            _receiving.pop(self.name, None)
        self._writer.close()


_receiving: dict[str, _ReceivedFile] = {}
_receiving_lock = threading.Lock()


def encrypt_received_files(make_writer: Callable[[str], BinaryIO]) -> None:
    """Make pynetdicom write received data sets through `make_writer(suffix)` (an encrypting writer
    with a `path` attribute) instead of a plain temporary file. See the module docstring."""
    from pynetdicom import dimse_messages

    def named_temporary_file(*_args: Any, suffix: str = ".dcm", **_kwargs: Any) -> _ReceivedFile:
        f = _ReceivedFile(make_writer(suffix))
        with _receiving_lock:
            _receiving[f.name] = f
        return f

    dimse_messages.NamedTemporaryFile = named_temporary_file  # type: ignore[attr-defined]


def finish_received_file(path: str | os.PathLike[str]) -> bool:
    """Write the final chunk of a received file and close it, before the handler reads it: pynetdicom
    itself closes its file only after the EVT_C_STORE handler returned. False if `path` is not one."""
    with _receiving_lock:
        f = _receiving.get(os.fspath(path))
    if f is None:
        return False
    f.close()
    return True


def decrypt_sent_files(open_plain: Callable[[str | os.PathLike[str]], BinaryIO]) -> None:
    """Make pynetdicom read the files it sends by path (send_c_store(path) with
    STORE_SEND_CHUNKED_DATASET) through `open_plain`. See the module docstring."""
    from pynetdicom import dimse_messages, dsutils

    def _open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "rb" and not args and not kwargs:
            return open_plain(file)
        return builtins.open(file, mode, *args, **kwargs)

    dimse_messages.open = _open  # type: ignore[attr-defined]
    dsutils.open = _open  # type: ignore[attr-defined]


# --- C-STORE sub-operations straight to the socket ---------------------------------------------


def _file_body_offset(head: bytes) -> int | None:
    """Where the data set starts in a DICOM file (after preamble and file meta), or None when the
    meta group does not start with its group length (the caller then uses pynetdicom's path)."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        return None
    (length,) = struct.unpack("<L", head[140:144])
    return 144 + length


def store_command(sop_class: str, sop_instance: str, message_id: int, priority: int = 2,
                  originator_aet: str | None = None, originator_id: int | None = None) -> bytes:
    """The encoded command set of a C-STORE-RQ with a data set (PS3.7 9.3.1.1, implicit VR LE)."""

    def ui(value: str) -> bytes:
        b = value.encode("ascii")
        return b + b"\0" if len(b) % 2 else b

    body = (_implicit(0x00000002, ui(sop_class))
            + _implicit(0x00000100, struct.pack("<H", 0x0001))
            + _implicit(0x00000110, struct.pack("<H", message_id))
            + _implicit(0x00000700, struct.pack("<H", priority))
            + _implicit(0x00000800, struct.pack("<H", 0x0001))
            + _implicit(0x00001000, ui(sop_instance)))
    if originator_aet:
        ae = originator_aet.strip().encode("ascii")[:16]
        body += _implicit(0x00001030, ae + b" " if len(ae) % 2 else ae)
    if originator_id is not None:
        body += _implicit(0x00001031, struct.pack("<H", originator_id))
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def _pdu(context_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">BBLLBB", 0x04, 0, len(data) + 6, len(data) + 2, context_id, flags) + data


class FastStore:
    """Installed on one association (see the module docstring): `expect(sop_uid, path, ts)` before
    yielding a stand-in Dataset for that instance; pynetdicom's sub-operation loop then calls
    `send_c_store` here, which writes the file's own bytes on the context for exactly that transfer
    syntax and waits for the response as pynetdicom does. Without such a context (another native
    syntax was negotiated), or for anything not announced, pynetdicom's own send_c_store runs, with
    the full data set read from the file."""

    BATCH = 1 << 20  # bytes of PDUs per sendall

    def __init__(self, assoc: Any, opener: Callable[[Any], BinaryIO]):
        self.assoc = assoc
        self.opener = opener
        self.expected: dict[str, tuple[Any, str]] = {}
        self._send_c_store = assoc.send_c_store
        assoc.send_c_store = self.send_c_store

    def expect(self, sop_uid: str, path: Any, transfer_syntax: str) -> None:
        self.expected[sop_uid] = (path, transfer_syntax)

    def _context(self, sop_class: str, ts: str) -> Any:
        for cx in self.assoc.accepted_contexts:
            if cx.abstract_syntax == sop_class and cx.transfer_syntax[0] == ts and cx.as_scu:
                return cx
        return None

    def send_c_store(self, dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Any:
        from pydicom import dcmread
        from pydicom.dataset import Dataset

        job = None
        if isinstance(dataset, Dataset) and "SOPInstanceUID" in dataset:
            job = self.expected.pop(str(dataset.SOPInstanceUID), None)
        if job is None:
            return self._send_c_store(dataset, msg_id, priority, originator_aet, originator_id)
        path, ts = job
        sop_class = str(dataset.SOPClassUID)
        cx = self._context(sop_class, ts)
        with self.opener(path) as f:
            offset = _file_body_offset(f.read(1024))
            if cx is None or offset is None:
                f.seek(0)
                return self._send_c_store(dcmread(f), msg_id, priority, originator_aet, originator_id)
            if not self.assoc.is_established:
                raise RuntimeError("the association with the peer SCP is not established")
            command = store_command(sop_class, str(dataset.SOPInstanceUID), msg_id, priority,
                                    originator_aet, originator_id)
            self._write(f, offset, int(cx.context_id), command)
        _, rsp = self.assoc.dimse.get_msg(block=True)
        if rsp is None:
            self.assoc._handle_no_response()
            return Dataset()
        return self.assoc._check_received_status(rsp)

    def _write(self, f: BinaryIO, offset: int, context_id: int, command: bytes) -> None:
        """Frame and send. A destination that takes nothing for the association's DIMSE timeout, or
        dies, is cut off and PeerGone raised: the sub-operation fails, the C-MOVE reports it. A
        spool read error half-way also leaves a partial message on the wire: the association goes."""
        sock = self.assoc.dul.socket.socket
        stall = float(self.assoc.dimse_timeout or 60.0)
        previous = sock.gettimeout()
        sock.settimeout(stall)

        def send(data: bytes) -> None:
            try:
                sock.sendall(data)
            except OSError as exc:  # socket.timeout included
                cut(self.assoc)
                raise PeerGone(f"C-STORE sub-operation not sent: {exc or f'no progress for {stall:g}s'}") from exc

        try:
            max_pdu = peer_max_pdu(self.assoc) or (1 << 20)
            room = max(max_pdu - 6, 1)
            out = [_pdu(context_id, 0x03, command)]
            size = len(out[0])
            f.seek(offset)
            pending = f.read(room)
            while pending:
                nxt = f.read(room)
                out.append(_pdu(context_id, 0x00 if nxt else 0x02, pending))
                size += len(out[-1])
                if size >= self.BATCH:
                    send(b"".join(out))
                    out, size = [], 0
                pending = nxt
            if out:
                send(b"".join(out))
        except PeerGone:
            raise
        except Exception:
            cut(self.assoc)
            raise
        finally:
            try:
                sock.settimeout(previous)
            except OSError:
                pass


def retrieve_pending_command(sop_class_uid: str, message_id: int, command_field: int, status: int,
                             remaining: int, completed: int, failed: int, warning: int) -> bytes:
    """The encoded command set of a C-MOVE-RSP / C-GET-RSP without a data set (PS3.7 9.3.4.2,
    9.3.3.2), as pynetdicom's own encoder would write it."""
    uid = sop_class_uid.encode("ascii")
    if len(uid) % 2:
        uid += b"\0"
    us = lambda v: struct.pack("<H", v)  # noqa: E731
    body = (_implicit(0x00000002, uid) + _implicit(0x00000100, us(command_field))
            + _implicit(0x00000120, us(message_id)) + _implicit(0x00000800, us(0x0101))
            + _implicit(0x00000900, us(status)) + _implicit(0x00001020, us(remaining))
            + _implicit(0x00001021, us(completed)) + _implicit(0x00001022, us(failed))
            + _implicit(0x00001023, us(warning)))
    return _implicit(0x00000000, struct.pack("<L", len(body))) + body


def fast_retrieve_pending(assoc: Any) -> None:
    """On the association a C-MOVE / C-GET request came in on: its pending responses (no data set,
    all four counts) are queued as one P-DATA primitive; everything else goes through pynetdicom."""
    from pynetdicom.dimse_primitives import C_GET, C_MOVE

    dimse = assoc.dimse
    if getattr(dimse, "_qrproxy_fast_pending", False):
        return
    original = dimse.send_msg

    def send_msg(primitive: Any, context_id: int) -> None:
        if (isinstance(primitive, (C_MOVE, C_GET)) and primitive.Status in (0xFF00, 0xFF01)
                and primitive.Identifier is None and primitive.NumberOfRemainingSuboperations is not None):
            command = retrieve_pending_command(
                str(primitive.AffectedSOPClassUID), int(primitive.MessageIDBeingRespondedTo),
                0x8021 if isinstance(primitive, C_MOVE) else 0x8010, int(primitive.Status),
                int(primitive.NumberOfRemainingSuboperations), int(primitive.NumberOfCompletedSuboperations or 0),
                int(primitive.NumberOfFailedSuboperations or 0), int(primitive.NumberOfWarningSuboperations or 0))
            p = P_DATA()
            p.presentation_data_value_list = [[context_id, b"\x03" + command]]
            assoc.dul.send_pdu(p)
            return
        original(primitive, context_id)

    dimse.send_msg = send_msg
    dimse._qrproxy_fast_pending = True


# --- process-wide pynetdicom settings (its _config module), set by the services that need them --------


def stream_sent_datasets() -> None:
    """Send spool files as stored, byte for byte, streamed from disk (no whole dataset in memory)."""
    _config.STORE_SEND_CHUNKED_DATASET = True


def stream_received_datasets(incoming: str | os.PathLike[str]) -> None:
    """Received C-STORE data sets go straight to a file in `incoming` (pynetdicom writes them with
    tempfile, hence tempfile.tempdir), not into memory: the spool then renames that file."""
    _config.STORE_RECV_CHUNKED_DATASET = True
    tempfile.tempdir = str(incoming)


def log_identifiers(debug: bool) -> None:
    """pynetdicom decodes and pretty-prints every request and response identifier for its own log
    unless told not to; that costs more than building the answer. Only with log.dicom_debug."""
    _config.LOG_REQUEST_IDENTIFIERS = debug
    _config.LOG_RESPONSE_IDENTIFIERS = debug


# --- N-EVENT-REPORTs served on an association qrproxy requested (scu/commitment.py) ------------------


def next_message(assoc: Any, timeout: float) -> tuple[int | None, Any]:
    """(context ID, DIMSE message) the peer sent on an association qrproxy requested, or (None,
    None) after `timeout`: the reactor never serves requests there (keep_responses_from_reactor), so
    a node's N-EVENT-REPORT on the N-ACTION's own association is read from the DIMSE queue here."""
    assoc.dimse_timeout = timeout
    return assoc.dimse.get_msg(block=True)


def event_information(assoc: Any, context_id: int, msg: Any) -> Any:
    """The Event Information of an N-EVENT-REPORT request, decoded in its context's transfer syntax."""
    ts = assoc._accepted_cx[context_id].transfer_syntax[0]
    return decode(msg.EventInformation, ts.is_implicit_VR, ts.is_little_endian)


def answer_event_report(assoc: Any, context_id: int, msg: Any, status: int) -> None:
    rsp = N_EVENT_REPORT()
    rsp.MessageIDBeingRespondedTo = msg.MessageID
    rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
    rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
    rsp.EventTypeID = msg.EventTypeID
    rsp.Status = status
    assoc.dimse.send_msg(rsp, context_id)


def set_nodelay(event: Any) -> None:
    """Disable Nagle on every DICOM socket, both directions. Without it a C-STORE response (one small
    PDU) waits for the peer's delayed ACK, about 40 ms per instance on Linux. Bound to EVT_CONN_OPEN, so
    pynetdicom itself stays untouched."""
    try:
        sock = event.assoc.dul.socket.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


def reject(assoc: Any, result: int, source: int, diagnostic: int) -> None:
    """Answer an A-ASSOCIATE-RQ with A-ASSOCIATE-RJ from an EVT_REQUESTED handler, in the three steps
    pynetdicom's own rejection takes (acse.send_reject, EVT_REJECTED, kill), so the association
    log and everything bound to EVT_REJECTED see it like any other rejection."""
    assoc.acse.send_reject(result, source, diagnostic)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


def release_pending(assoc: Any) -> bool:
    """Whether the peer has asked to end the association (an A-RELEASE-RQ or A-ABORT waits unread)
    or it is gone. Peeks, never takes: the reactor must still see and answer an A-RELEASE-RQ."""
    try:
        pending = assoc.dul.peek_next_pdu()
        return not assoc.is_established or type(pending).__name__ in ("A_RELEASE", "A_ABORT", "A_P_ABORT")
    except Exception:
        return True
