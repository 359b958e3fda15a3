"""The WAN emulator (tests/wan.py) measured before anything is measured through it, and qrproxy's
behaviour over a slow link (issue 18)."""

from __future__ import annotations

import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from wan import WanRelay


class _Echo:
    """A TCP echo server (the far end of the emulated link): sends back what it gets, or with
    `sink` swallows it and answers only the final byte count."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def test_relay_adds_the_round_trip_it_is_asked_for() -> None:
    echo = _Echo()
    try:
        for delay in (0.010, 0.040):
            with WanRelay(("127.0.0.1", echo.port), delay=delay) as wan:
                s = _connect(wan.port)
                rtts = []
                for _ in range(10):
                    t0 = time.monotonic()
                    s.sendall(b"x")
                    assert s.recv(1) == b"x"
                    rtts.append(time.monotonic() - t0)
                s.close()
                rtt = statistics.median(rtts)
                assert 2 * delay <= rtt < 2 * delay + 0.015, (delay, rtts)
    finally:
        echo.close()


def test_relay_limits_the_rate_shared_by_all_connections() -> None:
    echo = _Echo()
    rate = 4_000_000  # bytes/s each way
    try:
        with WanRelay(("127.0.0.1", echo.port), delay=0.005, rate=rate) as wan:
            payload = b"\0" * 2_000_000
            conns = [_connect(wan.port) for _ in range(2)]
            got = [0, 0]

            def drain(i: int) -> None:
                while got[i] < len(payload):
                    chunk = conns[i].recv(1 << 20)
                    if not chunk:
                        break
                    got[i] += len(chunk)

            readers = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
            t0 = time.monotonic()
            for r in readers:
                r.start()
            senders = [threading.Thread(target=c.sendall, args=(payload,)) for c in conns]
            for t in senders:
                t.start()
            for t in senders + readers:
                t.join(60)
            elapsed = time.monotonic() - t0
            for c in conns:
                c.close()
        assert got == [len(payload)] * 2
        measured = 2 * len(payload) / elapsed  # both connections share the link
        assert 0.85 * rate <= measured <= 1.10 * rate, (measured, rate)
    finally:
        echo.close()


# --- bandwidth limits (scu/pacing.py) ------------------------------------------------------------


def test_bandwidth_windows_pure() -> None:
    import datetime as dt

    from qrproxy.config.schema import Node
    from qrproxy.scu.pacing import limit_at

    node = Node.model_validate({"ae_title": "PACS", "host": "h", "port": 104, "bandwidth": "10MB",
                                "bandwidth_schedule": [
                                    {"days": ["mon", "tue", "wed", "thu", "fri"], "from": "07:00", "to": "19:00",
                                     "limit": "2MB"},
                                    {"days": ["fri"], "from": "22:00", "to": "06:00", "limit": "1MB"}]})
    monday_noon = dt.datetime(2026, 12, 7, 12, 0)  # a Monday
    assert limit_at(node, monday_noon) == 2_000_000
    assert limit_at(node, monday_noon.replace(hour=19)) == 10_000_000  # `to` is exclusive
    assert limit_at(node, monday_noon.replace(hour=6, minute=59)) == 10_000_000
    assert limit_at(node, dt.datetime(2026, 12, 12, 12, 0)) == 10_000_000  # Saturday
    assert limit_at(node, dt.datetime(2026, 12, 11, 23, 0)) == 1_000_000  # Friday night
    assert limit_at(node, dt.datetime(2026, 12, 12, 5, 59)) == 1_000_000  # ... past midnight into Saturday
    assert limit_at(node, dt.datetime(2026, 12, 12, 6, 0)) == 10_000_000


def test_the_contract_spelling_of_a_bandwidth_window() -> None:
    """CONTRACT.md writes `{days: mon-fri, hours: "07:00-19:00", bandwidth: 2MB}`."""
    import datetime as dt

    from pydantic import ValidationError

    from qrproxy.config.schema import Node
    from qrproxy.scu.pacing import limit_at

    node = Node.model_validate({"ae_title": "PACS", "host": "h", "port": 104, "bandwidth_schedule": [
        {"days": "mon-fri", "hours": "07:00-19:00", "bandwidth": "2MB"},
        {"days": "fri-sun", "hours": "22:00-06:00", "bandwidth": "1MB"}]})
    assert node.bandwidth_schedule[0].days == ["mon", "tue", "wed", "thu", "fri"]
    assert node.bandwidth_schedule[1].days == ["fri", "sat", "sun"]
    assert limit_at(node, dt.datetime(2026, 12, 8, 7, 0)) == 2_000_000  # a Tuesday
    assert limit_at(node, dt.datetime(2026, 12, 8, 20, 0)) == 0
    assert limit_at(node, dt.datetime(2026, 12, 14, 5, 0)) == 1_000_000  # Monday early: Sunday's night
    for bad in ({"days": "mon-xyz", "hours": "07:00-19:00", "bandwidth": 1},
                {"hours": "07:00", "bandwidth": 1}, {"hours": "07:00-25:00", "bandwidth": 1}):
        with pytest.raises(ValidationError):
            Node.model_validate({"ae_title": "PACS", "host": "h", "port": 104, "bandwidth_schedule": [bad]})


def test_prefetch_keeps_under_the_lower_of_its_own_and_the_node_limit() -> None:
    from qrproxy.jobs.prefetch import receive_cap

    assert receive_cap(0, 0) == 0
    assert receive_cap(5_000_000, 0) == 5_000_000
    assert receive_cap(0, 2_000_000) == 2_000_000
    assert receive_cap(5_000_000, 2_000_000) == 2_000_000


def test_line_speed_watchdog_and_auto_choice_pure() -> None:
    from qrproxy.scu.linespeed import CodecRate, Line, Watch, check

    class _Assoc:
        bytes_sent = 0

    w = Watch(_Assoc(), "PACS", min_rate=100_000, window=2.0)
    t0 = w.started
    assert check(w, t0 + 1.0, 10_000) is None  # not a whole window yet
    assert check(w, t0 + 2.5, 400_000) is None  # 200 kB/s over the window
    slow = check(w, t0 + 4.6, 450_000)  # 50 kB over the last ~2 s
    assert slow is not None and slow < 100_000

    codec = CodecRate(processes=2)
    codec.converted(1_000_000, 350_000, 0.05)  # 20 MB/s per process, 40 MB/s the pool
    line = Line("PACS", codec)
    assert line.choose() is False  # nothing measured yet: as received
    line.done(1_000_000, 0.01, 1, ok=True)  # 100 MB/s: a fast line
    assert line.choose() is False
    for _ in range(30):
        line.done(1_000_000, 0.5, 1, ok=True)  # 2 MB/s: the link is the bottleneck
    assert line.choose() is True
    for _ in range(30):
        line.done(1_000_000, 1_000_000 / 24e6, 1, ok=True)  # 24 MB/s: above 40/2, below 40/1.5: keeps
    assert line.choose() is True
    for _ in range(30):
        line.done(1_000_000, 1_000_000 / 30e6, 1, ok=True)  # 30 MB/s: back to as received
    assert line.choose() is False
    incompressible = CodecRate(processes=2)
    incompressible.converted(1_000_000, 950_000, 0.05)
    slow_line = Line("PACS", incompressible)
    slow_line.done(1_000_000, 1.0, 1, ok=True)
    assert slow_line.choose() is False, "compressing what does not shrink"


def _delivery_rate(storescp: Any, count: int) -> float:
    """Bytes/s at storescp from the first file to the last (file completion times)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(storescp.received_files()) < count:
        time.sleep(0.2)
    files = sorted(storescp.received_files(), key=lambda p: p.stat().st_mtime)
    assert len(files) == count, len(files)
    span = files[-1].stat().st_mtime - files[0].stat().st_mtime
    return sum(p.stat().st_size for p in files[1:]) / span


