"""The spool key file and the `qrproxy keys` commands: new, rotate, list, reencrypt.

The key file is JSON, mode 0600, written atomically (temp file, fsync, rename/link, fsync folder)::

    {"format": "qrproxy-spool-keys", "version": 1, "current": "k2",
     "keys": [{"id": "k1", "created": "2026-11-23T15:39:14Z", "key": "<base64 of 32 bytes>"},
              {"id": "k2", "created": "2026-12-01T09:00:00Z", "key": "..."}]}

Keys are never removed by qrproxy: a file is readable as long as the key named in its header is in
the key file. `rotate` adds a key and makes it current; new spool files use it at once (a running
proxy notices the changed key file within a second, and reloads it when it meets an unknown key id),
old files stay readable. `reencrypt` rewrites files under older keys (and plain files written before
encryption was configured) with the current key, one file at a time, each atomically (temp file,
fsync, rename, fsync folder): it can be killed and run again, and a second run finds nothing to do.
Only then may an operator delete an old key from the file by hand.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrproxy.logs import kv
from qrproxy.store.crypto import (KEY_LEN, CryptoError, UnknownKeyError, copy_plaintext, open_reader, open_writer,
                                  peek_header)
from qrproxy.store.spool import fsync_dir

log = logging.getLogger("qrproxy.keys")

FORMAT = "qrproxy-spool-keys"
KEY_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
TMP_SUFFIX = ".reenc.tmp"
RELOAD_EVERY = 1.0  # seconds between checks of the key file for a rotation by another process


class KeyFileError(Exception):
    """The key file is missing, unreadable, too open, or not a key file: the message says which."""


@dataclass
class KeyEntry:
    id: str
    created: str
    key: bytes


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def check_mode(path: Path, st: os.stat_result) -> str | None:
    if not stat.S_ISREG(st.st_mode):
        return f"key file {path} is not a regular file"
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        return (f"key file {path} has mode {mode:04o}: it must not be readable or writable by group or "
                f"others (chmod 600 {path})")
    return None


def parse(text: str, path: Path) -> tuple[list[KeyEntry], str]:
    """(entries, current id) from the key file's text; KeyFileError saying what is wrong."""
    def bad(why: str) -> KeyFileError:
        return KeyFileError(f"key file {path} is not a valid qrproxy key file: {why}")

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"'format' is not {FORMAT!r}")
    if data.get("version") != 1:
        raise bad(f"unsupported version {data.get('version')!r}")
    entries: list[KeyEntry] = []
    for i, item in enumerate(data.get("keys") or []):
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not KEY_ID_RE.match(item["id"]):
            raise bad(f"keys[{i}]: 'id' must be 1-64 of A-Z a-z 0-9 . _ -")
        try:
            raw = base64.b64decode(str(item.get("key", "")), validate=True)
        except ValueError:
            raise bad(f"keys[{i}] ({item['id']}): 'key' is not base64") from None
        if len(raw) != KEY_LEN:
            raise bad(f"keys[{i}] ({item['id']}): 'key' has {len(raw)} bytes, AES-256 needs {KEY_LEN}")
        if any(e.id == item["id"] for e in entries):
            raise bad(f"keys[{i}]: duplicate id {item['id']!r}")
        entries.append(KeyEntry(item["id"], str(item.get("created", "")), raw))
    if not entries:
        raise bad("no keys")
    current = data.get("current")
    if not any(e.id == current for e in entries):
        raise bad(f"'current' ({current!r}) is not one of the keys")
    return entries, str(current)


def render(entries: list[KeyEntry], current: str) -> str:
    return json.dumps({
        "format": FORMAT, "version": 1, "current": current,
        "keys": [{"id": e.id, "created": e.created, "key": base64.b64encode(e.key).decode("ascii")}
                 for e in entries],
    }, indent=1) + "\n"


