"""Engine and session factory, and schema upgrades through Alembic.

SQLite runs in WAL mode with synchronous=FULL: C-STORE Success is promised only after the index row is
committed, and NORMAL would let a power cut take back a commit that a modality was already told about.
"""

from __future__ import annotations

import logging
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


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    """BEGIN IMMEDIATE by default: a deferred transaction that reads and then writes fails with
    SQLITE_BUSY_SNAPSHOT when another writer committed in between, and busy_timeout cannot retry that.
    Read-only paths use `read_only(engine)`, which begins deferred so readers never queue behind writers."""
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("qrproxy_read_only") else "BEGIN IMMEDIATE")


def read_only(engine: Engine) -> Engine:
    return engine.execution_options(qrproxy_read_only=True)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.drivername.startswith("sqlite"):
        if u.database and u.database != ":memory:":
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
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