@pytest.mark.parametrize("limits,expected", [
    ({"bandwidth": "1MB"}, 1_000_000),
    ({"bandwidth": 0, "bandwidth_schedule": [{"from": "00:00", "to": "24:00", "limit": "500KB"}]}, 500_000),
], ids=["bandwidth", "schedule-window"])
def test_forwarding_keeps_to_the_node_bandwidth(qrproxy: Any, storescp_factory: Any, db_url: str, tmp_path: Path,
                                                limits: dict[str, Any], expected: int) -> None:
    import dicomgen
    from peers import free_port
    from support import proxy_config, storescu

    pacs_port = free_port()
    count = 12 if expected >= 1_000_000 else 7
    cfg = proxy_config(db_url, {"PACS": {"ae_title": "WANPACS", "host": "127.0.0.1", "port": pacs_port,
                                         "roles": ["store"], **limits}})
    pacs = storescp_factory(aet="WANPACS", port=pacs_port, extra_args=["--fork"])  # several associations
    proc = qrproxy(cfg)
    files = dicomgen.write_all(dicomgen.make_study(1, count, rows=256, cols=256), tmp_path / "in")
    assert storescu(proc.port, files, aec="QRPROXY").returncode == 0  # faster than the limit: a queue builds
    rate = _delivery_rate(pacs, count)
    assert rate <= 1.15 * expected, (rate, expected)
    assert rate >= 0.5 * expected, f"far below the limit: {rate:.0f} B/s for {expected} (is it throttled twice?)"