def read_key_file(path: Path) -> tuple[list[KeyEntry], str, tuple[int, int, int]]:
    """Entries, current id and a stamp (inode, mtime, size) to notice a later change."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"key file {path} does not exist (create it with 'qrproxy keys new')") from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        st = os.fstat(f.fileno())
        problem = check_mode(path, st)
        if problem:
            raise KeyFileError(problem)
        try:
            text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc}") from None
    entries, current = parse(text, path)
    return entries, current, (st.st_ino, st.st_mtime_ns, st.st_size)


class Keyring:
    """The keys of a key file, as a crypto.KeySource. Picks up a rotation made by another process:
    `current()` re-reads the file when it changed (checked at most every RELOAD_EVERY seconds), and
    `key()` re-reads it once before reporting an unknown key id."""

    def __init__(self, path: Path):
        self.path = Path(path)
        entries, self.current_id, self._stamp = read_key_file(self.path)
        self._keys = {e.id: e.key for e in entries}
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # sent to the conversion processes
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _reload(self, force: bool) -> None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked < RELOAD_EVERY:
                return
            self._checked = now
            try:
                st = os.stat(self.path)
                if not force and (st.st_ino, st.st_mtime_ns, st.st_size) == self._stamp:
                    return
                entries, current, stamp = read_key_file(self.path)
            except (OSError, KeyFileError) as exc:
                log.warning(kv(event="key-file-reload-failed", path=self.path, reason=str(exc),
                               action="keeping the keys already loaded"))
                return
            if current != self.current_id:
                log.info(kv(event="key-rotated", current=current, previous=self.current_id))
            self._keys = {e.id: e.key for e in entries} | {k: v for k, v in self._keys.items()
                                                           if k not in {e.id for e in entries}}
            self.current_id, self._stamp = current, stamp

    def current(self) -> tuple[str, bytes]:
        self._reload(force=False)
        return self.current_id, self._keys[self.current_id]

    def key(self, key_id: str) -> bytes:
        k = self._keys.get(key_id)
        if k is None:
            self._reload(force=True)
            k = self._keys.get(key_id)
        if k is None:
            raise UnknownKeyError(f"spool file is encrypted under key {key_id!r}, which key file "
                                  f"{self.path} does not hold")
        return k

    def ids(self) -> list[str]:
        return list(self._keys)


def load(path: Path) -> Keyring:
    return Keyring(path)


def check_key_file(path: Path) -> str | None:
    """Why `path` cannot serve as the key file, or None."""
    try:
        read_key_file(path)
    except KeyFileError as exc:
        return str(exc)
    return None


# --- writing the key file --------------------------------------------------------------------------


def _write_tmp(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _new_entry(existing: list[KeyEntry]) -> KeyEntry:
    n = len(existing) + 1
    ids = {e.id for e in existing}
    while f"k{n}" in ids:
        n += 1
    return KeyEntry(f"k{n}", _now(), os.urandom(KEY_LEN))


def new_key_file(path: Path) -> str:
    """Create the key file with one key (mode 0600); refuse if it exists. Returns the key id."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"key file {path} already exists: not overwriting it (files encrypted with "
                              f"its keys would become unreadable); use 'qrproxy keys rotate' for a new key")
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = _new_entry([])
    tmp = _write_tmp(path, render([entry], entry.id))
    try:
        os.link(tmp, path)  # fails if the path appeared meanwhile: never overwrites
    except FileExistsError:
        raise FileExistsError(f"key file {path} already exists: not overwriting it") from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return entry.id


def rotate(path: Path) -> str:
    """Add a key and make it current; every older key stays. Returns the new key id."""
    path = Path(path)
    entries, _current, _stamp = read_key_file(path)
    entry = _new_entry(entries)
    tmp = _write_tmp(path, render(entries + [entry], entry.id))
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return entry.id


def list_keys(path: Path) -> tuple[list[KeyEntry], str]:
    entries, current, _ = read_key_file(Path(path))
    return entries, current


# --- re-encryption of the spool ----------------------------------------------------------------


@dataclass
class ReencryptStats:
    examined: int = 0
    current: int = 0
    rewritten: int = 0
    encrypted_plain: int = 0
    leftovers_removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _rewrite(path: Path, keys: Keyring) -> bool:
    """Re-encrypt one file under the current key, atomically. False when it vanished meanwhile."""
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        with open_reader(path, keys) as src, open_writer(tmp, keys, exclusive=True) as dst:
            copy_plaintext(src, dst)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if not path.exists():  # removed meanwhile (a superseded copy, a dropped variant): do not resurrect
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def reencrypt(spool_root: Path, keys: Keyring, progress: Callable[[ReencryptStats], None] | None = None
              ) -> ReencryptStats:
    """Rewrite every spool file (objects/ and variants/) not under the current key. Files that fail
    authentication are left as they are and listed in `failed`."""
    stats = ReencryptStats()
    current_id, _ = keys.current()
    for folder in (Path(spool_root) / "objects", Path(spool_root) / "variants"):
        if not folder.is_dir():
            continue
        for dirpath, _dirs, files in os.walk(folder):
            for name in sorted(files):
                p = Path(dirpath) / name
                if name.endswith(TMP_SUFFIX):  # left by a run that was killed
                    p.unlink(missing_ok=True)
                    stats.leftovers_removed += 1
                    continue
                if not name.endswith(".dcm"):
                    continue
                stats.examined += 1
                try:
                    header = peek_header(p)
                    if header is not None and header.key_id == current_id:
                        stats.current += 1
                        continue
                    if _rewrite(p, keys):
                        stats.rewritten += 1
                        if header is None:
                            stats.encrypted_plain += 1
                        log.info(kv(event="reencrypted", file=p.relative_to(spool_root),
                                    from_key=header.key_id if header else "plain", to_key=current_id))
                except FileNotFoundError:
                    continue
                except (CryptoError, OSError) as exc:
                    stats.failed.append((str(p.relative_to(spool_root)), str(exc)))
                    log.error(kv(event="reencrypt-failed", file=p.relative_to(spool_root), reason=str(exc)))
                finally:
                    if progress is not None:  # every file; the caller throttles (qrproxy/progress.py)
                        progress(stats)
    return stats


def count_spool_files(spool_root: Path) -> int:
    """How many files `reencrypt` will examine: the total for its progress line."""
    n = 0
    for folder in (Path(spool_root) / "objects", Path(spool_root) / "variants"):
        for _dirpath, _dirs, files in os.walk(folder):
            n += sum(1 for name in files if name.endswith(".dcm"))
    return n
