"""Store and forward against real peers on loopback.

Modalities are DCMTK storescu (from /usr/bin) or a raw pynetdicom SCU; upstreams are Orthanc, DCMTK
storescp, or small scripted pynetdicom SCPs (real peers on real sockets, used where an answer such as
0xA700 must be scripted). qrproxy runs as a subprocess. Every outcome is checked against what the
receiving peer reports (Orthanc REST, storescp's files and log, the scripted SCP's record, storescu's
output), never against what qrproxy says about itself; the queue CLI is checked as a CLI.

Each test runs on SQLite and on PostgreSQL (``db_url``).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import _config

import dicomgen
from peers import LOCALHOST, OrthancServer, StoreSCP, free_port
from support import (
    Soft,
    assert_all_success,
    changed_count,
    cli,
    dcmtk_env,
    echo_ok,
    node,
    orthanc_index,
    proxy_config,
    pynetdicom_store,
    queue_rows,
    settles,
    spool_files,
    stays,
    store_responses,
    storescp_deliveries,
    storescp_sops,
    storescu,
    storescu_argv,
    wait_orthanc_has,
    wait_storescp_has,
    wait_until,
)

SR_ROUTE = r"^1\.2\.840\.10008\.5\.1\.4\.1\.1\.88\.\d{1,2}$"



# ==============================================================================================
# 1. A multi-series study arrives at Orthanc byte for byte
# ==============================================================================================


@pytest.mark.orthanc
def test_study_reaches_orthanc_byte_identical(db_url: str, orthanc: OrthancServer, qrproxy: Any,
                                              tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc)}))
    study = dicomgen.make_study(3, 5)
    files = dicomgen.write_all(study, tmp_path / "study")

    res = storescu(proc.port, files, aec="QRPROXY")
    assert_all_success(res, files)

    sent = {str(ds.SOPInstanceUID): path for ds, path in zip(study, files)}
    index = wait_orthanc_has(orthanc, sent)
    assert set(index) == set(sent), f"Orthanc holds unexpected instances: {set(index) - set(sent)}"

    mismatched = []
    for sop, path in sent.items():
        data = orthanc.instance_file(index[sop])
        if dicomgen.body_bytes(data) != dicomgen.body_bytes(path):
            original = pydicom.dcmread(path)
            got = pydicom.dcmread(io.BytesIO(data))
            diffs = dicomgen.compare_datasets(original, got) or ["(same elements, different encoding)"]
            mismatched.append(f"{sop} (transfer syntax {dicomgen.transfer_syntax(data)}): {diffs[:5]}")
    assert not mismatched, f"{len(mismatched)} of {len(sent)} instances differ in Orthanc:\n" + "\n".join(mismatched)

    study_uid = str(study[0].StudyInstanceUID)
    studies = orthanc.find("Study", {"StudyInstanceUID": study_uid}, expand=True)
    assert len(studies) == 1 and len(studies[0]["Series"]) == 3, studies
    # Not impersonating (the default): Orthanc saw qrproxy's own AE title as the calling AE.
    remote = orthanc.get_bytes(f"/instances/{index[next(iter(sent))]}/metadata/RemoteAET").decode()
    assert remote == "QRPROXY"


# ==============================================================================================
# 2. Routes: SR to REPORTS only (remove_original), CT to the store nodes only
# ==============================================================================================


@pytest.mark.orthanc
def test_sr_route_to_reports_only(db_url: str, orthanc: OrthancServer, storescp: StoreSCP, qrproxy: Any,
                                  tmp_path: Path) -> None:
    cfg = proxy_config(
        db_url,
        {"PACS": node(orthanc), "REPORTS": node(storescp, roles=())},
        routes=[{"name": "SR to reports", "when": {"0008,0016": SR_ROUTE}, "to": ["REPORTS"],
                 "remove_original": True}],
    )
    proc = qrproxy(cfg)
    cts = dicomgen.make_study(1, 3)
    sr = dicomgen.make_basic_text_sr(study_uid=cts[0].StudyInstanceUID)
    # The SR last: REPORTS' queue is sent in order, so a CT wrongly queued for REPORTS arrives before it.
    files = dicomgen.write_all([*cts, sr], tmp_path / "in")

    res = storescu(proc.port, files, aec="QRPROXY")
    assert_all_success(res, files)

    ct_uids = {str(ds.SOPInstanceUID) for ds in cts}
    sr_uid = str(sr.SOPInstanceUID)
    wait_orthanc_has(orthanc, ct_uids)
    wait_storescp_has(storescp, {sr_uid})
    received_sr = pydicom.dcmread(next(p for p in storescp.received_files() if p.name.endswith(sr_uid)))
    assert received_sr.SOPClassUID == dicomgen.BASIC_TEXT_SR
    assert received_sr.ContentSequence[0].TextValue == sr.ContentSequence[0].TextValue

    assert stays(lambda: set(orthanc_index(orthanc)) == ct_uids, 2.0), (
        f"Orthanc got more than the CT: {set(orthanc_index(orthanc)) - ct_uids} (SR is {sr_uid})")
    assert storescp_sops(storescp) == {sr_uid}, f"REPORTS got CT instances: {storescp_sops(storescp) - {sr_uid}}"


# ==============================================================================================
# 3. Called AE aliases (QRP_<ae> and the node's own AE) and no loops back to the sender
# ==============================================================================================


@pytest.mark.orthanc
def test_called_ae_alias_and_no_loop(db_url: str, orthanc: OrthancServer, storescp: StoreSCP, qrproxy: Any,
                                     tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc), "REPORTS": node(storescp)}))
    alias, own_ae, from_pacs, barrier = (dicomgen.make_ct() for _ in range(4))
    f_alias, f_own, f_loop, f_barrier = dicomgen.write_all([alias, own_ae, from_pacs, barrier], tmp_path / "in")

    # storescp's AE via the QRP_ prefix, then via its own AE title: REPORTS only.
    assert_all_success(storescu(proc.port, [f_alias], aec=f"QRP_{storescp.aet}"), [f_alias])
    assert_all_success(storescu(proc.port, [f_own], aec=storescp.aet), [f_own])
    # Sent by the PACS itself (calling AE = Orthanc's AE) to qrproxy: every store node but the PACS.
    assert_all_success(storescu(proc.port, [f_loop], aec="QRPROXY", aet=orthanc.aet), [f_loop])
    # A plain send to qrproxy reaches both; it is also the barrier: queues are sent in order.
    assert_all_success(storescu(proc.port, [f_barrier], aec="QRPROXY"), [f_barrier])

    uid = lambda ds: str(ds.SOPInstanceUID)  # noqa: E731
    wait_storescp_has(storescp, {uid(alias), uid(own_ae), uid(from_pacs), uid(barrier)})
    wait_orthanc_has(orthanc, {uid(barrier)})
    assert stays(lambda: set(orthanc_index(orthanc)) == {uid(barrier)}, 1.5), (
        "Orthanc received instances addressed to REPORTS only or sent by Orthanc itself: "
        f"{set(orthanc_index(orthanc)) - {uid(barrier)}} "
        f"(alias {uid(alias)}, own AE {uid(own_ae)}, from PACS {uid(from_pacs)})")


# ==============================================================================================
# 4. Impersonation: the upstream sees the modality's calling AE title
# ==============================================================================================


@pytest.mark.orthanc
def test_impersonation_keeps_calling_ae(db_url: str, orthanc: OrthancServer, qrproxy: Any, tmp_path: Path) -> None:
    assert orthanc.config()["DicomCheckCalledAet"] is False and orthanc.config()["DicomAlwaysAllowStore"] is True
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc, impersonate=True)}))
    ct = dicomgen.make_study(1, 2)
    mr = [dicomgen.make_ct(SeriesDescription="FROM MODMR")]
    ct_files = dicomgen.write_all(ct, tmp_path / "ct")
    mr_files = dicomgen.write_all(mr, tmp_path / "mr")

    assert_all_success(storescu(proc.port, ct_files, aec="QRPROXY", aet="MODCT"), ct_files)
    assert_all_success(storescu(proc.port, mr_files, aec="QRPROXY", aet="MODMR"), mr_files)

    expected = {str(ds.SOPInstanceUID): "MODCT" for ds in ct} | {str(mr[0].SOPInstanceUID): "MODMR"}
    index = wait_orthanc_has(orthanc, expected)
    seen = {sop: orthanc.get_bytes(f"/instances/{index[sop]}/metadata/RemoteAET").decode() for sop in expected}
    assert seen == expected, f"Orthanc's RemoteAET per instance: {seen}"


# ==============================================================================================
# 5. Upstream down: everything is acknowledged, queued, held on request, delivered when it is up
# ==============================================================================================


@pytest.mark.orthanc
def test_upstream_down_then_up(db_url: str, orthanc_factory: Any, qrproxy: Any, tmp_path: Path) -> None:
    orthanc = orthanc_factory(start=False)  # ports reserved now, started later
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc)}))
    main = dicomgen.make_study(2, 20)
    side = dicomgen.make_study(1, 10, patient_id="SFPAT2")
    files = dicomgen.write_all([*main, *side], tmp_path / "in")

    res = storescu(proc.port, files, aec="QRPROXY")
    assert_all_success(res, files)  # Success while the upstream is unreachable: the spool holds them

    main_uids = {str(ds.SOPInstanceUID) for ds in main}
    side_uids = {str(ds.SOPInstanceUID) for ds in side}
    side_study = str(side[0].StudyInstanceUID)
    soft = Soft()

    def queued() -> None:
        rows = [r for r in queue_rows(proc, "--node", "PACS") if r["sop_instance_uid"] in main_uids | side_uids]
        assert {r["sop_instance_uid"] for r in rows} == main_uids | side_uids, f"{len(rows)} rows of 50 listed"
        states = Counter(r["state"] for r in rows)
        assert set(states) <= {"pending", "inflight"}, f"states while PACS is down: {states}"
        assert states["pending"] >= 45, f"expected the rows pending while PACS is down: {states}"
        assert all(r["node"] == "PACS" for r in rows)
        assert {r["study_instance_uid"] for r in rows if r["sop_instance_uid"] in side_uids} == {side_study}

    def status_shows_depth() -> None:
        st = cli(proc, "status", "--no-echo")
        assert st.returncode == 0, f"status exit {st.returncode}: {st.stderr}"
        lines = [ln for ln in st.stdout.splitlines() if re.match(r"\s*PACS\b", ln) and re.search(r"\b50\b", ln)]
        assert lines, f"status does not show 50 queued for PACS:\n{st.stdout}"

    def hold_side_study() -> bool:
        # hold waits (bounded) for rows a failing attempt has claimed; should it say some are still
        # being sent, an operator asks again, and so does this loop.
        total = 0
        deadline = time.monotonic() + 60
        while True:
            held = cli(proc, "queue", "hold", "--node", "PACS", "--study", side_study)
            assert held.returncode == 0, f"queue hold exit {held.returncode}: {held.stdout}{held.stderr}"
            n = changed_count(held)
            assert n is not None, f"queue hold does not say how many rows it changed: {held.stdout!r}"
            total += n
            states = Counter(r["state"] for r in queue_rows(proc, "--study", side_study))
            if states == Counter(held=10) or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        assert total == 10, f"queue hold changed {total} rows in all, the study has 10"
        assert states == Counter(held=10), f"rows of the held study: {states}"
        return True

    soft.run("queue list while PACS is down", lambda: settles(queued))
    soft.run("status while PACS is down", lambda: settles(status_shows_depth))
    held_ok = soft.run("queue hold --study", hold_side_study) is True

    orthanc.start()
    wait_orthanc_has(orthanc, main_uids if held_ok else main_uids | side_uids, timeout=90)

    if held_ok:
        assert stays(lambda: not (side_uids & set(orthanc_index(orthanc))), 2.5), (
            "instances of the held study reached Orthanc")

        def release() -> None:
            rel = cli(proc, "queue", "release", "--node", "PACS", "--study", side_study)
            assert rel.returncode == 0, f"queue release exit {rel.returncode}: {rel.stdout}{rel.stderr}"
            assert changed_count(rel) == 10, f"queue release should change 10 rows: {rel.stdout!r}"

        soft.run("queue release --study", release)
        wait_orthanc_has(orthanc, main_uids | side_uids, timeout=60)

    def states() -> Counter[str]:
        rows = queue_rows(proc, "--node", "PACS")
        return Counter(r["state"] for r in rows if r["sop_instance_uid"] in main_uids | side_uids)

    def all_sent() -> None:
        wait_until(lambda: states() == Counter(sent=50), 60,
                   lambda: f"queue rows after delivery: {states()}")

    soft.run("queue list after delivery", all_sent)
    soft.assert_ok()


# ==============================================================================================
# 6. Upstream refuses: transient statuses are retried, permanent ones held until released
# ==============================================================================================


def test_upstream_failure_statuses(db_url: str, scripted_scp: Any, qrproxy: Any, tmp_path: Path) -> None:
    strict_accepts = threading.Event()
    first, second = dicomgen.make_ct(), dicomgen.make_ct()
    a, b = str(first.SOPInstanceUID), str(second.SOPInstanceUID)
    refusal = {a: 0xA900, b: 0xC000}  # Data Set does not match SOP Class; Cannot Understand

    flaky = scripted_scp("FLAKY", lambda sop, n: 0xA700 if n <= 2 else 0x0000)
    strict = scripted_scp("STRICT", lambda sop, n: 0x0000 if strict_accepts.is_set() else refusal[sop])
    full = scripted_scp("FULL", lambda sop, n: 0xA702)
    cfg = proxy_config(db_url, {"FLAKY": node(flaky), "STRICT": node(strict), "FULL": node(full)},
                       forward={"max_attempts": 3})
    proc = qrproxy(cfg)
    files = dicomgen.write_all([first, second], tmp_path / "in")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)

    # Transient 0xA700 twice, then Success: retried and delivered, byte-for-byte the same data set.
    wait_until(lambda: flaky.snapshot()[1] == {a, b}, 90,
               lambda: f"FLAKY attempts {dict(flaky.snapshot()[0])}, accepted {flaky.snapshot()[1]}")
    assert flaky.snapshot()[0] == Counter({a: 3, b: 3})
    for ds in (first, second):
        assert not dicomgen.compare_datasets(ds, flaky.accepted[str(ds.SOPInstanceUID)])

    # 0xA7xx forever: tried max_attempts (3) times, then given up on (no fourth attempt).
    wait_until(lambda: full.snapshot()[0] == Counter({a: 3, b: 3}), 90,
               lambda: f"FULL attempts {dict(full.snapshot()[0])}")
    # Permanent statuses: one attempt each, never retried by itself.
    wait_until(lambda: strict.snapshot()[0] == Counter({a: 1, b: 1}), 60,
               lambda: f"STRICT attempts {dict(strict.snapshot()[0])}")
    assert stays(lambda: full.snapshot()[0] == Counter({a: 3, b: 3})
                 and strict.snapshot()[0] == Counter({a: 1, b: 1}), 3.0), (
        f"retried after giving up: FULL {dict(full.snapshot()[0])}, STRICT {dict(strict.snapshot()[0])}")

    # The queue CLI shows why they are held. The proxy records an answer after the peer gave it:
    # the snapshot is asked again until the last answers are written.
    def held_rows_say_why() -> None:
        rows = queue_rows(proc, "--node", "STRICT", "--state", "held")
        by_sop = {r["sop_instance_uid"]: r for r in rows}
        assert set(by_sop) == {a, b}, rows
        for sop in (a, b):
            code = refusal[sop]
            assert by_sop[sop]["last_status"] == code, by_sop[sop]
            assert f"{code:04X}" in (by_sop[sop]["last_error"] or "").upper(), by_sop[sop]
            assert by_sop[sop]["state"] == "held"
        full_rows = queue_rows(proc, "--node", "FULL", "--state", "held")
        assert {r["sop_instance_uid"] for r in full_rows} == {a, b}, full_rows
        assert all(r["attempts"] == 3 and r["last_status"] == 0xA702 for r in full_rows), full_rows
        flaky_rows = queue_rows(proc, "--node", "FLAKY")
        assert all(r["state"] == "sent" for r in flaky_rows), flaky_rows

    settles(held_rows_say_why, 30)

    # The upstream is fixed; release puts the held rows back and they are delivered.
    strict_accepts.set()
    rel = cli(proc, "queue", "release", "--node", "STRICT")
    assert rel.returncode == 0, rel.stdout + rel.stderr
    assert changed_count(rel) == 2, f"queue release --node STRICT: {rel.stdout!r}"
    wait_until(lambda: strict.snapshot()[1] == {a, b}, 90,
               lambda: f"STRICT attempts {dict(strict.snapshot()[0])}, accepted {strict.snapshot()[1]}")
    assert strict.snapshot()[0] == Counter({a: 2, b: 2})
    # FULL stays held: release touched only STRICT.
    assert stays(lambda: full.snapshot()[0] == Counter({a: 3, b: 3}), 1.5), dict(full.snapshot()[0])


# ==============================================================================================
# 7. kill -9 in the middle of a transfer: nothing acknowledged is lost
# ==============================================================================================


@pytest.mark.orthanc
def test_kill9_loses_nothing_acknowledged(db_url: str, orthanc: OrthancServer, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc)}))
    datasets = dicomgen.make_study(4, 50, rows=32, cols=32)
    files = dicomgen.write_all(datasets, tmp_path / "in")
    uid_of = {str(p): str(ds.SOPInstanceUID) for p, ds in zip(files, datasets)}

    log_path = tmp_path / "storescu.log"
    with open(log_path, "w") as log:
        scu = subprocess.Popen(storescu_argv(proc.port, files, aec="QRPROXY"), stdout=log, stderr=subprocess.STDOUT,
                               env=dcmtk_env(), start_new_session=True)
    try:
        wait_until(lambda: len(store_responses(log_path.read_text())) >= len(files) // 3 or scu.poll() is not None,
                   120, "storescu to get a third of its responses")
        assert scu.poll() is None, f"storescu finished before the kill:\n{log_path.read_text()[-2000:]}"
        assert proc.kill9() == -9
        scu.wait(60)
    finally:
        if scu.poll() is None:
            scu.kill()
            scu.wait(10)

    responses = store_responses(log_path.read_text())
    acked = {uid_of[f] for f, st in responses.items() if st == "Success"}
    assert scu.returncode != 0, "storescu should have failed when qrproxy was killed"
    assert len(files) // 3 <= len(acked) < len(files), f"{len(acked)} acknowledged"
    assert all(st == "Success" for st in responses.values()), {k: v for k, v in responses.items() if v != "Success"}

    proc.start()
    wait_orthanc_has(orthanc, acked, timeout=120)

    # The modality sends again what was not acknowledged; afterwards Orthanc has the whole study.
    rest = [p for p in files if uid_of[str(p)] not in acked]
    assert_all_success(storescu(proc.port, rest, aec="QRPROXY"), rest)
    index = wait_orthanc_has(orthanc, uid_of.values(), timeout=120)
    assert len(index) == len(files)
    assert not spool_files(proc, "incoming"), "partial files left in spool/incoming after restart"


# ==============================================================================================
# 8. Free-space floor: 0xA700, nothing written, nothing acknowledged
# ==============================================================================================


def test_free_space_floor_refuses(db_url: str, storescp: StoreSCP, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"PACS": node(storescp)}, store={"min_free_space": "10000TB"}))
    datasets = [dicomgen.make_ct() for _ in range(3)]
    files = dicomgen.write_all(datasets, tmp_path / "in")

    res = storescu(proc.port, files, aec="QRPROXY", extra=["-nh"])
    responses = store_responses(res.stdout + res.stderr)
    assert [responses.get(str(f)) for f in files] == ["Refused: OutOfResources"] * 3, res.stdout + res.stderr
    halted = storescu(proc.port, files[:1], aec="QRPROXY")
    assert halted.returncode != 0, "storescu must report the refused store in its exit code"

    statuses = pynetdicom_store(proc.port, [datasets[0]])
    assert statuses == [0xA700], [hex(s) if s is not None else None for s in statuses]

    assert spool_files(proc) == [], f"spool/objects holds files: {spool_files(proc)}"
    assert spool_files(proc, "incoming") == [], f"spool/incoming holds files: {spool_files(proc, 'incoming')}"
    assert stays(lambda: not storescp.received_files(), 1.5), "a refused instance was forwarded"


# ==============================================================================================
# 9. A SOP Instance UID that is a path: refused, nothing written outside the spool
# ==============================================================================================


@pytest.mark.orthanc
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_path_traversal_uid_refused(db_url: str, orthanc: OrthancServer, qrproxy: Any, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc)}))
    evil_name = f"qrp-evil-{os.getpid()}-{time.monotonic_ns()}"
    evil_uids = ["../../x", "../../../../../../../../tmp/" + evil_name, "..", "1.2.3/../../../x"]
    evil_files = []
    for n, uid in enumerate(evil_uids):
        ds = dicomgen.make_ct(rows=8, cols=8)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        evil_files.append(dicomgen.write_dataset(ds, tmp_path / "evil" / f"{n}.dcm"))
    good = dicomgen.make_ct()
    good_file = dicomgen.write_dataset(good, tmp_path / "good.dcm")

    # Raw bytes over the wire: the UIDs are in the C-STORE request and the data set as given.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    statuses = pynetdicom_store(proc.port, evil_files)
    assert all(s is not None and 0xC000 <= s <= 0xCFFF for s in statuses), (
        f"statuses for {evil_uids}: {[None if s is None else hex(s) for s in statuses]}")

    assert not list(tmp_path.rglob("x")), f"a file named x appeared: {list(tmp_path.rglob('x'))}"
    assert not (Path("/tmp") / evil_name).exists()
    spool = proc.dir / "spool"
    for base in (proc.dir, spool, spool / "incoming", spool / "objects", spool / "objects" / "ab"):
        assert not (base / "../../x").resolve().exists(), f"{(base / '../../x').resolve()} exists"
    assert spool_files(proc) == [], f"refused instances left files in the spool: {spool_files(proc)}"

    # Still serving: a valid instance is stored and forwarded.
    assert echo_ok(proc.port)
    assert pynetdicom_store(proc.port, [good_file]) == [0x0000]
    index = wait_orthanc_has(orthanc, {str(good.SOPInstanceUID)})
    assert set(index) == {str(good.SOPInstanceUID)}, f"Orthanc holds {set(index)}"


# ==============================================================================================
# 10. Truncated data sets: 0xCxxx, nothing acknowledged, the proxy keeps serving
# ==============================================================================================


def _truncations(tmp: Path) -> dict[str, Path]:
    """Part 10 files whose data set is cut in different places (file meta intact)."""
    import struct

    def element_offset(data: bytes, tag: int) -> int:
        return data.index(struct.pack("<HH", tag >> 16, tag & 0xFFFF), dicomgen.meta_end(data))

    out: dict[str, Path] = {}
    tmp.mkdir(parents=True, exist_ok=True)

    def put(name: str, data: bytes) -> None:
        path = tmp / f"{name}.dcm"
        path.write_bytes(data)
        out[name] = path

    big = dicomgen.encode(dicomgen.make_ct())  # 8 KB of pixel data: larger than a parser's defer size
    put("large-pixeldata-cut", big[: len(big) - 4096])
    small = dicomgen.encode(dicomgen.make_ct(rows=8, cols=8))  # 128 bytes of pixel data
    put("small-pixeldata-cut", small[: len(small) - 64])
    mid = dicomgen.encode(dicomgen.make_ct())
    put("cut-inside-element-header", mid[: element_offset(mid, 0x0020000D) + 3])
    val = dicomgen.encode(dicomgen.make_ct())
    put("cut-inside-short-value", val[: element_offset(val, 0x00100010) + 8 + 3])
    pix = dicomgen.encode(dicomgen.make_ct())
    put("pixeldata-header-only", pix[: element_offset(pix, 0x7FE00010) + 12])
    return out


@pytest.mark.orthanc
def test_truncated_datasets_refused(db_url: str, orthanc: OrthancServer, qrproxy: Any, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    proc = qrproxy(proxy_config(db_url, {"PACS": node(orthanc)}))
    cases = _truncations(tmp_path / "cut")
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the truncated bytes go out as they are

    results = {}
    for name, path in cases.items():
        results[name] = pynetdicom_store(proc.port, [path])[0]
    wrong = {n: (None if s is None else f"0x{s:04X}") for n, s in results.items()
             if s is None or not 0xC000 <= s <= 0xCFFF}
    assert proc.running, "qrproxy died on a truncated data set"

    problems = []
    if wrong:
        problems.append(f"truncated data sets not answered with 0xCxxx (acknowledged as stored): {wrong}")

    good = dicomgen.make_ct()
    good_file = dicomgen.write_dataset(good, tmp_path / "good.dcm")
    assert pynetdicom_store(proc.port, [good_file]) == [0x0000]
    try:
        wait_orthanc_has(orthanc, {str(good.SOPInstanceUID)}, timeout=60)
    except pytest.fail.Exception as exc:
        problems.append(f"a valid instance stored after them did not reach Orthanc: {exc}")
    leaked = set(orthanc_index(orthanc)) - {str(good.SOPInstanceUID)}
    if leaked:
        problems.append(f"truncated instances were forwarded to Orthanc: {leaked}")
    if len(spool_files(proc)) != 1:
        problems.append(f"spool/objects should hold only the valid instance: {spool_files(proc)}")
    assert not problems, "\n".join(problems)


# ==============================================================================================
# 11. `rules test`: what would happen to a CT and to an SR
# ==============================================================================================


def test_rules_test_cli(qrproxy: Any, tmp_path: Path) -> None:
    cfg = proxy_config(
        f"sqlite:///{tmp_path / 'rules.sqlite3'}",
        {
            "UPSTREAM_PACS": {"ae_title": "PACSAE", "host": LOCALHOST, "port": free_port(), "roles": ["store"]},
            "REPORT_SINK": {"ae_title": "REPORTSAE", "host": LOCALHOST, "port": free_port()},
        },
        routes=[{"name": "SR to reports", "when": {"SOPClassUID": SR_ROUTE}, "to": ["REPORT_SINK"],
                 "remove_original": True}],
    )
    proc = qrproxy(cfg, start=False)
    ct = dicomgen.write_dataset(dicomgen.make_ct(), tmp_path / "ct.dcm")
    sr = dicomgen.write_dataset(dicomgen.make_basic_text_sr(), tmp_path / "sr.dcm")

    res = cli(proc, "rules", "test", str(ct))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "UPSTREAM_PACS" in res.stdout, res.stdout

    res = cli(proc, "rules", "test", str(sr), "--calling", "MODCT", "--called", "QRPROXY")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "REPORT_SINK" in res.stdout and "SR to reports" in res.stdout, res.stdout

    res = cli(proc, "rules", "test", str(ct), "--called", "QRP_REPORTSAE")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "REPORT_SINK" in res.stdout, res.stdout



# ==============================================================================================
# 12. Re-sends: identical copies are not forwarded again, corrected copies are
# ==============================================================================================


def test_resend_identical_not_forwarded_again(db_url: str, storescp: StoreSCP, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"REPORTS": node(storescp)}))
    a, b1, b2, b3 = (dicomgen.make_ct() for _ in range(4))
    fa, fb1, fb2, fb3 = dicomgen.write_all([a, b1, b2, b3], tmp_path / "in")
    sop = str(a.SOPInstanceUID)

    assert_all_success(storescu(proc.port, [fa, fb1], aec="QRPROXY"), [fa, fb1])
    wait_storescp_has(storescp, {sop, str(b1.SOPInstanceUID)})

    # Identical copy, then a new instance as a barrier (one node's queue goes out in order).
    assert_all_success(storescu(proc.port, [fa, fb2], aec="QRPROXY"), [fa, fb2])
    wait_storescp_has(storescp, {str(b2.SOPInstanceUID)})
    assert storescp_deliveries(storescp)[sop] == 1, f"identical re-send forwarded again: {storescp_deliveries(storescp)}"

    # A corrected copy (same SOP Instance UID, different content) is forwarded.
    a.PatientName = "CORRECTED^NAME"
    fa2 = dicomgen.write_dataset(a, tmp_path / "corrected.dcm")
    assert_all_success(storescu(proc.port, [fa2, fb3], aec="QRPROXY"), [fa2, fb3])
    wait_storescp_has(storescp, {str(b3.SOPInstanceUID)})
    wait_until(lambda: storescp_deliveries(storescp)[sop] == 2, 60,
               lambda: f"corrected copy delivered {storescp_deliveries(storescp)[sop]} times in all")
    got = pydicom.dcmread(next(p for p in storescp.received_files() if p.name.endswith(sop)))
    assert str(got.PatientName) == "CORRECTED^NAME"


# ==============================================================================================
# 13. store.ignore_sop_classes: answered Success, forwarded nowhere
# ==============================================================================================


def test_ignored_sop_classes_not_forwarded(db_url: str, storescp: StoreSCP, qrproxy: Any, tmp_path: Path) -> None:
    cfg = proxy_config(db_url, {"REPORTS": node(storescp)},
                       store={"ignore_sop_classes": {"MODUS": [dicomgen.CT_IMAGE_STORAGE],
                                                     "*": [dicomgen.BASIC_TEXT_SR]}})
    proc = qrproxy(cfg)
    from_modus, sr, barrier = dicomgen.make_ct(), dicomgen.make_basic_text_sr(), dicomgen.make_ct()
    f_modus, f_sr, f_barrier = dicomgen.write_all([from_modus, sr, barrier], tmp_path / "in")

    assert_all_success(storescu(proc.port, [f_modus], aec="QRPROXY", aet="MODUS"), [f_modus])
    assert_all_success(storescu(proc.port, [f_sr, f_barrier], aec="QRPROXY", aet="MODCT"), [f_sr, f_barrier])

    wait_storescp_has(storescp, {str(barrier.SOPInstanceUID)})
    assert stays(lambda: storescp_sops(storescp) == {str(barrier.SOPInstanceUID)}, 1.5), (
        f"ignored instances were forwarded: {storescp_sops(storescp) - {str(barrier.SOPInstanceUID)}} "
        f"(MODUS CT {from_modus.SOPInstanceUID}, SR {sr.SOPInstanceUID})")


# ==============================================================================================
# 14. Store mutations apply per destination node; other nodes get the original bytes
# ==============================================================================================


@pytest.mark.orthanc
def test_store_mutation_for_one_node(db_url: str, orthanc: OrthancServer, storescp: StoreSCP, qrproxy: Any,
                                     tmp_path: Path) -> None:
    cfg = proxy_config(
        db_url,
        {"PACS": node(orthanc), "REPORTS": node(storescp)},
        mutations=[{"name": "edge site", "on": "store", "when": {"Modality": "^CT$"},
                    "set": {"InstitutionName": "EDGE SITE", "0008,1010": "CT01"},
                    "remove": ["PatientComments"], "nodes": ["REPORTS"]}],
    )
    proc = qrproxy(cfg)
    ds = dicomgen.make_ct(InstitutionName="ORIGINAL HOSPITAL", PatientComments="remove me")
    path = dicomgen.write_dataset(ds, tmp_path / "ct.dcm")
    assert_all_success(storescu(proc.port, [path], aec="QRPROXY"), [path])

    sop = str(ds.SOPInstanceUID)
    index = wait_orthanc_has(orthanc, {sop})
    assert dicomgen.body_bytes(orthanc.instance_file(index[sop])) == dicomgen.body_bytes(path), (
        "the node without the mutation did not get the original data set")

    wait_storescp_has(storescp, {sop})
    got = pydicom.dcmread(next(p for p in storescp.received_files() if p.name.endswith(sop)))
    diffs = dicomgen.compare_datasets(ds, got)
    assert sorted(d.split(" ", 1)[0] for d in diffs) == ["(0008,0080)", "(0008,1010)", "(0010,4000)"], diffs
    assert got.InstitutionName == "EDGE SITE" and got.StationName == "CT01" and "PatientComments" not in got
