"""Faults on the wire: an upstream that dies in the middle of an instance, qrproxy killed with SIGKILL
while forwarding, a burst of connects larger than ``max_associations``.

The upstream is tests/recording_scp.py (a pynetdicom Storage SCP in its own process) that fsyncs one
line per C-STORE it answers with Success, so the deliveries are counted by the receiver, across its
own deaths and qrproxy's. Every wait is bounded (polling with a timeout, pytest.mark.timeout on each
test), so a hung qrproxy fails the test instead of hanging the suite. Nothing asserts wall-clock time.

Each test runs on SQLite and on PostgreSQL (``db_url``).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import generate_uid
from pynetdicom import dsutils

import dicomgen
from conftest import _factory
from fuzz.pdus import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RP, P_DATA_TF, RELEASE_RQ, RawPeer,
                       associate_rq, echo_rq, p_data)
from peers import LOCALHOST, QrproxyProcess
from recording_scp import RecordingSCP
from support import assert_all_success, node, proxy_config, queue_rows, storescu, wait_until


@pytest.fixture
def recording_scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., RecordingSCP]]:
    """``recording_scp(aet="RECSCP", start=True, die_after_bytes=None, hold_seconds=0.0)``: a
    RecordingSCP on a port of its own that it keeps across restarts; its log goes into failure reports."""
    make, stop_all = _factory(request, tmp_path, RecordingSCP, "recording-scp")
    yield make
    stop_all()


def queue_states(proc: QrproxyProcess, sops: set[str]) -> Counter[str]:
    """States of the forward rows of ``sops`` per ``queue list --json`` (a CLI failure says so)."""
    try:
        rows = queue_rows(proc)
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        return Counter({f"(queue list failed: {str(exc)[:300]})": 1})
    return Counter(r["state"] for r in rows if r["sop_instance_uid"] in sops)


def missing(delivered: Counter[str], want: set[str]) -> str:
    gone = sorted(want - set(delivered))
    return f"{len(want) - len(gone)} of {len(want)} delivered; missing e.g. {gone[:3]}"


# ==============================================================================================
# 1. The upstream dies in the middle of an instance, three times in a row
# ==============================================================================================

#: 8 MB per instance (2048 x 2048 x 16 bit) and the SCP dying after 256 KB on an association: the
#: forwarder is cut off early in the first instance of every association with far more of it still to
#: send than the loopback socket buffers absorb (measured: up to ~3 MB) plus the bounded DUL send queue
#: (16 PDUs), so the sending thread is putting PDUs on that queue when the peer goes. With 2 MB
#: instances the buffers sometimes take the whole rest of the instance and the bug hides (the sender
#: then waits for a response instead, which fails cleanly): the unfixed qrproxy hung after 4 of 9 deaths.
BIG_ROWS = BIG_COLS = 2048
BIG_INSTANCES = 12
DIE_AFTER = 256 * 1024
DEATHS = 3
DEATH_WAIT = 60.0  # qrproxy retries a dead node after forward.retry_min..retry_max (1-2 s here)


def big_study(n: int) -> list[Any]:
    """``n`` CT instances of one series with BIG_ROWS x BIG_COLS 12-bit pixels (numpy: dicomgen's
    hash-based pixels take seconds per 8 MB)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for i in range(1, n + 1):
        ds = dicomgen.make_ct(study_uid=study_uid, series_uid=series_uid, instance_number=i, rows=8, cols=8)
        ds.Rows, ds.Columns = BIG_ROWS, BIG_COLS
        rng = np.random.default_rng(i)
        ds.PixelData = rng.integers(0, 4096, size=BIG_ROWS * BIG_COLS, dtype=np.uint16).tobytes()
        out.append(ds)
    return out


