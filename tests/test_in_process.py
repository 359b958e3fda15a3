"""Services built in the test process from their explicit collaborators, with no qrproxy server
process: what replacing the Proxy locator makes possible (docs/architecture.md, app.py's build
order). The DICOM path stays real: pynetdicom's SCU as the modality over a loopback socket,
qrproxy's own acceptor (net/acceptor.py) carrying only the store service, a real SQLite index and
spool.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from pydicom import dcmread
from sqlalchemy import select

import dicomgen
from peers import LOCALHOST, free_port
from qrproxy.cli.load import load_config
from qrproxy.index.models import ForwardItem, SpoolObject
from qrproxy.index.session import make_engine, make_sessionmaker, upgrade
from qrproxy.net import dimse
from qrproxy.net.acceptor import Server, Services, Settings
from qrproxy.scp import store
from qrproxy.scu.retrieve import Arrivals
from qrproxy.store.spool import Spool
from support import proxy_config, pynetdicom_store


def test_store_scp_built_in_process(tmp_path: Path) -> None:
    """The store SCP with its collaborators (config, engine, sessions, spool, fsync pool, the
    forwarder's notify, the retrievals' arrivals) receives three CT instances: each is answered
    Success, held in the spool with its data set unchanged, owed to the store node by one forward
    row and announced to the forwarder (and not counted as a retrieval's arrival)."""
    raw = proxy_config(f"sqlite:///{tmp_path / 'index.sqlite3'}",
                       {"PACS": {"ae_title": "PACS", "host": LOCALHOST, "port": free_port(), "roles": ["store"]}},
                       spool_dir=str(tmp_path / "spool"))
    (tmp_path / "qrproxy.yml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "qrproxy.yml")
    engine = make_engine(cfg.database)
    upgrade(engine)
    sessions = make_sessionmaker(engine)
    spool = Spool(cfg.spool_dir)
    spool.prepare()
    notified: list[str] = []
    arrivals = Arrivals()
    study = dicomgen.make_study(1, 3)

    store.configure_receive(spool)
    with ThreadPoolExecutor(max_workers=2) as pool:
        scp = store.StoreSCP(cfg, engine, sessions, spool, pool, notified.extend, arrivals)
        services = Services(supported={uid: syntaxes for uid, syntaxes in store.contexts()},
                            handlers={dimse.C_STORE: scp.handle}, sink_for=scp.sink_for)
        server: Any = Server((LOCALHOST, cfg.port), Settings(cfg.ae_title, cfg.max_pdu, 30.0, 60.0), services)
        server.start()
        try:
            statuses = pynetdicom_store(cfg.port, study, aec=cfg.ae_title)
        finally:
            server.shutdown()

    assert statuses == [0x0000] * len(study), f"C-STORE statuses {statuses}"
    assert set(notified) == {"PACS"}, f"forwarder notified for {notified}"
    assert arrivals.wait(-1, 0) == 0, "new data from a modality is no retrieval's arrival"
    with sessions() as s:
        rows = s.execute(select(ForwardItem.node, SpoolObject.sop_instance_uid, SpoolObject.path)
                         .join(SpoolObject, SpoolObject.id == ForwardItem.object_pk)).all()
    want = {str(ds.SOPInstanceUID): ds for ds in study}
    assert sorted((r.node, r.sop_instance_uid) for r in rows) == sorted(("PACS", uid) for uid in want)
    for r in rows:
        held = dcmread(spool.path(r.path))
        assert dicomgen.compare_datasets(want[r.sop_instance_uid], held) == [], r.sop_instance_uid
    engine.dispose()
