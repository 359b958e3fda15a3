"""Go-live faults a site engineer meets in the first hour (issue 17), each answered in words.

`check` finds what `serve` would fail on (folders that cannot be written, a port another process
holds) and names the key; `serve` exits 2 on them, so systemd does not restart it in a loop; the
command line takes its global options before or after the verb as DCMTK's tools do; database
errors name the database and the fix instead of printing SQL.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from peers import LOCALHOST, free_port, run_cli
from support import proxy_config


def write_config(folder: Path, **overrides: Any) -> Path:
    cfg = {"ae_title": "QRPROXY", "host": LOCALHOST, "port": free_port(),
           "database": f"sqlite:///{folder / 'var' / 'q.sqlite3'}", "spool_dir": str(folder / "var" / "spool")}
    cfg.update(overrides)
    path = folder / "site.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def qrproxy_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qrproxy", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_check_and_serve_name_paths_that_cannot_be_written(tmp_path: Path) -> None:
    """Writing is tried for real (a file under a regular file cannot exist, nothing can be created
    in /proc, not even by root), so the test holds whoever runs it."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is expected\n")
    path = write_config(tmp_path, spool_dir=str(blocker / "spool"),
                        database="sqlite:////proc/qrproxy-no-such-folder/q.sqlite3",
                        log={"file": str(blocker / "logs" / "qrproxy.log")})
    for verb in ("check", "serve"):
        res = qrproxy_cli("--config", str(path), verb)
        assert res.returncode == 2, (verb, res.returncode, res.stdout, res.stderr)
        err = res.stderr
        assert "Traceback" not in err, err
        assert f"spool_dir: {blocker / 'spool'} cannot be created: {blocker} is a file, not a folder" in err, err
        assert "database: /proc/qrproxy-no-such-folder cannot be created (its nearest existing folder /proc is not writable)" in err, err
        assert f"log.file: {blocker / 'logs'} cannot be created: {blocker} is a file" in err, err
        # each line says where in the file the key is
        assert all(f"{path}:" in ln for ln in err.splitlines() if "cannot be" in ln), err
    assert not (blocker.parent / "var").exists()


def test_check_names_a_port_another_process_holds_but_not_a_running_qrproxy(qrproxy: Any, tmp_path: Path) -> None:
    held = socket.socket()
    held.bind((LOCALHOST, 0))
    held.listen(1)
    port = held.getsockname()[1]
    try:
        path = write_config(tmp_path, port=port)
        res = qrproxy_cli("check", "--config", str(path))  # the option after the verb, as DCMTK takes it
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert f"port: {LOCALHOST}:{port} is already in use by another process" in res.stderr, res.stderr
        assert f"sport = :{port}" in res.stderr, res.stderr
    finally:
        held.close()
    # the same port held by qrproxy itself, serving: `check` of its config passes
    proc = qrproxy(proxy_config(f"sqlite:///{tmp_path / 'running.sqlite3'}", {}))
    res = run_cli(proc.config_path, "check")
    assert res.returncode == 0, res.stderr
    assert f"on {LOCALHOST}:{proc.port}" in res.stdout, res.stdout


def test_global_options_before_or_after_the_verb(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    before = qrproxy_cli("--config", str(path), "check")
    after = qrproxy_cli("check", "-c", str(path))
    assert before.returncode == after.returncode == 0, (before.stderr, after.stderr)
    assert before.stdout == after.stdout and "ok" in after.stdout
    # -v / --log-level are accepted by every verb, in either place
    for argv in (["-v", "-c", str(path), "check"], ["check", "--log-level", "debug", "-c", str(path)],
                 ["queue", "list", "-vv", "-c", str(path)]):
        res = qrproxy_cli(*argv)
        assert "unrecognized arguments" not in res.stderr and "invalid choice" not in res.stderr, (argv, res.stderr)
    bad = qrproxy_cli("check", "--log-level", "LOUD", "-c", str(path))
    assert bad.returncode == 2 and "invalid choice" in bad.stderr, bad.stderr
    # every verb's --help lists the options it takes
    help_text = qrproxy_cli("serve", "--help").stdout
    assert "--config" in help_text and "--log-level" in help_text and "--verbose" in help_text, help_text
    listing = qrproxy_cli("queue", "list", "--help").stdout
    assert "--limit N" in listing and "oldest first" in listing, listing


def test_database_without_schema_is_explained_not_dumped(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    (tmp_path / "var").mkdir()
    res = qrproxy_cli("queue", "list", "-c", str(path))
    assert res.returncode == 1
    assert "no qrproxy schema yet" in res.stderr and "qrproxy db upgrade" in res.stderr, res.stderr
    assert "SELECT" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    # the fix it names works
    assert qrproxy_cli("db", "upgrade", "-c", str(path)).returncode == 0
    listed = qrproxy_cli("queue", "list", "-c", str(path))
    assert listed.returncode == 0 and listed.stdout.startswith("queue empty"), listed.stdout


def test_wrong_called_ae_is_named_as_a_rejection_with_what_to_check(dcmqrscp: Any) -> None:
    """dcmqrscp answers an unknown called AE title with A-ASSOCIATE-RJ (1, 1, 7) and closes the socket
    at once: the rejection is read before the close is looked at, every time (it was once "aborted"
    about 5 times in 30)."""
    from qrproxy.net.requestor import ConnectFailed, connect

    outcomes = []
    for _ in range(30):
        try:
            assoc = connect(LOCALHOST, dcmqrscp.port, calling="QRPROXY", called="NOT-ITS-AE", timeout=10,
                            contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])])
        except ConnectFailed as exc:
            outcomes.append((exc.kind, exc.rejection, exc.detail))
        else:
            assoc.release()
            outcomes.append(("established", None, ""))
    kinds = {o[0] for o in outcomes}
    assert kinds == {"rejected"}, outcomes
    kind, rejection, detail = outcomes[0]
    assert rejection == (1, 1, 7), outcomes[0]
    assert "called AE title not recognised" in detail, detail
    assert f"{LOCALHOST}:{dcmqrscp.port} does not answer to AE title NOT-ITS-AE" in detail, detail


