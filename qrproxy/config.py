"""The one YAML config file, parsed into typed, validated objects.

Every error names the key path and the line in the file, because the person reading it is a site
engineer at a console, not a Python developer. Unknown keys are errors: a typo such as `ae_tilte` must
not silently fall back to a default. Validation happens in two passes: pydantic checks the shape and
types of each key, then `_cross_check` checks what refers to what (routes to nodes, refresh jobs to
nodes with the right role, tag names, regexes, cron lines), each with its own key path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from sqlalchemy.engine import make_url

from .tags import parse_tag
from .units import is_relative_date, parse_duration, parse_size

ROLES = ("store", "query", "retrieve", "commitment", "worklist", "modality", "mpps")
TRANSFER_SYNTAXES = (
    "as-received",
    "explicit-little",
    "implicit-little",
    "jpeg2000-lossless",
    "jpegls-lossless",
    "rle-lossless",
    "jpeg-baseline",
)
ROUTE_AE_KEYS = ("calling_ae", "called_ae")

Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]


def _check_ae_title(value: str) -> str:
    """PS3.5 AE title: 1-16 characters of the default repertoire, no backslash, not only spaces."""
    if not isinstance(value, str):
        raise ValueError(f"an AE title is text, got {value!r}")
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title cannot be empty")
    if len(stripped) > 16:
        raise ValueError(f"an AE title has at most 16 characters, {stripped!r} has {len(stripped)}")
    if "\\" in stripped or any(ord(c) < 0x20 or ord(c) > 0x7E for c in stripped):
        raise ValueError(f"{stripped!r}: AE titles use printable ASCII without backslash")
    return stripped


AETitle = Annotated[str, BeforeValidator(_check_ae_title)]
Port = Annotated[int, Field(ge=1, le=65535)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _policy_shorthand(value: Any) -> Any:
    """`commitment: upstream` is short for `commitment: {policy: upstream}`."""
    return {"policy": value} if isinstance(value, str) else value


class NodeCommitment(_Strict):
    """Per requesting node (a modality): overrides of the global `commitment` settings."""

    policy: Literal["local", "upstream"] | None = None
    deadline: Duration | None = None


class Node(_Strict):
    ae_title: AETitle
    host: str
    port: Port
    roles: list[Literal[ROLES]] = Field(default_factory=list)  # type: ignore[valid-type]
    transfer_syntax: Literal[TRANSFER_SYNTAXES] = "as-received"  # type: ignore[valid-type]
    impersonate: bool = False
    tls: bool = False
    timeout: Duration = 30.0
    max_pdu: int = Field(default=0, ge=0)
    # How qrproxy retrieves through from this node: C-MOVE to qrproxy's own AE (the node must know
    # it), or C-GET on qrproxy's association (no connection back through a firewall needed).
    retrieve_method: Literal["move", "get"] = "move"
    commitment: Annotated[NodeCommitment | None, BeforeValidator(_policy_shorthand)] = None
    # Further source addresses (IPs or host names) this node's AE title may call from, besides
    # `host` (README "Security and limits": bind_ae_to_host).
    addresses: list[str] = Field(default_factory=list)

    @field_validator("roles")
    @classmethod
    def _unique_roles(cls, v: list[str]) -> list[str]:
        return list(dict.fromkeys(v))


class QuerySettings(_Strict):
    mode: Literal["cache-first", "upstream-first", "cache-only"] = "cache-first"
    upstream_timeout: Duration = 5.0
    stale_after: Duration = 3600.0
    cache_ttl: Duration = 2.0  # identical requests answered from memory until the index changes; 0: off


class RefreshJob(_Strict):
    name: str
    node: str
    kind: Literal["worklist", "studies"]
    every: Duration | None = None
    cron: str | None = None
    timeout: Duration = 300.0
    query: dict[str, Any] = Field(default_factory=dict)


class Route(_Strict):
    name: str
    when: dict[str, str] = Field(default_factory=dict)
    to: list[str] = Field(default_factory=list)
    remove_original: bool = False


class Anonymize(_Strict):
    """Options of the PS3.15 Annex E Basic Profile (README "Anonymization")."""

    retain_uids: bool = False          # Retain UIDs Option
    retain_dates: bool = False         # Retain Longitudinal Temporal Information, Full Dates Option
    patient_id: Literal["pseudonym", "keep", "empty"] = "pseudonym"
    patient_name: str = ""
    keep_private: bool = False
    keep: list[str] = Field(default_factory=list)

    def keep_tags(self) -> list[int]:
        return [parse_tag(k) for k in self.keep]


def _anonymize_flag(value: Any) -> Any:
    """`anonymize: true` is the Basic Profile with default options; `false` is no anonymization."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


