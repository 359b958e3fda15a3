"""The one YAML config file, parsed into typed, validated objects.

Every error names the key path and the line in the file, because the person reading it is a site
engineer at a console, not a Python developer. Unknown keys are errors: a typo such as `ae_tilte` must
not silently fall back to a default. Validation happens in two passes: pydantic checks the shape and
types of each key, then `_cross_check` checks what refers to what (routes to nodes, refresh jobs to
nodes with the right role, tag names, regexes, cron lines), each with its own key path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from qrproxy.config.tags import parse_tag
from qrproxy.config.units import parse_duration, parse_size

ROLES = ("store", "query", "retrieve", "commitment", "worklist", "modality", "mpps")
TRANSFER_SYNTAXES = (
    "as-received",
    "explicit-little",
    "implicit-little",
    "jpeg2000-lossless",
    "jpegls-lossless",
    "rle-lossless",
    "jpeg-baseline",
    "auto",  # lossless compression chosen by the measured line speed (scu/linespeed.py)
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


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _clock_time(value: Any) -> str:
    text = str(value).strip()
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() for p in parts) or not (0 <= int(parts[0]) <= 24 and 0 <= int(parts[1]) < 60) \
            or (int(parts[0]) == 24 and int(parts[1]) != 0):
        raise ValueError(f"expected a time of day HH:MM (00:00 to 24:00), got {value!r}")
    return f"{int(parts[0]):02d}:{int(parts[1]):02d}"


ClockTime = Annotated[str, BeforeValidator(_clock_time)]


def _weekdays(value: Any) -> Any:
    """`mon-fri`, `sat,sun`, `[mon, wed-fri]` or `[mon, tue]`: a list of day names."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        return value
    out: list[str] = []
    for item in items:
        text = str(item).strip().lower()
        if "-" in text:
            first, _, last = (t.strip() for t in text.partition("-"))
            if first not in WEEKDAYS or last not in WEEKDAYS:
                raise ValueError(f"expected a day range such as mon-fri, got {item!r}")
            i, j = WEEKDAYS.index(first), WEEKDAYS.index(last)
            out += [WEEKDAYS[(i + k) % 7] for k in range((j - i) % 7 + 1)]
        else:
            out.append(text)
    return list(dict.fromkeys(out))


def _window_shorthand(value: Any) -> Any:
    """CONTRACT.md's spelling `{days: mon-fri, hours: "07:00-19:00", bandwidth: 2MB}` is the same
    window as `{days: [mon, ..., fri], from: "07:00", to: "19:00", limit: 2MB}`."""
    if not isinstance(value, dict):
        return value
    out = dict(value)
    if "hours" in out:
        hours = out.pop("hours")
        start, sep, end = str(hours).partition("-")
        if not sep:
            raise ValueError(f"hours: expected a window such as 07:00-19:00, got {hours!r}")
        out.setdefault("from", start.strip())
        out.setdefault("to", end.strip())
    if "bandwidth" in out and "limit" not in out:
        out["limit"] = out.pop("bandwidth")
    return out


class BandwidthWindow(_Strict):
    """One window of `bandwidth_schedule`: from `from` to `to` (host local time; a window that
    ends before it starts runs past midnight) on `days`, at most `limit` bytes/s (0: unlimited).
    Also written `{days: mon-fri, hours: "07:00-19:00", bandwidth: 2MB}`."""

    days: Annotated[list[Literal[WEEKDAYS]], BeforeValidator(_weekdays)] = Field(  # type: ignore[valid-type]
        default_factory=lambda: list(WEEKDAYS))
    start: ClockTime = Field(alias="from")
    end: ClockTime = Field(alias="to")
    limit: Size

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return _window_shorthand(value)


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
    # `host` (docs/operations.md "Security and limits": bind_ae_to_host).
    addresses: list[str] = Field(default_factory=list)
    # What qrproxy sends to this node, bytes/s, shared by all its associations (0: unlimited), and
    # windows that set another limit at certain hours (scu/pacing.py).
    bandwidth: Size = 0
    bandwidth_schedule: list[BandwidthWindow] = Field(default_factory=list)
    # forward a study only once it has received nothing new for this long (Orthanc's StableAge)
    stable_after: Duration = 0.0
    # associations qrproxy opens to this node at once: to forward (each claims the next instances
    # in queue order), to retrieve through (a study in that many requests) and to refresh (that many
    # C-FIND queries in flight): on a far link, one association waits a round trip per request
    associations: int = Field(default=2, ge=1, le=16)
    # Capacitor's MinimumLineSpeed: an association sending slower than this (bytes/s) for
    # `min_line_speed_window` is aborted and its instance retried later (0: off; scu/linespeed.py)
    min_line_speed: Size = 0
    min_line_speed_window: Duration = 30.0

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
    # forward queue order: higher first (a STAT study ahead of a backlog); all its destinations
    priority: int = Field(default=0, ge=-1000, le=1000)


class Anonymize(_Strict):
    """Options of the PS3.15 Annex E Basic Profile (docs/configuration.md "Anonymization")."""

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
    """Applied in this order: anonymize, generate_uid, set, map, replace, remove (docs/configuration.md "Mutations")."""

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
    """Spool encryption at rest (docs/operations.md "Encryption at rest"). The key file itself is checked by
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
    """C-STORE reception (docs/dicom.md "Store and forward")."""

    min_free_space: Size = 1_000_000_000
    # Calling AE title (or "*") -> SOP Class UIDs answered Success but not stored, as the Clara adapter does.
    ignore_sop_classes: dict[str, list[str]] = Field(default_factory=dict)
    extra_sop_classes: list[str] = Field(default_factory=list)
    # A C-STORE data set larger than this is cut off with A-ABORT as it arrives (docs/operations.md "Security
    # and limits"); 0: no limit.
    max_dataset_size: Size = 4_000_000_000


class ServiceAccess(_Strict):
    """Who may use one service (docs/operations.md "Security and limits")."""

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
    """Storage commitment (docs/dicom.md "Storage commitment")."""

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
    """Worklist items in the cache (docs/dicom.md "Modality worklist")."""

    # Items scheduled more than this many days before today are deleted (at each worklist refresh).
    keep_days: int = Field(default=2, ge=0, le=3650)
    # The first C-STORE of an item's study (by StudyInstanceUID or AccessionNumber) marks it done.
    remove_on_store: Literal["accession", "study", "off"] = "off"


class RetentionLimits(_Strict):
    """Limits for the local copies of the studies that came from one node (docs/operations.md "Retention")."""

    max_bytes: Size | None = None
    max_age: Duration | None = None


class Retention(_Strict):
    """Eviction of local copies (docs/operations.md "Retention"). Absent: nothing is ever evicted."""

    max_bytes: Size | None = None     # total of the spool's objects
    max_age: Duration | None = None   # since the study was last received or served
    min_free: Size | None = None      # evict while the spool's filesystem has less free than this
    every: Duration = 600.0           # how often a running proxy runs a pass
    # Node name -> its own limits, for studies with a copy whose sender was that node's AE title.
    nodes: dict[str, RetentionLimits] = Field(default_factory=dict)


class PrefetchRule(_Strict):
    """Priors of patients on the cached worklist, fetched ahead of time (docs/dicom.md "Prefetch")."""

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
    node_check_interval: Duration = 60.0  # every node C-ECHOed this often by worker 0 (jobs/health.py); 0: at start only
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
