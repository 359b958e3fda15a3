"""deploy/: the systemd unit, the container image definition and their configs.

No systemd (as PID 1) and no container runtime run here, so the files are checked statically: the
unit parses, `systemd-analyze verify` finds nothing wrong in it, the hardening options are there,
its ExecStart is a qrproxy command line that `check` accepts against deploy/qrproxy.yml; the
Containerfile's COPY sources exist, its config passes `check`, ports and paths agree. One check is
live: MemoryDenyWriteExecute=yes would kill a process that maps writable+executable memory, so a
real qrproxy is run under the kernel's same restriction (prctl PR_SET_MDWE) and made to receive,
encrypt and convert to JPEG 2000 and JPEG-LS for DCMTK storescp.
"""

from __future__ import annotations

import ctypes
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

import dicomgen
from peers import REPO_ROOT, _qrproxy_env
from support import assert_all_success, node, proxy_config, storescu

DEPLOY = Path(REPO_ROOT) / "deploy"
UNIT = DEPLOY / "systemd" / "qrproxy.service"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
ETC_CONFIG = "/etc/qrproxy/qrproxy.yml"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """systemd unit syntax: sections, `Key=value` (keys may repeat), `#`/`;` comments, `\\` continuations."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        m = re.fullmatch(r"\[(\w+)\]", line)
        if m:
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"{path}: {line!r} before any [Section]"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not Key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def qrproxy_run(argv: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    """Run a unit's/an image's qrproxy command line here: the installed script becomes `python -m
    qrproxy`, the /etc config the repository's copy."""
    assert argv[0].endswith("/bin/qrproxy"), argv
    args = [str(config) if a == ETC_CONFIG else a for a in argv[1:]]
    return subprocess.run([sys.executable, "-m", "qrproxy", *args], capture_output=True, text=True,
                          env=_qrproxy_env(), timeout=60, cwd="/")


def test_unit_hardening_and_command_line() -> None:
    unit = parse_unit(UNIT)
    svc = unit["Service"]
    one = {k: v[-1] for k, v in svc.items()}
    assert one["User"] == "qrproxy" and one["DynamicUser"] == "no"
    assert one["Restart"] == "on-failure"
    assert float(one["TimeoutStopSec"]) > 10, "CONTRACT: SIGTERM stops within 10 s; systemd must wait longer"
    assert one["KillSignal"] == "SIGTERM"
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes", "RestrictNamespaces": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes", "UMask": "0077",
        "CapabilityBoundingSet": "", "AmbientCapabilities": "",
    }
    wrong = {k: one.get(k) for k, v in expected.items() if one.get(k) != v}
    assert not wrong, f"hardening options missing or different: {wrong}"
    assert set(one["ReadWritePaths"].split()) == {"/var/lib/qrproxy", "/var/log/qrproxy"}
    assert set(one["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in svc["SystemCallFilter"]
    assert int(one["LimitNOFILE"]) >= 4096
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]

    # The paths the example config writes are the ones the unit makes writable.
    etc = yaml.safe_load((DEPLOY / "qrproxy.yml").read_text())
    rw = one["ReadWritePaths"].split()
    written = [etc["spool_dir"], etc["database"].removeprefix("sqlite:///"), etc["log"]["file"]]
    for p in written:
        assert any(p.startswith(d + "/") for d in rw), f"{p} is not under ReadWritePaths {rw}"

    start = shlex.split(one["ExecStart"])
    assert start[1:3] == ["--config", ETC_CONFIG] and start[-1] == "serve", start
    res = qrproxy_run(start[:-1] + ["check"], DEPLOY / "qrproxy.yml")
    assert res.returncode == 0, f"{start}: check exit {res.returncode}\n{res.stdout}{res.stderr}"
    assert "ok: ae_title QRPROXY on 0.0.0.0:11112" in res.stdout, res.stdout
    pre = shlex.split(one["ExecStartPre"])
    assert pre[0] == start[0] and pre[-1] == "check"
    res = qrproxy_run(pre, DEPLOY / "qrproxy.yml")
    assert res.returncode == 0, res.stderr
    # exit 2 (bad config) is not retried by systemd: it is the CLI's documented code for that
    bad = qrproxy_run(pre, DEPLOY / "container" / "Containerfile")
    assert bad.returncode == 2 and one["RestartPreventExitStatus"] == "2", bad.stderr


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (apt-get install systemd)")
    # verify insists that the ExecStart binary exists: point it at this venv's qrproxy (or python)
    exe = Path(sys.executable).with_name("qrproxy")
    exe = exe if exe.exists() else Path(sys.executable)
    text = UNIT.read_text().replace("/opt/qrproxy/venv/bin/qrproxy", str(exe))
    copy = tmp_path / "qrproxy.service"
    copy.write_text(text)
    res = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (res.stdout + res.stderr).splitlines() if "qrproxy.service" in ln]
    assert res.returncode == 0 and not complaints, f"systemd-analyze verify:\n{res.stdout}{res.stderr}"
    # the check itself works: a misspelt key is reported
    copy.write_text(text.replace("ProtectHome=yes", "ProtectHome=yess"))
    res = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert [ln for ln in (res.stdout + res.stderr).splitlines() if "qrproxy.service" in ln], res


