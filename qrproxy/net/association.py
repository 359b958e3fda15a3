"""One DICOM association, either side (PS3.8 section 7 and 9, PS3.7 section 9 and 10): messages
in, messages out, release, abort, timers and limits. The acceptor (acceptor.py) and the requestor
(requestor.py) each negotiate, then hand the socket to an `Association`.

Threads. The association has no thread of its own. On an accepted association the acceptor's
thread reads requests and runs their services; on one qrproxy requested, the thread that asks reads
the answers. Another thread may send a request on an accepted association (a storage commitment
N-EVENT-REPORT on the modality's own association): sends take `_send_lock` one whole message at a
time, and the response it waits for is handed over by the reading thread (`_waiters`).

Receiving. PDUs come from `pdu.Reader` as slices of one reused buffer; command fragments are
gathered (at most COMMAND_LIMIT), a data set goes to the writer the service gives for it
(`sink_for`: a spool file, encrypting when configured) or to memory (at most OTHER_DATASET_LIMIT).
A data set larger than the context's limit, a PDU larger than announced, a malformed PDU or command,
a silent peer: the association is aborted with the matching A-ABORT, the partial writer discarded,
and `AssociationEnded` raised to whoever was reading, with the reason the log line gives.

Sending. A message is framed as P-DATA-TF PDUs of the peer's maximum length, one PDV each, and
written with scatter-gather `sendmsg` (headers and slices of the data, no copies) in batches of
about 1 MiB; a file is read in 1 MiB blocks. The socket's timeout bounds every write: a peer that
takes nothing for the stall time is cut off and `PeerGone` raised.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from pydicom.dataset import Dataset

from qrproxy.logs import kv
from qrproxy.net import dimse, pdu
from qrproxy.net.dimse import Command, CommandError

log = logging.getLogger("qrproxy.assoc")
# `log.dicom_debug: true`: one DEBUG line per negotiation and per DIMSE message, both ways (a site
# engineer's answer to "what did the modality actually send"); silent and free otherwise.
trace = logging.getLogger("qrproxy.dicom")

COMMAND_LIMIT = 64 << 10
OTHER_DATASET_LIMIT = 64 << 20
SEND_BATCH = 1 << 20
DEFAULT_SEND_PDU = 256 << 10  # PDV size when the peer announced no maximum (0)
PACE_PIECE = 64 << 10  # with a bandwidth limit, bytes written per pacing step


class AssociationEnded(ConnectionError):
    """The association is over (released, aborted by either side, connection lost). `reason` is
    what the log line says: peer-aborted, idle-timeout, pdu-too-long, dataset-too-large, ..."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PeerGone(AssociationEnded):
    """What was being sent is lost: the peer died under it or took nothing for the stall time."""

    def __init__(self, detail: str):
        super().__init__("peer-gone", detail)


class Released(Exception):
    """The peer asked to release the association (A-RELEASE-RQ) where a message was expected."""


class Sink(Protocol):
    """Where a received data set goes (a spool incoming file): `path`, `write`, `close` when whole,
    `discard` when the transfer was cut off (the partial file removed)."""

    path: Any

    def write(self, data: Any) -> Any: ...

    def close(self) -> None: ...

    def discard(self) -> None: ...


@dataclass
class Peer:
    """One side of the association, named as pynetdicom names them (`assoc.requestor.ae_title`)."""

    ae_title: str = ""
    address: str = ""
    port: int = 0
    maximum_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    called_ae_title: str = ""  # on the requestor: the AE title it asked for
    role_selection: Any = None
    user_identity: Any = None
    extended_negotiation: Any = None


class Request:
    """A request received on the association, as the service handling it sees it. Decoding of its
    data set is deferred to first use, in the presentation context's transfer syntax."""

    def __init__(self, assoc: Association, context: pdu.Context, command: Command, data: Any, sink: Any):
        self.assoc = assoc
        self.context = context
        self.request = command
        self.message = command
        self._data = data
        self._sink = sink
        self._decoded: Dataset | None = None

    @property
    def dataset_path(self) -> Any:
        return None if self._sink is None else self._sink.path

    @property
    def sink(self) -> Any:
        """The writer the data set went to (the service's own object), or None."""
        return self._sink

    @property
    def raw(self) -> bytes | None:
        """The data set's bytes as received (identifiers: the hot cache keys on them)."""
        return None if self._data is None else bytes(self._data)

    def _dataset(self) -> Dataset:
        if self._decoded is None:
            if self._data is None:
                raise ValueError("the request has no data set")
            self._decoded = dimse.decode_dataset(self._data, self.context.transfer_syntax)
        return self._decoded

    identifier = property(_dataset)
    dataset = property(_dataset)
    attribute_list = property(_dataset)
    modification_list = property(_dataset)
    action_information = property(_dataset)
    event_information = property(_dataset)

    @property
    def move_destination(self) -> str:
        return str(self.request.MoveDestination or "").strip()

    @property
    def is_cancelled(self) -> bool:
        """Whether the peer sent C-CANCEL for this request; reads what waits on the socket."""
        self.assoc.poll()
        return self.request.MessageID in self.assoc.cancelled


