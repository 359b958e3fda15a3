"""Retention: local copies evicted under `retention` limits (docs/operations.md "Retention").

Studies are stored through a real qrproxy with DCMTK storescu; time is moved by rewriting the
studies' received_at / last_access_at in the database (never by sleeping); one-shot passes run
through `qrproxy retention run` against a config file rewritten with the limits under test (the
running server keeps its own config, whose pass runs once a day). Evicted studies are looked up
with DCMTK findscu through qrproxy. Each test runs on SQLite and on PostgreSQL (``db_url``).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid
from sqlalchemy import func, select, update

import dicomgen
from peers import LOCALHOST, QrproxyProcess, free_port
from test_find import findscu
from support import assert_all_success, cli, proxy_config, storescu, wait_until

from qrproxy.index.models import (
    CommitmentItem, CommitmentRequest, ForwardItem, Instance, Series, SpoolObject, Study,
)
from qrproxy.index.session import make_engine

UTC = dt.timezone.utc


# --- helpers ----------------------------------------------------------------------------------


def store_study(proc: QrproxyProcess, tmp_path: Path, name: str, *, aet: str = "MODCT", n: int = 3) -> list[Any]:
    """A fresh study of `n` CT instances, C-STOREd to qrproxy by storescu as `aet`; its datasets."""
    datasets = dicomgen.make_study(1, n, patient_id=f"RET{name}", patient_name=f"RETENTION^{name}",
                                   accession=f"RACC{name}")
    files = dicomgen.write_all(datasets, tmp_path / f"in-{name}")
    assert_all_success(storescu(proc.port, files, aec=proc.ae_title, aet=aet), files)
    return datasets


def study_uid(datasets: list[Any]) -> str:
    return str(datasets[0].StudyInstanceUID)


class Db:
    """The test's own view of qrproxy's database, to check rows and to move time."""

    def __init__(self, url: str):
        self.engine = make_engine(url)

    def objects(self, uid: str) -> list[Any]:
        with self.engine.connect() as c:
            return c.execute(select(SpoolObject.id, SpoolObject.path, SpoolObject.size)
                             .where(SpoolObject.study_instance_uid == uid)).all()

    def study_bytes(self, uid: str) -> int:
        return sum(o.size for o in self.objects(uid))

    def instances(self, uid: str) -> list[Any]:
        with self.engine.connect() as c:
            return c.execute(select(Instance.sop_instance_uid, Instance.object_pk)
                             .join(Series, Series.id == Instance.series_pk)
                             .join(Study, Study.id == Series.study_pk)
                             .where(Study.study_instance_uid == uid)).all()

    def used_at(self, uid: str, when: dt.datetime) -> None:
        """Make `uid` look received and last used at `when`."""
        with self.engine.begin() as c:
            c.execute(update(SpoolObject).where(SpoolObject.study_instance_uid == uid)
                      .values(received_at=when, last_access_at=None))
            c.execute(update(Study).where(Study.study_instance_uid == uid).values(last_access_at=when))

    def pin(self, uid: str, until: dt.datetime) -> None:
        with self.engine.begin() as c:
            c.execute(update(Study).where(Study.study_instance_uid == uid).values(pinned_until=until))

    def owe_commitment(self, sops: list[tuple[str, str]]) -> None:
        with self.engine.begin() as c:
            pk = c.execute(CommitmentRequest.__table__.insert().values(
                transaction_uid=generate_uid(), direction="in", requester_ae="MODCT", state="pending",
                received_at=dt.datetime.now(UTC), report_attempts=0).returning(CommitmentRequest.id)).scalar_one()
            c.execute(CommitmentItem.__table__.insert(), [
                {"request_pk": pk, "sop_class_uid": cls, "sop_instance_uid": sop, "state": "pending"}
                for cls, sop in sops])

    def forward_states(self, uid: str) -> list[str]:
        with self.engine.connect() as c:
            return [str(getattr(s, "value", s)) for s in c.execute(
                select(ForwardItem.state).where(ForwardItem.study_instance_uid == uid)).scalars()]

    def count_objects(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(SpoolObject)).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


def with_retention(proc: QrproxyProcess, retention: dict[str, Any]) -> None:
    """Rewrite the config file that `qrproxy retention run` reads (the server keeps its own)."""
    cfg = dict(proc.config)
    cfg["retention"] = retention
    proc.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def retention_run(proc: QrproxyProcess, *args: str) -> str:
    res = cli(proc, "retention", "run", *args)
    assert res.returncode == 0, f"retention run: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def evicted(out: str) -> dict[str, str]:
    """study uid -> reason, from `retention run` output lines `evicted UID N objects B bytes reason R`."""
    got = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0] == "evicted" and parts[6] == "reason":
            got[parts[1]] = parts[7]
    return got


def base_config(db_url: str, nodes: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return proxy_config(db_url, nodes or {}, retention={"every": "1d"}, **extra)


def ago(**kw: float) -> dt.datetime:
    return dt.datetime.now(UTC) - dt.timedelta(**kw)


# --- tests ------------------------------------------------------------------------------------


def test_evicts_least_recently_used_by_size_then_by_age(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(base_config(db_url))
    db = Db(db_url)
    try:
        a, b, c = (store_study(proc, tmp_path, n) for n in "ABC")
        ua, ub, uc = map(study_uid, (a, b, c))
        db.used_at(ua, ago(hours=3))
        db.used_at(ub, ago(hours=2))
        db.used_at(uc, ago(hours=1))
        # B is older than C, but C was served since (touch_study, as C-MOVE does): B goes before C.
        from qrproxy.index.session import make_sessionmaker
        from qrproxy.jobs.retention import touch_study

        db.used_at(uc, ago(hours=4))
        assert touch_study(make_sessionmaker(db.engine), uc)
        files_a = [proc.dir / "spool" / "objects" / o.path for o in db.objects(ua)]
        assert files_a and all(f.is_file() for f in files_a)
        # A converted copy of one of A's files, where the forwarder caches them (Spool.variant_path).
        from qrproxy.store.spool import Spool

        variant = Spool(proc.dir / "spool").variant_path(db.objects(ua)[0].path, "1.2.840.10008.1.2.4.80")
        variant.parent.mkdir(parents=True, exist_ok=True)
        variant.write_bytes(b"converted copy")

        # Room for two of the three studies: the least recently used one (A) goes, by size.
        with_retention(proc, {"max_bytes": db.study_bytes(ub) + db.study_bytes(uc) + 1})
        assert evicted(retention_run(proc, "--dry-run")) == {}, "a dry run evicted something"
        assert all(f.is_file() for f in files_a)
        out = retention_run(proc)
        assert evicted(out) == {ua: "size"}, out
        assert not any(f.exists() for f in files_a), "evicted spool files are still on disk"
        assert not variant.exists(), "the converted copy of an evicted file is still on disk"
        assert db.objects(ua) == [] and len(db.objects(ub)) == 3 and len(db.objects(uc)) == 3
        rows = db.instances(ua)
        assert len(rows) == 3 and all(r.object_pk is None for r in rows), rows
        assert evicted(retention_run(proc)) == {}, "a second pass under the limit evicted more"

        # Still findable: study and image level, through qrproxy, by DCMTK findscu.
        found = findscu(proc.port, proc.ae_title, "S", "STUDY", {"StudyInstanceUID": ua, "PatientName": ""},
                        tmp_path / "find-study")
        assert found.status == "Success" and [str(r.StudyInstanceUID) for r in found.responses] == [ua]
        assert str(found.responses[0].PatientName) == "RETENTION^A"
        images = findscu(proc.port, proc.ae_title, "S", "IMAGE",
                         {"StudyInstanceUID": ua, "SeriesInstanceUID": str(a[0].SeriesInstanceUID),
                          "SOPInstanceUID": ""}, tmp_path / "find-image")
        assert sorted(str(r.SOPInstanceUID) for r in images.responses) == sorted(str(d.SOPInstanceUID) for d in a)

        # By age: B unused for 10 days goes with max_age 7d; C (used an hour ago) stays.
        db.used_at(ub, ago(days=10))
        with_retention(proc, {"max_age": "7d"})
        out = retention_run(proc)
        assert evicted(out) == {ub: "age"}, out
        assert db.objects(ub) == [] and len(db.objects(uc)) == 3

        # An evicted study sent again is held again (its old copy's rows are gone, not "duplicates").
        files = dicomgen.write_all(a, tmp_path / "again-A")
        assert_all_success(storescu(proc.port, files, aec=proc.ae_title), files)
        assert len(db.objects(ua)) == 3
        assert all(r.object_pk is not None for r in db.instances(ua))
    finally:
        db.close()


def test_owed_pinned_and_per_node(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    nodes = {
        # A store node that is down: what is sent to it stays pending.
        "PACS": {"ae_title": "DOWNPACS", "host": LOCALHOST, "port": free_port(), "roles": ["store"]},
        "CT2": {"ae_title": "MODCT2", "host": LOCALHOST, "port": free_port(), "roles": ["modality"]},
    }
    routes = [{"name": "kept local", "when": {"calling_ae": "^(NOFWD|MODCT2)$"}, "remove_original": True}]
    proc = qrproxy(base_config(db_url, nodes, routes=routes))
    db = Db(db_url)
    try:
        owed = store_study(proc, tmp_path, "P")                 # forwarded to PACS (down): pending
        free = store_study(proc, tmp_path, "Q", aet="NOFWD")    # nothing owed
        pinned = store_study(proc, tmp_path, "R", aet="NOFWD")  # pinned by prefetch
        commit = store_study(proc, tmp_path, "S", aet="NOFWD")  # in a commitment not yet reported
        ct2 = store_study(proc, tmp_path, "T", aet="MODCT2")    # came from node CT2
        up, uq, ur, us, ut = map(study_uid, (owed, free, pinned, commit, ct2))
        for n, uid in enumerate((up, uq, ur, us, ut)):
            db.used_at(uid, ago(days=30, hours=n))
        db.pin(ur, dt.datetime.now(UTC) + dt.timedelta(days=1))
        db.owe_commitment([(str(d.SOPClassUID), str(d.SOPInstanceUID)) for d in commit[:1]])
        assert set(db.forward_states(up)) <= {"pending", "inflight"} and db.forward_states(up)

        # Per node: CT2's studies over its limit go; Q (not from CT2), although older, stays.
        with_retention(proc, {"nodes": {"CT2": {"max_bytes": 0}}})
        out = retention_run(proc)
        assert evicted(out) == {ut: "node-size"} and "node CT2" in out, out

        st = cli(proc, "status", "--no-echo")
        assert st.returncode == 0, st.stderr
        assert "4 studies held locally: 1 evictable" in st.stdout, st.stdout
        assert "1 pinned" in st.stdout and "2 owed" in st.stdout, st.stdout

        # Global limit of 0 bytes and an age limit: only Q can go; the rest is reported as short.
        with_retention(proc, {"max_bytes": 0, "max_age": "1d"})
        out = retention_run(proc)
        assert evicted(out) == {uq: "age"}, out
        assert "short: retention.max_bytes" in out, out
        for uid in (up, ur, us):
            objs = db.objects(uid)
            assert len(objs) == 3 and all((proc.dir / "spool" / "objects" / o.path).is_file() for o in objs), uid

        # Held rows are owed too.
        # hold changes pending rows; a row the forwarder has just claimed for a (failing) attempt on
        # the down PACS is inflight for a moment and left alone: hold again, as an operator would.
        def all_held() -> bool:
            assert cli(proc, "queue", "hold", "--node", "PACS").returncode == 0
            return set(db.forward_states(up)) == {"held"}

        wait_until(all_held, 60, lambda: f"rows of the owed study not all held: {db.forward_states(up)}",
                   interval=0.5)
        assert set(db.forward_states(up)) == {"held"}
        assert evicted(retention_run(proc)) == {}
        st = cli(proc, "status", "--no-echo")
        assert "3 studies held locally: 0 evictable" in st.stdout, st.stdout

        # Unpinned and purged: they go.
        db.pin(ur, ago(minutes=1))
        assert cli(proc, "queue", "purge", "--node", "PACS", "--yes").returncode == 0
        assert evicted(retention_run(proc)) == {up: "age", ur: "age"}
        assert db.count_objects() == 3 and len(db.objects(us)) == 3
    finally:
        db.close()


def test_serve_runs_retention_on_schedule(db_url: str, qrproxy: Any, tmp_path: Path) -> None:
    proc = qrproxy(proxy_config(db_url, {}, retention={"max_age": "1h", "every": "1s"}))
    db = Db(db_url)
    try:
        old = study_uid(store_study(proc, tmp_path, "OLD"))
        new = study_uid(store_study(proc, tmp_path, "NEW"))
        paths = [proc.dir / "spool" / "objects" / o.path for o in db.objects(old)]
        db.used_at(old, ago(hours=2))
        wait_until(lambda: not db.objects(old), 60, "the running proxy did not evict the old study")
        wait_until(lambda: f"event=evicted study={old}" in proc.log_text(), 30, "no eviction log line")
        line = next(ln for ln in proc.log_text().splitlines() if f"event=evicted study={old}" in ln)
        assert "reason=age" in line and "bytes=" in line, line
        assert not any(p.exists() for p in paths)
        assert len(db.objects(new)) == 3
    finally:
        db.close()


@pytest.mark.parametrize("retention,key,fragment", [
    ("{max_byts: 1GB}", "retention.max_byts", "unknown key"),
    ("{max_age: forever}", "retention.max_age", "duration"),
    ("{nodes: {NOPE: {max_age: 1d}}}", "retention.nodes.NOPE", "unknown node"),
    ("{nodes: {PACS: {max_size: 1GB}}}", "retention.nodes.PACS.max_size", "unknown key"),
])
def test_check_rejects_bad_retention_keys(tmp_path: Path, retention: str, key: str, fragment: str) -> None:
    cfg = tmp_path / "qrproxy.yml"
    cfg.write_text("nodes:\n  PACS: {ae_title: PACS, host: 127.0.0.1, port: 4242}\n"
                   f"retention: {retention}\n")
    r = subprocess.run([sys.executable, "-m", "qrproxy", "--config", str(cfg), "check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"qrproxy.yml:3: {key}:" in r.stderr and fragment in r.stderr, r.stderr
