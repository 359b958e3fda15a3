"""Hardened input handling as a peer sees it: calling AE bound to its node's address, per-service
whitelists, per-peer association cap, idle timeout, maximum PDU and data set size (docs/operations.md "Security
and limits"). Peers are DCMTK tools, pynetdicom associations from other loopback addresses, and raw
sockets (tests/fuzz/pdus.py) for what no well-behaved tool sends."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from fuzz.pdus import (A_ABORT, A_ASSOCIATE_AC, A_RELEASE_RP, CT_IMAGE, EXPLICIT_LE, IMPLICIT_LE, store_rq,
                       P_DATA_TF, RELEASE_RQ, VERIFICATION, RawPeer, associate_rq, echo_rq, establish,
                       p_data, pdu, pdv)
from peers import dcmtk, free_port
from support import echoscu
from pynetdicom import AE

import dicomgen

ENV = dict(os.environ, TCP_NODELAY="1")


def config(db_url: str, **extra: object) -> dict:
    cfg = {"ae_title": "QRPROXY", "host": "127.0.0.1", "port": free_port(), "database": db_url,
           "spool_dir": "var/spool"}
    cfg.update(extra)
    return cfg


def modality(host: str = "127.0.0.1", **extra: object) -> dict:
    node = {"ae_title": "MODCT", "host": host, "port": free_port(), "roles": ["modality"]}
    node.update(extra)
    return node


def echo_from(port: int, calling: str, source: str = "127.0.0.1") -> tuple[str, tuple[int, int, int] | None]:
    """('accepted'|'rejected'|'aborted', (result, source, diagnostic) of an A-ASSOCIATE-RJ)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate("127.0.0.1", port, ae_title="QRPROXY", bind_address=(source, 0))
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        assert status is not None and status.Status == 0
        return "accepted", None
    if assoc.is_rejected:
        rj = assoc.acceptor.primitive
        return "rejected", (rj.result, rj.result_source, rj.diagnostic)
    return "aborted", None


def wait_log(proc, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in proc.log_text().splitlines():
            if needle in line:
                return line
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} not in the log:\n{proc.log_tail(40)}")


