"""The `http:` endpoint seen from outside: /health, /metrics after real DCMTK traffic, the status page
in a real headless browser (Debian's chromium), and `qrproxy status` showing the same facts.

qrproxy runs as `qrproxy serve` in a subprocess; modalities are DCMTK's echoscu/storescu/findscu/
movescu; a node that is down is a closed loopback port, so its forward queue fills.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dicomgen
from peers import LOCALHOST, QrproxyProcess, dcmtk, free_port

ENV = dict(os.environ, TCP_NODELAY="1")
ALLOWED = ["ECHOSCU", "MODCT", "FINDSCU", "MOVESCU"]


def http_config(db_url: str, http_port: int, down_port: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "ae_title": "QRPROXY", "host": LOCALHOST, "port": free_port(), "database": db_url,
        "spool_dir": "var/spool", "store": {"min_free_space": "1MB"},
        "query": {"mode": "cache-only"},
        "allowed_calling_ae_titles": ALLOWED,
        "nodes": {"DOWNPACS": {"ae_title": "DOWN<PACS>", "host": LOCALHOST, "port": down_port,
                               "roles": ["store"], "timeout": "2s"}},
        "http": {"host": LOCALHOST, "port": http_port},
    }
    cfg.update(extra)
    return cfg


def get(port: int, path: str, timeout: float = 30) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_http(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            get(port, "/health/live", timeout=5)
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"http port {port} never answered")


def start(qrproxy: Any, cfg: dict[str, Any]) -> QrproxyProcess:
    proc = qrproxy(cfg)
    wait_http(cfg["http"]["port"])
    return proc


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    code, text = get(port, "/metrics")
    assert code == 200, text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def dcmtk_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=120, env=ENV)


def store_files(proc: QrproxyProcess, folder: Path, n: int) -> list[Path]:
    files = dicomgen.write_all(dicomgen.make_study(1, n), folder)
    r = dcmtk_run("storescu", "-v", "-aet", "MODCT", "-aec", "QRPROXY", LOCALHOST, str(proc.port), *map(str, files))
    assert r.returncode == 0, r.stdout + r.stderr
    return files


# --- /health ------------------------------------------------------------------------------------------


def _break_database(db_url: str, tmp_path: Path) -> Any:
    """Make the database refuse new work for real; returns a function that undoes it."""
    from sqlalchemy.engine import make_url

    url = make_url(db_url)
    if url.drivername.startswith("sqlite"):
        # the file (and its WAL, through which the old contents would still be read) replaced by junk
        path = Path(url.database)
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = Path(f"{path}{suffix}")
            if src.exists():
                src.rename(tmp_path / f"moved-away{suffix}")
                moved.append((tmp_path / f"moved-away{suffix}", src))
        path.write_bytes(b"this is not an SQLite database\n" * 200)

        def restore_sqlite() -> None:
            path.unlink()
            for aside, src in moved:
                aside.rename(src)

        return restore_sqlite
    import psycopg

    admin = psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, password=url.password,
                            dbname="postgres", autocommit=True)
    name = url.database
    admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                  "AND pid <> pg_backend_pid()", (name,))

    def restore_pg() -> None:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        admin.close()

    return restore_pg


def test_health_follows_the_database(qrproxy, db_url: str, tmp_path: Path) -> None:
    port = free_port()
    start(qrproxy, http_config(db_url, port, free_port()))
    code, body = get(port, "/health")
    assert code == 200, body
    health = json.loads(body)
    assert health["status"] == "ok" and health["checks"]["database"]["ok"] and health["checks"]["spool"]["ok"]
    assert get(port, "/health/ready")[0] == 200
    restore = _break_database(db_url, tmp_path)
    try:
        code, body = get(port, "/health")
        assert code == 503, body
        health = json.loads(body)
        assert health["failed"] == ["database"], body
        assert health["checks"]["database"]["error"], body
        assert health["checks"]["spool"]["ok"], body
        assert get(port, "/health/ready")[0] == 503
        # live: the process is up, whatever its dependencies say
        code, body = get(port, "/health/live")
        assert code == 200 and json.loads(body)["status"] == "ok"
    finally:
        restore()
    code, body = get(port, "/health")
    assert code == 200, body


def test_health_fails_when_spool_is_below_min_free_space(qrproxy, tmp_path: Path) -> None:
    port = free_port()
    cfg = http_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", port, free_port(), store={"min_free_space": "900000TB"})
    start(qrproxy, cfg)
    code, body = get(port, "/health")
    assert code == 503, body
    health = json.loads(body)
    assert health["failed"] == ["spool"], body
    assert "min_free_space" in health["checks"]["spool"]["error"]
    assert health["checks"]["database"]["ok"]
    code, page = get(port, "/")
    assert code == 200 and "UNHEALTHY: spool" in page


def test_http_port_in_use_exits_2_naming_the_key(qrproxy, tmp_path: Path) -> None:
    """A configuration problem (issue 17): exit 2, so systemd does not restart in a loop."""
    s = socket.socket()
    s.bind((LOCALHOST, 0))
    s.listen(1)
    taken = s.getsockname()[1]
    try:
        proc = qrproxy(http_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", taken, free_port()), start=False)
        r = subprocess.run(proc.argv(), capture_output=True, text=True, timeout=60, cwd=proc.dir, env=proc.env())
        assert r.returncode == 2, r.stderr
        assert f"http.port: {LOCALHOST}:{taken} is already in use by another process" in r.stderr, r.stderr
    finally:
        s.close()


# --- /metrics -----------------------------------------------------------------------------------------


def test_metrics_count_real_traffic(qrproxy, db_url: str, tmp_path: Path) -> None:
    port = free_port()
    proc = start(qrproxy, http_config(db_url, port, free_port()))
    before = scrape(port)

    for _ in range(2):
        r = dcmtk_run("echoscu", "-aet", "ECHOSCU", "-aec", "QRPROXY", LOCALHOST, str(proc.port))
        assert r.returncode == 0, r.stdout + r.stderr
    files = store_files(proc, tmp_path / "in", 3)
    r = dcmtk_run("findscu", "-S", "-aet", "FINDSCU", "-aec", "QRPROXY", "-k", "QueryRetrieveLevel=STUDY",
                  "-k", "StudyInstanceUID", LOCALHOST, str(proc.port))
    assert r.returncode == 0, r.stdout + r.stderr
    # a C-MOVE to a destination that is no node: answered 0xA801, a failure
    dcmtk_run("movescu", "-S", "-aet", "MOVESCU", "-aem", "NOWHERE", "-aec", "QRPROXY",
              "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2.3.4", LOCALHOST, str(proc.port))
    # and a calling AE title outside the whitelist: rejected
    assert dcmtk_run("echoscu", "-aet", "INTRUDER", "-aec", "QRPROXY", LOCALHOST, str(proc.port)).returncode != 0

    def delta(after: dict[Any, float], name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    body = sum(len(dicomgen.body_bytes(f)) for f in files)

    def check(after: dict[Any, float]) -> None:
        queued = sum(value(after, "qrproxy_queue_items", node="DOWNPACS", state=s)
                     for s in ("pending", "inflight", "held"))
        assert delta(after, "qrproxy_associations_total", result="accepted") == 5
        assert delta(after, "qrproxy_associations_total", result="rejected") == 1
        assert value(after, "qrproxy_associations_active") == 0
        assert delta(after, "qrproxy_dimse_responses_total", service="C-ECHO", status="success") == 2
        assert delta(after, "qrproxy_dimse_responses_total", service="C-STORE", status="success") == 3
        assert delta(after, "qrproxy_dimse_responses_total", service="C-FIND", status="success") == 1
        assert delta(after, "qrproxy_dimse_responses_total", service="C-MOVE", status="failure") == 1
        assert delta(after, "qrproxy_dimse_responses_total", service="C-STORE", status="failure") == 0
        assert delta(after, "qrproxy_dimse_duration_seconds_count", service="C-STORE") == 3
        assert delta(after, "qrproxy_dimse_duration_seconds_count", service="C-ECHO") == 2
        assert delta(after, "qrproxy_dimse_duration_seconds_sum", service="C-STORE") > 0
        received = delta(after, "qrproxy_received_bytes_total")
        assert body * 0.95 <= received <= body * 2 + 50_000, (received, body)
        # the node that is down: its three instances wait in its queue, none sent
        assert queued == 3
        assert value(after, "qrproxy_queue_items", node="DOWNPACS", state="sent") == 0
        assert value(after, "qrproxy_queue_oldest_pending_age_seconds", node="DOWNPACS") >= 0
        assert ("qrproxy_queue_oldest_pending_age_seconds", frozenset({("node", "DOWNPACS")})) in after
        assert value(after, "qrproxy_spool_objects") == 3
        assert value(after, "qrproxy_spool_bytes") >= body * 0.95
        assert value(after, "qrproxy_database_up") == 1
        # the start-up C-ECHO found the node down
        assert value(after, "qrproxy_node_reachable", node="DOWNPACS") == 0
        assert ("qrproxy_node_reachable", frozenset({("node", "DOWNPACS")})) in after

    # the counters, the queue and the start-up C-ECHO settle asynchronously: scrape again until
    # every check holds, and fail with the last scrape's first failing check
    deadline = time.monotonic() + 90
    while True:
        after = scrape(port)
        try:
            check(after)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)


def test_metrics_sum_all_workers(qrproxy, db_url: str, tmp_path: Path) -> None:
    """workers: 2: the kernel spreads associations over both processes (SO_REUSEPORT), the log says
    which worker took each, and worker 0's /metrics counts every one of them exactly."""
    port = free_port()
    proc = start(qrproxy, http_config(db_url, port, free_port(), workers=2))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.log_text().count("event=listening") < 2:
        time.sleep(0.2)
    assert proc.log_text().count("event=listening") == 2, proc.log_text()
    before = scrape(port)

    def served() -> dict[str, int]:
        """worker -> associations from this test's callers logged by that worker."""
        out: dict[str, int] = {}
        for line in proc.log_text().splitlines():
            if "event=association " in line and ("calling=ECHOSCU " in line or "calling=MODCT " in line):
                worker = line.rsplit("worker=", 1)[1].split()[0] if "worker=" in line else "?"
                out[worker] = out.get(worker, 0) + 1
        return out

    echoes = stores = 0
    files: list[Path] = []
    # 12 associations, more while one worker has taken none yet (the spread is the kernel's choice)
    while echoes + stores < 12 or (len(served()) < 2 and echoes + stores < 60):
        if (echoes + stores) % 4 == 3:
            files += store_files(proc, tmp_path / f"in{stores}", 1)
            stores += 1
        else:
            r = dcmtk_run("echoscu", "-aet", "ECHOSCU", "-aec", "QRPROXY", LOCALHOST, str(proc.port))
            assert r.returncode == 0, r.stdout + r.stderr
            echoes += 1
    total = echoes + stores
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(served().values()) < total:
        time.sleep(0.2)
    by_worker = served()
    assert sum(by_worker.values()) == total, by_worker
    assert set(by_worker) == {"0", "1"}, by_worker  # both workers served some

    def delta(after: dict[Any, float], name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    body = sum(len(dicomgen.body_bytes(f)) for f in files)

    def check(after: dict[Any, float]) -> None:
        assert delta(after, "qrproxy_associations_total", result="accepted") == total
        assert delta(after, "qrproxy_associations_total", result="rejected") == 0
        assert value(after, "qrproxy_associations_active") == 0
        assert delta(after, "qrproxy_dimse_responses_total", service="C-ECHO", status="success") == echoes
        assert delta(after, "qrproxy_dimse_responses_total", service="C-STORE", status="success") == stores
        assert delta(after, "qrproxy_dimse_duration_seconds_count", service="C-ECHO") == echoes
        assert delta(after, "qrproxy_dimse_duration_seconds_count", service="C-STORE") == stores
        received = delta(after, "qrproxy_received_bytes_total")
        assert body * 0.95 <= received <= body * 2 + 50_000 * total, (received, body)
        # the database gauges are still computed once, by worker 0's scrape
        assert value(after, "qrproxy_spool_objects") == stores
        assert value(after, "qrproxy_database_up") == 1

    deadline = time.monotonic() + 90
    while True:
        after = scrape(port)
        try:
            check(after)
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.3)
    # each series once: the multiprocess sum is not added to a per-process registry's own copy
    _, text = get(port, "/metrics")
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), names


