"""What `qrproxy check` verifies in a mutation, so that applying it never fails at query time:
every tag path, template field, regular expression and group reference, value type and option.

Yields (key path inside the mutation, message); config.py adds the file, line and `mutations[i]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from qrproxy.rules.tagpath import TagPath, parse_path
from qrproxy.rules.templates import parse_template

if TYPE_CHECKING:
    from qrproxy.config.schema import Mutation

NUMERIC_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV")
_GROUP_REF_RE = re.compile(r"\\(\d+)|\\g<([^>]*)>")


def check_mutation(mut: Mutation) -> Iterator[tuple[tuple[Any, ...], str]]:
    on = mut.on
    if not (mut.anonymize or mut.generate_uid or mut.set or mut.map or mut.replace or mut.remove):
        yield (), "a mutation needs at least one of anonymize, generate_uid, set, map, replace, remove"
    if mut.anonymize is not None:
        if on != "store":
            yield ("anonymize",), "anonymize applies to on: store only (UIDs remapped in a worklist or " \
                                  "query answer would not match the images)"
        for j, key in enumerate(mut.anonymize.keep):
            try:
                parse_path(key)
            except ValueError as exc:
                yield ("anonymize", "keep", j), str(exc)
    for key, sources in mut.generate_uid.items():
        path = yield from _path(("generate_uid", key), key, on)
        if path is not None and path.vr != "UI":
            yield ("generate_uid", key), f"{key} has VR {path.vr or 'unknown'}; generate_uid makes UIDs"
        if not sources:
            yield ("generate_uid", key), "list the tags the UID is derived from, e.g. [AccessionNumber, PatientID]"
        for j, src in enumerate(sources):
            yield from _path(("generate_uid", key, j), src, on)
    for key, value in mut.set.items():
        path = yield from _settable(("set", key), key, on)
        if path is not None:
            yield from _value(("set", key), path, value, on)
    for key, rule in mut.map.items():
        path = yield from _settable(("map", key), key, on)
        if rule.from_ is not None:
            yield from _path(("map", key, "from"), rule.from_, on)
        if path is not None:
            for src, value in rule.values.items():
                yield from _value(("map", key, "values", src), path, value, on)
            if rule.has_default:
                yield from _value(("map", key, "default"), path, rule.default, on)
    for key, rule in mut.replace.items():
        yield from _path(("replace", key), key, on)
        try:
            rx = re.compile(rule.pattern)
        except re.error as exc:
            yield ("replace", key, "pattern"), f"bad regular expression {rule.pattern!r}: {exc}"
            continue
        for m in _GROUP_REF_RE.finditer(rule.with_):
            ref = m.group(1) or m.group(2)
            ok = (int(ref) <= rx.groups) if ref.isdigit() else ref in rx.groupindex
            if not ok:
                yield ("replace", key, "with"), f"{rule.with_!r} refers to group {ref!r}, which " \
                                                f"{rule.pattern!r} does not have"
    for j, key in enumerate(mut.remove):
        yield from _path(("remove", j), key, on)


def _path(where: tuple[Any, ...], key: str, on: str) -> Any:
    try:
        return parse_path(key, on)
    except ValueError as exc:
        yield where, str(exc)
        return None


def _settable(where: tuple[Any, ...], key: str, on: str) -> Any:
    path = yield from _path(where, key, on)
    if path is None:
        return None
    if path.vr is None:
        yield where, f"{key} is not in the DICOM dictionary, so its VR is unknown: it can be removed or " \
                     "replaced, not set"
        return None
    if path.vr == "SQ":
        yield where, f"{key} is a sequence: set the attributes inside it (Sequence[0].Keyword)"
        return None
    return path


def _value(where: tuple[Any, ...], path: TagPath, value: Any, on: str) -> Iterator[tuple[tuple[Any, ...], str]]:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, str):
            try:
                tpl = parse_template(v, on)
            except ValueError as exc:
                yield where, str(exc)
                continue
            if tpl.is_constant and path.vr in NUMERIC_VRS:
                try:
                    float(v)
                except ValueError:
                    yield where, f"{path.text} has VR {path.vr}: {v!r} is not a number"
