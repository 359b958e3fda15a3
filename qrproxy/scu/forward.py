"""Drains the forward queue: one worker thread per node, reused associations, retries, holds.

Two kinds of failure, treated differently because a PACS down for a weekend must not turn thousands
of instances into held rows:
- the node cannot be reached (no association, association dropped mid-send): the *node* backs off
  (exponential, `forward.retry_min` .. `retry_max`, with jitter); the rows go back to pending with
  their attempt count unchanged;
- the node answers an instance with a failure status: the *row* is retried with backoff for transient
  statuses (0xA7xx out of resources, unknown codes) and held at once for permanent ones (0xA9xx,
  0xCxxx, 0x0122 ...), or after `forward.max_attempts`. A held row keeps its reason for `queue list`.

Rows are claimed with a lease (state inflight, lease_until, lease_owner); a crash leaves them
inflight and the next start (or, for another proxy sharing a PostgreSQL queue, lease expiry) puts them
back to pending. Each instance is recorded as sent in its own transaction as soon as its C-STORE
response arrives (committed while the next instance is sent), so a crash re-sends at most the
instance that was on the wire and the one being recorded per association (which the upstream dedupes
by UID).

A peer that dies at any byte never stalls a worker: every write on the association is bounded by
the node's timeout (net/association.PeerGone), the association is aborted and the node backs off.

Encrypted spool: every file is authenticated in full just before it is sent (a tampered or truncated
file holds its row with the failing chunk named, and sends nothing), then streamed from disk through
the decrypting reader (`associate(opener=spool.open)`); conversions read and write encrypted
files in the pool. Reading a data set here (`dcmread`, used by store mutations) goes through
spool.dcmread, which decrypts.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.orm import aliased

from qrproxy.index.models import ForwardItem, ForwardState, Instance, Series, SpoolObject, utcnow
from qrproxy.index.uidmap import DbPseudonyms
from qrproxy.logs import kv
from qrproxy.rules.anonymize import AnonymizeError
from qrproxy.rules.routes import apply_mutations, mutations_for
from qrproxy.scu import linespeed
from qrproxy.scu.linespeed import CodecRate, Line, Watch, Watchdog
from qrproxy.scu.pacing import Pacer
from qrproxy.scu.upstream import UpstreamError, associate
from qrproxy.store.codec import NATIVE_TARGETS, TARGETS, auto_target
from qrproxy.store.crypto import CryptoError, KeySource
from qrproxy.store.spool import dcmread

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from qrproxy.config.schema import Config
    from qrproxy.store.spool import Spool

log = logging.getLogger("qrproxy.forward")

SUCCESS_CODES = {0x0000}
WARNING_CODES = {0x0001, 0xB000, 0xB006, 0xB007}
MAX_CONTEXTS = 120  # PS3.8 allows 128 presentation contexts; keep headroom
EXTRA_RETRY = 300.0  # s before an association the node turned down (while others worked) is tried again
SHARED_CLAIM = 8  # rows claimed at a time when a node has several associations: they share a backlog
EXPLICIT_LITTLE = "1.2.840.10008.1.2.1"


def classify(status: int | None) -> str:
    """'sent', 'transient' or 'permanent' for a C-STORE response status (None: no response)."""
    if status is None:
        return "transient"
    if status in SUCCESS_CODES or status in WARNING_CODES or 0xB000 <= status <= 0xBFFF:
        return "sent"
    if 0xA700 <= status <= 0xA7FF or 0xFE00 <= status <= 0xFEFF:
        return "transient"
    if 0xA900 <= status <= 0xA9FF or 0xC000 <= status <= 0xCFFF or status in (0x0122, 0x0124, 0x0210, 0x0211, 0x0212):
        return "permanent"
    return "transient"


def backoff(attempts: int, lo: float, hi: float) -> float:
    base = min(hi, lo * (2 ** max(0, attempts - 1)))
    return base * random.uniform(0.8, 1.2)


@dataclass
class Job:
    item_id: int
    object_pk: int
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae: str | None
    attempts: int


class NodeWorker(threading.Thread):
    """One association's worth of forwarding to a node; a node has `associations` of them, each
    claiming the next rows in queue order (a few at a time when there are several, so that they
    share a single study's backlog too)."""

    def __init__(self, forwarder: Forwarder, node: str, slot: int = 0):
        super().__init__(name=f"forward-{node}" + (f"-{slot}" if slot else ""), daemon=True)
        self.fw = forwarder
        self.slot = slot
        self.owner = f"{forwarder.owner}#{slot}"  # lease owner: this process, this association
        self.config = forwarder.config
        self.sessions = forwarder.sessions
        self.spool = forwarder.spool
        self.node = node
        self.wake = threading.Event()
        self.backoff_until = 0.0
        self.node_failures = 0
        self._assoc: Any = None
        self._assoc_ctx: Any = None
        self._assoc_key: tuple[str | None, frozenset[tuple[str, str]]] | None = None
        self._idle_since = time.monotonic()
        self.connecting = False  # waiting for the node to accept an association (siblings look)
        self._recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"record-{node}")
        self._recording: Future[None] | None = None

    # --- queue operations (each its own short transaction) ---------------------------------------

    def claim(self) -> list[Job]:
        cfg = self.config.forward
        now = utcnow()
        with self.sessions.begin() as s:
            node_cfg = self.config.nodes[self.node]
            # several associations share the backlog; `auto` looks at the line again every claim
            batch = cfg.batch if node_cfg.associations == 1 and node_cfg.transfer_syntax != "auto" \
                else min(cfg.batch, SHARED_CLAIM)
            # extra associations only for a backlog, and only next to one that works: after an
            # outage one association finds out whether the node is back, not all of them at once
            if self.slot and not (self._sibling_sends() and self._backlog_for_me(s, now)):
                return []
            q = claim_query(self.node, now, batch, node_cfg.stable_after)
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True, of=ForwardItem)
            ids = list(s.execute(q).scalars())
            if not ids:
                return []
            s.execute(
                update(ForwardItem)
                .where(ForwardItem.id.in_(ids))
                .values(state=ForwardState.inflight, lease_until=now + dt.timedelta(seconds=cfg.lease),
                        lease_owner=self.owner)
            )
            rows = s.execute(
                select(ForwardItem.id, ForwardItem.object_pk, ForwardItem.calling_ae, ForwardItem.attempts,
                       SpoolObject.path, SpoolObject.sop_class_uid, SpoolObject.sop_instance_uid,
                       SpoolObject.transfer_syntax_uid)
                .join(SpoolObject, SpoolObject.id == ForwardItem.object_pk)
                .where(ForwardItem.id.in_(ids))
            ).all()
        order = {item_id: i for i, item_id in enumerate(ids)}  # the claim's order: priority, study, series, instance
        rows = sorted(rows, key=lambda r: order[r.id])
        return [Job(r.id, r.object_pk, r.path, r.sop_class_uid, r.sop_instance_uid, r.transfer_syntax_uid,
                    r.calling_ae, r.attempts) for r in rows]

    def _backlog_for_me(self, s: Any, now: dt.datetime) -> bool:
        """An extra association (slot k > 0) opens only for a backlog the first k cannot take in
        one claim each: a trickle of instances never costs a second association (which a peer that
        serves one association at a time would keep waiting)."""
        need = self.slot * SHARED_CLAIM + 1
        due = s.execute(select(func.count()).select_from(
            select(ForwardItem.id).where(ForwardItem.node == self.node, ForwardItem.state == ForwardState.pending,
                                         ForwardItem.next_attempt_at <= now).limit(need).subquery())).scalar_one()
        return due >= need

    def _finish(self, sent: list[int], unclaim: list[int], failed: list[tuple[Job, str, int | None]],
                note: str | None = None) -> None:
        if not (sent or unclaim or failed):
            return
        cfg = self.config.forward
        now = utcnow()
        with self.sessions.begin() as s:
            if sent:
                s.execute(update(ForwardItem).where(ForwardItem.id.in_(sent))
                          .values(state=ForwardState.sent, sent_at=now, lease_until=None, lease_owner=None,
                                  last_error=None))
            if unclaim:
                s.execute(update(ForwardItem).where(ForwardItem.id.in_(unclaim), ForwardItem.state == ForwardState.inflight)
                          .values(state=ForwardState.pending, lease_until=None, lease_owner=None,
                                  next_attempt_at=now, **({"last_error": note} if note else {})))
            for job, reason, status in failed:
                attempts = job.attempts + 1
                permanent = reason.startswith("permanent:")
                hold = permanent or attempts >= cfg.max_attempts
                values: dict[str, Any] = {
                    "attempts": attempts, "last_error": reason, "last_status": status,
                    "lease_until": None, "lease_owner": None,
                }
                if hold:
                    values["state"] = ForwardState.held
                    if not permanent:
                        values["last_error"] = f"gave up after {attempts} attempts: {reason}"
                else:
                    values["state"] = ForwardState.pending
                    values["next_attempt_at"] = now + dt.timedelta(
                        seconds=backoff(attempts, cfg.retry_min, cfg.retry_max))
                s.execute(update(ForwardItem).where(ForwardItem.id == job.item_id).values(**values))
                log.log(logging.ERROR if hold else logging.WARNING,
                        kv(event="forward-failed", node=self.node, sop=job.sop_instance_uid, attempts=attempts,
                           status="-" if status is None else f"0x{status:04X}", action="held" if hold else "retry",
                           reason=values["last_error"]))

    # --- associations ---------------------------------------------------------------------------

    def _close(self, abort: bool = False) -> None:
        if self._assoc_ctx is not None:
            try:
                if abort:
                    self._assoc_ctx.__exit__(RuntimeError, RuntimeError("abort"), None)
                else:
                    self._assoc_ctx.__exit__(None, None, None)
            except Exception:
                pass
        self._assoc = self._assoc_ctx = self._assoc_key = None

    def _association(self, calling: str | None, pairs: frozenset[tuple[str, str]]) -> Any:
        key = (calling, pairs)
        if self._assoc is not None and self._assoc.is_established and self._assoc_key is not None:
            cur_calling, cur_pairs = self._assoc_key
            if cur_calling == calling and pairs <= cur_pairs:
                return self._assoc
        self._close()
        contexts = [(sop, [ts]) for sop, ts in sorted(pairs)]
        ctx = associate(self.config, self.node, contexts, calling_ae=calling, opener=self.spool.open)
        self.connecting = True
        try:
            self._assoc = ctx.__enter__()
        finally:
            self.connecting = False
        self._assoc_ctx = ctx
        self._assoc_key = key
        pacer = self.fw.pacer(self.node)
        if pacer.limited:
            self._assoc.pace = pacer.take  # the node's bandwidth, shared by its associations
        return self._assoc

    # --- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        while not self.fw.stopping.is_set():
            delay = self.backoff_until - time.monotonic()
            if delay > 0:
                self._close()
                self.fw.stopping.wait(delay)
                continue
            try:
                jobs = self.claim()
            except Exception:
                log.exception("claim failed for node %s", self.node)
                self.fw.stopping.wait(self.config.forward.poll)
                continue
            if not jobs:
                if self._assoc is not None and (time.monotonic() - self._idle_since > 5.0 or self._sibling_waits()):
                    self._close()
                self.wake.wait(self.config.forward.poll if self._assoc is None else 1.0)
                self.wake.clear()
                continue
            self._send_batch(jobs)
            self._idle_since = time.monotonic()
        self._close()
        self._recorder.shutdown(wait=True)

    def _record(self, sent: list[int], failed: list[tuple[Job, str, int | None]]) -> None:
        """`_finish` in the recorder thread, at most one at a time: the previous must be committed
        (or its error raised here) before the next is handed over."""
        self._settle()
        if sent or failed:
            self._recording = self._recorder.submit(self._finish, sent, [], failed)

    def _settle(self) -> None:
        """Wait for the row being recorded; re-raises what its commit raised."""
        pending, self._recording = self._recording, None
        if pending is not None:
            pending.result()

    def _siblings(self) -> list[NodeWorker]:
        return [w for w in self.fw.workers.get(self.node, ()) if w is not self]

    def _siblings_open(self) -> int:
        """Other associations to this node that are open: the node is up, whatever this one got."""
        return sum(1 for w in self._siblings() if w._assoc is not None and w._assoc.is_established)

    def _sibling_sends(self) -> bool:
        return self._siblings_open() > 0

    def _extra_refused(self, reason: str, jobs: Sequence[Job]) -> None:
        """The node turned down one more association while others to it work: it allows fewer than
        `associations`. Not an outage (no node-down, no node-back flapping on every retry): this
        association's rows go back to its siblings at once and it tries again much later."""
        wait = max(EXTRA_RETRY, self.config.forward.retry_max)
        self.backoff_until = time.monotonic() + wait
        self._finish([], [j.item_id for j in jobs], [])
        level = logging.WARNING if self.fw.limited(self.node) else logging.DEBUG
        log.log(level, kv(event="associations-limited", node=self.node,
                          configured=self.config.nodes[self.node].associations, open=self._siblings_open(),
                          reason=reason, action=f"sending on fewer; trying again in {wait:.0f}s",
                          hint=f"set nodes.{self.node}.associations to what the node allows"))

    def _sibling_waits(self) -> bool:
        """Another association to this node is waiting to be accepted. A peer that serves one
        association at a time (storescp without --fork, small archives) queues it behind ours, with
        the rows it claimed: an idle association is then released at once, not after 5 s."""
        return any(w.connecting for w in self._siblings())

    def _send_batch(self, jobs: list[Job]) -> None:
        node_cfg = self.config.nodes[self.node]
        by_calling: dict[str | None, list[Job]] = {}
        for job in jobs:
            calling = (job.calling_ae or None) if node_cfg.impersonate else None
            by_calling.setdefault(calling, []).append(job)
        remaining = list(jobs)
        compress = True
        if node_cfg.transfer_syntax == "auto":
            # offered both ways on every association (no renegotiation when the choice changes)
            target: str | None = self.fw.auto_target
            line = self.fw.line(self.node)
            before = line.compress
            compress = line.choose()
            if compress != before:
                self.fw.publish()
        else:
            target = TARGETS.get(node_cfg.transfer_syntax)
        for calling, group in by_calling.items():
            for chunk in _context_chunks(group, target):
                done = self._send_group(calling, chunk, target, compress)
                remaining = [j for j in remaining if j.item_id not in done]
                if self.fw.stopping.is_set() or self.backoff_until > time.monotonic():
                    self._finish([], [j.item_id for j in remaining], [])
                    return

    def _send_group(self, calling: str | None, jobs: list[Job], target: str | None, compress: bool = True) -> set[int]:
        """Send `jobs` on one association; returns the ids that reached a final outcome this round.
        `compress` False (`auto` on a fast line): what was received goes as it is when accepted."""
        pairs = frozenset((j.sop_class_uid, ts) for j in jobs for ts in candidates(target, j.transfer_syntax_uid))
        try:
            assoc = self._association(calling, pairs)
        except UpstreamError as exc:
            # turned down or left unanswered (not "nothing listens") while a sibling works
            if exc.kind in ("rejected", "timeout", "aborted") and self._sibling_sends():
                self._extra_refused(str(exc), jobs)
            else:
                self._node_down(str(exc), jobs)
            return {j.item_id for j in jobs}
        plans = self._plan(assoc, jobs, target, compress)
        sent: list[int] = []
        sent_any = False
        failed: list[tuple[Job, str, int | None]] = []
        done: set[int] = set()
        t0 = time.monotonic()
        try:
            for job in jobs:
                if self.fw.stopping.is_set():
                    break
                outcome = self._send_one(assoc, job, plans[job.item_id])
                if outcome is None:
                    sent.append(job.item_id)
                    sent_any = True
                elif outcome[0] == "line-too-slow":
                    # The link, not the instance: no attempt charged; the node backs off and the
                    # instance goes again (first in its order) when it is due.
                    self._settle()
                    self._finish(sent, [], failed)
                    done_ids = set(sent) | {f[0].item_id for f in failed}
                    self._close(abort=True)
                    self._node_down(outcome[1], [j for j in jobs if j.item_id not in done_ids])
                    return {j.item_id for j in jobs}
                elif outcome[0] == "node-down":
                    # The association died under this instance. Node-level backoff for the rest, but
                    # this instance is charged an attempt: an instance that makes the peer drop the
                    # association must end up held, not block the node's queue forever.
                    self._settle()
                    self._finish(sent, [], failed + [(job, f"transient: {outcome[1]}", None)])
                    done_ids = set(sent) | {f[0].item_id for f in failed} | {job.item_id}
                    rest = [j for j in jobs if j.item_id not in done_ids]
                    self._close(abort=True)
                    self._node_down(outcome[1], rest)
                    return {j.item_id for j in jobs}
                else:
                    failed.append((job, outcome[1], outcome[2]))
                done.add(job.item_id)
                # Recorded as soon as its response is in, in the recorder thread while the next
                # instance goes out: a crash re-sends at most the instance on the wire and the one
                # whose row was being committed (the batch of 50 this replaced re-sent up to 50 per
                # node after kill -9). The commit's fsync no longer sits between two instances.
                self._record(sent, failed)
                sent, failed = [], []
        finally:
            self._settle()
            self._finish(sent, [], failed)
        if done and sent_any and self.fw.on_delivered is not None:
            self.fw.on_delivered(self.node, True, "delivered instances")
        if done:
            if self.fw.node_up(self.node):
                log.info(kv(event="node-back", node=self.node, service="forward", after_failures=self.node_failures))
            self.node_failures = 0
            ms = (time.monotonic() - t0) * 1000
            log.info(kv(event="forwarded", node=self.node, count=len(done), ms=int(ms),
                        calling=calling or self.config.ae_title))
        return done

    def _plan(self, assoc: Any, jobs: list[Job], target: str | None, compress: bool = True) -> dict[int, Any]:
        """For each job, the file to send: the spool file when the peer accepted the received syntax,
        else a converted copy. Conversions start at once in the process pool, so they run while
        earlier instances are being sent."""
        accepted: dict[str, set[str]] = {}
        for cx in assoc.accepted_contexts:
            accepted.setdefault(cx.abstract_syntax, set()).add(cx.transfer_syntax)
        plans: dict[int, Any] = {}
        for job in jobs:
            usable = [ts for ts in candidates(target, job.transfer_syntax_uid)
                      if ts in accepted.get(job.sop_class_uid, ())]
            if not usable:
                plans[job.item_id] = ("refused", f"permanent: node accepted SOP class {job.sop_class_uid} in "
                                                 f"none of {', '.join(candidates(target, job.transfer_syntax_uid))}")
            elif usable[0] == job.transfer_syntax_uid or (
                    job.transfer_syntax_uid in usable
                    and (not compress or job.transfer_syntax_uid not in NATIVE_TARGETS and
                         self.config.nodes[self.node].transfer_syntax == "auto")):
                # `auto` only ever compresses what arrived uncompressed
                plans[job.item_id] = ("original", None)
            else:
                plans[job.item_id] = ("convert", self.fw.variant(job, usable[0]), usable, accepted)
        return plans

    def _file_for(self, job: Job, plan: Any) -> tuple[Any, str | None]:
        """(path to send, None) or (None, reason)."""
        kind = plan[0]
        if kind == "refused":
            return None, plan[1]
        if kind == "original":
            return self.spool.path(job.path), None
        _, future, usable, accepted = plan
        path, result, _ = future.result()
        if result.ok and result.transfer_syntax in accepted.get(job.sop_class_uid, ()):
            if result.reason:
                # Expected for instances without pixel data; worth a warning when pixels could not be
                # compressed as configured (missing codec, unsupported photometric ...).
                level = logging.INFO if "no pixel data" in result.reason else logging.WARNING
                log.log(level, kv(event="converted-fallback", node=self.node, sop=job.sop_instance_uid,
                            wanted=usable[0], sent=result.transfer_syntax, reason=result.reason))
            return path, None
        if job.transfer_syntax_uid in usable:
            log.info(kv(event="conversion-skipped", node=self.node, sop=job.sop_instance_uid,
                        sent=job.transfer_syntax_uid, reason=result.reason))
            return self.spool.path(job.path), None
        return None, f"permanent: cannot convert to a syntax the node accepted: {result.reason}"

    def _send_one(self, assoc: Any, job: Job, plan: Any) -> tuple[str, str, int | None] | None:
        """None when sent; else (kind, reason, status)."""
        try:
            path, problem = self._file_for(job, plan)
        except (ValueError, CryptoError) as exc:
            return ("permanent", f"permanent: {exc}", None)
        if problem is not None:
            return ("permanent", problem, None)
        if not path.exists():
            return ("permanent", "permanent: spool file missing", None)
        try:
            # Every chunk authenticated before the first byte goes out: a damaged file is held here,
            # not discovered half-way through a transfer the peer would then see aborted.
            self.spool.verify(path)
        except (CryptoError, OSError) as exc:
            if plan[0] == "convert" and path != self.spool.path(job.path):
                # A damaged converted copy is only a damaged cache entry: made again next attempt.
                self.fw.forget_variant(job, plan[2][0], path)
                return ("transient", f"transient: converted copy unusable ({exc}); converting again", None)
            return ("permanent", f"permanent: {exc}", None)
        try:
            dataset: Any = self.fw.mutated(path, self.node, job.calling_ae, job.sop_instance_uid) or path
        except AnonymizeError as exc:  # never send what could not be anonymized
            return ("permanent", f"permanent: anonymize failed: {exc}", None)
        watch = self._watch(assoc)
        line = self.fw.line(self.node)
        parallel = line.start()
        sent_before, started = assoc.bytes_sent, time.monotonic()
        rsp = None
        try:
            rsp = assoc.send_c_store(dataset)
        except CryptoError as exc:
            # The file changed between the check above and the send: the peer holds a partial data
            # set, so the association must go. The next attempt's check holds the row.
            assoc.abort()
            return ("node-down", f"spool file changed while sending: {exc}", None)
        except OSError as exc:
            # PeerGone (the peer died or stalled under this instance) or a read error half-way: part
            # of a message is on the wire, so the association cannot carry another one.
            assoc.abort()
            if watch is not None and watch.cut:
                return ("line-too-slow", watch.cut, None)
            return ("node-down", f"association lost while sending: {exc}", None)
        except (RuntimeError, ValueError) as exc:
            if watch is not None and watch.cut:
                return ("line-too-slow", watch.cut, None)
            if not assoc.is_established:
                return ("node-down", f"association lost: {exc}", None)
            return ("transient", f"send failed: {exc}", None)
        finally:
            if watch is not None:
                self.fw.watchdog.unwatch(watch)
            line.done(assoc.bytes_sent - sent_before, time.monotonic() - started, parallel,
                      ok=getattr(rsp, "Status", None) is not None)
        if watch is not None and watch.cut:
            return ("line-too-slow", watch.cut, None)
        status = getattr(rsp, "Status", None)
        if status is None:
            return ("node-down", "no C-STORE response (association dropped or timed out)", None)
        kind = classify(int(status))
        if kind == "sent":
            if status != 0:
                log.warning(kv(event="forward-warning", node=self.node, sop=job.sop_instance_uid,
                               status=f"0x{int(status):04X}", comment=getattr(rsp, "ErrorComment", "")))
            return None
        comment = getattr(rsp, "ErrorComment", "") or ""
        reason = f"{kind}: status 0x{int(status):04X}" + (f" {comment}" if comment else "")
        return (kind, reason, int(status))

    def _watch(self, assoc: Any) -> Watch | None:
        """Put the association under the line-speed watchdog while an instance is in flight."""
        node_cfg = self.config.nodes[self.node]
        if not node_cfg.min_line_speed:
            return None
        watch = Watch(assoc, self.node, node_cfg.min_line_speed, node_cfg.min_line_speed_window)
        self.fw.watchdog.watch(watch)
        return watch

    def _node_down(self, reason: str, jobs: Sequence[Job]) -> None:
        cfg = self.config.forward
        self.node_failures += 1
        wait = backoff(self.node_failures, cfg.retry_min, cfg.retry_max)
        self.backoff_until = time.monotonic() + wait
        self._finish([], [j.item_id for j in jobs], [], note=f"node unreachable: {reason}")
        # one warning when the node goes down (whichever of its associations finds it first), not
        # one per retry or per association; the rest are DEBUG
        level = logging.WARNING if self.fw.node_down(self.node) else logging.DEBUG
        log.log(level, kv(event="node-down", node=self.node, reason=reason, retry_in=f"{wait:.1f}s",
                          pending=len(jobs), attempt=self.node_failures))