def parse_containerfile(path: Path) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def test_containerfile_paths_ports_and_config() -> None:
    instr = parse_containerfile(CONTAINERFILE)
    ops = [op for op, _ in instr]
    assert ops[0] == "FROM" and "python" in instr[0][1]
    for op, rest in instr:
        if op == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (Path(REPO_ROOT) / src).exists(), f"COPY {src}: not in the repository"
    users = [rest for op, rest in instr if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    assert "VOLUME /var/lib/qrproxy" in [f"{op} {rest}" for op, rest in instr]
    exposed = {int(p) for op, rest in instr if op == "EXPOSE" for p in rest.split()}
    assert exposed == {11112, 2762, 8042}
    assert dict(instr)["STOPSIGNAL"] == "SIGTERM"

    entry = json.loads(dict(instr)["ENTRYPOINT"]) + json.loads(dict(instr)["CMD"])
    assert entry[1:3] == ["--config", ETC_CONFIG] and entry[-1] == "serve", entry
    copied = [shlex.split(rest) for op, rest in instr if op == "COPY" and rest.endswith(ETC_CONFIG)]
    assert copied, f"nothing is copied to {ETC_CONFIG}"
    config = Path(REPO_ROOT) / [p for p in copied[0] if not p.startswith("--")][0]
    res = qrproxy_run(entry[:-1] + ["check"], config)
    assert res.returncode == 0, f"{config}: check exit {res.returncode}\n{res.stdout}{res.stderr}"

    cfg = yaml.safe_load(config.read_text())
    assert cfg["port"] in exposed and cfg["http"]["port"] in exposed
    assert cfg["http"]["host"] == "0.0.0.0", "the health port must be reachable from outside the container"
    health = dict(instr)["HEALTHCHECK"]
    assert f"127.0.0.1:{cfg['http']['port']}/health" in health
    assert cfg["spool_dir"].startswith("/var/lib/qrproxy/") and "/var/lib/qrproxy/" in cfg["database"]
    assert "file" not in cfg.get("log", {}), "in a container logs go to stderr"


MDWE_WRAPPER = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN: inherited by children
    sys.exit(f"PR_SET_MDWE: errno {ctypes.get_errno()}")
open(os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), "mdwe-applied"), "a").close()
os.execv(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE (Linux 6.3+)


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux < 6.3)")
def test_memory_deny_write_execute_does_not_break_qrproxy(qrproxy: Any, storescp_factory: Any,
                                                          tmp_path: Path) -> None:
    wrapper = tmp_path / "mdwe.py"
    wrapper.write_text(MDWE_WRAPPER)
    probe = ("import mmap\ntry:\n mmap.mmap(-1, 4096, prot=mmap.PROT_READ|mmap.PROT_WRITE|mmap.PROT_EXEC)\n"
             " print('allowed')\nexcept PermissionError:\n print('refused')")
    res = subprocess.run([sys.executable, str(wrapper), sys.executable, "-c", probe], capture_output=True, text=True)
    assert res.stdout.strip() == "refused", f"the wrapper does not restrict memory: {res.stdout}{res.stderr}"

    j2k = storescp_factory(aet="J2K", extra_args=["+xa"])
    jls = storescp_factory(aet="JLS", extra_args=["+xa"])
    cfg = proxy_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", {
        "J2K": node(j2k, transfer_syntax="jpeg2000-lossless"),
        "JLS": node(jls, transfer_syntax="jpegls-lossless"),
    })
    proc = qrproxy(dict(cfg, encryption={"key_file": "etc/spool.key"}), start=False)
    assert proc.cli("keys", "new").returncode == 0
    inner = proc.argv

    def argv() -> list[str]:
        return [sys.executable, str(wrapper), *inner()]

    proc.argv = argv  # type: ignore[method-assign]
    (tmp_path / "mdwe-applied").unlink(missing_ok=True)
    proc.start()
    assert (tmp_path / "mdwe-applied").exists(), "qrproxy was not started through the MDWE wrapper"
    ds = [dicomgen.make_ct(study_uid=pydicom.uid.generate_uid(), instance_number=i + 1, rows=128, cols=128)
          for i in range(3)]
    files = dicomgen.write_all(ds, tmp_path / "in")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)
    want = {str(d.SOPInstanceUID): d for d in ds}
    for scp, ts in ((j2k, "1.2.840.10008.1.2.4.90"), (jls, "1.2.840.10008.1.2.4.80")):
        got = scp.wait_for_files(3, timeout=120)
        for f in got:
            rx = pydicom.dcmread(f)
            assert rx.file_meta.TransferSyntaxUID == ts, f"{scp.aet}: {rx.file_meta.TransferSyntaxUID}"
            orig = want[str(rx.SOPInstanceUID)]
            assert (rx.pixel_array == orig.pixel_array).all(), f"{scp.aet}: pixels differ"
    assert proc.running, f"qrproxy died under MemoryDenyWriteExecute:\n{proc.log_text()[-3000:]}"
    log = proc.log_text()
    assert "Traceback" not in log and "converted-fallback" not in log, log[-3000:]


