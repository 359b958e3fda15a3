"""Log file rotation (`log.max_size`, `log.backups`; qrproxy/logs.py).

A real qrproxy with a tiny `max_size` is kept busy by a loop of DCMTK echoscu associations (each one
logs an `event=association` line); then the log files are read back: rotated files exist, none is
over the limit, no more than `backups` are kept, every line is whole, and the newest association
is in the live file. A second test has several processes write through the same handler at once,
as `workers: N` do, and checks no line is lost, split or duplicated.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from peers import LOCALHOST, _qrproxy_env
from support import dcmtk_env, proxy_config, wait_until

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ .*$")
ECHOSCU = shutil.which("echoscu") or "/usr/bin/echoscu"


def log_files(folder: Path, name: str) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob(name + "*"))}


def test_log_file_rotates_at_max_size_with_whole_lines(qrproxy: Any, tmp_path: Path) -> None:
    max_size, backups = 2000, 3
    cfg = proxy_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", {},
                       log={"level": "INFO", "file": "logs/qrproxy.log", "max_size": max_size, "backups": backups})
    proc = qrproxy(cfg)
    calling = []
    for i in range(60):
        aet = f"ECHO{i:03d}"
        calling.append(aet)
        res = subprocess.run([ECHOSCU, "-aet", aet, "-aec", "QRPROXY", LOCALHOST, str(proc.port)],
                             capture_output=True, text=True, env=dcmtk_env(), timeout=60)
        assert res.returncode == 0, res.stderr
        # the association line is written as the association ends, which can be just after echoscu
        # exits: wait for it, so that the next association's line cannot come first
        wait_until(lambda: any(re.search(rf"event=association .*?calling={aet}\b", t)
                               for t in log_files(proc.dir / "logs", "qrproxy.log").values()), 30,
                   f"the association line of {aet}")
    proc.stop()

    files = log_files(proc.dir / "logs", "qrproxy.log")
    names = set(files)
    assert {"qrproxy.log", "qrproxy.log.1"} <= names, f"no rotation happened: {sorted(names)}"
    assert names <= {"qrproxy.log"} | {f"qrproxy.log.{i}" for i in range(1, backups + 1)}, \
        f"more than {backups} backups kept: {sorted(names)}"
    assert f"qrproxy.log.{backups}" in names, "60 associations should have filled every backup"
    for name, text in files.items():
        assert len(text.encode()) <= max_size, f"{name} is {len(text.encode())} bytes, over {max_size}"
        assert text.endswith("\n"), f"{name} ends in a partial line: {text[-80:]!r}"
        for line in text.splitlines():
            assert LINE.match(line), f"{name}: not a whole log line: {line!r}"
    # Oldest first: .3, .2, .1, live. The association lines seen must be the latest ones, in order.
    order = [f"qrproxy.log.{i}" for i in range(backups, 0, -1)] + ["qrproxy.log"]
    seen = [m for n in order if n in files for m in re.findall(r"event=association .*?calling=(ECHO\d{3})", files[n])]
    assert seen, "no association lines in the log files"
    assert seen == calling[-len(seen):], f"association lines lost or out of order: {seen}"
    assert seen[-1] == "ECHO059"
    assert len(seen) < len(calling), "nothing was dropped, so the backups limit was not exercised"


WRITER = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    from qrproxy.logs import setup_logging
    setup_logging("INFO", Path(sys.argv[1]), max_size=int(sys.argv[2]), backups=1000)
    log = logging.getLogger("qrproxy.test")
    for i in range(int(sys.argv[4])):
        log.info("event=line writer=%s n=%06d pad=%s", sys.argv[3], i, "x" * (i % 50))
""")


@pytest.mark.parametrize("writers", [3])
def test_processes_sharing_a_rotating_log_lose_and_split_nothing(tmp_path: Path, writers: int) -> None:
    log_file, per_writer, max_size = tmp_path / "logs" / "shared.log", 1500, 20000
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(log_file), str(max_size), f"w{w}", str(per_writer)],
                              env=_qrproxy_env(), stderr=subprocess.DEVNULL) for w in range(writers)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    files = log_files(log_file.parent, "shared.log")
    assert len(files) > 5, f"expected many rotations, got {sorted(files)}"
    got: list[tuple[str, int]] = []
    for name, text in files.items():
        assert len(text.encode()) <= max_size, f"{name}: {len(text.encode())} bytes"
        assert text.endswith("\n"), name
        for line in text.splitlines():
            assert LINE.match(line), f"{name}: broken line {line!r}"
            m = re.search(r"event=line writer=(w\d) n=(\d{6}) pad=(x*)$", line)
            assert m, f"{name}: broken line {line!r}"
            assert len(m.group(3)) == int(m.group(2)) % 50, f"{name}: line cut short {line!r}"
            got.append((m.group(1), int(m.group(2))))
    assert len(got) == len(set(got)), "a line was written twice"
    expected = {(f"w{w}", i) for w in range(writers) for i in range(per_writer)}
    assert set(got) == expected, f"{len(expected - set(got))} lines lost"


@pytest.mark.parametrize("debug", [True, False], ids=["dicom_debug", "quiet"])
def test_dicom_debug_logs_every_message_both_ways(qrproxy: Any, tmp_path: Path, debug: bool) -> None:
    """`log.dicom_debug` shows what the modality actually sent: the negotiated contexts and one line
    per DIMSE message each way, naming the SOP instance storescu sent; off, none of it."""
    from dicomgen import make_ct, write_dataset
    from support import storescu

    cfg = proxy_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", {},
                       log={"level": "INFO", "file": "logs/qrproxy.log", "dicom_debug": debug})
    proc = qrproxy(cfg)
    ds = make_ct()
    path = write_dataset(ds, tmp_path / "ct.dcm")
    res = storescu(proc.port, [path], aec="QRPROXY", aet="DEBUGMOD")
    assert res.returncode == 0, res.stderr
    wait_until(lambda: "calling=DEBUGMOD" in (proc.dir / "logs" / "qrproxy.log").read_text(), 30,
               "the association line")
    text = (proc.dir / "logs" / "qrproxy.log").read_text()
    received = [ln for ln in text.splitlines() if "event=dimse-received" in ln and "C-STORE-RQ" in ln]
    sent = [ln for ln in text.splitlines() if "event=dimse-sent" in ln and "C-STORE-RSP" in ln]
    contexts = [ln for ln in text.splitlines() if "event=context" in ln and "peer=DEBUGMOD" in ln]
    if debug:
        assert len(received) == 1 and str(ds.SOPInstanceUID) in received[0], text
        assert len(sent) == 1 and "Status=0" in sent[0] and str(ds.SOPInstanceUID) in sent[0], text
        assert any(f"abstract={ds.SOPClassUID} result=0" in ln for ln in contexts), text
    else:
        assert not received and not sent and not contexts, text