# --- priority and order (scu/forward.py claim_query) ---------------------------------------------


def _arrival_order(storescp: Any, count: int) -> list[str]:
    """SOP Instance UIDs in the order storescp finished writing them (storescp is single-process:
    one file after the other)."""
    import pydicom

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(storescp.received_files()) < count:
        time.sleep(0.2)
    files = storescp.received_files()
    assert len(files) == count, (len(files), count)
    files = sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))
    return [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


def test_a_higher_priority_study_overtakes_the_backlog_and_studies_go_in_series_instance_order(
        qrproxy: Any, storescp_factory: Any, db_url: str, tmp_path: Path) -> None:
    import random

    import dicomgen
    from peers import free_port
    from support import proxy_config, storescu

    pacs_port = free_port()
    # one association: strict delivery order (with several, the dispatch order is the same, and
    # completions may interleave by up to their number)
    cfg = proxy_config(db_url, {"PACS": {"ae_title": "WANPACS", "host": "127.0.0.1", "port": pacs_port,
                                         "roles": ["store"], "associations": 1}},
                       routes=[{"name": "stat", "when": {"PatientID": "^STAT"}, "to": ["PACS"], "priority": 10}])
    proc = qrproxy(cfg)
    backlog = dicomgen.make_study(2, 10, patient_id="ROUTINE1", accession="R1")
    stat = dicomgen.make_study(1, 3, patient_id="STAT1", accession="S1")
    shuffled = list(backlog)
    random.Random(7).shuffle(shuffled)  # sent out of order: delivered in series/instance order
    assert storescu(proc.port, dicomgen.write_all(shuffled, tmp_path / "backlog"), aec="QRPROXY").returncode == 0
    assert storescu(proc.port, dicomgen.write_all(stat, tmp_path / "stat"), aec="QRPROXY").returncode == 0
    pacs = storescp_factory(aet="WANPACS", port=pacs_port)
    order = _arrival_order(pacs, len(backlog) + len(stat))
    stat_uids = {str(ds.SOPInstanceUID) for ds in stat}
    assert set(order[:3]) == stat_uids, "the STAT study was not delivered first"
    expected = [str(ds.SOPInstanceUID) for ds in sorted(backlog, key=lambda d: (d.SeriesNumber, d.InstanceNumber))]
    assert order[3:] == expected, "the backlog did not go in series and instance order"


def test_stable_after_holds_a_study_until_it_is_quiet(qrproxy: Any, storescp: Any, db_url: str,
                                                      tmp_path: Path) -> None:
    import dicomgen
    from support import node, proxy_config, storescu

    cfg = proxy_config(db_url, {"PACS": node(storescp, stable_after="4s")})
    proc = qrproxy(cfg)
    study = dicomgen.make_study(1, 4)
    files = dicomgen.write_all(study, tmp_path / "in")
    assert storescu(proc.port, files[:2], aec="QRPROXY").returncode == 0
    time.sleep(2)
    assert storescu(proc.port, files[2:], aec="QRPROXY").returncode == 0
    last_store = time.time()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(storescp.received_files()) < 4:
        time.sleep(0.1)
    arrived = sorted(p.stat().st_mtime for p in storescp.received_files())
    assert len(arrived) == 4
    assert arrived[0] >= last_store + 3.5, f"forwarded {last_store + 4 - arrived[0]:.1f}s before the study was quiet"


# --- min_line_speed and transfer_syntax: auto (scu/linespeed.py) ----------------------------------


def _orthanc_uids(orthanc: Any) -> dict[str, str]:
    """SOP Instance UID -> transfer syntax UID as Orthanc received it."""
    out = {}
    for iid in orthanc.instances():
        tags = orthanc.instance_tags(iid)
        out[tags["SOPInstanceUID"]] = orthanc.get_bytes(f"/instances/{iid}/metadata/TransferSyntax").decode().strip()
    return out


def test_a_line_that_slows_to_a_trickle_is_cut_retried_and_nothing_is_lost(qrproxy: Any, orthanc: Any, db_url: str,
                                                                           tmp_path: Path) -> None:
    import urllib.request

    import dicomgen
    from peers import free_port
    from support import cli, proxy_config, queue_rows, settles, storescu
    from support.waits import wait_until

    study = dicomgen.make_study(1, 6, rows=256, cols=256)  # 128 KiB each
    with WanRelay(("127.0.0.1", orthanc.dicom_port), delay=0.005, rate=4_000) as wan:  # a trickle: 4 kB/s
        http_port = free_port()
        cfg = proxy_config(db_url, {"PACS": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": wan.port,
                                             "roles": ["store"], "associations": 1, "min_line_speed": "100KB",
                                             "min_line_speed_window": "2s"}},
                           http={"host": "127.0.0.1", "port": http_port})
        proc = qrproxy(cfg)
        assert storescu(proc.port, dicomgen.write_all(study, tmp_path / "in"), aec="QRPROXY").returncode == 0
        wait_until(lambda: "event=line-too-slow" in proc.log_text(), 60,
                   lambda: f"no line-too-slow in the log:\n{proc.log_tail(40)}")
        assert not orthanc.instances(), "an instance went through a 4 kB/s line within the window?"
        status = cli(proc, "status")
        assert "cut below min_line_speed" in status.stdout, status.stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        cuts = [float(ln.split()[-1]) for ln in metrics.splitlines()
                if ln.startswith('qrproxy_line_too_slow_total{node="PACS"}')]
        assert cuts and cuts[0] >= 1, [ln for ln in metrics.splitlines() if "too_slow" in ln]
        wan.set_rate(0)  # the line recovers: the instance cut on the wire is sent again, then the rest
        wait_until(lambda: len(orthanc.instances()) >= len(study), 90,
                   lambda: f"{len(orthanc.instances())} of {len(study)} arrived\n{proc.log_tail(40)}")
    assert set(_orthanc_uids(orthanc)) == {str(ds.SOPInstanceUID) for ds in study}

    def all_sent() -> None:  # Orthanc has them a moment before the last row is marked sent
        rows = [r for r in queue_rows(proc) if r.get("node") == "PACS"]
        assert rows and all(r["state"] == "sent" for r in rows), rows
        assert all(r["attempts"] == 0 for r in rows), "a slow line charged an attempt to an instance"

    settles(all_sent)


