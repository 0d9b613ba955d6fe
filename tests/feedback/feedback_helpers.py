"""Helpers shared by the feedback tests (fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import httpx
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


def login_token(app: FastAPI, username: str) -> tuple[str, str]:
    """A new session token for `username` and its CSRF token (made directly, not through the throttled
    form); the session is a database row, so a server started separately on the same database takes it."""
    token = auth.login(ctx(app), username, PASSWORD)
    assert token is not None
    return token, security.csrf_token(ctx(app).secret, security.token_hash(token))


def session_client(app: FastAPI, username: str) -> TestClient:
    """A client logged in as `username`."""
    token, csrf = login_token(app, username)
    client = TestClient(app, follow_redirects=False)
    client.cookies.set(ctx(app).session_cookie, token)
    client.headers["X-CSRF-Token"] = csrf
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


# ---------------------------------------------------------------------------------------------------------
# Rank, rate and edit projects (test_tasks.py, test_dashboard.py)


def task_row(item_id: str, n: int, gold: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """An import row with `n` responses ("<item id> answer <i>", model "model-<i>") and an optional gold answer."""
    row: dict[str, Any] = {"id": item_id, "prompt": f"Question {item_id}?",
                           "responses": [{"text": f"{item_id} answer {i}", "model": f"model-{i}"} for i in range(n)],
                           **extra}
    if gold is not None:
        row["gold"] = gold
    return row


def add_task_project(app: FastAPI, name: str, task: str, members: list[str], rows: list[dict[str, Any]],
                     k: int = 1) -> int:
    with ctx(app).database.write() as db:
        project = services.create_project(db, name, "Judge carefully.", k, task)
        for username in members:
            services.add_member(db, project, username)
        services.import_items(db, project, parse_items(enumerate(rows, 1), "test", task), "test")
        return project.id


def answer_all(app: FastAPI, pid: int, username: str, decide: Any, order: Any = None, ms: Any = None) -> list[str]:
    """Answer every item `username` is given, through the services, in assignment order; returns the item ids.

    `decide(item_id, presented_order)` gives a pairwise (choice in import positions "a"/"b"/"tie"/"both_bad",
    strength), a rank/rate/edit form dict, or None to skip. `order(n)` forces the presented order of an
    item with n responses; `ms(item_id)` the time spent."""
    from alignloop.feedback.db import Item, User

    with ctx(app).database.read() as db:
        uid = db.execute(sa.select(User.id).where(User.username == username)).scalar_one()
    done: list[str] = []
    while True:
        with ctx(app).database.write() as db:
            project = services.member_project(db, uid, pid, lock=True)
            assignment = services.next_assignment(db, project, uid, 60)
            if assignment is None:
                return done
            item = db.get(Item, assignment.item_id)
            assert item is not None
            if order is not None:
                assignment.presented_order = order(len(item.responses))
            what = decide(item.external_id, list(assignment.presented_order))
            key, spent = f"{username}-{item.external_id}", ms(item.external_id) if ms else None
            if what is None:
                services.skip(db, project, uid, assignment.id, "cannot judge", spent, key)
            elif project.task == "pairwise":
                choice, strength = what
                displayed = choice if choice in ("tie", "both_bad") else (
                    "left" if assignment.presented_order[0] == "ab".index(choice) else "right")
                services.submit_label(db, project, uid, assignment.id, displayed, strength, spent, key)
            else:
                services.submit_answer(db, project, uid, assignment.id, project.task, what, spent, key)
            done.append(item.external_id)


def shown_numbers(positions: list[int], presented_order: list[int]) -> str:
    """The rank form's value ("2,3,1") that ranks `positions` (import order, best first) as shown."""
    return ",".join(str(presented_order.index(p) + 1) for p in positions)


# ---------------------------------------------------------------------------------------------------------
# Chat projects (test_chat_task.py): a fake OpenAI-compatible model server answered in-process


PUBLIC_BASE = "http://8.8.8.8/v1"
"""A public address: allowed without ALIGNLOOP_APP_MODEL_HOSTS; with a mock transport nothing is sent."""


class FakeModel:
    """`/v1/chat/completions` as an httpx.MockTransport: drafts "reply <call>.<i>", `version` as the
    system_fingerprint (None: left out); records every request. `fail(request)` replaces the answer (return
    a response or raise an httpx error)."""

    def __init__(self, version: str | None = "fp-1", fail: Any = None, same_text: bool = False) -> None:
        self.version, self.fail, self.same_text = version, fail, same_text
        self.calls: list[dict[str, Any]] = []
        self.transport = httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        self.calls.append({"body": body, "authorization": request.headers.get("authorization"), "url": str(request.url)})
        if self.fail is not None:
            return self.fail(request)  # type: ignore[no-any-return]
        k = len(self.calls)
        choices = [{"index": i, "message": {"role": "assistant", "content": f"reply {k}" if self.same_text else f"reply {k}.{i}"},
                    "finish_reason": "stop"} for i in range(body["n"])]
        extra = {"system_fingerprint": self.version} if self.version else {}
        return httpx.Response(200, json={"id": f"c{k}", "object": "chat.completion", "model": body["model"],
                                         "choices": choices, **extra})


def add_chat_project(app: FastAPI, name: str, members: list[str], rows: list[dict[str, Any]] | None = None, k: int = 1,
                     base_url: str = PUBLIC_BASE, n_drafts: int = 2, api_key: str | None = None) -> int:
    """A chat project with its model set and `rows` imported (prompt items: {"id", "prompt"})."""
    from alignloop.feedback import conversations

    with ctx(app).database.write() as db:
        project = services.create_project(db, name, "Chat, then pick the best draft.", k, "chat")
        for username in members:
            services.add_member(db, project, username)
        conversations.set_endpoint(db, project, conversations.Endpoint(base_url, "policy", api_key, n_drafts,
                                                                       temperature=0.7, max_tokens=64),
                                   secret=ctx(app).secret)
        if rows:
            services.import_items(db, project, parse_items(enumerate(rows, 1), "test", "chat"), "test")
        return project.id
