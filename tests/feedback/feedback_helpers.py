"""Helpers shared by the feedback tests (fixtures are in conftest.py)."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from alignloop.feedback import auth, security, services
from alignloop.feedback.db import Base, Database
from alignloop.feedback.records import parse_items

PG_URL = os.environ.get("ALIGNLOOP_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
SECRET = "test-secret-" + "0123456789abcdefghijklmnopqrstuvwxyz"
PASSWORD = "correct horse battery"
# Cheap Argon2 for speed; the OWASP defaults are tested on their own (test_security.py).
FAST_HASHING: dict[str, Any] = {"argon2_memory_kib": 64, "argon2_time_cost": 1, "argon2_parallelism": 1,
                                "allow_weak_hashing": True}




def ctx(app: FastAPI) -> auth.AppContext:
    return app.state.ctx  # type: ignore[no-any-return]


def add_user(app: FastAPI, username: str, role: str = "annotator") -> int:
    with ctx(app).database.write() as db:
        return auth.create_user(db, ctx(app).hasher, username, PASSWORD, role).id


def session_client(app: FastAPI, username: str) -> TestClient:
    """A client logged in as `username` (session made directly, not through the throttled form)."""
    token = auth.login(ctx(app), username, PASSWORD)
    assert token is not None
    client = TestClient(app, follow_redirects=False)
    client.cookies.set(ctx(app).session_cookie, token)
    client.headers["X-CSRF-Token"] = security.csrf_token(SECRET, security.token_hash(token))
    return client


def anonymous_client(app: FastAPI) -> TestClient:
    return TestClient(app, follow_redirects=False)


def token_client(app: FastAPI, username: str) -> TestClient:
    with ctx(app).database.write() as db:
        token = auth.create_api_token(db, username, "tests")
    return TestClient(app, follow_redirects=False, headers={"Authorization": f"Bearer {token}"})


def item_row(item_id: str, author: str | None = None, **extra: Any) -> dict[str, Any]:
    row = {"id": item_id, "prompt": f"Question {item_id}?",
           "responses": [{"text": f"answer one to {item_id}", "model": "policy", "version": "v1"},
                         {"text": f"answer two to {item_id}", "model": "reference", "version": "v0"}], **extra}
    if author:
        row["author"] = author
    return row


def add_project(app: FastAPI, name: str, members: list[str], n_items: int = 3, k: int = 1,
                authors: dict[int, str] | None = None) -> int:
    with ctx(app).database.write() as db:
        project = services.create_project(db, name, "Pick the more helpful answer.", k)
        for username in members:
            services.add_member(db, project, username)
        rows = [item_row(f"{name}-{i}", (authors or {}).get(i)) for i in range(n_items)]
        services.import_items(db, project, parse_items(enumerate(rows, 1), "test"), "test")
        return project.id


def count(app: FastAPI, table: type) -> int:
    with ctx(app).database.read() as db:
        return int(db.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def table_snapshot(database: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to assert that a refused request changed nothing."""
    with database.read() as db:
        return {t.name: sorted(map(tuple, db.execute(sa.select(t)).all()), key=repr) for t in Base.metadata.sorted_tables}


def form_csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def skip_or_fail(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: PostgreSQL tests must run)")
    pytest.skip(reason)
