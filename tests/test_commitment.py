"""Storage commitment through qrproxy against real peers on loopback.

The modality is a pynetdicom AE (`CommitModality`): it stores instances into qrproxy, sends the
N-ACTION, and records every N-EVENT-REPORT it gets, on its own SCP (a new association from qrproxy)
or on the requesting association when it keeps that open. Orthanc is the PACS (storage commitment
SCP, reporting to qrproxy on a new association) and, in one test, the modality-side SCU. What is
checked is what the peers received, never what qrproxy says about itself. SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from peers import LOCALHOST, OrthancServer, free_port, make_ct_dataset, run_cli
from support import node, proxy_config, pynetdicom_store, stays, wait_until, wait_orthanc_has

SCPM = str(StorageCommitmentPushModel)
WELL_KNOWN = "1.2.840.10008.1.20.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


class CommitModality:
    """A modality: C-STORE into qrproxy, N-ACTION, and an SCP (`start_scp`) for the reports."""

    def __init__(self, aet: str = "MODCT"):
        self.aet = aet
        self.port = free_port()
        self.host = LOCALHOST
        self.reports: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: Any = None

    def _record(self, via: str, event: Any) -> tuple[int, None]:
        info = event.event_information
        with self._lock:
            self.reports.append({
                "via": via, "calling": event.assoc.requestor.ae_title.strip() if via == "new" else None,
                "event_type": int(event.request.EventTypeID), "transaction": str(info.TransactionUID),
                "ok": {str(r.ReferencedSOPInstanceUID) for r in info.get("ReferencedSOPSequence", [])},
                "failed": {str(r.ReferencedSOPInstanceUID): int(r.FailureReason)
                           for r in info.get("FailedSOPSequence", [])},
            })
        return 0x0000, None

    def start_scp(self) -> None:
        ae = AE(ae_title=self.aet)
        # qrproxy proposes the SCP role for itself: accept both roles
        ae.add_supported_context(SCPM, scu_role=True, scp_role=True)
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_N_EVENT_REPORT, lambda e: self._record("new", e))])

    def stop_scp(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def store(self, proxy_port: int, datasets: Sequence[Dataset]) -> None:
        assert pynetdicom_store(proxy_port, datasets, aet=self.aet) == [0] * len(datasets)

    def request(self, proxy_port: int, refs: Sequence[tuple[str, str]], keep_open: float = 0.0) -> tuple[int, str]:
        """N-ACTION for (class, instance) pairs; returns (status, transaction UID). With `keep_open`,
        the association stays open until a report arrives on it (or that many seconds pass)."""
        ae = AE(ae_title=self.aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(SCPM)
        handlers = [(evt.EVT_N_EVENT_REPORT, lambda e: self._record("same", e))] if keep_open else []
        assoc = ae.associate(LOCALHOST, proxy_port, ae_title="QRPROXY", evt_handlers=handlers)
        assert assoc.is_established
        uid = generate_uid()
        ds = Dataset()
        ds.TransactionUID = uid
        ds.ReferencedSOPSequence = []
        for sop_class, sop_instance in refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_instance
            ds.ReferencedSOPSequence.append(ref)
        try:
            status, _ = assoc.send_n_action(ds, 1, SCPM, WELL_KNOWN)
            if keep_open:
                deadline = time.monotonic() + keep_open
                while not self.for_transaction(uid) and time.monotonic() < deadline and assoc.is_established:
                    time.sleep(0.05)
        finally:
            if assoc.is_established:
                assoc.release()
            ae.shutdown()
        return int(status.Status), uid

    def for_transaction(self, uid: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.reports if r["transaction"] == uid]

    def wait_report(self, uid: str, timeout: float = 60) -> dict[str, Any]:
        wait_until(lambda: self.for_transaction(uid), timeout, f"the report of transaction {uid}")
        # ... and exactly one, also a while later
        assert stays(lambda: len(self.for_transaction(uid)) == 1, 2.0), self.for_transaction(uid)
        return self.for_transaction(uid)[0]


@pytest.fixture
def modality() -> Any:
    made: list[CommitModality] = []

    def make(**kw: Any) -> CommitModality:
        m = CommitModality(**kw)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop_scp()


def modality_node(m: CommitModality, **kw: Any) -> dict[str, Any]:
    return {"ae_title": m.aet, "host": m.host, "port": m.port, "roles": ["modality"], "timeout": "5s", **kw}


def commit_config(db_url: str, nodes: dict[str, Any], **commitment: Any) -> dict[str, Any]:
    settings = {"report_retry_min": "1s", "report_retry_max": "2s", **commitment}
    return proxy_config(db_url, nodes, commitment=settings)


def cts(n: int, **attrs: Any) -> list[Dataset]:
    study = generate_uid()
    return [make_ct_dataset(StudyInstanceUID=study, InstanceNumber=i + 1, **attrs) for i in range(n)]


def refs(datasets: Sequence[Dataset]) -> list[tuple[str, str]]:
    return [(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in datasets]


def uids(datasets: Sequence[Dataset]) -> set[str]:
    return {str(d.SOPInstanceUID) for d in datasets}


def log_order(proxy: Any, first: str, then: str) -> bool:
    text = proxy.log_text()
    return first in text and then in text and text.index(first) < text.index(then)


# --- local policy -----------------------------------------------------------------------------


def test_local_policy_reports_on_new_association(db_url: str, qrproxy: Any, modality: Any) -> None:
    m = modality()
    m.start_scp()
    proxy = qrproxy(commit_config(db_url, {"CT1": modality_node(m)}))
    stored = cts(3)
    m.store(proxy.port, stored)
    status, uid = m.request(proxy.port, refs(stored))
    assert status == 0x0000
    report = m.wait_report(uid)
    assert report["via"] == "new" and report["calling"] == "QRPROXY"
    assert report["event_type"] == 1 and report["ok"] == uids(stored) and report["failed"] == {}

    # unknown instance, SOP class conflict, a SOP class qrproxy does not store
    unknown = generate_uid()
    status, uid2 = m.request(proxy.port, [(CT, unknown), (MR, str(stored[0].SOPInstanceUID)),
                                          ("1.2.3.4.5", str(stored[1].SOPInstanceUID)), refs(stored)[2:][0]])
    assert status == 0x0000
    report = m.wait_report(uid2)
    assert report["event_type"] == 2
    assert report["ok"] == {str(stored[2].SOPInstanceUID)}
    assert report["failed"] == {unknown: 0x0112, str(stored[0].SOPInstanceUID): 0x0119,
                                str(stored[1].SOPInstanceUID): 0x0122}
    assert len(m.reports) == 2


def test_report_on_the_open_association(db_url: str, qrproxy: Any, modality: Any) -> None:
    m = modality()  # no SCP of its own: only the requesting association can carry the report
    proxy = qrproxy(commit_config(db_url, {"CT1": modality_node(m)}))
    stored = cts(2)
    m.store(proxy.port, stored)
    status, uid = m.request(proxy.port, refs(stored), keep_open=90)
    assert status == 0x0000
    report = m.wait_report(uid, timeout=30)
    assert report["via"] == "same" and report["event_type"] == 1 and report["ok"] == uids(stored)
    # the proxy logs the report after the modality has answered it: wait for the line
    wait_until(lambda: f"event=commitment-reported transaction={uid}" in proxy.log_text(), 30,
               "the commitment-reported line")
    assert "via=same-association" in proxy.log_text()


def test_refusals(db_url: str, qrproxy: Any, modality: Any) -> None:
    m = modality()
    stranger = modality(aet="STRANGER")
    proxy = qrproxy(commit_config(db_url, {"CT1": modality_node(m)}))
    status, _ = stranger.request(proxy.port, [(CT, generate_uid())])
    assert status == 0x0110  # no address for a report to an unknown AE
    status, _ = m.request(proxy.port, [])
    assert status == 0x0115


# --- durability -------------------------------------------------------------------------------


def test_unreachable_modality_and_restart_deliver_once(db_url: str, qrproxy: Any, modality: Any) -> None:
    m = modality()  # its SCP is down for now
    proxy = qrproxy(commit_config(db_url, {"CT1": modality_node(m)}))
    stored = cts(2)
    m.store(proxy.port, stored)
    status, uid = m.request(proxy.port, refs(stored))
    assert status == 0x0000
    wait_until(lambda: "event=commitment-report-failed" in proxy.log_text(), 30, "a failed report attempt")
    out = proxy.cli("status", timeout=60).stdout
    # Still owed: "ready" between attempts, "reporting" while an attempt holds its lease.
    assert uid in out and ("ready" in out or "reporting" in out), out
    proxy.stop()  # SIGTERM between the N-ACTION and its report
    proxy.start()
    wait_until(lambda: proxy.log_text(since_start=True).count("event=commitment-report-failed") >= 1, 30,
               "the restarted proxy still trying")
    assert m.reports == []
    m.start_scp()
    report = m.wait_report(uid)
    assert report["event_type"] == 1 and report["ok"] == uids(stored)
    assert stays(lambda: len(m.reports) == 1, 3.0), m.reports
    # the proxy records "reported" after the modality answered the report: ask status until it shows
    last: list[str] = [""]

    def reported() -> bool:
        last[0] = proxy.cli("status", timeout=60).stdout
        return "reported 1" in last[0]

    wait_until(reported, 60, lambda: f"status shows the report: {last[0]}", interval=1.0)


def test_kill9_after_action_reports_once(db_url: str, qrproxy: Any, modality: Any) -> None:
    m = modality()
    proxy = qrproxy(commit_config(db_url, {"CT1": modality_node(m)}))
    stored = cts(1)
    m.store(proxy.port, stored)
    status, uid = m.request(proxy.port, refs(stored))
    assert status == 0x0000
    proxy.kill9()
    m.start_scp()
    proxy.start()
    report = m.wait_report(uid)
    assert report["ok"] == uids(stored)


# --- upstream policy with Orthanc -----------------------------------------------------------


def orthanc_for(orthanc_factory: Any, proxy_port: int) -> OrthancServer:
    return orthanc_factory(start=False, config_overrides={"DicomModalities": {
        "QRPROXY": {"AET": "QRPROXY", "Host": LOCALHOST, "Port": proxy_port, "AllowStorageCommitment": True}}})


def orthanc_id(orthanc: OrthancServer, sop: str) -> str:
    found = orthanc.post("/tools/lookup", sop)
    return next(r["ID"] for r in found if r["Type"] == "Instance")


def test_upstream_policy_waits_for_orthanc(db_url: str, qrproxy: Any, modality: Any, orthanc_factory: Any) -> None:
    m = modality()
    m.start_scp()
    port = free_port()
    orthanc = orthanc_for(orthanc_factory, port)  # not started yet: the PACS is down
    cfg = commit_config(db_url, {"CT1": modality_node(m, commitment="upstream"),
                                 "PACS": node(orthanc, roles=["store", "commitment"], timeout="5s")},
                        upstream_resend=0)
    cfg["port"] = port
    proxy = qrproxy(cfg)
    stored = cts(3)
    m.store(proxy.port, stored)
    status, uid = m.request(proxy.port, refs(stored))
    assert status == 0x0000
    # local copies are durable, but the PACS has not confirmed: no report
    assert stays(lambda: m.reports == [], 4.0), m.reports
    out = proxy.cli("status", timeout=60).stdout
    assert uid in out and "pending" in out and "upstream" in out, out

    orthanc.start()
    report = m.wait_report(uid, timeout=90)
    assert report["event_type"] == 1 and report["ok"] == uids(stored)
    assert set(wait_orthanc_has(orthanc, uids(stored))) == uids(stored)
    # the commitment-reported line is written after the modality answered the report
    wait_until(lambda: f"event=commitment-reported transaction={uid}" in proxy.log_text(), 30,
               "the commitment-reported line")
    assert log_order(proxy, "event=commitment-upstream-report", f"event=commitment-reported transaction={uid}")

    # an instance Orthanc lacks when asked is reported failed (upstream_resend: 0)
    more = cts(2)
    m.store(proxy.port, more)
    wait_orthanc_has(orthanc, uids(more))
    lost = str(more[1].SOPInstanceUID)
    orthanc.delete(f"/instances/{orthanc_id(orthanc, lost)}")
    status, uid2 = m.request(proxy.port, refs(more))
    assert status == 0x0000
    report = m.wait_report(uid2, timeout=90)
    assert report["event_type"] == 2
    assert report["ok"] == {str(more[0].SOPInstanceUID)} and report["failed"] == {lost: 0x0112}


def test_upstream_failure_is_sent_again(db_url: str, qrproxy: Any, modality: Any, orthanc_factory: Any) -> None:
    m = modality()
    m.start_scp()
    port = free_port()
    orthanc = orthanc_for(orthanc_factory, port)
    orthanc.start()
    cfg = commit_config(db_url, {"CT1": modality_node(m), "PACS": node(orthanc, roles=["store", "commitment"],
                                                                       timeout="5s")},
                        policy="upstream", upstream_resend=1)
    cfg["port"] = port
    proxy = qrproxy(cfg)
    stored = cts(2)
    m.store(proxy.port, stored)
    wait_orthanc_has(orthanc, uids(stored))
    lost = str(stored[0].SOPInstanceUID)
    orthanc.delete(f"/instances/{orthanc_id(orthanc, lost)}")
    status, uid = m.request(proxy.port, refs(stored))
    assert status == 0x0000
    report = m.wait_report(uid, timeout=90)
    assert report["event_type"] == 1 and report["ok"] == uids(stored)
    assert lost in set(wait_orthanc_has(orthanc, [lost]))
    assert f"event=commitment-resend node=PACS sop={lost}" in proxy.log_text()


def test_deadline_reports_failures(db_url: str, qrproxy: Any, modality: Any) -> None:
    m = modality()
    m.start_scp()
    down = {"ae_title": "PACS", "host": LOCALHOST, "port": free_port(), "roles": ["store", "commitment"],
            "timeout": "2s"}
    proxy = qrproxy(commit_config(db_url, {"CT1": modality_node(m), "PACS": down}, policy="upstream",
                                  deadline="3s"))
    stored = cts(2)
    m.store(proxy.port, stored)
    status, uid = m.request(proxy.port, refs(stored))
    assert status == 0x0000
    report = m.wait_report(uid, timeout=60)
    assert report["event_type"] == 2 and report["ok"] == set()
    assert report["failed"] == {u: 0x0110 for u in uids(stored)}
    assert "deadline=reached" in proxy.log_text()


# --- Orthanc as the modality ------------------------------------------------------------------


def test_orthanc_requests_commitment_from_qrproxy(db_url: str, qrproxy: Any, orthanc_factory: Any) -> None:
    port = free_port()
    orthanc = orthanc_factory(aet="ORTHMOD", config_overrides={"DicomModalities": {
        "QRPROXY": {"AET": "QRPROXY", "Host": LOCALHOST, "Port": port, "AllowStorageCommitment": True}}})
    cfg = commit_config(db_url, {"ORTHMOD": {**node(orthanc, roles=["modality"]), "timeout": "5s"}})
    cfg["port"] = port
    proxy = qrproxy(cfg)
    stored = cts(2)
    ids = [orthanc.upload(bytes(_file_bytes(d)))["ID"] for d in stored]
    orthanc.store_to_modality("QRPROXY", ids)
    missing = generate_uid()
    answer = orthanc.post("/modalities/QRPROXY/storage-commitment",
                          {"DicomInstances": [list(r) for r in refs(stored)] + [[CT, missing]]})
    path = answer["Path"]

    def done() -> Any:
        r = orthanc.get(path)
        return r if r["Status"] != "Pending" else None

    result = wait_until(done, 60, lambda: f"Orthanc's commitment report; proxy log: {proxy.log_tail(20)}")
    assert {f["SOPInstanceUID"]: f["FailureReason"] for f in result["Failures"]} == {missing: 0x0112}
    assert {s["SOPInstanceUID"] for s in result["Success"]} == uids(stored)


def _file_bytes(ds: Dataset) -> bytes:
    from peers import dataset_bytes

    return dataset_bytes(ds)


# --- configuration ----------------------------------------------------------------------------


def test_check_names_bad_commitment_keys(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("commitment:\n  policy: remote\nnodes:\n  CT1: {ae_title: CT1, host: h, port: 1, "
                   "commitment: {deadlne: 1h}}\n")
    res = run_cli(bad, "check")
    assert res.returncode == 2
    assert "commitment.policy" in res.stderr + res.stdout and "nodes.CT1.commitment.deadlne" in res.stderr + res.stdout
    upstream = tmp_path / "up.yml"
    upstream.write_text("commitment: upstream\nnodes:\n  CT1: {ae_title: CT1, host: h, port: 1, roles: [modality]}\n")
    res = run_cli(upstream, "check")
    assert res.returncode == 2 and "commitment.policy: policy upstream needs a node with role 'commitment'" in (
        res.stderr + res.stdout)
    good = tmp_path / "good.yml"
    good.write_text("commitment: {policy: local, deadline: 30m}\nnodes:\n  CT1: {ae_title: CT1, host: h, port: 1, "
                    "roles: [modality], commitment: upstream}\n  PACS: {ae_title: PACS, host: h, port: 2, "
                    "roles: [store, commitment]}\n")
    res = run_cli(good, "check")
    assert res.returncode == 0, res.stderr
