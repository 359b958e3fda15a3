"""Encryption at rest of the spool, end to end: storescu -> qrproxy (with a key file) -> Orthanc.

What the disk holds is checked by reading the spool files' bytes directly (no PatientName, no run of
the pixel bytes, the header's key id); what is delivered is checked in Orthanc (exact data set bytes,
decoded pixels); the key file commands are checked as a CLI. Each test runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
import os
import stat
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

import dicomgen
from support import (assert_all_success, cli, node, proxy_config, queue_rows, storescu, wait_orthanc_has,
                                wait_until)

MAGIC = b"QRPXENC\x00"  # the format's magic, written out here so the test does not trust the code's constant
J2K = "1.2.840.10008.1.2.4.90"


def key_id(path: Path) -> str:
    """The key id in an encrypted spool file's header (layout: docs/operations.md "Encryption at rest")."""
    data = path.read_bytes()[:300]
    assert data[:8] == MAGIC, f"{path} does not start with the encryption magic: {data[:16]!r}"
    n = data[10]
    return data[11:11 + n].decode("ascii")


def spool_files(proc: Any) -> list[Path]:
    """Every file under the spool but state/, which holds per-node line figures (bytes/s, counts:
    scu/linespeed.py), no patient data (checked in test_spool_encrypted_delivery_exact_and_variants_encrypted)."""
    root = proc.dir / "spool"
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "state")


def make_instances(n: int, rows: int = 256, name: str = "SECRET^PATIENTNAME", **kw: Any) -> list[Any]:
    study = pydicom.uid.generate_uid()
    series = pydicom.uid.generate_uid()
    return [dicomgen.make_ct(study_uid=study, series_uid=series, instance_number=i + 1, rows=rows, cols=rows,
                             patient_name=name, **kw) for i in range(n)]


