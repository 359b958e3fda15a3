"""Values built from other tags: `"{PatientID}"`, `"{PatientName.family}^X"`, `"{AccessionNumber}-{StudyID}"`.

A field is a tag path (qrproxy/tagpath.py) optionally followed by a person-name component:
`.family`, `.given`, `.middle`, `.prefix`, `.suffix` (PS3.5 6.2: family^given^middle^prefix^suffix),
which is how names are split and joined (swap: `"{PatientName.given}^{PatientName.family}"`).
`{{` and `}}` are literal braces. An absent tag gives an empty string; a path through a sequence reads
the first item that has the tag. Templates are parsed once by `qrproxy check`; rendering never fails.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from qrproxy.rules.tagpath import TagPath, element_text, parse_path

PN_COMPONENTS = {
    "family": "family_name",
    "given": "given_name",
    "middle": "middle_name",
    "prefix": "name_prefix",
    "suffix": "name_suffix",
}
_TOKEN_RE = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class Field:
    path: TagPath
    component: str | None


@dataclass(frozen=True)
class Template:
    parts: tuple[str | Field, ...]

    @property
    def is_constant(self) -> bool:
        return all(isinstance(p, str) for p in self.parts)

    def render(self, ds: Dataset) -> str:
        out = []
        for part in self.parts:
            out.append(part if isinstance(part, str) else _field_text(ds, part))
        return "".join(out)


def _field_text(ds: Dataset, field: Field) -> str:
    elem = field.path.first_element(ds)
    if field.component is None:
        return element_text(elem)
    text = element_text(elem)
    if not text:
        return ""
    name = PersonName(text.split("\\")[0])
    return getattr(name, PN_COMPONENTS[field.component]) or ""


@lru_cache(maxsize=2048)
def parse_template(text: str, on: str | None = None) -> Template:
    """ValueError naming the bad field for `qrproxy check`."""
    parts: list[str | Field] = []
    pos = 0
    for m in _TOKEN_RE.finditer(text):
        if m.start() > pos:
            parts.append(text[pos:m.start()])
        token = m.group(0)
        if token in ("{{", "}}"):
            parts.append(token[0])
        elif m.group(1) is None:
            raise ValueError(f"template {text!r}: unmatched {token!r} (write {token * 2} for a literal brace)")
        else:
            parts.append(_parse_field(text, m.group(1).strip(), on))
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    return Template(tuple(parts))


def _parse_field(text: str, field: str, on: str | None) -> Field:
    if not field:
        raise ValueError(f"template {text!r}: empty field {{}}")
    component = None
    head, _, tail = field.rpartition(".")
    if head and tail in PN_COMPONENTS:
        field, component = head, tail
    try:
        path = parse_path(field, on)
    except ValueError as exc:
        raise ValueError(f"template {text!r}: field {{{field}}}: {exc}") from None
    if component is not None and path.vr != "PN":
        raise ValueError(f"template {text!r}: .{component} applies to person names, "
                         f"{field} has VR {path.vr or 'unknown'}")
    return Field(path, component)