def test_conformance_tables_match_the_code() -> None:
    """docs/conformance.md's SOP class / transfer syntax tables are what scripts/conformance.py derives from the
    code now; a new SOP class or syntax in the code without `--write` fails here."""
    script = Path(REPO_ROOT) / "scripts" / "conformance.py"
    gen = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_qrproxy_env(),
                         timeout=120)
    assert gen.returncode == 0, gen.stderr
    # independent of the script's own comparison: the SCP contexts qrproxy registers all appear
    sys.path.insert(0, str(REPO_ROOT))
    from qrproxy.scp import commitment as commitment_scp
    from qrproxy.scp import echo, find, move, mpps, mwl, store
    registered = [u for mod in (echo, find, mwl, mpps, move, commitment_scp) for u, _ in mod.contexts()]
    registered += [u for u, _ in store.contexts()]
    for uid in registered:
        assert f"`{uid}`" in gen.stdout, f"{uid} is accepted by qrproxy but missing from the tables"
    readme = (Path(REPO_ROOT) / "docs" / "conformance.md").read_text(encoding="utf-8")
    begin = readme.index("<!-- conformance:begin")
    start = readme.index("-->", begin) + 3
    end = readme.index("<!-- conformance:end -->")
    assert readme[start:end].strip("\n") + "\n" == gen.stdout, \
        "docs/conformance.md's conformance tables differ from the code: run scripts/conformance.py --write"
    check = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True,
                           env=_qrproxy_env(), timeout=120)
    assert check.returncode == 0, check.stderr


def test_install_script_lays_out_the_service_idempotently_and_uninstalls_keeping_data(tmp_path: Path) -> None:
    """deploy/install under a root folder (no users, no systemctl): the files and modes a real
    install produces, a second run that keeps the edited config, an uninstall that keeps the data
    and a purge that does not. The venv step is skipped (a real run installs this checkout)."""
    install = REPO_ROOT / "deploy" / "install"
    root = tmp_path / "root"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(install), "--root", str(root), "--skip-venv", *args],
                              capture_output=True, text=True, timeout=120)

    def mode(rel: str) -> int:
        return (root / rel).stat().st_mode & 0o7777

    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    expected = {"var/lib/qrproxy": 0o700, "var/lib/qrproxy/keys": 0o700, "var/log/qrproxy": 0o750,
                "etc/qrproxy": 0o750, "etc/qrproxy/qrproxy.yml": 0o640,
                "etc/systemd/system/qrproxy.service": 0o644, "etc/logrotate.d/qrproxy": 0o644,
                "usr/lib/sysusers.d/qrproxy.conf": 0o644, "usr/lib/tmpfiles.d/qrproxy.conf": 0o644}
    assert {rel: mode(rel) for rel in expected} == expected
    assert (root / "etc/systemd/system/qrproxy.service").read_text() == \
        (REPO_ROOT / "deploy/systemd/qrproxy.service").read_text()
    config = root / "etc/qrproxy/qrproxy.yml"
    cfg = yaml.safe_load(config.read_text())
    # what the unit runs and the config it reads agree on where state lives (writable by the unit)
    unit = (root / "etc/systemd/system/qrproxy.service").read_text()
    writable = re.search(r"^ReadWritePaths=(.*)$", unit, re.M).group(1).split()  # type: ignore[union-attr]
    assert any(cfg["spool_dir"].startswith(w) for w in writable), (cfg["spool_dir"], writable)
    key_hint = re.search(r"key_file: (\S+)", config.read_text())
    assert key_hint and any(key_hint.group(1).startswith(w) for w in writable), key_hint

    config.write_text(config.read_text() + "\n# site edit\n")
    second = run()
    assert second.returncode == 0, second.stdout + second.stderr
    assert config.read_text().endswith("# site edit\n"), "a second run overwrote the site's config"
    assert "kept the existing" in second.stdout

    (root / "var/lib/qrproxy/qrproxy.sqlite3").write_bytes(b"index")
    gone = run("--uninstall")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert not (root / "etc/systemd/system/qrproxy.service").exists() and not (root / "opt/qrproxy").exists()
    assert config.exists() and (root / "var/lib/qrproxy/qrproxy.sqlite3").read_bytes() == b"index"
    assert "kept" in gone.stdout

    bad = run("--purge")
    assert bad.returncode == 2 and "--purge only goes with --uninstall" in bad.stderr
    purged = run("--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (root / "etc/qrproxy").exists() and not (root / "var/lib/qrproxy").exists()