def assert_nothing_in_clear(files: list[Path], datasets: list[Any], name: bytes) -> None:
    assert files, "no spool files to check"
    for f in files:
        raw = f.read_bytes()
        assert raw[:8] == MAGIC, f"{f.relative_to(f.parents[2])} is not encrypted"
        assert name not in raw, f"{f} holds the patient name in clear"
        for ds in datasets:
            pix = bytes(ds.PixelData)
            for off in (0, len(pix) // 2, len(pix) - 64):
                assert pix[off:off + 32] not in raw, f"{f} holds pixel bytes of {ds.SOPInstanceUID} in clear"


def new_proxy_with_key(qrproxy: Any, cfg: dict[str, Any]) -> Any:
    cfg = dict(cfg, encryption={"key_file": "etc/spool.key"})
    proc = qrproxy(cfg, start=False)
    res = cli(proc, "keys", "new")
    assert res.returncode == 0, f"keys new: exit {res.returncode}\n{res.stdout}{res.stderr}"
    proc.start()
    return proc


@pytest.mark.orthanc
def test_spool_encrypted_delivery_exact_and_variants_encrypted(db_url: str, orthanc_factory: Any, qrproxy: Any,
                                                              tmp_path: Path) -> None:
    pacs = orthanc_factory(aet="PACS")
    wan = orthanc_factory(aet="WAN")
    proc = new_proxy_with_key(qrproxy, proxy_config(db_url, {
        "PACS": node(pacs), "WAN": node(wan, transfer_syntax="jpeg2000-lossless")}))
    datasets = make_instances(5)
    files = dicomgen.write_all(datasets, tmp_path / "in")
    res = storescu(proc.port, files, aec="QRPROXY")
    assert_all_success(res, files)

    sops = {str(ds.SOPInstanceUID): (ds, f) for ds, f in zip(datasets, files)}
    index = wait_orthanc_has(pacs, sops, timeout=90)
    for sop, (ds, f) in sops.items():
        assert dicomgen.body_bytes(pacs.instance_file(index[sop])) == dicomgen.body_bytes(f), \
            f"PACS did not receive the original bytes of {sop}"
    wan_index = wait_orthanc_has(wan, sops, timeout=120)
    for sop, (ds, _f) in sops.items():
        got = pydicom.dcmread(io.BytesIO(wan.instance_file(wan_index[sop])))
        assert got.file_meta.TransferSyntaxUID == J2K
        assert np.array_equal(got.pixel_array, ds.pixel_array), f"J2K pixels of {sop} differ"
        assert str(got.PatientName) == "SECRET^PATIENTNAME"

    on_disk = spool_files(proc)
    objects = [p for p in on_disk if "objects" in p.parts]
    variants = [p for p in on_disk if "variants" in p.parts]
    assert len(objects) == 5 and len(variants) == 5, f"{len(objects)} objects, {len(variants)} variants"
    assert_nothing_in_clear(on_disk, datasets, b"SECRET^PATIENTNAME")
    assert {key_id(p) for p in on_disk} == {"k1"}
    # the one plain folder, state/ (line figures), holds nothing of the patients or their instances
    for f in (proc.dir / "spool" / "state").glob("*"):
        raw = f.read_bytes()
        assert b"SECRET" not in raw and not any(sop.encode() in raw for sop in sops), f"{f}: {raw[:200]!r}"

    # An identical re-send is still recognised (digests are of the plaintext): no second copy kept.
    res = storescu(proc.port, files, aec="QRPROXY")
    assert_all_success(res, files)
    assert len([p for p in spool_files(proc) if "objects" in p.parts]) == 5


def test_keys_new_mode_and_refusal_and_config_errors(tmp_path: Path, qrproxy: Any) -> None:
    from peers import free_port

    proc = qrproxy({"ae_title": "QRPROXY", "host": "127.0.0.1", "port": free_port(), "database": "sqlite:///q.db",
                    "encryption": {"key_file": "etc/spool.key"}}, start=False)
    key = proc.dir / "etc" / "spool.key"
    res = cli(proc, "check")
    assert res.returncode == 2 and "encryption.key_file" in res.stderr and "does not exist" in res.stderr, res.stderr
    res = cli(proc, "keys", "new")
    assert res.returncode == 0, res.stderr
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    data = json.loads(key.read_text())
    assert len(data["keys"]) == 1 and data["current"] == data["keys"][0]["id"]
    before = key.read_bytes()
    res = cli(proc, "keys", "new")
    assert res.returncode != 0 and "already exists" in res.stderr
    assert key.read_bytes() == before
    assert cli(proc, "check").returncode == 0
    key.chmod(0o640)
    res = cli(proc, "check")
    assert res.returncode == 2 and "encryption.key_file" in res.stderr and "0640" in res.stderr, res.stderr
    line = next(i for i, ln in enumerate(proc.config_path.read_text().splitlines(), 1) if "key_file" in ln)
    assert f":{line}:" in res.stderr, res.stderr
    # serve refuses to start on a bad key file (exit 2) rather than run with a plain spool
    assert proc.cli("serve", timeout=60).returncode == 2
    key.chmod(0o600)
    res = cli(proc, "keys", "rotate")
    assert res.returncode == 0, res.stderr
    listed = cli(proc, "keys", "list").stdout.split("\n")
    assert [ln.split()[0] for ln in listed if ln.strip()] == [k["id"] for k in json.loads(key.read_text())["keys"]]
    assert len(json.loads(key.read_text())["keys"]) == 2


@pytest.mark.orthanc
def test_rotation_old_files_delivered_and_reencrypt(db_url: str, orthanc_factory: Any, qrproxy: Any,
                                                   tmp_path: Path) -> None:
    orthanc = orthanc_factory(start=False)  # upstream down: everything stays in the spool
    proc = new_proxy_with_key(qrproxy, proxy_config(db_url, {"PACS": node(orthanc)}))
    first = make_instances(3, name="BEFORE^ROTATION")
    files1 = dicomgen.write_all(first, tmp_path / "a")
    assert_all_success(storescu(proc.port, files1, aec="QRPROXY"), files1)
    old = set(spool_files(proc))
    assert len(old) == 3 and {key_id(p) for p in old} == {"k1"}

    res = cli(proc, "keys", "rotate")
    assert res.returncode == 0, res.stderr
    time.sleep(1.5)  # the running proxy re-reads the changed key file at most once a second
    second = make_instances(3, name="AFTER^ROTATION")
    files2 = dicomgen.write_all(second, tmp_path / "b")
    assert_all_success(storescu(proc.port, files2, aec="QRPROXY"), files2)
    new = set(spool_files(proc)) - old
    assert len(new) == 3 and {key_id(p) for p in new} == {"k2"}, {p.name: key_id(p) for p in new}
    assert {key_id(p) for p in old} == {"k1"}

    # re-encrypt while serving: the old files move to k2, the rest is untouched
    before_new = {p: p.read_bytes() for p in new}
    res = cli(proc, "keys", "reencrypt")
    assert res.returncode == 0, f"{res.stdout}{res.stderr}"
    assert {key_id(p) for p in spool_files(proc)} == {"k2"}
    assert all(p.read_bytes() == b for p, b in before_new.items())
    after_first = {p: p.read_bytes() for p in spool_files(proc)}
    res = cli(proc, "keys", "reencrypt")  # idempotent: nothing left to do
    assert res.returncode == 0
    assert {p: p.read_bytes() for p in spool_files(proc)} == after_first
    assert_nothing_in_clear(spool_files(proc), first + second, b"BEFORE^ROTATION")

    orthanc.start()
    sent = {str(ds.SOPInstanceUID): f for ds, f in zip(first + second, files1 + files2)}
    index = wait_orthanc_has(orthanc, sent, timeout=120)
    for sop, f in sent.items():
        assert dicomgen.body_bytes(orthanc.instance_file(index[sop])) == dicomgen.body_bytes(f), sop


@pytest.mark.orthanc
def test_tampered_spool_file_is_held_others_delivered(db_url: str, orthanc_factory: Any, qrproxy: Any,
                                                     tmp_path: Path) -> None:
    orthanc = orthanc_factory(start=False)
    proc = new_proxy_with_key(qrproxy, proxy_config(db_url, {"PACS": node(orthanc)},
                                                    forward={"max_attempts": 3}))
    datasets = make_instances(6, rows=320)  # 200 KB of pixels: several 64 KiB chunks per file
    files = dicomgen.write_all(datasets, tmp_path / "in")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)
    on_disk = spool_files(proc)
    assert len(on_disk) == 6
    flipped, cut = on_disk[1], on_disk[4]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x04  # a bit flip in the middle of the file: inside a pixel data chunk
    flipped.write_bytes(bytes(data))
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 1000)

    orthanc.start()
    sops = {str(ds.SOPInstanceUID): ds for ds in datasets}

    def settled() -> list[dict[str, Any]] | None:
        rows = [r for r in queue_rows(proc, "--node", "PACS") if r["sop_instance_uid"] in sops]
        states = Counter(r["state"] for r in rows)
        return rows if states.get("sent", 0) + states.get("held", 0) == 6 else None

    rows = wait_until(settled, 120, "every row sent or held")
    held = [r for r in rows if r["state"] == "held"]
    assert len(held) == 2, [(r["state"], r["last_error"]) for r in rows]
    for r in held:
        assert "failed authentication" in (r["last_error"] or ""), r["last_error"]
    assert any("chunk" in (r["last_error"] or "") for r in held)
    held_sops = {r["sop_instance_uid"] for r in held}

    index = wait_orthanc_has(orthanc, set(sops) - held_sops, timeout=90)
    assert not held_sops & set(index), "a damaged instance reached Orthanc"
    for sop in set(sops) - held_sops:  # every delivered image is the right one, pixel for pixel
        got = pydicom.dcmread(io.BytesIO(orthanc.instance_file(index[sop])))
        assert np.array_equal(got.pixel_array, sops[sop].pixel_array), sop
    assert proc.running, "qrproxy stopped"
    assert os.path.exists(flipped) and os.path.exists(cut)  # kept for inspection, not deleted


