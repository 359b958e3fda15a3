"""DCMTK's storescu as the modality: run it, read what each C-STORE got back."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from peers import LOCALHOST, dcmtk

STORESCU = dcmtk("storescu")
ECHOSCU = dcmtk("echoscu")


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # DCMTK honours it: no Nagle delay per PDU
    return env


def storescu_argv(port: int, files: Iterable[Path], *, aec: str, aet: str = "MODCT",
                  extra: Sequence[str] = ()) -> list[str]:
    return [STORESCU, "-v", "-R", "-aet", aet, "-aec", aec, *extra, LOCALHOST, str(port), *map(str, files)]


def storescu(port: int, files: Iterable[Path], *, aec: str, aet: str = "MODCT", extra: Sequence[str] = (),
             timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(storescu_argv(port, files, aec=aec, aet=aet, extra=extra), capture_output=True,
                          text=True, env=dcmtk_env(), timeout=timeout)


def store_responses(log: str) -> dict[str, str]:
    """file path -> the C-STORE response storescu reported for it ('Success', 'Refused: ...')."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in log.splitlines():
        m = re.search(r"Sending file: (.+?)\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Received Store Response \((.+)\)\s*$", line)
        if m and current is not None:
            out[current] = m.group(1)
            current = None
    return out


def assert_all_success(res: subprocess.CompletedProcess[str], files: Sequence[Path]) -> None:
    log = res.stdout + res.stderr
    got = store_responses(log)
    bad = {f: got.get(str(f), "(no response)") for f in files if got.get(str(f)) != "Success"}
    assert res.returncode == 0 and not bad, (
        f"storescu exit {res.returncode}; {len(bad)} of {len(files)} not Success: "
        f"{list(bad.items())[:5]}\n{log[-3000:]}"
    )


def echoscu(port: int, *extra: str, aet: str = "MODCT", aec: str = "QRPROXY",
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """DCMTK echoscu to a loopback port; `extra` goes before the address (TLS options, -to ...)."""
    return subprocess.run([ECHOSCU, "-v", "-aet", aet, "-aec", aec, *extra, LOCALHOST, str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)
