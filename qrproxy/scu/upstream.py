"""The SCU side: associations from qrproxy to configured nodes.

Every outbound association goes through `associate()` so that timeouts, PDU size, calling AE title
(impersonation) and TLS (nodes with `tls: true`, see qrproxy/tls.py) are decided in one place.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom.dataset import Dataset
from pynetdicom.sop_class import (ModalityWorklistInformationFind, PatientRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelFind, Verification)

from qrproxy.config.schema import Config
from qrproxy.net import dimse
from qrproxy.net.association import Association, AssociationEnded
from qrproxy.net.requestor import ConnectFailed, connect
from qrproxy.net.tls import TlsError, node_client_context

log = logging.getLogger("qrproxy.upstream")


class UpstreamError(Exception):
    """The node could not be reached or refused the association; the message says which, `kind`
    names it in one word (net/requestor.py's: dns, refused, timeout, unreachable, tls, rejected,
    aborted, protocol, no-context; or config, status, lost). `busy`: rejected-transient (PS3.8
    9.3.4: local limit exceeded, congestion): the node is up, just not taking one more now."""

    def __init__(self, message: str, kind: str = "error", busy: bool = False):
        super().__init__(message)
        self.kind = kind
        self.busy = busy


@dataclass(frozen=True)
class EchoResult:
    node: str
    ok: bool
    detail: str
    ms: int
    kind: str = "ok"  # else what went wrong, in one word (UpstreamError.kind)
    busy: bool = False  # UpstreamError.busy: turned down for now, so reachable


@contextmanager
def associate(
    config: Config,
    name: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    calling_ae: str | None = None,
    roles: dict[str, tuple[bool, bool]] | None = None,
    on_store: Callable[[Any], Any] | None = None,
    sink_for: Callable[..., Any] | None = None,
    opener: Callable[[Any], BinaryIO] | None = None,
) -> Iterator[Association]:
    """An established association to node `name`, released on exit (aborted if the body raised).
    `on_store` serves the C-STORE requests the node sends on it (a C-GET's sub-operations), with
    their data sets written through `sink_for`; `opener` reads the files `send_c_store` is given
    (the spool's, which decrypts)."""
    node = config.nodes[name]
    ssl_context = None
    if node.tls:
        if config.tls is None:
            raise UpstreamError(f"{name}: tls: true but no tls: section in the config", "config")
        try:
            ssl_context = node_client_context(config.tls)
        except TlsError as exc:
            raise UpstreamError(f"{name}: tls.{exc.key}: {exc}", "config") from None
    try:
        assoc = connect(node.host, node.port, calling=calling_ae or config.ae_title, called=node.ae_title,
                        contexts=contexts, roles=roles, max_pdu=node.max_pdu or config.max_pdu,
                        timeout=node.timeout, connect_timeout=min(node.timeout, 10.0), ssl_context=ssl_context,
                        sink_for=sink_for, handlers={dimse.C_STORE: on_store} if on_store else None)
    except ConnectFailed as exc:
        raise UpstreamError(f"{name} ({node.ae_title}@{node.host}:{node.port}): {exc.detail}", exc.kind,
                            busy=exc.rejection is not None and exc.rejection[0] == 2) from None
    if opener is not None:
        assoc.opener = opener
    try:
        yield assoc
    except BaseException:
        assoc.abort("local")
        raise
    else:
        assoc.release()


def echo(config: Config, name: str) -> EchoResult:
    t0 = time.monotonic()
    try:
        with associate(config, name, [(Verification, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])]) as assoc:
            status = assoc.send_c_echo()
            code = getattr(status, "Status", None)
            ok = code == 0x0000
            detail = "ok" if ok else ("no response" if code is None else f"C-ECHO answered status 0x{code:04X}")
            kind = "ok" if ok else ("lost" if code is None else "status")
    except UpstreamError as exc:
        ms = int((time.monotonic() - t0) * 1000)
        return EchoResult(name, False, str(exc).split(": ", 1)[-1], ms, exc.kind, busy=exc.busy)
    except (AssociationEnded, OSError) as exc:  # the peer aborted or vanished during the echo
        ok, detail, kind = False, f"association lost during C-ECHO: {exc}", "lost"
    ms = int((time.monotonic() - t0) * 1000)
    return EchoResult(name, ok, detail, ms, kind)


FIND_MODELS = {
    "study": StudyRootQueryRetrieveInformationModelFind,
    "patient": PatientRootQueryRetrieveInformationModelFind,
    "worklist": ModalityWorklistInformationFind,
}
_FIND_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


class FindSession:
    """C-FIND requests over one association (see `find_session`): `find(identifier)` returns the
    matches of one request, and raises UpstreamError on a failure status, a lost association, no
    answer within the node's timeout, or when `deadline` (time.monotonic()) or `cancel` is reached."""

    def __init__(self, assoc: Any, name: str, model: str, node_timeout: float, deadline: float | None,
                 cancel: Any = None):
        self.assoc, self.name, self.model = assoc, name, model
        self.node_timeout, self.deadline, self.cancel = node_timeout, deadline, cancel
        self.requests = 0

    def _check(self) -> float:
        if self.cancel is not None and self.cancel.is_set():
            raise UpstreamError(f"{self.name}: C-FIND cancelled (shutting down)")
        if self.deadline is None:
            return self.node_timeout
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise UpstreamError(f"{self.name}: C-FIND timed out")
        return min(self.node_timeout, left)

    def find(self, identifier: Dataset) -> list[Dataset]:
        try:
            return self._find(identifier)
        except (OSError, RuntimeError, ValueError) as exc:  # pynetdicom: encoding, a dead association
            raise UpstreamError(f"{self.name}: C-FIND: {type(exc).__name__}: {exc}") from exc

    def _find(self, identifier: Dataset) -> list[Dataset]:
        self.assoc.dimse_timeout = self._check()
        self.requests += 1
        out: list[Dataset] = []
        for status, match in self.assoc.send_c_find(identifier, self.model):
            code = getattr(status, "Status", None)
            if code is None:
                why = "association lost" if not self.assoc.is_established else "no response"
                if self.deadline is not None and time.monotonic() >= self.deadline:
                    why = "timed out"
                raise UpstreamError(f"{self.name}: C-FIND {why}")
            if code in (0xFF00, 0xFF01):
                if match is not None:
                    out.append(match)
                self.assoc.dimse_timeout = self._check()
                continue
            if code == 0x0000:
                return out
            comment = getattr(status, "ErrorComment", None)
            raise UpstreamError(f"{self.name}: C-FIND failed with status 0x{code:04X}"
                                + (f" ({comment})" if comment else ""))
        raise UpstreamError(f"{self.name}: C-FIND ended without a final status")


@contextmanager
def find_session(config: Config, name: str, model: str = "study", timeout: float | None = None,
                 cancel: Any = None) -> Iterator[FindSession]:
    """One association to node `name` for C-FIND under `model` ("study", "patient", "worklist" or an
    abstract syntax UID). `timeout` bounds the whole session (each wait also by the node's timeout)."""
    uid = FIND_MODELS.get(model, model)
    node = config.nodes[name]
    deadline = None if timeout is None else time.monotonic() + timeout
    with associate(config, name, [(uid, _FIND_SYNTAXES)]) as assoc:
        if not any(cx.abstract_syntax == uid for cx in assoc.accepted_contexts):
            raise UpstreamError(f"{name} ({node.ae_title}@{node.host}:{node.port}): "
                                f"C-FIND model {uid} not accepted")
        yield FindSession(assoc, name, uid, node.timeout, deadline, cancel)


def find(config: Config, name: str, model: str, identifier: Dataset, timeout: float | None = None) -> list[Dataset]:
    """The matches of one C-FIND to node `name` (its own association); UpstreamError on failure."""
    with find_session(config, name, model, timeout) as session:
        return session.find(identifier)
