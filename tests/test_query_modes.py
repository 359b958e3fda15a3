"""query.mode against a real Orthanc upstream: cache-first with query-through, upstream-first with
fallback, cache-only; the hot cache seeing new writes; stale answers logged. SQLite and PostgreSQL.

Expected answers always come from Orthanc's own C-FIND answer to the same query (asked directly),
never from what qrproxy wrote.
"""

from __future__ import annotations

import datetime as dt
import socket
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

import dicomgen
from peers import LOCALHOST, OrthancServer
from test_find import STUDY_ROOT, _identifier, _scu_find
from support import assert_all_success, cli, node, proxy_config, storescu, wait_until

pytestmark = pytest.mark.orthanc

KEYS = ("PatientName", "PatientID", "StudyDate", "AccessionNumber", "StudyDescription")


def _day(days_ago: int) -> str:
    return (dt.date.today() - dt.timedelta(days=days_ago)).strftime("%Y%m%d")


def _upload(orthanc: OrthancServer, days_ago: int, tag: str) -> str:
    datasets = dicomgen.make_study(n_series=1, per_series=2, patient_id=f"QM{tag}", accession=f"QMACC{tag}",
                                   patient_name=f"MODE^{tag}", StudyDate=_day(days_ago),
                                   StudyDescription=f"MODES {tag}")
    for ds in datasets:
        orthanc.upload(dicomgen.encode(ds))
    return str(datasets[0].StudyInstanceUID)


def _query(**match: str) -> Dataset:
    return _identifier(QueryRetrieveLevel="STUDY", StudyInstanceUID=match.pop("StudyInstanceUID", ""),
                       **{k: match.get(k, "") for k in KEYS})


def _answers(port: int, ident: Dataset, aec: str) -> dict[str, dict[str, str]]:
    rsp = _scu_find(port, ident, STUDY_ROOT, aec=aec)
    assert rsp and rsp[-1][0] == 0x0000, [hex(s) for s, _, _ in rsp]
    return {str(ds.StudyInstanceUID): {k: str(ds.get(k, "") or "") for k in KEYS}
            for s, ds, _ in rsp if s in (0xFF00, 0xFF01)}


def _proxy(qrproxy: Any, db_url: str, orthanc: OrthancServer, mode: str, **query: Any) -> Any:
    cfg = proxy_config(db_url, {"PACS": node(orthanc, ["query"], timeout="5s")},
                       query={"mode": mode, "upstream_timeout": "3s", **query},
                       refresh=[{"name": "recent", "node": "PACS", "kind": "studies", "every": "1h",
                                 "query": {"StudyDate": "-7d"}}])
    return qrproxy(cfg)