@pytest.mark.orthanc
def test_large_encrypted_instance_streams_in_and_out(tmp_path: Path, qrproxy: Any, storescp: Any,
                                                     db_url: str) -> None:
    """Encrypting on the way in and decrypting on the way out keep memory flat: a 120 MB instance
    does not grow qrproxy by anything near its size, and arrives byte-identical."""
    from test_large_instance import rss_kb

    mb = 120
    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.PatientName, ds.PatientID = "LARGE^ENCRYPTED", "BIGENC"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), "OT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = mb * 4
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    frame = np.random.default_rng(5).integers(0, 255, 512 * 512, dtype=np.uint8).tobytes()
    ds.PixelData = frame * (mb * 4)
    src = tmp_path / "big.dcm"
    ds.save_as(src, enforce_file_format=True)
    del ds
    size = src.stat().st_size

    proc = new_proxy_with_key(qrproxy, proxy_config(db_url, {"SINK": node(storescp)}))
    before = rss_kb(proc.pid, "VmRSS")
    res = storescu(proc.port, [src], aec="QRPROXY", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    wait_until(lambda: storescp.received_files(), 300, "the large instance at storescp")
    received = storescp.received_files()[0]
    wait_until(lambda: received.stat().st_size >= size - 1024, 300, "storescp to finish writing")
    grown_mb = (rss_kb(proc.pid, "VmHWM") - before) / 1024
    print(f"peak RSS growth {grown_mb:.1f} MB for {size / 1e6:.0f} MB, encrypted spool")
    assert grown_mb < mb / 3, f"qrproxy peak RSS grew by {grown_mb:.0f} MB for a {size / 1e6:.0f} MB instance"
    assert dicomgen.body_bytes(received) == dicomgen.body_bytes(src), "the instance changed on the way"
    spooled = [p for p in spool_files(proc) if "objects" in p.parts]
    assert len(spooled) == 1
    with open(spooled[0], "rb") as f:
        assert f.read(8) == MAGIC
        f.seek(size // 2)
        assert frame[1000:1064] not in f.read(4 << 20)


def test_conversion_reads_and_writes_encrypted_and_rebuilds_a_damaged_cache(tmp_path: Path) -> None:
    """The conversion pool's entry point, called directly: an encrypted original gives an encrypted
    J2K variant with identical pixels; a damaged cached variant is made again; a damaged original
    raises, naming the chunk (the forwarder then holds the row)."""
    from qrproxy.store import crypto, keys
    from qrproxy.scu.forward import convert_variant

    key_file = tmp_path / "spool.key"
    keys.new_key_file(key_file)
    ring = keys.load(key_file)
    ds = make_instances(1, rows=300)[0]
    plain = dicomgen.write_dataset(ds, tmp_path / "plain.dcm")
    src = tmp_path / "orig.dcm"
    with crypto.open_reader(plain, None) as fin, crypto.open_writer(src, ring) as fout:
        crypto.copy_plaintext(fin, fout)
    dest = tmp_path / "variants" / "orig.dcm.j2k.dcm"

    def check_variant() -> None:
        raw = dest.read_bytes()
        assert raw[:8] == MAGIC and b"SECRET^PATIENTNAME" not in raw
        with crypto.open_reader(dest, ring) as f:
            got = pydicom.dcmread(f)
            assert got.file_meta.TransferSyntaxUID == J2K
            assert np.array_equal(got.pixel_array, ds.pixel_array)

    path, result, _ = convert_variant(str(src), str(dest), J2K, ring)
    assert result.ok and result.transfer_syntax == J2K and Path(path) == dest
    check_variant()
    damaged = bytearray(dest.read_bytes())
    damaged[len(damaged) // 2] ^= 0x10
    dest.write_bytes(bytes(damaged))
    path, result, _ = convert_variant(str(src), str(dest), J2K, ring)
    assert result.ok and dest.read_bytes() != bytes(damaged)
    check_variant()

    blob = bytearray(src.read_bytes())
    blob[-100] ^= 0x01
    src.write_bytes(bytes(blob))
    dest.unlink()
    with pytest.raises(crypto.AuthenticationError, match="chunk"):
        convert_variant(str(src), str(dest), J2K, ring)
    assert not dest.exists()


@pytest.mark.orthanc
def test_kill9_mid_transfer_leaves_nothing_in_clear(db_url: str, orthanc: Any, qrproxy: Any, tmp_path: Path) -> None:
    """Bytes of a transfer still arriving are encrypted as they land in spool/incoming: a kill -9 in
    the middle leaves nothing readable, and what was acknowledged is delivered after the restart."""
    import subprocess

    from support import dcmtk_env, store_responses, storescu_argv

    proc = new_proxy_with_key(qrproxy, proxy_config(db_url, {"PACS": node(orthanc)}))
    datasets = make_instances(40, rows=512, name="INFLIGHT^PATIENT")
    files = dicomgen.write_all(datasets, tmp_path / "in")
    uid_of = {str(p): str(ds.SOPInstanceUID) for p, ds in zip(files, datasets)}
    log_path = tmp_path / "storescu.log"
    with open(log_path, "w") as log:
        scu = subprocess.Popen(storescu_argv(proc.port, files, aec="QRPROXY", extra=["-pdu", "16384"]), stdout=log,
                               stderr=subprocess.STDOUT, env=dcmtk_env(), start_new_session=True)
    try:
        def mid_transfer() -> bool:  # some acknowledged, and a transfer half-way into incoming/
            if scu.poll() is not None:
                return True
            sizes = []
            for p in (proc.dir / "spool" / "incoming").glob("*"):
                try:
                    sizes.append(p.stat().st_size)
                except FileNotFoundError:  # renamed into objects/ meanwhile
                    pass
            return len(store_responses(log_path.read_text())) >= 5 and any(n > 200_000 for n in sizes)

        wait_until(mid_transfer, 120, "storescu half-way through an instance", interval=0.01)
        assert scu.poll() is None, "storescu finished before the kill"
        assert proc.kill9() == -9
        scu.wait(60)
    finally:
        if scu.poll() is None:
            scu.kill()
            scu.wait(10)
    left = spool_files(proc)
    print(f"after kill -9: {len(left)} spool files, {sum('incoming' in p.parts for p in left)} in incoming/")
    assert_nothing_in_clear(left, datasets, b"INFLIGHT^PATIENT")
    acked = {uid_of[f] for f, st in store_responses(log_path.read_text()).items() if st == "Success"}
    assert acked
    proc.start()
    index = wait_orthanc_has(orthanc, acked, timeout=120)
    for ds, f in zip(datasets, files):
        if str(ds.SOPInstanceUID) in acked:
            assert dicomgen.body_bytes(orthanc.instance_file(index[str(ds.SOPInstanceUID)])) == dicomgen.body_bytes(f)
