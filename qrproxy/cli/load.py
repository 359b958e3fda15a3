"""Reading conf/qrproxy.yml: YAML with line numbers, pydantic validation, then cross-checks of what
refers to what, every problem named by file, line and key path (`qrproxy check`, exit 2).

It lives with the CLI, above every package, because its cross-checks use the checkers of the
packages that own each key (rule tag paths and mutations, TLS files, the spool key file);
config/ itself stays a leaf that every package may import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from qrproxy.config.schema import ROUTE_AE_KEYS, Config
from qrproxy.config.tags import parse_tag
from qrproxy.config.units import is_relative_date


class ConfigError(Exception):
    """Raised with every problem found; `str()` is what `qrproxy check` prints."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


# --- YAML with line numbers -------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 turns the contract's `on: worklist` key into True
    and `NO` (Norway, a country code) into False; neither is what a site engineer means."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@dataclass
class _Located:
    data: Any
    lines: dict[tuple[Any, ...], int]


def _walk(node: yaml.Node, path: tuple[Any, ...], lines: dict, problems: list[str], fname: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(f"{fname}:{line}: {_dotted(path + (key,))}: duplicate key")
            seen.add(key)
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, problems, fname)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk(item, path + (i,), lines, problems, fname)


def _dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def _load_yaml(text: str, fname: str) -> _Located:
    problems: list[str] = []
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{fname}:{mark.line + 1}" if mark else fname
        raise ConfigError([f"{where}: (yaml): {getattr(exc, 'problem', None) or exc}"]) from None
    lines: dict[tuple[Any, ...], int] = {}
    if root is not None:
        _walk(root, (), lines, problems, fname)
    if problems:
        raise ConfigError(problems)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{fname}:1: (top level): expected a mapping of keys, got {type(data).__name__}"])
    return _Located(data, lines)