def claim_query(node: str, now: dt.datetime, limit: int, stable_after: float = 0.0) -> Any:
    """The due rows of `node` in sending order: higher priority first (a route's `priority`), then
    the study that came first (its first row for this node), then series and instance number, then
    arrival. With `stable_after`, a study that received something newer than that is left for
    later (Orthanc's StableAge: the whole study goes once it is quiet)."""
    first = aliased(ForwardItem)
    study_first = (select(func.min(first.id))
                   .where(first.node == ForwardItem.node, first.study_instance_uid == ForwardItem.study_instance_uid)
                   .correlate(ForwardItem).scalar_subquery())
    q = (
        select(ForwardItem.id)
        .join(SpoolObject, SpoolObject.id == ForwardItem.object_pk)
        .outerjoin(Instance, Instance.sop_instance_uid == SpoolObject.sop_instance_uid)
        .outerjoin(Series, Series.id == Instance.series_pk)
        .where(ForwardItem.node == node, ForwardItem.state == ForwardState.pending,
               ForwardItem.next_attempt_at <= now)
        .order_by(ForwardItem.priority.desc(), func.coalesce(study_first, ForwardItem.id),
                  Series.series_number, Instance.instance_number, ForwardItem.id)
        .limit(limit)
    )
    if stable_after > 0:
        newer = aliased(ForwardItem)
        quiet_since = now - dt.timedelta(seconds=stable_after)
        q = q.where(~exists().where(newer.node == ForwardItem.node,
                                    newer.study_instance_uid == ForwardItem.study_instance_uid,
                                    newer.created_at > quiet_since))
    return q


