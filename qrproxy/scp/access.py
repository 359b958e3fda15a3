"""Who may associate, from where, and for which service; decided when the A-ASSOCIATE-RQ arrives.

The acceptor (net/acceptor.py) asks every observer's `on_requested` before it negotiates; this
policy answers through `Negotiation.reject` (an A-ASSOCIATE-RJ the association log records like any
other rejection) or `Negotiation.restrict` (contexts answered "abstract syntax not supported").

Checks, in order (docs/operations.md "Security and limits"):

0. global cap: more than `max_associations` associations at once -> rejected-transient /
   service-provider (presentation) / local-limit-exceeded (0x02, 0x03, 0x02), counted here exactly
   (admitted on A-ASSOCIATE-RQ, released when the connection closes; a rejected one never counts).
1. per-peer cap: more than `max_associations_per_peer` associations from one IP address -> A-ASSOCIATE-RJ rejected-transient / service-provider
   (presentation) / local-limit-exceeded (0x02, 0x03, 0x02), what pynetdicom answers for the global
   `max_associations`. Other peers are unaffected.
2. AE title bound to address: a calling AE title that is a node's `ae_title` but arrives from an
   address that is neither the node's `host` nor one of its `addresses` -> rejected-permanent /
   service-user / calling-AE-title-not-recognized (0x01, 0x01, 0x03) when `bind_ae_to_host` holds,
   else accepted with a warning. Host names are resolved once, at start.
3. per-service whitelists (`services:`): the presentation contexts of a service the calling AE may
   not use are taken out of this association's supported contexts before negotiation, so they are
   answered "abstract syntax not supported" (0x03) in the A-ASSOCIATE-AC: what DCMTK's storescp and
   dcmqrscp answer for SOP classes a peer's profile lacks, and what every SCU already handles ("no
   presentation context for ..."), instead of a DIMSE status that C-STORE and C-FIND do not define.
   A calling AE allowed no service at all is rejected like an unknown one (0x01, 0x01, 0x03).
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

from qrproxy.logs import kv
from qrproxy.net.acceptor import CALLING_AE_NOT_RECOGNIZED, LOCAL_LIMIT_EXCEEDED

if TYPE_CHECKING:
    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.assoc")

SERVICES = ("echo", "store", "find", "move", "worklist", "mpps", "commitment")
VERIFICATION = "1.2.840.10008.1.1"


def resolve(host: str) -> set[str]:
    """Every address `host` stands for; the literal itself when it does not resolve (logged)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning(kv(event="node-address-unresolved", host=host, error=exc))
        return {host}
    return {str(info[4][0]) for info in infos}


def service_map(contexts: dict[str, list[tuple[str, list[str]]]]) -> dict[str, str]:
    """Abstract syntax UID -> service name, from each SCP module's `contexts()` (given by app.py, so
    this module needs none of them)."""
    out: dict[str, str] = {}
    for name, service_contexts in contexts.items():
        for uid, _ in service_contexts:
            out[str(uid)] = name
    out[VERIFICATION] = "echo"
    return out  # everything else the SCP supports is a storage SOP class: "store"


def _peer_ip(assoc: Any) -> str:
    address = str(assoc.requestor.address or "")
    return address[7:] if address.startswith("::ffff:") else address


class AccessPolicy:
    """The association-level checks above; built at start, so host names are resolved once."""

    def __init__(self, config: Config, contexts: dict[str, list[tuple[str, list[str]]]]):
        self.config = config
        self.addresses: dict[str, set[str]] = {}  # node AE title -> addresses it may call from
        for node in config.nodes.values():
            allowed: set[str] = set()
            for host in [node.host, *node.addresses]:
                allowed |= resolve(host)
            self.addresses[node.ae_title] = allowed
        self.services = service_map(contexts)
        self._lock = threading.Lock()
        self._admitted: dict[int, str] = {}  # id() of the associations counted against max_associations -> peer IP
        self.allowed: dict[str, set[str] | None] = {}
        for name in SERVICES:
            access = getattr(config.services, name)
            self.allowed[name] = None if access is None else set(access.allowed_calling_ae_titles)

    def may_use(self, calling: str, service: str) -> bool:
        allowed = self.allowed[service]
        return allowed is None or calling in allowed

    def _reject(self, neg: Any, rsd: tuple[int, int, int], reason: str, **fields: Any) -> None:
        assoc = neg.assoc
        with self._lock:
            self._admitted.pop(id(assoc), None)
        log.warning(kv(event="association-rejected", reason=reason, calling=assoc.requestor.ae_title,
                       peer=f"{assoc.requestor.address}:{assoc.requestor.port}", **fields))
        neg.reject(rsd, reason)

    def on_requested(self, neg: Any) -> None:
        assoc = neg.assoc
        cfg = self.config
        calling = assoc.requestor.ae_title
        ip = _peer_ip(assoc)
        # The global cap, counted exactly: admitted on A-ASSOCIATE-RQ, released when the connection
        # closes; a rejected association never counts. Connections still waiting for their
        # A-ASSOCIATE-RQ (port checks, scanners) are not counted: acse_timeout bounds those.
        with self._lock:
            full = len(self._admitted) >= cfg.max_associations
            if not full:
                self._admitted[id(assoc)] = ip
            from_peer = sum(1 for a in self._admitted.values() if a == ip)
        if full:
            self._reject(neg, LOCAL_LIMIT_EXCEEDED, "association-limit", limit=cfg.max_associations)
            return
        if from_peer > cfg.max_associations_per_peer:
            self._reject(neg, LOCAL_LIMIT_EXCEEDED, "per-peer-limit",
                         limit=cfg.max_associations_per_peer, active=from_peer - 1)
            return
        expected = self.addresses.get(calling)
        if expected is not None and ip not in expected:
            shown = ",".join(sorted(expected))
            if cfg.binds_ae_to_host:
                self._reject(neg, CALLING_AE_NOT_RECOGNIZED, "calling-ae-address-mismatch", expected=shown)
                return
            log.warning(kv(event="calling-ae-address-mismatch", calling=calling,
                           peer=f"{assoc.requestor.address}:{assoc.requestor.port}", expected=shown,
                           action="accepted", detail="bind_ae_to_host is false"))
        if all(v is None for v in self.allowed.values()):
            return
        denied = {s for s in SERVICES if not self.may_use(calling, s)}
        if denied == set(SERVICES):
            self._reject(neg, CALLING_AE_NOT_RECOGNIZED, "no-service-allowed")
            return
        if denied:
            self._restrict_contexts(neg, calling, denied)

    def _restrict_contexts(self, neg: Any, calling: str, denied: set[str]) -> None:
        """Answer the contexts of denied services "not supported" on this association only."""
        assoc = neg.assoc
        # A C-GET requester proposes the storage contexts with itself as SCP (role selection): on
        # that association qrproxy sends C-STOREs, so they belong to `move`, not to `store`.
        get_storage = {str(uid) for uid, (_, scp) in (assoc.requestor.role_selection or {}).items() if scp}
        drop = set()
        for cx in neg.rq.contexts:
            uid = cx.abstract_syntax
            service = self.services.get(uid, "store")
            if service == "store" and "store" in denied and uid in get_storage and "move" not in denied:
                continue
            if service in denied:
                drop.add(uid)
        neg.restrict(drop)
        log.info(kv(event="services-restricted", calling=calling,
                    peer=f"{assoc.requestor.address}:{assoc.requestor.port}", denied=",".join(sorted(denied))))

    def on_close(self, assoc: Any) -> None:
        with self._lock:
            self._admitted.pop(id(assoc), None)
