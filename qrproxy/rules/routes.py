"""Routes and mutations: matching and applying them, as pure functions of (config, dataset, AE titles).

Pure so that `qrproxy rules test FILE.dcm` shows exactly what `serve` would do, and so that tests can
cover every case without a network.

Routing semantics (docs/configuration.md "Routing"):
- default destinations come from the called AE title: qrproxy's own `ae_title` (or any title that is
  not an alias) means every node with role `store`; a node's `ae_title` or `QRP_<ae_title>` means
  that node only;
- routes are tried top to bottom and the first whose `when` matches wins: its `to` nodes are added and,
  with `remove_original: true`, the default destinations are dropped;
- an instance is never sent back to the node whose AE title sent it (no loops with retrieve-through).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from pydicom.dataset import Dataset

from qrproxy.config.schema import Config, Mutation, Route
from qrproxy.config.tags import tag_label
from qrproxy.index.uidmap import MemoryPseudonyms
from qrproxy.rules.anonymize import Pseudonyms
from qrproxy.rules.mutations import apply_one
from qrproxy.rules.tagpath import element_text as _text
from qrproxy.rules.tagpath import parse_path

ALIAS_PREFIX = "QRP_"


@dataclass
class RoutingDecision:
    destinations: list[str]
    defaults: list[str]
    default_reason: str
    route: str | None = None
    skipped_loop: list[str] = field(default_factory=list)
    priority: int = 0  # the matched route's; the forward queue sends higher first


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def element_text(ds: Dataset, tag: int) -> str:
    """The value as matched by `when`: multi-values joined with backslash, absent or empty as ''."""
    return _text(ds.get(tag))


def matches(when: dict[str, str], ds: Dataset, calling_ae: str = "", called_ae: str = "",
            on: str | None = None) -> bool:
    """Every condition holds. A key through a sequence (`Seq[*].Keyword`, or for `on: worklist` an
    attribute of the Scheduled Procedure Step Sequence) holds when one item matches; an absent tag
    matches as the empty string."""
    for key, pattern in when.items():
        rx = _regex(pattern)
        if key == "calling_ae":
            texts = [calling_ae]
        elif key == "called_ae":
            texts = [called_ae]
        else:
            path = parse_path(key, on)
            texts = [_text(d.get(path.tag)) for d in path.containers(ds)] or [""]
        if not any(rx.search(t) for t in texts):
            return False
    return True


def default_destinations(cfg: Config, called_ae: str) -> tuple[list[str], str]:
    called = called_ae.strip()
    for name, node in cfg.nodes.items():
        if called in (node.ae_title, f"{ALIAS_PREFIX}{node.ae_title}"):
            return [name], f"called AE {called} addresses node {name}"
    stores = list(cfg.nodes_with_role("store"))
    if called == cfg.ae_title:
        return stores, "called AE is qrproxy: every node with role store"
    return stores, f"called AE {called or '(none)'} is not an alias: every node with role store"


def route(cfg: Config, ds: Dataset, calling_ae: str = "", called_ae: str = "") -> RoutingDecision:
    defaults, why = default_destinations(cfg, called_ae or cfg.ae_title)
    chosen: Route | None = next(
        (r for r in cfg.routes if matches(r.when, ds, calling_ae, called_ae)), None
    )
    dests = [] if chosen is not None and chosen.remove_original else list(defaults)
    if chosen is not None:
        dests += [d for d in chosen.to if d not in dests]
    sender = cfg.node_for_ae(calling_ae) if calling_ae else None
    skipped = []
    if sender is not None and sender[0] in dests:
        dests.remove(sender[0])
        skipped.append(sender[0])
    return RoutingDecision(dests, defaults, why, chosen.name if chosen else None, skipped,
                           chosen.priority if chosen else 0)


def mutations_for(cfg: Config, on: str, node: str | None, ds: Dataset, calling_ae: str = "",
                  called_ae: str = "") -> list[Mutation]:
    return [
        m
        for m in cfg.mutations
        if m.on == on and (not m.nodes or node in m.nodes)
        and matches(m.when, ds, calling_ae, called_ae, on=on)
    ]


def apply_mutations(ds: Dataset, mutations: Iterable[Mutation], pseudonyms: Pseudonyms | None = None,
                    on: str | None = None) -> list[str]:
    """Apply each mutation in order; returns a line per change for the log and `rules test`.

    Within a mutation: anonymize, generate_uid, set, map, replace, remove (qrproxy/mutations.py).
    Pure except `pseudonyms`, which anonymize uses for new UIDs and patient IDs (the forwarder
    passes the database-backed one; without it a throwaway in-memory map is used). `on` defaults to
    each mutation's own `on` and decides how plain keywords resolve (worklist: inside the Scheduled
    Procedure Step Sequence). Only anonymize can raise (AnonymizeError): an instance that cannot be
    anonymized must not be sent.
    """
    changes: list[str] = []
    for m in mutations:
        if m.anonymize is not None and pseudonyms is None:
            pseudonyms = MemoryPseudonyms()
        changes += apply_one(ds, m, pseudonyms, on or m.on)
    return changes


def describe(cfg: Config, ds: Dataset, calling_ae: str, called_ae: str) -> dict[str, Any]:
    """What `rules test` prints: routing decision and per-destination mutations, without sending."""
    decision = route(cfg, ds, calling_ae, called_ae)
    per_node = {}
    for node in decision.destinations:
        muts = mutations_for(cfg, "store", node, ds, calling_ae, called_ae)
        per_node[node] = [m.name for m in muts]
    return {"decision": decision, "mutations": per_node}


def _flat(ds: Dataset, prefix: str = "") -> dict[str, str]:
    """Every element as `label -> shown value`, items of sequences as `Seq[i].`, for diffs."""
    out: dict[str, str] = {}
    for elem in ds:
        label = prefix + tag_label(int(elem.tag))
        if elem.VR == "SQ":
            out[label] = f"<{len(elem.value or [])} items>"
            for i, item in enumerate(elem.value or []):
                out.update(_flat(item, f"{prefix}{tag_label(int(elem.tag)).split(' ')[0]}[{i}]."))
        elif isinstance(elem.value, (bytes, bytearray)) and len(elem.value) > 64:
            out[label] = f"<{len(elem.value)} bytes>"
        else:
            out[label] = repr(_text(elem))
    return out


def diff(before: Dataset, after: Dataset) -> list[tuple[str, str | None, str | None]]:
    """(attribute, value before or None if absent, value after or None if removed) for what changed."""
    a, b = _flat(before), _flat(after)
    return [(k, a.get(k), b.get(k)) for k in list(a) + [k for k in b if k not in a] if a.get(k) != b.get(k)]
