"""`qrproxy check` on good and broken configs: exit codes and messages that name the key and line."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qrproxy.cli.main import main
from qrproxy.cli.load import ConfigError, load_config

GOOD = """\
ae_title: QRPROXY
host: 127.0.0.1
port: 11112
database: sqlite:///var/q.sqlite3
spool_dir: var/spool
nodes:
  PACS:
    ae_title: ORTHANC
    host: 127.0.0.1
    port: 4242
    roles: [store, query, retrieve, commitment]
    transfer_syntax: jpeg2000-lossless
  RIS:
    ae_title: RISMWL
    host: 127.0.0.1
    port: 4243
    roles: [worklist]
  REPORTS:
    ae_title: REPORTS
    host: 127.0.0.1
    port: 4244
    roles: [store]
query:
  mode: upstream-first
  upstream_timeout: 500ms
refresh:
  - name: worklist
    node: RIS
    kind: worklist
    every: 60s
    query: {Modality: CT}
  - name: recent
    node: PACS
    kind: studies
    cron: "*/5 * * * *"
    query: {StudyDate: "-7d"}
routes:
  - name: SR to reports
    when: {"0008,0016": '^1\\.2\\.840\\.10008\\.5\\.1\\.4\\.1\\.1\\.88\\.\\d{1,2}$'}
    to: [REPORTS]
    remove_original: true
mutations:
  - name: worklist station
    on: worklist
    when: {Modality: CT}
    set: {ScheduledStationAETitle: CT1}
encryption:
  key_file: var/spool.key
http:
  port: 8042
"""


def run_check(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """The CLI's `check` in-process (the same main() the console script calls; subprocess tests below)."""
    cfg = tmp_path / "qrproxy.yml"
    cfg.write_text(text)
    capsys.readouterr()
    rc = main(["--config", str(cfg), "check"])
    out = capsys.readouterr()
    return subprocess.CompletedProcess([], rc, out.out, out.err)


def test_good_config_parses_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "qrproxy.yml").write_text(GOOD)
    cfg = load_config(tmp_path / "qrproxy.yml")
    assert cfg.nodes["PACS"].roles == ["store", "query", "retrieve", "commitment"]
    assert cfg.query.upstream_timeout == 0.5
    assert cfg.refresh[0].every == 60.0 and cfg.refresh[1].cron == "*/5 * * * *"
    assert cfg.mutations[0].on == "worklist"  # YAML 1.1 would have made this key the boolean True
    # relative paths resolve against the config file's folder, not the current directory
    assert cfg.spool_dir == tmp_path / "var" / "spool"
    assert cfg.database == f"sqlite:///{tmp_path}/var/q.sqlite3"
    assert cfg.encryption is not None and cfg.encryption.key_file == tmp_path / "var" / "spool.key"
    assert cfg.routes[0].to == ["REPORTS"]
    assert main(["--config", str(tmp_path / "qrproxy.yml"), "keys", "new"]) == 0  # check needs the key file
    r = run_check(tmp_path, GOOD, capsys)
    assert r.returncode == 0, r.stderr
    assert "3 nodes" in r.stdout


def test_embedded_default_config_is_valid() -> None:
    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-m", "qrproxy", "--config", str(root / "conf" / "qrproxy.yml"), "check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def _mutate(old: str, new: str) -> str:
    assert old in GOOD, old
    return GOOD.replace(old, new, 1)


def _line_of(text: str, needle: str) -> int:
    for i, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


