"""Logging set-up: one line per event, `key=value` fields, UTC timestamps, stderr and optionally a file.

Site engineers grep logs; a fixed `key=value` layout keeps `grep calling=CT1` working.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path


class _UTCFormatter(logging.Formatter):
    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        t = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{t}.{int(record.msecs):03d}Z"


FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class RotatingWatchedFileHandler(logging.handlers.WatchedFileHandler):
    """Size-based rotation (`log.max_size`, `log.backups`) that several processes can share.

    Why not RotatingFileHandler: with `workers: N` every worker process appends to the same file, and
    RotatingFileHandler rotates per process from its own idea of the size, so workers rename each
    other's files and keep writing into rotated ones. Here each line is written under an exclusive
    flock on the log's directory: the writer reopens the file if another process moved it (as
    WatchedFileHandler does after logrotate), checks the real size with fstat, rotates if the line
    would cross `max_bytes`, and writes the whole line, so lines never interleave or split across
    files. A process still using plain WatchedFileHandler follows the rotation at its next line.
    """

    def __init__(self, filename: Path, max_bytes: int, backups: int):
        super().__init__(filename, encoding="utf-8")
        self.max_bytes = max_bytes
        self.backups = backups
        self._dir = os.path.dirname(self.baseFilename) or "."

    def _rotate(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None  # type: ignore[assignment]
        for i in range(self.backups - 1, 0, -1):
            src = f"{self.baseFilename}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{self.baseFilename}.{i + 1}")
        os.replace(self.baseFilename, f"{self.baseFilename}.1")
        self.stream = self._open()
        self._statstream()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record) + self.terminator
            dir_fd = os.open(self._dir, os.O_RDONLY)
            try:
                fcntl.flock(dir_fd, fcntl.LOCK_EX)
                self.reopenIfNeeded()
                if self.stream is None:
                    self.stream = self._open()
                    self._statstream()
                self.stream.flush()
                size = os.fstat(self.stream.fileno()).st_size
                if self.max_bytes > 0 and size > 0 and size + len(msg.encode("utf-8")) > self.max_bytes:
                    self._rotate()
                logging.FileHandler.emit(self, record)  # writes and flushes the line
            finally:
                os.close(dir_fd)  # releases the flock
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def setup_logging(level: str = "INFO", file: Path | None = None, dicom_debug: bool = False,
                  max_size: int = 0, backups: int = 5) -> None:
    """stderr always; `file` too when given: rotated at `max_size` bytes keeping `backups` old files,
    or with `max_size` 0 reopened whenever it is moved (logrotate without copytruncate)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    fmt = _UTCFormatter(FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        if max_size > 0:
            handlers.append(RotatingWatchedFileHandler(file, max_size, backups))
        else:
            # WatchedFileHandler reopens after logrotate moves the file.
            handlers.append(logging.handlers.WatchedFileHandler(file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(fmt)
        root.addHandler(h)
    root.setLevel(level)
    # one line per negotiated context and per DIMSE message (qrproxy/net/association.py) when asked
    # for; pynetdicom itself only runs in tests and tools, and stays quiet.
    logging.getLogger("qrproxy.dicom").setLevel("DEBUG" if dicom_debug else "WARNING")
    logging.getLogger("pynetdicom").setLevel("WARNING")
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
