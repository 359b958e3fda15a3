"""Builds the running proxy from a Config: database, spool folders, the SCP, background jobs.

`Proxy.start()` returns once the port is listening; `stop()` is what SIGTERM calls. Everything the
proxy runs is started here and stopped here, so shutdown order is in one place.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pynetdicom import AE

from . import upstream
from .config import Config
from .db.session import make_engine, make_sessionmaker, upgrade
from .forwarder import Forwarder
from .logs import kv
from .maintenance import Maintenance
from .scp import echo, store
from .scp.associations import AssociationLog, configure_ae_policy
from .spool import Spool

log = logging.getLogger("qrproxy")


class Proxy:
    def __init__(self, config: Config):
        self.config = config
        self.engine = make_engine(config.database)
        self.sessions = make_sessionmaker(self.engine)
        self.spool = Spool(config.spool_dir)
        self.forwarder = Forwarder(self)
        # fsyncs of received files overlap with parsing and indexing (scp/store.py)
        self.io_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self.maintenance = Maintenance(self)
        self.ae: AE | None = None
        self._server: Any = None
        self._stopping = threading.Event()
        self.assoc_log = AssociationLog(self)

    # --- lifecycle ---------------------------------------------------------------------------

    def prepare(self) -> None:
        """Everything that must be true before the port opens: schema at head, spool folders."""
        upgrade(self.engine)
        self.spool.prepare()
        store.configure_receive(self.spool.incoming)

    def start(self) -> None:
        self.prepare()
        ae = AE(ae_title=self.config.ae_title)
        configure_ae_policy(ae, self)
        handlers: list[tuple[Any, Any]] = list(self.assoc_log.handlers())
        for abstract, syntaxes in echo.contexts() + store.contexts(self.config.store.extra_sop_classes):
            ae.add_supported_context(abstract, syntaxes)
        for service in (echo, store):
            handlers += service.handlers(self)
        self.ae = ae
        self.forwarder.start()
        self.maintenance.start()
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info(kv(event="listening", ae=self.config.ae_title, host=self.config.host, port=self.config.port,
                    database=self.engine.url.render_as_string(hide_password=True), spool=self.config.spool_dir))
        threading.Thread(target=self._check_nodes, name="node-check", daemon=True).start()

    def _check_nodes(self) -> None:
        """An echo to every node at start: the log then says at once which peers are unreachable."""
        try:
            upstream.echo_all(self.config)
        except Exception:  # never fatal: a node check is information, not a precondition
            log.exception("node check failed")

    def notify_forward(self, nodes: list[str]) -> None:
        self.forwarder.notify(nodes)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        log.info(kv(event="stopping"))
        if self.ae is not None:
            self.ae.shutdown()
        self.maintenance.stop()
        self.forwarder.stop()
        self.io_pool.shutdown(wait=True)
        self.engine.dispose()
        log.info(kv(event="stopped"))

    def serve_forever(self) -> None:
        """Run until SIGTERM/SIGINT; the signal only sets a flag, the main thread does the stopping."""
        stop_requested = threading.Event()

        def _on_signal(signum: int, _frame: Any) -> None:
            log.info(kv(event="signal", signal=signal.Signals(signum).name))
            stop_requested.set()

        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        self.start()
        try:
            while not stop_requested.wait(1.0):
                pass
        finally:
            self.stop()