def test_status_names_refused_unresolvable_and_rejected_nodes(dcmqrscp: Any, tmp_path: Path) -> None:
    closed = free_port()
    path = write_config(tmp_path, nodes={
        "GONE": {"ae_title": "GONE", "host": "pacs.invalid", "port": 104, "roles": ["store"]},
        "CLOSED": {"ae_title": "CLOSED", "host": LOCALHOST, "port": closed, "roles": ["store"]},
        "WRONGAE": {"ae_title": "WRONGAE", "host": LOCALHOST, "port": dcmqrscp.port, "roles": ["store"]},
        "RIGHT": {"ae_title": dcmqrscp.aet, "host": LOCALHOST, "port": dcmqrscp.port, "roles": ["store"]},
    })
    res = qrproxy_cli("status", "-c", str(path))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    rows = {ln.split()[0]: ln for ln in res.stdout.splitlines() if ln and ln.split()[0] in
            ("GONE", "CLOSED", "WRONGAE", "RIGHT")}
    assert "host name pacs.invalid does not resolve" in rows["GONE"], res.stdout
    assert f"connection refused by {LOCALHOST}:{closed}" in rows["CLOSED"], res.stdout
    assert "called AE title not recognised" in rows["WRONGAE"] and "does not answer to AE title WRONGAE" \
        in rows["WRONGAE"], res.stdout
    assert " yes " in rows["RIGHT"] and " NO " not in rows["RIGHT"], res.stdout


def test_retrieve_refused_by_a_pacs_that_does_not_know_qrproxy_says_what_to_check(
        orthanc_factory: Any, storescp: Any, qrproxy: Any, tmp_path: Path) -> None:
    """Orthanc without qrproxy among its modalities cannot move to it: the log line says which
    status the PACS answered, in words, and what to check, and the modality's failure names it too."""
    import dicomgen
    from support import node
    from test_move import move_responses, upload_to_orthanc

    orthanc = orthanc_factory(modalities={})  # qrproxy not listed
    study = dicomgen.make_study(1, 2)
    upload_to_orthanc(orthanc, study)
    cfg = proxy_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", {
        "PACS": node(orthanc, roles=["query", "retrieve"]), "DEST": node(storescp, roles=["modality"])})
    proc = qrproxy(cfg)
    rsps = move_responses(proc.port, storescp.aet,
                          {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(study[0].StudyInstanceUID)})
    assert rsps[-1].Status not in (0x0000, 0xFF00), rsps[-1]
    # the modality's operator reads the cause in the final response's Error Comment
    assert "upstream PACS refused: status 0xC000" in str(rsps[-1].get("ErrorComment", "")), rsps[-1]
    log = proc.log_text()
    lines = [ln for ln in log.splitlines() if "event=retrieve-done" in ln and "node=PACS" in ln]
    assert lines, log[-4000:]
    assert "does PACS know qrproxy's AE QRPROXY as a move destination" in lines[-1], lines[-1]
    assert "retrieve_method: get" in lines[-1], lines[-1]
    assert re.search(r"retrieve failed with status 0x[0-9A-F]{4} \((refused|failed)[^)]*\)", lines[-1]), lines[-1]