@pytest.mark.timeout(900)
def test_upstream_killed_mid_instance_repeatedly(db_url: str, qrproxy: Any, recording_scp: Any,
                                                 tmp_path: Path) -> None:
    """The PACS is killed (SIGKILL) while qrproxy is sending it an instance, three times in a row,
    then comes back for good. Without restarting qrproxy every instance is delivered and no queue row
    stays in flight. (The bug: the forwarder's thread blocked for ever putting PDUs on a bounded send
    queue that nothing drained any more once the connection was gone: the SCP saw no further
    association after its first death.)"""
    scp = recording_scp(start=False)  # port reserved; the backlog is queued while it is down
    cfg = proxy_config(db_url, {"PACS": node(scp)},
                       forward={"max_attempts": 20, "retry_min": "1s", "retry_max": "2s", "poll": "1s"})
    proc = qrproxy(cfg)
    study = big_study(BIG_INSTANCES)
    files = dicomgen.write_all(study, tmp_path / "in")
    size = files[0].stat().st_size
    assert size > DIE_AFTER + 6 * 2**20, f"instances of {size} bytes: the socket buffers could take all of one"
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)
    want = {str(ds.SOPInstanceUID) for ds in study}

    for death in range(1, DEATHS + 1):
        scp.start(die_after_bytes=DIE_AFTER)
        code = scp.wait_exit(DEATH_WAIT)
        if code is None:
            states = queue_states(proc, want)
            scp.stop()
            pytest.fail(
                f"upstream run {death} of {DEATHS} (dies after {DIE_AFTER} bytes on an association) was not "
                f"sent {DIE_AFTER} bytes within {DEATH_WAIT:.0f} s: qrproxy did not send to the node again "
                f"after it died in the middle of an instance{' (run 1: never sent at all)' if death == 1 else ''}. "
                f"Delivered: {missing(scp.deliveries(), want)}; queue rows: {dict(states)}", pytrace=False)
        assert code == -9, f"recording SCP run {death} exited with {code}, not by its own SIGKILL\n{scp.log_tail()}"
        assert "dying (SIGKILL)" in scp.log_text(since_start=True), scp.log_tail()

    delivered_while_dying = scp.deliveries()
    scp.start()  # for good, same port
    wait_until(lambda: want <= set(scp.deliveries()), 120,
               lambda: f"after {DEATHS} upstream deaths mid-instance, with the upstream back: "
                       f"{missing(scp.deliveries(), want)} (delivered before it came back: "
                       f"{len(delivered_while_dying)}); queue rows: {dict(queue_states(proc, want))}")
    assert proc.running, f"qrproxy exited ({proc.returncode})"
    assert set(scp.deliveries()) == want, f"unexpected instances at the SCP: {set(scp.deliveries()) - want}"

    # Nothing stuck in flight: every row of the backlog ends up sent (the last response may be a
    # moment ahead of its row's commit).
    wait_until(lambda: queue_states(proc, want) == Counter(sent=len(want)), 60,
               lambda: f"queue rows of the delivered instances: {dict(queue_states(proc, want))} "
                       f"(expected all {len(want)} sent)")


# ==============================================================================================
# 2. kill -9 of qrproxy while forwarding re-sends at most what was in flight
# ==============================================================================================

KILL_AT = (25, 55)  # distinct deliveries at the SCP when qrproxy is killed
INSTANCES = 80
HOLD = 0.05  # the SCP sleeps this long before answering each C-STORE: forwarding takes a few seconds


