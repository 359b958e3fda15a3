"""Bandwidth limits per node: what qrproxy sends to a node, shared by all its associations.

A site asks "don't saturate the link in daytime": `bandwidth` (bytes/s) caps every byte qrproxy
writes to the node, and `bandwidth_schedule` windows set another cap at certain hours and days
(host local time, like the refresh jobs' cron). The cap is a token bucket shared by every
association to the node in this process (with `workers: N`, each worker paces its own share:
the limit is divided by the number of workers). The association asks the bucket before each
64 KiB it writes (net/association.py `pace`), so the link sees an even rate.

What qrproxy asks for is limited where it can be: a prefetch (jobs/prefetch.py) spaces its
retrievals so their average stays under the node's current limit (`limit_at`) and the rule's own
`bandwidth`. A retrieve-through is never throttled: a modality is waiting on it, and slowing it
would only turn into the modality's C-MOVE timing out; it takes the link like the site's other
traffic, and forwarding, which is paced, leaves it the room above the limit.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable

from qrproxy.config.schema import WEEKDAYS, BandwidthWindow, Node

BURST = 128 * 1024  # bytes that may go at once after a pause
RECHECK = 10.0  # seconds between looks at the schedule


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


def window_applies(w: BandwidthWindow, when: dt.datetime) -> bool:
    """Whether `when` (local time) falls in the window; one that ends before it starts runs past
    midnight and belongs to the day it started on."""
    start, end, now = _minutes(w.start), _minutes(w.end), when.hour * 60 + when.minute
    today = WEEKDAYS[when.weekday()]
    if start <= end:
        return today in w.days and start <= now < end
    yesterday = WEEKDAYS[(when.weekday() - 1) % 7]
    return (today in w.days and now >= start) or (yesterday in w.days and now < end)


def limit_at(node: Node, when: dt.datetime) -> int:
    """Bytes/s allowed to `node` at `when`: the first window that applies, else `bandwidth`."""
    for w in node.bandwidth_schedule:
        if window_applies(w, when):
            return w.limit
    return node.bandwidth


class Pacer:
    """The token bucket of one node; `take(n)` blocks until n bytes may go."""

    def __init__(self, node: Node, share: int = 1, now: Callable[[], dt.datetime] = dt.datetime.now):
        self.node = node
        self.share = max(1, share)
        self.now = now
        self._lock = threading.Lock()
        self._free_at = time.monotonic()  # when the link is free again
        self._rate = 0.0
        self._checked = -RECHECK
        self._refresh(time.monotonic())

    @property
    def limited(self) -> bool:
        return bool(self.node.bandwidth or self.node.bandwidth_schedule)

    def rate(self) -> float:
        with self._lock:
            self._refresh(time.monotonic())
            return self._rate

    def _refresh(self, mono: float) -> None:
        if mono - self._checked >= RECHECK:
            self._checked = mono
            self._rate = limit_at(self.node, self.now()) / self.share

    def take(self, n: int) -> None:
        with self._lock:
            now = time.monotonic()
            self._refresh(now)
            if self._rate <= 0:
                return
            start = max(self._free_at, now - BURST / self._rate)
            self._free_at = start + n / self._rate
            wait = self._free_at - now
        if wait > 0:
            time.sleep(wait)
