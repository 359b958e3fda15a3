"""Merging an upstream's answer with what qrproxy already holds for the same entity.

An SCP may return fewer keys than were asked for (PS3.4 C.4.1.1.3.2: DCMTK's dcmqrscp answers only
the keys it indexes), and a RIS may leave a key empty in one answer that it filled in the last. A
value qrproxy knows is never replaced by an absent or empty one: the answer is completed from the
held copy, key by key, and inside sequences that hold one item on both sides (a worklist item's
Scheduled Procedure Step). Pure functions over pydicom Datasets, so they are tested on their own.
"""

from __future__ import annotations

import copy
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

UTF8 = "ISO_IR 192"
_BOOKKEEPING = (0x00080005,)  # Specific Character Set: follows the values, never merged as one


def is_empty(elem: DataElement | None) -> bool:
    """No element, or a zero-length value (an empty string, no values, no items)."""
    if elem is None:
        return True
    value: Any = elem.value
    if value is None or value == "" or value == b"":
        return True
    if isinstance(value, (list, tuple)) or type(value).__name__ in ("MultiValue", "Sequence"):
        return len(value) == 0
    return False


def _charset(ds: Dataset) -> str:
    raw = ds.get("SpecificCharacterSet")
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw.strip()
    return "\\".join(str(v).strip() for v in raw)


def _fill(new: Dataset, held: Dataset) -> list[str]:
    filled: list[str] = []
    for elem in held:
        if elem.tag in _BOOKKEEPING or is_empty(elem):
            continue
        mine = new[elem.tag] if elem.tag in new else None
        if is_empty(mine):
            new[elem.tag] = copy.deepcopy(elem)
            filled.append(elem.keyword or str(elem.tag))
        elif (mine is not None and mine.VR == "SQ" and elem.VR == "SQ" and len(mine.value) == 1
              and len(elem.value) == 1):
            filled += [f"{elem.keyword}>{k}" for k in _fill(mine.value[0], elem.value[0])]
    return filled


def fill_missing(new: Dataset, held: Dataset) -> list[str]:
    """Complete `new` in place with every non-empty value of `held` that `new` lacks or has empty;
    returns the keywords filled (`Seq>Key` inside a sequence item).

    Values are decoded before they move, and when the two use different character sets the result
    is written in UTF-8 (ISO_IR 192), which holds both."""
    if _charset(new) != _charset(held):
        new.decode()
        held = copy.deepcopy(held)
        held.decode()
        filled = _fill(new, held)
        if filled:
            new.SpecificCharacterSet = UTF8
        return filled
    return _fill(new, held)
