"""Tag names as site engineers write them: a DICOM keyword (`StudyDate`) or `gggg,eeee`."""

from __future__ import annotations

import re

from pydicom.datadict import keyword_for_tag, tag_for_keyword

_HEX_TAG_RE = re.compile(r"^\(?\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)?$")


def parse_tag(name: str) -> int:
    """The integer tag for a keyword or `gggg,eeee`; ValueError naming the bad input otherwise."""
    if not isinstance(name, str):
        raise ValueError(f"expected a DICOM keyword or gggg,eeee, got {name!r}")
    m = _HEX_TAG_RE.match(name.strip())
    if m:
        return (int(m.group(1), 16) << 16) | int(m.group(2), 16)
    tag = tag_for_keyword(name.strip())
    if tag is None:
        raise ValueError(f"{name!r} is neither a DICOM keyword nor a tag written gggg,eeee")
    return tag


def tag_label(tag: int) -> str:
    """`StudyDate (0008,0020)` for logs and `rules test` output."""
    kw = keyword_for_tag(tag)
    hexpart = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
    return f"{kw} {hexpart}" if kw else hexpart