def _line_for(path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> int | None:
    for n in range(len(path), 0, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


def _fmt(fname: str, path: tuple[Any, ...], lines: dict, msg: str) -> str:
    line = _line_for(path, lines)
    where = f"{fname}:{line}" if line else fname
    return f"{where}: {_dotted(path)}: {msg}"


def _pydantic_problems(exc: ValidationError, fname: str, lines: dict, data: dict) -> list[str]:
    out = []
    for err in exc.errors():
        # pydantic adds union-member and validator names to loc; keep only the real key path.
        path: list[Any] = []
        node: Any = data
        for part in err["loc"]:
            if isinstance(node, dict) and part in node:
                path.append(part)
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                path.append(part)
                node = node[part]
            elif err["type"] == "extra_forbidden" and part == err["loc"][-1]:
                path.append(part)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        elif err["type"] == "missing":
            msg = f"missing required key {err['loc'][-1]!r}"
            path = path[: len(path)]
        msg = msg.replace("Value error, ", "")
        value = err.get("input")
        if err["type"] not in ("missing", "extra_forbidden", "value_error") and isinstance(value, (str, int, float)):
            msg += f" (got {value!r})"
        out.append(_fmt(fname, tuple(path), lines, msg))
    return out


# --- Cross references -------------------------------------------------------------------------


def _check_when(prefix: tuple, when: dict[str, str], allow_ae: bool,
                on: str | None = None) -> Iterator[tuple[tuple, str]]:
    from qrproxy.rules.tagpath import parse_path

    for key, pattern in when.items():
        if not (allow_ae and key in ROUTE_AE_KEYS):
            try:
                parse_path(key, on)
            except ValueError as exc:
                yield prefix + (key,), str(exc)
                continue
        try:
            re.compile(pattern)
        except re.error as exc:
            yield prefix + (key,), f"bad regular expression {pattern!r}: {exc}"


def _cross_check(cfg: Config) -> Iterator[tuple[tuple, str]]:
    names = set(cfg.nodes)
    for name, node in cfg.nodes.items():
        if node.ae_title == cfg.ae_title:
            yield ("nodes", name, "ae_title"), f"{node.ae_title!r} is qrproxy's own ae_title"
    seen_ae: dict[str, str] = {}
    for name, node in cfg.nodes.items():
        if node.ae_title in seen_ae:
            yield ("nodes", name, "ae_title"), (
                f"{node.ae_title!r} is also the AE title of node {seen_ae[node.ae_title]!r}; "
                "AE titles address nodes and must be unique"
            )
        seen_ae.setdefault(node.ae_title, name)
    if cfg.rejects_unknown_ae and not cfg.known_calling_ae_titles:
        yield ("unknown_calling_ae",), "reject with no allowed_calling_ae_titles and no nodes would refuse every peer"

    job_names: set[str] = set()
    for i, job in enumerate(cfg.refresh):
        if job.name in job_names:
            yield ("refresh", i, "name"), f"duplicate refresh job name {job.name!r}"
        job_names.add(job.name)
        if job.node not in names:
            yield ("refresh", i, "node"), f"unknown node {job.node!r} (known: {', '.join(sorted(names)) or 'none'})"
        else:
            role = "worklist" if job.kind == "worklist" else "query"
            if role not in cfg.nodes[job.node].roles:
                yield ("refresh", i, "node"), f"node {job.node!r} needs role {role!r} for a {job.kind} refresh"
        if (job.every is None) == (job.cron is None):
            yield ("refresh", i), "give exactly one of 'every' or 'cron'"
        if job.every is not None and job.every < 1:
            yield ("refresh", i, "every"), "refresh more often than once a second is not sensible"
        if job.cron is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(job.cron)
            except ValueError as exc:
                yield ("refresh", i, "cron"), f"bad cron line {job.cron!r}: {exc}"
        for key, value in job.query.items():
            try:
                tag = parse_tag(key)
            except ValueError as exc:
                yield ("refresh", i, "query", key), str(exc)
                continue
            from pydicom.datadict import dictionary_VR

            if isinstance(value, str) and dictionary_VR(tag) == "DA" and value and value[0] in "+-t":
                if not is_relative_date(value):
                    yield ("refresh", i, "query", key), f"bad relative date {value!r} (use today, -7d or -1d..+1d)"

    rule_names: set[str] = set()
    for i, rule in enumerate(cfg.prefetch):
        if rule.name in rule_names:
            yield ("prefetch", i, "name"), f"duplicate prefetch rule name {rule.name!r}"
        rule_names.add(rule.name)
        if rule.node not in names:
            yield ("prefetch", i, "node"), f"unknown node {rule.node!r} (known: {', '.join(sorted(names)) or 'none'})"
        elif "retrieve" not in cfg.nodes[rule.node].roles:
            yield ("prefetch", i, "node"), f"node {rule.node!r} needs role 'retrieve' for prefetch"
        if not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-4]):[0-5]\d", rule.hours):
            yield ("prefetch", i, "hours"), f"bad time window {rule.hours!r} (use HH:MM-HH:MM, e.g. 19:00-06:00)"
        if rule.every < 1:
            yield ("prefetch", i, "every"), "prefetch more often than once a second is not sensible"

    route_names: set[str] = set()
    for i, route in enumerate(cfg.routes):
        if route.name in route_names:
            yield ("routes", i, "name"), f"duplicate route name {route.name!r}"
        route_names.add(route.name)
        yield from _check_when(("routes", i, "when"), route.when, allow_ae=True)
        for j, dest in enumerate(route.to):
            if dest not in names:
                yield ("routes", i, "to", j), f"unknown node {dest!r} (known: {', '.join(sorted(names)) or 'none'})"
        if not route.to and not route.remove_original:
            yield ("routes", i), "a route needs 'to' destinations or remove_original: true"

    mutation_names: set[str] = set()
    for i, mut in enumerate(cfg.mutations):
        if mut.name in mutation_names:
            yield ("mutations", i, "name"), f"duplicate mutation name {mut.name!r}"
        mutation_names.add(mut.name)
        yield from _check_when(("mutations", i, "when"), mut.when, allow_ae=mut.on == "store", on=mut.on)
        for j, n in enumerate(mut.nodes):
            if n not in names:
                yield ("mutations", i, "nodes", j), f"unknown node {n!r}"
        from qrproxy.rules.mutation_checks import check_mutation

        for path, msg in check_mutation(mut):
            yield ("mutations", i) + path, msg

    uid_re = re.compile(r"^[0-9]+(\.[0-9]+)*$")
    for ae, uids in cfg.store.ignore_sop_classes.items():
        for j, uid in enumerate(uids):
            if not uid_re.match(uid):
                yield ("store", "ignore_sop_classes", ae, j), f"{uid!r} is not a UID"
    for j, uid in enumerate(cfg.store.extra_sop_classes):
        if not uid_re.match(uid):
            yield ("store", "extra_sop_classes", j), f"{uid!r} is not a UID"
    if cfg.forward.retry_min > cfg.forward.retry_max:
        yield ("forward", "retry_min"), "retry_min is longer than retry_max"

    if cfg.retention is not None:
        if cfg.retention.every < 1:
            yield ("retention", "every"), "a retention pass more often than once a second is not sensible"
        for name in cfg.retention.nodes:
            if name not in names:
                yield ("retention", "nodes", name), (
                    f"unknown node {name!r} (known: {', '.join(sorted(names)) or 'none'})")
    if cfg.commitment.report_retry_min > cfg.commitment.report_retry_max:
        yield ("commitment", "report_retry_min"), "report_retry_min is longer than report_retry_max"
    if not cfg.nodes_with_role("commitment"):
        if cfg.commitment.policy == "upstream":
            yield ("commitment", "policy"), "policy upstream needs a node with role 'commitment'"
        for name, node in cfg.nodes.items():
            if node.commitment is not None and node.commitment.policy == "upstream":
                yield ("nodes", name, "commitment", "policy"), "policy upstream needs a node with role 'commitment'"

    if cfg.tls is not None and cfg.tls.port == cfg.port:
        yield ("tls", "port"), "the TLS port must differ from the plain DICOM port"
    if cfg.tls is None:
        for name, node in cfg.nodes.items():
            if node.tls:
                yield ("nodes", name, "tls"), ("tls: true needs a top-level tls: section (cert_file, key_file and "
                                               "ca_file to verify the node against)")
    if cfg.http is not None and cfg.http.port == cfg.port:
        yield ("http", "port"), "the HTTP port must differ from the DICOM port"


