"""Fuzzing the DICOM port: hostile bytes on raw sockets to a running qrproxy (SQLite).

Families: mutated A-ASSOCIATE-RQ PDUs (odd AE titles, absurd maximum lengths, flipped bytes, lying
item lengths, cut short); P-DATA-TF on an established association with lying PDU and PDV lengths,
truncation, wrong presentation context IDs, random control headers and command sets; C-STORE and
C-FIND data sets with huge element lengths, bad VRs, broken character sets and sequences nested
thousands deep. After every few cases a real association (pynetdicom C-ECHO) must still succeed; at
the end the process is alive, its log has no traceback, and its resident memory stayed bounded.

Cases per family: QRPROXY_FUZZ_EXAMPLES (default 40); a longer run, see docs/operations.md "Security and limits":
    QRPROXY_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import pytest
from fuzz.mutate import associate_requests, datasets, mutated
from fuzz.pdus import (CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, P_DATA_TF, STUDY_ROOT_FIND, VERIFICATION, RawPeer,
                       echo_rq, establish, find_rq, p_data, pdu, pdv, store_rq)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peers import free_port
from support import echo_ok

EXAMPLES = int(os.environ.get("QRPROXY_FUZZ_EXAMPLES", "40"))
CHECK_EVERY = 10
RAN: Counter[str] = Counter()
FUZZ_SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="QRPROXY_FUZZ_SEED" not in os.environ,
                         suppress_health_check=list(HealthCheck), database=None)
CONTEXTS = ((CT_IMAGE, (EXPLICIT_LE, IMPLICIT_LE)), (STUDY_ROOT_FIND, (EXPLICIT_LE,)), (VERIFICATION, (IMPLICIT_LE,)))


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def ran_enough(family: str) -> None:
    """The family really sent its cases (hypothesis may stop a search early, and a data set case
    whose command the proxy refused sends nothing more): at least half of QRPROXY_FUZZ_EXAMPLES
    reached the proxy and were followed by its checks. `pytest -s` shows the counts."""
    print(f"fuzz cases run: {family}={RAN[family]} (QRPROXY_FUZZ_EXAMPLES={EXAMPLES})")
    assert RAN[family] >= max(1, EXAMPLES // 2), f"only {RAN[family]} {family} cases reached the proxy"


class Target:
    """The running proxy and the per-case bookkeeping."""

    def __init__(self, proc: Any):
        self.proc = proc
        self.port = proc.port
        self.rss_start = rss_kb(proc.pid)
        self.rss_max = self.rss_start
        self.cases = 0

    def after_case(self, family: str) -> None:
        RAN[family] += 1
        self.cases += 1
        if self.cases % CHECK_EVERY == 0:
            self.check()

    def check(self) -> None:
        assert self.proc.running, self.proc.log_tail(60)
        assert echo_ok(self.port), f"a real association failed after {self.cases} cases:\n{self.proc.log_tail(60)}"
        self.rss_max = max(self.rss_max, rss_kb(self.proc.pid))

    def finish(self) -> None:
        self.check()
        log = self.proc.log_text()
        assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
        # bounded: at most twice the start plus 64 MB (a few associations' buffers), whatever was sent
        assert self.rss_max < 2 * self.rss_start + 65536, (self.rss_start, self.rss_max)
        print(f"fuzz: {self.cases} cases, RSS {self.rss_start // 1024} -> max {self.rss_max // 1024} MB")


@pytest.fixture
def target(qrproxy, tmp_path) -> Any:
    proc = qrproxy({"ae_title": "QRPROXY", "host": "127.0.0.1", "port": free_port(),
                    "database": f"sqlite:///{tmp_path / 'fuzz.sqlite3'}", "spool_dir": "var/spool",
                    "idle_timeout": "2s", "acse_timeout": "2s", "max_pdu": 16384,
                    "store": {"min_free_space": "1MB", "max_dataset_size": "1MB"}})
    t = Target(proc)
    yield t
    t.finish()


def send_and_listen(peer: RawPeer, data: bytes, wait: float = 0.3) -> None:
    """Send, then read whatever comes back for a moment; the answer itself is not the point."""
    if peer.send(data):
        peer.read_pdu(timeout=wait)


def test_fuzz_associate_rq(target: Target) -> None:
    @FUZZ_SETTINGS
    @given(data=associate_requests())
    def case(data: bytes) -> None:
        with RawPeer("127.0.0.1", target.port) as peer:
            send_and_listen(peer, data)
        target.after_case("associate-rq")

    case()
    ran_enough("associate-rq")


def test_fuzz_p_data(target: Target) -> None:
    @FUZZ_SETTINGS
    @given(kind=st.sampled_from(["lying-pdu-length", "truncated", "wrong-context", "mutated-echo",
                                 "lying-pdv-length", "random-command"]),
           context=st.integers(0, 255), control=st.integers(0, 255), junk=st.binary(max_size=256),
           data=st.data())
    def case(kind: str, context: int, control: int, junk: bytes, data: st.DataObject) -> None:
        peer, accepted = establish("127.0.0.1", target.port, contexts=CONTEXTS)
        with peer:
            echo = p_data(5, 0x03, echo_rq())
            if kind == "lying-pdu-length":
                msg = pdu(P_DATA_TF, pdv(5, 0x03, echo_rq()), length=data.draw(st.integers(0, 1 << 32 - 1)))
            elif kind == "truncated":
                msg = echo[:data.draw(st.integers(1, len(echo) - 1))]
            elif kind == "wrong-context":
                msg = p_data(context, control, echo_rq())
            elif kind == "mutated-echo":
                msg = data.draw(mutated(echo))
            elif kind == "lying-pdv-length":
                msg = pdu(P_DATA_TF, pdv(5, 0x03, echo_rq(), length=data.draw(st.integers(0, 1 << 32 - 1))))
            else:
                msg = p_data(5, control, junk)
            send_and_listen(peer, msg)
        target.after_case("p-data")

    case()
    ran_enough("p-data")


@pytest.mark.parametrize("service", ["store", "find"])
def test_fuzz_datasets(target: Target, service: str) -> None:
    @FUZZ_SETTINGS
    @given(ds=datasets("1.2.826.0.1.3680043.2.1125.99.1"), split=st.integers(1, 4), explicit=st.booleans())
    def case(ds: bytes, split: int, explicit: bool) -> None:
        peer, accepted = establish("127.0.0.1", target.port, contexts=CONTEXTS)
        with peer:
            if service == "store":
                cx, cmd = 1, store_rq("1.2.826.0.1.3680043.2.1125.99.1")
            else:
                cx, cmd = 3, find_rq()
            if not peer.send(p_data(cx, 0x03, cmd)):
                return
            # the data set in `split` fragments, each at most the proxy's maximum PDU
            step = max(1, min(16000, -(-len(ds) // split)))
            chunks = [ds[i:i + step] for i in range(0, len(ds), step)] or [b""]
            for i, chunk in enumerate(chunks):
                if not peer.send(pdu(P_DATA_TF, pdv(cx, 0x02 if i == len(chunks) - 1 else 0x00, chunk))):
                    break
            peer.read_pdu(timeout=2.0)
        target.after_case(f"{service}-dataset")

    case()
    ran_enough(f"{service}-dataset")
