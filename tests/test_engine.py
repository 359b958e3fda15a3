"""qrproxy's own upper layer (qrproxy/net/) on the wire, against real peers and raw sockets.

What a real peer does that a well-behaved test client would not: fragments split at every awkward
boundary (one-byte PDVs, several PDVs in one PDU, the end of the command and the start of the data
set in one PDU), maximum PDU lengths from 4 KiB to 1 MiB in both directions (DCMTK storescu sending,
storescp receiving), user identity, SOP class extended negotiation and an asynchronous operations
window in the A-ASSOCIATE-RQ, A-ABORT or a dead connection in the middle of a data set, a release
collision, a connection that never sends its A-ASSOCIATE-RQ. Every outcome is read from the peer
or the spool on disk, never from qrproxy's own account.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from fuzz.pdus import (A_ABORT, A_ASSOCIATE_AC, A_RELEASE_RP, CT_IMAGE, EXPLICIT_LE, P_DATA_TF, RELEASE_RQ,
                       VERIFICATION, RawPeer, establish, pdu, pdv, store_rq)
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.pdu_primitives import (AsynchronousOperationsWindowNegotiation, SOPClassExtendedNegotiation,
                                       UserIdentityNegotiation)

import dicomgen
from peers import LOCALHOST, free_port
from qrproxy.net import pdu as qpdu
from qrproxy.net.requestor import connect
from support import assert_all_success, node, proxy_config, spool_files, storescu, wait_storescp_has, wait_until


def _config(tmp_path: Path, nodes: dict | None = None, **extra: object) -> dict:
    return proxy_config(f"sqlite:///{tmp_path / 'q.sqlite3'}", nodes or {}, **extra)


def _encoded(ds: pydicom.Dataset) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _response_command(peer: RawPeer) -> pydicom.Dataset:
    """The next complete command set the proxy sends, decoded by pydicom (not by qrproxy)."""
    data = b""
    while True:
        reply = peer.read_pdu(timeout=30)
        assert reply is not None and reply.type == P_DATA_TF, reply
        body, i = reply.body, 0
        while i < len(body):
            length, _, control = struct.unpack_from(">LBB", body, i)
            if control & 0x01:
                data += body[i + 6:i + 4 + length]
                if control & 0x02:
                    return read_dataset(BytesIO(data), is_implicit_VR=True, is_little_endian=True)
            i += 4 + length


def _pieces(data: bytes, sizes: list[int]) -> list[bytes]:
    out, i = [], 0
    for n in sizes:
        if i >= len(data):
            break
        out.append(data[i:i + n])
        i += n
    while i < len(data):
        out.append(data[i:i + 4000])
        i += 4000
    return out


def test_fragments_at_awkward_boundaries(qrproxy, tmp_path: Path) -> None:
    """A C-STORE whose command set comes in one-byte PDVs spread over PDUs, whose last command
    fragment shares a PDU with the first data set fragments, with PDVs of 1, 2, 3, 5 and 7 bytes
    packed several to a PDU: stored byte for byte, answered Success."""
    proc = qrproxy(_config(tmp_path, max_pdu=16384))
    ds = dicomgen.make_study(1, 1, rows=64, cols=64)[0]
    data = _encoded(ds)
    cmd = store_rq(str(ds.SOPInstanceUID))
    peer, accepted = establish(LOCALHOST, proc.port, contexts=((CT_IMAGE, (EXPLICIT_LE,)),))
    with peer:
        assert accepted == {1: 0}
        for b in cmd[:3]:  # three PDUs of one command byte each
            peer.send(pdu(P_DATA_TF, pdv(1, 0x01, bytes([b]))))
        chunks = _pieces(data, [1, 2, 3, 5, 7, 11, 4093])
        first = pdv(1, 0x01, cmd[3:-1]) + pdv(1, 0x03, cmd[-1:]) + b"".join(pdv(1, 0x00, c) for c in chunks[:4])
        peer.send(pdu(P_DATA_TF, first))
        rest = chunks[4:]
        for k, c in enumerate(rest):
            peer.send(pdu(P_DATA_TF, pdv(1, 0x02 if k == len(rest) - 1 else 0x00, c)))
        rsp = _response_command(peer)
        assert rsp.Status == 0x0000 and rsp.MessageIDBeingRespondedTo == 1, rsp
        peer.send(RELEASE_RQ)
        assert (r := peer.read_pdu()) is not None and r.type == A_RELEASE_RP
    files = spool_files(proc)
    assert len(files) == 1, files
    held = pydicom.dcmread(files[0])
    assert dicomgen.compare_datasets(ds, held) == []


@pytest.mark.peer
@pytest.mark.parametrize("max_pdu", [4096, 131072], ids=["4KiB", "128KiB"])
def test_max_pdu_both_directions(qrproxy, storescp_factory, tmp_path: Path, max_pdu: int) -> None:
    """storescu sends in the PDUs qrproxy announced; qrproxy forwards in the PDUs storescp announced
    (DCMTK's range is 4 KiB to 128 KiB); every instance arrives at storescp identical."""
    scp = storescp_factory(extra_args=["--max-pdu", str(max_pdu)])
    proc = qrproxy(_config(tmp_path, {"PACS": node(scp, max_pdu=max_pdu)}, max_pdu=max_pdu))
    study = dicomgen.make_study(1, 3, rows=256, cols=256)
    files = dicomgen.write_all(study, tmp_path / "in")
    res = storescu(proc.port, files, aec="QRPROXY", extra=["--max-pdu", str(max_pdu)])
    assert_all_success(res, files)
    wait_storescp_has(scp, [str(ds.SOPInstanceUID) for ds in study])
    received = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in scp.output_dir.iterdir()}
    for ds in study:
        assert dicomgen.compare_datasets(ds, received[ds.SOPInstanceUID]) == []


