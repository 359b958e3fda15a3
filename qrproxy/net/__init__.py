"""The DICOM wire, owned by qrproxy: the upper layer of PS3.8 and the DIMSE command set of PS3.7.

pdu.py (the PDUs and the reader that frames them), dimse.py (command sets), association.py (one
association, either side: messages in and out, release, abort, limits, the SCU calls),
acceptor.py (listening and negotiating), requestor.py (connecting and negotiating, failures named),
tls.py (certificates and handshakes) and dicomenc.py (identifiers encoded straight to bytes).

It may import config and the foundations (logs, progress) only. pynetdicom is used for its SOP class
registry and context lists alone, never for its association machinery (tests/test_architecture.py).
"""
