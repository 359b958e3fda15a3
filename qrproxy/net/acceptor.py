"""The listening side: accept connections, negotiate associations (PS3.8 7.1, 9.3.2-9.3.4, PS3.7
annex D), and run each association in its own thread until it is released or aborted.

One thread per association does everything for it: reads the request, runs the service, writes
the responses. That is the shape DCMTK's storescp and Orthanc have, and the one that measured
fastest here: no hand-over between a socket thread and a worker per message.

What the services offer is a `Services` value built by app.py: the presentation contexts with
their transfer syntaxes in order of preference (the first of ours the requestor offers is
accepted, as pynetdicom and DCMTK do), the SOP classes that accept SCP/SCU role selection, the
handler for each DIMSE command, where a data set goes (`sink_for`) and how large it may be. The
policy that may refuse an association (scp/access.py) is an observer with `on_requested`: it calls
`Negotiation.reject(...)` or `Negotiation.restrict(...)`.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qrproxy.logs import kv
from qrproxy.net import pdu, tls
from qrproxy.net.association import Association, AssociationEnded, Peer, Released, _call

log = logging.getLogger("qrproxy.assoc")

# PS3.8 9.3.4 (result, source, reason)
CALLING_AE_NOT_RECOGNIZED = (pdu.REJECTED_PERMANENT, 1, 3)
APPLICATION_CONTEXT_NOT_SUPPORTED = (pdu.REJECTED_PERMANENT, 1, 2)
LOCAL_LIMIT_EXCEEDED = (pdu.REJECTED_TRANSIENT, 3, 2)
PROTOCOL_VERSION_NOT_SUPPORTED = (pdu.REJECTED_PERMANENT, 2, 2)


@dataclass
class Services:
    supported: dict[str, list[str]]  # abstract syntax -> transfer syntaxes, preferred first
    role_classes: set[str] = field(default_factory=set)  # SOP classes accepting role selection
    handlers: dict[int, Callable[[Any], Any]] = field(default_factory=dict)  # command field -> service
    sink_for: Callable[..., Any] | None = None
    dataset_limit: Callable[[pdu.Context], int] | None = None
    observers: list[Any] = field(default_factory=list)


@dataclass
class Settings:
    ae_title: str
    max_pdu: int
    acse_timeout: float
    idle_timeout: float | None
    require_calling: set[str] | None = None  # None: any calling AE title
    backstop: int = 1000  # connections at once, associated or not


class Negotiation:
    """An A-ASSOCIATE-RQ being decided: what the policy sees and may change."""

    def __init__(self, assoc: Association, rq: pdu.Associate, services: Services):
        self.assoc = assoc
        self.rq = rq
        self.services = services
        self.rejection: tuple[int, int, int] | None = None
        self.reject_reason: str | None = None
        self.denied: set[str] = set()

    def reject(self, rsd: tuple[int, int, int], reason: str) -> None:
        self.rejection = rsd
        self.reject_reason = reason

    def restrict(self, abstract_syntaxes: set[str]) -> None:
        """Answer these abstract syntaxes "not supported" on this association only."""
        self.denied |= abstract_syntaxes


def negotiate(rq: pdu.Associate, supported: dict[str, list[str]], role_classes: set[str],
              denied: set[str] = frozenset()) -> tuple[list[pdu.Context], dict[str, tuple[bool, bool]]]:
    """The acceptor's answer to each proposed context, and the role selection items to send back."""
    out: list[pdu.Context] = []
    roles: dict[str, tuple[bool, bool]] = {}
    for cx in rq.contexts:
        uid = cx.abstract_syntax
        ours = None if uid in denied else supported.get(uid)
        answer = pdu.Context(cx.context_id, uid)
        offered = cx.transfer_syntaxes
        if ours is None:
            answer.result = 3
            answer.transfer_syntax = offered[0] if offered else ""
        else:
            chosen = next((ts for ts in ours if ts in offered), None)
            if chosen is None:
                answer.result = 4
                answer.transfer_syntax = offered[0] if offered else ""
            else:
                answer.transfer_syntax = chosen
        answer.transfer_syntaxes = [answer.transfer_syntax]
        # default roles: the requestor is SCU, qrproxy SCP (PS3.7 D.3.3.4)
        answer.as_scu, answer.as_scp = False, True
        if uid in rq.roles and uid in role_classes and answer.result == 0:
            rq_scu, rq_scp = rq.roles[uid]
            roles[uid] = (rq_scu, rq_scp)
            answer.as_scu, answer.as_scp = rq_scp, rq_scu
            if not (rq_scu or rq_scp):
                answer.result = 1
        out.append(answer)
    return out, roles


