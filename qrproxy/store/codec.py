"""Transfer syntax conversion of spool files, for per-destination compression.

Pure functions, no threads: the forwarder runs `convert_file` in a process pool and uses
`can_convert` (on a header read with ``stop_before_pixels=True``) to decide which presentation
contexts to propose.

Guarantees:
- lossless targets are exact: decoding the converted pixel data gives the original pixel array
  (the values pydicom decodes from the source; bits above Bits Stored that carry information, such as
  retired embedded overlays, make the conversion refuse rather than drop them);
- nothing is dropped: when the target cannot hold the pixel data (float pixel data, a photometric
  interpretation or bit depth the codec does not support, undecodable video...), the first possible
  of the caller's `fallbacks` is written instead, and the result says why; if none is possible the
  result is ``ok=False`` with the reasons and no file is written;
- the SOP Instance UID never changes (pydicom's compress()/decompress() would generate a new one by
  default); the file meta keeps Media Storage SOP Class/Instance UID, only the Transfer Syntax UID
  changes;
- instances without pixel data (SR, KO, PR...) are written in an uncompressed syntax: the target
  itself when it is uncompressed, else the first uncompressed fallback, else Explicit VR Little
  Endian (and the result says so).

Codecs (pydicom 3.0 plugins): JPEG 2000 lossless via pylibjpeg + pylibjpeg-openjpeg, JPEG-LS lossless
via pyjpegls (CharLS), RLE lossless via pylibjpeg-rle (pydicom's own encoder when absent), JPEG
baseline via Pillow (pydicom 3.0 has no JPEG baseline encoder). Decoding of received compressed data
uses whatever pydicom plugins are installed (pylibjpeg-libjpeg adds JPEG lossless / 12-bit).
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.pixels import get_decoder, get_encoder
from pydicom.pixels.encoders.base import ENCODING_PROFILES
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLSLossless, RLELossless)
from pydicom.valuerep import VR

from qrproxy.store.crypto import KeySource, copy_plaintext, open_reader, open_writer

__all__ = ["NATIVE_TARGETS", "TARGETS", "ConvertResult", "auto_target", "can_convert", "convert_file", "resolve_target"]

TARGETS: dict[str, str | None] = {
    "as-received": None,
    "explicit-little": ExplicitVRLittleEndian,
    "implicit-little": ImplicitVRLittleEndian,
    "jpeg2000-lossless": JPEG2000Lossless,
    "jpegls-lossless": JPEGLSLossless,
    "rle-lossless": RLELossless,
    "jpeg-baseline": JPEGBaseline8Bit,
}

LOSSLESS_TARGETS = frozenset({JPEG2000Lossless, JPEGLSLossless, RLELossless})
COMPRESSED_TARGETS = LOSSLESS_TARGETS | {JPEGBaseline8Bit}
# Uncompressed syntaxes we write (Explicit VR Big Endian is retired: read, never written).
NATIVE_TARGETS = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian})

# Sources that are always lossy: decompressing them keeps Lossy Image Compression "01".
_LOSSY_SOURCES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})

# Which installed pydicom plugin to use, best first (Pillow last: its JPEG 2000 decoding of
# >8-bit data is not reliable, and it is only needed for JPEG baseline when libjpeg is absent).
_PLUGIN_PREFERENCE = ("pyjpegls", "pylibjpeg", "gdcm", "pydicom", "pillow")

# Limits of the encoding libraries beyond the DICOM profiles in pydicom's ENCODING_PROFILES.
_MAX_BITS_STORED = {JPEG2000Lossless: 24, JPEGLSLossless: 16, RLELossless: 16}

_FLOAT_PIXEL_TAGS = (0x7FE00008, 0x7FE00009)  # Float Pixel Data, Double Float Pixel Data
_PIXEL_TAGS = (0x7FE00010, *_FLOAT_PIXEL_TAGS)

_DEFAULT_JPEG_QUALITY = 90


@dataclass(frozen=True)
class ConvertResult:
    """Outcome of `convert_file`.

    ok: a file was written at dest. transfer_syntax: the syntax actually written ("" when nothing
    was). reason: why the target could not be used (fallback written), or why nothing could be
    written; None when the target was written as asked. ratio: uncompressed pixel data size divided
    by the written pixel data size (1.0 for uncompressed output, None without pixel data or for a
    byte-for-byte copy that was not parsed).
    """

    ok: bool
    transfer_syntax: str
    reason: str | None
    ratio: float | None


class _Cannot(Exception):
    """The dataset cannot be written in the asked syntax; the message says why."""


def resolve_target(target: str | None) -> str | None:
    """A config name (`jpegls-lossless`) or a transfer syntax UID -> UID (None for as-received)."""
    if target is None:
        return None
    target = str(target).strip()
    if target in TARGETS:
        return TARGETS[target]
    uid = UID(target) if re.fullmatch(r"[0-9]+(\.[0-9]+)+", target) else None
    if uid is None or not uid.is_transfer_syntax:
        raise ValueError(f"unknown transfer syntax target {target!r}; expected one of "
                         f"{', '.join(TARGETS)} or a transfer syntax UID")
    return str(uid)


def _name(uid: str | None) -> str:
    if uid is None:
        return "as received"
    u = UID(uid)
    return u.name if u.is_transfer_syntax else str(uid)


def _is_native(uid: str) -> bool:
    u = UID(uid)
    return u.is_transfer_syntax and not u.is_compressed


# --- pixel module inspection (shared by can_convert and convert_file) ----------------------------


@dataclass
class _Pixels:
    present: bool          # Pixel Data (or float pixel data) is there, or the header describes an image
    float_data: bool
    photometric: str
    samples: int
    bits_allocated: int
    bits_stored: int
    representation: int
    embedded_overlay: bool
    rows: int
    columns: int


def _pixel_info(ds: Dataset) -> _Pixels:
    float_data = any(t in ds for t in _FLOAT_PIXEL_TAGS)
    ba = int(ds.get("BitsAllocated", 0) or 0)
    if "PixelRepresentation" not in ds and "Rows" in ds and ba in (32, 64) and "PixelData" not in ds:
        # Floating Point Image Pixel module (Parametric Map...) seen through stop_before_pixels.
        float_data = True
    present = any(t in ds for t in _PIXEL_TAGS) or ("Rows" in ds and "Columns" in ds and ba > 0)
    return _Pixels(
        present=present,
        float_data=float_data,
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper(),
        samples=int(ds.get("SamplesPerPixel", 1) or 1),
        bits_allocated=ba,
        bits_stored=int(ds.get("BitsStored", ba) or ba),
        representation=int(ds.get("PixelRepresentation", 0) or 0),
        embedded_overlay=_has_embedded_overlay(ds),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
    )


def _has_embedded_overlay(ds: Dataset) -> bool:
    """Retired overlays kept in the unused high bits of Pixel Data (no Overlay Data element)."""
    for group in range(0x6000, 0x6020, 2):
        if (group << 16 | 0x0010) not in ds:  # Overlay Rows: the overlay exists
            continue
        if (group << 16 | 0x3000) in ds:      # Overlay Data: stored separately, safe
            continue
        bits = ds.get((group, 0x0100))
        pos = ds.get((group, 0x0102))
        try:
            if (bits is not None and int(bits.value) > 1) or (pos is not None and int(pos.value) > 0):
                return True
        except (TypeError, ValueError):
            return True
    return False


def _decoded_photometric(pi: str, src_ts: str, to_rgb: bool) -> str:
    """The photometric interpretation of the array pydicom decodes from `src_ts`."""
    if pi in ("YBR_RCT", "YBR_ICT"):
        return "RGB"  # openjpeg applies the inverse component transform
    if pi == "YBR_FULL_422":
        pi = "YBR_FULL"  # subsampling removed by the decoder
    if to_rgb and pi == "YBR_FULL":
        return "RGB"
    return pi


def _source_problem(src_ts: str) -> str | None:
    """Why the pixel data of `src_ts` cannot be decoded here (None: it can)."""
    if _is_native(src_ts):
        return None
    try:
        decoder = get_decoder(src_ts)
    except NotImplementedError:
        return f"pixel data in {_name(src_ts)} cannot be decoded (no decoder in pydicom)"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies)
        return f"no decoder installed for {_name(src_ts)} ({missing})"
    return None


def _target_problem(info: _Pixels, src_ts: str, target: str) -> str | None:
    """Why pixel data described by `info` cannot be encoded in the compressed `target`."""
    if info.float_data:
        return "float pixel data cannot be compressed"
    if info.embedded_overlay:
        return "overlay embedded in the high bits of Pixel Data (would be lost by compression)"
    problem = _source_problem(src_ts)
    if problem:
        return problem
    if target == JPEGBaseline8Bit:
        try:
            import PIL  # noqa: F401
        except ImportError:
            return "JPEG baseline encoding needs Pillow, which is not installed"
        pi = _decoded_photometric(info.photometric, src_ts, to_rgb=True)
        if info.bits_allocated != 8 or not (1 <= info.bits_stored <= 8):
            return (f"JPEG baseline is 8-bit only (Bits Allocated {info.bits_allocated}, "
                    f"Bits Stored {info.bits_stored})")
        if info.representation != 0:
            return "JPEG baseline does not support signed pixel data"
        if not ((pi in ("MONOCHROME1", "MONOCHROME2") and info.samples == 1) or (pi == "RGB" and info.samples == 3)):
            return f"JPEG baseline does not support {info.photometric or 'no'} photometric interpretation " \
                   f"with {info.samples} samples per pixel"
        return None
    try:
        encoder = get_encoder(target)
    except NotImplementedError:
        return f"no encoder for {_name(target)} in pydicom"
    if not encoder.is_available:
        return f"no encoder installed for {_name(target)} ({'; '.join(encoder.missing_dependencies)})"
    pi = _decoded_photometric(info.photometric, src_ts, to_rgb=False)
    ok = any(
        pi == p and info.samples == spp and info.representation in prs and info.bits_allocated in bas
        and info.bits_stored in bss
        for p, spp, prs, bas, bss in ENCODING_PROFILES.get(UID(target), [])
    )
    if not ok:
        return (f"{_name(target)} does not support {pi or 'no'} photometric interpretation with "
                f"{info.samples} samples, Bits Allocated {info.bits_allocated}, Bits Stored "
                f"{info.bits_stored}, Pixel Representation {info.representation} (PS3.5 8.2)")
    limit = _MAX_BITS_STORED.get(target)
    if limit is not None and info.bits_stored > limit:
        return f"the {_name(target)} encoder supports at most {limit} bits stored"
    if target == JPEG2000Lossless and min(info.rows, info.columns) < 32:
        # pylibjpeg-openjpeg always uses 6 DWT resolutions: smaller images fail to encode
        return f"the {_name(target)} encoder needs at least 32x32 pixels ({info.rows}x{info.columns})"
    return None


def auto_target() -> str:
    """The lossless syntax `transfer_syntax: auto` compresses to: JPEG-LS (fast, about as small as
    JPEG 2000) when its encoder is installed, else JPEG 2000 lossless (pylibjpeg-openjpeg)."""
    try:
        if get_encoder(JPEGLSLossless).is_available:
            return JPEGLSLossless
    except NotImplementedError:
        pass
    return JPEG2000Lossless


def can_convert(ds_header: Dataset, target_uid: str | None, *,
                transfer_syntax: str | None = None) -> tuple[bool, str | None]:
    """Can `convert_file` write this instance in `target_uid` (UID or config name)?

    `ds_header` may be read with ``stop_before_pixels=True``. The source transfer syntax comes
    from its file meta, or from `transfer_syntax`. (True, None): the target will be written.
    (False, reason): `convert_file` would write a fallback (or nothing). Data-dependent failures
    (pixel values outside Bits Stored, an encoder error) are only found by `convert_file`.
    """
    target = resolve_target(target_uid)
    if target is None:
        return True, None
    src_ts = transfer_syntax or str(getattr(ds_header, "file_meta", Dataset()).get("TransferSyntaxUID", "")
                                    or ExplicitVRLittleEndian)
    if target == src_ts:
        return True, None
    info = _pixel_info(ds_header)
    if target not in COMPRESSED_TARGETS:
        if target not in NATIVE_TARGETS:
            return False, f"{_name(target)} is not a target qrproxy can write"
        if not info.present:
            return True, None
        return (False, p) if (p := _source_problem(src_ts)) else (True, None)
    if not info.present:
        return False, "no pixel data"
    problem = _target_problem(info, src_ts, target)
    return (False, problem) if problem else (True, None)


# --- conversion ----------------------------------------------------------------------------------


def convert_file(src: str | os.PathLike[str], dest: str | os.PathLike[str], target_uid: str | None,
                 fallbacks: Sequence[str | None] = (ExplicitVRLittleEndian,), *,
                 jpeg_quality: int = _DEFAULT_JPEG_QUALITY, verify: bool = False,
                 keys: KeySource | None = None) -> ConvertResult:
    """Write the Part 10 file `src` to `dest` in `target_uid` (a UID or a TARGETS name).

    When the target cannot hold the data, the first possible entry of `fallbacks` (UIDs or TARGETS
    names; "as-received"/None copies the source unchanged) is written instead. Never raises for
    data problems: ``ok=False`` with the reasons when nothing could be written. `dest` is replaced
    atomically (written next to it, then renamed). `verify=True` decodes compressed output again and
    compares it with the source array (costs one extra decode).

    With `keys` (an encrypted spool, crypto.py) `src` is read through decryption (a plain `src` is
    read as it is) and `dest` is always written encrypted under the current key; without, plain.
    """
    src, dest = os.fspath(src), os.fspath(dest)
    try:
        target = resolve_target(target_uid)
        chain: list[str | None] = []
        for t in (target, *(resolve_target(f) for f in fallbacks)):
            if t not in chain:
                chain.append(t)
    except ValueError as exc:
        return ConvertResult(False, "", str(exc), None)

    reasons: list[str] = []

    def done(res: ConvertResult) -> ConvertResult:
        reason = "; ".join(reasons) if reasons else None
        return ConvertResult(res.ok, res.transfer_syntax, reason, res.ratio)

    ds: Dataset | None = None
    for i, t in enumerate(chain):
        label = "target" if i == 0 else "fallback"
        if t is None:
            try:
                _copy(src, dest, keys)
            except OSError as exc:
                reasons.append(f"{label} as-received: {exc}")
                continue
            ts = str(ds.file_meta.TransferSyntaxUID) if ds is not None else _peek_ts(src, keys)
            return done(ConvertResult(True, ts, None, _ratio(ds) if ds is not None else None))
        try:
            if ds is None or i > 0:
                ds = _load(src, keys)  # a fresh copy per attempt: a failed attempt may have changed it
            src_ts = str(ds.file_meta.TransferSyntaxUID)
            has_pixels = any(tag in ds for tag in _PIXEL_TAGS)
            if not has_pixels and t not in NATIVE_TARGETS:
                # No pixel data: a compressed syntax buys nothing and many SCPs refuse it for SR/KO/PR.
                native = next((f for f in chain[i + 1:] if f is not None and f in NATIVE_TARGETS),
                              ExplicitVRLittleEndian)
                reasons.append(f"no pixel data: written in {_name(native)} instead of {_name(t)}")
                t = native
            if t == src_ts:
                _copy(src, dest, keys)
                return done(ConvertResult(True, t, None, _ratio(ds)))
            if t in NATIVE_TARGETS:
                _to_native(ds, src_ts, t)
            elif t in COMPRESSED_TARGETS:
                _to_compressed(ds, src_ts, t, jpeg_quality=jpeg_quality, verify=verify)
            else:
                raise _Cannot(f"{_name(t)} is not a target qrproxy can write")
            _write(ds, dest, keys)
            return done(ConvertResult(True, t, None, _ratio(ds)))
        except _Cannot as exc:
            reasons.append(f"{label} {_name(t)}: {exc}")
        except Exception as exc:
            reasons.append(f"{label} {_name(t)}: {type(exc).__name__}: {exc}")
    return done(ConvertResult(False, "", None, None))


def _load(path: str, keys: KeySource | None = None) -> Dataset:
    with open_reader(path, keys) as fh:
        ds = dcmread(fh)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise _Cannot("not a Part 10 file (no Transfer Syntax UID in the file meta)")
    return ds


def _peek_ts(path: str, keys: KeySource | None = None) -> str:
    try:
        with open_reader(path, keys) as fh:
            ds = dcmread(fh, stop_before_pixels=True, specific_tags=[0x00020010])
        return str(ds.file_meta.TransferSyntaxUID)
    except Exception:
        return ""


def _tmp_name(dest: str) -> str:
    return f"{dest}.{os.getpid()}.tmp"


def _copy(src: str, dest: str, keys: KeySource | None = None) -> None:
    tmp = _tmp_name(dest)
    try:
        if keys is None:
            shutil.copyfile(src, tmp)
        else:  # re-encrypted on the way (a plain source stays plain nowhere)
            with open_reader(src, keys) as fin, open_writer(tmp, keys) as fout:
                copy_plaintext(fin, fout)
        os.replace(tmp, dest)
    except BaseException:
        _unlink(tmp)
        raise


def _write(ds: Dataset, dest: str, keys: KeySource | None = None) -> None:
    tmp = _tmp_name(dest)
    try:
        # dcmwrite, not save_as: save_as refuses a big -> little endian change even after the swap
        if keys is None:
            dcmwrite(tmp, ds, enforce_file_format=True)
        else:
            with open_writer(tmp, keys) as fout:
                dcmwrite(fout, ds, enforce_file_format=True)
        os.replace(tmp, dest)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _native_length(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * frames * int(ds.BitsAllocated)
    return (bits + 7) // 8


def _ratio(ds: Dataset | None) -> float | None:
    if ds is None:
        return None
    if "PixelData" not in ds:
        return 1.0 if any(t in ds for t in _FLOAT_PIXEL_TAGS) else None
    elem = ds["PixelData"]
    if not elem.is_undefined_length:
        return 1.0
    try:
        return round(_native_length(ds) / max(1, len(elem.value)), 3)
    except (AttributeError, TypeError, ValueError):
        return None


def _plugin(coder: Any) -> str:
    available = getattr(coder, "available_plugins", ())
    for name in _PLUGIN_PREFERENCE:
        if name in available:
            return name
    return ""


def _decode(ds: Dataset, src_ts: str, *, to_rgb: bool) -> tuple[np.ndarray, dict[str, Any]]:
    problem = _source_problem(src_ts)
    if problem:
        raise _Cannot(problem)
    decoder = get_decoder(src_ts)
    try:
        arr, meta = decoder.as_array(ds, raw=not to_rgb, decoding_plugin=_plugin(decoder))
    except Exception as exc:
        raise _Cannot(f"cannot decode the {_name(src_ts)} pixel data: {exc}") from exc
    return arr, _fix_meta(meta)


def _fix_meta(meta: dict[str, Any]) -> dict[str, Any]:
    # pydicom 3.0.2 reports YBR_FULL_422 for decoded JPEG data although the array has its
    # subsampling removed (full-resolution YCbCr): that is YBR_FULL (its own decompress() writes
    # such files with the wrong value).
    if str(meta.get("photometric_interpretation", "")) == "YBR_FULL_422":
        meta = dict(meta, photometric_interpretation="YBR_FULL")
    return meta


def _drop_offset_tables(ds: Dataset) -> None:
    for kw in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if kw in ds:
            del ds[kw]


def _set_native_pixels(ds: Dataset, arr: np.ndarray, meta: dict[str, Any]) -> None:
    """Replace Pixel Data with the native little-endian encoding of `arr` (as decoded)."""
    ba = int(ds.BitsAllocated)
    if ba == 1:
        from pydicom.pixels.utils import pack_bits
        data = pack_bits(arr, pad=False)
    else:
        width = max(1, math.ceil(ba / 8))
        if width not in (1, 2, 4, 8):
            raise _Cannot(f"Bits Allocated {ba} cannot be written natively")
        data = np.ascontiguousarray(arr, dtype=np.dtype(f"<{arr.dtype.kind}{width}")).tobytes()
    if len(data) % 2:
        data += b"\x00"
    _drop_offset_tables(ds)
    ds.PixelData = data
    elem = ds["PixelData"]
    elem.VR = VR.OB if ba <= 8 else VR.OW
    elem.is_undefined_length = False
    _apply_pixel_meta(ds, meta, nr_frames=arr.shape[0] if _is_multiframe(ds) else 1)


def _is_multiframe(ds: Dataset) -> bool:
    return int(ds.get("NumberOfFrames", 1) or 1) > 1


def _apply_pixel_meta(ds: Dataset, meta: dict[str, Any], nr_frames: int) -> None:
    if meta.get("photometric_interpretation"):
        ds.PhotometricInterpretation = meta["photometric_interpretation"]
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        ds.PlanarConfiguration = int(meta.get("planar_configuration", 0) or 0)
    if "NumberOfFrames" in ds or nr_frames > 1:
        ds.NumberOfFrames = nr_frames


def _mark_lossy_source(ds: Dataset, src_ts: str) -> None:
    if src_ts in _LOSSY_SOURCES and str(ds.get("LossyImageCompression", "") or "") != "01":
        ds.LossyImageCompression = "01"


def _to_native(ds: Dataset, src_ts: str, target: str) -> None:
    if UID(src_ts).is_compressed or ("PixelData" in ds and ds["PixelData"].is_undefined_length):
        if "PixelData" in ds:
            arr, meta = _decode(ds, src_ts, to_rgb=False)
            _set_native_pixels(ds, arr, meta)
            _mark_lossy_source(ds, src_ts)
        _decode_icons(ds, src_ts)
    elif src_ts == ExplicitVRBigEndian:
        _swap_to_little(ds)
    ds.file_meta.TransferSyntaxUID = UID(target)


def _decode_icons(ds: Dataset, src_ts: str) -> None:
    """Icons encapsulated like their image must become native in a native data set."""
    for item in ds.get("IconImageSequence", []) or []:
        if "PixelData" in item and item["PixelData"].is_undefined_length:
            try:
                decoder = get_decoder(src_ts)
                arr, meta = decoder.as_array(item, raw=True, decoding_plugin=_plugin(decoder))
                meta = _fix_meta(meta)
            except Exception as exc:
                raise _Cannot(f"cannot decode the icon image: {exc}") from exc
            _set_native_pixels(item, arr, meta)


_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_to_little(ds: Dataset) -> None:
    """Byte-swap the binary (OW/OF/OL/OD/OV) values of a data set read as Explicit VR Big Endian.

    Numbers (US, SS, FL...) are decoded by pydicom and re-encoded by the writer; binary values are
    kept as raw bytes and must be swapped by hand (pydicom does not convert endianness).
    """
    for elem in ds:
        if elem.VR == VR.SQ:
            for item in elem.value or []:
                _swap_to_little(item)
            continue
        width = _SWAP_WIDTH.get(str(elem.VR))
        if width and elem.value and not elem.is_undefined_length:
            raw = bytes(elem.value)
            usable = len(raw) - len(raw) % width
            swapped = np.frombuffer(raw[:usable], dtype=f">u{width}").astype(f"<u{width}").tobytes()
            elem.value = swapped + raw[usable:]


def _high_bits_problem(ds: Dataset, src_ts: str) -> str | None:
    """Do bits above Bits Stored in native Pixel Data carry information (other than sign extension)?

    pydicom masks them away when decoding, so a compressed copy would silently drop them.
    """
    ba, bs = int(ds.BitsAllocated), int(ds.BitsStored)
    if ba not in (8, 16, 32, 64) or bs >= ba:
        return None
    order = ">" if src_ts == ExplicitVRBigEndian else "<"
    raw = ds.PixelData
    n = len(raw) // (ba // 8)
    words = np.frombuffer(raw, dtype=f"{order}u{ba // 8}", count=n)
    high = words >> bs
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        sign = (words >> (bs - 1)) & 1
        bad = ~((high == 0) | ((high == (1 << (ba - bs)) - 1) & (sign == 1)))
    else:
        bad = high != 0
    count = int(np.count_nonzero(bad))
    if count:
        return (f"{count} pixel values use bits above Bits Stored {bs} (embedded overlay or values out "
                f"of range); compression would drop them")
    return None


def _to_compressed(ds: Dataset, src_ts: str, target: str, *, jpeg_quality: int, verify: bool) -> None:
    info = _pixel_info(ds)
    problem = _target_problem(info, src_ts, target)
    if problem:
        raise _Cannot(problem)
    if "PixelData" not in ds:
        raise _Cannot("no Pixel Data element")
    if not UID(src_ts).is_compressed:
        problem = _high_bits_problem(ds, src_ts)
        if problem:
            raise _Cannot(problem)
    lossy = target == JPEGBaseline8Bit
    arr, meta = _decode(ds, src_ts, to_rgb=lossy)
    _mark_lossy_source(ds, src_ts)
    if UID(src_ts).is_compressed:
        _decode_icons(ds, src_ts)  # an icon encapsulated in the old syntax must not stay so
    nr_frames = arr.shape[0] if _is_multiframe(ds) else 1
    _apply_pixel_meta(ds, meta, nr_frames)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:
        ds.PlanarConfiguration = 0  # pydicom returns interleaved (rows, columns, samples) arrays
    _drop_offset_tables(ds)
    if lossy:
        _encode_jpeg_baseline(ds, arr, quality=jpeg_quality)
    else:
        encoder = get_encoder(target)
        try:
            ds.compress(target, arr, encoding_plugin=_plugin(encoder), generate_instance_uid=False)
        except Exception as exc:
            raise _Cannot(f"encoder failed: {exc}") from exc
        if target == RLELossless and samples > 1:
            ds.PlanarConfiguration = 1  # PS3.5 G.2: each colour plane is its own RLE segment
        if verify:
            decoder = get_decoder(target)
            back, _ = decoder.as_array(ds, raw=True, decoding_plugin=_plugin(decoder))
            if not np.array_equal(back, arr):
                raise _Cannot("verification failed: decoded pixels differ from the source")
    ds.file_meta.TransferSyntaxUID = UID(target)


def _encode_jpeg_baseline(ds: Dataset, arr: np.ndarray, *, quality: int) -> None:
    from PIL import Image

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    multi = _is_multiframe(ds)
    frames: Iterable[np.ndarray] = arr if multi else [arr]
    encoded: list[bytes] = []
    for frame in frames:
        frame = np.ascontiguousarray(frame, dtype=np.uint8)
        img = Image.fromarray(frame, mode="RGB" if samples == 3 else "L")
        buf = io.BytesIO()
        # 4:2:2 chroma subsampling labelled YBR_FULL_422, as PS3.5 8.2.1 and DCMTK's dcmcjpeg do.
        img.save(buf, format="JPEG", quality=int(quality), subsampling=1 if samples == 3 else 0,
                 optimize=False)
        encoded.append(buf.getvalue())
    uncompressed = arr.size  # 8 bits per sample
    total = sum(len(f) for f in encoded)
    if total + 8 * len(encoded) > 2**32 - 1:
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(encoded)
    else:
        ds.PixelData = encapsulate(encoded)
    elem = ds["PixelData"]
    elem.VR = VR.OB
    elem.is_undefined_length = True
    if samples == 3:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
    ds.BitsStored = 8
    ds.HighBit = 7
    ratio = uncompressed / max(1, total)
    _append_lossy(ds, ratio, "ISO_10918_1")


def _append_lossy(ds: Dataset, ratio: float, method: str) -> None:
    """PS3.3 C.7.6.1.1.5: once "01" always "01"; ratios and methods list every lossy step, in order."""
    ratios = _as_list(ds.get("LossyImageCompressionRatio"))
    methods = _as_list(ds.get("LossyImageCompressionMethod"))
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = [*ratios, _ds_value(ratio)]
    ds.LossyImageCompressionMethod = [*methods, method]


def _as_list(elem: Any) -> list[Any]:
    if elem is None:
        return []
    value = elem.value if hasattr(elem, "value") else elem
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [v for v in value if v not in (None, "")]
    return [value]


def _ds_value(x: float) -> str:
    """A DS string (at most 16 characters)."""
    return f"{x:.4f}"[:16].rstrip("0").rstrip(".") if x < 1e9 else f"{x:.6e}"
