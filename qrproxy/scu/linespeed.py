"""Line speed per node, measured on what qrproxy sends: the `min_line_speed` watchdog and
`transfer_syntax: auto` both read it.

Measured, not configured, because a site's link is shared with everything else the site does and
its speed changes over the day. Each instance is timed from its first byte to its C-STORE response;
its bytes/s times the number of the node's associations busy at that moment (they share the link)
is one sample of the node's line speed, smoothed (EWMA). On a far link a small instance is bound by
the round trip more than by the bandwidth: the estimate then reads low, which only makes `auto`
compress a little sooner.

`auto` (never lossy): compress to JPEG-LS lossless (JPEG 2000 lossless without a JPEG-LS encoder)
when the link is the bottleneck and the CPU can keep up, that is when the conversion pool's measured
throughput (input bytes/s over all its processes) is at least COMPRESS_AT times the line speed and
compression measurably shrinks the instances. Back to as-received below KEEP_AT times (hysteresis: a
link near the boundary does not flip every instance). Until the line has been measured: as received.

`min_line_speed` (DICOM Capacitor's MinimumLineSpeed): the watchdog looks at every association
that has an instance in flight; one that moved fewer than `min_line_speed` bytes/s over the last
`min_line_speed_window` is cut (scu/forward.py then retries it with the node's backoff). A stalled
link thus never holds a queue longer than the window.

The measured figures are published as a small JSON file per process under the spool's `state/`
folder, so that `qrproxy status` (another process) and /metrics can show them.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qrproxy.logs import kv

log = logging.getLogger("qrproxy.forward")

SMOOTHING = 0.3  # weight of a new sample
COMPRESS_AT = 2.0  # pool throughput / line speed at or above which `auto` compresses
KEEP_AT = 1.5  # ... and below which it goes back to as-received
WORTH_IT = 0.9  # compressed/original size above this: compression does not pay
DEFAULT_CODEC_RATE = 20e6  # bytes/s per process before the first conversion is measured (JPEG-LS, CT)
MIN_SAMPLE = 32 * 1024  # smaller instances measure the round trip more than the line
TICK = 0.5  # seconds between the watchdog's looks
PUBLISH_EVERY = 5.0  # seconds between writes of the published figures


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - SMOOTHING) * old + SMOOTHING * new


class CodecRate:
    """How fast the conversion pool compresses, and how much: shared by every node (the same CPU)."""

    def __init__(self, processes: int):
        self.processes = max(1, processes)
        self.per_process: float | None = None  # input bytes/s of one conversion process
        self.ratio: float | None = None  # written / original size
        self._lock = threading.Lock()

    def converted(self, src_bytes: int, out_bytes: int, seconds: float) -> None:
        if seconds <= 0 or src_bytes <= 0:
            return
        with self._lock:
            self.per_process = _ewma(self.per_process, src_bytes / seconds)
            self.ratio = _ewma(self.ratio, out_bytes / src_bytes)

    def throughput(self) -> float:
        with self._lock:
            return (self.per_process or DEFAULT_CODEC_RATE) * self.processes

    def pays(self) -> bool:
        with self._lock:
            return self.ratio is None or self.ratio < WORTH_IT


class Line:
    """One node's measured line speed, `auto` choice and slow-line count."""

    def __init__(self, node: str, codec: CodecRate):
        self.node = node
        self.codec = codec
        self.rate: float | None = None  # bytes/s, all associations together
        self.compress = False
        self.too_slow = 0  # associations cut by the watchdog
        self.busy = 0  # associations with an instance in flight
        self._lock = threading.Lock()

    def start(self) -> int:
        with self._lock:
            self.busy += 1
            return self.busy

    def done(self, nbytes: int, seconds: float, parallel: int, ok: bool) -> None:
        with self._lock:
            self.busy = max(0, self.busy - 1)
            if ok and seconds > 0 and nbytes >= MIN_SAMPLE:
                self.rate = _ewma(self.rate, nbytes / seconds * max(1, parallel))

    def choose(self) -> bool:
        """Whether `auto` compresses what goes next; logs each change."""
        with self._lock:
            rate, was = self.rate, self.compress
        if rate is None:
            return False
        pool = self.codec.throughput()
        if not self.codec.pays():
            now = False
        elif was:
            now = pool >= KEEP_AT * rate
        else:
            now = pool >= COMPRESS_AT * rate
        if now != was:
            with self._lock:
                self.compress = now
            log.info(kv(event="auto-transfer-syntax", node=self.node, send="compressed" if now else "as-received",
                        line=f"{rate / 1e6:.2f}MB/s", codec=f"{pool / 1e6:.1f}MB/s",
                        ratio="-" if self.codec.ratio is None else f"{self.codec.ratio:.2f}"))
        return now

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"rate": self.rate, "compress": self.compress, "too_slow": self.too_slow}