class Observer(Protocol):
    """What the association tells the rest of qrproxy (the association log, metrics, the commitment
    bookkeeping); every method optional."""


def _call(observers: list[Any], name: str, *args: Any) -> None:
    for o in observers:
        f = getattr(o, name, None)
        if f is not None:
            try:
                f(*args)
            except Exception:
                log.exception("association observer %s.%s failed", type(o).__name__, name)


# --- the SCU calls, named and shaped as pynetdicom's Association methods the services were written against


def _meta(f: BinaryIO) -> tuple[int, dict[int, str]] | None:
    """(data set offset, {element: value}) of a DICOM file's meta group (explicit VR LE), or None."""
    head = f.read(144)
    offset = file_dataset_offset(head)
    if offset is None:
        return None
    meta = f.read(offset - 144)
    values: dict[int, str] = {}
    i = 0
    while i + 8 <= len(meta):
        _, elem = struct.unpack_from("<HH", meta, i)
        vr = meta[i + 4:i + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
            (length,) = struct.unpack_from("<L", meta, i + 8)
            start = i + 12
        else:
            (length,) = struct.unpack_from("<H", meta, i + 6)
            start = i + 8
        if elem in (0x0002, 0x0003, 0x0010):
            values[elem] = meta[start:start + length].rstrip(b"\0 ").decode("ascii", "replace")
        i = start + length
    return offset, values


def _trace(event: str, assoc: Association, context_id: int, cmd: Command) -> None:
    fields = {k: v for k, v in cmd.items() if k not in ("CommandGroupLength", "CommandField")}
    trace.debug(kv(event=event, peer=assoc.peer.ae_title, context=context_id, command=cmd.name, **fields))


class ServiceUser:
    """Mixed into Association: the requests qrproxy sends (see net/requestor.py)."""

    opener: Callable[[Any], BinaryIO] = open  # type: ignore[assignment]

    def _cx(self: Any, sop_class: str, transfer_syntax: str | None = None, role: str | None = "scu") -> pdu.Context:
        cx = self.context_for(str(sop_class), transfer_syntax, role) if role else None
        if cx is None:
            cx = next((c for c in self.accepted_contexts if c.abstract_syntax == str(sop_class)
                       and (transfer_syntax is None or c.transfer_syntax == transfer_syntax)), None)
        if cx is None:
            raise ValueError(f"no accepted presentation context for {sop_class}"
                             + (f" in {transfer_syntax}" if transfer_syntax else ""))
        return cx

    def _final(self: Any, responses: Iterator[tuple[Command, Any]], cx: pdu.Context) -> tuple[Dataset, Any]:
        cmd, data = None, None
        for cmd, data in responses:
            pass
        if cmd is None:
            return Dataset(), None
        reply = dimse.decode_dataset(data, cx.transfer_syntax) if data is not None else None
        return dimse.status_dataset(cmd), reply

    def send_c_echo(self: Any, msg_id: int | None = None) -> Dataset:
        cx = self._cx("1.2.840.10008.1.1")
        return self._final(self.request(cx, {"CommandField": dimse.C_ECHO,
                                             "AffectedSOPClassUID": cx.abstract_syntax}), cx)[0]

    def send_c_store(self: Any, dataset: Any, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        """Store a file (path: sent byte for byte from after its meta group, in the file's own
        transfer syntax) or a Dataset (encoded in an accepted syntax, its own when it has one)."""
        fields: dict[str, Any] = {"CommandField": dimse.C_STORE, "Priority": priority,
                                  "MoveOriginatorApplicationEntityTitle": originator_aet,
                                  "MoveOriginatorMessageID": originator_id}
        if isinstance(dataset, Dataset):
            ts = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
            cx = self._cx(str(dataset.SOPClassUID), str(ts) if ts else None)
            fields.update(AffectedSOPClassUID=cx.abstract_syntax, AffectedSOPInstanceUID=str(dataset.SOPInstanceUID))
            data = dimse.encode_dataset(dataset, cx.transfer_syntax)
            return self._final(self.request(cx, fields, data), cx)[0]
        with self.opener(dataset) as f:
            meta = _meta(f)
            if meta is None:
                raise ValueError(f"{dataset}: not a DICOM file with a file meta group")
            offset, values = meta
            cx = self._cx(values.get(0x0002, ""), values.get(0x0010))
            fields.update(AffectedSOPClassUID=cx.abstract_syntax, AffectedSOPInstanceUID=values.get(0x0003, ""))
            f.seek(offset)
            return self._final(self.request(cx, fields, file=f), cx)[0]

    def _query(self: Any, field: int, identifier: Dataset, model: str, **extra: Any) -> Iterator[tuple[Dataset, Any]]:
        cx = self._cx(str(model))
        fields = {"CommandField": field, "AffectedSOPClassUID": cx.abstract_syntax, "Priority": 2, **extra}
        data = dimse.encode_dataset(identifier, cx.transfer_syntax)
        for cmd, rdata in self.request(cx, fields, data):
            ident = None
            if rdata is not None:
                ident = dimse.decode_dataset(rdata, cx.transfer_syntax)
            yield dimse.status_dataset(cmd), ident

    def send_c_find(self: Any, identifier: Dataset, query_model: str, msg_id: int | None = None,
                    priority: int = 2) -> Iterator[tuple[Dataset, Any]]:
        return self._query(dimse.C_FIND, identifier, query_model)

    def send_c_move(self: Any, identifier: Dataset, move_aet: str, query_model: str,
                    priority: int = 2) -> Iterator[tuple[Dataset, Any]]:
        return self._query(dimse.C_MOVE, identifier, query_model, MoveDestination=move_aet)

    def send_c_get(self: Any, identifier: Dataset, query_model: str, priority: int = 2) -> Iterator[tuple[Dataset, Any]]:
        return self._query(dimse.C_GET, identifier, query_model)

    def _n(self: Any, field: int, dataset: Dataset | None, sop_class: str, instance: str | None,
           role: str | None = "scu", **extra: Any) -> tuple[Dataset, Any]:
        cx = self._cx(str(sop_class), role=role)
        requested = field in (dimse.N_ACTION, dimse.N_SET, dimse.N_GET, dimse.N_DELETE)
        fields: dict[str, Any] = {"CommandField": field, **extra}
        if requested:
            fields.update(RequestedSOPClassUID=cx.abstract_syntax, RequestedSOPInstanceUID=instance)
        else:
            fields.update(AffectedSOPClassUID=cx.abstract_syntax, AffectedSOPInstanceUID=instance)
        data = dimse.encode_dataset(dataset, cx.transfer_syntax) if dataset is not None else None
        return self._final(self.request(cx, fields, data), cx)

    def send_n_action(self: Any, dataset: Dataset | None, action_type: int, class_uid: str,
                      instance_uid: str) -> tuple[Dataset, Any]:
        return self._n(dimse.N_ACTION, dataset, class_uid, instance_uid, ActionTypeID=action_type)

    def send_n_event_report(self: Any, dataset: Dataset | None, event_type: int, class_uid: str,
                            instance_uid: str) -> tuple[Dataset, Any]:
        return self._n(dimse.N_EVENT_REPORT, dataset, class_uid, instance_uid, role=None, EventTypeID=event_type)

    def send_n_create(self: Any, dataset: Dataset | None, class_uid: str, instance_uid: str | None = None) -> tuple[Dataset, Any]:
        return self._n(dimse.N_CREATE, dataset, class_uid, instance_uid)

    def send_n_set(self: Any, dataset: Dataset, class_uid: str, instance_uid: str) -> tuple[Dataset, Any]:
        return self._n(dimse.N_SET, dataset, class_uid, instance_uid)

    def next_request(self: Any, timeout: float) -> Request | None:
        """A request the peer sent on this association (an N-EVENT-REPORT after an N-ACTION), or None
        after `timeout`; the caller answers it with `respond`."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                item = self.receive(timeout=left)
            except AssociationEnded:
                return None
            except socket.timeout:
                return None
            if isinstance(item, tuple) and not item[1].is_response:
                _call(self.observers, "on_dimse_received", self, item[1])
                return Request(self, item[0], item[1], item[2], item[3])
            if isinstance(item, Released):
                self.answer_release()
                return None


class Association(ServiceUser):
    """An established association (see the module docstring). Built by acceptor.py / requestor.py."""

    def __init__(self, sock: socket.socket, *, is_requestor: bool, requestor: Peer, acceptor: Peer,
                 max_pdu: int, idle_timeout: float | None, contexts: list[pdu.Context] | None = None,
                 acse_timeout: float = 30.0, dimse_timeout: float | None = None,
                 observers: list[Any] | None = None,
                 sink_for: Callable[[Association, Command, pdu.Context], Sink | None] | None = None,
                 dataset_limit: Callable[[pdu.Context], int] | None = None):
        self.sock = sock
        self.is_requestor = is_requestor
        self.is_acceptor = not is_requestor
        self.requestor = requestor
        self.acceptor = acceptor
        self.accepted_contexts: list[pdu.Context] = []
        self.rejected_contexts: list[pdu.Context] = []
        self._by_id: dict[int, pdu.Context] = {}
        self.primitive: pdu.Associate | None = None  # the A-ASSOCIATE-RQ as received or sent
        self.idle_timeout = idle_timeout or None
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.observers = observers or []
        self.sink_for = sink_for
        self.dataset_limit = dataset_limit
        self.reader = pdu.Reader(sock, max_pdu)
        self.is_established = False
        self.is_released = False
        self.is_aborted = False
        self.is_rejected = False
        self.reject_reason: str | None = None
        self.end_reason = ""
        self.cancelled: set[int] = set()
        self.handlers: dict[int, Callable[[Request], Any]] = {}
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._msg_id = 0
        self._backlog: deque[Any] = deque()  # messages read while looking for something else
        self._waiters: dict[int, list[Any]] = {}  # message ID -> [event, responses]
        self._reading = threading.Lock()
        self._peer_release = False
        # the message being received
        self._cmd = bytearray()
        self._command: Command | None = None
        self._context: pdu.Context | None = None
        self._data: bytearray | None = None
        self._sink: Sink | None = None
        self._received = 0
        self._limit = 0
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.send_pdu = DEFAULT_SEND_PDU
        # bytes-to-send -> blocks until they may go (a node's bandwidth limit); None: full speed
        self.pace: Callable[[int], None] | None = None
        self.bytes_sent = 0  # read by the line-speed watchdog (scu/linespeed.py)
        if contexts is not None:
            self.establish(contexts)

    def establish(self, contexts: list[pdu.Context]) -> None:
        """Negotiation is over: these contexts (accepted and not) hold from now on."""
        self.accepted_contexts = [cx for cx in contexts if cx.accepted]
        self.rejected_contexts = [cx for cx in contexts if not cx.accepted]
        self._by_id = {cx.context_id: cx for cx in self.accepted_contexts}
        peer = self.peer
        self.send_pdu = max(peer.maximum_length - pdu.PDV_HEADER, 1) if peer.maximum_length else DEFAULT_SEND_PDU
        self.is_established = True
        if trace.isEnabledFor(logging.DEBUG):
            for cx in contexts:
                trace.debug(kv(event="context", peer=peer.ae_title, id=cx.context_id, abstract=cx.abstract_syntax,
                               result=cx.result, transfer_syntax=cx.transfer_syntax or "-",
                               roles=("scu" if cx.as_scu else "") + ("scp" if cx.as_scp else "")))
            trace.debug(kv(event="established", peer=peer.ae_title, peer_max_pdu=peer.maximum_length,
                           implementation=peer.implementation_class_uid,
                           version=peer.implementation_version_name or "-"))

    # --- identity ---------------------------------------------------------------------------------

    @property
    def peer(self) -> Peer:
        return self.acceptor if self.is_requestor else self.requestor

    def context(self, context_id: int) -> pdu.Context | None:
        return self._by_id.get(context_id)

    def context_for(self, abstract_syntax: str, transfer_syntax: str | None = None, role: str = "scu") -> pdu.Context | None:
        for cx in self.accepted_contexts:
            if cx.abstract_syntax != abstract_syntax:
                continue
            if transfer_syntax is not None and cx.transfer_syntax != transfer_syntax:
                continue
            if (role == "scu" and cx.as_scu) or (role == "scp" and cx.as_scp):
                return cx
        return None

    def next_message_id(self) -> int:
        with self._state_lock:
            self._msg_id = self._msg_id % 0xFFFF + 1
            return self._msg_id

    # --- sending ----------------------------------------------------------------------------------

    def _timeout(self, value: float | None) -> None:
        try:
            self.sock.settimeout(value)
        except OSError:
            pass

    def _write(self, buffers: list[Any]) -> None:
        """All of `buffers`, in order; PeerGone when the peer stops taking them or goes away."""
        if self.pace is not None:
            self._write_paced(buffers)
        else:
            self._write_now(buffers)

    def _write_now(self, buffers: list[Any]) -> None:
        try:
            if self._tls:
                data = b"".join(buffers)
                self.sock.sendall(data)
                self.bytes_sent += len(data)
                return
            while buffers:
                sent = self.sock.sendmsg(buffers)
                self.bytes_sent += sent
                while buffers and sent >= len(buffers[0]):
                    sent -= len(buffers[0])
                    buffers.pop(0)
                if sent and buffers:
                    buffers[0] = memoryview(buffers[0])[sent:]
        except OSError as exc:
            self._lost(f"sending: {exc or 'no progress for the stall time'}")
            raise PeerGone(str(exc) or "the peer took no data for the stall time") from exc

    def _write_paced(self, buffers: list[Any]) -> None:
        """The same, in pieces of PACE_PIECE bytes each allowed by `pace` first (a bandwidth limit
        shared by every association to a node): the link sees an even rate, not 1 MiB bursts."""
        pace = self.pace
        piece: list[Any] = []
        size = 0
        for buf in buffers:
            view = memoryview(buf)
            while len(view):
                take = view[:PACE_PIECE - size]
                piece.append(take)
                size += len(take)
                view = view[len(take):]
                if size >= PACE_PIECE:
                    pace(size)  # type: ignore[misc]
                    self._write_now(piece)
                    piece, size = [], 0
        if piece:
            pace(size)  # type: ignore[misc]
            self._write_now(piece)

    def send_raw(self, data: bytes) -> None:
        with self._send_lock:
            self._write([data])

    def send_message(self, context_id: int, command: bytes, data: Any = None, file: BinaryIO | None = None) -> None:
        """One message: `command` (an encoded command set), then the data set from `data` (bytes or
        memoryview) or read from `file` (positioned at the data set) to its end."""
        room = self.send_pdu
        if trace.isEnabledFor(logging.DEBUG):
            _trace("dimse-sent", self, context_id, dimse.decode(command))
        with self._send_lock:
            if not self.is_established:
                raise AssociationEnded(self.end_reason or "closed", "the association is not established")
            self._timeout(self._stall())
            out: list[Any] = []
            for start in range(0, len(command), room):
                chunk = command[start:start + room]
                last = start + room >= len(command)
                out += [pdu.pdv_header(context_id, 0x03 if last else 0x01, len(chunk)), chunk]
            if data is not None:
                view = memoryview(data)
                n = len(view)
                size = 0
                for start in range(0, max(n, 1), room):
                    chunk = view[start:start + room]
                    out += [pdu.pdv_header(context_id, 0x02 if start + room >= n else 0x00, len(chunk)), chunk]
                    size += len(chunk)
                    if size >= SEND_BATCH:
                        self._write(out)
                        out, size = [], 0
            elif file is not None:
                self._send_file(context_id, file, room, out)
                out = []
            if out:
                self._write(out)

    def _send_file(self, context_id: int, f: BinaryIO, room: int, out: list[Any]) -> None:
        block = max(room, (SEND_BATCH // room) * room)
        pending = f.read(block)
        if not pending:
            out += [pdu.pdv_header(context_id, 0x02, 0), b""]
            self._write(out)
            return
        while pending:
            nxt = f.read(block)
            view = memoryview(pending)
            n = len(view)
            for start in range(0, n, room):
                chunk = view[start:start + room]
                last = not nxt and start + room >= n
                out += [pdu.pdv_header(context_id, 0x02 if last else 0x00, len(chunk)), chunk]
            self._write(out)
            out = []
            pending = nxt

    def _stall(self) -> float | None:
        values = [v for v in (self.dimse_timeout, self.idle_timeout) if v]
        return max(values + [60.0]) if values else 60.0

    # --- receiving --------------------------------------------------------------------------------

    def _reset_message(self) -> None:
        self._cmd.clear()
        self._command = None
        self._context = None
        self._data = None
        self._sink = None
        self._received = 0

    def _discard_sink(self) -> None:
        sink = self._sink
        self._sink = None
        if sink is not None:
            try:
                sink.discard()
            except Exception:
                log.exception("discarding a partial data set failed")
            _call(self.observers, "on_partial_discarded", self)

    def _step(self) -> Any:
        """Read one PDU; return a complete (context, command, data, sink) or None."""
        kind, body = self.reader.read()
        if kind == pdu.P_DATA_TF:
            # Usually one message ends per PDU; a peer may pack the end of one and a whole next one
            # (a C-CANCEL) into the same PDU: those wait in the backlog.
            done = None
            for context_id, control, data in pdu.pdvs(body):
                finished = self._pdv(context_id, control, data)
                if finished is None:
                    continue
                if done is None:
                    done = finished
                else:
                    extra = self._deliver(finished)
                    if extra is not None:
                        self._backlog.append(extra)
            _call(self.observers, "on_data", self, len(body))
            return done
        if kind == pdu.RELEASE_RQ:
            if self._command is not None or self._cmd:
                raise pdu.PduError("A-RELEASE-RQ in the middle of a message", pdu.UNEXPECTED_PDU)
            self._peer_release = True
            return Released()
        if kind == pdu.RELEASE_RP:
            return pdu.RELEASE_RP
        if kind == pdu.ABORT:
            raise AssociationEnded("peer-aborted", f"A-ABORT source {body[2] if len(body) > 2 else 0}")
        raise pdu.PduError(f"unexpected {pdu.PDU_NAMES[kind]} on an established association", pdu.UNEXPECTED_PDU)

    def _pdv(self, context_id: int, control: int, data: memoryview) -> Any:
        cx = self._by_id.get(context_id)
        if cx is None:
            raise pdu.PduError(f"PDV on presentation context {context_id}, which is not accepted", pdu.INVALID_PARAMETER)
        if self._context is not None and cx is not self._context:
            raise pdu.PduError("PDVs of one message on two presentation contexts", pdu.INVALID_PARAMETER)
        self._context = cx
        if control & 0x01:
            if self._command is not None:
                raise pdu.PduError("command fragment after the command set ended", pdu.UNEXPECTED_PARAMETER)
            if len(self._cmd) + len(data) > COMMAND_LIMIT:
                raise Limit("command-too-long", f"command set over {COMMAND_LIMIT} bytes", limit=COMMAND_LIMIT)
            self._cmd += data
            if not control & 0x02:
                return None
            try:
                self._command = dimse.decode(self._cmd)
            except CommandError as exc:
                raise BadCommand(str(exc)) from None
            if not self._command.has_dataset:
                return self._finish()
            self._limit = self.dataset_limit(cx) if self.dataset_limit else OTHER_DATASET_LIMIT
            self._sink = self.sink_for(self, self._command, cx) if self.sink_for else None
            if self._sink is None:
                self._data = bytearray()
                self._limit = min(self._limit or OTHER_DATASET_LIMIT, OTHER_DATASET_LIMIT)
            return None
        if self._command is None:
            raise pdu.PduError("data set fragment before its command set", pdu.UNEXPECTED_PARAMETER)
        self._received += len(data)
        if self._limit and self._received > self._limit:
            raise Limit("dataset-too-large", f"data set over {self._limit} bytes", context=context_id,
                        bytes=self._received, limit=self._limit)
        if self._sink is not None:
            self._sink.write(data)
        else:
            self._data += data  # type: ignore[operator]
        if control & 0x02:
            return self._finish()
        return None

    def _finish(self) -> Any:
        out = (self._context, self._command, self._data, self._sink)
        if trace.isEnabledFor(logging.DEBUG) and self._command is not None:
            _trace("dimse-received", self, self._context.context_id if self._context else 0, self._command)
        if self._sink is not None:
            self._sink.close()
        self._cmd = bytearray()
        self._command = None
        self._context = None
        self._data = None
        self._sink = None
        self._received = 0
        return out

    def _deliver(self, item: Any) -> Any:
        """Hand a response to the thread waiting for it; take a C-CANCEL note; return the rest."""
        if isinstance(item, tuple):
            cmd = item[1]
            if cmd.field == dimse.C_CANCEL:
                self.cancelled.add(int(cmd.MessageIDBeingRespondedTo or 0))
                _call(self.observers, "on_dimse_received", self, cmd)
                return None
            if cmd.is_response:
                waiter = self._waiters.get(int(cmd.MessageIDBeingRespondedTo or 0))
                if waiter is not None:
                    waiter[1].append(item)
                    waiter[0].set()
                    return None
        return item

    def receive(self, timeout: float | None = None) -> Any:
        """The next request or response (context, command, data, sink), or `Released` when the peer
        asked to release. AssociationEnded when the association ends otherwise."""
        while self._backlog:
            item = self._deliver(self._backlog.popleft())
            if item is not None:
                return item
        self._timeout(timeout if timeout is not None else self.idle_timeout)
        while True:
            try:
                with self._reading:
                    item = self._deliver(self._guarded(self._step))
            except socket.timeout:
                what = "idle-timeout" if not (self._cmd or self._command or self.reader.buffered()) else "stalled-mid-message"
                self.abort(what, f"nothing from the peer for {self.sock.gettimeout():g}s")
                raise AssociationEnded(what, "the peer sent nothing in time") from None
            if item is not None:
                return item

    def poll(self) -> None:
        """Read what the peer has already sent, without waiting (a C-CANCEL, an A-ABORT): complete
        messages go to the backlog for `receive`. Called between pending responses."""
        while self.is_established and self._readable():
            if not self._reading.acquire(blocking=False):
                return
            try:
                self._timeout(self.idle_timeout)
                item = self._deliver(self._guarded(self._step))
            except socket.timeout:
                return
            except AssociationEnded:
                return
            finally:
                self._reading.release()
            if item is not None:
                self._backlog.append(item)

    def _readable(self) -> bool:
        if self.reader.buffered():
            return True
        if self._tls and self.sock.pending():  # type: ignore[attr-defined]
            return True
        try:
            r, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(r)

    def peer_has_spoken(self) -> bool:
        return self._readable() or bool(self._backlog)

    def _guarded(self, step: Callable[[], Any]) -> Any:
        """Run `step`, turning protocol faults into the right A-ABORT and AssociationEnded."""
        try:
            return step()
        except socket.timeout:
            raise
        except pdu.TooLong as exc:
            self.abort("pdu-too-long", str(exc), source=pdu.ABORT_PROVIDER, reason_code=pdu.INVALID_PARAMETER,
                       fields={"pdu_type": f"0x{exc.kind:02X}", "length": exc.length, "limit": exc.limit})
            raise AssociationEnded("pdu-too-long", str(exc)) from None
        except Limit as exc:
            self.abort(exc.reason, exc.detail, fields=exc.fields)
            raise AssociationEnded(exc.reason, exc.detail) from None
        except BadCommand as exc:
            self.abort("bad-command-set", str(exc), source=pdu.ABORT_PROVIDER, reason_code=pdu.INVALID_PARAMETER)
            raise AssociationEnded("bad-command-set", str(exc)) from None
        except pdu.PduError as exc:
            self.abort("bad-pdu", str(exc), source=pdu.ABORT_PROVIDER, reason_code=exc.reason)
            raise AssociationEnded("bad-pdu", str(exc)) from None
        except AssociationEnded as exc:
            self._lost(exc.reason, aborted=True)
            raise
        except pdu.PeerClosed as exc:
            self._lost(str(exc))
            raise AssociationEnded("connection-closed", str(exc)) from None
        except OSError as exc:
            self._lost(str(exc))
            raise AssociationEnded("connection-lost", str(exc)) from None

    # --- ending -----------------------------------------------------------------------------------

    def _lost(self, reason: str, aborted: bool = True) -> None:
        """The connection is gone or unusable: nothing more is sent; a partial data set is dropped."""
        with self._state_lock:
            was = self.is_established
            self.is_established = False
            if aborted and not self.is_released:
                self.is_aborted = True
            self.end_reason = self.end_reason or reason
        self._discard_sink()
        self._close_socket()
        for waiter in list(self._waiters.values()):
            waiter[0].set()
        if was and aborted and not self.is_released:
            _call(self.observers, "on_aborted", self)

    def abort(self, reason: str = "aborted", detail: str = "", source: int = pdu.ABORT_USER,
              reason_code: int = 0, fields: dict[str, Any] | None = None) -> None:
        """Send A-ABORT (best effort), close, and log once why (`reason` names the fault)."""
        if not self.is_established and self.accepted_contexts:
            self._close_socket()
            return
        if reason not in ("aborted", "local"):
            log.warning(kv(event="association-aborted", reason=reason, peer=f"{self.peer.address}:{self.peer.port}",
                           calling=self.requestor.ae_title, detail=detail or None, **(fields or {})))
        try:
            self.sock.settimeout(2.0)
            self.sock.sendall(pdu.encode_abort(source, reason_code))
        except OSError:
            pass
        self._lost(reason)

    def cut(self, reason: str, detail: str = "") -> None:
        """End the association from another thread (a watchdog): A-ABORT when no message is being
        written, else close the connection under the writer (an A-ABORT in the middle of a PDU
        would be garbage to the peer); either way the peer drops what it had of the message."""
        with self._state_lock:
            self.end_reason = self.end_reason or reason
        if self._send_lock.acquire(blocking=False):
            try:
                self.abort(reason, detail)
            finally:
                self._send_lock.release()
        else:
            log.warning(kv(event="association-aborted", reason=reason, peer=f"{self.peer.address}:{self.peer.port}",
                           calling=self.requestor.ae_title, detail=detail or None))
            self._lost(reason)

    def _close_socket(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass

    def release(self) -> None:
        """A-RELEASE as the side that asks: RQ, then wait (acse_timeout) for RP; a release collision
        (the peer's RQ first) is answered as PS3.8 D.2 has it for the requestor: RP, then wait for RP."""
        if not self.is_established:
            return
        try:
            self.send_raw(pdu.RELEASE_RQ_PDU)
            deadline = time.monotonic() + (self.acse_timeout or 30.0)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout()
                item = self.receive(timeout=left)
                if item == pdu.RELEASE_RP:
                    break
                if isinstance(item, Released):
                    self.send_raw(pdu.RELEASE_RP_PDU)
                    if self.is_acceptor:
                        break
                # anything else (a late response) is dropped: the association is ending
        except (AssociationEnded, OSError):
            return
        with self._state_lock:
            self.is_released = True
            self.is_established = False
        self._close_socket()
        _call(self.observers, "on_released", self)

    def answer_release(self) -> None:
        """The peer sent A-RELEASE-RQ: answer RP and close."""
        try:
            self.send_raw(pdu.RELEASE_RP_PDU)
        except (AssociationEnded, OSError):
            pass
        with self._state_lock:
            self.is_released = True
            self.is_established = False
        self._discard_sink()
        _call(self.observers, "on_released", self)
        # give the peer the chance to close first (its A-RELEASE-RP is the last PDU)
        try:
            self.sock.settimeout(self.acse_timeout or 5.0)
            self.sock.recv(1)
        except OSError:
            pass
        self._close_socket()

    def release_pending(self) -> bool:
        """The peer has asked to end the association, or it is gone."""
        self.poll()
        return not self.is_established or self._peer_release or any(isinstance(i, Released) for i in self._backlog)

    # --- serving requests ------------------------------------------------------------------------

    def serve(self, item: tuple[Any, ...]) -> None:
        """Run the service for a received request and send its response(s)."""
        context, command, data, sink = item
        if command.is_response:
            log.info(kv(event="unexpected-response", command=command.name, peer=self.peer.ae_title))
            return
        _call(self.observers, "on_dimse_received", self, command)
        handler = self.handlers.get(command.field)
        req = Request(self, context, command, data, sink)
        if handler is None:
            self.respond(req, 0x0211 if command.field & 0xFF00 == 0x0100 else 0xC000,
                         ErrorComment=f"{command.name} is not supported here")
            return
        try:
            result = handler(req)
            if command.field in (dimse.C_FIND, dimse.C_MOVE, dimse.C_GET):
                self._stream(req, result)
            elif isinstance(result, tuple):
                status, reply = result[0], result[1]
                self.respond(req, status, dataset=reply)
            else:
                self.respond(req, result)
        except AssociationEnded:
            raise
        except Exception as exc:
            log.exception("%s handler failed", command.name)
            if self.is_established:
                code = 0x0110 if command.field & 0xFF00 else 0xC000
                self.respond(req, code, ErrorComment=f"{type(exc).__name__}: {exc}"[:64])
        finally:
            if sink is not None:
                sink.discard()  # a no-op once the service has moved the file into the spool

    def respond(self, req: Request, status: Any, dataset: Any = None, **extra: Any) -> None:
        code, fields = dimse.status_fields(status)
        fields.update(extra)
        cmd = req.request
        data = None
        if isinstance(dataset, Dataset):
            # command elements a service put in its reply (N-CREATE: the instance UID it assigned)
            for kw in ("AffectedSOPInstanceUID", "AffectedSOPClassUID"):
                if kw in dataset:
                    dataset = Dataset(dataset)
                    fields.setdefault(kw, str(dataset.pop(kw).value))
            if len(dataset) == 0:
                dataset = None
        if dataset is not None:
            data = dataset if isinstance(dataset, (bytes, bytearray, memoryview)) else \
                dimse.encode_dataset(dataset, req.context.transfer_syntax)
        command = dimse.response(cmd, code, data is not None, **fields)
        self.send_message(req.context.context_id, command, data)
        _call(self.observers, "on_dimse_sent", self, cmd, code)

    def _stream(self, req: Request, responses: Iterator[Any]) -> None:
        """C-FIND / C-MOVE / C-GET: each pending response as the service yields it, then the final
        one (Success when the service ends without saying)."""
        final = None
        for item in responses:
            status, identifier, *rest = item
            extra = rest[0] if rest else {}
            code, _ = dimse.status_fields(status) if status is not None else (0xC000, {})
            if code in dimse.PENDING:
                self.respond(req, status, dataset=identifier, **extra)
                continue
            final = (status, identifier, extra)
            break
        if final is None:
            final = (dimse.SUCCESS, None, {})
        status, identifier, extra = final
        self.respond(req, status, dataset=identifier, **extra)
        self.cancelled.discard(req.request.MessageID)

    # --- requests this side sends ----------------------------------------------------------------

    def request(self, cx: pdu.Context, fields: dict[str, Any], data: Any = None, file: BinaryIO | None = None,
                timeout: float | None = None) -> Iterator[tuple[Command, Any]]:
        """Send a request and yield its responses (command, data) until the final one. Requests the
        peer sends meanwhile (C-STORE sub-operations of a C-GET, an N-EVENT-REPORT) are served."""
        msg_id = self.next_message_id()
        fields = dict(fields, MessageID=msg_id, CommandDataSetType=0x0001 if data is not None or file else dimse.NO_DATASET)
        waiter: list[Any] = [threading.Event(), []]
        self._waiters[msg_id] = waiter
        try:
            self.send_message(cx.context_id, dimse.encode(fields), data, file)
            while True:
                item = self._wait(msg_id, waiter, timeout if timeout is not None else self.dimse_timeout)
                _, cmd, rdata, _ = item
                yield cmd, rdata
                if int(cmd.Status or 0) not in dimse.PENDING:
                    return
        finally:
            self._waiters.pop(msg_id, None)

    def _wait(self, msg_id: int, waiter: list[Any], timeout: float | None) -> Any:
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            if waiter[1]:
                return waiter[1].pop(0)
            if not self.is_established:
                raise AssociationEnded(self.end_reason or "closed", "the association ended before the response")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                self.abort("no-response", f"no response to message {msg_id} in {timeout:g}s")
                raise AssociationEnded("no-response", f"no response in {timeout:g}s")
            if self._reading.acquire(blocking=False):
                try:
                    if waiter[1]:
                        continue
                    if self._backlog:
                        item = self._deliver(self._backlog.popleft())
                    else:
                        self._timeout(min(left, 1.0) if left is not None else 1.0)
                        try:
                            item = self._deliver(self._guarded(self._step))
                        except socket.timeout:
                            continue
                finally:
                    self._reading.release()
                if item is None:
                    continue
                if isinstance(item, Released):
                    self.abort("released-mid-request", "the peer asked to release with a request outstanding")
                    raise AssociationEnded("released-mid-request")
                if isinstance(item, tuple) and not item[1].is_response:
                    self.serve(item)
                    continue
                # a response nobody waits for, or an A-RELEASE-RP out of place
                continue
            waiter[0].wait(min(left, 0.5) if left is not None else 0.5)
            waiter[0].clear()

    def close(self) -> None:
        """Close without ceremony (the association already ended, or never was)."""
        with self._state_lock:
            self.is_established = False
        self._close_socket()


class Limit(Exception):
    def __init__(self, reason: str, detail: str, **fields: Any):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.fields = fields


class BadCommand(Exception):
    pass


def file_dataset_offset(head: bytes) -> int | None:
    """Where the data set starts in a DICOM file (after preamble and file meta), or None when the
    file meta does not start with its group length."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00" or head[136:138] != b"UL":
        return None
    (length,) = struct.unpack("<L", head[140:144])
    return 144 + length
