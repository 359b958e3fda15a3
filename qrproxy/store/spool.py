"""The durable spool: files under spool/objects/, written Postfix-style.

The state of a file is where it is: `incoming/` holds bytes nobody has been promised anything about;
`objects/` holds instances that were fsynced, atomically renamed and whose directory was fsynced.
A C-STORE is acknowledged only after that and the index commit (scp/store.py). On start, anything
left in `incoming/` belonged to an association that never got Success, so it is deleted.

File names are random UUIDs, never UIDs from the peer: a SOP Instance UID of `../../x` cannot
choose where bytes land.

With `encryption.key_file` every file here is encrypted (crypto.py): received files as the
association writes them (scp/store.IncomingFile), converted copies as codec.py writes them.
Everything that reads a spool file goes through `Spool.open` / `open_plain`, which gives the plaintext
of an encrypted file and a plain file (written before encryption was configured) as it is. Sizes and
SHA-256 digests are of the plaintext, so an identical re-send is recognised whatever the keys.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import dcmread as _pydicom_dcmread
from pydicom.dataset import Dataset

from qrproxy.store.crypto import KeySource, open_noatime, open_reader, open_writer, verify_file

log = logging.getLogger("qrproxy.spool")

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Committed:
    relpath: str
    size: int
    sha256: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The keys of the one spool a process serves (Spool() with keys sets them): read by `open_plain` and
# `dcmread` below, which code holding only a path uses (the forwarder, the C-STORE send path).
_process_keys: KeySource | None = None


def open_plain(path: str | os.PathLike[str]) -> BinaryIO:
    """The plaintext of a spool file (decrypted when encrypted), with this process's keys."""
    return open_reader(path, _process_keys)


def dcmread(path: str | os.PathLike[str], **kwargs: Any) -> Dataset:
    """pydicom's dcmread of a spool file, through decryption. Values are read while the file is open
    (no deferred reads: they would reopen the path and read ciphertext)."""
    kwargs.pop("defer_size", None)
    with open_plain(path) as f:
        return _pydicom_dcmread(f, **kwargs)


def hash_file(path: Path, keys: KeySource | None = None) -> tuple[int, str]:
    """(plaintext size, SHA-256 of the plaintext); authenticates every chunk of an encrypted file."""
    h = hashlib.sha256()
    size = 0
    with open_reader(path, keys) as f:
        while True:
            block = f.read(CHUNK)
            if not block:
                break
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_and_fsync(path: Path) -> tuple[int, str]:
    """(size, SHA-256) of a plaintext file, then fsync it: both off the receiving thread (hashlib and
    the reads release the GIL), overlapping the parse and routing of the same instance."""
    h = hashlib.sha256()
    size = 0
    fd = open_noatime(path)
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as f:
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                h.update(view[:n])
                size += n
        os.fsync(fd)
    finally:
        os.close(fd)
    return size, h.hexdigest()