def test_one_mebibyte_pdus(qrproxy, tmp_path: Path) -> None:
    """qrproxy announces 1 MiB; pynetdicom sends PDUs that large; the data sets are stored whole."""
    from support import pynetdicom_store

    proc = qrproxy(_config(tmp_path, max_pdu=1 << 20))
    study = dicomgen.make_study(1, 2, rows=1024, cols=1024)  # 2 MB each: two full PDUs and a tail
    assert pynetdicom_store(proc.port, study) == [0x0000, 0x0000]
    held = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in spool_files(proc)}
    for ds in study:
        assert dicomgen.compare_datasets(ds, held[ds.SOPInstanceUID]) == []


def test_negotiation_items_are_accepted(qrproxy, tmp_path: Path) -> None:
    """User identity (with a response requested), SOP class extended negotiation and an asynchronous
    operations window in the A-ASSOCIATE-RQ: the association is accepted and works."""
    proc = qrproxy(_config(tmp_path))
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(VERIFICATION)
    identity = UserIdentityNegotiation()
    identity.user_identity_type = 2
    identity.primary_field = b"tech"
    identity.secondary_field = b"secret"
    identity.positive_response_requested = True
    extended = SOPClassExtendedNegotiation()
    extended.sop_class_uid = VERIFICATION
    extended.service_class_application_information = b"\x01"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = 5
    window.maximum_number_operations_performed = 5
    assoc = ae.associate(LOCALHOST, proc.port, ae_title="QRPROXY", ext_neg=[identity, extended, window])
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
        ae.shutdown()