def test_auto_compresses_on_a_narrow_link_losslessly(qrproxy: Any, orthanc: Any, db_url: str, tmp_path: Path) -> None:
    import io

    import dicomgen
    import numpy as np
    import pydicom
    from support import cli, proxy_config, storescu
    from support.waits import wait_until

    study = dicomgen.make_study(1, 20, rows=256, cols=256, phantom=True)
    with WanRelay(("127.0.0.1", orthanc.dicom_port), delay=0.01, rate=1_000_000) as wan:  # 8 Mbit/s
        cfg = proxy_config(db_url, {"PACS": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": wan.port,
                                             "roles": ["store"], "associations": 1, "transfer_syntax": "auto"}})
        proc = qrproxy(cfg)
        assert storescu(proc.port, dicomgen.write_all(study, tmp_path / "in"), aec="QRPROXY").returncode == 0
        wait_until(lambda: len(orthanc.instances()) >= len(study), 120,
                   lambda: f"{len(orthanc.instances())} of {len(study)} arrived\n{proc.log_tail(40)}")
    got = _orthanc_uids(orthanc)
    assert set(got) == {str(ds.SOPInstanceUID) for ds in study}
    compressed = [uid for uid, ts in got.items() if ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90")]
    assert len(compressed) >= len(study) // 2, f"auto compressed only {len(compressed)} of {len(study)}: {got}"
    # lossless: every compressed instance decodes to the pixels that were sent
    sent = {str(ds.SOPInstanceUID): ds for ds in study}
    for iid in orthanc.instances():
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(iid)))
        if str(ds.SOPInstanceUID) in compressed:
            assert "LossyImageCompression" not in ds or ds.LossyImageCompression != "01"
            assert np.array_equal(ds.pixel_array, sent[str(ds.SOPInstanceUID)].pixel_array)
    status = cli(proc, "status")
    assert "sending compressed" in status.stdout and "MB/s measured" in status.stdout, status.stdout


