"""Encryption at rest of spool files: AES-256-GCM in chunks, streamable both ways.

Why chunks: a spool file can be a 1 GB multi-frame instance, and one GCM message would have to be held
(or at least authenticated) whole before a single byte could be trusted. Each chunk here is its own
GCM message, authenticated as it is read, so the file is written and read in constant memory and a
reader can seek (pydicom's ``defer_size`` skips pixel data and comes back for it later).

File layout (all integers big-endian)::

    header  = MAGIC (8) | version (1) | log2(chunk size) (1) | key id length (1) | key id | nonce base (12)
    body    = chunk 0 | chunk 1 | ... | chunk n-1        n >= 1, every chunk = ciphertext | GCM tag (16)

- every chunk holds `chunk size` plaintext bytes except the last, which holds 0..chunk size (an empty
  file still has one, empty, final chunk, so cutting a file down to its header is detected);
- each file has its own AES key, HKDF-SHA256(master key, salt = nonce base): nonces never repeat
  across files, and a chunk moved from another file cannot authenticate;
- the nonce of chunk i is nonce base XOR (i as 11 bytes | final flag as 1 byte), so reordering,
  dropping chunks, truncating at a chunk boundary (the new last chunk was not written as final) and
  appending (the old final chunk is no longer last) all fail authentication;
- the whole header is the associated data of every chunk: a changed key id or version fails too.

The plaintext size follows from the file size alone, so `seek(0, SEEK_END)` needs no reading.

Everything here is pure: callers pass the keys (see `KeySource`; qrproxy/keys.py reads the key file).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"QRPXENC\x00"
VERSION = 1
CHUNK_LOG2 = 16  # 64 KiB of plaintext per chunk: 0.02 % overhead, small enough for cheap seeks
TAG_LEN = 16
NONCE_LEN = 12
KEY_LEN = 32  # AES-256
_HKDF_INFO = b"qrproxy spool file key v1"
_MIN_CHUNK_LOG2, _MAX_CHUNK_LOG2 = 10, 26


class CryptoError(Exception):
    """A spool file cannot be decrypted. Deliberately not an OSError/ValueError: callers that treat
    those as "disk full" or "bad data from the peer" must not mistake a damaged file for them."""


class AuthenticationError(CryptoError):
    """A chunk failed its GCM tag: the file was changed, truncated or extended after it was written."""


class UnknownKeyError(CryptoError):
    """The file names a key id the key file does not hold."""


class FormatError(CryptoError):
    """Not an encrypted spool file of a version this code reads."""


class KeySource(Protocol):
    """Where keys come from: the current key for new files, any key by id for reading."""

    def current(self) -> tuple[str, bytes]: ...

    def key(self, key_id: str) -> bytes: ...


@dataclass(frozen=True)
class StaticKeys:
    """A fixed set of keys (tests, the conversion pool): {id: 32-byte key}, `current_id` for writing."""

    keys: dict[str, bytes]
    current_id: str

    def current(self) -> tuple[str, bytes]:
        return self.current_id, self.keys[self.current_id]

    def key(self, key_id: str) -> bytes:
        try:
            return self.keys[key_id]
        except KeyError:
            raise UnknownKeyError(f"spool file is encrypted under key {key_id!r}, which the key file "
                                  f"does not hold") from None


@dataclass(frozen=True)
class Header:
    version: int
    chunk_size: int
    key_id: str
    nonce_base: bytes
    raw: bytes

    @property
    def nonce_int(self) -> int:
        return int.from_bytes(self.nonce_base, "big")

    @staticmethod
    def new(key_id: str, chunk_log2: int = CHUNK_LOG2) -> Header:
        kid = key_id.encode("ascii")
        if not 1 <= len(kid) <= 255:
            raise ValueError("a key id has 1 to 255 ASCII characters")
        nonce_base = os.urandom(NONCE_LEN)
        raw = MAGIC + bytes([VERSION, chunk_log2, len(kid)]) + kid + nonce_base
        return Header(VERSION, 1 << chunk_log2, key_id, nonce_base, raw)

    @property
    def size(self) -> int:
        return len(self.raw)


def read_header(f: BinaryIO) -> Header | None:
    """The header at the start of `f` (position left after it), or None (position 0) when `f` does
    not start with MAGIC, i.e. is a plain file written before encryption was configured."""
    start = f.read(len(MAGIC) + 3)
    if len(start) < len(MAGIC) or start[: len(MAGIC)] != MAGIC:
        f.seek(0)
        return None
    if len(start) < len(MAGIC) + 3:
        raise FormatError("encrypted spool file: header truncated")
    version, log2, kid_len = start[len(MAGIC):]
    if version != VERSION:
        raise FormatError(f"encrypted spool file of format version {version}; this qrproxy reads {VERSION}")
    if not _MIN_CHUNK_LOG2 <= log2 <= _MAX_CHUNK_LOG2 or kid_len == 0:
        raise FormatError("encrypted spool file: header damaged")
    rest = f.read(kid_len + NONCE_LEN)
    if len(rest) != kid_len + NONCE_LEN:
        raise FormatError("encrypted spool file: header truncated")
    try:
        key_id = rest[:kid_len].decode("ascii")
    except UnicodeDecodeError:
        raise FormatError("encrypted spool file: header damaged (key id)") from None
    return Header(version, 1 << log2, key_id, rest[kid_len:], start + rest)


def peek_header(path: str | os.PathLike[str]) -> Header | None:
    """The header of the file at `path`, None for a plain file."""
    with open(path, "rb") as f:
        return read_header(f)


def is_encrypted(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def _file_cipher(master: bytes, header: Header) -> AESGCM:
    if len(master) != KEY_LEN:
        raise ValueError(f"an AES-256 key has {KEY_LEN} bytes, not {len(master)}")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_LEN, salt=header.nonce_base, info=_HKDF_INFO)
    return AESGCM(hkdf.derive(master))


def _nonce(base: int, index: int, final: bool) -> bytes:
    """nonce base XOR (index as 11 bytes | final flag as 1 byte); `base` as a big-endian integer."""
    return (base ^ ((index << 8) | int(final))).to_bytes(NONCE_LEN, "big")


def plain_size(file_size: int, header: Header) -> tuple[int, int]:
    """(plaintext size, number of chunks) of an encrypted file of `file_size` bytes."""
    body = file_size - header.size
    if body < TAG_LEN:
        raise AuthenticationError("spool file failed authentication: truncated (no complete chunk)")
    stride = header.chunk_size + TAG_LEN
    n = -(-body // stride)
    last = body - (n - 1) * stride
    if last < TAG_LEN:
        # The last chunk is shorter than its tag: bytes were cut off. Name the chunk for the log.
        raise AuthenticationError(f"spool file failed authentication: chunk {n - 1} truncated")
    return body - n * TAG_LEN, n


class EncryptingWriter(io.RawIOBase):
    """A write-only binary file that encrypts as it goes; `close()` writes the final chunk.

    At most one chunk of plaintext is held. A full chunk is written out only when more data arrives,
    so the chunk in hand at `close()` is the final one (possibly full, possibly empty).
    Closing does not fsync: the caller decides when durability is needed (`fsync()`).
    """

    def __init__(self, raw: BinaryIO, keys: KeySource, *, close_raw: bool = True,
                 chunk_log2: int = CHUNK_LOG2, name: str | None = None):
        super().__init__()
        key_id, master = keys.current()
        self._raw = raw
        self._close_raw = close_raw
        self.header = Header.new(key_id, chunk_log2)
        self._aead = _file_cipher(master, self.header)
        self._nonce_base = self.header.nonce_int
        self._buf = bytearray()
        self._index = 0
        self._written = 0
        self.path = name
        raw.write(self.header.raw)

    def writable(self) -> bool:
        return True

    def _encrypt(self, data: Any, final: bool) -> None:
        self._raw.write(self._aead.encrypt(_nonce(self._nonce_base, self._index, final), data, self.header.raw))
        self._index += 1

    def _emit(self, final: bool) -> None:
        self._encrypt(self._buf, final)
        self._buf.clear()

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed EncryptingWriter")
        mv = memoryview(b).cast("B")
        n, pos, size = len(mv), 0, self.header.chunk_size
        if self._buf:  # complete the chunk in hand first
            take = min(size - len(self._buf), n)
            self._buf += mv[:take]
            pos = take
            if pos < n:  # more follows, so the chunk in hand is not the last
                self._emit(final=False)
        while n - pos > size:  # whole chunks straight from the caller's buffer, never the last one
            self._encrypt(mv[pos:pos + size], final=False)
            pos += size
        if pos < n:
            self._buf += mv[pos:]
        self._written += n
        return n

    def tell(self) -> int:
        return self._written

    def flush(self) -> None:
        # A partial chunk cannot be written before the writer knows whether it is the last one.
        if not self.closed:
            self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def fsync(self) -> None:
        self._raw.flush()
        os.fsync(self._raw.fileno())

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._emit(final=True)
            self._raw.flush()
        finally:
            super().close()
            if self._close_raw:
                self._raw.close()

    def abandon(self) -> None:
        """Close without writing the final chunk (the file is then unreadable by design)."""
        if not self.closed:
            super().close()
            if self._close_raw:
                self._raw.close()


class DecryptingReader(io.RawIOBase):
    """A seekable, read-only view of the plaintext of an encrypted file, one chunk decrypted at a time.

    Every byte returned comes from a chunk whose tag was checked; a failing chunk raises
    AuthenticationError naming it. Deliberately has no `name` attribute: pydicom would otherwise
    reopen the path with the builtin open() for deferred values and read ciphertext.
    """

    def __init__(self, raw: BinaryIO, keys: KeySource, *, close_raw: bool = True,
                 header: Header | None = None, file_size: int | None = None):
        super().__init__()
        self._raw = raw
        self._close_raw = close_raw
        if header is None:
            raw.seek(0)
            header = read_header(raw)
            if header is None:
                raise FormatError("not an encrypted spool file")
        self.header = header
        self._aead = _file_cipher(keys.key(header.key_id), header)
        self._nonce_base = header.nonce_int
        if file_size is None:
            file_size = raw.seek(0, io.SEEK_END)
        self.size, self.chunks = plain_size(file_size, header)
        self._pos = 0
        self._chunk_index = -1
        self._chunk = b""

    @property
    def key_id(self) -> str:
        return self.header.key_id

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            pos = offset
        elif whence == io.SEEK_CUR:
            pos = self._pos + offset
        elif whence == io.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def _load(self, index: int) -> bytes:
        if index == self._chunk_index:
            return self._chunk
        size = self.header.chunk_size
        stride = size + TAG_LEN
        self._raw.seek(self.header.size + index * stride)
        final = index == self.chunks - 1
        want = (self.size - index * size + TAG_LEN) if final else stride
        ct = self._raw.read(want)
        if len(ct) != want:
            raise AuthenticationError(f"spool file failed authentication: chunk {index} truncated")
        try:
            pt = self._aead.decrypt(_nonce(self._nonce_base, index, final), ct, self.header.raw)
        except InvalidTag:
            raise AuthenticationError(f"spool file failed authentication: chunk {index}") from None
        self._chunk_index, self._chunk = index, pt
        return pt

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        end = self.size if size is None or size < 0 else min(self.size, self._pos + size)
        if self._pos >= end:
            return b""
        csize = self.header.chunk_size
        parts = []
        pos = self._pos
        while pos < end:
            index, off = divmod(pos, csize)
            chunk = self._load(index)
            piece = chunk[off:off + (end - pos)]
            parts.append(piece)
            pos += len(piece)
        self._pos = pos
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[:len(data)] = data
        return len(data)

    def chunks_iter(self) -> Iterator[bytes]:
        """Every chunk's plaintext in order (authenticating each), from the start."""
        for i in range(self.chunks):
            yield self._load(i)

    def verify(self) -> None:
        """Authenticate every chunk (raises AuthenticationError); the position is unchanged."""
        for _ in self.chunks_iter():
            pass

    def close(self) -> None:
        if not self.closed:
            super().close()
            self._chunk = b""
            if self._close_raw:
                self._raw.close()


