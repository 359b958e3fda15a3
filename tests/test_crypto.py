"""Unit tests of the spool encryption format (qrproxy/crypto.py) and the key file (qrproxy/keys.py).

No DICOM network here: these check the file format itself against independently made plaintext,
and that every kind of tampering a disk or a person can do is detected (the real-peer tests are in
test_encryption.py).
"""

from __future__ import annotations

import io
import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from qrproxy.store import crypto, keys
from qrproxy.store.crypto import (
    AuthenticationError, DecryptingReader, EncryptingWriter, FormatError, StaticKeys, UnknownKeyError,
)

K1 = StaticKeys({"k1": bytes(range(32))}, "k1")
SMALL = 10  # 1 KiB chunks: many chunks from little data
TAG = crypto.TAG_LEN


def encrypt(data: bytes, ks: StaticKeys = K1, log2: int = SMALL, pieces: int = 7) -> bytes:
    """Encrypt `data` written in uneven pieces (as pynetdicom writes P-DATA fragments)."""
    out = io.BytesIO()
    w = EncryptingWriter(out, ks, close_raw=False, chunk_log2=log2)
    rng = random.Random(len(data))
    pos = 0
    while pos < len(data):
        n = rng.randint(1, max(1, len(data) // pieces + 1))
        w.write(data[pos:pos + n])
        pos += n
    w.close()
    return out.getvalue()


def reader(blob: bytes, ks: StaticKeys = K1) -> DecryptingReader:
    return DecryptingReader(io.BytesIO(blob), ks)


def header_len(blob: bytes) -> int:
    return crypto.read_header(io.BytesIO(blob)).size  # type: ignore[union-attr]


@pytest.mark.parametrize("size", [0, 1, 1023, 1024, 1025, 3 * 1024 + 5, 8 * 1024])
def test_round_trip_and_random_seeks(size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data)
    r = reader(blob)
    assert r.size == size
    assert r.read() == data
    rng = random.Random(size)
    for _ in range(50):
        a = rng.randint(0, size + 3)
        n = rng.randint(0, 2100)
        assert r.seek(a) == a
        assert r.read(n) == data[a:a + n]
    assert r.seek(-min(8, size), io.SEEK_END) == size - min(8, size)
    assert r.read() == data[-min(8, size):] if size else r.read() == b""


def test_header_names_key_and_nonces_differ() -> None:
    data = b"same plaintext " * 200
    a, b = encrypt(data), encrypt(data)
    ha, hb = crypto.read_header(io.BytesIO(a)), crypto.read_header(io.BytesIO(b))
    assert ha is not None and hb is not None
    assert ha.key_id == "k1" and ha.version == crypto.VERSION and ha.chunk_size == 1 << SMALL
    assert ha.nonce_base != hb.nonce_base
    assert a[ha.size:] != b[hb.size:]  # a per-file key: equal plaintexts give unrelated ciphertexts
    assert b"same plaintext" not in a


def test_plain_files_are_read_as_they_are(tmp_path: Path) -> None:
    p = tmp_path / "plain.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"rest")
    assert crypto.peek_header(p) is None
    with crypto.open_reader(p, K1) as f:
        assert f.read() == p.read_bytes()


def _chunks(blob: bytes) -> tuple[bytes, list[bytes]]:
    h = header_len(blob)
    stride = (1 << SMALL) + TAG
    body = blob[h:]
    return blob[:h], [body[i:i + stride] for i in range(0, len(body), stride)]


def _fails(blob: bytes, ks: StaticKeys = K1) -> str:
    with pytest.raises((AuthenticationError, FormatError)) as exc:
        r = reader(blob, ks)
        r.verify()
        r.seek(0)
        r.read()
    return str(exc.value)


def test_a_flipped_byte_is_detected_in_every_chunk_and_named() -> None:
    data = os.urandom(5 * 1024 + 100)
    blob = encrypt(data)
    h = header_len(blob)
    stride = (1 << SMALL) + TAG
    for chunk in range(6):
        for where in (0, 17, -1):  # first byte, inside, last byte of the tag
            pos = h + chunk * stride + (where if where >= 0 else min(stride, len(blob) - h - chunk * stride) - 1)
            bad = bytearray(blob)
            bad[pos] ^= 0x01
            assert f"chunk {chunk}" in _fails(bytes(bad))
    # untouched chunks of a damaged file still read: only the bad one is refused
    bad = bytearray(blob)
    bad[h + 3 * stride + 5] ^= 0x80
    r = reader(bytes(bad))
    assert r.read(1024) == data[:1024]
    with pytest.raises(AuthenticationError, match="chunk 3"):
        r.seek(3 * 1024)
        r.read(10)


def test_header_changes_are_detected() -> None:
    blob = encrypt(os.urandom(3000))
    h = header_len(blob)
    for pos in range(len(crypto.MAGIC) + 3, h):  # key id and nonce base bytes
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        with pytest.raises(crypto.CryptoError):
            r = reader(bytes(bad), StaticKeys({"k1": K1.keys["k1"], "j1": K1.keys["k1"], "k0": K1.keys["k1"]},
                                              "k1"))
            r.verify()
    bad = bytearray(blob)
    bad[len(crypto.MAGIC)] = 9  # version
    with pytest.raises(FormatError, match="version 9"):
        reader(bytes(bad))


def test_truncation_reordering_swapping_and_appending_are_detected() -> None:
    data = os.urandom(4 * 1024 + 300)
    blob = encrypt(data)
    head, chunks = _chunks(blob)
    assert len(chunks) == 5
    # cut at a chunk boundary: the new last chunk was not written as final
    _fails(head + b"".join(chunks[:3]))
    # cut inside the last chunk, inside the tag, down to the header
    _fails(blob[:-1])
    _fails(blob[:-TAG + 3])
    _fails(head)
    _fails(head + chunks[0][:10])
    # reorder two full chunks
    _fails(head + chunks[1] + chunks[0] + b"".join(chunks[2:]))
    # drop a middle chunk
    _fails(head + chunks[0] + b"".join(chunks[2:]))
    # append: a copy of a chunk, or the final chunk again
    _fails(blob + chunks[1])
    _fails(head + b"".join(chunks[:4]) + chunks[4] + chunks[4])
    # swap a chunk with the same position of another file under the same key
    other = encrypt(os.urandom(len(data)))
    _, ochunks = _chunks(other)
    _fails(head + chunks[0] + ochunks[1] + b"".join(chunks[2:]))
    # the whole body of another file under this file's header
    _fails(head + other[header_len(other):])


def test_unknown_and_wrong_keys() -> None:
    blob = encrypt(b"x" * 2000)
    with pytest.raises(UnknownKeyError, match="'k1'"):
        reader(blob, StaticKeys({"k2": os.urandom(32)}, "k2"))
    with pytest.raises(AuthenticationError, match="chunk 0"):
        reader(blob, StaticKeys({"k1": os.urandom(32)}, "k1")).read()


def test_pydicom_reads_deferred_values_through_the_reader(tmp_path: Path) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.PatientName = "CRYPTO^UNIT"
    ds.Rows = ds.Columns = 256
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    pixels = np.random.default_rng(3).integers(0, 65535, size=(256, 256), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    plain = io.BytesIO()
    dcmwrite(plain, ds, enforce_file_format=True)
    path = tmp_path / "x.dcm"
    with crypto.open_writer(path, K1) as w:
        dcmwrite(w, ds, enforce_file_format=True)
    raw = path.read_bytes()
    assert b"CRYPTO^UNIT" not in raw and pixels.tobytes()[1000:1064] not in raw
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with crypto.open_reader(path, K1) as f:
        assert f.read() == plain.getvalue()
        f.seek(0)
        back = dcmread(f, defer_size=1024)
        assert back._dict[0x7FE00010].value is None  # deferred, then read through the reader
        assert np.array_equal(back.pixel_array, pixels)
        assert back.PatientName == "CRYPTO^UNIT"


# --- key file ------------------------------------------------------------------------------------


def test_key_file_new_is_0600_and_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "spool.key"
    kid = keys.new_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = json.loads(path.read_text())
    assert data["current"] == kid and len(data["keys"]) == 1
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        keys.new_key_file(path)
    assert path.read_bytes() == before
    assert keys.check_key_file(path) is None


def test_key_file_problems_are_named(tmp_path: Path) -> None:
    path = tmp_path / "spool.key"
    assert "does not exist" in (keys.check_key_file(path) or "")
    keys.new_key_file(path)
    path.chmod(0o644)
    assert "mode 0644" in (keys.check_key_file(path) or "")
    path.chmod(0o600)
    text = path.read_text()
    path.write_text(text.replace('"current": "k1"', '"current": "k9"'))
    assert "'current'" in (keys.check_key_file(path) or "")
    path.write_text("not json")
    assert "not JSON" in (keys.check_key_file(path) or "")


def test_rotate_keeps_old_keys_and_a_running_keyring_follows(tmp_path: Path) -> None:
    path = tmp_path / "spool.key"
    k1 = keys.new_key_file(path)
    ring = keys.load(path)
    old = io.BytesIO()
    with EncryptingWriter(old, ring, close_raw=False) as w:
        w.write(b"written under the first key")
    k2 = keys.rotate(path)
    assert k2 != k1 and stat.S_IMODE(path.stat().st_mode) == 0o600
    entries, current = keys.list_keys(path)
    assert [e.id for e in entries] == [k1, k2] and current == k2
    ring._checked -= keys.RELOAD_EVERY + 1  # as if a second had passed
    assert ring.current()[0] == k2
    assert DecryptingReader(io.BytesIO(old.getvalue()), ring).read() == b"written under the first key"
    # a keyring loaded before the rotation meets a file under the new key: it reloads, not fails
    stale = keys.Keyring.__new__(keys.Keyring)
    stale.__setstate__({**ring.__getstate__(), "_keys": {k1: ring.key(k1)}, "current_id": k1})
    new = io.BytesIO()
    with EncryptingWriter(new, ring, close_raw=False) as w:
        w.write(b"new")
    assert DecryptingReader(io.BytesIO(new.getvalue()), stale).read() == b"new"


def test_reencrypt_rewrites_old_and_plain_files_resumably(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    key_file = tmp_path / "spool.key"
    k1 = keys.new_key_file(key_file)
    ring = keys.load(key_file)
    contents: dict[Path, bytes] = {}
    for i, sub in enumerate(["objects/ab", "objects/cd", "variants/ab"]):
        d = spool / sub
        d.mkdir(parents=True)
        for j in range(3):
            data = os.urandom(70_000 + i * 1000 + j)
            p = d / f"f{j}.dcm"
            with crypto.open_writer(p, ring) as w:
                w.write(data)
            contents[p] = data
    plain = spool / "objects" / "ab" / "plain.dcm"
    plain.write_bytes(b"\0" * 128 + b"DICM" + b"P" * 5000)
    contents[plain] = plain.read_bytes()
    damaged = spool / "objects" / "cd" / "f1.dcm"
    blob = bytearray(damaged.read_bytes())
    blob[-40] ^= 1
    damaged.write_bytes(bytes(blob))
    leftover = spool / "objects" / "ab" / f".f0.dcm{keys.TMP_SUFFIX}"
    leftover.write_bytes(b"half written by a killed run")

    k2 = keys.rotate(key_file)
    ring = keys.load(key_file)
    st = keys.reencrypt(spool, ring)
    assert st.examined == 10 and st.rewritten == 9 and st.encrypted_plain == 1 and st.leftovers_removed == 1
    assert [rel for rel, _ in st.failed] == ["objects/cd/f1.dcm"] and "chunk" in st.failed[0][1]
    assert not leftover.exists()
    assert damaged.read_bytes() == bytes(blob)  # left as it was, still under k1
    for p, data in contents.items():
        if p == damaged:
            continue
        h = crypto.peek_header(p)
        assert h is not None and h.key_id == k2 != k1
        with crypto.open_reader(p, ring) as f:
            assert f.read() == data
        assert b"P" * 100 not in p.read_bytes()
    again = keys.reencrypt(spool, ring)
    assert again.rewritten == 0 and again.current == 9 and len(again.failed) == 1
