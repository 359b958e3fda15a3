"""The WAN emulator (tests/wan.py) measured before anything is measured through it, and qrproxy's
behaviour over a slow link (issue 18)."""

from __future__ import annotations

import socket
import statistics
import threading
import time

from wan import WanRelay


class _Echo:
    """A TCP echo server (the far end of the emulated link): sends back what it gets, or with
    `sink` swallows it and answers only the final byte count."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_relay_adds_the_round_trip_it_is_asked_for() -> None:
    echo = _Echo()
    try:
        for delay in (0.010, 0.040):
            with WanRelay(("127.0.0.1", echo.port), delay=delay) as wan:
                s = _connect(wan.port)
                rtts = []
                for _ in range(10):
                    t0 = time.monotonic()
                    s.sendall(b"x")
                    assert s.recv(1) == b"x"
                    rtts.append(time.monotonic() - t0)
                s.close()
                rtt = statistics.median(rtts)
                assert 2 * delay <= rtt < 2 * delay + 0.015, (delay, rtts)
    finally:
        echo.close()


def test_relay_limits_the_rate_shared_by_all_connections() -> None:
    echo = _Echo()
    rate = 4_000_000  # bytes/s each way
    try:
        with WanRelay(("127.0.0.1", echo.port), delay=0.005, rate=rate) as wan:
            payload = b"\0" * 2_000_000
            conns = [_connect(wan.port) for _ in range(2)]
            got = [0, 0]

            def drain(i: int) -> None:
                while got[i] < len(payload):
                    chunk = conns[i].recv(1 << 20)
                    if not chunk:
                        break
                    got[i] += len(chunk)

            readers = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
            t0 = time.monotonic()
            for r in readers:
                r.start()
            senders = [threading.Thread(target=c.sendall, args=(payload,)) for c in conns]
            for t in senders:
                t.start()
            for t in senders + readers:
                t.join(60)
            elapsed = time.monotonic() - t0
            for c in conns:
                c.close()
        assert got == [len(payload)] * 2
        measured = 2 * len(payload) / elapsed  # both connections share the link
        assert 0.85 * rate <= measured <= 1.10 * rate, (measured, rate)
    finally:
        echo.close()
