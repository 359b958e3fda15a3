"""Hypothesis strategies for hostile bytes: mutated PDUs and malformed data sets (explicit VR
little endian), built so that most cases get past the first check and reach deeper parsers."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from .pdus import CT_IMAGE, associate_rq

HUGE = st.sampled_from([0xFFFFFFFF, 0xFFFFFFFE, 0x80000000, 0x7FFFFFFF, 0x00FFFFFF, 0x10000])
AE_FIELD = st.one_of(st.binary(min_size=16, max_size=16),
                     st.sampled_from([b" " * 16, b"QRPROXY".ljust(16), b"\\" * 8, b"\x00" * 16, b"\xff" * 16]))


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with a few byte-level mutations: flips, overwritten 2/4-byte lengths, cuts, inserts."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "len16", "len32", "cut", "insert", "dup"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "len16":
            data[pos:pos + 2] = struct.pack(">H", draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF])))
        elif op == "len32":
            data[pos:pos + 4] = struct.pack(">L", draw(HUGE | st.integers(0, 1 << 16)))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        else:
            data[pos:pos] = data[pos:pos + draw(st.integers(1, 256))]
    return bytes(data)


@st.composite
def associate_requests(draw: st.DrawFn) -> bytes:
    """A-ASSOCIATE-RQ PDUs: odd AE titles, absurd maximum lengths, many contexts, then mutated."""
    contexts = [(CT_IMAGE, ["1.2.840.10008.1.2.1"])]
    if draw(st.booleans()):
        contexts += [(f"1.2.3.{i}", ["1.2.840.10008.1.2"]) for i in range(draw(st.integers(0, 127)))]
    seed = bytearray(associate_rq(contexts=contexts, max_pdu=draw(
        st.sampled_from([0, 1, 6, 4096, 0xFFFFFFFF]) | st.integers(0, 1 << 20))))
    # AE title fields (PS3.8 9.3.2: called at offset 10, calling at 26, 16 bytes each), written raw:
    # control characters, non-ASCII, all spaces, the empty title
    seed[10:26] = draw(AE_FIELD)
    seed[26:42] = draw(AE_FIELD)
    return draw(mutated(bytes(seed))) if draw(st.booleans()) else bytes(seed)


def element(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    n = len(value) if length is None else length
    if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV", b"SV", b"UV"):
        return struct.pack("<HH2sHL", group, elem, vr, 0, n & 0xFFFFFFFF) + value
    return struct.pack("<HH2sH", group, elem, vr, n & 0xFFFF) + value


def _uid(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\x00" if len(raw) % 2 else raw


def nested(depth: int, inner: bytes) -> bytes:
    """A sequence (undefined lengths) nested `depth` deep around `inner`."""
    body = inner
    for _ in range(depth):
        item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff" + body + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
        body = element(0x00081115, b"SQ", item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00", length=0xFFFFFFFF)
    return body


@st.composite
def datasets(draw: st.DrawFn, sop_instance: str, sop_class: str = CT_IMAGE) -> bytes:
    """Explicit VR little endian data sets with the ways a hostile or broken sender can be wrong."""
    parts: list[tuple[int, bytes]] = []
    if draw(st.booleans()):
        parts.append((0x00080016, element(0x00080016, b"UI", _uid(sop_class))))
        parts.append((0x00080018, element(0x00080018, b"UI", _uid(sop_instance))))
    kind = draw(st.sampled_from(["charset", "huge-length", "bad-vr", "nested", "random", "pixel"]))
    if kind == "charset":
        cs = draw(st.sampled_from([b"ISO 2022 IR 9999", b"\xff\xfe", b"ISO_IR 192", b"GB18030", b"ISO 2022 IR 87\\",
                                   b"ISO_IR 100\\ISO 2022 IR 149"]))
        parts.append((0x00080005, element(0x00080005, b"CS", cs + b" " * (len(cs) % 2))))
        name = draw(st.binary(min_size=0, max_size=64))
        parts.append((0x00100010, element(0x00100010, b"PN", name + b" " * (len(name) % 2))))
    elif kind == "huge-length":
        tag = draw(st.sampled_from([0x00100010, 0x00200013, 0x7FE00010, 0x00091001]))
        vr = draw(st.sampled_from([b"PN", b"IS", b"OB", b"UN", b"SQ", b"UT"]))
        parts.append((tag, element(tag, vr, draw(st.binary(max_size=32)), length=draw(HUGE))))
    elif kind == "bad-vr":
        vr = draw(st.binary(min_size=2, max_size=2))
        parts.append((0x00100020, element(0x00100020, vr, draw(st.binary(max_size=32)))))
    elif kind == "nested":
        depth = draw(st.sampled_from([1, 10, 100, 1000, 5000]))
        parts.append((0x00081115, nested(depth, element(0x00100010, b"PN", b"X^Y "))))
    elif kind == "pixel":
        frags = b"\xfe\xff\x00\xe0" + struct.pack("<L", draw(HUGE | st.integers(0, 64))) + draw(st.binary(max_size=64))
        parts.append((0x7FE00010, element(0x7FE00010, b"OB", frags, length=0xFFFFFFFF)))
    else:
        parts.append((0x00100010, draw(st.binary(min_size=1, max_size=512))))
    parts.sort(key=lambda p: p[0])
    return b"".join(p[1] for p in parts)
