#!/usr/bin/env python3
"""bench/wan_refresh.py: a full `kind: studies` refresh over a far link, one query at a time vs. N at once.

Orthanc is filled with `studies` small studies (one CT series of two 8x8 instances each, uploaded
by REST), a WanRelay (tests/wan.py) adds `rtt`/2 each way in front of its DICOM port, and
`qrproxy refresh` (the CLI, a fresh SQLite index each time) learns every study down to its
instances: once with the node's `associations: 1` (one C-FIND at a time on one association, what
refresh did before issue 18) and once with `associations: N`. Each refresh costs one STUDY C-FIND,
then a SERIES and an IMAGE C-FIND per study; on a far link each is a round trip, so the serial
run is bounded by the RTT and the parallel one by how many are in flight.

Target (issue 18): parallel >= 5x faster than serial at RTT 40 ms for 1,000 studies.

    bench_refresh(studies=1000, rtt=0.040, associations=8) -> {'serial_s', 'parallel_s', 'ratio', 'studies'}

Usage: bench/wan_refresh.py [--studies 1000] [--rtt 0.040] [--associations 8] [--keep DIR]
  --keep DIR   fill Orthanc in DIR and keep it; a later run with the same DIR reuses what it holds
               (only the missing studies are uploaded).
Importing this module starts nothing; the paths to tests/ are added when a function needs them.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
UID_ROOT = "1.2.826.0.1.3680043.10.543.18"  # fixed UIDs: a kept Orthanc is reused as is
PER_STUDY = 2  # instances per study (one series)


def _use_tests() -> None:
    """tests/ holds the peers (Orthanc), dicomgen and the WAN relay; imported on first use only."""
    for p in (str(ROOT / "tests"), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)


def make_instance(study: int, number: int) -> bytes:
    """Instance `number` (1-based) of study `study`: a tiny but valid CT, fixed UIDs."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.file_meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}.3.{study}.{number}"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    p = study % 700
    ds.PatientName, ds.PatientID = f"WAN^PATIENT{p:04d}", f"WP{p:05d}"
    ds.PatientBirthDate, ds.PatientSex = f"19{40 + p % 60:02d}0101", "MF"[p % 2]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = f"{UID_ROOT}.1.{study}", f"{UID_ROOT}.2.{study}"
    ds.StudyDate, ds.StudyTime = f"2025{1 + study % 12:02d}{1 + study % 28:02d}", "120000"
    ds.AccessionNumber, ds.StudyID, ds.StudyDescription = f"WA{study:07d}", str(study % 10000), "WAN BENCH"
    ds.ReferringPhysicianName = "REF^DOCTOR"
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.BodyPartExamined = "CT", 1, "AXIAL", "HEAD"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(128)
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def fill_orthanc(orthanc: Any, studies: int, threads: int = 6) -> float:
    """Upload studies 0..`studies`-1 that Orthanc does not hold yet; seconds taken. Uploads go in
    order, so a run that stopped half-way resumes a little before where it stopped (re-sending an
    instance Orthanc holds is harmless)."""
    from peers import OrthancHTTPError

    t0 = time.perf_counter()
    have = int(orthanc.get("/statistics")["CountStudies"])
    start = studies if have >= studies else max(0, have - 2 * threads)
    work = [(i, n) for i in range(start, studies) for n in range(1, PER_STUDY + 1)]

    def upload(item: tuple[int, int]) -> None:
        data = make_instance(*item)
        for attempt in range(5):
            try:
                orthanc.upload(data)
                return
            except OrthancHTTPError:
                # Orthanc 1.10 sometimes fails to create a storage folder that a concurrent upload
                # is creating at the same moment ("Unable to create a subdirectory"): try again.
                if attempt == 4:
                    raise
                time.sleep(0.05 * (attempt + 1))

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(upload, work):
            pass
    return time.perf_counter() - t0