@pytest.mark.timeout(600)
@pytest.mark.parametrize("associations", [1, 3])
def test_kill9_while_forwarding_resends_at_most_in_flight(db_url: str, qrproxy: Any, recording_scp: Any,
                                                         tmp_path: Path, associations: int) -> None:
    """qrproxy is killed with SIGKILL twice while it forwards 80 instances, and restarted on the same
    spool and database; afterwards every instance is at the upstream, and the re-sends are bounded by
    what can be in flight at a kill, not by a commit batch.

    The bound, per kill: qrproxy forwards to a node on one association, one C-STORE at a time, and
    records an instance as sent when its response arrives. At the instant of the kill, per association:
    - the instance on the wire (response not yet received) may or may not have been recorded by the
      SCP; if the SCP recorded it and answered, the restarted qrproxy sends it again: 1 re-send;
    - in addition, allow 1 more for an instance whose Success response had arrived but whose "sent"
      row was not yet committed (or an implementation that overlaps that commit with the next send).
    So at most 2 re-sends per kill per association, 2 x 2 = 4 for two kills on one association, 12
    with `associations: 3` (which also shows N associations deliver every instance, none lost).
    Before the fix "sent" was committed every 50 instances: about 25 re-sends on the first kill alone.
    """
    scp = recording_scp(start=False, hold_seconds=HOLD)
    cfg = proxy_config(db_url, {"PACS": node(scp, associations=associations)},
                       forward={"max_attempts": 20, "retry_min": "1s", "retry_max": "2s", "poll": "1s"})
    proc = qrproxy(cfg)
    study = dicomgen.make_study(1, INSTANCES)
    files = dicomgen.write_all(study, tmp_path / "in")
    # All acknowledged (durably spooled) before the upstream is up: storescu is not hit by the kills.
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)
    want = {str(ds.SOPInstanceUID) for ds in study}
    scp.start(hold_seconds=HOLD)

    at_kill: list[Counter[str]] = []
    for threshold in KILL_AT:
        wait_until(lambda: len(scp.deliveries()) >= threshold, 120,
                   lambda: f"waiting for {threshold} deliveries before killing qrproxy: "
                           f"{missing(scp.deliveries(), want)}; queue rows: {dict(queue_states(proc, want))}",
                   interval=0.02)
        assert proc.kill9() == -9
        at_kill.append(scp.deliveries())
        proc.start()

    wait_until(lambda: want <= set(scp.deliveries()), 180,
               lambda: f"after {len(KILL_AT)} kills: {missing(scp.deliveries(), want)}; "
                       f"queue rows: {dict(queue_states(proc, want))}")
    delivered = scp.deliveries()
    assert set(delivered) == want, f"unexpected instances at the SCP: {set(delivered) - want}"

    resent = {sop: n - 1 for sop, n in delivered.items() if n > 1}
    bound = 2 * len(KILL_AT) * associations
    kills = ", ".join(f"kill {i + 1} at {len(c)} distinct / {sum(c.values())} deliveries"
                      for i, c in enumerate(at_kill))
    total = sum(resent.values())
    assert total <= bound, (
        f"{total} re-sends ({len(resent)} instances delivered more than once) for "
        f"{len(KILL_AT)} kills of qrproxy; at most {bound} allowed (2 per kill and association: in flight + "
        f"response not yet committed). {kills}; {sum(delivered.values())} deliveries of {INSTANCES} instances")

    wait_until(lambda: queue_states(proc, want) == Counter(sent=INSTANCES), 60,
               lambda: f"queue rows after delivery: {dict(queue_states(proc, want))}")


@pytest.mark.timeout(300)
def test_a_node_that_allows_fewer_associations_is_not_an_outage(db_url: str, qrproxy: Any, recording_scp: Any,
                                                                 tmp_path: Path) -> None:
    """`associations: 4` to a PACS that allows one sender one association (the others rejected,
    transient, local limit exceeded): every instance arrives exactly once on the one it allows, the
    limit is said once as associations-limited, and the node is never reported down (before: a
    node-down warning and a node-back for every retry of the extra associations), not even by the
    health check whose own association the PACS turns down while the forwarder holds the one it
    allows (`node_check_interval: 1s`)."""
    scp = recording_scp(start=False, hold_seconds=0.05, max_associations=1)
    cfg = proxy_config(db_url, {"PACS": node(scp, associations=4)}, node_check_interval="1s",
                       forward={"max_attempts": 3, "retry_min": "1s", "retry_max": "2s", "poll": "1s"})
    proc = qrproxy(cfg)
    study = dicomgen.make_study(1, 80)
    files = dicomgen.write_all(study, tmp_path / "in")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)  # queued: the PACS is down
    want = {str(ds.SOPInstanceUID) for ds in study}
    scp.start()
    wait_until(lambda: want <= set(scp.deliveries()), 180,
               lambda: f"{missing(scp.deliveries(), want)}; queue rows: {dict(queue_states(proc, want))}")
    wait_until(lambda: queue_states(proc, want) == Counter(sent=len(want)), 60,
               lambda: f"queue rows: {dict(queue_states(proc, want))}")
    time.sleep(3)  # a few more health checks while the forwarder's association is still open
    delivered = scp.deliveries()
    assert set(delivered) == want and max(delivered.values()) == 1, \
        f"re-sent: {[u for u, n in delivered.items() if n > 1][:3]}"
    text = proc.log_text()
    limited = [ln for ln in text.splitlines() if "event=associations-limited" in ln and "WARNING" in ln]
    assert len(limited) == 1, f"associations-limited warnings: {len(limited)} (expected 1)\n{text[-4000:]}"
    assert "configured=4" in limited[0] and "hint=" in limited[0], limited[0]
    # one node-down: the outage before the PACS started; none for the associations it turns down
    downs = [ln for ln in text.splitlines() if "qrproxy.forward" in ln and "event=node-down" in ln and "WARNING" in ln]
    assert len(downs) <= 1, "node-down/node-back flapping while the node worked:\n" + "\n".join(downs)
    back = text.index("event=node-back")
    health_downs = [ln for ln in text[back:].splitlines() if "qrproxy.health" in ln and "event=node-down" in ln]
    assert not health_downs, "the health check called a busy node down:\n" + "\n".join(health_downs)


