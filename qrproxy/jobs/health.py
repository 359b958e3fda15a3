"""Node health: every node echoed on a schedule, changes logged, the latest result kept for the
status page and /metrics.

A site engineer needs three things from it: the moment a node goes down (one line, with the reason
in the words of net/requestor.py: does not resolve, refused, timed out, TLS, rejected and why), the
moment it is back (one line, with how long it was down), and an age on every result so that a stale
answer is never mistaken for a fresh one. The outcome of real traffic counts too (`observe`): the
forwarder delivering to a node proves it reachable sooner than the next echo would.

A node whose only role is `modality` is checked like the others, but its being off is normal (a
scanner switched off at night): its changes are logged at INFO, never as warnings.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from qrproxy.config.schema import Config
from qrproxy.logs import kv
from qrproxy.scu import upstream
from qrproxy.scu.upstream import EchoResult

log = logging.getLogger("qrproxy.health")

ECHO_TIMEOUT = 5.0  # a health echo gives up sooner than a node's own timeout
BUSY_GRACE = 60.0  # s: a delivery this recent makes a rejected echo "busy", not down


class NodeHealth:
    def __init__(self, config: Config, interval: float, echo: Callable[[Config, str], EchoResult] = upstream.echo):
        nodes = {name: node.model_copy(update={"timeout": min(node.timeout, ECHO_TIMEOUT)})
                 for name, node in config.nodes.items()}
        self.config = config.model_copy(update={"nodes": nodes})
        self.interval = interval
        self.echo = echo
        self.results: dict[str, tuple[EchoResult, float]] = {}
        self._down_since: dict[str, float] = {}
        self._traffic_at: dict[str, float] = {}  # last delivery by real traffic (monotonic)
        self._lock = threading.Lock()
        self._first_round = threading.Event()
        self._scheduler: Any = None

    # --- schedule -----------------------------------------------------------------------------

    def start(self) -> None:
        """The first round at once (the log says at start which peers are unreachable), then every
        `interval` seconds; with interval 0 only the first round."""
        if not self.config.nodes:
            self._first_round.set()
            return
        if self.interval <= 0:
            threading.Thread(target=self.check_all, name="node-check", daemon=True).start()
            return
        from apscheduler.schedulers.background import BackgroundScheduler
        from apscheduler.triggers.interval import IntervalTrigger

        scheduler = BackgroundScheduler(daemon=True)
        scheduler.add_job(self.check_all, IntervalTrigger(seconds=self.interval), id="node-health",
                          max_instances=1, coalesce=True, misfire_grace_time=None,
                          next_run_time=_now())
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def check_all(self) -> list[EchoResult]:
        names = list(self.config.nodes)
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(names))), thread_name_prefix="node-check") as pool:
                results = list(pool.map(lambda n: self.echo(self.config, n), names))
        except Exception:  # information, never fatal
            log.exception("node check failed")
            return []
        finally:
            self._first_round.set()
        return [self.record(self._busy(r)) for r in results]

    def _busy(self, r: EchoResult) -> EchoResult:
        """A node that turned the echo's association down while it works is busy, not down (a PACS
        allowing a sender N associations, all in use by the forwarder): a transient rejection
        leaves an up node up; a rejection of another kind, or a close during negotiation, counts as
        busy only while real traffic to the node works. Nothing listening, or no answer, is down."""
        with self._lock:
            seen = self._traffic_at.get(r.node, 0.0)
            previous = self.results.get(r.node)
        recent = time.monotonic() - seen <= max(self.interval, BUSY_GRACE)
        if r.ok or not ((r.busy and previous is not None and previous[0].ok)
                        or (r.kind in ("rejected", "aborted") and recent)):
            return r
        return replace(r, ok=True, kind="busy", detail=f"up; the check itself was turned down: {r.detail}")

    # --- results ------------------------------------------------------------------------------

    def observe(self, node: str, ok: bool, detail: str) -> None:
        """A delivery to `node` by real traffic: proof it is up, sooner than the next echo. Only
        successes count (the forwarder logs its own failures, once per outage), and only once this
        process checks nodes at all (worker 0)."""
        with self._lock:
            known = node in self.results
            if ok:
                self._traffic_at[node] = time.monotonic()
        if ok and known:
            self.record(EchoResult(node, True, detail, 0), source="traffic")

    def record(self, r: EchoResult, source: str = "echo") -> EchoResult:
        now = time.time()
        with self._lock:
            previous = self.results.get(r.node)
            self.results[r.node] = (r, now)
            was_ok = None if previous is None else previous[0].ok
            if not r.ok and r.node not in self._down_since:
                self._down_since[r.node] = now
            down_since = self._down_since.pop(r.node, None) if r.ok else None
        node = self.config.nodes[r.node]
        quiet = set(node.roles) <= {"modality"}  # a scanner switched off is not a fault
        where: dict[str, Any] = {"ae": node.ae_title, "addr": f"{node.host}:{node.port}"}
        if node.tls:
            where["tls"] = "true"
        if was_ok is None:
            # the first result, at start: one line per node whatever it says
            level = logging.INFO if r.ok or quiet else logging.WARNING
            log.log(level, kv(event="node-check", node=r.node, **where, result=r.detail, ms=r.ms,
                              **({"role": "modality"} if quiet else {})))
        elif was_ok and not r.ok:
            log.log(logging.INFO if quiet else logging.WARNING,
                    kv(event="node-down", node=r.node, **where, reason=r.detail, seen_by=source,
                       **({"role": "modality"} if quiet else {})))
        elif not was_ok and r.ok:
            after = f"{now - down_since:.0f}s" if down_since else "-"
            log.info(kv(event="node-back", node=r.node, **where, down_for=after, seen_by=source))
        return r

    def snapshot(self) -> dict[str, tuple[EchoResult, float]]:
        with self._lock:
            return dict(self.results)

    def fresh(self, wait: float = 0.0) -> dict[str, tuple[EchoResult, float]]:
        """The results, waiting up to `wait` seconds for the first round (a page loaded at start)."""
        if wait and not self._first_round.is_set():
            self._first_round.wait(wait)
        return self.snapshot()


def _now() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc)