SetValue = str | int | float | list[str | int | float] | None


class Replace(_Strict):
    pattern: str
    with_: str = Field(default="", alias="with")


def _text_keys(value: Any) -> Any:
    """YAML reads `values: {1: A}` with an integer key; values are compared as text."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): v for k, v in value.items()}
    return value


class MapValues(_Strict):
    from_: str | None = Field(default=None, alias="from")
    values: Annotated[dict[str, SetValue], BeforeValidator(_text_keys)]
    default: SetValue = None

    @property
    def has_default(self) -> bool:
        return "default" in self.model_fields_set


class Mutation(_Strict):
    """Applied in this order: anonymize, generate_uid, set, map, replace, remove (README "Mutations")."""

    name: str
    on: Literal["worklist", "store", "query"]
    when: dict[str, str] = Field(default_factory=dict)
    nodes: list[str] = Field(default_factory=list)
    anonymize: Annotated[Anonymize | None, BeforeValidator(_anonymize_flag)] = None
    generate_uid: dict[str, list[str]] = Field(default_factory=dict)
    set: dict[str, SetValue] = Field(default_factory=dict)
    map: dict[str, MapValues] = Field(default_factory=dict)
    replace: dict[str, Replace] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Encryption(_Strict):
    """Spool encryption at rest (README "Encryption at rest"). The key file itself is checked by
    `load_config(..., check_key_file=True)` (serve, check): it must exist, be mode 0600 or stricter
    and hold valid keys; `qrproxy keys new` creates it."""

    key_file: Path


class Http(_Strict):
    host: str = "127.0.0.1"
    port: Port = 8042


class Tls(_Strict):
    port: Port
    cert_file: Path
    key_file: Path
    ca_file: Path | None = None


class StoreSettings(_Strict):
    """C-STORE reception (README "Store and forward")."""

    min_free_space: Size = 1_000_000_000
    # Calling AE title (or "*") -> SOP Class UIDs answered Success but not stored, as the Clara adapter does.
    ignore_sop_classes: dict[str, list[str]] = Field(default_factory=dict)
    extra_sop_classes: list[str] = Field(default_factory=list)
    # A C-STORE data set larger than this is cut off with A-ABORT as it arrives (README "Security
    # and limits"); 0: no limit.
    max_dataset_size: Size = 4_000_000_000


class ServiceAccess(_Strict):
    """Who may use one service (README "Security and limits")."""

    allowed_calling_ae_titles: list[AETitle] = Field(default_factory=list)


class Services(_Strict):
    """Per-service calling-AE whitelists; an absent service is open to every accepted calling AE.
    `move` covers C-MOVE and C-GET."""

    echo: ServiceAccess | None = None
    store: ServiceAccess | None = None
    find: ServiceAccess | None = None
    move: ServiceAccess | None = None
    worklist: ServiceAccess | None = None
    mpps: ServiceAccess | None = None
    commitment: ServiceAccess | None = None


class ForwardSettings(_Strict):
    """The forward queue: per-instance retries, node-level backoff, leases."""

    max_attempts: int = Field(default=10, ge=1)
    retry_min: Duration = 10.0
    retry_max: Duration = 600.0
    lease: Duration = 300.0
    batch: int = Field(default=200, ge=1, le=10000)
    poll: Duration = 5.0


class CommitmentSettings(_Strict):
    """Storage commitment (README "Storage commitment")."""

    # local: committed once durably in the spool; upstream: once every `commitment` node it was
    # forwarded to has confirmed it through its own storage commitment.
    policy: Literal["local", "upstream"] = "local"
    deadline: Duration = 3600.0          # then the undecided instances are reported failed (0x0110)
    report_retry_min: Duration = 10.0    # report association retries while the requester is unreachable
    report_retry_max: Duration = 600.0
    report_expire: Duration = 7 * 86400.0  # a report not delivered by then is given up (logged, in status)
    upstream_batch: int = Field(default=500, ge=1, le=10000)  # instances per N-ACTION to a node
    upstream_resend: int = Field(default=2, ge=0, le=100)  # re-forwards of an instance a node reports failed
    upstream_wait: Duration = 600.0      # no report from the node by then: ask again


class WorklistSettings(_Strict):
    """Worklist items in the cache (README "Modality worklist")."""

    # Items scheduled more than this many days before today are deleted (at each worklist refresh).
    keep_days: int = Field(default=2, ge=0, le=3650)
    # The first C-STORE of an item's study (by StudyInstanceUID or AccessionNumber) marks it done.
    remove_on_store: Literal["accession", "study", "off"] = "off"


class RetentionLimits(_Strict):
    """Limits for the local copies of the studies that came from one node (README "Retention")."""

    max_bytes: Size | None = None
    max_age: Duration | None = None


class Retention(_Strict):
    """Eviction of local copies (README "Retention"). Absent: nothing is ever evicted."""

    max_bytes: Size | None = None     # total of the spool's objects
    max_age: Duration | None = None   # since the study was last received or served
    min_free: Size | None = None      # evict while the spool's filesystem has less free than this
    every: Duration = 600.0           # how often a running proxy runs a pass
    # Node name -> its own limits, for studies with a copy whose sender was that node's AE title.
    nodes: dict[str, RetentionLimits] = Field(default_factory=dict)


class PrefetchRule(_Strict):
    """Priors of patients on the cached worklist, fetched ahead of time (README "Prefetch")."""

    name: str
    node: str  # asked with C-FIND for the patient's studies, and retrieved from (role retrieve)
    every: Duration = 600.0
    hours: str = "00:00-24:00"  # local time window in which it runs; "19:00-06:00" wraps midnight
    days_ahead: int = Field(default=1, ge=0, le=30)  # worklist items scheduled today .. today+N
    modalities: list[str] = Field(default_factory=list)  # priors with one of these in ModalitiesInStudy
    body_parts: list[str] = Field(default_factory=list)  # priors with a series of one of these parts
    max_age: Duration = 5 * 365 * 86400.0  # priors no older than this (StudyDate)
    max_studies: int = Field(default=3, ge=1, le=100)  # per patient, newest first
    max_bytes: Size = 2_000_000_000  # per patient; the next prior is not fetched once exceeded
    bandwidth: Size = 0  # bytes per second on average across the rule's retrievals; 0: unlimited
    pin: Duration = 2 * 86400.0  # prefetched studies are kept from retention until scheduled day + pin
    max_attempts: int = Field(default=5, ge=1)


class Logging(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None
    dicom_debug: bool = False
    # Rotate `file` when it would exceed this (qrproxy/logs.py); 0: never, leave it to logrotate.
    max_size: Size = 0
    backups: int = Field(default=5, ge=1, le=1000)  # rotated files kept: file.1 .. file.N


class Config(_Strict):
    ae_title: AETitle = "QRPROXY"
    host: str = "0.0.0.0"
    port: Port = 11112
    database: str = "sqlite:///var/qrproxy.sqlite3"
    spool_dir: Path = Path("var/spool")
    max_associations: int = Field(default=100, ge=1, le=10000)
    # Processes serving the port (SO_REUSEPORT); more than one spreads concurrent associations over cores.
    workers: int = Field(default=1, ge=1, le=64)
    max_pdu: int = Field(default=262144, ge=0)
    # An accepted TCP connection holds an association slot until its A-ASSOCIATE-RQ arrives or this
    # runs out (pynetdicom waits the full ACSE timeout even when the peer already hung up).
    acse_timeout: Duration = 30.0
    idle_timeout: Duration = 300.0
    allowed_calling_ae_titles: list[AETitle] = Field(default_factory=list)
    unknown_calling_ae: Literal["accept", "reject"] | None = None
    # A node's AE title calling from an address other than its host/addresses: rejected (true) or
    # only logged (false). Unset: true when unknown calling AEs are rejected.
    bind_ae_to_host: bool | None = None
    # Associations (and connections awaiting their A-ASSOCIATE-RQ) at once from one IP address.
    max_associations_per_peer: int = Field(default=20, ge=1, le=10000)
    services: Services = Field(default_factory=Services)
    nodes: dict[str, Node] = Field(default_factory=dict)
    query: QuerySettings = Field(default_factory=QuerySettings)
    refresh: list[RefreshJob] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    mutations: list[Mutation] = Field(default_factory=list)
    encryption: Encryption | None = None
    http: Http | None = None
    tls: Tls | None = None
    store: StoreSettings = Field(default_factory=StoreSettings)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    worklist: WorklistSettings = Field(default_factory=WorklistSettings)
    retention: Retention | None = None
    prefetch: list[PrefetchRule] = Field(default_factory=list)
    commitment: Annotated[CommitmentSettings, BeforeValidator(_policy_shorthand)] = Field(
        default_factory=CommitmentSettings)
    log: Logging = Field(default_factory=Logging)

    # Not from the file: where it came from, for messages and relative paths.
    source: Path | None = Field(default=None, exclude=True)

    @property
    def rejects_unknown_ae(self) -> bool:
        """Unset `unknown_calling_ae` means: reject when a whitelist is given, accept otherwise."""
        if self.unknown_calling_ae is None:
            return bool(self.allowed_calling_ae_titles)
        return self.unknown_calling_ae == "reject"

    @property
    def binds_ae_to_host(self) -> bool:
        return self.rejects_unknown_ae if self.bind_ae_to_host is None else self.bind_ae_to_host

    @property
    def known_calling_ae_titles(self) -> set[str]:
        return set(self.allowed_calling_ae_titles) | {n.ae_title for n in self.nodes.values()}

    def nodes_with_role(self, role: str) -> dict[str, Node]:
        return {name: n for name, n in self.nodes.items() if role in n.roles}

    def commitment_policy(self, node: str | None) -> tuple[str, float]:
        """(policy, deadline in seconds) for commitment requests from node `node` (None: unknown AE)."""
        own = self.nodes[node].commitment if node in self.nodes else None
        policy = (own.policy if own is not None else None) or self.commitment.policy
        deadline = own.deadline if own is not None and own.deadline is not None else self.commitment.deadline
        return policy, deadline

    def node_for_ae(self, ae_title: str) -> tuple[str, Node] | None:
        ae_title = ae_title.strip()
        for name, node in self.nodes.items():
            if node.ae_title == ae_title:
                return name, node
        return None


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
            msg = "unknown key (check the spelling; see README 'Configuration')"
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
    from .tagpath import parse_path

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
        from .mutation_checks import check_mutation

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


def load_config(path: str | os.PathLike[str], *, check_key_file: bool = False) -> Config:
    """Read, validate and resolve a config file. Raises ConfigError listing every problem found.

    `check_key_file`: also require `encryption.key_file` to be a usable key file, and the `tls`
    certificate, key and CA files to load into TLS contexts (serve and check do; `keys new` must
    not, it is there to create the key file)."""
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
        from .keys import check_key_file as key_file_problem

        problem = key_file_problem(cfg.encryption.key_file)
        if problem:
            problems.append(_fmt(fname, ("encryption", "key_file"), located.lines, problem))
    if check_key_file and cfg.tls is not None:
        from .tls import problems as tls_problems

        for key, problem in tls_problems(cfg.tls):
            problems.append(_fmt(fname, ("tls", key), located.lines, problem))
    if problems:
        raise ConfigError(problems)
    return cfg.model_copy(update={"source": path.resolve()})