# --- helpers on paths ------------------------------------------------------------------------------


_NOATIME = getattr(os, "O_NOATIME", 0)


def open_noatime(path: str | os.PathLike[str]) -> int:
    """A read-only descriptor that leaves the access time alone. Reading a file just written (to
    parse or hash it) would otherwise update its atime (relatime), and on ext4 that metadata update
    waits for the journal commit another thread's fsync has started: 0.6 ms per received instance,
    measured. O_NOATIME is refused for files qrproxy does not own (EPERM): then a plain open."""
    if _NOATIME:
        try:
            return os.open(path, os.O_RDONLY | _NOATIME)
        except PermissionError:
            pass
    return os.open(path, os.O_RDONLY)


def open_reader(path: str | os.PathLike[str], keys: KeySource | None) -> BinaryIO:
    """The plaintext of `path`: a DecryptingReader for an encrypted file, the file itself for a plain
    one (written before encryption was configured). An encrypted file without keys is an error."""
    f = os.fdopen(open_noatime(path), "rb")
    try:
        header = read_header(f)
        if header is None:
            return f
        if keys is None:
            raise UnknownKeyError("spool file is encrypted but no encryption.key_file is configured")
        size = os.fstat(f.fileno()).st_size
        return DecryptingReader(f, keys, header=header, file_size=size)  # type: ignore[return-value]
    except BaseException:
        f.close()
        raise


