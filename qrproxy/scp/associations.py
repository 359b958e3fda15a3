"""Association policy and the one log line per association.

The calling-AE whitelist is enforced by pynetdicom itself (`AE.require_calling_aet`), which answers
A-ASSOCIATE-RJ rejected-permanent / service-user / calling-AE-title-not-recognized (0x01, 0x01, 0x03),
exactly what PS3.8 9.3.4 prescribes. This module only decides the list and logs the outcome; the
checks pynetdicom has no setting for (per-peer cap, AE title bound to address, per-service
whitelists) are scp/access.py, the size and time limits on what a peer sends pdu_guard.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pynetdicom import evt

from qrproxy.logs import kv
from qrproxy.net.tuning import set_nodelay
from qrproxy.scp.access import reject_reason

if TYPE_CHECKING:
    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.assoc")

_DIMSE_NAMES = {
    "C_ECHO_RQ": "C-ECHO",
    "C_STORE_RQ": "C-STORE",
    "C_FIND_RQ": "C-FIND",
    "C_MOVE_RQ": "C-MOVE",
    "C_GET_RQ": "C-GET",
    "C_CANCEL_RQ": "C-CANCEL",
    "N_ACTION_RQ": "N-ACTION",
    "N_EVENT_REPORT_RQ": "N-EVENT-REPORT",
    "N_CREATE_RQ": "N-CREATE",
    "N_SET_RQ": "N-SET",
}


@dataclass
class _AssocState:
    started: float = field(default_factory=time.monotonic)
    result: str = "closed"
    services: Counter[str] = field(default_factory=Counter)


def called_ae_title(assoc: Any) -> str:
    """The called AE title the peer asked for (pynetdicom keeps our own title in `acceptor.ae_title`)."""
    primitive = getattr(assoc.requestor, "primitive", None)
    return (getattr(primitive, "called_ae_title", None) or "").strip()


class Counters(Protocol):
    """What the association log feeds: ops/metrics.py's Metrics, when http: is on."""

    def association(self, result: str, assoc: Any = None) -> None: ...

    def response(self, event: Any) -> None: ...

    def data_received(self, event: Any) -> None: ...


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

    def on_open(self, event: Any) -> None:
        set_nodelay(event)
        self._state(event.assoc)

    def on_established(self, event: Any) -> None:
        self._state(event.assoc).result = "established"
        if self.metrics is not None:
            self.metrics.association("accepted", event.assoc)

    def on_rejected(self, event: Any) -> None:
        st = self._state(event.assoc)
        calling = event.assoc.requestor.ae_title
        if reason := reject_reason(event.assoc):
            st.result = f"rejected:{reason}"
        elif self.config.rejects_unknown_ae and calling not in self.config.known_calling_ae_titles:
            st.result = "rejected:calling-ae-not-recognized"
        else:
            st.result = "rejected:local-limit-exceeded"
        if self.metrics is not None:
            self.metrics.association("rejected")

    def on_released(self, event: Any) -> None:
        self._state(event.assoc).result = "released"

    def on_aborted(self, event: Any) -> None:
        self._state(event.assoc).result = "aborted"
        if self.metrics is not None:
            self.metrics.association("aborted")

    def on_dimse(self, event: Any) -> None:
        name = type(event.message).__name__
        if name in _DIMSE_NAMES:
            self._state(event.assoc).services[_DIMSE_NAMES[name]] += 1
            if self.metrics is not None:
                self.metrics.request(event)

    def on_close(self, event: Any) -> None:
        assoc = event.assoc
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

    def handlers(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_CONN_OPEN, self.on_open),
            (evt.EVT_ESTABLISHED, self.on_established),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_DIMSE_RECV, self.on_dimse),
            (evt.EVT_CONN_CLOSE, self.on_close),
        ] + ([] if self.metrics is None else [(evt.EVT_DIMSE_SENT, self.metrics.response),
                                              (evt.EVT_DATA_RECV, self.metrics.data_received)])


def configure_ae_policy(ae: Any, cfg: Config) -> None:
    # scp/access.py enforces max_associations exactly; pynetdicom's own count (every acceptor thread
    # alive, closing ones included) is only a far backstop for connections that never associate.
    ae.maximum_associations = max(4 * cfg.max_associations, 1000)
    ae.maximum_pdu_size = cfg.max_pdu
    ae.acse_timeout = cfg.acse_timeout
    ae.network_timeout = cfg.idle_timeout
    ae.require_called_aet = False  # called AE titles double as routing aliases (QRP_<node>)
    if cfg.rejects_unknown_ae:
        ae.require_calling_aet = sorted(cfg.known_calling_ae_titles)
    else:
        ae.require_calling_aet = []
