"""Logging set-up: one line per event, `key=value` fields, UTC timestamps, stderr and optionally a file.

Site engineers grep logs; a fixed `key=value` layout keeps `grep calling=CT1` working.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time
from pathlib import Path


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{t}.{int(record.msecs):03d}Z"


FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def setup_logging(level: str = "INFO", file: Path | None = None, dicom_debug: bool = False) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = _UTCFormatter(FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        # WatchedFileHandler reopens after logrotate moves the file.
        handlers.append(logging.handlers.WatchedFileHandler(file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; that is noise unless asked for, and it costs time.
    logging.getLogger("pynetdicom").setLevel("DEBUG" if dicom_debug else "WARNING")
    logging.getLogger("apscheduler").setLevel("WARNING")
    logging.getLogger("alembic").setLevel("WARNING")


def kv(**fields: object) -> str:
    """`a=1 b="two words"`: quote values that contain spaces so the line still splits on spaces."""
    parts = []
    for k, v in fields.items():
        s = "" if v is None else str(v)
        if not s or any(c in s for c in ' "='):
            s = '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{k}={s}")
    return " ".join(parts)
