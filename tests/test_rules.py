"""Routing and mutation rules as pure functions: every case without a network."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from qrproxy.cli.load import load_config
from qrproxy.rules.routes import apply_mutations, default_destinations, mutations_for, route

CONFIG = r"""
ae_title: QRPROXY
nodes:
  PACS: {ae_title: ORTHANC, host: 127.0.0.1, port: 4242, roles: [store, query]}
  ARCHIVE: {ae_title: ARCH, host: 127.0.0.1, port: 4243, roles: [store]}
  REPORTS: {ae_title: REPORTS, host: 127.0.0.1, port: 4244, roles: []}
  CT1: {ae_title: CT1, host: 127.0.0.1, port: 104, roles: [modality]}
routes:
  - name: SR to reports
    when: {"0008,0016": '^1\.2\.840\.10008\.5\.1\.4\.1\.1\.88\.\d{1,2}$'}
    to: [REPORTS]
    remove_original: true
  - name: MR copy
    when: {Modality: '^MR$', calling_ae: '^MR'}
    to: [REPORTS]
  - name: never reached for MR
    when: {Modality: 'MR'}
    to: [CT1]
mutations:
  - name: institution for PACS
    on: store
    nodes: [PACS]
    when: {InstitutionName: '^$'}
    set: {InstitutionName: Site A, "0008,1010": STATION}
    remove: [OperatorsName]
"""


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    p: Path = tmp_path_factory.mktemp("rules") / "q.yml"
    p.write_text(CONFIG)
    return load_config(p)


def ds(**kw: str) -> Dataset:
    d = Dataset()
    d.SOPClassUID = kw.pop("SOPClassUID", "1.2.840.10008.5.1.4.1.1.2")
    for k, v in kw.items():
        setattr(d, k, v)
    return d


def test_default_is_every_store_node(cfg) -> None:  # type: ignore[no-untyped-def]
    dec = route(cfg, ds(Modality="CT"), "CT9", "QRPROXY")
    assert dec.destinations == ["PACS", "ARCHIVE"] and dec.route is None


@pytest.mark.parametrize("called", ["ARCH", "QRP_ARCH"])
def test_called_ae_alias_selects_one_node(cfg, called: str) -> None:  # type: ignore[no-untyped-def]
    assert default_destinations(cfg, called)[0] == ["ARCHIVE"]
    assert route(cfg, ds(Modality="CT"), "CT9", called).destinations == ["ARCHIVE"]


def test_unknown_called_ae_falls_back_to_store_nodes(cfg) -> None:  # type: ignore[no-untyped-def]
    dests, why = default_destinations(cfg, "WHOEVER")
    assert dests == ["PACS", "ARCHIVE"] and "not an alias" in why


@pytest.mark.parametrize("sop_class,expected", [
    ("1.2.840.10008.5.1.4.1.1.88.11", ["REPORTS"]),
    ("1.2.840.10008.5.1.4.1.1.88.22", ["REPORTS"]),
    ("1.2.840.10008.5.1.4.1.1.88.111", ["PACS", "ARCHIVE"]),   # three digits: not matched
    ("1.2.840.10008.5.1.4.1.1.2", ["PACS", "ARCHIVE"]),
])
def test_sr_route_removes_original(cfg, sop_class: str, expected: list[str]) -> None:  # type: ignore[no-untyped-def]
    assert route(cfg, ds(SOPClassUID=sop_class), "CT9", "QRPROXY").destinations == expected


def test_first_match_wins_and_ae_conditions(cfg) -> None:  # type: ignore[no-untyped-def]
    dec = route(cfg, ds(Modality="MR"), "MR7", "QRPROXY")
    assert dec.route == "MR copy" and dec.destinations == ["PACS", "ARCHIVE", "REPORTS"]
    dec = route(cfg, ds(Modality="MR"), "XX", "QRPROXY")
    assert dec.route == "never reached for MR" and "CT1" in dec.destinations


def test_no_loop_back_to_sender(cfg) -> None:  # type: ignore[no-untyped-def]
    dec = route(cfg, ds(Modality="CT"), "ORTHANC", "QRPROXY")
    assert dec.destinations == ["ARCHIVE"] and dec.skipped_loop == ["PACS"]


def test_store_mutations_apply_per_destination(cfg) -> None:  # type: ignore[no-untyped-def]
    d = ds(Modality="CT", OperatorsName="OP^ONE")
    assert [m.name for m in mutations_for(cfg, "store", "PACS", d)] == ["institution for PACS"]
    assert mutations_for(cfg, "store", "ARCHIVE", d) == []
    changes = apply_mutations(d, mutations_for(cfg, "store", "PACS", d))
    assert d.InstitutionName == "Site A" and d.StationName == "STATION" and "OperatorsName" not in d
    assert len(changes) == 3
    # once set, the `when` no longer matches: the rule is idempotent
    assert mutations_for(cfg, "store", "PACS", d) == []


def test_when_reads_inside_sequences(tmp_path: Path) -> None:
    from pydicom.sequence import Sequence

    p = tmp_path / "q.yml"
    p.write_text(CONFIG.split("mutations:")[0] + r"""
  - name: by referenced study
    when: {"ReferencedStudySequence[*].ReferencedSOPInstanceUID": '^1\.2\.3$'}
    to: [CT1]
mutations:
  - name: query answers for CT
    on: query
    when: {Modality: '^CT$'}
    set: {ScheduledStationName: CTROOM}
""")
    cfg = load_config(p)
    d = ds(Modality="XA")
    items = []
    for uid in ("9.9", "1.2.3"):
        item = Dataset()
        item.ReferencedSOPInstanceUID = uid
        items.append(item)
    d.ReferencedStudySequence = Sequence(items)
    assert route(cfg, d, "X", "QRPROXY").route == "by referenced study"   # the second item matches
    d.ReferencedStudySequence[1].ReferencedSOPInstanceUID = "1.2.3.4"
    assert route(cfg, d, "X", "QRPROXY").route is None

    # on: query, a plain SPS keyword is read and written inside the Scheduled Procedure Step items
    answer = Dataset()
    sps = Dataset()
    sps.Modality = "CT"
    answer.ScheduledProcedureStepSequence = Sequence([sps])
    assert mutations_for(cfg, "query", None, ds(Modality="CT")) == []      # top-level Modality ignored
    muts = mutations_for(cfg, "query", None, answer)
    assert [m.name for m in muts] == ["query answers for CT"]
    apply_mutations(answer, muts)
    assert answer.ScheduledProcedureStepSequence[0].ScheduledStationName == "CTROOM"
