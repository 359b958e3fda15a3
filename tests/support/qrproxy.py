"""qrproxy as the tests configure and drive it: config dicts, node entries, its spool, its CLI."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from peers import LOCALHOST, OrthancServer, QrproxyProcess, free_port


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def proxy_config(db_url: str, nodes: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A qrproxy config on a free loopback port with fast retries; ``spool`` beside the config."""
    cfg: dict[str, Any] = {
        "ae_title": "QRPROXY",
        "host": LOCALHOST,
        "port": free_port(),
        "database": db_url,
        "spool_dir": "spool",
        "nodes": nodes,
        "store": {"min_free_space": "1MB"},
        "forward": {"max_attempts": 5, "retry_min": "1s", "retry_max": "2s", "poll": "1s", "lease": "60s"},
        "log": {"level": "INFO"},
    }
    return _merge(cfg, extra)


def node(peer: Any, roles: Sequence[str] = ("store",), **kw: Any) -> dict[str, Any]:
    port = peer.dicom_port if isinstance(peer, OrthancServer) else peer.port
    return {"ae_title": peer.aet, "host": peer.host, "port": port, "roles": list(roles), **kw}


def spool_files(proc: QrproxyProcess, sub: str = "objects") -> list[Path]:
    root = proc.dir / "spool" / sub
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- helpers: the qrproxy CLI -------------------------------------------------------------------


def cli(proc: QrproxyProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return proc.cli(*args, timeout=timeout)


def queue_rows(proc: QrproxyProcess, *args: str) -> list[dict[str, Any]]:
    res = cli(proc, "queue", "list", "--json", *args)
    assert res.returncode == 0, f"queue list --json {' '.join(args)} -> exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    try:
        rows = json.loads(res.stdout)
    except ValueError as exc:
        raise AssertionError(f"queue list --json did not print JSON ({exc}):\n{res.stdout[:2000]}") from None
    assert isinstance(rows, list), f"queue list --json printed {type(rows).__name__}, not a list"
    for row in rows:
        missing = {"id", "node", "state", "attempts", "next_attempt_at", "sop_instance_uid",
                   "study_instance_uid", "last_error", "last_status"} - set(row)
        assert not missing, f"queue list --json row lacks {sorted(missing)}: {row}"
    return rows


def changed_count(res: subprocess.CompletedProcess[str]) -> int | None:
    """The number of rows a queue retry/hold/release/purge says it changed (first integer printed)."""
    m = re.search(r"\b(\d+)\b", res.stdout)
    return int(m.group(1)) if m else None


class Soft:
    """Collects failures of the checks that depend on the queue/status CLI, so that the checks of what
    the peers received still run; `assert_ok()` at the end fails the test with all of them."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def run(self, label: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (AssertionError, pytest.fail.Exception, subprocess.TimeoutExpired) as exc:
            self.problems.append(f"{label}: {exc}")
            return None

    def assert_ok(self) -> None:
        assert not self.problems, "\n\n".join(self.problems)
