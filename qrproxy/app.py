"""Builds the running proxy from a Config: database, spool folders, the services, background jobs.

Every service gets the few collaborators it uses, passed here in the order `Proxy.__init__`
states: shared resources first (engine, sessions, spool), then the services that others lean on
(forwarder, retriever), then those built on them. No module imports this one but the CLI.
`Proxy.start()` returns once the port is listening; `stop()` is what SIGTERM calls. Everything the
proxy runs is started here and stopped here, so shutdown order is in one place.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from qrproxy.config.schema import Config
from qrproxy.index.session import make_engine, make_sessionmaker, upgrade
from qrproxy.jobs.commitment import Commitment
from qrproxy.jobs.health import NodeHealth
from qrproxy.jobs.maintenance import Maintenance
from qrproxy.jobs.prefetch import Prefetcher
from qrproxy.jobs.refresh import Refresher
from qrproxy.jobs.retention import Retention
from qrproxy.logs import kv
from qrproxy.net import dimse, tls
from qrproxy.net.acceptor import Server, Services
from qrproxy.net.association import OTHER_DATASET_LIMIT
from qrproxy.ops.metrics import Metrics, disable_multiprocess, enable_multiprocess, worker_exited
from qrproxy.ops.web import HttpEndpoint
from qrproxy.scp import associations, commitment, echo, find, move, mpps, mwl, store
from qrproxy.scp.access import AccessPolicy
from qrproxy.scp.associations import AssociationLog
from qrproxy.scu.forward import Forwarder
from qrproxy.scu.mpps import MppsRelay
from qrproxy.scu.retrieve import Arrivals, Retriever
from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy")

GRACE_SECONDS = 4.0  # SIGTERM: time for in-flight associations before they are aborted (exit < 10 s)


class Proxy:
    def __init__(self, config: Config, worker: int = 0):
        self.config = config
        self.worker = worker
        # shared resources
        self.engine = make_engine(config.database)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = Spool(config.spool_dir, keys=_spool_keys(config))
        # fsyncs of received files overlap with parsing and indexing (scp/store.py)
        self.io_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        # /metrics counters, fed when the http endpoint exists; it is worker 0's, and with several
        # workers every worker counts into the multiprocess directory it sums (ops/metrics.py)
        self.metrics = Metrics() if config.http is not None else None
        # services others lean on
        self.forwarder = Forwarder(config, self.sessions, self.spool, worker)
        self.arrivals = Arrivals()
        self.store_scp = store.StoreSCP(config, self.engine, self.sessions, self.spool, self.io_pool,
                                        self.forwarder.notify, self.arrivals)
        self.retriever = Retriever(config, self.sessions, self.arrivals, receive=self.store_scp.handle,
                                   sink_for=self.store_scp.sink_for)
        # background jobs and the rest of the SCU side
        self.maintenance = Maintenance(self.spool, self.sessions)
        # every node's reachability, echoed on a schedule by worker 0 (the page and /metrics read it)
        self.health = NodeHealth(config, config.node_check_interval)
        self.forwarder.on_delivered = self.health.observe
        self.refresher = Refresher(config, self.sessions)
        self.mpps_relay = MppsRelay(config, self.sessions)
        self.retention = Retention(config, self.sessions, self.spool) if config.retention is not None else None
        self.prefetcher = Prefetcher(config, self.sessions, self.retriever)
        self.storage_classes = {uid for uid, _ in store.contexts(config.store.extra_sop_classes)}
        self.commitment = Commitment(config, self.sessions, self.spool, self.storage_classes,
                                     self.forwarder.notify, worker)
        self.move_scp = move.RetrieveSCP(config, self.sessions, self.spool, self.retriever, self.forwarder)
        self.assoc_log = AssociationLog(config, self.metrics, worker)
        self._server: Any = None
        self._tls_server: Any = None
        self._stopping = threading.Event()
        self.http: HttpEndpoint | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that must be true before the port opens: schema at head, spool folders swept.
        With several workers the supervisor does this once, before any worker receives."""
        upgrade(self.engine)
        self.spool.prepare()

    def start(self, prepare: bool = True) -> None:
        if prepare:
            self.prepare()
        if self.metrics is not None and self.worker == 0:
            # binds now: a taken port fails before anything else starts
            self.http = HttpEndpoint(self.config, self.engine, self.metrics, self.health)
        store.configure_receive(self.spool)
        services = self._services()
        self.forwarder.start()
        self.commitment.start()
        reuse = self.config.workers > 1
        backlog = max(128, 2 * self.config.max_associations)
        acceptor_settings = associations.settings(self.config)
        self._server = Server((self.config.host, self.config.port), acceptor_settings, services,
                              reuse_port=reuse, backlog=backlog)
        self._server.start()
        log.info(kv(event="listening", ae=self.config.ae_title, host=self.config.host, port=self.config.port,
                    worker=self.worker, database=self.engine.url.render_as_string(hide_password=True),
                    spool=self.config.spool_dir))
        if self.config.tls is not None:  # same AE, contexts and services; TLS on its own port
            self._tls_server = Server((self.config.host, self.config.tls.port), acceptor_settings, services,
                                      ssl_context=tls.server_context(self.config.tls), reuse_port=reuse,
                                      backlog=backlog, name="dicom-tls-server")
            self._tls_server.start()
            log.info(kv(event="listening", ae=self.config.ae_title, host=self.config.host,
                        port=self.config.tls.port, tls="true",
                        client_certs="required" if self.config.tls.ca_file is not None else "not-asked",
                        worker=self.worker))
        if self.worker == 0:
            if self.http is not None:
                self.http.start()
            self._warn_not_yet_implemented()
            if self.config.tls is not None:
                tls.log_certificate_expiry(self.config.tls)
            self.maintenance.start()
            self.refresher.start()
            self.mpps_relay.start()
            if self.retention is not None:
                self.retention.start()
            self.prefetcher.start()
            self.health.start()

    def _services(self) -> Services:
        """What the acceptor offers: each SCP module's contexts, its handler per DIMSE command, and
        the observers that log, count, police and keep commitment's bookkeeping."""
        cfg = self.config
        supported: dict[str, list[str]] = {}
        for abstract, syntaxes in (echo.contexts() + find.contexts() + mwl.contexts() + mpps.contexts()
                                   + move.contexts() + commitment.contexts()
                                   + store.contexts(cfg.store.extra_sop_classes)):
            supported.setdefault(str(abstract), [str(ts) for ts in syntaxes])
        # Storage contexts accept SCP/SCU role selection (a C-GET requester proposes to be the SCP);
        # commitment too: modalities request it (default roles), nodes may report with the SCP role.
        role_classes = set(self.storage_classes) | {uid for uid, _ in commitment.contexts()}
        finds = {**find.handlers(cfg, self.engine, self.sessions), **mwl.handlers(cfg, self.engine)}

        def c_find(event: Any) -> Any:
            return finds.get(str(event.request.AffectedSOPClassUID), finds[next(iter(finds))])(event)

        mpps_scp = mpps.service(cfg, self.sessions, self.mpps_relay)
        commit_scp = commitment.service(cfg, self.sessions, self.spool, self.commitment)
        handlers = {dimse.C_ECHO: echo.handle_echo, dimse.C_STORE: self.store_scp.handle, dimse.C_FIND: c_find,
                    dimse.C_MOVE: self.move_scp.handle_move, dimse.C_GET: self.move_scp.handle_get,
                    dimse.N_CREATE: mpps_scp.on_create, dimse.N_SET: mpps_scp.on_set,
                    dimse.N_ACTION: commit_scp.on_action, dimse.N_EVENT_REPORT: commit_scp.on_event_report}
        non_storage = {"echo": echo.contexts(), "find": find.contexts(), "worklist": mwl.contexts(),
                       "mpps": mpps.contexts(), "move": move.contexts(), "commitment": commitment.contexts()}
        max_dataset = cfg.store.max_dataset_size
        storage = self.storage_classes

        def dataset_limit(cx: Any) -> int:
            return max_dataset if cx.abstract_syntax in storage else OTHER_DATASET_LIMIT

        observers = [AccessPolicy(cfg, non_storage), self.assoc_log, self.store_scp, commit_scp]
        return Services(supported=supported, role_classes=role_classes, handlers=handlers,
                        sink_for=self.store_scp.sink_for, dataset_limit=dataset_limit, observers=observers)

    def _warn_not_yet_implemented(self) -> None:
        """Config keys the contract defines but this version does not act on yet: say so loudly
        rather than let a site believe, say, that its spool is encrypted."""
        cfg = self.config
        gaps = []
        if any(m.on != "store" for m in cfg.mutations):
            gaps.append("mutations on worklist/query are not applied yet")
        for gap in gaps:
            log.warning(kv(event="not-implemented", detail=gap))
        if cfg.query.mode != "cache-only" and find.query_node(cfg) is None:
            log.warning(kv(event="query-mode", mode=cfg.query.mode,
                           detail="no node has role query: C-FIND is answered from the cache only"))

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info(kv(event="stopping"))
        # Stop accepting, give associations in progress a few seconds to finish their C-STOREs,
        # then abort what is left: nothing unacknowledged is kept, nothing acknowledged is lost.
        servers = [srv for srv in (self._server, self._tls_server) if srv is not None]
        for srv in servers:
            srv.shutdown()
        deadline = time.monotonic() + GRACE_SECONDS
        while any(srv.count() for srv in servers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for srv in servers:
            srv.abort_all()
        self.maintenance.stop()
        self.refresher.stop()
        self.health.stop()
        self.mpps_relay.stop()
        if self.retention is not None:
            self.retention.stop()
        self.prefetcher.stop()
        self.commitment.stop()
        self.forwarder.stop(timeout=3.0)
        self.io_pool.shutdown(wait=True)
        if self.http is not None:
            self.http.stop()
        self.engine.dispose()
        log.info(kv(event="stopped"))

    def serve_forever(self, prepare: bool = True) -> None:
        """Run until SIGTERM/SIGINT; the signal only sets a flag, the main thread does the stopping."""
        stop_requested = _stop_on_signals()
        self.start(prepare=prepare)
        try:
            while not stop_requested.wait(1.0):
                pass
        finally:
            self.stop()


def _spool_keys(config: Config) -> Any:
    """The key file's keys when `encryption` is configured (checked by load_config for serve)."""
    if config.encryption is None:
        return None
    from qrproxy.store.keys import load

    return load(config.encryption.key_file)


def _stop_on_signals() -> threading.Event:
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        log.info(kv(event="signal", signal=signal.Signals(signum).name, pid=os.getpid()))
        stop_requested.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    return stop_requested


def _worker_main(config: Config, index: int) -> None:
    from qrproxy.logs import setup_logging

    setup_logging(config.log.level, config.log.file, config.log.dicom_debug, config.log.max_size,
                  config.log.backups)
    Proxy(config, worker=index).serve_forever(prepare=False)


def serve(config: Config) -> None:
    """`qrproxy serve`: one Proxy in this process, or with `workers: N` a supervisor that prepares
    the database and spool once, then runs N worker processes on one port (SO_REUSEPORT) and
    restarts any that dies."""
    if config.workers <= 1:
        Proxy(config).serve_forever()
        return
    proxy = Proxy(config)
    proxy.prepare()
    proxy.engine.dispose()
    # /metrics in worker 0 sums every worker's counters: prometheus_client multiprocess mode, set up
    # in the environment the spawned workers inherit (they import prometheus_client afresh)
    metrics_dir = enable_multiprocess() if config.http is not None else None
    ctx = multiprocessing.get_context("spawn")
    stop_requested = _stop_on_signals()
    procs: dict[int, Any] = {}

    def launch(i: int) -> None:
        p = ctx.Process(target=_worker_main, args=(config, i), name=f"qrproxy-worker-{i}", daemon=False)
        p.start()
        procs[i] = p
        log.info(kv(event="worker-started", worker=i, pid=p.pid))

    for i in range(config.workers):
        launch(i)
    try:
        while not stop_requested.wait(0.5):
            for i, p in list(procs.items()):
                if not p.is_alive():
                    log.error(kv(event="worker-died", worker=i, pid=p.pid, exitcode=p.exitcode))
                    if metrics_dir is not None:
                        worker_exited(p.pid)
                    launch(i)
    finally:
        for p in procs.values():
            if p.is_alive():
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + 9.0
        for p in procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        if metrics_dir is not None:
            disable_multiprocess(metrics_dir)
        log.info(kv(event="stopped", workers=len(procs)))
