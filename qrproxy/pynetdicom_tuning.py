"""The one place where qrproxy reaches into pynetdicom internals, each with the measurement that
justifies it. Everything else uses pynetdicom's public API and event handlers.

Bounded send queue
    pynetdicom's DIMSE layer turns a dataset into P-DATA PDUs with a generator and puts each one on
    the DUL's `to_provider_queue`, an unbounded queue.Queue, while the DUL thread drains it at socket
    speed. Sending a spool file (STORE_SEND_CHUNKED_DATASET) reads the disk faster than the network
    takes it, so the whole instance piles up in memory: forwarding a 315 MB instance grew the
    process by 187 MB (tests/test_large_instance.py). A bounded queue makes `put()` block, which is
    the backpressure the generator lacks; RSS growth drops to a few MB.
"""

from __future__ import annotations

import queue
from typing import Any

SEND_QUEUE_PDUS = 16  # x max PDU size (<= 256 KiB here): at most a few MB in flight per association


def bound_send_queue(assoc: Any, maxsize: int = SEND_QUEUE_PDUS) -> None:
    """Swap the association's DUL send queue for a bounded one. Call on an established association
    whose own thread is idle (the A-ASSOCIATE exchange is over), so nothing is in the old queue."""
    dul = getattr(assoc, "dul", None)
    old = getattr(dul, "to_provider_queue", None)
    if old is None or getattr(old, "maxsize", 0):
        return
    new: queue.Queue[Any] = queue.Queue(maxsize=maxsize)
    while True:
        try:
            new.put_nowait(old.get_nowait())
        except (queue.Empty, queue.Full):
            break
    dul.to_provider_queue = new