# --- the status page and `qrproxy status` --------------------------------------------------------------

REASON = 'link <down> & "maintenance"'


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed (scripts/test installs Debian's chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={profile}", *args], capture_output=True, text=True, timeout=180)


def test_status_page_and_cli_show_nodes_queues_and_held_reasons(qrproxy, tmp_path: Path) -> None:
    port = free_port()
    cfg = http_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", port, free_port(), log={"file": "var/qrproxy.log"})
    proc = start(qrproxy, cfg)
    store_files(proc, tmp_path / "in", 4)
    # hold what is queued for the down node, with a reason carrying HTML metacharacters
    deadline = time.monotonic() + 90
    held = 0
    while held < 4 and time.monotonic() < deadline:
        r = proc.cli("queue", "hold", "--node", "DOWNPACS", "--reason", REASON)
        assert r.returncode == 0, r.stderr
        held = int(value(scrape(port), "qrproxy_queue_items", node="DOWNPACS", state="held"))
        time.sleep(0.2)
    assert held == 4

    # the start-up C-ECHO of the down node runs in the background: wait for its error on the page
    deadline = time.monotonic() + 90
    while True:
        code, page = get(port, "/")
        errors = page.split('<section id="errors">', 1)[-1].split("</section>", 1)[0]
        if (code == 200 and "event=node-check node=DOWNPACS" in errors) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert code == 200
    assert '<meta name="viewport"' in page
    assert "DOWNPACS" in page and "DOWN&lt;PACS&gt;" in page and "DOWN<PACS>" not in page
    assert "link &lt;down&gt; &amp; &quot;maintenance&quot;" in page and "<down>" not in page
    assert "<script" not in page and "http://" not in page.split("</style>", 1)[1]  # no JS, no external assets

    # a real browser at phone size: the rendered DOM carries the facts, the screenshot is a real picture
    shot = tmp_path / "status-phone.png"
    r = run_chromium(tmp_path, f"--screenshot={shot}", "--window-size=390,844", f"http://{LOCALHOST}:{port}/")
    assert shot.is_file(), r.stdout + r.stderr
    assert _png_size(shot) == (390, 844)
    from PIL import Image

    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot looks blank"
    r = run_chromium(tmp_path, "--dump-dom", f"http://{LOCALHOST}:{port}/")
    dom = r.stdout
    assert "<section id=\"queues\">" in dom, dom[:2000]
    queues = dom.split('<section id="queues">', 1)[1].split("</section>", 1)[0]
    assert "DOWNPACS" in queues
    assert '<td data-label="Held"><div><span class="num bad">4</span></div></td>' in queues, queues
    assert "link &lt;down&gt; &amp; \"maintenance\"" in queues, queues
    nodes = dom.split('<section id="nodes">', 1)[1].split("</section>", 1)[0]
    assert "DOWN&lt;PACS&gt;" in nodes and ">NO<" in nodes, nodes
    errors = dom.split('<section id="errors">', 1)[1].split("</section>", 1)[0]
    assert "event=node-check node=DOWNPACS" in errors, errors

    # the terminal shows the same: node reachability, queue with held count and reason, recent errors
    r = proc.cli("status", timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    row = next(ln for ln in out.splitlines() if ln.startswith("DOWNPACS ") and "DOWN<PACS>" in ln)
    assert " NO " in row, out
    qrow = next(ln for ln in out.splitlines() if ln.startswith("DOWNPACS ") and "DOWN<PACS>" not in ln)
    assert qrow.split()[3] == "4", out  # QUEUE PENDING IN-FLIGHT HELD
    assert f"held for DOWNPACS: 4 x {REASON}" in out, out
    assert "recent errors" in out and "event=node-check node=DOWNPACS" in out, out
