"""Several C-FIND associations to one node at once, for work made of many small queries.

Over a far link every C-FIND costs at least a round trip, whatever its size: a refresh that learns
1,000 studies one SERIES and one IMAGE query at a time spends 2,000 round trips waiting (80 s at
RTT 40 ms). A `FindPool` keeps up to `size` queries in flight instead, one per association
(`nodes.NAME.associations`), so the waits overlap.

Each association is owned by one worker thread (an association is not shared between threads);
requests are callables taking a `upstream.FindSession`, queued by priority (lower first, then in
order) and answered through futures. Associations open only for a backlog: a worker is started when
a request waits and no open association is free, so a chain of dependent queries (one study,
series after study) stays on one association and pays no extra set-up. With `size` 1 there is one
association and one query at a time, as before the pool existed.

Failures: a request that fails (UpstreamError: a failure status, a lost association, the deadline,
`cancel`) fails its future, and its worker aborts its association and stops; the caller decides
what the run does (refresh: fail it). The first association that cannot be opened fails every
queued request with the same error a single `find_session` gives; an extra one (the node allows
fewer associations than configured) is logged once and the pool goes on with those it has.
`timeout` bounds the whole pool's work, however many associations it opens.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from qrproxy.config.schema import Config
from qrproxy.logs import kv
from qrproxy.scu import upstream

log = logging.getLogger("qrproxy.upstream")

T = TypeVar("T")


class FindPool:
    """Up to `size` C-FIND associations to node `name` under `model`; use as a context manager
    (leaving it waits for the workers: queued requests are cancelled, running ones finish)."""

    def __init__(self, config: Config, name: str, model: str = "study", size: int = 1,
                 timeout: float | None = None, cancel: Any = None):
        self.config, self.name, self.model, self.cancel = config, name, model, cancel
        self.size = max(1, int(size))
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, Future[Any], Callable[[upstream.FindSession], Any]]] = []
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._opening = 0  # workers still setting up their association
        self._open = 0  # workers holding an open association
        self._idle = 0  # of those, waiting for a request
        self._closed = False
        self._warned = False
        self.opened = 0  # associations opened so far (for tests and logs)

    def __enter__(self) -> FindPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- the caller's side ------------------------------------------------------------------------

    def submit(self, fn: Callable[[upstream.FindSession], T], priority: int = 1) -> Future[T]:
        """Queue `fn(find_session)`; it runs on whichever association is free first."""
        fut: Future[T] = Future()
        with self._cond:
            if self._closed:
                fut.set_exception(upstream.UpstreamError(f"{self.name}: C-FIND pool closed"))
                return fut
            heapq.heappush(self._queue, (priority, next(self._seq), fut, fn))
            # Open another association only when the queue outgrows the workers ready to take it.
            if len(self._queue) > self._idle + self._opening and len(self._threads) < self.size:
                self._start_worker()
            self._cond.notify()
        return fut

    def find(self, identifier: Dataset, priority: int = 1) -> list[Dataset]:
        """The matches of one C-FIND, waited for."""
        return self.submit(lambda fs: fs.find(identifier), priority).result()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._fail_queued(None)
            self._cond.notify_all()
            threads = list(self._threads)
        for t in threads:
            t.join()

    # --- the workers ------------------------------------------------------------------------------

    def _start_worker(self) -> None:
        t = threading.Thread(target=self._work, name=f"find-{self.name}-{len(self._threads) + 1}", daemon=True)
        self._threads.append(t)
        self._opening += 1
        t.start()

    def _left(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise upstream.UpstreamError(f"{self.name}: C-FIND timed out")
        return left

    def _take(self) -> tuple[Future[Any], Callable[[upstream.FindSession], Any]] | None:
        with self._cond:
            self._idle += 1
            try:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                _, _, fut, fn = heapq.heappop(self._queue)
                return fut, fn
            finally:
                self._idle -= 1

    def _work(self) -> None:
        is_open = False
        try:
            with upstream.find_session(self.config, self.name, self.model, timeout=self._left(),
                                       cancel=self.cancel) as fs:
                # The pool's deadline, not one counted from this association's opening.
                fs.deadline = self.deadline
                with self._cond:
                    self._opening -= 1
                    self._open += 1
                    self.opened += 1
                is_open = True
                while (item := self._take()) is not None:
                    fut, fn = item
                    if not fut.set_running_or_notify_cancel():
                        continue
                    try:
                        fut.set_result(fn(fs))
                    except BaseException as exc:
                        fut.set_exception(exc)
                        raise  # this association is suspect: abort it, stop this worker
        except BaseException as exc:  # noqa: BLE001 - handed to the futures, never lost
            self._worker_failed(exc, is_open)
        finally:
            with self._cond:
                if is_open:
                    self._open -= 1
                if self._open == 0 and self._opening == 0 and self._queue and not self._closed:
                    # No association left to serve what is queued (the last one failed).
                    self._fail_queued(upstream.UpstreamError(f"{self.name}: no C-FIND association left"))

    def _worker_failed(self, exc: BaseException, was_open: bool) -> None:
        with self._cond:
            if was_open:
                return  # a request failed: its future carries the error
            self._opening -= 1
            others = self._open + self._opening
            if others and isinstance(exc, upstream.UpstreamError) and not self._closed:
                # The node refused one more association: carry on with those open.
                self.size = len(self._threads) - 1
                self._threads = [t for t in self._threads if t is not threading.current_thread()]
                if not self._warned:
                    self._warned = True
                    log.warning(kv(event="find-association-refused", node=self.name, reason=str(exc),
                                   associations=others))
                return
            self._fail_queued(exc)

    def _fail_queued(self, exc: BaseException | None) -> None:
        """Cancel (exc None) or fail every queued request; the caller holds the lock."""
        while self._queue:
            _, _, fut, _ = heapq.heappop(self._queue)
            if exc is None:
                fut.cancel()
            elif fut.set_running_or_notify_cancel():
                fut.set_exception(exc)


__all__ = ["FindPool"]
