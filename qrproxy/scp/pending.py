"""Pending responses of a C-FIND (Q/R or MWL) answer, with C-CANCEL honoured.

Shared by scp/find.py and scp/mwl.py: each answer item is either already encoded identifier bytes
(in the presentation context's transfer syntax) or a Dataset (an upstream answer relayed as is),
which the association encodes. Before each response the association reads what the peer has sent
meanwhile, so a C-CANCEL is honoured at the next match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset

PENDING = 0xFF00
CANCEL = 0xFE00


def stream(event: Any, items: Iterable[Any], fields: dict[str, Any],
           prepare: Callable[[Any], bytes | Dataset]) -> Iterator[tuple[int, Any]]:
    """Yield every item of `items` as a pending response, then Cancel if the peer cancelled.
    `fields` gets matches/status/reason for the caller's log line. Exceptions from `items`
    propagate to the caller."""
    assoc = event.assoc
    for n, item in enumerate(items):
        if event.is_cancelled:
            fields.update(status=f"0x{CANCEL:04X}", matches=n, reason="cancelled")
            yield CANCEL, None
            return
        if not assoc.is_established:
            fields.update(status="aborted", matches=n, reason="association ended during the answer")
            return
        fields["matches"] = n + 1
        yield PENDING, prepare(item)
    if event.is_cancelled:  # a C-CANCEL after the last match still gets its Cancel status
        fields.update(status=f"0x{CANCEL:04X}", reason="cancelled")
        yield CANCEL, None