def test_auto_sends_as_received_on_loopback(qrproxy: Any, storescp: Any, db_url: str, tmp_path: Path) -> None:
    import dicomgen
    from support import node, proxy_config, storescu
    from support.waits import wait_until

    study = dicomgen.make_study(1, 20, rows=256, cols=256, phantom=True)
    cfg = proxy_config(db_url, {"PACS": node(storescp, transfer_syntax="auto", associations=1)})
    proc = qrproxy(cfg)
    assert storescu(proc.port, dicomgen.write_all(study, tmp_path / "in"), aec="QRPROXY").returncode == 0
    wait_until(lambda: len(storescp.received_files()) >= len(study), 60, "not everything arrived")
    syntaxes = {dicomgen.transfer_syntax(p.read_bytes()) for p in storescp.received_files()}
    assert syntaxes == {"1.2.840.10008.1.2.1"}, syntaxes
    assert "event=auto-transfer-syntax" not in proc.log_text()


# --- retrieve-through over N associations (scp/move.py, scu/retrieve.py split_whole) ---------------


def test_split_whole_pure() -> None:
    from qrproxy.scu.retrieve import split_whole

    one = {"S1": [f"1.{i}" for i in range(100)]}
    parts = split_whole(one, 4)
    assert [p[0] for p in parts] == ["IMAGE"] * 4
    assert sorted(u for p in parts for u in p[2]) == sorted(one["S1"])  # each instance once
    mixed = {"BIG": [f"1.{i}" for i in range(100)], "A": ["2.1", "2.2", "2.3"], "B": [f"3.{i}" for i in range(10)]}
    parts = split_whole(mixed, 4)
    assert len(parts) <= 4
    images = [u for p in parts if p[0] == "IMAGE" for u in p[2]]
    series = [s for p in parts if p[0] == "SERIES" for s in p[1]]
    assert sorted(images) == sorted(mixed["BIG"]) and sorted(series) == ["A", "B"]
    assert split_whole({"S": ["1", "2", "3"]}, 4) == [("SERIES", ["S"], [])]  # too small to split
    assert split_whole(one, 1) == [("SERIES", ["S1"], [])]


def test_retrieve_through_a_far_pacs_uses_the_node_associations_exactly_once(qrproxy: Any, orthanc_factory: Any,
                                                                             storescp: Any, db_url: str) -> None:
    import dicomgen
    import pydicom
    from peers import free_port
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove
    from support import node, proxy_config

    port = free_port()
    # both ways through the emulator: qrproxy's C-MOVE to the PACS, and the PACS's C-STOREs back
    with WanRelay(("127.0.0.1", port), delay=0.01) as back:
        orthanc = orthanc_factory(modalities={"QRPROXY": ("QRPROXY", "127.0.0.1", back.port)})
        study = dicomgen.make_study(2, 12)
        for ds in study:
            orthanc.upload(dicomgen.encode(ds))
        with WanRelay(("127.0.0.1", orthanc.dicom_port), delay=0.01) as there:
            cfg = proxy_config(db_url, {"PACS": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": there.port,
                                                 "roles": ["query", "retrieve"], "associations": 4},
                                        "DEST": node(storescp, roles=["modality"])})
            cfg["port"] = port
            proc = qrproxy(cfg)
            ae = AE(ae_title="MODCT")
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            assoc = ae.associate("127.0.0.1", proc.port, ae_title="QRPROXY")
            assert assoc.is_established
            ident = pydicom.Dataset()
            ident.QueryRetrieveLevel = "STUDY"
            ident.StudyInstanceUID = str(study[0].StudyInstanceUID)
            final = [st for st, _ in assoc.send_c_move(ident, storescp.aet, StudyRootQueryRetrieveInformationModelMove)][-1]
            assoc.release()
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == len(study), final
    storescp.wait_for_files(len(study))
    sops = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in storescp.received_files()]
    assert sorted(sops) == sorted(str(ds.SOPInstanceUID) for ds in study)  # every instance, once
    text = proc.log_text()
    starts = text.count("event=retrieve-start")
    assert 2 <= starts <= 4, f"{starts} upstream requests for a 24-instance study with associations: 4"
    assert text.count('action="stored (retrieved from PACS)"') == len(study), "an instance came from the PACS twice"
    assert len(orthanc.instances()) == len(study)
