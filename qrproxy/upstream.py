"""The SCU side: associations from qrproxy to configured nodes.

Every outbound association goes through `associate()` so that timeouts, PDU size, calling AE title
(impersonation) and, later, TLS are decided in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from .config import Config, Node
from .logs import kv
from .pynetdicom_tuning import bound_send_queue
from .scp.associations import set_nodelay

log = logging.getLogger("qrproxy.upstream")


class UpstreamError(Exception):
    """The node could not be reached or refused the association; the message says which."""


@dataclass(frozen=True)
class EchoResult:
    node: str
    ok: bool
    detail: str
    ms: int


def _new_ae(config: Config, node: Node, calling_ae: str | None = None) -> AE:
    ae = AE(ae_title=calling_ae or config.ae_title)
    ae.acse_timeout = node.timeout
    ae.dimse_timeout = node.timeout
    ae.network_timeout = node.timeout
    ae.connection_timeout = min(node.timeout, 10.0)
    ae.maximum_pdu_size = node.max_pdu or config.max_pdu
    return ae


@contextmanager
def associate(
    config: Config,
    name: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    calling_ae: str | None = None,
    **kwargs: Any,
) -> Iterator[Any]:
    """An established association to node `name`, released on exit (aborted if the body raised)."""
    node = config.nodes[name]
    ae = _new_ae(config, node, calling_ae)
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    handlers = list(kwargs.pop("evt_handlers", [])) + [(evt.EVT_CONN_OPEN, set_nodelay)]
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title, evt_handlers=handlers, **kwargs)
    if not assoc.is_established:
        if assoc.is_rejected:
            why = "association rejected"
        elif assoc.is_aborted:
            why = "association aborted"
        else:
            why = "no connection"
        raise UpstreamError(f"{name} ({node.ae_title}@{node.host}:{node.port}): {why}")
    bound_send_queue(assoc)
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    else:
        assoc.release()
    finally:
        ae.shutdown()


def echo(config: Config, name: str) -> EchoResult:
    t0 = time.monotonic()
    try:
        with associate(config, name, [(Verification, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]) as assoc:
            status = assoc.send_c_echo()
            code = getattr(status, "Status", None)
            ok = code == 0x0000
            detail = "ok" if ok else ("no response" if code is None else f"status 0x{code:04X}")
    except UpstreamError as exc:
        ok, detail = False, str(exc).split(": ", 1)[-1]
    ms = int((time.monotonic() - t0) * 1000)
    return EchoResult(name, ok, detail, ms)


def echo_all(config: Config) -> list[EchoResult]:
    results = []
    for name in config.nodes:
        r = echo(config, name)
        level = logging.INFO if r.ok else logging.WARNING
        node = config.nodes[name]
        log.log(level, kv(event="node-check", node=name, ae=node.ae_title, addr=f"{node.host}:{node.port}",
                          result=r.detail, ms=r.ms))
        results.append(r)
    return results
