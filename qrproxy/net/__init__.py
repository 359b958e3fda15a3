"""Everything that touches the DICOM wire below pynetdicom's public API: the threaded association
server (server.py), PDU limits (pdu_guard.py), TLS (tls.py), identifiers encoded straight to bytes
(dicomenc.py), and the measured pynetdicom patches (tuning.py), pinned to pynetdicom 3.0.x and
guarded by tests/test_pynetdicom_contract.py.

It may import config and the foundations (logs, progress) only; every other package reaches the
wire through it or through pynetdicom's public API.
"""
