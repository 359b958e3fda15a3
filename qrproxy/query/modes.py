"""Where an answer comes from: the cache, the upstream node, or the cache after the upstream failed.

`query.mode` (CONTRACT.md) decides, the same way for C-FIND and MWL C-FIND:

cache-first
    The cache answers. Only when it holds nothing for the query, and a node with role `query` (or
    `worklist`) exists, the upstream is asked within `query.upstream_timeout`; its answers are
    returned and written into the cache (query-through). An upstream failure then gives an empty
    answer, logged: the cache had nothing and the upstream could not be reached.
upstream-first
    The upstream answers within `query.upstream_timeout`, and its answers are written into the
    cache; when it fails or is late, the cache answers and the fallback is logged with the reason.
cache-only
    The upstream is never touched.

The upstream request runs on its own thread so that `upstream_timeout` bounds what the modality
waits for, connection set-up included. Its answers are written into the cache before they are
released, so a query right after finds them; a request that answers after the deadline still
completes in the background and its answers are still written, so the next query finds them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, TypeVar

from pydicom.dataset import Dataset

from qrproxy.logs import kv

log = logging.getLogger("qrproxy.querymode")

T = TypeVar("T")

MODES = ("cache-first", "upstream-first", "cache-only")


@dataclass
class Answer:
    """What `answer` did, for the caller's log line: source is cache, upstream, or cache-fallback
    (upstream-first fell back) / cache+upstream-failed (cache-first found nothing and the upstream
    failed)."""

    source: str = "cache"
    reason: str | None = None
    upstream_ms: int | None = None


def _call_upstream(upstream: Callable[[float], list[Dataset]], timeout: float,
                   remember: Callable[[list[Dataset]], int] | None, what: str) -> Future[list[Dataset]]:
    """Run `upstream(timeout)` on a daemon thread; remember its answers whenever they come."""
    fut: Future[list[Dataset]] = Future()

    def run() -> None:
        t0 = time.monotonic()
        try:
            matches = upstream(timeout)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting association thread
            fut.set_exception(exc)
            return
        # Written before the answer is released: a query right after this one finds the rows.
        if remember is not None and matches:
            try:
                n = remember(matches)
                log.info(kv(event="query-remembered", what=what, rows=n))
            except Exception as exc:  # the answer is still given; the cache write is best effort
                log.warning(kv(event="query-remember-failed", what=what, error=f"{type(exc).__name__}: {exc}"))
        fut.ms = int((time.monotonic() - t0) * 1000)  # type: ignore[attr-defined]
        fut.set_result(matches)

    threading.Thread(target=run, name=f"upstream-{what}", daemon=True).start()
    return fut


def _wait(fut: Future[list[Dataset]], timeout: float) -> list[Dataset]:
    try:
        # A little slack over the request's own deadline: the thread reports its own timeout first.
        return fut.result(timeout=timeout + 0.5)
    except FutureTimeout as exc:
        raise TimeoutError(f"no answer within {timeout:g}s") from exc


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


def answer(mode: str, *, local: Callable[[], Iterable[T]],
           upstream: Callable[[float], list[Dataset]] | None, timeout: float,
           remember: Callable[[list[Dataset]], int] | None = None, what: str = "c-find",
           outcome: Answer | None = None) -> Iterator[T | Dataset]:
    """Yield the answer's items per `mode`: `local()` items from the cache, or upstream Datasets.

    `upstream` is None when no node can answer (then every mode is cache-only). `outcome` is filled
    in as the answer is produced, for the caller's log line.
    """
    out = outcome if outcome is not None else Answer()
    if mode == "cache-only" or upstream is None:
        yield from local()
        return
    if mode == "upstream-first":
        matches = _ask(upstream, timeout, remember, what, out)
        if matches is None:
            out.source = "cache-fallback"
            log.warning(kv(event="upstream-fallback", what=what, reason=out.reason))
            yield from local()
            return
        yield from matches
        return
    # cache-first
    items = iter(local())
    first = next(items, _NOTHING)
    if first is not _NOTHING:
        yield from itertools.chain([first], items)  # type: ignore[list-item]
        return
    matches = _ask(upstream, timeout, remember, what, out)
    if matches is None:
        out.source = "cache+upstream-failed"
        log.warning(kv(event="query-through-failed", what=what, reason=out.reason))
        return
    yield from matches


def _ask(upstream: Callable[[float], list[Dataset]], timeout: float,
         remember: Callable[[list[Dataset]], int] | None, what: str, out: Answer) -> list[Dataset] | None:
    """The upstream's matches within `timeout` (`out` says so), or None with `out.reason` set."""
    fut = _call_upstream(upstream, timeout, remember, what)
    try:
        matches = _wait(fut, timeout)
    except Exception as exc:
        out.reason = _reason(exc)
        return None
    out.source, out.upstream_ms = "upstream", getattr(fut, "ms", None)
    return matches


_NOTHING: Any = object()
