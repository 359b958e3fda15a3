"""MPPS through qrproxy: N-CREATE / N-SET from a modality (a pynetdicom SCU here) are acknowledged
once recorded, relayed in order to the `mpps` node (a scripted pynetdicom MPPS SCP, which records
what it received and answers as scripted), also after an outage and a restart of qrproxy; a
COMPLETED step removes its item from qrproxy's worklist answers (the upstream worklist, DCMTK
wlmscpfs, still lists it: the comparison is against its own answers). The first C-STORE of a study
does the same with `worklist.remove_on_store`. SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

from peers import LOCALHOST, WorklistSCP, free_port, write_ct_file
from support import assert_all_success, storescu, wait_until
from test_worklist import BASE, STUDY_UID, TODAY, by_accession, fill_worklist, findscu, refresh, worklist_config


class ScriptedMPPS:
    """A pynetdicom MPPS SCP recording every N-CREATE / N-SET in arrival order; `answer(op, uid,
    n)` gives the status of the n-th attempt of that message (default Success)."""

    def __init__(self, aet: str = "MPPSUP", port: int | None = None,
                 answer: Callable[[str, str, int], int] | None = None):
        self.aet, self.host = aet, LOCALHOST
        self.port = port or free_port()
        self.answer = answer or (lambda op, uid, n: 0x0000)
        self.received: list[tuple[str, str, Dataset]] = []
        self.attempts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._server: Any = None

    def _on(self, op: str, event: Any) -> Any:
        if op == "create":
            uid, ds = str(event.request.AffectedSOPInstanceUID), event.attribute_list
        else:
            uid, ds = str(event.request.RequestedSOPInstanceUID), event.modification_list
        with self._lock:
            n = self.attempts[(op, uid)] = self.attempts.get((op, uid), 0) + 1
        status = self.answer(op, uid, n)
        if status == 0x0000:
            with self._lock:
                self.received.append((op, uid, ds))
        return status, (ds if status == 0x0000 else None)

    def start(self) -> ScriptedMPPS:
        ae = AE(ae_title=self.aet)
        ae.add_supported_context(MPPS)
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=[
            (evt.EVT_N_CREATE, lambda e: self._on("create", e)), (evt.EVT_N_SET, lambda e: self._on("set", e))])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def ops(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(op, uid) for op, uid, _ in self.received]


@pytest.fixture
def mpps_upstream() -> Any:
    made: list[ScriptedMPPS] = []

    def make(**kw: Any) -> ScriptedMPPS:
        scp = ScriptedMPPS(**kw)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()


def mpps_config(db_url: str, wl: WorklistSCP, up: ScriptedMPPS, **extra: Any) -> dict[str, Any]:
    cfg = worklist_config(db_url, wl, **extra)
    cfg["nodes"]["MPPSUP"] = {"ae_title": up.aet, "host": LOCALHOST, "port": up.port, "roles": ["mpps"],
                              "timeout": "5s"}
    return cfg


def in_progress(label: str) -> Dataset:
    """An N-CREATE attribute list for the scheduled step of worklist item `label` (test_worklist)."""
    n = label[1:]
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ref = Dataset()
    ref.StudyInstanceUID = STUDY_UID[label]
    ref.AccessionNumber = f"A00{n}"
    ref.RequestedProcedureID = f"RP00{n}"
    ref.ScheduledProcedureStepID = f"S00{n}"
    ref.ScheduledProcedureStepDescription = f"STEP {label}"
    ref.ReferencedStudySequence = []
    ds.ScheduledStepAttributesSequence = [ref]
    ds.PatientName = "DOE^JOHN"
    ds.PatientID = f"P00{n}"
    ds.PerformedProcedureStepID = f"PPS{n}"
    ds.PerformedStationAETitle = "MODCT"
    ds.PerformedProcedureStepStartDate = TODAY
    ds.PerformedProcedureStepStartTime = "091500"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    return ds


def final(status: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = TODAY
    ds.PerformedProcedureStepEndTime = "094500"
    return ds


class Modality:
    """A pynetdicom MPPS SCU: one association per call, returns the status code."""

    def __init__(self, port: int):
        self.port = port

    def _assoc(self, handlers: list[Any] | None = None) -> Any:
        ae = AE(ae_title="MODCT")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(MPPS)
        assoc = ae.associate(LOCALHOST, self.port, ae_title="QRPROXY", evt_handlers=handlers or [])
        assert assoc.is_established, "qrproxy refused the MPPS association"
        return assoc

    def create(self, ds: Dataset, uid: str | None) -> tuple[int, str | None]:
        """(status, the response's Affected SOP Instance UID, read off the DIMSE command set)."""
        answered: list[str] = []

        def on_recv(event: Any) -> None:
            cmd = getattr(event.message, "command_set", None)
            if cmd is not None and "AffectedSOPInstanceUID" in cmd:
                answered.append(str(cmd.AffectedSOPInstanceUID))

        assoc = self._assoc([(evt.EVT_DIMSE_RECV, on_recv)])
        try:
            status, _ = assoc.send_n_create(ds, MPPS, uid)
        finally:
            assoc.release()
        return int(status.Status), (answered[-1] if answered else None)

    def set(self, ds: Dataset, uid: str) -> int:
        assoc = self._assoc()
        try:
            status, _ = assoc.send_n_set(ds, MPPS, uid)
        finally:
            assoc.release()
        return int(status.Status)


def accessions(proxy: Any, tmp: Path) -> set[str]:
    return set(by_accession(findscu(proxy.port, "QRPROXY", BASE, tmp)))


def test_mpps_relayed_and_completed_item_leaves_worklist(db_url: str, worklist_scp: WorklistSCP, mpps_upstream: Any,
                                                         qrproxy: Any, tmp_path: Path) -> None:
    fill_worklist(worklist_scp)
    up = mpps_upstream().start()
    proxy = qrproxy(mpps_config(db_url, worklist_scp, up), start=False)
    refresh(proxy)
    proxy.start()
    upstream_items = set(by_accession(findscu(worklist_scp.port, worklist_scp.aet, BASE, tmp_path / "u")))
    assert accessions(proxy, tmp_path / "q") == upstream_items and "A002" in upstream_items

    scu = Modality(proxy.port)
    uid = generate_uid()
    sent = in_progress("W2")
    assert scu.create(sent, uid)[0] == 0x0000
    wait_until(lambda: ("create", uid) in up.ops(), 60, lambda: f"N-CREATE relayed; upstream got {up.ops()}")
    got = up.received[0][2]
    for keyword in ("PatientID", "PerformedProcedureStepID", "PerformedProcedureStepStatus", "Modality"):
        assert str(got.get(keyword)) == str(sent.get(keyword)), keyword
    assert got.ScheduledStepAttributesSequence[0].AccessionNumber == "A002"
    assert accessions(proxy, tmp_path / "q") == upstream_items  # IN PROGRESS: still listed

    assert scu.set(final("COMPLETED"), uid) == 0x0000
    wait_until(lambda: ("set", uid) in up.ops(), 60, lambda: f"N-SET relayed; upstream got {up.ops()}")
    assert up.ops() == [("create", uid), ("set", uid)]
    assert up.received[1][2].PerformedProcedureStepStatus == "COMPLETED"
    # the upstream worklist still lists it; qrproxy does not
    assert set(by_accession(findscu(worklist_scp.port, worklist_scp.aet, BASE, tmp_path / "u"))) == upstream_items
    assert accessions(proxy, tmp_path / "q") == upstream_items - {"A002"}
    # ... and a refresh (the RIS has not caught up yet) does not bring it back
    refresh(proxy)
    assert accessions(proxy, tmp_path / "q") == upstream_items - {"A002"}

    # DISCONTINUED works the same; an N-CREATE without a UID gets one from qrproxy
    status, new_uid = scu.create(in_progress("W4"), None)
    assert status == 0x0000
    assert new_uid and new_uid != uid
    assert scu.set(final("DISCONTINUED"), new_uid) == 0x0000
    assert accessions(proxy, tmp_path / "q") == upstream_items - {"A002", "A004"}
    wait_until(lambda: ("set", new_uid) in up.ops(), 60, "second step relayed")
    assert up.ops() == [("create", uid), ("set", uid), ("create", new_uid), ("set", new_uid)]


def test_mpps_statuses(db_url: str, worklist_scp: WorklistSCP, mpps_upstream: Any, qrproxy: Any) -> None:
    up = mpps_upstream().start()
    proxy = qrproxy(mpps_config(db_url, worklist_scp, up))
    scu = Modality(proxy.port)
    uid = generate_uid()
    bad = in_progress("W1")
    bad.PerformedProcedureStepStatus = "COMPLETED"
    assert scu.create(bad, uid)[0] == 0x0106  # N-CREATE must be IN PROGRESS
    assert scu.set(final("COMPLETED"), uid) == 0x0112  # no such instance
    assert scu.create(in_progress("W1"), uid)[0] == 0x0000
    assert scu.create(in_progress("W1"), uid)[0] == 0x0111  # duplicate
    assert scu.set(final("FINISHED"), uid) == 0x0106  # not a status
    assert scu.set(final("COMPLETED"), uid) == 0x0000
    assert scu.set(final("DISCONTINUED"), uid) == 0x0110  # no updates after COMPLETED
    wait_until(lambda: len(up.ops()) == 2, 60, lambda: f"two messages relayed, got {up.ops()}")
    assert up.ops() == [("create", uid), ("set", uid)]
    log = proxy.log_text()
    assert "event=n-create" in log and "status=0x0111" in log and "status=0x0112" in log


def test_mpps_survives_outage_and_restart(db_url: str, worklist_scp: WorklistSCP, mpps_upstream: Any,
                                         qrproxy: Any, tmp_path: Path) -> None:
    port = free_port()
    up = mpps_upstream(port=port)  # not started: the upstream is down
    proxy = qrproxy(mpps_config(db_url, worklist_scp, up))
    scu = Modality(proxy.port)
    uids = [generate_uid(), generate_uid()]
    for uid, label in zip(uids, ("W1", "W2")):
        assert scu.create(in_progress(label), uid)[0] == 0x0000
    assert scu.set(final("COMPLETED"), uids[0]) == 0x0000
    wait_until(lambda: "event=node-down" in proxy.log_text() and "service=mpps" in proxy.log_text(), 60,
               "the relay noticing the node is down")
    status = proxy.cli("status", timeout=60).stdout
    assert "MPPS RELAY" in status and "MPPSUP" in status, status
    proxy.stop()  # SIGTERM with the messages still owed
    proxy.start()
    assert scu.set(final("DISCONTINUED"), uids[1]) == 0x0000
    up.start()
    wait_until(lambda: len(up.ops()) == 4, 120, lambda: f"4 messages after the outage, got {up.ops()}")
    ops = up.ops()
    # per step, the N-CREATE comes before its N-SET; overall the order of acknowledgement
    assert ops == [("create", uids[0]), ("create", uids[1]), ("set", uids[0]), ("set", uids[1])], ops


def test_mpps_permanent_refusal_is_held(db_url: str, worklist_scp: WorklistSCP, mpps_upstream: Any,
                                        qrproxy: Any) -> None:
    refused = generate_uid()
    up = mpps_upstream(answer=lambda op, uid, n: 0x0106 if (op == "create" and uid == refused) else 0x0000).start()
    proxy = qrproxy(mpps_config(db_url, worklist_scp, up))
    scu = Modality(proxy.port)
    ok = generate_uid()
    assert scu.create(in_progress("W1"), refused)[0] == 0x0000  # qrproxy accepted it; the upstream will not
    assert scu.set(final("COMPLETED"), refused) == 0x0000
    assert scu.create(in_progress("W2"), ok)[0] == 0x0000
    wait_until(lambda: ("create", ok) in up.ops(), 60, lambda: f"the next step relayed, got {up.ops()}")
    assert up.attempts[("create", refused)] == 1 and ("set", refused) not in up.attempts
    status = proxy.cli("status", timeout=60).stdout
    assert "mpps held for MPPSUP" in status and "0x0106" in status, status


def test_first_store_of_study_closes_item(db_url: str, worklist_scp: WorklistSCP, qrproxy: Any,
                                          tmp_path: Path) -> None:
    fill_worklist(worklist_scp)
    proxy = qrproxy(worklist_config(db_url, worklist_scp, worklist={"remove_on_store": "study"}), start=False)
    refresh(proxy)
    proxy.start()
    before = accessions(proxy, tmp_path / "q")
    assert "A004" in before
    files = [write_ct_file(tmp_path / f"ct{i}.dcm", StudyInstanceUID=STUDY_UID["W4"], AccessionNumber="A004",
                           InstanceNumber=i) for i in (1, 2)]
    assert_all_success(storescu(proxy.port, files, aec="QRPROXY"), files)
    assert accessions(proxy, tmp_path / "q") == before - {"A004"}
    # a study no item refers to changes nothing
    other = [write_ct_file(tmp_path / "other.dcm")]
    assert_all_success(storescu(proxy.port, other, aec="QRPROXY"), other)
    assert accessions(proxy, tmp_path / "q") == before - {"A004"}