class Server:
    """Listens on (host, port) and serves associations, each in its own thread."""

    def __init__(self, address: tuple[str, int], settings: Settings, services: Services,
                 ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False, backlog: int = 128,
                 name: str = "dicom-server"):
        self.settings = settings
        self.services = services
        self.ssl_context = ssl_context
        self.name = name
        self.active: set[Association] = set()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind(address)
            self.socket.listen(backlog)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, name=self.name, daemon=True)
        self._thread.start()

    def serve_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, addr = self.socket.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            threading.Thread(target=self._connection, args=(conn, addr), name="association", daemon=True).start()

    def shutdown(self) -> None:
        """Stop accepting; the associations in progress go on until `abort_all`."""
        self._stopping.set()
        try:
            self.socket.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.socket.close()

    def abort_all(self) -> None:
        with self._lock:
            active = list(self.active)
        for assoc in active:
            assoc.abort("shutdown", "qrproxy is stopping")

    def count(self, predicate: Callable[[Association], bool] = lambda a: True) -> int:
        with self._lock:
            return sum(1 for a in self.active if predicate(a))

    # --- one connection ---------------------------------------------------------------------------

    def _connection(self, sock: socket.socket, addr: Any) -> None:
        s = self.settings
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                sock.close()
                return
            if not tls.server_handshake(sock, addr, s.acse_timeout):
                try:
                    sock.close()
                except OSError:
                    pass
                return
        svc = self.services
        assoc = Association(sock, is_requestor=False, requestor=Peer(address=str(addr[0]), port=int(addr[1])),
                            acceptor=Peer(ae_title=s.ae_title, maximum_length=s.max_pdu), max_pdu=s.max_pdu,
                            idle_timeout=s.idle_timeout, acse_timeout=s.acse_timeout, observers=svc.observers,
                            sink_for=svc.sink_for, dataset_limit=svc.dataset_limit)
        assoc.handlers = svc.handlers
        with self._lock:
            self.active.add(assoc)
        _call(svc.observers, "on_open", assoc)
        try:
            if self._negotiate(assoc):
                self._run(assoc)
        except AssociationEnded:
            pass
        except Exception:
            log.exception("association failed")
            assoc.abort("internal-error", "see the traceback above")
        finally:
            assoc.close()
            with self._lock:
                self.active.discard(assoc)
            _call(svc.observers, "on_close", assoc)

    def _negotiate(self, assoc: Association) -> bool:
        s = self.settings
        assoc._timeout(s.acse_timeout)
        try:
            kind, body = assoc._guarded(assoc.reader.read)
        except socket.timeout:
            log.info(kv(event="association-timeout", peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
                        detail=f"no A-ASSOCIATE-RQ within {s.acse_timeout:g}s"))
            return False
        except AssociationEnded:
            return False
        if kind != pdu.ASSOCIATE_RQ:
            assoc.abort("bad-pdu", f"{pdu.PDU_NAMES[kind]} before A-ASSOCIATE-RQ", source=pdu.ABORT_PROVIDER,
                        reason_code=pdu.UNEXPECTED_PDU)
            return False
        try:
            rq = pdu.decode_associate(body, pdu.ASSOCIATE_RQ)
        except pdu.PduError as exc:
            assoc.abort("bad-pdu", str(exc), source=pdu.ABORT_PROVIDER, reason_code=exc.reason)
            return False
        version = int.from_bytes(bytes(body[0:2]), "big") if len(body) >= 2 else 0
        assoc.primitive = rq
        r = assoc.requestor
        r.ae_title, r.called_ae_title, r.maximum_length = rq.calling, rq.called, rq.max_length
        r.implementation_class_uid, r.implementation_version_name = rq.implementation_uid, rq.implementation_version
        r.role_selection, r.user_identity, r.extended_negotiation = rq.roles, rq.user_identity, rq.extended
        neg = Negotiation(assoc, rq, self.services)
        if not version & 1:
            neg.reject(PROTOCOL_VERSION_NOT_SUPPORTED, "protocol-version")
        elif rq.application_context != pdu.APPLICATION_CONTEXT:
            neg.reject(APPLICATION_CONTEXT_NOT_SUPPORTED, "application-context-not-supported")
        elif s.require_calling is not None and rq.calling not in s.require_calling:
            neg.reject(CALLING_AE_NOT_RECOGNIZED, "calling-ae-not-recognized")
        elif self.count(lambda a: a.is_established) >= s.backstop:
            neg.reject(LOCAL_LIMIT_EXCEEDED, "local-limit-exceeded")
        else:
            _call(self.services.observers, "on_requested", neg)
        if neg.rejection is not None:
            assoc.is_rejected = True
            assoc.reject_reason = neg.reject_reason
            _call(self.services.observers, "on_rejected", assoc)
            try:
                assoc.send_raw(pdu.encode_reject(*neg.rejection))
                # PS3.8 9.1.2: the requestor closes after an A-ASSOCIATE-RJ; wait briefly for it
                assoc._timeout(min(s.acse_timeout, 5.0))
                assoc.sock.recv(1)
            except (OSError, AssociationEnded):
                pass
            return False
        contexts, roles = negotiate(rq, self.services.supported, self.services.role_classes, neg.denied)
        ac = pdu.Associate(called=rq.called, calling=rq.calling, contexts=contexts, max_length=s.max_pdu,
                           roles=roles, async_window=(1, 1) if rq.async_window is not None else None)
        try:
            assoc.send_raw(pdu.encode_associate(ac, pdu.ASSOCIATE_AC))
        except AssociationEnded:
            return False
        assoc.establish(contexts)
        _call(self.services.observers, "on_established", assoc)
        return True

    def _run(self, assoc: Association) -> None:
        while assoc.is_established:
            item = assoc.receive()
            if isinstance(item, Released):
                assoc.answer_release()
                return
            if item == pdu.RELEASE_RP:
                continue
            assoc.serve(item)
