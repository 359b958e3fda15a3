"""C-MOVE and C-GET through qrproxy, against real peers: DCMTK movescu / getscu as the workstation,
DCMTK storescp as the move destination, Orthanc as the upstream PACS for retrieve-through, and a
pynetdicom SCU where a test needs the exact response statuses and sub-operation counts (or to send a
C-CANCEL mid-move). SQLite and PostgreSQL (``db_url``).

What is compared is what the peers hold afterwards (files in storescp's folder, byte-compared with
what was stored), never what qrproxy says it did.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
)

import dicomgen
from peers import LOCALHOST, OrthancServer, StoreSCP, dcmtk, free_port
from support import (assert_all_success, cli, dcmtk_env, node, proxy_config, spool_files, storescu,
                                wait_until)

pytestmark = pytest.mark.orthanc


# --- helpers ----------------------------------------------------------------------------------


def received(scp: StoreSCP) -> dict[str, Path]:
    """SOP Instance UID -> file, of what the storescp destination holds."""
    out = {}
    for p in scp.received_files():
        try:
            out[str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)] = p
        except Exception:  # a file still being written
            continue
    return out


def same_pixels(expected: Dataset, path: Path) -> bool:
    got = pydicom.dcmread(path)
    return got.pixel_array.tobytes() == expected.pixel_array.tobytes() and \
        str(got.SOPInstanceUID) == str(expected.SOPInstanceUID)


def movescu(port: int, dest: str, keys: dict[str, str], *, patient_root: bool = False,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
    argv = [dcmtk("movescu"), "-v", "-aet", "MOVER", "-aec", "QRPROXY", "-aem", dest,
            "-P" if patient_root else "-S"]
    for k, v in keys.items():
        argv += ["-k", f"{k}={v}"]
    argv += [LOCALHOST, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def getscu(port: int, out_dir: Path, keys: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [dcmtk("getscu"), "-v", "-aet", "GETTER", "-aec", "QRPROXY", "-S", "-od", str(out_dir)]
    for k, v in keys.items():
        argv += ["-k", f"{k}={v}"]
    argv += [LOCALHOST, str(port)]
    return subprocess.run(argv, capture_output=True, text=True, env=dcmtk_env(), timeout=timeout)


def move_responses(port: int, dest: str, keys: dict[str, str], *, patient_root: bool = False,
                   cancel_after: int | None = None) -> list[Dataset]:
    """Every C-MOVE response (status datasets) qrproxy sent to a pynetdicom SCU; with
    ``cancel_after`` a C-CANCEL is sent after that many pending responses."""
    model = PatientRootQueryRetrieveInformationModelMove if patient_root else StudyRootQueryRetrieveInformationModelMove
    ae = AE(ae_title="PYMOVER")
    ae.add_requested_context(model)
    ae.dimse_timeout = ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate(LOCALHOST, port, ae_title="QRPROXY")
    assert assoc.is_established, "qrproxy refused the association"
    ident = Dataset()
    for k, v in keys.items():
        setattr(ident, k, v)
    out: list[Dataset] = []
    try:
        pending = 0
        for status, ds in assoc.send_c_move(ident, dest, model, msg_id=7):
            assert status is not None and "Status" in status, "no C-MOVE response"
            if ds is not None and "FailedSOPInstanceUIDList" in ds:
                status.FailedSOPInstanceUIDList = ds.FailedSOPInstanceUIDList
            out.append(status)
            if status.Status in (0xFF00, 0xFF01):
                pending += 1
                if cancel_after is not None and pending == cancel_after:
                    assoc.send_c_cancel(7, context_id=assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    return out


def counts(rsp: Dataset) -> tuple[int, int, int, int]:
    """(remaining, completed, failed, warning) of a C-MOVE response (missing: -1)."""
    return tuple(int(getattr(rsp, k, -1) if getattr(rsp, k, None) is not None else -1) for k in (  # type: ignore[return-value]
        "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations",
        "NumberOfWarningSuboperations"))


def failed_uids(rsp: Dataset) -> set[str]:
    v = rsp.get("FailedSOPInstanceUIDList", [])
    return {str(x) for x in (v if isinstance(v, (list, pydicom.multival.MultiValue)) else [v]) if str(x)}


class SlowStoreSCP:
    """A pynetdicom storage SCP that takes ``delay`` s per instance (to cancel a move mid-way)."""

    def __init__(self, aet: str = "SLOWDEST", delay: float = 0.3):
        self.aet, self.host, self.port, self.delay = aet, LOCALHOST, free_port(), delay
        self.sops: list[str] = []
        self._server: Any = None

    def _store(self, event: Any) -> int:
        time.sleep(self.delay)
        self.sops.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def start(self) -> SlowStoreSCP:
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def refresh_now(proc: Any, job: str) -> None:
    """`qrproxy refresh JOB`, asked again while the server's own first run of the job is in
    progress (the command then says "skipped: running in another process" and exits 1)."""
    last: list[str] = []

    def done() -> bool:
        res = cli(proc, "refresh", job, timeout=120)
        last[:] = [res.stdout + res.stderr]
        return res.returncode == 0

    wait_until(done, 90, lambda: f"qrproxy refresh {job}: {last[0] if last else ''}", interval=1.0)


def store_study(proc: Any, tmp_path: Path, n_series: int = 2, per_series: int = 3, **kw: Any) -> list[Dataset]:
    study = dicomgen.make_study(n_series, per_series, **kw)
    files = dicomgen.write_all(study, tmp_path / f"in-{study[0].StudyInstanceUID[-8:]}")
    assert_all_success(storescu(proc.port, files, aec="QRPROXY"), files)
    return study


def upload_to_orthanc(orthanc: OrthancServer, study: list[Dataset]) -> None:
    for ds in study:
        orthanc.upload(dicomgen.encode(ds))


# ==============================================================================================
# 1. Local copies: movescu (study root, patient root, all levels), getscu, counts
# ==============================================================================================


def test_move_local_study_all_levels(db_url: str, storescp: StoreSCP, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"DEST": node(storescp, roles=["modality"])}))
    study = store_study(proc, tmp_path, 2, 3)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in study}
    study_uid = str(study[0].StudyInstanceUID)

    res = movescu(proc.port, storescp.aet, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": study_uid})
    assert res.returncode == 0, res.stdout + res.stderr
    storescp.wait_for_files(len(study))
    got = received(storescp)
    assert set(got) == set(by_uid), f"missing {set(by_uid) - set(got)}"
    assert all(same_pixels(by_uid[u], p) for u, p in got.items())

    # SERIES level, IMAGE level and patient root PATIENT level, counted exactly.
    series_uid = str(study[0].SeriesInstanceUID)
    in_series = [u for u, ds in by_uid.items() if str(ds.SeriesInstanceUID) == series_uid]
    storescp.clear()
    final = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study_uid,
                                                     "SeriesInstanceUID": series_uid})[-1]
    assert final.Status == 0x0000 and counts(final)[1:3] == (len(in_series), 0), final
    assert set(received(storescp)) == set(in_series)

    storescp.clear()
    two = sorted(by_uid)[:2]
    final = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study_uid,
                                                     "SeriesInstanceUID": "", "SOPInstanceUID": two})[-1]
    assert final.Status == 0x0000 and counts(final)[1] == 2, final
    assert set(received(storescp)) == set(two)

    storescp.clear()
    rsps = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "PATIENT",
                                                    "PatientID": str(study[0].PatientID)}, patient_root=True)
    assert rsps[-1].Status == 0x0000 and counts(rsps[-1])[1] == len(study), rsps[-1]
    pend = [counts(r) for r in rsps[:-1]]
    assert [p[0] for p in pend] == list(range(len(study) - 1, -1, -1)), f"remaining counts {pend}"
    assert set(received(storescp)) == set(by_uid)


def test_get_series_and_unknown_things(db_url: str, storescp: StoreSCP, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {"DEST": node(storescp, roles=["modality"])}))
    study = store_study(proc, tmp_path, 2, 3)
    series_uid = str(study[3].SeriesInstanceUID)
    want = {str(ds.SOPInstanceUID): ds for ds in study if str(ds.SeriesInstanceUID) == series_uid}

    res = getscu(proc.port, tmp_path / "got", {"QueryRetrieveLevel": "SERIES",
                                               "StudyInstanceUID": str(study[0].StudyInstanceUID),
                                               "SeriesInstanceUID": series_uid})
    assert res.returncode == 0, res.stdout + res.stderr
    files = [p for p in (tmp_path / "got").iterdir() if p.is_file()]
    got = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
    assert set(got) == set(want), res.stdout + res.stderr
    assert all(same_pixels(want[u], p) for u, p in got.items())

    # Unknown move destination: 0xA801, nothing sent.
    rsp = move_responses(proc.port, "NOSUCHAE", {"QueryRetrieveLevel": "STUDY",
                                                 "StudyInstanceUID": str(study[0].StudyInstanceUID)})
    assert [r.Status for r in rsp] == [0xA801]
    # A study nobody knows (no retrieve node): Success with zero sub-operations.
    rsp = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4.5"})
    assert rsp[-1].Status == 0x0000 and counts(rsp[-1])[1:3] == (0, 0)
    # An identifier without the level's unique key: a failure status, never Success.
    rsp = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "SERIES",
                                                   "StudyInstanceUID": str(study[0].StudyInstanceUID)})
    assert 0xC000 <= rsp[-1].Status <= 0xCFFF, rsp[-1]
    assert received(storescp) == {}


# ==============================================================================================
# 2. Destination down, cancel mid-move
# ==============================================================================================


def test_destination_down_and_cancel(db_url: str, storescp_factory: Any, qrproxy: Any, tmp_path: Path) -> None:
    slow = SlowStoreSCP(delay=0.4).start()
    try:
        down_port = free_port()
        proc = qrproxy(proxy_config(db_url, {
            "SLOW": {"ae_title": slow.aet, "host": LOCALHOST, "port": slow.port, "roles": ["modality"]},
            "GONE": {"ae_title": "GONE", "host": LOCALHOST, "port": down_port, "roles": ["modality"]},
        }))
        study = store_study(proc, tmp_path, 1, 8)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(study[0].StudyInstanceUID)}

        rsp = move_responses(proc.port, "GONE", keys)
        assert rsp[-1].Status not in (0x0000, 0xB000, 0xFF00), f"destination down answered {rsp[-1]}"
        assert 0xA000 <= rsp[-1].Status <= 0xCFFF

        rsp = move_responses(proc.port, slow.aet, keys, cancel_after=2)
        final = rsp[-1]
        assert final.Status == 0xFE00, final
        remaining, completed, failed, _ = counts(final)
        assert remaining > 0 and completed < len(study), counts(final)
        time.sleep(1.0)
        assert len(slow.sops) < len(study), "all instances were sent despite C-CANCEL"
        # Still serving afterwards: the whole study moves.
        slow.sops.clear()
        final = move_responses(proc.port, slow.aet, keys)[-1]
        assert final.Status == 0x0000 and sorted(slow.sops) == sorted(str(d.SOPInstanceUID) for d in study)
    finally:
        slow.stop()


# ==============================================================================================
# 3. Retrieve-through from Orthanc
# ==============================================================================================


def _upstream_setup(db_url: str, orthanc_factory: Any, storescp: StoreSCP, qrproxy: Any,
                    method: str = "move", **extra: Any) -> tuple[Any, OrthancServer, dict[str, Any]]:
    cfg = proxy_config(db_url, {}, **extra)
    orthanc = orthanc_factory(modalities={"QRPROXY": ("QRPROXY", LOCALHOST, cfg["port"])})
    cfg["nodes"] = {"PACS": node(orthanc, roles=["query", "retrieve"], retrieve_method=method),
                    "DEST": node(storescp, roles=["modality"])}
    return cfg, orthanc, {}


@pytest.mark.parametrize("method", ["move", "get"])
def test_retrieve_through_then_local(db_url: str, method: str, orthanc_factory: Any, storescp: StoreSCP,
                                     qrproxy: Any, tmp_path: Path) -> None:
    cfg, orthanc, _ = _upstream_setup(db_url, orthanc_factory, storescp, qrproxy, method)
    study = dicomgen.make_study(2, 4)
    upload_to_orthanc(orthanc, study)
    by_uid = {str(ds.SOPInstanceUID): ds for ds in study}
    proc = qrproxy(cfg)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(study[0].StudyInstanceUID)}

    rsps = move_responses(proc.port, storescp.aet, keys)
    assert rsps[-1].Status == 0x0000 and counts(rsps[-1])[1:3] == (len(study), 0), rsps[-1]
    storescp.wait_for_files(len(study))
    got = received(storescp)
    assert set(got) == set(by_uid)
    assert all(same_pixels(by_uid[u], p) for u, p in got.items())
    # The copies landed in qrproxy's spool and were not sent back to Orthanc (it still has 8).
    assert len(spool_files(proc)) == len(study)

    # Orthanc gone: the study is now served from the local copies.
    orthanc.stop()
    storescp.clear()
    res = movescu(proc.port, storescp.aet, keys)
    assert res.returncode == 0, res.stdout + res.stderr
    storescp.wait_for_files(len(study))
    assert set(received(storescp)) == set(by_uid)


def test_upstream_down_cached_moves_uncached_fails(db_url: str, orthanc_factory: Any, storescp: StoreSCP,
                                                   qrproxy: Any, tmp_path: Path) -> None:
    cfg, orthanc, _ = _upstream_setup(db_url, orthanc_factory, storescp, qrproxy,
                                      refresh=[{"name": "studies", "node": "PACS", "kind": "studies",
                                                "every": "1h", "query": {"StudyDate": "-30d"}}])
    remote = dicomgen.make_study(1, 4, patient_id="REMOTE1")
    upload_to_orthanc(orthanc, remote)
    proc = qrproxy(cfg)
    local = store_study(proc, tmp_path, 1, 3, patient_id="LOCAL1")
    refresh_now(proc, "studies")  # lists the remote study down to its instances
    orthanc.stop()

    final = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "STUDY",
                                                     "StudyInstanceUID": str(local[0].StudyInstanceUID)})[-1]
    assert final.Status == 0x0000 and counts(final)[1] == len(local)
    final = move_responses(proc.port, storescp.aet, {"QueryRetrieveLevel": "STUDY",
                                                     "StudyInstanceUID": str(remote[0].StudyInstanceUID)})[-1]
    assert final.Status == 0xA702, final
    assert counts(final)[1:3] == (0, len(remote)), counts(final)
    assert failed_uids(final) == {str(d.SOPInstanceUID) for d in remote}


def test_concurrent_moves_share_one_retrieval(db_url: str, orthanc_factory: Any, storescp: StoreSCP,
                                              qrproxy: Any, tmp_path: Path) -> None:
    cfg, orthanc, _ = _upstream_setup(db_url, orthanc_factory, storescp, qrproxy)
    study = dicomgen.make_study(1, 10)
    upload_to_orthanc(orthanc, study)
    proc = qrproxy(cfg)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(study[0].StudyInstanceUID)}
    results: list[Any] = [None, None]

    def run(i: int) -> None:
        results[i] = move_responses(proc.port, storescp.aet, keys)[-1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.Status == 0x0000 and counts(r)[1] == len(study) for r in results), results
    wait_until(lambda: len(spool_files(proc)) == len(study), 60, "spool holds the study once")
    text = proc.log_text()
    # the PACS was asked once: each instance came from it once, in at most `associations` (2) requests
    assert text.count('action="stored (retrieved from PACS)"') == len(study), text[-3000:]
    assert 1 <= text.count("event=retrieve-start") <= 2, text[-3000:]


# ==============================================================================================
# 4. Prefetch of priors for the worklist
# ==============================================================================================


def test_prefetch_priors_then_move_offline(db_url: str, orthanc_factory: Any, worklist_scp: Any, storescp: StoreSCP,
                                           qrproxy: Any, tmp_path: Path) -> None:
    import datetime as dt

    from peers import dataset_bytes, make_worklist_item

    def years_ago(n: float) -> str:
        return (dt.date.today() - dt.timedelta(days=int(365 * n))).strftime("%Y%m%d")

    cfg = proxy_config(db_url, {})
    orthanc = orthanc_factory(modalities={"QRPROXY": ("QRPROXY", LOCALHOST, cfg["port"])})
    prior_ct = dicomgen.make_study(2, 3, patient_id="PFX1", patient_name="PRIOR^PAT", StudyDate=years_ago(2))
    prior_mr = dicomgen.make_study(1, 2, patient_id="PFX1", patient_name="PRIOR^PAT", StudyDate=years_ago(1),
                                   Modality="MR")
    too_old = dicomgen.make_study(1, 2, patient_id="PFX1", patient_name="PRIOR^PAT", StudyDate=years_ago(9))
    other = dicomgen.make_study(1, 2, patient_id="OTHER9", patient_name="OTHER^PAT", StudyDate=years_ago(1))
    for study in (prior_ct, prior_mr, too_old, other):
        upload_to_orthanc(orthanc, study)
    scheduled_uid = pydicom.uid.generate_uid()
    worklist_scp.add_item(dataset_bytes(make_worklist_item(PatientID="PFX1", PatientName="PRIOR^PAT",
                                                           StudyInstanceUID=scheduled_uid)), filename="pfx1")
    cfg["nodes"] = {
        "RIS": {"ae_title": worklist_scp.aet, "host": LOCALHOST, "port": worklist_scp.port, "roles": ["worklist"]},
        "PACS": node(orthanc, roles=["query", "retrieve"]),
        "DEST": node(storescp, roles=["modality"]),
    }
    cfg["refresh"] = [{"name": "mwl", "node": "RIS", "kind": "worklist", "every": "1h",
                       "query": {"ScheduledProcedureStepStartDate": "today"}}]
    cfg["prefetch"] = [{"name": "priors", "node": "PACS", "every": "2s", "modalities": ["CT"], "max_age": "1825d",
                        "max_studies": 3}]
    proc = qrproxy(cfg)
    refresh_now(proc, "mwl")

    want = {str(d.SOPInstanceUID) for d in prior_ct}

    def spool_sops() -> set[str]:
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in spool_files(proc)}

    wait_until(lambda: want <= spool_sops(), 90, lambda: f"prefetched {len(spool_sops() & want)} of {len(want)}")
    time.sleep(3)  # another scheduled run: must not fetch the MR, the 9-year-old study or another patient
    assert spool_sops() == want, f"unexpected prefetched instances: {len(spool_sops() - want)}"
    # the rule's rows are marked done after their instances are in the spool: ask status again
    last = [""]

    def status_done() -> bool:
        last[0] = cli(proc, "status", "--no-echo").stdout
        return "priors" in last[0] and "done" in last[0]

    wait_until(status_done, 60, lambda: f"status shows the prefetch done:\n{last[0]}", interval=1.0)

    orthanc.stop()
    res = movescu(proc.port, storescp.aet, {"QueryRetrieveLevel": "STUDY",
                                            "StudyInstanceUID": str(prior_ct[0].StudyInstanceUID)})
    assert res.returncode == 0, res.stdout + res.stderr
    storescp.wait_for_files(len(prior_ct))
    assert set(received(storescp)) == want


def test_evicted_study_is_found_and_retrieved_through_again(db_url: str, orthanc_factory: Any, storescp: StoreSCP,
                                                            qrproxy: Any, tmp_path: Path) -> None:
    cfg, orthanc, _ = _upstream_setup(db_url, orthanc_factory, storescp, qrproxy,
                                      retention={"max_age": "1s", "every": "1h"})
    study = dicomgen.make_study(1, 4)
    upload_to_orthanc(orthanc, study)
    proc = qrproxy(cfg)
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": str(study[0].StudyInstanceUID)}
    assert move_responses(proc.port, storescp.aet, keys)[-1].Status == 0x0000
    assert len(spool_files(proc)) == len(study)
    time.sleep(2.5)
    res = cli(proc, "retention", "run")
    assert res.returncode == 0, res.stdout + res.stderr
    assert spool_files(proc) == [], "retention did not evict the retrieved study"
    storescp.clear()
    final = move_responses(proc.port, storescp.aet, keys)[-1]
    assert final.Status == 0x0000 and counts(final)[1] == len(study), final
    storescp.wait_for_files(len(study))
    assert set(received(storescp)) == {str(d.SOPInstanceUID) for d in study}
    assert len(spool_files(proc)) == len(study), "the second move did not refill the cache"