def _refresh(proxy: Any) -> None:
    res = cli(proxy, "refresh", "recent", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def _find_lines(proxy: Any) -> list[str]:
    return [line for line in proxy.log_text().splitlines() if "event=c-find" in line]


def test_cache_first_queries_through_and_keeps_the_answer(db_url: str, orthanc_factory: Any, qrproxy: Any) -> None:
    orthanc = orthanc_factory()
    recent, old = _upload(orthanc, 1, "R"), _upload(orthanc, 40, "O")
    proxy = _proxy(qrproxy, db_url, orthanc, "cache-first")
    _refresh(proxy)  # covers the last 7 days: `recent` only

    expected = _answers(orthanc.dicom_port, _query(StudyInstanceUID=old), orthanc.aet)
    assert list(expected) == [old]
    # not in the cache: asked upstream, answered with Orthanc's values
    assert _answers(proxy.port, _query(StudyInstanceUID=old), "QRPROXY") == expected
    assert "source=upstream" in _find_lines(proxy)[-1]
    # in the cache: not asked upstream
    assert list(_answers(proxy.port, _query(StudyInstanceUID=recent), "QRPROXY")) == [recent]
    assert "source=cache" in _find_lines(proxy)[-1]

    every = _answers(orthanc.dicom_port, _query(PatientID="QM*"), orthanc.aet)
    orthanc.stop()
    # the WAN is down: both studies still answered, the query-through one from what it remembered
    assert _answers(proxy.port, _query(PatientID="QM*"), "QRPROXY") == every
    assert _answers(proxy.port, _query(StudyInstanceUID=old), "QRPROXY") == expected
    # nothing cached and no upstream: an empty answer (Success), and the log says why
    assert _answers(proxy.port, _query(AccessionNumber="NOSUCH"), "QRPROXY") == {}
    wait_until(lambda: "event=query-through-failed" in proxy.log_text(), 30, "the failed query-through logged")


def test_upstream_first_answers_live_and_falls_back(db_url: str, orthanc_factory: Any, qrproxy: Any) -> None:
    orthanc = orthanc_factory()
    _upload(orthanc, 1, "A")
    proxy = _proxy(qrproxy, db_url, orthanc, "upstream-first")
    _refresh(proxy)
    late = _upload(orthanc, 2, "B")  # after the refresh: only the live upstream knows it

    expected = _answers(orthanc.dicom_port, _query(PatientID="QM*"), orthanc.aet)
    assert late in expected and len(expected) == 2
    assert _answers(proxy.port, _query(PatientID="QM*"), "QRPROXY") == expected
    assert "source=upstream" in _find_lines(proxy)[-1]

    orthanc.stop()
    # the live answer was written into the cache: the fallback still knows the late study
    assert _answers(proxy.port, _query(PatientID="QM*"), "QRPROXY") == expected
    last = _find_lines(proxy)[-1]
    assert "source=cache-fallback" in last, last
    assert "event=upstream-fallback" in proxy.log_text()


def test_upstream_first_falls_back_when_the_upstream_hangs(db_url: str, orthanc_factory: Any, qrproxy: Any,
                                                           tmp_path: Path) -> None:
    """A peer that accepts TCP and never answers (a stuck PACS): the timeout, not the TCP stack, ends it."""
    orthanc = orthanc_factory()
    uid = _upload(orthanc, 1, "H")
    expected = _answers(orthanc.dicom_port, _query(StudyInstanceUID=uid), orthanc.aet)
    # fill the cache from the real Orthanc first
    proxy = _proxy(qrproxy, db_url, orthanc, "cache-only")
    _refresh(proxy)
    proxy.stop()
    hole = socket.socket()
    hole.bind((LOCALHOST, 0))
    hole.listen(8)
    try:
        cfg = proxy_config(db_url, {"PACS": {"ae_title": "STUCK", "host": LOCALHOST, "port": hole.getsockname()[1],
                                             "roles": ["query"], "timeout": "30s"}},
                           query={"mode": "upstream-first", "upstream_timeout": "2s"})
        stuck = qrproxy(cfg)
        assert _answers(stuck.port, _query(StudyInstanceUID=uid), "QRPROXY") == expected
        last = _find_lines(stuck)[-1]
        assert "source=cache-fallback" in last and "within 2s" in last, last
    finally:
        hole.close()


def test_cache_only_never_asks(db_url: str, orthanc_factory: Any, qrproxy: Any) -> None:
    orthanc = orthanc_factory()
    recent, old = _upload(orthanc, 1, "C"), _upload(orthanc, 40, "D")
    proxy = _proxy(qrproxy, db_url, orthanc, "cache-only")
    _refresh(proxy)
    assert _answers(proxy.port, _query(StudyInstanceUID=old), "QRPROXY") == {}
    assert list(_answers(proxy.port, _query(PatientID="QM*"), "QRPROXY")) == [recent]
    assert all("source=cache" in line for line in _find_lines(proxy))


def test_hot_cache_sees_a_new_study(db_url: str, orthanc_factory: Any, qrproxy: Any, tmp_path: Path) -> None:
    """Identical queries are answered from memory, yet a C-STORE in between is seen at once."""
    orthanc = orthanc_factory()
    proxy = _proxy(qrproxy, db_url, orthanc, "cache-only", cache_ttl="10m")
    first = dicomgen.write_all(dicomgen.make_study(n_series=1, per_series=1, patient_id="HOT1"), tmp_path / "a")
    assert_all_success(storescu(proxy.port, first, aec="QRPROXY"), first)
    q = _query(PatientID="HOT*")
    assert len(_answers(proxy.port, q, "QRPROXY")) == 1
    assert len(_answers(proxy.port, q, "QRPROXY")) == 1
    assert "hot=yes" in _find_lines(proxy)[-1]  # the second came from memory
    second = dicomgen.write_all(dicomgen.make_study(n_series=1, per_series=1, patient_id="HOT2"), tmp_path / "b")
    assert_all_success(storescu(proxy.port, second, aec="QRPROXY"), second)
    assert len(_answers(proxy.port, q, "QRPROXY")) == 2
    assert "hot=yes" not in _find_lines(proxy)[-1]


def test_stale_answers_are_logged(db_url: str, orthanc_factory: Any, qrproxy: Any) -> None:
    orthanc = orthanc_factory()
    uid = _upload(orthanc, 1, "S")
    proxy = _proxy(qrproxy, db_url, orthanc, "cache-only", stale_after="1s")
    _refresh(proxy)
    wait_until(lambda: _answers(proxy.port, _query(StudyInstanceUID=uid), "QRPROXY")
               and "stale=" in _find_lines(proxy)[-1], 60, "a stale answer logged")
    orthanc.stop()