def open_writer(path: str | os.PathLike[str], keys: KeySource | None, *, exclusive: bool = False) -> BinaryIO:
    """A new file at `path` (mode 0600), encrypting when `keys` is given."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    raw = os.fdopen(fd, "wb")
    if keys is None:
        return raw
    try:
        return EncryptingWriter(raw, keys, name=os.fspath(path))  # type: ignore[return-value]
    except BaseException:
        raw.close()
        raise


def verify_file(path: str | os.PathLike[str], keys: KeySource | None) -> None:
    """Authenticate every chunk of an encrypted file; nothing to check for a plain one."""
    with open_reader(path, keys) as f:
        if isinstance(f, DecryptingReader):
            f.verify()


def copy_plaintext(src: BinaryIO, dst: BinaryIO, block: int = 1 << 20) -> int:
    """Stream `src` to `dst` in blocks; returns the number of bytes copied."""
    n = 0
    while True:
        data = src.read(block)
        if not data:
            return n
        dst.write(data)
        n += len(data)


__all__ = [
    "AuthenticationError", "CryptoError", "DecryptingReader", "EncryptingWriter", "FormatError", "Header",
    "KeySource", "StaticKeys", "UnknownKeyError", "copy_plaintext", "is_encrypted", "open_reader",
    "open_writer", "peek_header", "plain_size", "read_header", "verify_file",
]