# (id, broken config text, key path expected in the message, a line that must be named, message fragment)
BROKEN = [
    ("port-too-big", _mutate("port: 11112", "port: 99999"), "port", "port: 99999", "65535"),
    ("port-not-number", _mutate("port: 11112", "port: eleven"), "port", "port: eleven", "integer"),
    ("node-port", _mutate("port: 4242", "port: 0"), "nodes.PACS.port", "port: 0", "greater than"),
    ("unknown-role", _mutate("roles: [worklist]", "roles: [worklist, archive]"), "nodes.RIS.roles[1]",
     "roles: [worklist, archive]", "archive"),
    ("unknown-node-in-route", _mutate("to: [REPORTS]", "to: [REPORTZ]"), "routes[0].to[0]", "to: [REPORTZ]",
     "REPORTZ"),
    ("bad-duration", _mutate("upstream_timeout: 500ms", "upstream_timeout: 5 minutes"),
     "query.upstream_timeout", "upstream_timeout: 5 minutes", "duration"),
    ("typo-key", _mutate("ae_title: QRPROXY", "ae_tilte: QRPROXY"), "ae_tilte", "ae_tilte: QRPROXY", "unknown key"),
    ("typo-nested-key", _mutate("    impersonate", "    impersonate") if False else
     _mutate("    transfer_syntax: jpeg2000-lossless", "    transfer_sytnax: jpeg2000-lossless"),
     "nodes.PACS.transfer_sytnax", "transfer_sytnax", "unknown key"),
    ("bad-yaml", _mutate("  mode: upstream-first", "  mode: [upstream-first"), "(yaml)", None, ""),
    ("bad-transfer-syntax", _mutate("transfer_syntax: jpeg2000-lossless", "transfer_syntax: jpeg2000"),
     "nodes.PACS.transfer_syntax", "transfer_syntax: jpeg2000", "jpeg2000-lossless"),
    ("bad-query-mode", _mutate("mode: upstream-first", "mode: upstream-only"), "query.mode", "mode: upstream-only",
     "cache-first"),
    ("refresh-unknown-node", _mutate("    node: RIS", "    node: HIS"), "refresh[0].node", "node: HIS", "HIS"),
    ("refresh-wrong-role", _mutate("    node: RIS", "    node: REPORTS"), "refresh[0].node", "node: REPORTS",
     "worklist"),
    ("refresh-bad-cron", _mutate('cron: "*/5 * * * *"', 'cron: "*/5 * * *"'), "refresh[1].cron", "cron:", "cron"),
    ("refresh-bad-relative-date", _mutate('StudyDate: "-7d"', 'StudyDate: "-7days"'),
     "refresh[1].query.StudyDate", "-7days", "relative date"),
    ("bad-tag-in-route", _mutate('when: {"0008,0016"', 'when: {"0008,001G"'), "routes[0].when.0008,001G",
     "0008,001G", "keyword"),
    ("bad-regex", _mutate("when: {Modality: CT}", "when: {Modality: '(CT'}"), "mutations[0].when.Modality",
     "when: {Modality: '(CT'}", "regular expression"),
    ("bad-mutation-target", _mutate("on: worklist", "on: everything"), "mutations[0].on", "on: everything",
     "worklist"),
    ("ae-title-too-long", _mutate("ae_title: ORTHANC", "ae_title: ORTHANC_IS_TOO_LONG_X"), "nodes.PACS.ae_title",
     "ORTHANC_IS_TOO_LONG_X", "16"),
    ("duplicate-key", _mutate("host: 127.0.0.1\nport: 11112", "host: 127.0.0.1\nhost: 0.0.0.0\nport: 11112"),
     "host", "host: 0.0.0.0", "duplicate"),
    ("missing-node-host", _mutate("    host: 127.0.0.1\n    port: 4243", "    port: 4243"), "nodes.RIS",
     "  RIS:", "host"),
    ("bad-database-url", _mutate("database: sqlite:///var/q.sqlite3", "database: mysql://x@y/z"), "database",
     "database: mysql", "unsupported"),
    ("bad-calling-policy", GOOD + "unknown_calling_ae: deny\n", "unknown_calling_ae", "unknown_calling_ae: deny",
     "reject"),
]


@pytest.mark.parametrize("name,text,key,line_text,fragment", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_exit_2_names_key_and_line(tmp_path: Path, name: str, text: str, key: str,
                                                 line_text: str | None, fragment: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    r = run_check(tmp_path, text, capsys)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stdout == ""
    err = r.stderr
    assert f": {key}:" in err, err
    if line_text is not None:
        assert f"qrproxy.yml:{_line_of(text, line_text)}:" in err, err
    else:
        assert "qrproxy.yml:" in err
    assert fragment.lower() in err.lower(), err


def test_serve_refuses_bad_config_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "qrproxy.yml"
    cfg.write_text(_mutate("port: 11112", "port: 99999"))
    r = subprocess.run([sys.executable, "-m", "qrproxy", "--config", str(cfg), "serve"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "port" in r.stderr


def test_config_from_environment_and_missing(tmp_path: Path) -> None:
    cfg = tmp_path / "qrproxy.yml"
    cfg.write_text(GOOD)
    assert main(["--config", str(cfg), "keys", "new"]) == 0  # check needs the key file
    env = {"QRPROXY_CONFIG": str(cfg), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "qrproxy", "check"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "qrproxy", "--config", str(tmp_path / "nope.yml"), "check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "nope.yml" in r.stderr


def test_usage_error_exit_2() -> None:
    r = subprocess.run([sys.executable, "-m", "qrproxy", "--config", "x.yml", "frobnicate"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    text = _mutate("to: [REPORTS]", "to: [NOPE]")
    text = text.replace("    node: RIS", "    node: GONE", 1)
    (tmp_path / "q.yml").write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "q.yml")
    joined = "\n".join(exc.value.problems)
    assert "routes[0].to[0]" in joined and "refresh[0].node" in joined


def test_whitelist_defaults_to_reject(tmp_path: Path) -> None:
    (tmp_path / "q.yml").write_text(textwrap.dedent("""\
        allowed_calling_ae_titles: [CT1]
        nodes:
          PACS: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242, roles: [store]}
    """))
    cfg = load_config(tmp_path / "q.yml")
    assert cfg.rejects_unknown_ae
    assert cfg.known_calling_ae_titles == {"CT1", "ORTHANC"}
    (tmp_path / "q.yml").write_text("allowed_calling_ae_titles: []\n")
    assert not load_config(tmp_path / "q.yml").rejects_unknown_ae


def test_the_documented_refresh_example_is_a_valid_config(tmp_path: Path) -> None:
    """docs/configuration.md "Refresh jobs" is copied by site engineers: it must load as written."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    block = doc.split("### Refresh jobs\n\n```yaml\n", 1)[1].split("```", 1)[0]
    cfg_file = tmp_path / "site.yml"
    cfg_file.write_text(textwrap.dedent("""\
        ae_title: QRPROXY
        database: sqlite:///q.sqlite3
        nodes:
          RIS: {ae_title: RIS, host: 127.0.0.1, port: 1, roles: [worklist]}
          PACS: {ae_title: PACS, host: 127.0.0.1, port: 2, roles: [query, retrieve]}
        """) + block)
    cfg = load_config(cfg_file)
    jobs = {job.name: job for job in cfg.refresh}
    assert jobs["worklist"].kind == "worklist" and jobs["worklist"].every == 120
    assert jobs["last-week-studies"].cron and jobs["last-week-studies"].timeout == 600