# ==============================================================================================
# 3. A burst of 150 connects against max_associations: 100
# ==============================================================================================

BURST = 150
MAX_ASSOC = 100
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)  # rejected-transient, service-provider (presentation), local limit


def raw_echo_status(peer: RawPeer) -> int | None:
    """Send a C-ECHO-RQ on context 1 of a raw association; the Status of the C-ECHO-RSP."""
    peer.send(p_data(1, 0x03, echo_rq()))
    command = b""
    while (reply := peer.read_pdu(60)) is not None and reply.type == P_DATA_TF:
        body = reply.body
        while len(body) >= 6:  # PDVs: length, context ID, control header, fragment
            length, control = int.from_bytes(body[:4], "big"), body[5]
            command += body[6:4 + length]
            body = body[4 + length:]
            if control & 0x01 and control & 0x02:  # command, last fragment
                rsp = dsutils.decode(BytesIO(command), True, True)
                return int(rsp.Status) if "Status" in rsp else None
    return None


def tcp_ext(*names: str) -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (this network namespace)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], map(int, vals.split()[1:])))
            return {n: table[n] for n in names}
    raise AssertionError("no TcpExt in /proc/net/netstat")


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:``port`` (``ss``: Send-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=30).stdout
    backlogs = [int(f[2]) for f in (ln.split() for ln in out.splitlines()) if len(f) >= 4 and f[0] == "LISTEN"]
    assert backlogs, f"ss shows no socket listening on port {port}:\n{out}"
    return min(backlogs)


@pytest.mark.timeout(300)
def test_connection_burst(db_url: str, qrproxy: Any) -> None:
    """150 associations requested at once (threads released together, each kept open until all have
    their answer) against max_associations 100: exactly 100 accepted, 50 rejected at once with
    A-ASSOCIATE-RJ rejected-transient / local-limit-exceeded, none aborted or unanswered. No connect
    may wait for a SYN retry: the listen queue holds the burst (backlog >= max_associations) and the
    kernel's ListenOverflows/ListenDrops do not grow (they count in this network namespace, so
    another program's overflow at the same moment would be blamed here too; unlikely on loopback).
    No wall-clock assertions. (Before the fix: backlog 5; 97-99 accepted, rejected associations not yet
    closed counting against the limit.)"""
    cfg = proxy_config(db_url, {}, max_associations=MAX_ASSOC, max_associations_per_peer=2 * BURST)
    proc = qrproxy(cfg)
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    backlog = listen_backlog(proc.port)

    go = threading.Barrier(BURST + 1, timeout=60)
    answered = threading.Barrier(BURST, timeout=120)
    results: list[dict[str, Any] | None] = [None] * BURST

    # The 150 requestors are raw sockets (pynetdicom's PDU encoder, one blocking thread each), not 150
    # pynetdicom AEs: those run 300 polling threads in the test process, which on a 2-core CI machine
    # starved the requestors themselves until their own ACSE timer fired. A blocked recv costs nothing,
    # so what is measured is qrproxy's answer.
    def one(i: int) -> None:
        res: dict[str, Any] = {"outcome": "exception"}
        peer = None
        try:
            go.wait()
            peer = RawPeer(LOCALHOST, proc.port, timeout=60)
            peer.send(associate_rq(f"BURST{i:03d}", "QRPROXY"))
            reply = peer.read_pdu(60)
            if reply is None:
                res["outcome"] = "no answer"
            elif reply.type == A_ASSOCIATE_AC:
                res["outcome"] = "established"
            elif reply.type == A_ASSOCIATE_RJ:
                res["outcome"] = "rejected"
                res["reason"] = tuple(reply.body[1:4])  # result, source, reason/diagnostic
            elif reply.type == A_ABORT:
                res["outcome"] = "aborted"
            else:
                res["outcome"] = f"PDU type {reply.type}"
        except Exception as exc:  # noqa: BLE001 - reported as an outcome
            res["error"] = repr(exc)
        results[i] = res
        try:
            answered.wait()  # every association stays open until all 150 have their answer
        except threading.BrokenBarrierError:
            pass
        try:
            if peer is not None and res["outcome"] == "established":
                res["echo"] = raw_echo_status(peer)
                peer.send(RELEASE_RQ)
                rp = peer.read_pdu(60)
                res["released"] = rp is not None and rp.type == A_RELEASE_RP
        finally:
            if peer is not None:
                peer.close()

    threads = [threading.Thread(target=one, args=(i,), name=f"burst-{i}", daemon=True) for i in range(BURST)]
    for t in threads:
        t.start()
    before = tcp_ext("ListenOverflows", "ListenDrops")
    go.wait()
    for t in threads:
        t.join(180)
    after = tcp_ext("ListenOverflows", "ListenDrops")
    assert not any(t.is_alive() for t in threads), "burst threads still running after 180 s"

    outcomes = Counter(r["outcome"] if r else "(thread died)" for r in results)
    reasons = Counter(r.get("reason") for r in results if r and r["outcome"] == "rejected")
    errors = [r["error"] for r in results if r and "error" in r][:3]
    echoes = Counter(r.get("echo") for r in results if r and r["outcome"] == "established")
    grew = {k: after[k] - before[k] for k in after if after[k] != before[k]}
    problems = []
    if outcomes != Counter(established=MAX_ASSOC, rejected=BURST - MAX_ASSOC):
        problems.append(f"outcomes of {BURST} simultaneous association requests with max_associations "
                        f"{MAX_ASSOC}: {dict(outcomes)} (expected {MAX_ASSOC} established, "
                        f"{BURST - MAX_ASSOC} rejected){f'; errors e.g. {errors}' if errors else ''}")
    if set(reasons) - {LOCAL_LIMIT_EXCEEDED}:
        problems.append(f"rejections (result, source, diagnostic): {dict(reasons)}, expected all "
                        f"{LOCAL_LIMIT_EXCEEDED} (rejected-transient, local-limit-exceeded)")
    if set(echoes) - {0}:
        problems.append(f"C-ECHO statuses on the established associations: {dict(echoes)}")
    unreleased = sum(1 for r in results if r and r["outcome"] == "established" and not r.get("released"))
    if unreleased:
        problems.append(f"{unreleased} established associations got no A-RELEASE-RP")
    if backlog < min(MAX_ASSOC, somaxconn):
        problems.append(f"listening socket backlog {backlog} (ss Send-Q) < max_associations {MAX_ASSOC}: "
                        f"a burst of connects overflows the accept queue and waits for SYN retries")
    if grew:
        problems.append(f"kernel listen queue overflows during the burst (TcpExt, /proc/net/netstat): {grew}")
    assert not problems, "\n".join(problems)
    assert proc.running, f"qrproxy exited ({proc.returncode})"


