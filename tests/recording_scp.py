"""A pynetdicom Storage SCP that records every C-STORE it answers with Success, durably, and can be
told to die (SIGKILL, no goodbye) in the middle of an instance. For fault tests of the forwarder.

    python tests/recording_scp.py --port P --aet AE --record FILE [--die-after-bytes N] [--hold-seconds S]

--record FILE        one line per C-STORE answered with Success: the SOP Instance UID, appended, flushed
                     and fsynced *before* the Success status is returned. A line in the file therefore
                     means "the sender may have got Success"; an instance the sender saw Success for is
                     always in the file. Counting lines per UID gives the deliveries (re-sends > 1).
--die-after-bytes N  once more than N bytes of PDU data have been received on one association
                     (EVT_DATA_RECV, len(event.data)), kill this process with SIGKILL at once: the
                     sender is cut off in the middle of an instance, as by a PACS crash or power loss.
--hold-seconds S     sleep S seconds before answering each C-STORE (a slow upstream).
--max-associations N associations at once (default 50); one more is rejected (A-ASSOCIATE-RJ,
                     transient, local limit exceeded), as by a PACS that allows a sender only N.

Also, importable without side effects (pytest does not collect it: no test_ prefix):
    RecordingSCP        a tests/peers.py Peer running this script, restartable on the same port
    read_deliveries()   the record file as a Counter (SOP Instance UID -> times answered Success)
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import LOCALHOST, PeerError, PortPeer, free_port  # noqa: E402

SCRIPT = Path(__file__).resolve()


# --- the SCP (runs in its own process) -------------------------------------------------------------


def _log(text: str) -> None:
    sys.stdout.write(f"{time.strftime('%H:%M:%S')} {text}\n")
    sys.stdout.flush()


def serve(port: int, aet: str, record: Path, die_after_bytes: int | None, hold_seconds: float,
          host: str = "127.0.0.1", max_associations: int = 50) -> None:
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    lock = threading.Lock()
    received: dict[int, int] = {}  # id(association) -> PDU bytes received on it
    record.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(record, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def on_data_recv(event: Any) -> None:
        if die_after_bytes is None:
            return
        key = id(event.assoc)
        with lock:
            received[key] = received.get(key, 0) + len(event.data)
            total = received[key]
        if total > die_after_bytes:
            _log(f"received {total} bytes on one association (> {die_after_bytes}): dying (SIGKILL)")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_released_or_aborted(event: Any) -> None:
        with lock:
            received.pop(id(event.assoc), None)

    def on_store(event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        if hold_seconds > 0:
            time.sleep(hold_seconds)
        line = (sop + "\n").encode()
        with lock:  # one whole line per write; O_APPEND keeps lines of parallel associations apart
            os.write(fd, line)
            os.fsync(fd)
        _log(f"stored {sop} from {event.assoc.requestor.ae_title}")
        return 0x0000

    ae = AE(ae_title=aet)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_associations = max_associations
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    if max_associations < 50:
        # pynetdicom counts a connection that never sent an A-ASSOCIATE-RQ (the fixture's port
        # probe) and one it rejected until their ARTIM expires (acse_timeout): with a low limit
        # they would take the only slot for a minute
        ae.acse_timeout = 2
    handlers = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_DATA_RECV, on_data_recv),
        (evt.EVT_RELEASED, on_released_or_aborted),
        (evt.EVT_ABORTED, on_released_or_aborted),
    ]
    # The port is reused across restarts; SO_REUSEADDR (pynetdicom sets it) covers TIME_WAIT, and a
    # previous instance of this script may still be going away: retry the bind for a while.
    deadline = time.monotonic() + 15
    while True:
        try:
            server = ae.start_server((host, port), block=False, evt_handlers=handlers)
            break
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise
            _log(f"cannot bind {host}:{port} yet ({exc}); retrying")
            time.sleep(0.2)
    _log(f"listening on {host}:{port} as {aet}, record {record}, die_after_bytes={die_after_bytes}, "
         f"hold_seconds={hold_seconds}, max_associations={max_associations}")

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.shutdown()
    os.close(fd)
    _log("stopped")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--aet", required=True)
    p.add_argument("--record", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--die-after-bytes", type=int, default=None)
    p.add_argument("--hold-seconds", type=float, default=0.0)
    p.add_argument("--max-associations", type=int, default=50)
    args = p.parse_args(argv)
    serve(args.port, args.aet, args.record, args.die_after_bytes, args.hold_seconds, host=args.host,
          max_associations=args.max_associations)
    return 0


# --- test-side helpers (imported by the tests) ---------------------------------------------------


def read_deliveries(record: str | os.PathLike[str]) -> Counter[str]:
    """SOP Instance UID -> how many times the SCP answered a C-STORE of it with Success (a line being
    written right now, without its newline yet, is not counted)."""
    try:
        data = Path(record).read_bytes()
    except FileNotFoundError:
        return Counter()
    lines = data.split(b"\n")[:-1]  # the part after the last newline is incomplete (or empty)
    return Counter(line.decode() for line in lines if line)


class RecordingSCP(PortPeer):
    """tests/recording_scp.py as a peer. The port is chosen once and kept: ``start()`` after the
    process died (``wait_exit()``) or was stopped starts it again on the same port, appending to
    the same record file, with the ``die_after_bytes``/``hold_seconds`` given to ``start``."""

    name = "recording-scp"
    stop_timeout = 5.0  # SIGTERM, then SIGKILL (nothing to flush: the record is fsynced line by line)

    def __init__(self, tmpdir: str | os.PathLike[str], aet: str = "RECSCP", *, port: int | None = None,
                 name: str | None = None, die_after_bytes: int | None = None, hold_seconds: float = 0.0,
                 max_associations: int = 50):
        super().__init__(tmpdir, name)
        self.aet = aet
        self.host = LOCALHOST
        self.port = port or free_port()
        self.record = self.dir / "deliveries.txt"
        self.die_after_bytes = die_after_bytes
        self.hold_seconds = hold_seconds
        self.max_associations = max_associations

    def argv(self) -> list[str]:
        argv = [sys.executable, str(SCRIPT), "--port", str(self.port), "--aet", self.aet,
                "--record", str(self.record), "--hold-seconds", str(self.hold_seconds),
                "--max-associations", str(self.max_associations)]
        if self.die_after_bytes is not None:
            argv += ["--die-after-bytes", str(self.die_after_bytes)]
        return argv

    _fixed_port = True  # restarted on the same port after each death

    def start(self, timeout: float | None = None, *, die_after_bytes: int | None = None,  # type: ignore[override]
              hold_seconds: float | None = None) -> RecordingSCP:
        """Start (again, same port). ``die_after_bytes`` applies to this run only."""
        self.die_after_bytes = die_after_bytes
        if hold_seconds is not None:
            self.hold_seconds = hold_seconds
        super().start(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """A run started to die can be dead before the port probe sees it: qrproxy's retry may
        connect first and send the bytes that kill it. That run did what it was started for."""
        try:
            super()._wait_ready(timeout)
        except PeerError:
            if self.die_after_bytes is None or "dying (SIGKILL)" not in self.log_text(since_start=True):
                raise

    def wait_exit(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the process to exit by itself; its exit status (-9 when it
        killed itself), or None if it is still running then (it is left running)."""
        assert self.popen is not None, "never started"
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        self._kill_group()
        self._finish()
        return self.popen.returncode

    def deliveries(self) -> Counter[str]:
        return read_deliveries(self.record)


if __name__ == "__main__":
    sys.exit(main())
