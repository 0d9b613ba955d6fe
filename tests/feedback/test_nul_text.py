"""A NUL character in a page form is a 400 that writes nothing, on both databases (PostgreSQL's text type
cannot hold one, and the driver's error used to surface as a 500). The API's bodies refuse NUL with 422
before any query (test_schemathesis.py); this is the database-side rule every other path meets."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from feedback_helpers import add_project, add_user, anonymous_client, ctx, session_client, table_snapshot

from alignloop.feedback.db import UnstorableText


def test_nul_in_forms_is_400_and_writes_nothing(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    pid = add_project(app, "p", ["ann"])
    admin = session_client(app, "boss")
    before = {k: v for k, v in table_snapshot(ctx(app).database).items() if k != "auth_sessions"}
    posts = [
        ("/admin/projects", {"name": "bad\x00name", "overlap_k": "1"}),
        (f"/admin/projects/{pid}/members", {"username": "ann\x00"}),
        ("/admin/users", {"username": "x\x00y", "password": "a long enough password 123"}),
    ]
    for path, form in posts:
        response = admin.post(path, data=form)
        assert response.status_code == 400, (path, response.status_code, response.text[:300])
    assert "NUL character" in admin.post("/admin/projects", data={"name": "bad\x00name"}).text
    login = anonymous_client(app).post("/login", data={"username": "boss\x00", "password": "whatever it is"})
    assert login.status_code in (400, 403), login.text[:300]  # 403: the login form's CSRF check comes first
    assert {k: v for k, v in table_snapshot(ctx(app).database).items() if k != "auth_sessions"} == before


def test_the_rule_holds_for_every_parameter_style(app: FastAPI) -> None:
    """Named (PostgreSQL) and positional (SQLite) parameters, single rows and executemany."""
    import sqlalchemy as sa

    database = ctx(app).database
    with pytest.raises(UnstorableText), database.write() as db:
        db.execute(sa.text("SELECT :a"), {"a": "x\x00"})
    with pytest.raises(UnstorableText), database.write() as db:
        db.execute(sa.text("SELECT :a"), [{"a": "fine"}, {"a": "\x00"}])
    with database.read() as db:
        assert db.execute(sa.text("SELECT :a"), {"a": "fine \u00ff"}).scalar_one() == "fine \u00ff"