def storescu(port: int, calling: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("storescu"), "-v", "-aet", calling, "-aec", "QRPROXY", "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120, env=ENV)



# --- calling AE bound to the node's address ---------------------------------------------------


def test_node_ae_title_from_another_address_is_rejected(qrproxy, db_url: str) -> None:
    proc = qrproxy(config(db_url, unknown_calling_ae="reject",
                          nodes={"CT": modality(addresses=["127.0.0.3"])}))
    assert echo_from(proc.port, "MODCT", "127.0.0.1") == ("accepted", None)
    assert echo_from(proc.port, "MODCT", "127.0.0.3") == ("accepted", None)
    # rejected-permanent, service-user, calling-AE-title-not-recognized
    assert echo_from(proc.port, "MODCT", "127.0.0.2") == ("rejected", (0x01, 0x01, 0x03))
    line = wait_log(proc, "event=association-rejected")
    assert "reason=calling-ae-address-mismatch" in line and "calling=MODCT" in line, line
    assert "peer=127.0.0.2:" in line and "127.0.0.1" in line.split("expected=")[1], line
    closing = wait_log(proc, "result=rejected:calling-ae-address-mismatch")
    assert "calling=MODCT" in closing
    # the proxy goes on serving the node from its own address
    assert echo_from(proc.port, "MODCT", "127.0.0.1") == ("accepted", None)


def test_address_binding_off_only_warns(qrproxy, db_url: str) -> None:
    proc = qrproxy(config(db_url, bind_ae_to_host=False, unknown_calling_ae="reject",
                          nodes={"CT": modality()}))
    assert echo_from(proc.port, "MODCT", "127.0.0.2") == ("accepted", None)
    line = wait_log(proc, "event=calling-ae-address-mismatch")
    assert "action=accepted" in line and "peer=127.0.0.2:" in line


def test_binding_defaults_to_warn_when_unknown_aes_are_accepted(qrproxy, db_url: str) -> None:
    proc = qrproxy(config(db_url, nodes={"CT": modality()}))
    assert echo_from(proc.port, "MODCT", "127.0.0.2") == ("accepted", None)
    wait_log(proc, "event=calling-ae-address-mismatch")


# --- per-service whitelists -------------------------------------------------------------------


def test_per_service_whitelist(qrproxy, db_url: str, tmp_path: Path) -> None:
    proc = qrproxy(config(db_url, services={"store": {"allowed_calling_ae_titles": ["CT1"]},
                                            "echo": {"allowed_calling_ae_titles": ["CT1", "VIEWER"]}}))
    files = dicomgen.write_all(dicomgen.make_study(n_series=1, per_series=1), tmp_path / "in")
    ok = storescu(proc.port, "CT1", *files)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # VIEWER may echo, not store: its storage contexts are not accepted
    assert echoscu(proc.port, aet="VIEWER").returncode == 0
    refused = storescu(proc.port, "VIEWER", *files)
    out = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "no acceptable presentation contexts" in out.lower(), out
    wait_log(proc, "event=services-restricted calling=VIEWER")
    # OTHER may not echo either (it may still query: find is not restricted)
    bad = echoscu(proc.port, aet="OTHER")
    assert bad.returncode != 0 and "no acceptable presentation contexts" in (bad.stdout + bad.stderr).lower()
    assert "denied=echo,store" in wait_log(proc, "event=services-restricted calling=OTHER")


# --- per-peer association cap -----------------------------------------------------------------


def test_per_peer_cap_rejects_transient_and_serves_others(qrproxy, db_url: str) -> None:
    proc = qrproxy(config(db_url, max_associations_per_peer=2))
    held = [establish("127.0.0.1", proc.port)[0] for _ in range(2)]
    try:
        # rejected-transient, service-provider (presentation), local-limit-exceeded
        assert echo_from(proc.port, "THIRD", "127.0.0.1") == ("rejected", (0x02, 0x03, 0x02))
        assert "reason=per-peer-limit" in wait_log(proc, "event=association-rejected")
        assert echo_from(proc.port, "OTHERHOST", "127.0.0.2") == ("accepted", None)
    finally:
        for peer in held:
            peer.close()
    deadline = time.monotonic() + 90
    while echo_from(proc.port, "AGAIN", "127.0.0.1")[0] != "accepted":
        assert time.monotonic() < deadline, "slots not freed after the held associations closed"
        time.sleep(0.2)


# --- idle timeout -----------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["between-pdus", "mid-pdu"])
def test_silent_peer_is_aborted_and_its_slot_freed(qrproxy, where: str, tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'q.sqlite3'}"
    proc = qrproxy(config(db_url, idle_timeout="1s", max_associations_per_peer=1))
    peer, _ = establish("127.0.0.1", proc.port, timeout=60)
    with peer:
        if where == "mid-pdu":
            peer.send(pdu(P_DATA_TF, b"", length=100)[:6] + b"\x00\x00")  # 8 of 106 bytes
        reply = peer.read_pdu(timeout=60)
        assert reply is not None and reply.type == A_ABORT, reply
        assert peer.closed_by_peer(timeout=60)
    # the proxy frees the slot (max_associations_per_peer: 1) once its side of the abort is done
    deadline = time.monotonic() + 90
    while echo_from(proc.port, "NEXT")[0] != "accepted":
        assert time.monotonic() < deadline, "slot not freed after the silent peer was aborted"
        time.sleep(0.2)


# --- maximum PDU and data set size ------------------------------------------------------------


def test_pdu_longer_than_announced_is_aborted(qrproxy, tmp_path: Path) -> None:
    proc = qrproxy(config(f"sqlite:///{tmp_path / 'q.sqlite3'}", max_pdu=16384))
    peer, accepted = establish("127.0.0.1", proc.port)
    with peer:
        ac = None  # the A-ASSOCIATE-AC announced max_pdu; a 4 MB P-DATA-TF header follows
        peer.send(pdu(P_DATA_TF, b"", length=4 << 20)[:6] + pdv(1, 0x03, b"\x00" * 1000))
        reply = peer.read_pdu()
        assert reply is not None and reply.type == A_ABORT, (reply, ac)
        assert reply.body[2] == 0x02  # source: service provider
    line = wait_log(proc, "event=association-aborted")
    assert "reason=pdu-too-long" in line and "limit=16390" in line, line
    assert echo_from(proc.port, "NEXT")[0] == "accepted"


def test_pdu_within_limit_works(qrproxy, tmp_path: Path) -> None:
    proc = qrproxy(config(f"sqlite:///{tmp_path / 'q.sqlite3'}", max_pdu=16384))
    peer, accepted = establish("127.0.0.1", proc.port)
    with peer:
        assert accepted.get(1) == 0
        peer.send(p_data(1, 0x03, echo_rq()))
        reply = peer.read_pdu()
        assert reply is not None and reply.type == P_DATA_TF
        peer.send(RELEASE_RQ)
        assert (r := peer.read_pdu()) is not None and r.type == A_RELEASE_RP


def test_dataset_larger_than_max_is_aborted_not_stored(qrproxy, db_url: str, tmp_path: Path) -> None:
    proc = qrproxy(config(db_url, store={"max_dataset_size": "200KB"}))
    big = dicomgen.make_study(n_series=1, per_series=1, rows=512, cols=512)  # about 512 KB
    small = dicomgen.make_study(n_series=1, per_series=1, rows=64, cols=64)
    big_files = dicomgen.write_all(big, tmp_path / "big")
    small_files = dicomgen.write_all(small, tmp_path / "small")
    r = storescu(proc.port, "CT1", *big_files)
    assert r.returncode != 0, r.stdout + r.stderr
    line = wait_log(proc, "event=association-aborted")
    assert "reason=dataset-too-large" in line and "limit=200000" in line, line
    ok = storescu(proc.port, "CT1", *small_files)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    status = proc.cli("status")
    spool = proc.dir / "var" / "spool"
    incoming = list((spool / "incoming").glob("*")) if (spool / "incoming").exists() else []
    deadline = time.monotonic() + 60
    while incoming and time.monotonic() < deadline:
        time.sleep(0.2)
        incoming = list((spool / "incoming").glob("*"))
    assert not incoming, f"partial files left: {incoming}"
    objects = [p for p in (spool / "objects").rglob("*") if p.is_file()]
    assert len(objects) == 1, (objects, status.stdout)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize("key,value,named", [
    ("max_associations_per_peer", 0, "max_associations_per_peer"),
    ("services", {"store": {"allowed_calling_ae_titles": ["A\\B"]}}, "services.store.allowed_calling_ae_titles"),
    ("services", {"stor": {}}, "services.stor"),
    ("bind_ae_to_host", "maybe", "bind_ae_to_host"),
    ("store", {"max_dataset_size": "lots"}, "store.max_dataset_size"),
])
def test_bad_limit_config_names_the_key(qrproxy, tmp_path: Path, key: str, value: object, named: str) -> None:
    proc = qrproxy(config(f"sqlite:///{tmp_path / 'q.sqlite3'}", **{key: value}), start=False)
    r = proc.cli("check")
    assert r.returncode == 2, r.stdout + r.stderr
    assert named in r.stdout + r.stderr, r.stdout + r.stderr


def test_unknown_vr_in_an_indexed_attribute_is_refused_in_words(qrproxy, tmp_path: Path) -> None:
    """Found by the long fuzz run: a Patient ID with an unknown VR parses (values are converted
    lazily) and then failed while indexing, with a traceback. It is the sender's data set: 0xC000
    with the reason, nothing stored, the association still usable."""
    from qrproxy.net import dimse

    proc = qrproxy(config(f"sqlite:///{tmp_path / 'q.sqlite3'}"))
    ds = dicomgen.make_ct(patient_id="BADVR1")
    data = dimse.encode_dataset(ds, "1.2.840.10008.1.2.1")
    needle = b"\x10\x00\x20\x00LO"
    assert data.count(needle) == 1
    data = data.replace(needle, b"\x10\x00\x20\x00\x4f\x8b")
    peer, accepted = establish("127.0.0.1", proc.port, contexts=((CT_IMAGE, (EXPLICIT_LE,)),))
    with peer:
        assert accepted.get(1) == 0, accepted
        assert peer.send(p_data(1, 0x03, store_rq(str(ds.SOPInstanceUID))))
        assert peer.send(pdu(P_DATA_TF, pdv(1, 0x02, data)))
        reply = peer.read_pdu(timeout=30)
        assert reply is not None and reply.type == P_DATA_TF, reply
        rsp = dimse.decode(reply.body[6:])
        assert rsp.field == 0x8001 and rsp.Status == 0xC000, rsp
        assert "cannot read attribute values" in (rsp.ErrorComment or ""), rsp
    assert echoscu(proc.port).returncode == 0  # the proxy serves on
    log = proc.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert "status=0xC000 reason=\"cannot read attribute values" in log, log[-3000:]
    objects = proc.dir / "var" / "spool" / "objects"
    assert not [p for p in objects.rglob("*") if p.is_file()], "a refused data set was stored"