class Spool:
    def __init__(self, root: Path, keys: KeySource | None = None):
        global _process_keys
        self.root = Path(root)
        self.keys = keys
        if keys is not None:
            _process_keys = keys
        self.incoming = self.root / "incoming"
        self.objects = self.root / "objects"
        self.variants = self.root / "variants"  # converted copies per transfer syntax: a cache
        self._objects_real: Path | None = None

    def prepare(self) -> int:
        """Create the folders and sweep `incoming/`; returns how many leftovers were removed."""
        for d in (self.root, self.incoming, self.objects, self.variants):
            d.mkdir(parents=True, exist_ok=True)
        # the 256 fan-out folders made once, durably, so that no C-STORE pays for a mkdir and an
        # fsync of objects/ (it did for the first ~256 instances a spool received)
        missing = [self.objects / f"{i:02x}" for i in range(256) if not (self.objects / f"{i:02x}").is_dir()]
        for fan in missing:
            fan.mkdir(exist_ok=True)
        if missing:
            fsync_dir(self.objects)
        removed = 0
        for leftover in self.incoming.iterdir():
            try:
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                else:
                    leftover.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove incoming leftover %s: %s", leftover, exc)
        if removed:
            log.info("event=spool-sweep removed=%d reason=\"partial files of unacknowledged transfers\"", removed)
        return removed

    @property
    def encrypted(self) -> bool:
        return self.keys is not None

    def open(self, path: str | os.PathLike[str]) -> BinaryIO:
        """The plaintext of a spool file: seekable, usable by dcmread(defer_size=...) while open."""
        return open_reader(path, self.keys)

    def verify(self, path: str | os.PathLike[str]) -> None:
        """Raise crypto.AuthenticationError if any chunk of an encrypted file fails its tag, and
        crypto.UnknownKeyError for an encrypted file when no key file is configured (a spool that
        was encrypted, then the key file dropped from the config): never send ciphertext."""
        verify_file(path, self.keys)

    def hash(self, path: Path) -> tuple[int, str]:
        return hash_file(path, self.keys)

    def open_incoming_writer(self, suffix: str = ".dcm") -> BinaryIO:
        """A new file in incoming/ (mode 0600) that encrypts what is written to it; its `path`
        attribute names it. Where a received data set is written when encryption is on."""
        path = self.new_incoming(suffix)
        return open_writer(path, self.keys, exclusive=True)

    def new_incoming(self, suffix: str = ".part") -> Path:
        return self.incoming / f"{uuid.uuid4().hex}{suffix}"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def path(self, relpath: str) -> Path:
        """The file of an index row. Checked lexically against the once-resolved objects/ folder:
        the names are the spool's own (fan/uuid), and resolving every component of every path cost
        ~15% of the forwarder's time per instance; a row that names '..' or an absolute path is
        refused all the same."""
        norm = os.path.normpath(relpath)
        if os.path.isabs(norm) or norm in (os.curdir, os.pardir) or norm.startswith(os.pardir + os.sep):
            raise ValueError(f"spool path escapes the spool: {relpath!r}")
        if self._objects_real is None:
            self._objects_real = self.objects.resolve()
        return self._objects_real / norm

    def reserve(self, suffix: str = ".dcm") -> tuple[str, Path]:
        """A fresh name in objects/ (its fan-out folder made durable): (relpath, absolute path)."""
        name = uuid.uuid4().hex
        fan = self.objects / name[:2]
        if not fan.is_dir():
            fan.mkdir(exist_ok=True)
            fsync_dir(self.objects)
        return f"{name[:2]}/{name}{suffix}", fan / f"{name}{suffix}"

    def place(self, src: Path, dest: Path) -> None:
        """Atomically move an already fsynced file to its reserved name and make the move durable."""
        os.rename(src, dest)
        fsync_dir(dest.parent)

    def commit(self, src: Path, suffix: str = ".dcm") -> Committed:
        """fsync `src`, rename it into objects/<xx>/<uuid><suffix>, fsync the directory.

        `src` must be on the same filesystem (it is: incoming/ is inside the spool), so the rename is
        atomic: after a crash the file is either whole in objects/ or still in incoming/.
        """
        size, digest = self.hash(src)
        fsync_file(src)
        relpath, dest = self.reserve(suffix)
        self.place(src, dest)
        return Committed(relpath=relpath, size=size, sha256=digest)

    def variant_path(self, relpath: str, transfer_syntax: str) -> Path:
        self.path(relpath)  # same containment check as the original
        return self.variants / f"{relpath}.{transfer_syntax}.dcm"

    def remove(self, relpath: str) -> None:
        """Remove a spool file and every converted copy of it."""
        try:
            self.path(relpath).unlink()
        except FileNotFoundError:
            pass
        fan, name = relpath.split("/", 1)
        for v in (self.variants / fan).glob(f"{name}.*.dcm"):
            v.unlink(missing_ok=True)
