"""Where a mutation or a `when` reads and writes: a tag, possibly inside sequence items.

Grammar (docs/configuration.md "Mutations"): a keyword or `gggg,eeee`, optionally preceded by sequence steps
`Sequence[n].` (item n, from 0) or `Sequence[*].` (every item; a bare `Sequence.` means the same):

    PatientID
    ScheduledProcedureStepSequence[0].ScheduledStationAETitle
    ReferencedStudySequence[*].ReferencedSOPInstanceUID

For `on: worklist` and `on: query`, a plain keyword of an attribute that PS3.4 Table K.6-1 places in
the Scheduled Procedure Step Sequence (ScheduledStationAETitle, Modality, ...) means
`ScheduledProcedureStepSequence[*].<keyword>`: that is where a worklist item holds it, so the
contract's `when: {Modality: CT}` / `set: {ScheduledStationAETitle: CT1}` read as a site engineer
means them. Everywhere else a plain keyword is a top-level attribute.

Parsing raises ValueError with a message for `qrproxy check`; reading and writing never raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from qrproxy.config.tags import parse_tag, tag_label

SPS_SEQUENCE = 0x00400100  # Scheduled Procedure Step Sequence

# PS3.4 Table K.6-1: attributes of the Scheduled Procedure Step Sequence items.
SPS_KEYWORDS = frozenset({
    "ScheduledStationAETitle", "ScheduledStationName", "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledProcedureStepEndDate", "ScheduledProcedureStepEndTime",
    "ScheduledPerformingPhysicianName", "ScheduledPerformingPhysicianIdentificationSequence",
    "ScheduledProcedureStepDescription", "ScheduledProtocolCodeSequence", "ScheduledProcedureStepID",
    "ScheduledProcedureStepStatus", "CommentsOnTheScheduledProcedureStep", "Modality",
    "RequestedContrastAgent", "PreMedication", "ScheduledStationClassCodeSequence",
    "ScheduledStationGeographicLocationCodeSequence", "ScheduledStationNameCodeSequence",
    "ScheduledSpecimenSequence",
})
WORKLIST_CONTEXTS = ("worklist", "query")

_STEP_RE = re.compile(r"^(?P<name>[^\[\]]+?)\s*(?:\[\s*(?P<index>\*|\d+)\s*\])?$")


@dataclass(frozen=True)
class Step:
    """A sequence to enter: `index` None means every item."""

    tag: int
    index: int | None


@dataclass(frozen=True)
class TagPath:
    steps: tuple[Step, ...]
    tag: int
    text: str

    @property
    def vr(self) -> str | None:
        try:
            return dictionary_VR(self.tag)
        except KeyError:
            return None

    def label(self) -> str:
        if not self.steps:
            return tag_label(self.tag)
        inner = "".join(f"{tag_label(s.tag).split(' ')[0]}[{'*' if s.index is None else s.index}]."
                        for s in self.steps)
        return inner + tag_label(self.tag)

    def containers(self, ds: Dataset, create: bool = False) -> list[Dataset]:
        """The datasets holding the target element. With `create`, a missing sequence (or an empty
        one) gets one item so that `set` can write into it; indexes past the end are skipped."""
        current = [ds]
        for step in self.steps:
            nxt: list[Dataset] = []
            for d in current:
                elem = d.get(step.tag)
                items = elem.value if elem is not None and elem.VR == "SQ" else None
                if not items and create:
                    items = DicomSequence([Dataset()])
                    d.add(DataElement(step.tag, "SQ", items))
                    items = d[step.tag].value
                if not items:
                    continue
                if step.index is None:
                    nxt.extend(items)
                elif step.index < len(items):
                    nxt.append(items[step.index])
            current = nxt
        return current

    def first_element(self, ds: Dataset) -> DataElement | None:
        for d in self.containers(ds):
            if self.tag in d:
                return d[self.tag]
        return None


def _step_tag(name: str) -> int:
    return parse_tag(name)


@lru_cache(maxsize=4096)
def parse_path(text: str, on: str | None = None) -> TagPath:
    """A TagPath for `text`; `on` applies the worklist rule above. ValueError names the bad part."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a DICOM keyword, gggg,eeee or Sequence[n].Keyword, got {text!r}")
    parts = [p.strip() for p in _split(text.strip())]
    steps: list[Step] = []
    for part in parts[:-1]:
        m = _STEP_RE.match(part)
        if not m:
            raise ValueError(f"{text!r}: cannot read {part!r} (write Sequence[0] or Sequence[*])")
        tag = _step_tag(m.group("name"))
        if _vr(tag) != "SQ":
            raise ValueError(f"{text!r}: {m.group('name')!r} is not a sequence, so nothing can be inside it")
        idx = m.group("index")
        steps.append(Step(tag, None if idx in (None, "*") else int(idx)))
    last = parts[-1]
    if "[" in last or "]" in last:
        raise ValueError(f"{text!r}: an index goes on a sequence, not on the last attribute")
    tag = parse_tag(last)
    if not steps and on in WORKLIST_CONTEXTS and last in SPS_KEYWORDS:
        steps.append(Step(SPS_SEQUENCE, None))
    return TagPath(tuple(steps), tag, text)


def _split(text: str) -> list[str]:
    """Split on dots outside brackets (`gggg,eeee` has no dots; keywords neither)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "." and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    if any(not p.strip() for p in out):
        raise ValueError(f"{text!r}: empty part between dots")
    return out


def _vr(tag: int) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None


def element_text(elem: DataElement | None) -> str:
    """The value as matched and templated: multi-values joined with backslash, absent or empty ''."""
    if elem is None or elem.value is None:
        return ""
    value = elem.value
    if elem.VR == "SQ":
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("latin-1", "replace")
    return str(value)
