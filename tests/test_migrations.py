"""Alembic migrations build the schema the models describe, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from qrproxy.index.models import Base
from qrproxy.index.session import alembic_config, make_engine, upgrade


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


def _head(url: str) -> str:
    heads = ScriptDirectory.from_config(alembic_config(url)).get_heads()
    assert len(heads) == 1, f"migrations have several heads: {heads}"
    return heads[0]


def _url(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=False)


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def _diff(engine: Engine) -> list:  # type: ignore[type-arg]
    with engine.connect() as conn:
        ctx = MigrationContext.configure(
            conn,
            opts={"compare_type": True, "compare_server_default": False, "target_metadata": Base.metadata},
        )
        return compare_metadata(ctx, Base.metadata)


def _run(engine: Engine, fn, revision: str) -> None:  # type: ignore[no-untyped-def]
    """alembic.command.<fn> on the engine's own connection, as qrproxy.db.session.upgrade does."""
    cfg = alembic_config(_url(engine))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        fn(cfg, revision)


def test_upgrade_from_empty_creates_every_model_table(engine: Engine) -> None:
    assert _tables(engine) == set()
    current = upgrade(engine)
    assert current == _head(_url(engine))
    expected = set(Base.metadata.tables)
    assert expected, "Base.metadata has no tables"
    missing = expected - _tables(engine)
    assert not missing, f"tables missing after upgrade head: {sorted(missing)}"


def test_models_and_migrations_agree(engine: Engine) -> None:
    upgrade(engine)
    diff = _diff(engine)
    assert diff == [], "models and migrations differ:\n" + "\n".join(map(repr, diff))


def test_upgrade_is_idempotent(engine: Engine) -> None:
    first = upgrade(engine)
    assert upgrade(engine) == first


def test_downgrade_base_then_upgrade_head(engine: Engine) -> None:
    upgrade(engine)
    _run(engine, command.downgrade, "base")
    assert _tables(engine) == set(), "downgrade base left tables behind"
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is None

    _run(engine, command.upgrade, "head")
    assert set(Base.metadata.tables) <= _tables(engine)
    assert _diff(engine) == []
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == _head(_url(engine))
