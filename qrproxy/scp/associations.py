"""Association policy and the one log line per association.

The calling-AE whitelist is enforced by the acceptor (net/acceptor.py, `Settings.require_calling`),
which answers A-ASSOCIATE-RJ rejected-permanent / service-user / calling-AE-title-not-recognized
(0x01, 0x01, 0x03), exactly what PS3.8 9.3.4 prescribes. This module only decides the list and logs
the outcome; the other checks (per-peer cap, AE title bound to address, per-service whitelists) are
scp/access.py, the size and time limits on what a peer sends the association's reader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from qrproxy.logs import kv
from qrproxy.net.acceptor import Settings

if TYPE_CHECKING:
    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.assoc")



@dataclass
class _AssocState:
    started: float = field(default_factory=time.monotonic)
    result: str = "closed"
    services: Counter[str] = field(default_factory=Counter)


def called_ae_title(assoc: Any) -> str:
    """The called AE title the peer asked for (`acceptor.ae_title` is qrproxy's own)."""
    return (assoc.requestor.called_ae_title or "").strip()


class Counters(Protocol):
    """What the association log feeds: ops/metrics.py's Metrics, when http: is on."""

    def association(self, result: str, assoc: Any = None) -> None: ...

    def request(self, assoc: Any, command: Any) -> None: ...

    def response(self, assoc: Any, request: Any, code: int) -> None: ...

    def data_received(self, nbytes: int) -> None: ...

    def closed(self, assoc: Any) -> None: ...


class AssociationLog:
    """Collects what happened on each association and logs it once, when the connection closes."""

    def __init__(self, config: Config, metrics: Counters | None, worker: int = 0):
        self.config = config
        self.worker = worker
        self._lock = threading.Lock()
        self._states: dict[int, _AssocState] = {}
        self.metrics = metrics  # ops/metrics.py's counters when http: is on

    def _state(self, assoc: Any) -> _AssocState:
        with self._lock:
            return self._states.setdefault(id(assoc), _AssocState())

    # --- association observer (net/association.py) ----------------------------------------------

    def on_open(self, assoc: Any) -> None:
        self._state(assoc)

    def on_established(self, assoc: Any) -> None:
        self._state(assoc).result = "established"
        if self.metrics is not None:
            self.metrics.association("accepted", assoc)

    def on_rejected(self, assoc: Any) -> None:
        self._state(assoc).result = f"rejected:{assoc.reject_reason or 'local-limit-exceeded'}"
        if self.metrics is not None:
            self.metrics.association("rejected")

    def on_released(self, assoc: Any) -> None:
        self._state(assoc).result = "released"

    def on_aborted(self, assoc: Any) -> None:
        self._state(assoc).result = "aborted"
        if self.metrics is not None:
            self.metrics.association("aborted")

    def on_dimse_received(self, assoc: Any, command: Any) -> None:
        if command.is_response:
            return
        self._state(assoc).services[command.name[:-3]] += 1
        if self.metrics is not None:
            self.metrics.request(assoc, command)

    def on_dimse_sent(self, assoc: Any, request: Any, code: int) -> None:
        if self.metrics is not None:
            self.metrics.response(assoc, request, code)

    def on_data(self, assoc: Any, nbytes: int) -> None:
        if self.metrics is not None:
            self.metrics.data_received(nbytes)

    def on_close(self, assoc: Any) -> None:
        if self.metrics is not None:
            self.metrics.closed(assoc)
        with self._lock:
            st = self._states.pop(id(assoc), None)
        if st is None:
            return
        calling = assoc.requestor.ae_title or ""
        known = calling in self.config.known_calling_ae_titles
        services = ",".join(f"{k}:{v}" for k, v in sorted(st.services.items())) or "-"
        level = logging.WARNING if st.result.startswith("rejected") or st.result == "aborted" else logging.INFO
        if st.result == "closed" and not calling:
            # A TCP connect without an A-ASSOCIATE-RQ: port checks, load balancers, scanners.
            st.result, level = "no-association", logging.DEBUG
        fields: dict[str, object] = dict(
            event="association",
            peer=f"{assoc.requestor.address}:{assoc.requestor.port}",
            calling=calling,
            called=called_ae_title(assoc),
            known=str(known).lower(),
            services=services,
            result=st.result,
            ms=int((time.monotonic() - st.started) * 1000),
        )
        if self.config.workers > 1:  # which process took it (the kernel spreads connections)
            fields["worker"] = self.worker
        log.log(level, kv(**fields))


def settings(cfg: Config) -> Settings:
    """The acceptor's settings from the config. scp/access.py enforces max_associations exactly; the
    acceptor's own count is only a far backstop."""
    return Settings(ae_title=cfg.ae_title, max_pdu=cfg.max_pdu, acse_timeout=cfg.acse_timeout,
                    idle_timeout=cfg.idle_timeout or None,
                    # called AE titles double as routing aliases (QRP_<node>): never required
                    require_calling=set(cfg.known_calling_ae_titles) if cfg.rejects_unknown_ae else None,
                    backstop=max(4 * cfg.max_associations, 1000))
