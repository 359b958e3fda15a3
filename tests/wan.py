"""A WAN in userspace: a TCP relay that adds a one-way delay each way and a rate limit shared by
every connection through it (the kernel's netem is not available on these machines).

    with WanRelay(target=("127.0.0.1", pacs_port), delay=0.020, rate=12_500_000) as wan:
        ... connect to ("127.0.0.1", wan.port): RTT +40 ms, 100 Mbit/s shared

Each direction of each connection has a reader (bytes stamped with their arrival time, in order)
and a writer (each piece released `delay` seconds after it arrived, then paced by the direction's
token bucket, which all connections share, as they share a real link). `set_rate()` changes the
rate while running (a link that slows to a trickle). A peer closing its side is passed on after
the bytes before it. Used by tests/test_wan.py and bench/wan; validated there (measured RTT and
bulk rate) before anything is measured through it.
"""

from __future__ import annotations

import collections
import socket
import threading
import time
from typing import Any

PIECE = 16 * 1024  # pacing granularity: a rate-limited link sends in small pieces, not bursts of MB


class TokenBucket:
    """`rate` bytes/s shared by every caller; `burst` bytes may go at once after a pause."""

    def __init__(self, rate: float, burst: int = 2 * PIECE):
        self.rate = float(rate)
        self.burst = burst
        self._lock = threading.Lock()
        self._next = time.monotonic()  # when the link is free again

    def set_rate(self, rate: float) -> None:
        with self._lock:
            self.rate = float(rate)

    def take(self, n: int) -> None:
        """Block until `n` bytes may go (0 rate: unlimited)."""
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(self._next, now - self.burst / self.rate)
            self._next = start + n / self.rate
            wait = self._next - now  # up to `burst` of unused credit makes it <= 0
        if wait > 0:
            time.sleep(wait)


class _Direction:
    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, bucket: TokenBucket):
        self.src, self.dst, self.delay, self.bucket = src, dst, delay, bucket
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.cond = threading.Condition()
        self.closed = False

    def read(self) -> None:
        try:
            while True:
                data = self.src.recv(PIECE)
                if not data:
                    break
                with self.cond:
                    self.queue.append((time.monotonic(), data))
                    self.cond.notify()
        except OSError:
            pass
        with self.cond:
            self.closed = True
            self.cond.notify()

    def write(self) -> None:
        try:
            while True:
                with self.cond:
                    while not self.queue and not self.closed:
                        self.cond.wait()
                    if not self.queue:
                        break
                    arrived, data = self.queue.popleft()
                due = arrived + self.delay - time.monotonic()
                if due > 0:
                    time.sleep(due)
                self.bucket.take(len(data))
                self.dst.sendall(data)
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            try:
                self.src.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class WanRelay:
    def __init__(self, target: tuple[str, int], delay: float = 0.020, rate: float = 0,
                 host: str = "127.0.0.1", port: int = 0):
        self.target = target
        self.delay = delay
        self.up = TokenBucket(rate)    # towards the target
        self.down = TokenBucket(rate)  # back from it
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, port))
        self.listener.listen(64)
        self.host, self.port = self.listener.getsockname()[:2]
        self._sockets: list[socket.socket] = []
        self.connections = 0  # accepted so far (each opens one to the target)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="wan-accept", daemon=True)

    def set_rate(self, rate: float) -> None:
        self.up.set_rate(rate)
        self.down.set_rate(rate)

    def start(self) -> WanRelay:
        self._thread.start()
        return self

    def __enter__(self) -> WanRelay:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stopped = True
        try:
            self.listener.close()
        except OSError:
            pass
        for s in list(self._sockets):
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._sockets.append(s)
            for d in (_Direction(client, server, self.delay, self.up), _Direction(server, client, self.delay, self.down)):
                threading.Thread(target=d.read, name="wan-read", daemon=True).start()
                threading.Thread(target=d.write, name="wan-write", daemon=True).start()
