"""W13: two admins editing a project's settings from the same version get one 200 and one 409, and the
audit log holds both attempts (who, when, what, outcome); through the API (sequentially and from threads
released at once) and through the project page's form (CSRF kept), on SQLite and PostgreSQL."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import (
    add_project,
    add_user,
    ctx,
    form_csrf,
    session_client,
    table_snapshot,
    token_client,
)

from alignloop.feedback.db import AuditEntry, Project, utcnow

RACERS, ROUNDS = 8, 3


def _audit(app: FastAPI) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(who, outcome, version read, changes) of every audit row, oldest first."""
    with ctx(app).database.read() as db:
        rows = db.execute(sa.select(AuditEntry).order_by(AuditEntry.id)).scalars()
        return [(e.username, e.outcome, e.details["version_read"], e.details["changes"]) for e in rows]


def _project(app: FastAPI, pid: int) -> tuple[str, str, int, int]:
    with ctx(app).database.read() as db:
        p = db.get(Project, pid)
        assert p is not None
        return p.name, p.guidelines, p.overlap_k, p.version


def test_w13_second_edit_from_same_version_is_409_and_both_audited(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    add_user(app, "chief", "admin")
    pid = add_project(app, "p", [], n_items=1)
    boss, chief = token_client(app, "boss"), session_client(app, "chief")
    [seen] = chief.get("/api/v1/projects").json()
    assert seen["version"] == 1 and seen["guidelines"] == "Pick the more helpful answer."
    before = utcnow()

    first = boss.patch(f"/api/v1/projects/{pid}", json={"version": 1, "guidelines": "Prefer the shorter answer."})
    assert first.status_code == 200
    assert first.json() == {"id": pid, "name": "p", "guidelines": "Prefer the shorter answer.", "overlap_k": 1,
                            "task": "pairwise", "version": 2}
    second = chief.patch(f"/api/v1/projects/{pid}", json={"version": 1, "guidelines": "Prefer the longer one.",
                                                          "overlap_k": 3})
    assert second.status_code == 409
    assert second.json()["detail"] == ("the project was changed since you read it (version 1, now 2): "
                                       "reload it and make your edit again")
    assert _project(app, pid) == ("p", "Prefer the shorter answer.", 1, 2)
    assert _audit(app) == [
        ("boss", "applied", 1, {"guidelines": ["Pick the more helpful answer.", "Prefer the shorter answer."]}),
        ("chief", "conflict", 1, {"guidelines": ["Prefer the shorter answer.", "Prefer the longer one."],
                                  "overlap_k": [1, 3]}),
    ]
    with ctx(app).database.read() as db:
        stamps = list(db.execute(sa.select(AuditEntry.created_at, AuditEntry.user_id, AuditEntry.details)).all())
    assert all(before <= at <= utcnow() for at, _, _ in stamps)
    assert [d.get("version") for _, _, d in stamps] == [2, None]
    assert all(uid is not None for _, uid, _ in stamps)

    # Re-read, edit again: accepted. A rename to a taken name and an unchanged edit keep the version.
    assert chief.patch(f"/api/v1/projects/{pid}", json={"version": 2, "overlap_k": 3}).json()["version"] == 3
    add_project(app, "q", [], n_items=1)
    taken = chief.patch(f"/api/v1/projects/{pid}", json={"version": 3, "name": "q"})
    assert taken.status_code == 409 and taken.json()["detail"] == "project 'q' already exists"
    assert chief.patch(f"/api/v1/projects/{pid}", json={"version": 3, "overlap_k": 3}).json()["version"] == 3
    assert _project(app, pid) == ("p", "Prefer the shorter answer.", 3, 3)
    assert [row[:2] for row in _audit(app)[2:]] == [("chief", "applied"), ("chief", "conflict"), ("chief", "applied")]


def test_w13_edit_requests_that_are_refused_before_any_attempt(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    pid = add_project(app, "p", ["ann"], n_items=1)
    boss, ann = token_client(app, "boss"), session_client(app, "ann")
    snapshot = table_snapshot(ctx(app).database)
    assert boss.patch("/api/v1/projects/999", json={"version": 1, "guidelines": "x"}).status_code == 404
    assert boss.patch(f"/api/v1/projects/{pid}", json={"version": 1, "task": "rank"}).status_code == 422
    assert boss.patch(f"/api/v1/projects/{pid}", json={"version": 1, "overlap_k": 0}).status_code == 422
    assert boss.patch(f"/api/v1/projects/{pid}", json={"guidelines": "no version"}).status_code == 422
    assert ann.patch(f"/api/v1/projects/{pid}", json={"version": 1, "name": "mine"}).status_code == 403
    assert table_snapshot(ctx(app).database) == snapshot


def _race(app: FastAPI, pid: int, version: int, admins: list[str]) -> list[int]:
    """Every admin sends an edit from `version` at the same moment (threads released by a barrier)."""
    clients = [token_client(app, name) for name in admins]
    barrier = threading.Barrier(len(admins))

    def send(i: int) -> int:
        barrier.wait()
        body = {"version": version, "guidelines": f"rule from {admins[i]} at v{version}"}
        return clients[i].patch(f"/api/v1/projects/{pid}", json=body).status_code

    with ThreadPoolExecutor(max_workers=len(admins)) as pool:
        return list(pool.map(send, range(len(admins))))


def test_w13_concurrent_edits_one_wins_per_version(app: FastAPI) -> None:
    admins = [f"admin{i}" for i in range(RACERS)]
    for name in admins:
        add_user(app, name, "admin")
    pid = add_project(app, "p", [], n_items=1)
    for version in range(1, ROUNDS + 1):
        statuses = _race(app, pid, version, admins)
        assert sorted(statuses) == [200] + [409] * (RACERS - 1), statuses
    rows = _audit(app)
    assert len(rows) == RACERS * ROUNDS
    for version in range(1, ROUNDS + 1):
        attempts = [r for r in rows if r[2] == version]
        assert sorted(who for who, *_ in attempts) == admins
        [winner] = [who for who, outcome, *_ in attempts if outcome == "applied"]
        if version == ROUNDS:
            assert _project(app, pid)[1:] == (f"rule from {winner} at v{version}", 1, ROUNDS + 1)


def _settings_form(page: str) -> dict[str, str]:
    found = re.search(r'<form method="post" action="/admin/projects/\d+/settings".*?</form>', page, re.S)
    assert found, "no settings form on the project page"
    form = found.group(0)
    values = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))
    values["guidelines"] = re.search(r"<textarea name=\"guidelines\"[^>]*>(.*?)</textarea>", form, re.S).group(1)
    return values