class Watch:
    """One association with an instance in flight, as the watchdog sees it."""

    def __init__(self, assoc: Any, node: str, min_rate: float, window: float):
        self.assoc, self.node, self.min_rate, self.window = assoc, node, min_rate, window
        self.started = time.monotonic()
        self.samples: deque[tuple[float, int]] = deque([(self.started, assoc.bytes_sent)])
        self.cut: str | None = None  # why the watchdog cut it


class Watchdog(threading.Thread):
    """Cuts associations slower than their node's `min_line_speed` over its window, and calls
    `publish` every PUBLISH_EVERY seconds."""

    def __init__(self, stopping: threading.Event, on_cut: Callable[[Watch, float], None],
                 publish: Callable[[], None] | None = None):
        super().__init__(name="line-watchdog", daemon=True)
        self.stopping = stopping
        self.on_cut = on_cut
        self.publish = publish
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()

    def watch(self, w: Watch) -> None:
        with self._lock:
            self._watches.add(w)

    def unwatch(self, w: Watch) -> None:
        with self._lock:
            self._watches.discard(w)

    def run(self) -> None:
        published = 0.0
        while not self.stopping.wait(TICK):
            with self._lock:
                watches = list(self._watches)
            now = time.monotonic()
            if self.publish is not None and now - published >= PUBLISH_EVERY:
                published = now
                self.publish()
            for w in watches:
                rate = check(w, now, w.assoc.bytes_sent)
                if rate is not None:
                    self.unwatch(w)
                    self.on_cut(w, rate)


def check(w: Watch, now: float, total: int) -> float | None:
    """The bytes/s of the last window when it is below the minimum (cut it), else None."""
    w.samples.append((now, total))
    while len(w.samples) > 1 and w.samples[1][0] <= now - w.window:
        w.samples.popleft()
    if now - w.started < w.window:
        return None
    t0, b0 = w.samples[0]
    span = max(now - t0, 1e-6)
    rate = (total - b0) / span
    return rate if rate < w.min_rate else None


# --- published for `status` and /metrics -------------------------------------------------------


def state_dir(spool_dir: str | os.PathLike[str]) -> Path:
    return Path(spool_dir) / "state"


def publish(spool_dir: str | os.PathLike[str], worker: int, lines: Iterable[Line]) -> None:
    """Write this process's figures (atomically: a reader never sees half a file)."""
    folder = state_dir(spool_dir)
    folder.mkdir(parents=True, exist_ok=True)
    data = {"pid": os.getpid(), "time": time.time(), "nodes": {ln.node: ln.snapshot() for ln in lines}}
    tmp = folder / f".lines-{worker}.json.tmp"
    tmp.write_text(json.dumps(data))  # a status figure: no fsync
    os.replace(tmp, folder / f"lines-{worker}.json")


def read_published(spool_dir: str | os.PathLike[str], max_age: float = 120.0) -> dict[str, dict[str, Any]]:
    """Per node, over the processes that published lately: summed line speed and slow-line count,
    and whether any of them sends compressed (`auto`)."""
    out: dict[str, dict[str, Any]] = {}
    folder = state_dir(spool_dir)
    try:
        files = sorted(folder.glob("lines-*.json"))
    except OSError:
        return out
    now = time.time()
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        fresh = now - float(data.get("time", 0)) <= max_age
        for node, fig in data.get("nodes", {}).items():
            agg = out.setdefault(node, {"rate": None, "compress": False, "too_slow": 0})
            agg["too_slow"] += int(fig.get("too_slow") or 0)
            if fresh and fig.get("rate") is not None:
                agg["rate"] = (agg["rate"] or 0.0) + float(fig["rate"])
                agg["compress"] = agg["compress"] or bool(fig.get("compress"))
    return out