def test_node_health_is_tracked_in_the_background_and_logged_on_change(
        qrproxy: Any, storescp_factory: Any, tmp_path: Path) -> None:
    """A PACS that comes up after qrproxy: one warning at start, one `node-back` line when it
    answers, one `node-down` when it goes away again, /metrics following without a page load; a
    modality switched off is logged at INFO only."""
    from test_http import scrape, value, wait_http

    pacs_port, http_port = free_port(), free_port()
    cfg = proxy_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", {
        "PACS": {"ae_title": "LATEPACS", "host": LOCALHOST, "port": pacs_port, "roles": ["store"], "timeout": "2s"},
        "SCANNER": {"ae_title": "SCANNER", "host": LOCALHOST, "port": free_port(), "roles": ["modality"],
                    "timeout": "2s"},
    }, node_check_interval="1s", http={"host": LOCALHOST, "port": http_port})
    proc = qrproxy(cfg)
    wait_http(http_port)

    def lines(event: str, node: str) -> list[str]:
        return [ln for ln in proc.log_text().splitlines() if f"event={event} node={node} " in ln]

    def reachable() -> float:
        return value(scrape(http_port), "qrproxy_node_reachable", node="PACS")

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (lines("node-check", "PACS") and lines("node-check", "SCANNER")):
        time.sleep(0.2)
    assert " WARNING " in lines("node-check", "PACS")[0] and "connection refused" in lines("node-check", "PACS")[0]
    assert " INFO " in lines("node-check", "SCANNER")[0] and "role=modality" in lines("node-check", "SCANNER")[0]
    assert reachable() == 0.0
    # the problem in the same one-word vocabulary as the log and the status table
    assert value(scrape(http_port), "qrproxy_node_problem", node="PACS", kind="refused") == 1.0

    pacs = storescp_factory(aet="LATEPACS", port=pacs_port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not lines("node-back", "PACS"):
        time.sleep(0.2)
    back = lines("node-back", "PACS")
    assert len(back) == 1 and "down_for=" in back[0], proc.log_text()[-3000:]
    assert reachable() == 1.0  # scraped: no page was loaded
    assert value(scrape(http_port), "qrproxy_node_problem", node="PACS", kind="refused") == 0.0

    pacs.stop()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not lines("node-down", "PACS"):
        time.sleep(0.2)
    down = lines("node-down", "PACS")
    assert len(down) == 1 and " WARNING " in down[0] and "connection refused" in down[0], down
    time.sleep(3)  # more checks run: still one line per change, not one per check
    assert len(lines("node-down", "PACS")) == 1 and len(lines("node-back", "PACS")) == 1
    assert not [ln for ln in proc.log_text().splitlines() if "node=SCANNER" in ln and " WARNING " in ln]


def test_a_refused_connection_is_called_refused_in_the_queue_and_the_log(qrproxy: Any, db_url: str,
                                                                        tmp_path: Path) -> None:
    """Not "association aborted": the queue's LAST ERROR and the one node-down line say the
    connection was refused and where, and retries do not repeat the warning."""
    import dicomgen
    from support import queue_rows, storescu

    closed = free_port()
    cfg = proxy_config(db_url, {
        "PACS": {"ae_title": "PACS", "host": LOCALHOST, "port": closed, "roles": ["store"]}},
        node_check_interval="0s")
    proc = qrproxy(cfg)
    files = dicomgen.write_all(dicomgen.make_study(1, 2), tmp_path / "in")
    res = storescu(proc.port, files, aec="QRPROXY")
    assert res.returncode == 0, res.stderr
    deadline = time.monotonic() + 30
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = queue_rows(proc)
        if rows and all(r["last_error"] for r in rows) and proc.log_text().count("event=node-down node=PACS") >= 1:
            break
        time.sleep(0.3)
    assert rows and all(f"connection refused by {LOCALHOST}:{closed}" in r["last_error"] for r in rows), rows
    time.sleep(4)  # retries at 1-2 s: more attempts, still one warning
    down = [ln for ln in proc.log_text().splitlines() if "event=node-down node=PACS" in ln and " WARNING " in ln]
    assert len(down) == 1 and f"connection refused by {LOCALHOST}:{closed}" in down[0], down
    table = run_cli(proc.config_path, "queue", "list").stdout
    assert "connection refused" in table and "aborted" not in table, table


def test_a_delivery_marks_a_node_back_before_its_next_echo(qrproxy: Any, storescp_factory: Any, db_url: str,
                                                           tmp_path: Path) -> None:
    """The page showed the PACS unreachable right after the queue drained to it: real traffic now
    counts, so the node is back as soon as an instance reaches it (echoes here only hourly)."""
    import dicomgen
    from support import queue_rows, storescu

    pacs_port = free_port()
    cfg = proxy_config(db_url, {
        "PACS": {"ae_title": "LATEPACS", "host": LOCALHOST, "port": pacs_port, "roles": ["store"]}},
        node_check_interval="1h")
    proc = qrproxy(cfg)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "event=node-check node=PACS" not in proc.log_text():
        time.sleep(0.2)
    files = dicomgen.write_all(dicomgen.make_study(1, 1), tmp_path / "in")
    assert storescu(proc.port, files, aec="QRPROXY").returncode == 0
    storescp_factory(aet="LATEPACS", port=pacs_port)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(r["state"] == "sent" for r in queue_rows(proc) or [{"state": ""}]):
        time.sleep(0.3)
    assert [r["state"] for r in queue_rows(proc)] == ["sent"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "event=node-back node=PACS" not in proc.log_text():
        time.sleep(0.2)
    back = [ln for ln in proc.log_text().splitlines() if "event=node-back node=PACS" in ln and "qrproxy.health" in ln]
    assert back and "seen_by=traffic" in back[0], proc.log_text()[-3000:]