def candidates(target: str | None, received: str) -> tuple[str, ...]:
    """Transfer syntaxes to offer for one instance, best first: the node's configured target, the
    syntax it was received in, and Explicit VR Little Endian as the fallback every SCP accepts
    (a compressed instance is then decompressed rather than refused)."""
    out: list[str] = []
    for ts in (target or received, received, EXPLICIT_LITTLE):
        if ts not in out:
            out.append(ts)
    return tuple(out)


def _context_chunks(jobs: list[Job], target: str | None) -> list[list[Job]]:
    """Split so no association needs more presentation contexts than PS3.8 allows."""
    chunks: list[list[Job]] = []
    current: list[Job] = []
    pairs: set[tuple[str, str]] = set()
    for job in jobs:
        new = {(job.sop_class_uid, ts) for ts in candidates(target, job.transfer_syntax_uid)} - pairs
        if new and len(pairs) + len(new) > MAX_CONTEXTS and current:
            chunks.append(current)
            current, pairs = [], set()
        pairs |= new
        current.append(job)
    if current:
        chunks.append(current)
    return chunks


def convert_variant(src: str, dest: str, ts: str, keys: KeySource | None = None) -> tuple[Any, Any]:
    """Runs in the conversion process pool: reuse a variant made earlier, else convert. Returns
    (path, ConvertResult, seconds spent converting: 0 for a reused variant).

    With `keys`, the original is authenticated in full first (CryptoError, naming the chunk, reaches
    the worker through the future and holds the row), and a cached variant that fails
    authentication is discarded and made again: it is only a cache.
    """
    from pathlib import Path

    from pydicom import dcmread as read

    from qrproxy.store.codec import ConvertResult, convert_file
    from qrproxy.store.crypto import open_reader, verify_file

    if os.path.exists(dest):
        try:
            if keys is not None:
                verify_file(dest, keys)
            with open_reader(dest, keys) as f:
                written = str(read(f, stop_before_pixels=True, specific_tags=[0x00020010]).file_meta
                              .TransferSyntaxUID)
            return Path(dest), ConvertResult(True, written, None if written == ts else "cached fallback", None), 0.0
        except CryptoError:
            os.unlink(dest)
    if keys is not None:
        verify_file(src, keys)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    t0 = time.monotonic()
    result = convert_file(src, dest, ts, fallbacks=(EXPLICIT_LITTLE,), keys=keys)
    return Path(dest), result, time.monotonic() - t0


