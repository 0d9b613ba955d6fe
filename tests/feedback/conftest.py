"""Fixtures for the feedback app: the same tests run on SQLite and on PostgreSQL.

SQLite: the schema is migrated once into a template file, copied for each test. PostgreSQL: one
uniquely named database per session (`ALIGNLOOP_TEST_PG_URL`, default the local trust-auth server),
migrated once, its tables truncated before each test, dropped at the end. When PostgreSQL cannot be
reached its tests are skipped with the reason, unless CI=true, where they fail.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import FAST_HASHING, PG_URL, SECRET, skip_or_fail

from alignloop.feedback import migrations
from alignloop.feedback.app import create_app
from alignloop.feedback.db import Base, make_engine
from alignloop.feedback.settings import Settings


def pg_admin_engine() -> sa.Engine | str:
    """An AUTOCOMMIT engine on the PostgreSQL server, or why there is none."""
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as err:  # any failure to connect means "no server here"
        engine.dispose()
        return f"PostgreSQL unreachable at {PG_URL}: {type(err).__name__}: {str(err).splitlines()[0]}"
    return engine


def _database_url(name: str) -> str:
    return str(sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False))


@pytest.fixture(scope="session")
def pg_databases() -> Iterator[Any]:
    """A factory of fresh, uniquely named PostgreSQL databases, all dropped at the end of the session."""
    admin = pg_admin_engine()
    if isinstance(admin, str):
        yield admin
        return
    created: list[str] = []

    def make(tag: str) -> str:
        name = f"alignloop_test_{tag}_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return _database_url(name)

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def pg_url(pg_databases: Any) -> str:
    """The session's migrated PostgreSQL database."""
    if isinstance(pg_databases, str):
        skip_or_fail(pg_databases)
    url = pg_databases("app")
    engine = make_engine(url)
    migrations.upgrade(engine)
    engine.dispose()
    return str(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    engine.dispose()  # the last connection closing checkpoints the WAL into the file
    return path


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "feedback.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("pg_url")
    engine = make_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(database_url=db_url, secret_key=SECRET, cookie_secure=False, **FAST_HASHING)


@pytest.fixture
def app(settings: Settings) -> Iterator[FastAPI]:
    app = create_app(settings)
    yield app
    app.state.ctx.database.dispose()