def test_w13_settings_form_with_csrf_and_conflict_page(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    add_user(app, "chief", "admin")
    pid = add_project(app, "p", [], n_items=1)
    boss, chief = session_client(app, "boss"), session_client(app, "chief")
    boss_form, chief_form = (_settings_form(c.get(f"/admin/projects/{pid}").text) for c in (boss, chief))
    assert boss_form["version"] == chief_form["version"] == "1"
    assert boss_form["guidelines"] == "Pick the more helpful answer."

    del boss.headers["X-CSRF-Token"]  # a form post carries its token in the form only
    snapshot = table_snapshot(ctx(app).database)
    tokenless = {"version": "1", "name": "p", "overlap_k": "2", "guidelines": "sneaky"}
    assert boss.post(f"/admin/projects/{pid}/settings", data=tokenless).status_code == 403
    assert table_snapshot(ctx(app).database) == snapshot

    sent = {**boss_form, "name": "p renamed", "overlap_k": "2", "guidelines": "Line one.\r\nLine two."}
    assert form_csrf(boss.get(f"/admin/projects/{pid}").text) == boss_form["csrf_token"]
    done = boss.post(f"/admin/projects/{pid}/settings", data=sent)
    assert done.status_code == 303 and done.headers["location"] == f"/admin/projects/{pid}"
    assert _project(app, pid) == ("p renamed", "Line one.\nLine two.", 2, 2)

    late = chief.post(f"/admin/projects/{pid}/settings", data={**chief_form, "name": "p", "overlap_k": "1",
                                                              "guidelines": "Mine."})
    assert late.status_code == 409 and "Error 409" in late.text and "changed since you read it" in late.text
    assert _project(app, pid) == ("p renamed", "Line one.\nLine two.", 2, 2)
    page = boss.get(f"/admin/projects/{pid}").text
    assert _settings_form(page)["version"] == "2"
    log = re.search(r'<table id="audit-log">.*?</table>', page, re.S)
    assert log is not None
    cells = [re.sub(r"\s+", " ", c).strip() for c in re.findall(r"<td>(.*?)</td>", log.group(0), re.S)]
    assert [c for i, c in enumerate(cells) if i % 4 != 0] == [
        "chief", "conflict (from version 1)", "guidelines, name, overlap_k",
        "boss", "applied (from version 1)", "guidelines, name, overlap_k"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", c) for c in cells[::4])
