"""Prometheus metrics: counters fed by the association events, gauges read from the database per scrape.

Everything lives in one `CollectorRegistry` per Proxy (not prometheus_client's global one), so a test
or a second Proxy in the same process starts from zero and `/metrics` shows only qrproxy's series.

Counting sits on the C-STORE hot path (one call per received PDU and per DIMSE message), so the
label children are looked up once and cached, and nothing here takes a lock of its own: dict
operations on per-association state are atomic under the GIL and prometheus_client's values
carry their own locks. Queue depths, refresh results and spool usage are not counted at all: a
custom collector reads them from the database when Prometheus scrapes (`status.collect()`, the
same facts `qrproxy status` prints), so they are right even after a restart or with several workers.

With `workers: N` (N > 1) the supervisor points PROMETHEUS_MULTIPROC_DIR at a fresh private
directory before it spawns the workers, so prometheus_client's documented multiprocess mode is in
force in each of them: every worker's counters are written to its own mmap files there, and worker
0's `/metrics` sums them with a `MultiProcessCollector` (`scrape_registry`). With one process none
of that happens: the registry below is read directly, as it always was.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from qrproxy.ops.status import Status

# DIMSE request message class -> service label; C-FIND on the MWL model is counted as "MWL".
MWL_FIND = "1.2.840.10008.5.1.4.31"
PENDING = (0xFF00, 0xFF01)
# DIMSE round trips: a C-ECHO or C-STORE takes milliseconds, a C-MOVE of a study minutes.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def status_class(code: int) -> str:
    """PS3.7 C: 0x0000 success; 0x0001, 0x0107, 0x0116, 0xBxxx warning; 0xFE00 cancel; else failure."""
    if code == 0x0000:
        return "success"
    if code in (0x0001, 0x0107, 0x0116) or 0xB000 <= code <= 0xBFFF:
        return "warning"
    if code == 0xFE00:
        return "cancel"
    return "failure"


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process writes to (set by the supervisor), else None."""
    return os.environ.get(MULTIPROC_ENV) or None


def enable_multiprocess() -> str:
    """Supervisor, before spawning workers: a fresh 0700 directory (mkdtemp) named in the environment
    the workers inherit. Fresh, so counters of an earlier run (or another proxy) are never summed in."""
    path = tempfile.mkdtemp(prefix="qrproxy-metrics-")
    os.environ[MULTIPROC_ENV] = path
    return path


def disable_multiprocess(path: str) -> None:
    """Supervisor, after the last worker stopped: the directory and its files go."""
    if os.environ.get(MULTIPROC_ENV) == path:
        del os.environ[MULTIPROC_ENV]
    shutil.rmtree(path, ignore_errors=True)


def worker_exited(pid: int) -> None:
    """Supervisor, when a worker is gone: its live gauges (active associations) stop counting; its
    counters stay in the sum, so totals never go backwards across a worker restart."""
    path = multiprocess_dir()
    if path is not None:
        multiprocess.mark_process_dead(pid, path)


def scrape_registry(metrics: Metrics) -> CollectorRegistry:
    """What `/metrics` exports: this process's registry, or with several workers a fresh registry
    whose MultiProcessCollector sums every worker's files (this process's included)."""
    path = multiprocess_dir()
    if path is None:
        return metrics.registry
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=path)
    return registry