def refresh_config(work: Path, port: int, aet: str, associations: int) -> dict[str, Any]:
    """A qrproxy config whose only job refreshes every study the node holds (no query keys)."""
    return {
        "ae_title": "QRPROXY", "host": "127.0.0.1", "port": 11112,
        "database": f"sqlite:///{work / 'qrproxy.sqlite3'}", "spool_dir": str(work / "spool"),
        "log": {"level": "WARNING"},
        "nodes": {"PACS": {"ae_title": aet, "host": "127.0.0.1", "port": port, "roles": ["query"],
                           "timeout": "60s", "associations": associations}},
        "refresh": [{"name": "all", "node": "PACS", "kind": "studies", "every": "1d", "timeout": "4h",
                     "query": {}}],
    }


def timed_refresh(work: Path, port: int, aet: str, associations: int, studies: int) -> float:
    """Wall time of `qrproxy refresh all` into a new SQLite file; SystemExit unless every study was learnt."""
    import yaml
    from peers import run_cli

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    path = work / "qrproxy.yml"
    path.write_text(yaml.safe_dump(refresh_config(work, port, aet, associations), sort_keys=False))
    t0 = time.perf_counter()
    r = run_cli(path, "refresh", "all", timeout=4 * 3600)
    took = time.perf_counter() - t0
    expect = f"rows {studies}, new studies {studies}, updated 0, removed 0, ok"
    if r.returncode != 0 or expect not in r.stdout:
        raise SystemExit(f"qrproxy refresh (associations {associations}) failed:\n{r.stdout}\n{r.stderr[-3000:]}")
    return took


def bench_refresh(studies: int = 1000, rtt: float = 0.040, associations: int = 8,
                  keep: str | Path | None = None) -> dict[str, Any]:
    """Serial (associations: 1) and parallel (`associations`) full refresh of `studies` studies
    through a link of round-trip `rtt` seconds; {'serial_s', 'parallel_s', 'ratio', 'studies', ...}."""
    _use_tests()
    from peers import OrthancServer
    from wan import WanRelay

    base = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench-wan-refresh-"))
    orthanc = OrthancServer(base / "orthanc", aet="ORTHANC", http_port=None, dicom_port=None)
    orthanc.start()
    try:
        load_s = fill_orthanc(orthanc, studies)
        held = int(orthanc.get("/statistics")["CountStudies"])
        if held != studies:
            raise SystemExit(f"Orthanc holds {held} studies, not {studies} (a kept DIR filled for another count?)")
        with WanRelay(target=(orthanc.host, orthanc.dicom_port), delay=rtt / 2, rate=0) as wan:
            serial = timed_refresh(base / "serial", wan.port, orthanc.aet, 1, studies)
            parallel = timed_refresh(base / "parallel", wan.port, orthanc.aet, associations, studies)
    finally:
        orthanc.stop()
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return {"studies": studies, "rtt": rtt, "associations": associations, "load_s": round(load_s, 1),
            "serial_s": round(serial, 2), "parallel_s": round(parallel, 2), "ratio": round(serial / parallel, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--rtt", type=float, default=0.040, help="round trip added by the relay, seconds")
    ap.add_argument("--associations", type=int, default=8)
    ap.add_argument("--keep", metavar="DIR", help="fill Orthanc in DIR and keep it (reused by a later run)")
    args = ap.parse_args()
    r = bench_refresh(args.studies, args.rtt, args.associations, args.keep)
    print(f"{r['studies']} studies ({PER_STUDY} instances each), RTT {r['rtt'] * 1000:.0f} ms "
          f"(Orthanc filled in {r['load_s']} s)")
    print(f"  associations 1: {r['serial_s']:8.2f} s  {r['serial_s'] / r['studies'] * 1000:6.1f} ms/study")
    print(f"  associations {r['associations']}: {r['parallel_s']:8.2f} s  "
          f"{r['parallel_s'] / r['studies'] * 1000:6.1f} ms/study")
    print(f"  ratio: {r['ratio']:.2f}x (target >= 5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
