"""qrproxy.codec: transfer syntax conversion for per-destination compression.

Synthetic instances are built with pydicom in tmp dirs (small, deterministic). Lossless targets are
checked by decoding the written file and comparing pixel arrays exactly; DCMTK's own decoders
(dcmdjpls, dcmdrle, dcmdjpeg) check that third parties read what we write.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    MPEG4HP41,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from qrproxy.store.codec import TARGETS, ConvertResult, can_convert, convert_file, resolve_target

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
XA = "1.2.840.10008.5.1.4.1.1.12.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"
PMAP = "1.2.840.10008.5.1.4.1.1.30"

LOSSLESS = ["jpeg2000-lossless", "jpegls-lossless", "rle-lossless"]
ROWS, COLS = 96, 128


def _base(sop_class: str, modality: str, ts: str = ExplicitVRLittleEndian) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Codec^Test"
    ds.PatientID = "C1"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    return ds


def _image(ds: Dataset, arr: np.ndarray, *, bits_stored: int, photometric: str = "MONOCHROME2",
           frames: int | None = None) -> Dataset:
    samples = arr.shape[-1] if photometric in ("RGB", "YBR_FULL") else 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = (arr.shape[1:3] if frames else arr.shape[:2])
    ds.BitsAllocated = arr.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    order = ">" if ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian else "<"
    ds.PixelData = arr.astype(arr.dtype.newbyteorder(order)).tobytes()
    return ds


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float, noise: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = np.sin(xx / 17.0) * np.cos(yy / 11.0) * 0.5 + 0.5
    return lo + (hi - lo) * base + rng.normal(0, noise, shape)


def make_ct_signed(rng: np.random.Generator) -> Dataset:
    a = np.clip(_smooth(rng, (ROWS, COLS), -1024, 1800, 30), -2048, 2047).astype(np.int16)
    a[0, :8] = [-2048, 2047, -1, 0, 1, -2000, 2000, -1024]  # range edges
    ds = _base(CT, "CT")
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    return _image(ds, a, bits_stored=12)


def make_ct_unsigned(rng: np.random.Generator) -> Dataset:
    a = np.clip(_smooth(rng, (ROWS, COLS), 0, 4095, 40), 0, 4095).astype(np.uint16)
    a[0, :3] = [0, 4095, 2048]
    ds = _base(CT, "CT")
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    return _image(ds, a, bits_stored=12)


def make_mr(rng: np.random.Generator) -> Dataset:
    a = np.clip(_smooth(rng, (ROWS, COLS), 0, 65535, 500), 0, 65535).astype(np.uint16)
    a[0, :2] = [0, 65535]
    return _image(_base(MR, "MR"), a, bits_stored=16)


def make_us_rgb(rng: np.random.Generator) -> Dataset:
    g = _smooth(rng, (ROWS, COLS), 0, 255, 6)
    a = np.stack([g, 255 - g, np.roll(g, 9, axis=1)], axis=-1)
    a = np.clip(a, 0, 255).astype(np.uint8)
    return _image(_base(US, "US"), a, bits_stored=8, photometric="RGB")


def make_multiframe(rng: np.random.Generator) -> Dataset:
    a = np.stack([np.clip(_smooth(rng, (ROWS, COLS), 10 * i, 200 + 10 * i, 4), 0, 255) for i in range(5)])
    return _image(_base(XA, "XA"), a.astype(np.uint8), bits_stored=8, frames=5)


def make_sr(rng: np.random.Generator) -> Dataset:
    ds = _base(SR, "SR")
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = "No acute findings."
    ds.ContentSequence = Sequence([item])
    return ds


def make_float(rng: np.random.Generator) -> Dataset:
    ds = _base(PMAP, "MR")
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = 32, 40
    ds.BitsAllocated = 32
    ds.FloatPixelData = rng.normal(0, 1, (32, 40)).astype("<f4").tobytes()
    return ds


IMAGES = {
    "ct-signed-12": make_ct_signed,
    "ct-unsigned-12": make_ct_unsigned,
    "mr-16": make_mr,
    "us-rgb-8": make_us_rgb,
    "multiframe-8": make_multiframe,
}


def save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240611)


def pixels(path: Path) -> np.ndarray:
    ds = dcmread(path)
    ds.pixel_array_options(as_rgb=False)
    return ds.pixel_array


def check_meta(path: Path, ts: str, original: Dataset) -> Dataset:
    out = dcmread(path)
    assert out.file_meta.TransferSyntaxUID == ts
    assert out.SOPInstanceUID == original.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPClassUID == original.SOPClassUID
    assert out.PatientName == original.PatientName
    return out


# --- lossless targets ------------------------------------------------------------------------------


@pytest.mark.parametrize("target", LOSSLESS + ["explicit-little", "implicit-little"])
@pytest.mark.parametrize("kind", list(IMAGES))
def test_lossless_round_trip_is_exact(tmp_path, rng, kind, target):
    ds = IMAGES[kind](rng)
    src = save(ds, tmp_path / "src.dcm")
    original = pixels(src)
    res = convert_file(src, tmp_path / "out.dcm", TARGETS[target])
    assert res == ConvertResult(True, TARGETS[target], None, res.ratio), res
    out = check_meta(tmp_path / "out.dcm", TARGETS[target], ds)
    got = pixels(tmp_path / "out.dcm")
    assert got.dtype == original.dtype and got.shape == original.shape
    assert np.array_equal(got, original)
    if target in LOSSLESS:
        assert out["PixelData"].is_undefined_length
        # RLE can expand noisy 16-bit data (ratio < 1); the others must not
        assert res.ratio is not None and res.ratio > (0.8 if target == "rle-lossless" else 1.0), res
        if ds.SamplesPerPixel == 3:
            assert out.PlanarConfiguration == (1 if target == "rle-lossless" else 0)
            assert out.PhotometricInterpretation == "RGB"
    else:
        assert res.ratio == 1.0


def test_config_names_are_accepted(tmp_path, rng):
    src = save(make_ct_signed(rng), tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", "jpegls-lossless")
    assert res.ok and res.transfer_syntax == JPEGLSLossless
    assert resolve_target("as-received") is None
    with pytest.raises(ValueError):
        resolve_target("jpeg-xl")


def test_chain_j2k_to_explicit_and_jpegls(tmp_path, rng):
    ds = make_ct_signed(rng)
    src = save(ds, tmp_path / "src.dcm")
    original = pixels(src)
    assert convert_file(src, tmp_path / "j2k.dcm", JPEG2000Lossless).ok
    res = convert_file(tmp_path / "j2k.dcm", tmp_path / "back.dcm", ExplicitVRLittleEndian)
    assert res == ConvertResult(True, ExplicitVRLittleEndian, None, 1.0)
    back = check_meta(tmp_path / "back.dcm", ExplicitVRLittleEndian, ds)
    assert not back["PixelData"].is_undefined_length
    assert np.array_equal(pixels(tmp_path / "back.dcm"), original)
    # compressed -> another compressed syntax, then -> implicit
    assert convert_file(tmp_path / "j2k.dcm", tmp_path / "jls.dcm", JPEGLSLossless).ok
    assert np.array_equal(pixels(tmp_path / "jls.dcm"), original)
    assert convert_file(tmp_path / "jls.dcm", tmp_path / "rle.dcm", RLELossless).ok
    assert convert_file(tmp_path / "rle.dcm", tmp_path / "imp.dcm", ImplicitVRLittleEndian).ok
    assert np.array_equal(pixels(tmp_path / "imp.dcm"), original)
    check_meta(tmp_path / "imp.dcm", ImplicitVRLittleEndian, ds)


def test_rgb_chain_through_all_lossless(tmp_path, rng):
    ds = make_us_rgb(rng)
    src = save(ds, tmp_path / "src.dcm")
    original = pixels(src)
    cur = src
    for i, t in enumerate([RLELossless, JPEG2000Lossless, JPEGLSLossless, RLELossless, ExplicitVRLittleEndian]):
        nxt = tmp_path / f"step{i}.dcm"
        assert convert_file(cur, nxt, t).ok
        assert np.array_equal(pixels(nxt), original), t
        cur = nxt


def test_same_syntax_is_a_byte_copy(tmp_path, rng):
    src = save(make_mr(rng), tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", ExplicitVRLittleEndian)
    assert res == ConvertResult(True, ExplicitVRLittleEndian, None, 1.0)
    assert (tmp_path / "out.dcm").read_bytes() == src.read_bytes()
    res = convert_file(src, tmp_path / "out2.dcm", "as-received")
    assert res.ok and res.transfer_syntax == ExplicitVRLittleEndian
    assert (tmp_path / "out2.dcm").read_bytes() == src.read_bytes()


def test_big_endian_source(tmp_path, rng):
    ds = make_ct_signed(rng)
    original = pixels(save(ds, tmp_path / "le.dcm"))
    be = _image(_base(CT, "CT", ExplicitVRBigEndian), original, bits_stored=12)
    be.SOPInstanceUID = ds.SOPInstanceUID
    be.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    be.PatientName = ds.PatientName
    src = save(be, tmp_path / "be.dcm")
    assert np.array_equal(pixels(src), original)
    for t in (ExplicitVRLittleEndian, JPEGLSLossless):
        res = convert_file(src, tmp_path / "out.dcm", t)
        assert res.ok and res.transfer_syntax == t, res
        assert np.array_equal(pixels(tmp_path / "out.dcm"), original)
        assert dcmread(tmp_path / "out.dcm").Rows == ROWS


def test_encapsulated_icon_is_decoded_with_its_image(tmp_path, rng):
    ds = make_ct_signed(rng)
    icon_pixels = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    icon = Dataset()
    icon.file_meta = FileMetaDataset()
    icon.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _image(icon, icon_pixels, bits_stored=8)
    icon.compress(JPEG2000Lossless, icon_pixels, generate_instance_uid=False)
    del icon.file_meta
    original = ds.pixel_array.copy()
    ds.IconImageSequence = Sequence([icon])
    ds.compress(JPEG2000Lossless, original, generate_instance_uid=False)
    src = save(ds, tmp_path / "src.dcm")
    for t in (ExplicitVRLittleEndian, JPEGLSLossless):
        res = convert_file(src, tmp_path / "out.dcm", t)
        assert res.ok and res.transfer_syntax == t, res
        out = dcmread(tmp_path / "out.dcm")
        item = out.IconImageSequence[0]
        assert not item["PixelData"].is_undefined_length  # native, not J2K inside another syntax
        assert np.array_equal(np.frombuffer(item.PixelData, np.uint8).reshape(64, 64), icon_pixels)
        assert np.array_equal(pixels(tmp_path / "out.dcm"), original)


# --- no pixel data, float pixel data, fallbacks -----------------------------------------------------


@pytest.mark.parametrize("target", list(TARGETS.values()))
def test_sr_without_pixel_data(tmp_path, rng, target):
    ds = make_sr(rng)
    src = save(ds, tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", target)
    assert res.ok, res
    if target in (None, ExplicitVRLittleEndian):
        assert res == ConvertResult(True, ExplicitVRLittleEndian, None, None)
    elif target == ImplicitVRLittleEndian:
        assert res == ConvertResult(True, ImplicitVRLittleEndian, None, None)
    else:
        assert res.transfer_syntax == ExplicitVRLittleEndian
        assert "no pixel data" in res.reason
    out = check_meta(tmp_path / "out.dcm", res.transfer_syntax, ds)
    assert out.ContentSequence[0].TextValue == "No acute findings."
    ok, reason = can_convert(dcmread(src, stop_before_pixels=True), JPEGLSLossless)
    assert not ok and "no pixel data" in reason


def test_sr_prefers_an_uncompressed_fallback(tmp_path, rng):
    src = save(make_sr(rng), tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", JPEG2000Lossless, fallbacks=[ImplicitVRLittleEndian])
    assert res.ok and res.transfer_syntax == ImplicitVRLittleEndian


def test_float_pixel_data_falls_back(tmp_path, rng):
    ds = make_float(rng)
    src = save(ds, tmp_path / "src.dcm")
    header = dcmread(src, stop_before_pixels=True)
    assert "FloatPixelData" not in header  # what the forwarder will see
    ok, reason = can_convert(header, "jpeg2000-lossless")
    assert not ok and "float" in reason
    assert can_convert(header, "explicit-little") == (True, None)
    for target in LOSSLESS + ["jpeg-baseline"]:
        res = convert_file(src, tmp_path / "out.dcm", TARGETS[target])
        assert res.ok and res.transfer_syntax == ExplicitVRLittleEndian, res
        assert "float pixel data" in res.reason
        out = check_meta(tmp_path / "out.dcm", ExplicitVRLittleEndian, ds)
        assert out.FloatPixelData == ds.FloatPixelData
    res = convert_file(src, tmp_path / "imp.dcm", JPEGLSLossless, fallbacks=["implicit-little"])
    assert res.ok and res.transfer_syntax == ImplicitVRLittleEndian
    assert dcmread(tmp_path / "imp.dcm").FloatPixelData == ds.FloatPixelData


def test_no_possible_fallback_writes_nothing(tmp_path, rng):
    src = save(make_float(rng), tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", JPEGLSLossless, fallbacks=[])
    assert not res.ok and res.transfer_syntax == "" and "float pixel data" in res.reason
    assert not (tmp_path / "out.dcm").exists()
    assert list(tmp_path.iterdir()) == [src]  # no temporary left behind


def test_undecodable_video_falls_back_to_as_received_only(tmp_path, rng):
    ds = _base("1.2.840.10008.5.1.4.1.1.77.1.4.1", "ES", MPEG4HP41)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns, ds.NumberOfFrames = 64, 64, 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    from pydicom.encaps import encapsulate
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(100)])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    src = save(ds, tmp_path / "src.dcm")
    ok, reason = can_convert(dcmread(src, stop_before_pixels=True), RLELossless)
    assert not ok and "cannot be decoded" in reason
    ok, reason = can_convert(dcmread(src, stop_before_pixels=True), ExplicitVRLittleEndian)
    assert not ok
    res = convert_file(src, tmp_path / "out.dcm", RLELossless)
    assert not res.ok and "cannot be decoded" in res.reason
    res = convert_file(src, tmp_path / "out.dcm", RLELossless, fallbacks=["explicit-little", "as-received"])
    assert res.ok and res.transfer_syntax == MPEG4HP41 and "cannot be decoded" in res.reason
    assert (tmp_path / "out.dcm").read_bytes() == src.read_bytes()


def test_bits_above_bits_stored_are_not_silently_dropped(tmp_path, rng):
    ds = make_ct_unsigned(rng)
    raw = np.frombuffer(ds.PixelData, "<u2").copy()
    raw[:10] |= 0x8000  # e.g. a retired overlay plane in bit 15
    ds.PixelData = raw.tobytes()
    src = save(ds, tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", JPEGLSLossless)
    assert res.ok and res.transfer_syntax == ExplicitVRLittleEndian
    assert "above Bits Stored" in res.reason
    assert np.array_equal(np.frombuffer(dcmread(tmp_path / "out.dcm").PixelData, "<u2"), raw)


def test_signed_sign_extension_is_not_mistaken_for_high_bits(tmp_path, rng):
    ds = make_ct_signed(rng)  # negative values stored sign-extended (0xFxxx)
    src = save(ds, tmp_path / "src.dcm")
    res = convert_file(src, tmp_path / "out.dcm", RLELossless)
    assert res.ok and res.transfer_syntax == RLELossless and res.reason is None


def test_can_convert_matrix(tmp_path, rng):
    def header(make):
        return dcmread(save(make(rng), tmp_path / f"{make.__name__}.dcm"), stop_before_pixels=True)

    ct, rgb, mf = header(make_ct_signed), header(make_us_rgb), header(make_multiframe)
    for t in LOSSLESS + ["explicit-little", "implicit-little", "as-received"]:
        assert can_convert(ct, t) == (True, None), t
        assert can_convert(rgb, TARGETS[t]) == (True, None), t
    assert can_convert(rgb, "jpeg-baseline") == (True, None)
    assert can_convert(mf, "jpeg-baseline") == (True, None)
    ok, reason = can_convert(ct, "jpeg-baseline")
    assert not ok and "8-bit" in reason
    small = _image(_base(CT, "CT"), np.zeros((16, 64), np.uint16), bits_stored=12)
    src = save(small, tmp_path / "small.dcm")
    ok, reason = can_convert(dcmread(src, stop_before_pixels=True), JPEG2000Lossless)
    assert not ok and "32x32" in reason
    res = convert_file(src, tmp_path / "small-out.dcm", JPEG2000Lossless)
    assert res.ok and res.transfer_syntax == ExplicitVRLittleEndian and "32x32" in res.reason
    assert can_convert(dcmread(src, stop_before_pixels=True), JPEGLSLossless) == (True, None)
    ct.PhotometricInterpretation = "YBR_PARTIAL_422"
    ok, reason = can_convert(ct, "jpegls-lossless")
    assert not ok and "YBR_PARTIAL_422" in reason
    overlay = header(make_ct_unsigned)
    overlay.add_new(0x60000010, "US", ROWS)
    overlay.add_new(0x60000100, "US", 16)
    overlay.add_new(0x60000102, "US", 15)
    ok, reason = can_convert(overlay, "rle-lossless")
    assert not ok and "overlay" in reason


# --- lossy JPEG baseline ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_us_rgb, make_multiframe])
def test_jpeg_baseline_sets_lossy_attributes(tmp_path, rng, make):
    ds = make(rng)
    src = save(ds, tmp_path / "src.dcm")
    original = pixels(src).astype(np.int16)
    res = convert_file(src, tmp_path / "out.dcm", "jpeg-baseline")
    assert res.ok and res.transfer_syntax == JPEGBaseline8Bit and res.reason is None, res
    out = check_meta(tmp_path / "out.dcm", JPEGBaseline8Bit, ds)
    assert out.LossyImageCompression == "01"
    assert out.LossyImageCompressionMethod == "ISO_10918_1"
    ratio = float(out.LossyImageCompressionRatio)
    assert ratio > 1.5
    assert abs(ratio - res.ratio) / ratio < 0.05
    expect = original.size / sum(len(f) for f in _frames(out))
    assert abs(ratio - expect) / expect < 0.01
    if ds.SamplesPerPixel == 3:
        assert out.PhotometricInterpretation == "YBR_FULL_422"
        assert out.PlanarConfiguration == 0
    out.pixel_array_options(as_rgb=True)
    decoded = out.pixel_array.astype(np.int16)
    assert decoded.shape == original.shape
    assert np.abs(decoded - original).mean() < 8.0  # quality 90, noisy synthetic chroma


def _frames(ds: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def test_jpeg_baseline_appends_to_earlier_lossy_steps(tmp_path, rng):
    ds = make_us_rgb(rng)
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = "10"
    ds.LossyImageCompressionMethod = "ISO_14495_1"
    src = save(ds, tmp_path / "src.dcm")
    assert convert_file(src, tmp_path / "out.dcm", JPEGBaseline8Bit).ok
    out = dcmread(tmp_path / "out.dcm")
    assert list(out.LossyImageCompressionMethod) == ["ISO_14495_1", "ISO_10918_1"]
    assert len(out.LossyImageCompressionRatio) == 2 and float(out.LossyImageCompressionRatio[0]) == 10
    # decompressing a lossy image keeps it marked lossy
    assert convert_file(tmp_path / "out.dcm", tmp_path / "back.dcm", ExplicitVRLittleEndian).ok
    back = dcmread(tmp_path / "back.dcm")
    assert back.LossyImageCompression == "01" and len(back.LossyImageCompressionMethod) == 2


def test_jpeg_baseline_refuses_16_bit(tmp_path, rng):
    src = save(make_ct_signed(rng), tmp_path / "src.dcm")
    original = pixels(src)
    res = convert_file(src, tmp_path / "out.dcm", "jpeg-baseline", fallbacks=["jpegls-lossless"])
    assert res.ok and res.transfer_syntax == JPEGLSLossless and "8-bit" in res.reason
    assert np.array_equal(pixels(tmp_path / "out.dcm"), original)
    assert "LossyImageCompression" not in dcmread(tmp_path / "out.dcm")


# --- third-party decoders (DCMTK) -------------------------------------------------------------------


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/bin/{tool}" if Path(f"/usr/bin/{tool}").exists() else None)
    if path is None:
        pytest.skip(f"DCMTK {tool} not installed")
    return path


DCMTK_DECODERS = {"jpegls-lossless": "dcmdjpls", "rle-lossless": "dcmdrle"}


@pytest.mark.parametrize("target", list(DCMTK_DECODERS))
@pytest.mark.parametrize("kind", list(IMAGES))
def test_dcmtk_decodes_our_output_exactly(tmp_path, rng, kind, target):
    tool = _dcmtk(DCMTK_DECODERS[target])
    ds = IMAGES[kind](rng)
    src = save(ds, tmp_path / "src.dcm")
    original = pixels(src)
    assert convert_file(src, tmp_path / "enc.dcm", target).ok
    run = subprocess.run([tool, str(tmp_path / "enc.dcm"), str(tmp_path / "dec.dcm")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dec = dcmread(tmp_path / "dec.dcm")
    assert dec.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert dec.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(pixels(tmp_path / "dec.dcm"), original)


@pytest.mark.parametrize("kind", ["ct-signed-12", "mr-16", "us-rgb-8"])
def test_we_decode_dcmtk_jpegls_exactly(tmp_path, rng, kind):
    tool = _dcmtk("dcmcjpls")
    src = save(IMAGES[kind](rng), tmp_path / "src.dcm")
    original = pixels(src)
    run = subprocess.run([tool, str(src), str(tmp_path / "dcmtk.dcm")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert dcmread(tmp_path / "dcmtk.dcm").file_meta.TransferSyntaxUID == JPEGLSLossless
    res = convert_file(tmp_path / "dcmtk.dcm", tmp_path / "out.dcm", RLELossless)
    assert res.ok and res.transfer_syntax == RLELossless
    assert np.array_equal(pixels(tmp_path / "out.dcm"), original)


def test_dcmtk_decodes_our_jpeg_baseline(tmp_path, rng):
    tool = _dcmtk("dcmdjpeg")
    src = save(make_us_rgb(rng), tmp_path / "src.dcm")
    original = pixels(src).astype(np.int16)
    assert convert_file(src, tmp_path / "enc.dcm", JPEGBaseline8Bit).ok
    ours = dcmread(tmp_path / "enc.dcm")
    ours.pixel_array_options(as_rgb=True)
    ours_rgb = ours.pixel_array.astype(np.int16)
    run = subprocess.run([tool, str(tmp_path / "enc.dcm"), str(tmp_path / "dec.dcm")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    dec = dcmread(tmp_path / "dec.dcm")
    assert dec.LossyImageCompression == "01"
    dec.pixel_array_options(as_rgb=True)
    dcmtk_rgb = dec.pixel_array.astype(np.int16)
    assert np.abs(dcmtk_rgb - original).mean() < 8.0
    # DCMTK (IJG libjpeg) and pydicom's decoder agree up to upsampling/rounding differences
    assert np.abs(dcmtk_rgb - ours_rgb).mean() < 1.0
