"""Engine and session factory, and schema upgrades through Alembic.

SQLite runs in WAL mode with synchronous=FULL: C-STORE Success is promised only after the index row is
committed, and NORMAL would let a power cut take back a commit that a modality was already told about.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("qrproxy.db")

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent.parent / "migrations"


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA temp_store=MEMORY")
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def _sqlite_connect(dbapi_conn, record) -> None:  # type: ignore[no-untyped-def]
    # Let SQLAlchemy, not the driver, decide where transactions begin (SQLAlchemy's documented recipe).
    dbapi_conn.isolation_level = None
    _sqlite_pragmas(dbapi_conn, record)


class _WriterGate:
    """One SQLite writer at a time within this process, queued on a Python lock.

    SQLite lets one writer in; the others wait in its busy handler, which sleeps 1, 2, 5, 10, 15, 20,
    25 ms ... between retries. With several associations storing at once that convoy cost more than
    the inserts (4 concurrent storescu: 52 img/s). A lock hands the write slot over at once. Other
    processes (workers, CLI) still meet at SQLite's own lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.local = threading.local()

    def begin(self, conn) -> None:  # type: ignore[no-untyped-def]
        if conn.get_execution_options().get("qrproxy_read_only"):
            conn.exec_driver_sql("BEGIN")
            return
        self.lock.acquire()
        self.local.held = True
        try:
            # IMMEDIATE: a deferred transaction that reads then writes fails with SQLITE_BUSY_SNAPSHOT
            # when another writer committed in between, and busy_timeout cannot retry that.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            self.end(conn)
            raise

    def end(self, conn) -> None:  # type: ignore[no-untyped-def]
        if getattr(self.local, "held", False):
            self.local.held = False
            self.lock.release()


def read_only(engine: Engine) -> Engine:
    return engine.execution_options(qrproxy_read_only=True)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_connect)
        gate = _WriterGate()
        event.listen(engine, "begin", gate.begin)
        event.listen(engine, "commit", gate.end)
        event.listen(engine, "rollback", gate.end)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def alembic_config(url: str):  # type: ignore[no-untyped-def]
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(_migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _migrations_dir() -> Path:
    """migrations/ beside the package in a checkout, or shipped inside it when installed as a wheel."""
    for candidate in (MIGRATIONS_DIR, Path(__file__).resolve().parent.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise RuntimeError(f"Alembic migrations not found (looked in {MIGRATIONS_DIR})")


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Upgrade the schema to `revision`; returns the revision now current."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    log.info("database schema at revision %s", current)
    return current
