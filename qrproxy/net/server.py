"""The threaded association server qrproxy listens with: pynetdicom's ThreadedAssociationServer,
passed to AE.make_server() (the customisation hook pynetdicom offers), with what a site needs on
top: several worker processes on one port, a listen backlog sized for bursts, the TLS handshake in
the association's own thread, and the PDU limits of pdu_guard.
"""

from __future__ import annotations

import socket
import socketserver
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from qrproxy.net import tls
from qrproxy.net.pdu_guard import GuardedRequestHandler


class Server(ThreadedAssociationServer):
    """pynetdicom's threaded server, passed to AE.make_server() (the customisation hook pynetdicom
    offers): with `workers` > 1 it binds with SO_REUSEPORT so the processes share one port and the
    kernel spreads associations across them (one GIL each). Started and stopped by Proxy itself, so
    it is not in the AE's own server list."""

    reuse_port = False
    limits: Any = None  # pdu_guard.Limits, set by Proxy.start before serving

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("request_handler", GuardedRequestHandler)
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    # The TLS port (`ssl_context` set): pynetdicom would handshake inside accept(), in the one thread
    # that accepts for everyone, and drop failures silently. Here accept() only wraps, and the
    # handshake runs (bounded, logged) in the association's own thread.
    def get_request(self) -> tuple[Any, Any]:
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.ssl_context and not tls.server_handshake(request, client_address, self.ae.acse_timeout):
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def listen_backlog(server: Any, max_associations: int) -> None:
    """Listen again with a backlog for a burst of `max_associations` connects. socketserver listens
    with 5: in a burst of 150, 17-54 connects waited for the client's SYN retry (1 s, then 3, 7 ...).
    Calling listen() on a listening socket only changes its backlog (the kernel caps it at
    net.core.somaxconn)."""
    server.socket.listen(max(128, 2 * max_associations))


class ReusePortServer(Server):
    reuse_port = True
