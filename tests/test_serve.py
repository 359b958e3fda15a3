"""`qrproxy serve` as a modality sees it: C-ECHO from DCMTK, the calling-AE whitelist, status, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

from peers import free_port
from support import echoscu


def base_config(db_url: str, **extra: object) -> dict:
    cfg = {"ae_title": "QRPROXY", "host": "127.0.0.1", "port": free_port(), "database": db_url,
           "spool_dir": "var/spool"}
    cfg.update(extra)
    return cfg


def test_echoscu_gets_an_answer(qrproxy, db_url: str) -> None:
    proc = qrproxy(base_config(db_url))
    r = echoscu(proc.port, aet="ECHOSCU")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Received Echo Response (Success)" in r.stdout + r.stderr
    # one log line per association, with peer, AE titles, services and result
    def association_line() -> bool:
        return any("event=association" in ln and "ECHOSCU" in ln for ln in proc.log_text().splitlines())

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not association_line():
        time.sleep(0.1)
    line = next(ln for ln in proc.log_text().splitlines() if "event=association" in ln and "ECHOSCU" in ln)
    assert "calling=ECHOSCU" in line and "called=QRPROXY" in line
    assert "services=C-ECHO:1" in line and "result=released" in line


def test_whitelist_rejects_unknown_calling_ae(qrproxy, db_url: str) -> None:
    proc = qrproxy(base_config(db_url, allowed_calling_ae_titles=["CT1"]))
    ok = echoscu(proc.port, aet="CT1")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = echoscu(proc.port, aet="INTRUDER")
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    # DCMTK prints the A-ASSOCIATE-RJ fields: rejected permanent, service user, calling AE not recognized
    assert "Association Rejected" in out, out
    assert "Calling AE Title Not Recognized" in out, out
    assert "Rejected Permanent" in out, out
    # and the proxy keeps serving
    assert echoscu(proc.port, aet="CT1").returncode == 0


def test_reject_policy_admits_node_titles(qrproxy, db_url: str) -> None:
    cfg = base_config(db_url, unknown_calling_ae="reject",
                      nodes={"CT1": {"ae_title": "MODCT", "host": "127.0.0.1", "port": free_port(),
                                     "roles": ["modality"]}})
    proc = qrproxy(cfg)
    assert echoscu(proc.port, aet="MODCT").returncode == 0
    assert echoscu(proc.port, aet="OTHER").returncode != 0


def test_max_associations_rejects_transient(qrproxy, db_url: str) -> None:
    """With max_associations 1, a second concurrent association is rejected (transient, local limit)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    proc = qrproxy(base_config(db_url, max_associations=1, acse_timeout="1s"))
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    # the fixture's readiness probe (a bare TCP connect) may still count for a moment
    deadline = time.monotonic() + 60
    while True:
        first = ae.associate("127.0.0.1", proc.port, ae_title="QRPROXY")
        if first.is_established or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    try:
        assert first.is_established
        r = echoscu(proc.port, aet="SECOND")
        assert r.returncode != 0
        assert "Local Limit Exceeded" in r.stdout + r.stderr, r.stdout + r.stderr
    finally:
        first.release()
    # the proxy frees the slot when its side of the released association has ended
    deadline = time.monotonic() + 60
    while echoscu(proc.port, aet="SECOND").returncode != 0:
        assert time.monotonic() < deadline, "the slot was not freed after the first association was released"
        time.sleep(0.25)


def test_status_shows_node_reachability(qrproxy, storescp, db_url: str) -> None:
    down_port = free_port()
    cfg = base_config(db_url, nodes={
        "UP": {"ae_title": storescp.ae_title if hasattr(storescp, "ae_title") else "STORESCP",
               "host": "127.0.0.1", "port": storescp.port, "roles": ["store"]},
        "DOWN": {"ae_title": "NOBODY", "host": "127.0.0.1", "port": down_port, "roles": ["store"],
                 "timeout": "2s"},
    })
    proc = qrproxy(cfg)
    r = proc.cli("status")
    assert r.returncode == 0, r.stderr
    rows = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith(("UP ", "DOWN "))}
    assert " yes " in rows["UP"], r.stdout
    assert " NO " in rows["DOWN"], r.stdout
    # the start-up node check logged both results
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.log_text().count("event=node-check") < 2:
        time.sleep(0.2)
    log = proc.log_text()
    assert "event=node-check node=UP" in log and "result=ok" in log
    assert "event=node-check node=DOWN" in log


def test_sigterm_exits_cleanly_within_10s(qrproxy, db_url: str) -> None:
    proc = qrproxy(base_config(db_url))
    assert echoscu(proc.port, aet="ECHOSCU").returncode == 0
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    deadline = t0 + 10
    while time.monotonic() < deadline and proc.running:
        time.sleep(0.05)
    assert not proc.running, "qrproxy did not exit within 10 s of SIGTERM"
    assert proc.returncode == 0
    assert "event=stopped" in proc.log_text()


def test_serve_fails_clearly_when_port_taken(qrproxy, db_url: str, tmp_path) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        proc = qrproxy(base_config(db_url, port=port), start=False)
        r = subprocess.run(proc.argv(), capture_output=True, text=True, timeout=60, cwd=proc.dir, env=proc.env())
        # a configuration problem, not a crash: exit 2 (systemd does not restart-loop on it), naming
        # the key, the address and what to look at
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert re.search(rf": port: 127\.0\.0\.1:{port} is already in use by another process", r.stderr), r.stderr
        assert "Traceback" not in r.stderr, r.stderr
    finally:
        s.close()


def test_db_upgrade_command(db_url: str, tmp_path) -> None:
    from peers import run_cli

    cfg = tmp_path / "q.yml"
    cfg.write_text(f"database: {db_url}\nspool_dir: spool\n")
    r = run_cli(cfg, "db", "upgrade")
    assert r.returncode == 0, r.stderr
    from sqlalchemy import create_engine, inspect

    eng = create_engine(db_url)
    try:
        tables = set(inspect(eng).get_table_names())
    finally:
        eng.dispose()
    assert {"studies", "forward_queue", "spool_objects", "alembic_version"} <= tables


def test_workers_share_the_port_and_stop_together(qrproxy, db_url: str) -> None:
    """workers: 2 runs two processes on one port (SO_REUSEPORT); SIGTERM stops all within 10 s."""
    proc = qrproxy(base_config(db_url, workers=2))

    def children() -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout
        workers = []
        for pid in map(int, out.split()):
            try:
                cmd = open(f"/proc/{pid}/cmdline").read()
            except OSError:
                continue
            if "spawn_main" in cmd and "resource_tracker" not in cmd:
                workers.append(pid)
        return workers

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.log_text().count("event=listening") < 2:
        time.sleep(0.2)
    assert proc.log_text().count("event=listening") == 2, proc.log_text()
    kids = children()
    assert len(kids) >= 2, kids
    for i in range(6):
        assert echoscu(proc.port, aet=f"W{i}").returncode == 0
    os.kill(proc.pid, signal.SIGTERM)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and proc.running:
        time.sleep(0.05)
    assert not proc.running, "supervisor still running 10 s after SIGTERM"
    for pid in kids:
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()