class Forwarder:
    def __init__(self, config: Config, sessions: sessionmaker[Session], spool: Spool, worker: int = 0):
        self.config = config
        self.sessions = sessions
        self.spool = spool
        # Leases are per worker process: a restarted worker reclaims its own rows at once, and never
        # those of a sibling that is still sending them.
        self.owner = f"{socket.gethostname()}:{config.port}:{worker}"
        self.stopping = threading.Event()
        self.workers: dict[str, list[NodeWorker]] = {}
        self._down: set[str] = set()
        self._limited: set[str] = set()  # nodes that allowed fewer associations than configured
        self._down_lock = threading.Lock()
        self.has_store_mutations = any(m.on == "store" for m in config.mutations)
        self.pseudonyms = DbPseudonyms(sessions)
        self.pool: ProcessPoolExecutor | None = None
        self._variants: dict[tuple[int, str], Future[Any]] = {}
        self._variants_lock = threading.Lock()
        # told when an instance reached a node (jobs/health.py's NodeHealth.observe, set by app.py):
        # a delivery proves the node up sooner than its next C-ECHO would
        self.on_delivered: Callable[[str, bool, str], None] | None = None
        self._pacers: dict[str, Pacer] = {}
        self._pacers_lock = threading.Lock()
        self.worker = worker
        self.codec = CodecRate(os.cpu_count() or 1)
        self.auto_target = auto_target()
        self._lines = {node: Line(node, self.codec) for node in config.nodes}
        self.watchdog = Watchdog(self.stopping, self._cut, self.publish)

    def line(self, node: str) -> Line:
        """The node's measured line speed and `auto` choice (scu/linespeed.py)."""
        return self._lines[node]

    def _cut(self, watch: Watch, rate: float) -> None:
        """The watchdog found an association below its node's `min_line_speed`."""
        node_cfg = self.config.nodes[watch.node]
        watch.cut = (f"line too slow: {rate / 1000:.1f} kB/s over the last {node_cfg.min_line_speed_window:g}s, "
                     f"below min_line_speed {node_cfg.min_line_speed / 1000:g} kB/s")
        line = self._lines[watch.node]
        line.too_slow += 1
        log.warning(kv(event="line-too-slow", node=watch.node, rate=f"{rate / 1000:.1f}kB/s",
                       min_line_speed=f"{node_cfg.min_line_speed / 1000:g}kB/s",
                       window=f"{node_cfg.min_line_speed_window:g}s", action="abort, retry later"))
        watch.assoc.cut("line-too-slow", watch.cut)
        self.publish()

    def publish(self) -> None:
        """The figures for `qrproxy status` and /metrics (another process reads them)."""
        try:
            linespeed.publish(self.spool.root, self.worker, self._lines.values())
        except OSError as exc:
            log.debug(kv(event="line-state-not-written", error=str(exc)))

    def pacer(self, node: str) -> Pacer:
        """The node's bandwidth limit (scu/pacing.py), one per node for every association to it."""
        with self._pacers_lock:
            if node not in self._pacers:
                self._pacers[node] = Pacer(self.config.nodes[node], share=max(1, self.config.workers))
            return self._pacers[node]

    def variant(self, job: Job, ts: str) -> Future[Any]:
        """The spool file of `job` converted to `ts`, made once and shared by every node that wants
        it (the file under spool/variants/ is the cache; the future dedupes concurrent requests)."""
        key = (job.object_pk, ts)
        with self._variants_lock:
            fut = self._variants.get(key)
            if fut is None:
                src = self.spool.path(job.path)
                dest = self.spool.variant_path(job.path, ts)
                if self.pool is None:
                    self.pool = ProcessPoolExecutor(max_workers=os.cpu_count() or 1,
                                                    mp_context=multiprocessing.get_context("spawn"))
                fut = self.pool.submit(convert_variant, str(src), str(dest), ts, self.spool.keys)
                fut.add_done_callback(lambda f, src=src: self._measured(f, src))
                self._variants[key] = fut
                if len(self._variants) > 4096:
                    for k in list(self._variants)[:2048]:
                        if self._variants[k].done():
                            del self._variants[k]
            return fut

    def _measured(self, fut: Future[Any], src: Any) -> None:
        """A conversion's speed and size, for `auto` (a cached variant took no time: not counted)."""
        try:
            path, result, seconds = fut.result()
            if seconds > 0 and result.ok and result.transfer_syntax not in NATIVE_TARGETS:
                self.codec.converted(os.path.getsize(src), os.path.getsize(path), seconds)
        except Exception:
            pass

    def mutated(self, path: Any, node: str | None, calling_ae: str | None, sop: str) -> Any:
        """The data set of spool file `path` with the `on: store` mutations for `node` applied, or
        None when none applies (send the file as it is). AnonymizeError when anonymization fails:
        the caller must then send nothing."""
        if not self.has_store_mutations:
            return None
        header = dcmread(path, stop_before_pixels=True)
        muts = mutations_for(self.config, "store", node, header, calling_ae or "")
        if not muts:
            return None
        dataset = dcmread(path)
        changes = apply_mutations(dataset, muts, pseudonyms=self.pseudonyms)
        log.debug(kv(event="mutated", node=node or "-", sop=sop, mutations=",".join(m.name for m in muts),
                     changes=len(changes)))
        return dataset

    def forget_variant(self, job: Job, ts: str, path: Any) -> None:
        with self._variants_lock:
            self._variants.pop((job.object_pk, ts), None)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def recover(self) -> int:
        """Put back to pending what a previous run of this proxy left in flight, and expired leases."""
        now = utcnow()
        with self.sessions.begin() as s:
            n = s.execute(
                update(ForwardItem)
                .where(ForwardItem.state == ForwardState.inflight,
                       or_(ForwardItem.lease_owner == self.owner, ForwardItem.lease_owner.like(self.owner + "#%"),
                           ForwardItem.lease_until < now, ForwardItem.lease_owner.is_(None)))
                .values(state=ForwardState.pending, lease_until=None, lease_owner=None, next_attempt_at=now)
            ).rowcount
        if n:
            log.info(kv(event="forward-recovered", rows=n, reason="in flight when the previous run stopped"))
        return n or 0

    def start(self) -> None:
        self.recover()
        self.watchdog.start()
        for node, node_cfg in self.config.nodes.items():
            self.workers[node] = [NodeWorker(self, node, slot) for slot in range(node_cfg.associations)]
            for w in self.workers[node]:
                w.start()

    def _first(self, seen: set[str], node: str) -> bool:
        with self._down_lock:
            first = node not in seen
            seen.add(node)
            return first

    def limited(self, node: str) -> bool:
        """Note that `node` refused an extra association; True the first time (one warning)."""
        return self._first(self._limited, node)

    def node_down(self, node: str) -> bool:
        """Note that `node` failed; True the first time (the outage's one warning)."""
        return self._first(self._down, node)

    def node_up(self, node: str) -> bool:
        """Note a delivery to `node`; True when it had been down (the outage's one node-back)."""
        with self._down_lock:
            was = node in self._down
            self._down.discard(node)
            return was

    def notify(self, nodes: Sequence[str]) -> None:
        for n in nodes:
            for w in self.workers.get(n, ()):
                w.wake.set()

    def stop(self, timeout: float = 6.0) -> None:
        self.stopping.set()
        every = [w for ws in self.workers.values() for w in ws]
        for w in every:
            w.wake.set()
        deadline = time.monotonic() + timeout
        for w in every:
            w.join(max(0.1, deadline - time.monotonic()))
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