@pytest.mark.parametrize("how", ["a-abort", "connection-reset"])
def test_cut_off_mid_dataset_leaves_nothing(qrproxy, tmp_path: Path, how: str) -> None:
    """Half a data set, then an A-ABORT or a dead connection: the partial file is removed, nothing
    is indexed or queued, and the next association works."""
    proc = qrproxy(_config(tmp_path))
    ds = dicomgen.make_study(1, 1, rows=256, cols=256)[0]
    data = _encoded(ds)
    peer, _ = establish(LOCALHOST, proc.port, contexts=((CT_IMAGE, (EXPLICIT_LE,)),))
    with peer:
        peer.send(pdu(P_DATA_TF, pdv(1, 0x03, store_rq(str(ds.SOPInstanceUID)))))
        peer.send(pdu(P_DATA_TF, pdv(1, 0x00, data[:len(data) // 2])))
        incoming = proc.dir / "spool" / "incoming"
        wait_until(lambda: any(incoming.iterdir()), 30, "the partial file in spool/incoming")
        if how == "a-abort":
            peer.send(bytes([7, 0, 0, 0, 0, 4, 0, 0, 0, 0]))
        else:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    wait_until(lambda: not any(incoming.iterdir()), 30, "the partial file removed")
    wait_until(lambda: "event=c-store-partial-removed" in proc.log_text(), 30, "the partial-removed line")
    assert spool_files(proc) == []
    peer, accepted = establish(LOCALHOST, proc.port)
    with peer:
        assert accepted == {1: 0}


def test_no_associate_request_is_closed_after_artim(qrproxy, tmp_path: Path) -> None:
    """A connection that never sends its A-ASSOCIATE-RQ is closed after acse_timeout (ARTIM)."""
    proc = qrproxy(_config(tmp_path, acse_timeout="1s"))
    peer = RawPeer(LOCALHOST, proc.port, timeout=30)
    with peer:
        t0 = time.monotonic()
        assert peer.closed_by_peer(timeout=30)
        assert time.monotonic() - t0 < 20


def _collision_scp(listener: socket.socket, seen: list[int]) -> None:
    """Accept one association; answer its A-RELEASE-RQ with our own A-RELEASE-RQ first (a release
    collision, PS3.8 D.2), then with A-RELEASE-RP once the requestor answered ours."""
    conn, _ = listener.accept()
    conn.settimeout(30)

    def read() -> tuple[int, bytes]:
        head = b""
        while len(head) < 6:
            head += conn.recv(6 - len(head))
        kind, _, length = struct.unpack(">BBL", head)
        body = b""
        while len(body) < length:
            body += conn.recv(length - len(body))
        return kind, body

    kind, body = read()
    rq = qpdu.decode_associate(memoryview(body), qpdu.ASSOCIATE_RQ)
    for cx in rq.contexts:
        cx.result, cx.transfer_syntax = 0, cx.transfer_syntaxes[0]
    conn.sendall(qpdu.encode_associate(qpdu.Associate(called=rq.called, calling=rq.calling, contexts=rq.contexts,
                                                      max_length=16384), qpdu.ASSOCIATE_AC))
    kind, _ = read()
    seen.append(kind)  # the requestor's A-RELEASE-RQ
    conn.sendall(qpdu.RELEASE_RQ_PDU)
    kind, _ = read()
    seen.append(kind)  # its A-RELEASE-RP to our RQ
    conn.sendall(qpdu.RELEASE_RP_PDU)
    conn.close()


def test_release_collision_as_requestor() -> None:
    listener = socket.socket()
    listener.bind((LOCALHOST, 0))
    listener.listen(1)
    seen: list[int] = []
    t = threading.Thread(target=_collision_scp, args=(listener, seen), daemon=True)
    t.start()
    assoc = connect(LOCALHOST, listener.getsockname()[1], calling="QRPROXY", called="PEER",
                    contexts=[(VERIFICATION, ["1.2.840.10008.1.2"])], timeout=10)
    assert assoc.is_established
    assoc.release()
    t.join(15)
    listener.close()
    assert seen == [qpdu.RELEASE_RQ, qpdu.RELEASE_RP], seen
    assert assoc.is_released and not assoc.is_aborted


def test_requestor_names_what_went_wrong() -> None:
    """Refused, and an A-ASSOCIATE-RJ with its reason in words."""
    from qrproxy.net.requestor import ConnectFailed

    port = free_port()
    with pytest.raises(ConnectFailed) as refused:
        connect(LOCALHOST, port, calling="QRPROXY", called="PEER", contexts=[(VERIFICATION, ["1.2.840.10008.1.2"])])
    assert refused.value.kind == "refused"
    with pytest.raises(ConnectFailed) as dns:
        connect("pacs.invalid", 104, calling="QRPROXY", called="PEER", contexts=[(VERIFICATION, ["1.2.840.10008.1.2"])])
    assert dns.value.kind == "dns" and "pacs.invalid" in str(dns.value)


def test_rejection_reason_in_words(qrproxy, tmp_path: Path) -> None:
    from qrproxy.net.requestor import ConnectFailed

    proc = qrproxy(_config(tmp_path, unknown_calling_ae="reject", allowed_calling_ae_titles=["MODCT"]))
    with pytest.raises(ConnectFailed) as rejected:
        connect(LOCALHOST, proc.port, calling="STRANGER", called="QRPROXY",
                contexts=[(VERIFICATION, ["1.2.840.10008.1.2"])])
    assert rejected.value.kind == "rejected" and rejected.value.rejection == (1, 1, 3)
    assert "calling AE title not recognised" in str(rejected.value)
    assert A_ASSOCIATE_AC and A_ABORT  # the raw constants stay importable for the fuzz suite