# ==============================================================================================
# 4. Retrieve-through from a PACS that is killed while it sends
# ==============================================================================================


@pytest.mark.timeout(600)
@pytest.mark.orthanc
def test_retrieve_through_survives_upstream_killed(db_url: str, orthanc_factory: Any, storescp: Any,
                                                   qrproxy: Any, tmp_path: Path) -> None:
    """A C-MOVE that qrproxy retrieves through from Orthanc, Orthanc SIGKILLed as soon as its first
    instance starts to arrive in qrproxy's spool: the modality's C-MOVE still gets a final answer
    (bounded, no hang), qrproxy keeps running, and once Orthanc is back (same storage) the same
    C-MOVE delivers every instance, without a restart of qrproxy."""
    from test_move import _upstream_setup, counts, move_responses, received, same_pixels
    from support import spool_files

    cfg, orthanc, _ = _upstream_setup(db_url, orthanc_factory, storescp, qrproxy)
    study = big_study(8)
    for ds in study:
        orthanc.upload(dicomgen.encode(ds))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in study}
    proc = qrproxy(cfg)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(study[0].StudyInstanceUID)}

    first: list[Any] = []
    mover = threading.Thread(target=lambda: first.extend(move_responses(proc.port, storescp.aet, keys)), daemon=True)
    mover.start()
    wait_until(lambda: spool_files(proc, "incoming") or spool_files(proc) or not mover.is_alive(), 120,
               lambda: "no instance started to arrive from Orthanc", interval=0.01)
    orthanc.kill9()
    mover.join(300)
    assert not mover.is_alive(), "the modality's C-MOVE got no final answer after the PACS died under it"
    assert first, "no C-MOVE response at all"
    assert proc.running, f"qrproxy exited ({proc.returncode})"

    orthanc.start()
    storescp.clear()
    final = move_responses(proc.port, storescp.aet, keys)[-1]
    assert final.Status == 0x0000 and counts(final)[1:3] == (len(study), 0), final
    storescp.wait_for_files(len(study))
    got = received(storescp)
    assert set(got) == set(by_uid)
    assert all(same_pixels(by_uid[u], p) for u, p in got.items())