# --- Paths ------------------------------------------------------------------------------------


def _resolve_paths(data: dict, base: Path) -> dict:
    """Relative paths are relative to the config file's folder, so `serve` works from any cwd."""

    def fix(p: Any) -> Any:
        if isinstance(p, str) and p and not os.path.isabs(p):
            return os.path.normpath(base / p)
        return p

    data = dict(data)
    data["spool_dir"] = fix(data.get("spool_dir", "var/spool"))
    db = data.get("database", "sqlite:///var/qrproxy.sqlite3")
    if isinstance(db, str):
        try:
            url = make_url(db)
        except Exception:
            url = None
        if url is not None and url.drivername.startswith("sqlite"):
            if url.database and url.database != ":memory:" and not os.path.isabs(url.database):
                db = url.set(database=os.path.normpath(base / url.database)).render_as_string(hide_password=False)
        data["database"] = db
    for section, keys in (("encryption", ("key_file",)), ("tls", ("cert_file", "key_file", "ca_file")), ("log", ("file",))):
        if isinstance(data.get(section), dict):
            sub = dict(data[section])
            for k in keys:
                if k in sub:
                    sub[k] = fix(sub[k])
            data[section] = sub
    return data


def _check_database_url(db: Any) -> str | None:
    if not isinstance(db, str):
        return "expected an SQLAlchemy URL such as sqlite:///var/qrproxy.sqlite3"
    try:
        url = make_url(db)
    except Exception as exc:
        return f"not a database URL: {exc}"
    if not (url.drivername.startswith("sqlite") or url.drivername.startswith("postgresql")):
        return f"unsupported database {url.drivername!r}: use sqlite:/// or postgresql+psycopg://"
    return None


def load_config(path: str | os.PathLike[str], *, check_key_file: bool = False, check_host: str | None = None) -> Config:
    """Read, validate and resolve a config file. Raises ConfigError listing every problem found.

    `check_key_file`: also require `encryption.key_file` to be a usable key file, and the `tls`
    certificate, key and CA files to load into TLS contexts (serve and check do; `keys new` must
    not, it is there to create the key file). `check_host` ("serve" or "check"): also what the host
    must give `serve` (folders writable, ports free; cli/preflight.py); "check" accepts ports held
    by a qrproxy already running."""
    path = Path(path)
    fname = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{fname}: cannot read the config file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{fname}: the config file is not UTF-8: {exc}"]) from None
    located = _load_yaml(text, fname)
    problems: list[str] = []
    bad_db = _check_database_url(located.data.get("database", "sqlite:///x"))
    if bad_db:
        problems.append(_fmt(fname, ("database",), located.lines, bad_db))
    base = path.resolve().parent
    data = _resolve_paths(located.data, base) if not bad_db else dict(located.data)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems += _pydantic_problems(exc, fname, located.lines, located.data)
        raise ConfigError(problems) from None
    problems += [_fmt(fname, p, located.lines, m) for p, m in _cross_check(cfg)]
    if check_key_file and cfg.encryption is not None:
        from qrproxy.store.keys import check_key_file as key_file_problem

        problem = key_file_problem(cfg.encryption.key_file)
        if problem:
            problems.append(_fmt(fname, ("encryption", "key_file"), located.lines, problem))
    if check_key_file and cfg.tls is not None:
        from qrproxy.net.tls import problems as tls_problems

        for key, problem in tls_problems(cfg.tls):
            problems.append(_fmt(fname, ("tls", key), located.lines, problem))
    if check_host and not problems:
        from qrproxy.cli.preflight import host_problems

        for key, problem in host_problems(cfg, running_ok=check_host == "check"):
            problems.append(_fmt(fname, key, located.lines, problem))
    if problems:
        raise ConfigError(problems)
    return cfg.model_copy(update={"source": path.resolve()})