class Metrics:
    """The counters one Proxy feeds (this process's associations; several workers: see module doc)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations = Counter("qrproxy_associations", "Associations by outcome: accepted (established), "
                                    "rejected, aborted (also counted as accepted when they were established)",
                                    ["result"], registry=r)
        # livesum: the workers' values added up, a dead worker's dropped (ignored with one process)
        self.active = Gauge("qrproxy_associations_active", "Associations established and not yet closed",
                            registry=r, multiprocess_mode="livesum")
        self.responses = Counter("qrproxy_dimse_responses", "Final DIMSE responses sent, by service and status "
                                 "class (success, warning, failure, cancel)", ["service", "status"], registry=r)
        self.duration = Histogram("qrproxy_dimse_duration_seconds", "From a DIMSE request received to its final "
                                  "response sent", ["service"], buckets=BUCKETS, registry=r)
        self.received = Counter("qrproxy_received_bytes", "Bytes of PDUs received on DICOM associations",
                                registry=r)
        for result in ("accepted", "rejected", "aborted"):
            self.associations.labels(result)
        self._received_inc = self.received.inc
        self._children: dict[tuple[str, str], tuple[Callable[[float], None], Callable[[float], None]]] = {}
        self._inflight: dict[int, dict[int, tuple[str, float]]] = {}
        self._established: set[int] = set()

    # --- fed by scp/associations.py AssociationLog ------------------------------------------------

    def association(self, result: str, assoc: Any = None) -> None:
        self.associations.labels(result).inc()
        if result == "accepted" and assoc is not None:
            self._established.add(id(assoc))
            self.active.inc()

    def closed(self, assoc: Any) -> None:
        key = id(assoc)
        self._inflight.pop(key, None)
        if key in self._established:
            self._established.discard(key)
            self.active.dec()

    def data_received(self, nbytes: int) -> None:
        self._received_inc(nbytes)

    def request(self, assoc: Any, command: Any) -> None:
        service = command.name[:-3] if command.name.endswith("-RQ") else None
        if service is None or service == "C-CANCEL":
            return
        if service == "C-FIND" and command.AffectedSOPClassUID == MWL_FIND:
            service = "MWL"
        self._inflight.setdefault(id(assoc), {})[command.MessageID] = (service, time.perf_counter())

    def response(self, assoc: Any, request: Any, code: int) -> None:
        """A response sent to `request` with status `code`: the final one ends the request's timing."""
        if code in PENDING:
            return
        inflight = self._inflight.get(id(assoc))
        if not inflight:
            return
        started = inflight.pop(request.MessageID, None)
        if started is None:
            return
        service, t0 = started
        key = (service, status_class(code))
        children = self._children.get(key)
        if children is None:
            children = (self.responses.labels(*key).inc, self.duration.labels(service).observe)
            self._children[key] = children
        children[0](1)
        children[1](time.perf_counter() - t0)


def _epoch(when: dt.datetime | None) -> float | None:
    """A database timestamp (naive UTC from SQLite, aware from PostgreSQL) as Unix time."""
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


