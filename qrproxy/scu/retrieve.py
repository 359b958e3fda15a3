"""Retrieve-through: fetch instances the index knows of but the spool does not hold from a `retrieve`
node, so that C-MOVE / C-GET (scp/move.py) and prefetch can send them on.

The upstream is asked with C-MOVE whose Move Destination is qrproxy's own AE title (the node must
know that AE: it connects back to qrproxy's port), or, with `retrieve_method: get` on the node, with
C-GET on one association (for PACSes that cannot reach back through a firewall). Either way the
instances arrive through the ordinary C-STORE path (scp/store.py): fsynced into the spool and indexed
before they count, marked `origin=retrieved` and forwarded nowhere, so a cache fill never loops back
to the PACS it came from.

One upstream request per (node, level, UIDs) at a time: a second C-MOVE for a study that is being
retrieved joins the running retrieval instead of asking the PACS again. Waiters learn about arrivals
from `arrived()` (called by the store SCP after its commit) and, as a fallback that also covers
instances received by a sibling worker process, by polling the index.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom.presentation import StoragePresentationContexts
from pynetdicom.sop_class import (StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove)
from sqlalchemy import select

from qrproxy.index.models import Instance, SpoolObject
from qrproxy.logs import kv
from qrproxy.scu.upstream import UpstreamError, associate

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config

log = logging.getLogger("qrproxy.retrieve")

QR_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
# What qrproxy offers to store when it retrieves with C-GET: it keeps instances as received, so
# every common syntax is welcome (the PACS picks the one it holds).
GET_STORE_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.91",
]
# qrproxy asks upstream in the Study Root model (every PACS supports it; the identifiers it sends
# carry StudyInstanceUID at every level).
# PS3.4 C.4.2.1.5 and C.4.3.1.4: the C-MOVE / C-GET failure statuses, in words.
RETRIEVE_STATUS = {
    0xA701: "refused: out of resources, unable to calculate number of matches",
    0xA702: "refused: out of resources, unable to perform sub-operations",
    0xA801: "refused: move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xFE00: "cancelled",
    0x0122: "SOP class not supported",
}


def retrieve_status_words(code: int) -> str:
    if code in RETRIEVE_STATUS:
        return RETRIEVE_STATUS[code]
    if (code & 0xF000) == 0xC000:
        return "failed: unable to process"
    if (code & 0xF000) == 0xA000:
        return "refused"
    return "failure"


MOVE_MODEL = StudyRootQueryRetrieveInformationModelMove
GET_MODEL = StudyRootQueryRetrieveInformationModelGet


@dataclass
class Retrieval:
    """One upstream C-MOVE / C-GET, shared by every requester waiting for its instances."""

    node: str
    level: str
    uids: dict[str, tuple[str, ...]]
    sop_classes: tuple[str, ...] = ()
    expected: frozenset[str] = frozenset()  # the SOP Instance UIDs this request should bring
    classes_known: bool = True  # sop_classes covers every expected instance (C-GET role contexts)
    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    status: int | None = None
    completed: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.node, self.level, tuple(sorted(self.uids.items())))

    def identifier(self) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = self.level
        for keyword, values in self.uids.items():
            setattr(ds, keyword, "\\".join(values))
        return ds


MIN_PART = 4  # instances: a smaller share of a study is not worth an association of its own


def split_whole(series: dict[str, list[str]], n: int) -> list[tuple[str, list[str], list[str]]]:
    """A study's wholly missing series (series UID -> its SOP Instance UIDs) as at most `n` requests
    of about the same size: ("SERIES", series UIDs, []) for a group of whole series, ("IMAGE",
    [series UID], SOP Instance UIDs) for a part of one large series. Why: the PACS sends the
    sub-operations of one C-MOVE one instance per round trip on one association; on a far link `n`
    requests (the node's `associations`) make it send on `n` associations at once."""
    total = sum(len(v) for v in series.values())
    n = max(1, min(n, total // MIN_PART))
    if n == 1 or len(series) == 0:
        return [("SERIES", sorted(series), [])]
    share = total / n
    out: list[tuple[str, list[str], list[str]]] = []
    small: list[str] = []
    bins_left = n
    order = sorted(series, key=lambda u: -len(series[u]))
    for pos, uid in enumerate(order):
        k = min(bins_left - (1 if pos + 1 < len(order) else 0), round(len(series[uid]) / share))
        if k >= 2:
            sops = series[uid]
            for i in range(k):
                out.append(("IMAGE", [uid], sops[i * len(sops) // k:(i + 1) * len(sops) // k]))
            bins_left -= k
        else:
            small.append(uid)
    if small:
        bins: list[list[str]] = [[] for _ in range(max(1, min(bins_left, len(small))))]
        load = [0] * len(bins)
        for uid in small:  # largest first, into the least loaded
            i = load.index(min(load))
            bins[i].append(uid)
            load[i] += len(series[uid])
        out += [("SERIES", sorted(b), []) for b in bins if b]
    return out


class Arrivals:
    """A count of instances committed to the spool, that waiters for a retrieval watch. The store
    SCP calls `arrived()`; the Retriever waits; neither needs the other to exist first."""

    def __init__(self) -> None:
        self._arrival = threading.Condition()
        self._arrivals = 0

    def arrived(self) -> None:
        """Called by the store SCP after an instance is committed: wake every waiter."""
        with self._arrival:
            self._arrivals += 1
            self._arrival.notify_all()

    def wait(self, seen: int, timeout: float) -> int:
        with self._arrival:
            if self._arrivals == seen:
                self._arrival.wait(timeout)
            return self._arrivals


class Retriever:
    def __init__(self, config: Config, sessions: sessionmaker[Session], arrivals: Arrivals,
                 receive: Callable[[Any], Any], sink_for: Callable[..., Any] | None = None):
        self.config = config
        self.sessions = sessions
        self.arrivals = arrivals
        self.receive = receive  # the store SCP's C-STORE handler, for the sub-operations of a C-GET
        self.sink_for = sink_for  # and where their data sets are written as they arrive
        self._lock = threading.Lock()
        self._running: dict[tuple[Any, ...], Retrieval] = {}

    # --- upstream requests ----------------------------------------------------------------------

    def running_for(self, node: str, sop_uids: Iterable[str]) -> list[tuple[Retrieval, list[str]]]:
        """Retrievals from `node` in progress that will bring some of `sop_uids`, with those UIDs: a
        second requester waits for them instead of asking the PACS again."""
        wanted = set(sop_uids)
        out = []
        with self._lock:
            for r in self._running.values():
                if r.node != node or r.done.is_set():
                    continue
                covered = sorted(wanted & r.expected)
                if covered:
                    out.append((r, covered))
                    wanted -= set(covered)
        if out:
            log.info(kv(event="retrieve-joined", node=node, instances=sum(len(c) for _, c in out)))
        return out

    def fetch(self, node: str, level: str, uids: dict[str, Iterable[str]], sop_classes: Iterable[str] = (),
              expected: Iterable[str] = (), classes_known: bool = True) -> Retrieval:
        """Start (or join) the retrieval of `uids` at `level` from `node`; returns at once.
        `classes_known`: False when the index lacks the SOP class of some expected instance."""
        r = Retrieval(node, level, {k: tuple(sorted(set(v))) for k, v in uids.items() if v},
                      tuple(sorted(set(sop_classes))), frozenset(expected), classes_known)
        with self._lock:
            running = self._running.get(r.key)
            if running is not None and not running.done.is_set():
                log.info(kv(event="retrieve-joined", node=node, level=level, uids=_short(r.uids)))
                return running
            self._running[r.key] = r
        threading.Thread(target=self._run, args=(r,), name=f"retrieve-{node}", daemon=True).start()
        return r

    def _run(self, r: Retrieval) -> None:
        node = self.config.nodes[r.node]
        method = node.retrieve_method
        log.info(kv(event="retrieve-start", node=r.node, method=method, level=r.level, uids=_short(r.uids)))
        try:
            if method == "get":
                self._get(r)
            else:
                self._move(r)
        except UpstreamError as exc:
            r.error = str(exc)
        except Exception as exc:  # never let a retrieval thread die silently: waiters need an answer
            log.exception("retrieval from %s failed", r.node)
            r.error = f"{type(exc).__name__}: {exc}"
        finally:
            ms = int((time.monotonic() - r.started) * 1000)
            level = logging.WARNING if r.error else logging.INFO
            log.log(level, kv(event="retrieve-done", node=r.node, method=method, level=r.level,
                              status="-" if r.status is None else f"0x{r.status:04X}", completed=r.completed,
                              failed=r.failed, ms=ms, error=r.error or "-"))
            r.done.set()
            self.arrivals.arrived()  # waiters re-check: the retrieval is over
            with self._lock:
                if self._running.get(r.key) is r:
                    del self._running[r.key]

    def _hint(self, r: Retrieval, code: int) -> str:
        """What a site engineer checks when the node refuses a retrieve with nothing delivered."""
        node = self.config.nodes.get(r.node)
        if node is None or r.completed or node.retrieve_method == "get":
            return ""
        if code == 0xA801 or (code & 0xF000) == 0xC000:
            return (f"; does {r.node} know qrproxy's AE {self.config.ae_title} as a move destination (its host "
                    f"and port {self.config.port})? Or set nodes.{r.node}.retrieve_method: get")
        return ""

    def _responses(self, r: Retrieval, responses: Iterator[Any]) -> None:
        for status, _identifier in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise UpstreamError(f"{r.node}: retrieve: no response (association lost or timed out)")
            r.completed = int(getattr(status, "NumberOfCompletedSuboperations", r.completed) or 0)
            r.failed = int(getattr(status, "NumberOfFailedSuboperations", r.failed) or 0)
            if code in (0xFF00, 0xFF01):
                continue
            r.status = code
            if code in (0x0000, 0xB000):
                return
            comment = getattr(status, "ErrorComment", None)
            raise UpstreamError(f"{r.node}: retrieve failed with status 0x{code:04X} ({retrieve_status_words(code)})"
                                + (f" [{comment}]" if comment else "") + self._hint(r, code))
        raise UpstreamError(f"{r.node}: retrieve ended without a final status")

    def _move(self, r: Retrieval) -> None:
        cfg = self.config
        model = MOVE_MODEL
        with associate(cfg, r.node, [(model, QR_SYNTAXES)]) as assoc:
            if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
                raise UpstreamError(f"{r.node}: C-MOVE (Study Root) not accepted")
            self._responses(r, assoc.send_c_move(r.identifier(), cfg.ae_title, model))

    def _get(self, r: Retrieval) -> None:
        cfg = self.config
        model = GET_MODEL
        # The classes the index knows for these instances; when it knows none (an upstream that
        # leaves SOPClassUID out of its C-FIND answers), as many storage classes as a context list
        # holds, so that whatever the PACS sends has a context: accepting more is not a guess.
        classes = list(r.sop_classes)[:100]
        if not (r.classes_known and classes):
            for cx in StoragePresentationContexts:
                if len(classes) >= 100:
                    break
                if str(cx.abstract_syntax) not in classes:
                    classes.append(str(cx.abstract_syntax))
        roles = {uid: (False, True) for uid in classes}
        contexts = [(model, QR_SYNTAXES)] + [(uid, GET_STORE_SYNTAXES) for uid in classes]
        with associate(cfg, r.node, contexts, roles=roles, on_store=self.receive, sink_for=self.sink_for) as assoc:
            if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
                raise UpstreamError(f"{r.node}: C-GET (Study Root) not accepted")
            self._responses(r, assoc.send_c_get(r.identifier(), model))

    # --- waiting ------------------------------------------------------------------------------

    def local_objects(self, sop_uids: Iterable[str]) -> dict[str, tuple[int, str, str, str]]:
        """{sop_uid: (object_pk, path, sop_class_uid, transfer_syntax_uid)} of the ones held locally."""
        uids = list(sop_uids)
        out: dict[str, tuple[int, str, str, str]] = {}
        with self.sessions() as s:
            for i in range(0, len(uids), 500):
                rows = s.execute(
                    select(Instance.sop_instance_uid, SpoolObject.id, SpoolObject.path, SpoolObject.sop_class_uid,
                           SpoolObject.transfer_syntax_uid)
                    .join(SpoolObject, SpoolObject.id == Instance.object_pk)
                    .where(Instance.sop_instance_uid.in_(uids[i:i + 500]))
                )
                for uid, pk, path, cls, ts in rows:
                    out[uid] = (pk, path, cls, ts)
        return out

    def wait_for(self, retrieval: Retrieval, sop_uids: Iterable[str], cancelled: Any = None,
                 poll: float = 0.5) -> Iterator[tuple[str, tuple[int, str, str, str] | None]]:
        """Yield (sop_uid, local object) as each instance lands, in arrival order; when the retrieval
        has ended, (sop_uid, None) for every one that never came. Stops early when `cancelled()`."""
        waiting = set(sop_uids)
        seen = -1
        while waiting:
            if cancelled is not None and cancelled():
                return
            finished = retrieval.done.is_set()
            found = self.local_objects(waiting)
            for uid, obj in found.items():
                waiting.discard(uid)
                yield uid, obj
            if finished:
                for uid in sorted(waiting):
                    yield uid, None
                return
            if not found:
                seen = self.arrivals.wait(seen, poll)


def _short(uids: dict[str, tuple[str, ...]]) -> str:
    parts = []
    for keyword, values in uids.items():
        first = values[0] if values else ""
        parts.append(f"{keyword}={first}" + (f"+{len(values) - 1}" if len(values) > 1 else ""))
    return ",".join(parts)
