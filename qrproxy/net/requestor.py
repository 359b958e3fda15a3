"""The requesting side: open a connection, propose contexts and roles, read the answer (PS3.8 7.1,
9.3.2-9.3.4). What can go wrong is named, because each points a site engineer at a different fix:
the name does not resolve, the connection is refused, it timed out, the TLS handshake failed, the
peer rejected the association (with its result, source and reason in words), or aborted it.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from typing import Any

from qrproxy.logs import kv
from qrproxy.net import pdu, tls
from qrproxy.net.association import Association, AssociationEnded, Peer

log = logging.getLogger("qrproxy.upstream")

# PS3.8 table 9-21: (source, reason) of an A-ASSOCIATE-RJ, in words.
REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class ConnectFailed(ConnectionError):
    """No association: `kind` is dns, refused, timeout, tls, rejected, aborted or protocol."""

    def __init__(self, kind: str, detail: str, rejection: tuple[int, int, int] | None = None):
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.rejection = rejection


def reject_words(result: int, source: int, reason: int) -> str:
    words = REJECT_REASONS.get((source, reason), f"source {source} reason {reason}")
    return f"{'permanent' if result == 1 else 'transient'}: {words}"


def reject_hint(rsd: tuple[int, int, int], calling: str, called: str, host: str, port: int) -> str:
    """What to check for the rejections that are configuration mistakes (PS3.8 table 9-21)."""
    _, source, reason = rsd
    if source == 1 and reason == 7:
        return f": {host}:{port} does not answer to AE title {called}; check the node's ae_title against the peer's own"
    if source == 1 and reason == 3:
        return (f": the peer does not know the calling AE title {calling}; add {calling} (at this host's address) "
                "to its known AEs")
    if source == 3 and reason == 2:
        return ": the peer is at its association limit; it is retried later"
    return ""


def connect(host: str, port: int, *, calling: str, called: str, contexts: Sequence[tuple[str, Sequence[str]]],
            roles: dict[str, tuple[bool, bool]] | None = None, max_pdu: int = 0, timeout: float = 30.0,
            connect_timeout: float = 10.0, ssl_context: ssl.SSLContext | None = None,
            observers: list[Any] | None = None, sink_for: Callable[..., Any] | None = None,
            handlers: dict[int, Callable[[Any], Any]] | None = None) -> Association:
    """An established association, or ConnectFailed saying why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConnectFailed("dns", f"host name {host} does not resolve ({exc.strerror})") from None
    sock = None
    last: Exception | None = None
    for family, kind, proto, _, address in infos:
        s = socket.socket(family, kind, proto)
        s.settimeout(connect_timeout)
        try:
            s.connect(address)
            sock = s
            break
        except OSError as exc:
            s.close()
            last = exc
    if sock is None:
        if isinstance(last, (socket.timeout, TimeoutError)):
            raise ConnectFailed("timeout", f"no answer from {host}:{port} within {connect_timeout:g}s") from None
        if isinstance(last, ConnectionRefusedError):
            raise ConnectFailed("refused", f"connection refused by {host}:{port} (nothing listens there)") from None
        raise ConnectFailed("unreachable", f"{host}:{port}: {getattr(last, 'strerror', None) or last}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if ssl_context is not None:
        try:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        except (ssl.SSLError, OSError) as exc:
            sock.close()
            why = tls.ssl_reason(exc)
            log.warning(kv(event="tls-handshake-failed", direction="outbound", peer=f"{host}:{port}", reason=why))
            raise ConnectFailed("tls", f"TLS handshake failed: {why}") from None
    ids = range(1, 256, 2)
    proposed = [pdu.Context(cid, str(abstract), [str(ts) for ts in syntaxes])
                for cid, (abstract, syntaxes) in zip(ids, contexts)]
    rq = pdu.Associate(called=called, calling=calling, contexts=proposed, max_length=max_pdu, roles=dict(roles or {}))
    assoc = Association(sock, is_requestor=True, requestor=Peer(ae_title=calling, maximum_length=max_pdu),
                        acceptor=Peer(ae_title=called, address=host, port=port), max_pdu=max_pdu,
                        idle_timeout=timeout, acse_timeout=timeout, dimse_timeout=timeout,
                        observers=observers, sink_for=sink_for)
    assoc.primitive = rq
    assoc.handlers = dict(handlers or {})
    try:
        assoc.send_raw(pdu.encode_associate(rq, pdu.ASSOCIATE_RQ))
        assoc._timeout(timeout)
        kind, body = assoc.reader.read()
    except socket.timeout:
        assoc.close()
        raise ConnectFailed("timeout", f"{host}:{port} did not answer the A-ASSOCIATE-RQ within {timeout:g}s") from None
    except (pdu.PduError, AssociationEnded, OSError) as exc:
        assoc.close()
        if isinstance(exc, ssl.SSLError):
            why = tls.ssl_reason(exc)
            log.warning(kv(event="tls-handshake-failed", direction="outbound", peer=f"{host}:{port}", reason=why))
            raise ConnectFailed("tls", f"TLS handshake failed: {why}") from None
        raise ConnectFailed("aborted", f"{host}:{port} closed the connection during negotiation ({exc})") from None
    if kind == pdu.ASSOCIATE_RJ:
        rsd = (body[1], body[2], body[3]) if len(body) >= 4 else (1, 1, 1)
        assoc.close()
        raise ConnectFailed("rejected", f"association rejected by {called}@{host}:{port} ({reject_words(*rsd)})"
                            + reject_hint(rsd, calling, called, host, port), rejection=rsd)
    if kind == pdu.ABORT:
        assoc.close()
        raise ConnectFailed("aborted", f"{host}:{port} aborted the association request")
    if kind != pdu.ASSOCIATE_AC:
        assoc.abort("bad-pdu", f"{pdu.PDU_NAMES[kind]} in answer to A-ASSOCIATE-RQ", source=pdu.ABORT_PROVIDER,
                    reason_code=pdu.UNEXPECTED_PDU)
        raise ConnectFailed("protocol", f"{host}:{port} answered the A-ASSOCIATE-RQ with {pdu.PDU_NAMES[kind]}")
    try:
        ac = pdu.decode_associate(body, pdu.ASSOCIATE_AC)
    except pdu.PduError as exc:
        assoc.abort("bad-pdu", str(exc), source=pdu.ABORT_PROVIDER, reason_code=exc.reason)
        raise ConnectFailed("protocol", f"{host}:{port} sent a malformed A-ASSOCIATE-AC: {exc}") from None
    a = assoc.acceptor
    a.maximum_length = ac.max_length
    a.implementation_class_uid, a.implementation_version_name = ac.implementation_uid, ac.implementation_version
    a.role_selection = ac.roles
    by_id = {cx.context_id: cx for cx in proposed}
    negotiated = []
    for answer in ac.contexts:
        mine = by_id.get(answer.context_id)
        if mine is None:
            continue
        cx = pdu.Context(answer.context_id, mine.abstract_syntax, [answer.transfer_syntax], answer.result,
                         answer.transfer_syntax, as_scu=True, as_scp=False)
        if mine.abstract_syntax in rq.roles:
            if mine.abstract_syntax in ac.roles:
                cx.as_scu, cx.as_scp = ac.roles[mine.abstract_syntax]
        negotiated.append(cx)
    if not any(cx.accepted for cx in negotiated):
        # as pynetdicom and DCMTK's SCUs do: an association that can carry nothing is given up
        assoc.abort("local")
        names = ", ".join(sorted({cx.abstract_syntax for cx in proposed}))[:200]
        raise ConnectFailed("no-context", f"{called}@{host}:{port} accepted none of the proposed presentation "
                                          f"contexts ({names})")
    assoc.establish(negotiated)
    return assoc
