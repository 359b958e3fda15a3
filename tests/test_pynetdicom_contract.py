"""What qrproxy relies on inside pynetdicom, checked against the installed version.

pyproject pins pynetdicom to the minor version these were written against; a pynetdicom upgrade
that removes, renames or changes any of them fails here, by name, before a peer test hangs or a
patch silently stops applying. Each check names the qrproxy module that depends on it. (The
internals themselves go away with qrproxy's own upper layer, issue 16.)
"""

from __future__ import annotations

import inspect
import queue
from importlib.metadata import version
from typing import Any

import pytest
from packaging.specifiers import SpecifierSet

pynetdicom = pytest.importorskip("pynetdicom")
from pynetdicom import _config, dimse_messages, dsutils  # noqa: E402
from pynetdicom.acse import ACSE  # noqa: E402
from pynetdicom.association import Association  # noqa: E402
from pynetdicom.dimse import DIMSEServiceProvider  # noqa: E402
from pynetdicom.dul import DULServiceProvider  # noqa: E402
from pynetdicom.presentation import PresentationContext  # noqa: E402
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer  # noqa: E402


def _pinned() -> SpecifierSet:
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.replace(" ", "").startswith("pynetdicom"))
    return SpecifierSet(spec.replace(" ", "")[len("pynetdicom"):])


def test_installed_version_is_the_pinned_one() -> None:
    installed = version("pynetdicom")
    assert installed in _pinned(), f"pynetdicom {installed} is outside the pin {_pinned()} in pyproject.toml"


@pytest.mark.parametrize("name", ["STORE_SEND_CHUNKED_DATASET", "STORE_RECV_CHUNKED_DATASET",
                                  "LOG_REQUEST_IDENTIFIERS", "LOG_RESPONSE_IDENTIFIERS"])
def test_config_flags(name: str) -> None:
    """net/tuning.py sets these process-wide flags (stream_sent_datasets, stream_received_datasets,
    log_identifiers)."""
    assert hasattr(_config, name)


def _source(obj: Any) -> str:
    return inspect.getsource(obj)


def test_dul_send_queue_contract() -> None:
    """net/tuning.py _SendQueue replaces DULServiceProvider.to_provider_queue: the DUL must put
    with a plain put() and read the head as `.queue[0]`, both of which the subclass keeps."""
    init = _source(DULServiceProvider.__init__)
    assert "self.to_provider_queue" in init and "queue.Queue()" in init
    assert "self.to_provider_queue.put(primitive)" in _source(DULServiceProvider.send_pdu)
    assert "to_provider_queue.queue[0]" in _source(DULServiceProvider._process_recv_primitive)
    assert "_kill_thread" in init
    assert hasattr(DULServiceProvider, "peek_next_pdu")  # net/tuning.release_pending
    assert issubclass(DULServiceProvider, __import__("threading").Thread)  # dul.is_alive()
    q: queue.Queue[Any] = queue.Queue()
    assert hasattr(q, "queue") and hasattr(q, "mutex") and hasattr(q, "not_full")


@pytest.mark.parametrize("name", ["dul", "dimse", "acse", "is_aborted", "is_released", "is_established",
                                  "is_requestor", "accepted_contexts", "dimse_timeout", "send_c_store",
                                  "abort", "kill", "_handle_no_response", "_check_received_status"])
def test_association_members(name: str) -> None:
    """net/tuning.py (FastStore, _SendQueue, keep_responses_from_reactor, reject) and the public
    attributes scu/forward.py reads."""
    assoc = Association(pynetdicom.AE(), "requestor")
    assert hasattr(assoc, name), name


def test_dimse_and_acse_members() -> None:
    """net/tuning.py: keep_responses_from_reactor, next_message and answer_event_report call
    get_msg(block=...) and send_msg(primitive, context_id); fast_retrieve_pending wraps send_msg;
    reject (scp/access.py's rejections) calls ACSE.send_reject(result, source, diagnostic)."""
    assert "block" in inspect.signature(DIMSEServiceProvider.get_msg).parameters
    assert list(inspect.signature(DIMSEServiceProvider.send_msg).parameters)[1:3] == ["primitive", "context_id"]
    assert list(inspect.signature(ACSE.send_reject).parameters)[1:4] == ["result", "source", "diagnostic"]


def test_received_and_sent_files_go_through_patchable_names() -> None:
    """net/tuning.encrypt_received_files replaces dimse_messages.NamedTemporaryFile;
    decrypt_sent_files shadows `open` in dimse_messages and dsutils."""
    assert "NamedTemporaryFile" in vars(dimse_messages)
    assert "open(" in _source(dsutils.split_dataset)
    assert "open(" in _source(dimse_messages)


def test_transport_hooks() -> None:
    """net/server.Server subclasses ThreadedAssociationServer (server_bind, get_request,
    process_request_thread, socket.listen for the backlog); pdu_guard subclasses RequestHandler and
    wraps AssociationSocket.socket; net/tuning.set_nodelay reads assoc.dul.socket.socket."""
    for name in ("server_bind", "get_request", "process_request_thread", "shutdown", "active_associations"):
        assert hasattr(ThreadedAssociationServer, name), name
    assert hasattr(RequestHandler, "handle")
    assert "self.socket" in _source(AssociationSocket.__init__)


def test_presentation_context_copy_fields() -> None:
    """net/tuning.cheap_context_copies gives PresentationContext a __deepcopy__ that copies
    its fields; it must still be a plain object whose transfer syntaxes live in _transfer_syntax."""
    cx = PresentationContext()
    cx.abstract_syntax = "1.2.840.10008.1.1"
    cx.add_transfer_syntax("1.2.840.10008.1.2")
    assert "_transfer_syntax" in vars(cx) and hasattr(cx, "__dict__")
