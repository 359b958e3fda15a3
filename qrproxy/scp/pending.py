"""Pending responses of a C-FIND (Q/R or MWL) answer, sent the fast way, with C-CANCEL honoured.

Shared by scp/find.py and scp/mwl.py: each answer item is either already encoded identifier bytes,
queued as P-DATA by `net/tuning.send_pending`, or a Dataset (an upstream answer relayed as
is), handed back to pynetdicom to encode. Every few dozen responses, if the peer has sent
something (a C-CANCEL), the DUL gets a turn to read it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydicom.dataset import Dataset

from qrproxy.net.tuning import find_pending_command, let_peer_speak, peer_has_spoken, peer_max_pdu, send_pending

PENDING = 0xFF00
CANCEL = 0xFE00
CANCEL_CHECK_EVERY = 32  # responses between checks for an incoming C-CANCEL


def stream(event: Any, items: Iterable[Any], fields: dict[str, Any],
           prepare: Callable[[Any], bytes | Dataset]) -> Iterator[tuple[int, Dataset | None]]:
    """Send every item of `items` as a pending response; yield to pynetdicom only what it must send
    itself (a Dataset to encode, or the Cancel status). `fields` gets matches/status/reason for the
    caller's log line. Exceptions from `items` propagate to the caller."""
    assoc, req = event.assoc, event.request
    cx_id = event.context.context_id
    command = find_pending_command(str(req.AffectedSOPClassUID), req.MessageID)
    max_pdu = peer_max_pdu(assoc)
    for n, item in enumerate(items):
        if n and n % CANCEL_CHECK_EVERY == 0 and peer_has_spoken(assoc):
            let_peer_speak(assoc)
        if event.is_cancelled:
            fields.update(status=f"0x{CANCEL:04X}", matches=n, reason="cancelled")
            yield CANCEL, None
            return
        if not assoc.is_established:
            fields.update(status="aborted", matches=n, reason="association ended during the answer")
            return
        fields["matches"] = n + 1
        data = prepare(item)
        if isinstance(data, bytes):
            send_pending(assoc, cx_id, command, data, max_pdu)
        else:
            yield PENDING, data
    if event.is_cancelled:  # a C-CANCEL after the last match still gets its Cancel status
        fields.update(status=f"0x{CANCEL:04X}", reason="cancelled")
        yield CANCEL, None
