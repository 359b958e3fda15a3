"""Progress of long operator commands on the terminal (qrproxy/progress.py).

The commands run as real processes against a real spool and database filled by storescu: once with
stderr on a pseudo-terminal (python's pty module; the live line must be drawn there) and once with
stderr on a pipe (no carriage-return redraws, only the summary line). stdout must be the same either
way, since scripts parse it.
"""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom

import dicomgen
from peers import _qrproxy_env, free_port
from test_encryption import key_id, new_proxy_with_key
from support import assert_all_success, cli, proxy_config, queue_rows, storescu


def run_with_tty_stderr(proc: Any, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """Run `qrproxy --config ... ARGS` with stderr on a pseudo-terminal; returns (rc, stdout, tty text)."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "qrproxy", "--config", str(proc.config_path), *args],
                         cwd=proc.dir, env=_qrproxy_env(), stdout=subprocess.PIPE, stderr=slave,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif p.poll() is not None:
            break
    os.close(master)
    out = p.stdout.read().decode() if p.stdout else ""
    rc = p.wait(timeout=30)
    return rc, out, b"".join(chunks).decode("utf-8", "replace")


def store_some(proc: Any, tmp_path: Path, n: int, sub: str) -> None:
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds = [dicomgen.make_ct(study_uid=study, series_uid=series, instance_number=i + 1, rows=64, cols=64)
          for i in range(n)]
    files = dicomgen.write_all(ds, tmp_path / sub)
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)


def test_reencrypt_and_purge_show_progress_on_a_tty_only(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    # PACS points at a port nobody listens on: the forward rows stay pending, to be purged below.
    down = {"ae_title": "NOBODY", "host": "127.0.0.1", "port": free_port(), "roles": ["store"]}
    proc = new_proxy_with_key(qrproxy, proxy_config(db_url, {"PACS": down}))
    store_some(proc, tmp_path, 6, "a")
    spool = sorted((proc.dir / "spool" / "objects").rglob("*.dcm"))
    assert len(spool) == 6

    # --- keys reencrypt, stderr on a terminal: live line with count/total, then the summary
    assert cli(proc, "keys", "rotate").returncode == 0
    rc, out, tty = run_with_tty_stderr(proc, "keys", "reencrypt")
    assert rc == 0, f"exit {rc}\n{out}\n{tty}"
    assert {key_id(p) for p in spool} == {"k2"}, "re-encryption did not happen"
    assert re.search(r"\rre-encrypting: \d+/6 files \(\d+%\)", tty), f"no live progress line on the tty:\n{tty!r}"
    assert re.search(r"re-encrypting: 6/6 files in \d\d:\d\d \([\d.]+/s\)\r?\n", tty), tty
    assert "re-encrypting" not in out, "progress leaked onto stdout"
    assert re.match(r"6 spool files examined: 6 re-encrypted with key k2", out), out

    # --- the same with stderr on a pipe: no redraws, one summary line; stdout has the same shape
    assert cli(proc, "keys", "rotate").returncode == 0
    res = cli(proc, "keys", "reencrypt")
    assert res.returncode == 0, res.stderr
    assert {key_id(p) for p in spool} == {"k3"}
    assert "\r" not in res.stderr and "\x1b[" not in res.stderr, repr(res.stderr)
    summary = [ln for ln in res.stderr.splitlines() if ln.startswith("re-encrypting:")]
    assert len(summary) == 1 and summary[0].startswith("re-encrypting: 6/6 files in "), res.stderr
    assert re.match(r"6 spool files examined: 6 re-encrypted with key k3", res.stdout), res.stdout

    # --- queue purge on a terminal: rows counted as they go, stdout unchanged
    proc.stop()  # no forwarder leasing rows meanwhile
    rows = queue_rows(proc)
    assert len(rows) == 6 and {r["state"] for r in rows} <= {"pending", "held"}, rows
    rc, out, tty = run_with_tty_stderr(proc, "queue", "purge", "--node", "PACS", "--yes")
    assert rc == 0, f"exit {rc}\n{out}\n{tty}"
    assert out.strip() == "6 of 6 matching rows purged", out
    assert re.search(r"\rqueue purge: \d+/6 rows", tty), repr(tty)
    assert re.search(r"queue purge: 6/6 rows in ", tty), repr(tty)
    assert queue_rows(proc) == []
