"""Migrations shipped in the package upgrade an empty database to the models of db.py and downgrade it
back to empty, on SQLite and PostgreSQL; the SQLite engine gets its durability pragmas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from feedback_helpers import skip_or_fail

from alignloop.feedback import migrations
from alignloop.feedback.db import Base, Database, make_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    factory = request.getfixturevalue("pg_databases")
    if isinstance(factory, str):
        skip_or_fail(factory)
    return str(factory("migrations"))


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_matches_models_and_downgrade_empties(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        assert migrations.current_revision(engine) is None and _tables(engine) == set()
        migrations.upgrade(engine)
        assert migrations.current_revision(engine) == "0001"
        assert _tables(engine) == set(Base.metadata.tables) | {"alembic_version"}
        with engine.connect() as conn:
            diff: list[Any] = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"migrations and models differ: {diff}"
        migrations.downgrade(engine, "base")
        assert migrations.current_revision(engine) is None
        assert _tables(engine) == {"alembic_version"}
        migrations.upgrade(engine)  # and up again from there
        assert migrations.current_revision(engine) == "0001"
    finally:
        engine.dispose()


def test_sqlite_pragmas_and_immediate_writes(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'p.db'}")
    statements: list[str] = []
    sa.event.listen(database.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *args: statements.append(statement))
    try:
        with database.read() as db:
            pragmas = {p: db.execute(sa.text(f"PRAGMA {p}")).scalar() for p in
                       ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")}
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 5000, "foreign_keys": 1}
        with database.write() as db:
            db.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        assert "BEGIN IMMEDIATE" in statements and statements.count("BEGIN") == 1  # the read was deferred
    finally:
        database.dispose()


def test_in_memory_sqlite_and_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        make_engine("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        make_engine("mysql://u@h/db")
