"""The actions of one mutation, applied to a dataset in place (called by rules.apply_mutations).

Order inside a mutation, so that later actions see the result of earlier ones:
anonymize -> generate_uid -> set -> map -> replace -> remove. Anonymize comes first so that the other
actions can label the anonymized data (`set: {PatientName: "{PatientID}"}` names the patient after
the pseudonym) and can never bring PHI back from the original values.

Everything here was validated by `qrproxy check` (qrproxy/mutation_checks.py); what can still go wrong
at run time (a non-numeric template result for a numeric VR, a value longer than its VR allows) is
handled and reported as a change line, never raised: a worklist query must be answered.
"""

from __future__ import annotations

import re
import uuid
from functools import lru_cache
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from qrproxy.config.schema import Mutation
from qrproxy.rules.anonymize import Pseudonyms, anonymize
from qrproxy.rules.tagpath import TagPath, element_text, parse_path
from qrproxy.rules.templates import parse_template

# PS3.5 Table 6.2-1 maximum lengths (characters per value) of the VRs where an overlong value is
# likely to make a peer refuse the data set; longer values are cut and the cut is reported.
MAX_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "IS": 12, "LO": 64, "SH": 16, "TM": 16,
              "UI": 64, "ST": 1024, "LT": 10240}
NUMERIC_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV")
# Fixed namespace for generated UIDs: the same inputs give the same UID on every proxy, forever.
GENERATED_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:qrproxy:generate_uid")


def apply_one(ds: Dataset, m: Mutation, pseudonyms: Pseudonyms | None, on: str) -> list[str]:
    changes: list[str] = []
    if m.anonymize is not None and pseudonyms is not None:
        changes += [f"{m.name}: {line}" for line in anonymize(ds, m.anonymize, pseudonyms)]
    for key, sources in m.generate_uid.items():
        changes += _generate_uid(ds, m.name, parse_path(key, on), [parse_path(s, on) for s in sources])
    rendered = [(parse_path(k, on), _render(ds, v, on)) for k, v in m.set.items()]
    for path, value in rendered:
        changes += _write(ds, path, value, f"{m.name}: set")
    for key, rule in m.map.items():
        target = parse_path(key, on)
        source = parse_path(rule.from_, on) if rule.from_ else target
        text = element_text(source.first_element(ds)).strip()
        if text in rule.values:
            value = rule.values[text]
        elif rule.has_default:
            value = rule.default
        else:
            changes.append(f"{m.name}: map {target.label()}: {source.text} {text!r} not listed, unchanged")
            continue
        changes += _write(ds, target, _render(ds, value, on), f"{m.name}: map {source.text}={text!r}:")
    for key, rule in m.replace.items():
        path = parse_path(key, on)
        rx = _regex(rule.pattern)
        for d in path.containers(ds):
            elem = d.get(path.tag)
            if elem is None or elem.VR == "SQ":
                continue
            old = element_text(elem)
            new = rx.sub(rule.with_, old)
            if new != old:
                changes += _write_element(d, path, elem.VR, new, f"{m.name}: replace")
    for key in m.remove:
        path = parse_path(key, on)
        for d in path.containers(ds):
            if path.tag in d:
                del d[path.tag]
                changes.append(f"{m.name}: removed {path.label()}")
    return changes


@lru_cache(maxsize=1024)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _render(ds: Dataset, value: Any, on: str) -> Any:
    if isinstance(value, str):
        return parse_template(value, on).render(ds)
    if isinstance(value, list):
        return [_render(ds, v, on) for v in value]
    return value


def generated_uid(target: TagPath, parts: list[tuple[str, str]]) -> str:
    """2.25.<UUID v5 of the target and the named source values>: the same item gets the same UID on
    every refresh, on every proxy, without storing anything."""
    key = target.text + "|" + "|".join(f"{name}={value}" for name, value in parts)
    return f"2.25.{uuid.uuid5(GENERATED_UID_NAMESPACE, key).int}"


def _generate_uid(ds: Dataset, name: str, target: TagPath, sources: list[TagPath]) -> list[str]:
    if element_text(target.first_element(ds)).strip():
        return []
    parts = [(s.text, element_text(s.first_element(ds)).strip()) for s in sources]
    if not any(v for _, v in parts):
        return [f"{name}: generate_uid {target.label()}: not generated, "
                f"{', '.join(s.text for s in sources)} all empty"]
    return _write(ds, target, generated_uid(target, parts), f"{name}: generated")


def _write(ds: Dataset, path: TagPath, value: Any, what: str) -> list[str]:
    vr = path.vr
    if vr is None:  # only private tags, which check refuses for set/map
        return [f"{what} {path.label()}: VR unknown, not set"]
    out: list[str] = []
    for d in path.containers(ds, create=True):
        out += _write_element(d, path, vr.split(" or ")[0], value, what)
    return out


def _write_element(d: Dataset, path: TagPath, vr: str, value: Any, what: str) -> list[str]:
    if path.tag in d:
        vr = d[path.tag].VR
    try:
        coerced, note = coerce(vr, value)
    except ValueError as exc:
        return [f"{what} {path.label()}: not set, {exc}"]
    if path.tag in d:
        d[path.tag].value = coerced
    else:
        d.add(DataElement(path.tag, vr, coerced))
    shown = repr(value if not isinstance(value, str) or len(value) < 80 else value[:77] + "...")
    return [f"{what} {path.label()} = {shown}" + (f" ({note})" if note else "")]


def coerce(vr: str, value: Any) -> tuple[Any, str | None]:
    """A value for an element of `vr` from YAML or template text; (value, note about a cut).
    ValueError when a numeric VR gets text that is not a number."""
    if value is None or value == "":
        return None, None
    values = value if isinstance(value, list) else [value]
    if vr in NUMERIC_VRS:
        nums = []
        for v in values:
            try:
                nums.append(float(v) if vr in ("FL", "FD") else int(float(v)))
            except (TypeError, ValueError):
                raise ValueError(f"{v!r} is not a number (VR {vr})") from None
        return (nums if len(nums) > 1 else nums[0]), None
    texts = [str(v) for v in values]
    limit = MAX_LENGTH.get(vr)
    note = None
    if limit is not None and any(len(t) > limit for v in texts for t in v.split("\\")):
        texts = ["\\".join(t[:limit] for t in v.split("\\")) for v in texts]
        note = f"cut to {limit} characters, the most VR {vr} allows"
    return (texts if len(texts) > 1 else texts[0]), note

