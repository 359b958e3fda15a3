"""Fixtures for tests against real peers (Orthanc, DCMTK storescp/wlmscpfs, PostgreSQL, qrproxy).

Every peer a test starts is stopped at teardown, and when the test fails the tail of each peer's
log is attached to the failure report ("log of orthanc (...)" sections).

Fixtures:
    orthanc_factory(**kw) -> OrthancServer      started; kw as OrthancServer(...) minus tmpdir
    orthanc                -> OrthancServer      started with defaults (AET ORTHANC)
    storescp_factory(**kw) -> StoreSCP           started
    storescp               -> StoreSCP           started (AET STORESCP)
    worklist_scp_factory(**kw) -> WorklistSCP    started
    worklist_scp           -> WorklistSCP        started (AET RISMWL)
    qrproxy(config, **kw)  -> QrproxyProcess     started unless start=False
    pg_base_url            -> str                session-wide; skip/fail when PostgreSQL is absent
    db_url                 -> str                parametrized: sqlite (file in tmp_path), postgresql
                                                 (fresh database, dropped at teardown)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import peers  # noqa: E402
from peers import (  # noqa: E402
    OrthancServer,
    Peer,
    QrproxyProcess,
    StoreSCP,
    WorklistSCP,
    create_database,
    drop_database,
    postgres_url,
)

_PEERS_ATTR = "_qrproxy_test_peers"


# --- failure reports with peer logs -----------------------------------------------------------


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)
    if rep.failed and rep.when in ("setup", "call"):
        for peer in getattr(item, _PEERS_ATTR, []):
            tail = peer.log_tail(80)
            rep.sections.append((f"log of {peer.name} ({peer.log_path})", tail or "(empty)"))


def _track(request: pytest.FixtureRequest, peer: Peer) -> None:
    """Remember the peer for failure reports."""
    node = request.node
    if not hasattr(node, _PEERS_ATTR):
        setattr(node, _PEERS_ATTR, [])
    getattr(node, _PEERS_ATTR).append(peer)


def _unique_dir(base: Path, stem: str) -> Path:
    n = 1
    while (base / f"{stem}{n}").exists():
        n += 1
    d = base / f"{stem}{n}"
    d.mkdir(parents=True)
    return d


def _factory(request: pytest.FixtureRequest, tmp_path: Path, cls: type[Peer], stem: str):  # type: ignore[no-untyped-def]
    started: list[Peer] = []

    def make(*, start: bool = True, **kw: Any) -> Any:
        peer = cls(_unique_dir(tmp_path, stem), **kw)
        started.append(peer)
        _track(request, peer)
        if start:
            peer.start()
        return peer

    def stop_all() -> None:
        for peer in reversed(started):
            peer.stop()

    return make, stop_all


# --- peers ------------------------------------------------------------------------------------


@pytest.fixture
def orthanc_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """``orthanc_factory(aet="ORTHANC", modalities={name: (aet, host, port)}, worklists_dir=None,
    start=True, **kw)``: a started OrthancServer in its own subdirectory of tmp_path."""
    make, stop_all = _factory(request, tmp_path, OrthancServer, "orthanc")
    yield make
    stop_all()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    return orthanc_factory()


@pytest.fixture
def storescp_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., StoreSCP]]:
    """``storescp_factory(aet="STORESCP", extra_args=(), start=True)``: a started StoreSCP."""
    make, stop_all = _factory(request, tmp_path, StoreSCP, "storescp")
    yield make
    stop_all()


@pytest.fixture
def storescp(storescp_factory: Callable[..., StoreSCP]) -> StoreSCP:
    return storescp_factory()


@pytest.fixture
def worklist_scp_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., WorklistSCP]]:
    """``worklist_scp_factory(aet="RISMWL", start=True, ...)``: a started WorklistSCP."""
    make, stop_all = _factory(request, tmp_path, WorklistSCP, "wlmscpfs")
    yield make
    stop_all()


@pytest.fixture
def worklist_scp(worklist_scp_factory: Callable[..., WorklistSCP]) -> WorklistSCP:
    return worklist_scp_factory()


@pytest.fixture
def qrproxy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., QrproxyProcess]]:
    """``qrproxy(config, *, name="qrproxy", start=True, extra_args=(), timeout=None)``.

    ``config`` is a dict or YAML text; returns a QrproxyProcess, started (its DICOM port accepts
    connections) unless ``start=False``. All are stopped (SIGTERM, SIGKILL after 15 s) at teardown.
    """
    started: list[QrproxyProcess] = []

    def make(
        config: str | dict[str, Any],
        *,
        name: str = "qrproxy",
        start: bool = True,
        timeout: float | None = None,
        **kw: Any,
    ) -> QrproxyProcess:
        proc = QrproxyProcess(_unique_dir(tmp_path, name), config, name=name, **kw)
        started.append(proc)
        _track(request, proc)
        if start:
            proc.start(timeout)
        return proc

    yield make
    for proc in reversed(started):
        proc.stop()


# --- databases --------------------------------------------------------------------------------


def _pg_required() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes") or os.environ.get("QRPROXY_REQUIRE_PG") == "1"


@pytest.fixture(scope="session")
def pg_base_url() -> str:
    """URL of a reachable PostgreSQL server (maintenance database). Skipped when none is
    reachable, but a failure when CI=true or QRPROXY_REQUIRE_PG=1."""
    url = postgres_url()
    if url is None:
        msg = f"PostgreSQL not reachable ({peers.last_postgres_error}); set QRPROXY_TEST_PG or run scripts/test"
        if _pg_required():
            pytest.fail(msg + " [required: CI or QRPROXY_REQUIRE_PG=1]", pytrace=False)
        pytest.skip(msg)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database: a new SQLite file, or a brand-new PostgreSQL
    database (dropped at teardown)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'qrproxy.sqlite3'}"
        return
    base = request.getfixturevalue("pg_base_url")
    url = create_database(base)
    try:
        yield url
    finally:
        drop_database(url)


# Fixtures that start a real peer or a qrproxy server process: a test using one is marked `peer`.
PEER_FIXTURES = frozenset({
    "qrproxy", "orthanc", "orthanc_factory", "storescp", "storescp_factory", "worklist_scp",
    "worklist_scp_factory", "dcmqrscp", "dcmqrscp_factory", "scripted_scp", "recording_scp",
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the postgresql side of db_url get the `postgres` marker (-m "not postgres"); tests
    that start a peer or a qrproxy server (a PEER_FIXTURES fixture, or a module marked `peer` for
    peers it starts itself) get the `peer` marker. `scripts/test --fast` runs the rest, with
    QRPROXY_TEST_FAST=1 making any peer start fail loudly (tests/peers.py), so a test that starts
    one without the marker is found, not silently slow."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("db_url") == "postgresql":
            item.add_marker(pytest.mark.postgres)
        if PEER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.peer)


# --- DCMTK dcmqrscp (appended) ----------------------------------------------------------------


@pytest.fixture
def dcmqrscp_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., peers.DcmqrSCP]]:
    """``dcmqrscp_factory(aet="DCMQR", peers={name: (aet, host, port)}, extra_args=(), start=True)``:
    a started DcmqrSCP (DCMTK Q/R archive); ``peers`` are the C-MOVE destinations it knows."""
    make, stop_all = _factory(request, tmp_path, peers.DcmqrSCP, "dcmqrscp")
    yield make
    stop_all()


@pytest.fixture
def dcmqrscp(dcmqrscp_factory: Callable[..., peers.DcmqrSCP]) -> peers.DcmqrSCP:
    return dcmqrscp_factory()


@pytest.fixture
def scripted_scp() -> Iterator[Callable[[str, Callable[[str, int], int]], Any]]:
    """``scripted_scp(aet, answer)``: a started support.ScriptedSCP, stopped at teardown."""
    from support import ScriptedSCP

    made: list[ScriptedSCP] = []

    def make(aet: str, answer: Callable[[str, int], int]) -> ScriptedSCP:
        scp = ScriptedSCP(aet, answer).start()
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.stop()
