"""Parsing of the human units used in the config file (durations, sizes, relative dates).

Kept apart from config.py because the same parsers serve the CLI (`queue list --older-than 2h`) and the
refresh jobs (`StudyDate: -7d`), and because pure functions are easy to test exhaustively.
"""

from __future__ import annotations

import datetime as _dt
import re

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_duration(value: object) -> float:
    """Seconds from `500ms`, `30s`, `10m`, `2h`, `1d` or a bare number of seconds.

    Raises ValueError with a message meant for a site engineer reading `qrproxy check`.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, 10m, 2h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise ValueError(f"expected a duration like 500ms, 30s, 10m, 2h or 1d, got {value!r}")
        seconds = float(m.group(1)) * _DURATION_FACTORS[m.group(2) or "s"]
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from `10MB`, `50GB`, `512KiB` or a bare number of bytes (decimal units, as disks are sold)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 10MB or 50GB, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise ValueError(f"expected a size like 500MB, 10GB or 2TB, got {value!r}")
        n = int(float(m.group(1)) * _SIZE_FACTORS[(m.group(2) or "b").lower()])
    if n < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return n


_REL_DAY_RE = re.compile(r"^([+-]\d+)d$")


def _relative_day(token: str, today: _dt.date) -> _dt.date | None:
    token = token.strip()
    if token == "today":
        return today
    if token == "yesterday":
        return today - _dt.timedelta(days=1)
    if token == "tomorrow":
        return today + _dt.timedelta(days=1)
    m = _REL_DAY_RE.match(token)
    if m:
        return today + _dt.timedelta(days=int(m.group(1)))
    return None


def is_relative_date(value: str) -> bool:
    """True for the relative forms the refresh queries accept: `today`, `-7d`, `-1d..+1d`."""
    try:
        resolve_relative_date(value, _dt.date(2000, 1, 1))
    except ValueError:
        return False
    return True


def resolve_relative_date(value: str, today: _dt.date) -> str:
    """Turn a relative date into a DICOM DA value or range.

    `today` -> `20261123`; `-7d` -> `20261116-20261123` (the last 7 days up to today);
    `-1d..+1d` -> `20261122-20261124`. Plain DICOM dates and ranges pass through unchanged.
    """
    value = value.strip()
    if ".." in value:
        lo_s, hi_s = value.split("..", 1)
        lo, hi = _relative_day(lo_s, today), _relative_day(hi_s, today)
        if lo is None or hi is None:
            raise ValueError(f"expected a relative range like -1d..+1d, got {value!r}")
        return f"{lo:%Y%m%d}-{hi:%Y%m%d}"
    if value.startswith("-") and _REL_DAY_RE.match(value):
        lo = _relative_day(value, today)
        assert lo is not None
        return f"{lo:%Y%m%d}-{today:%Y%m%d}"
    day = _relative_day(value, today)
    if day is None:
        raise ValueError(f"expected today, -7d or -1d..+1d, got {value!r}")
    return f"{day:%Y%m%d}"