class StateCollector(Collector):
    """Gauges evaluated at scrape time from `status.collect()` (no counting in the hot path)."""

    def __init__(self, snapshot: Callable[[], Status], reachability: Callable[[], dict[str, tuple[Any, float]]],
                 started: float):
        self.snapshot = snapshot
        self.reachability = reachability
        self.started = started

    def describe(self) -> list[Any]:
        return []  # unchecked collector: families depend on what the database holds

    def collect(self) -> Iterator[Any]:
        from qrproxy import __version__

        info = GaugeMetricFamily("qrproxy_info", "Version of the running qrproxy (always 1)", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("qrproxy_start_time_seconds", "Unix time the proxy started", value=self.started)
        st = self.snapshot()
        yield GaugeMetricFamily("qrproxy_database_up", "1 when the status queries succeeded",
                                value=0 if st.database_error else 1)
        depth = GaugeMetricFamily("qrproxy_queue_items", "Forward queue rows by node and state",
                                  labels=["node", "state"])
        for node, states in sorted(st.queues.items()):
            for state in ("pending", "inflight", "held", "sent"):
                depth.add_metric([node, state], states.get(state, 0))
            for state, n in sorted(states.items()):
                if state not in ("pending", "inflight", "held", "sent"):
                    depth.add_metric([node, state], n)
        yield depth
        now = time.time()
        oldest = GaugeMetricFamily("qrproxy_queue_oldest_pending_age_seconds",
                                   "Age of the oldest pending or in-flight forward per node", labels=["node"])
        for node, when in sorted(st.oldest.items()):
            ts = _epoch(when)
            if ts is not None:
                oldest.add_metric([node], max(0.0, now - ts))
        yield oldest
        mpps = GaugeMetricFamily("qrproxy_mpps_queue_items", "MPPS relay messages by node and state",
                                 labels=["node", "state"])
        for node, states in sorted(st.mpps_queues.items()):
            for state, n in sorted(states.items()):
                mpps.add_metric([node, state], n)
        yield mpps
        ok = GaugeMetricFamily("qrproxy_refresh_last_run_ok", "1 when the job's latest run succeeded, 0 when it "
                               "failed (absent: never ran)", labels=["job"])
        last = GaugeMetricFamily("qrproxy_refresh_last_run_timestamp_seconds", "When the job's latest run ended "
                                 "(or started, while running)", labels=["job"])
        last_ok = GaugeMetricFamily("qrproxy_refresh_last_success_timestamp_seconds",
                                    "When the job last succeeded", labels=["job"])
        fresh = GaugeMetricFamily("qrproxy_cache_freshness_age_seconds", "Seconds since the job last succeeded: "
                                  "how old the cached answers from its node may be", labels=["job"])
        for name, run in sorted(st.refresh_runs.items()):
            if run["status"] != "running":
                ok.add_metric([name], 1 if run["status"] == "ok" else 0)
            ts = _epoch(run["finished_at"] or run["started_at"])
            if ts is not None:
                last.add_metric([name], ts)
        for name, when in sorted(st.refresh_last_ok.items()):
            ts = _epoch(when)
            if ts is not None:
                last_ok.add_metric([name], ts)
                fresh.add_metric([name], max(0.0, now - ts))
        yield from (ok, last, last_ok, fresh)
        usage = st.spool_usage
        yield GaugeMetricFamily("qrproxy_spool_bytes", "Bytes of instances held in the spool",
                                value=usage.get("bytes", 0))
        yield GaugeMetricFamily("qrproxy_spool_objects", "Instances held in the spool", value=usage.get("objects", 0))
        if st.spool_free is not None:
            yield GaugeMetricFamily("qrproxy_spool_free_bytes", "Free space on the spool file system",
                                    value=st.spool_free)
        reach = GaugeMetricFamily("qrproxy_node_reachable", "1 when the node's last check succeeded (a C-ECHO "
                                  "every node_check_interval, or real traffic)", labels=["node"])
        checked = GaugeMetricFamily("qrproxy_node_last_check_timestamp_seconds", "When the node was last echoed",
                                    labels=["node"])
        problem = GaugeMetricFamily("qrproxy_node_problem", "1 for what the node's last check found wrong, in "
                                    "one word: dns, refused, timeout, unreachable, tls, rejected, aborted, "
                                    "protocol, no-context, status, lost", labels=["node", "kind"])
        for node, (result, when) in sorted(self.reachability().items()):
            reach.add_metric([node], 1 if result.ok else 0)
            checked.add_metric([node], when)
            if not result.ok:
                problem.add_metric([node, getattr(result, "kind", "error")], 1)
        yield reach
        yield checked
        yield problem
        speed = GaugeMetricFamily("qrproxy_node_line_speed_bytes", "Measured speed of the line to the node "
                                  "(what qrproxy sends, all associations), bytes/s", labels=["node"])
        compressed = GaugeMetricFamily("qrproxy_node_auto_compressing", "1 when transfer_syntax: auto sends "
                                       "compressed (lossless) to the node, 0 when as received", labels=["node"])
        slow = CounterMetricFamily("qrproxy_line_too_slow", "Associations cut because they sent slower than "
                                   "the node's min_line_speed", labels=["node"])
        for node, line in sorted(st.lines.items()):
            if line.get("rate") is not None:
                speed.add_metric([node], line["rate"])
            if node in st.config.nodes and st.config.nodes[node].transfer_syntax == "auto":
                compressed.add_metric([node], 1 if line.get("compress") else 0)
            slow.add_metric([node], line.get("too_slow", 0))
        yield from (speed, compressed, slow)
