"""pynetdicom peers: a C-STORE SCU on one association, a C-ECHO probe, and ScriptedSCP, a storage
SCP whose answer to each C-STORE a test scripts."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

import dicomgen
from peers import LOCALHOST, free_port

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def pynetdicom_store(port: int, items: Sequence[Any], *, aec: str = "QRPROXY", aet: str = "PYSCU",
                     sop_classes: Sequence[str] = (dicomgen.CT_IMAGE_STORAGE,)) -> list[int | None]:
    """C-STORE each item (Dataset or file path) on one association; the statuses qrproxy answered
    (None: no response). File paths are sent as raw bytes when STORE_SEND_CHUNKED_DATASET is set."""
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for uid in sop_classes:
        ae.add_requested_context(uid, [EXPLICIT_LE])
    assoc = ae.associate(LOCALHOST, port, ae_title=aec)
    assert assoc.is_established, f"association to qrproxy on port {port} failed"
    statuses: list[int | None] = []
    try:
        for item in items:
            rsp = assoc.send_c_store(item)
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return statuses


def echo_ok(port: int) -> bool:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOCALHOST, port, ae_title="QRPROXY")
    try:
        if not assoc.is_established:
            return False
        rsp = assoc.send_c_echo()
        return "Status" in rsp and rsp.Status == 0
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


class ScriptedSCP:
    """A pynetdicom Storage SCP on a loopback port whose answer to each C-STORE is scripted:
    ``answer(sop_instance_uid, attempt_number) -> status``. Records every attempt, and the dataset
    and calling AE of every instance it answered with Success."""

    def __init__(self, aet: str, answer: Callable[[str, int], int]):
        self.aet = aet
        self.host = LOCALHOST
        self.port = free_port()
        self.answer = answer
        self.attempts: Counter[str] = Counter()
        self.accepted: dict[str, Dataset] = {}
        self.calling: dict[str, str] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._ae: AE | None = None

    def _on_store(self, event: Any) -> Any:
        sop = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            self.attempts[sop] += 1
            n = self.attempts[sop]
        status = self.answer(sop, n)
        if status == 0x0000:
            ds = event.dataset
            ds.file_meta = event.file_meta
            with self._lock:
                self.accepted[sop] = ds
                self.calling[sop] = event.assoc.requestor.ae_title
            return 0x0000
        rsp = Dataset()
        rsp.Status = status
        rsp.ErrorComment = f"scripted 0x{status:04X}"
        return rsp

    def start(self) -> ScriptedSCP:
        ae = AE(ae_title=self.aet)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._ae = ae
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def snapshot(self) -> tuple[Counter[str], set[str]]:
        with self._lock:
            return Counter(self.attempts), set(self.accepted)
