"""The annotator's pairwise page end to end: assignment (overlap k, authors), randomised and recorded
order, strength, skip with reason, undo, idempotent resend, progress. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import re

import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import add_project, add_user, anonymous_client, count, ctx, form_csrf, session_client

from alignloop.feedback.db import Assignment, Label


def _assignment_id(html: str) -> int:
    found = re.search(r'name="assignment_id" value="(\d+)"', html)
    assert found, "no item on the page"
    return int(found.group(1))


def _key(html: str) -> str:
    found = re.search(r'name="idempotency_key" value="([^"]+)"', html)
    assert found
    return found.group(1)


def _vote(client, pid: int, vote: str, html: str | None = None):
    html = html or client.get(f"/annotate/{pid}").text
    return client.post(f"/annotate/{pid}/label", data={
        "assignment_id": _assignment_id(html), "vote": vote, "idempotency_key": _key(html), "time_spent_ms": "1234",
        "csrf_token": form_csrf(html)})


def test_login_form_then_label_and_undo(app: FastAPI) -> None:
    add_user(app, "ann")
    pid = add_project(app, "p", ["ann"], n_items=2)
    client = anonymous_client(app)
    page = client.get("/login")
    assert page.status_code == 200 and "no sign-up" in page.text
    response = client.post("/login", data={"username": "ann", "password": "correct horse battery",
                                           "csrf_token": form_csrf(page.text)})
    assert response.status_code == 303 and response.headers["location"] == "/"
    assert client.get("/").headers["location"] == "/annotate"
    home = client.get("/annotate")
    assert home.status_code == 200 and f"/annotate/{pid}" in home.text

    html = client.get(f"/annotate/{pid}").text
    assert "Left much better" in html and "2 left for you" in html
    assert 'nonce="' in html and "keydown" in html
    first = _assignment_id(html)
    assert _vote(client, pid, "left:better", html).status_code == 303
    with ctx(app).database.read() as db:
        label = db.execute(sa.select(Label)).scalar_one()
        order = db.get(Assignment, first).presented_order
    assert sorted(order) == [0, 1] and label.presented_order == order
    assert label.choice == ("a", "b")[order[0]] and label.strength == "better" and label.time_spent_ms == 1234
    assert label.displayed_choice == "left"

    second_page = client.get(f"/annotate/{pid}").text
    assert _assignment_id(second_page) != first and "labelled 1" in second_page
    assert client.post(f"/annotate/{pid}/undo", data={"csrf_token": form_csrf(second_page)}).status_code == 303
    again = client.get(f"/annotate/{pid}").text
    assert _assignment_id(again) == first  # undo reopens the item just answered
    assert _vote(client, pid, "tie", again).status_code == 303
    with ctx(app).database.read() as db:
        labels = db.execute(sa.select(Label).order_by(Label.id)).scalars().all()
    assert [lab.undone_at is not None for lab in labels] == [True, False]  # undo keeps the row
    assert labels[1].choice == "tie" and labels[1].strength is None


def test_resend_is_idempotent_and_answered_item_conflicts(app: FastAPI) -> None:
    add_user(app, "ann")
    pid = add_project(app, "p", ["ann"], n_items=2)
    client = session_client(app, "ann")
    html = client.get(f"/annotate/{pid}").text
    for _ in range(3):  # the same submission resent (lost response, double click)
        assert _vote(client, pid, "right:much better", html).status_code == 303
    assert count(app, Label) == 1
    other_key = client.post(f"/annotate/{pid}/label", data={
        "assignment_id": _assignment_id(html), "vote": "tie", "idempotency_key": "another-key"})
    assert other_key.status_code == 409 and count(app, Label) == 1


def test_bad_votes_are_refused(app: FastAPI) -> None:
    add_user(app, "ann")
    pid = add_project(app, "p", ["ann"], n_items=1)
    client = session_client(app, "ann")
    html = client.get(f"/annotate/{pid}").text
    for vote in ("left", "left:amazing", "tie:better", "up"):
        assert _vote(client, pid, vote, html).status_code == 400, vote
    assert count(app, Label) == 0


def test_overlap_k_and_authors(app: FastAPI) -> None:
    for name in ("a1", "a2", "a3"):
        add_user(app, name)
    pid = add_project(app, "p", ["a1", "a2", "a3"], n_items=2, k=2, authors={0: "a1"})
    c1, c2, c3 = (session_client(app, n) for n in ("a1", "a2", "a3"))
    # a1 wrote item 0: it never gets it, only item 1.
    assert _vote(c1, pid, "left:better").status_code == 303
    assert "Nothing left for you" in c1.get(f"/annotate/{pid}").text
    for client in (c2, c3, c3):  # item 0 to a2 and a3; then item 1 (only a1 on it) to a3
        assert _vote(client, pid, "right:slightly better").status_code == 303
    assert "Nothing left for you" in c2.get(f"/annotate/{pid}").text  # both items have k = 2
    assert "Nothing left for you" in c3.get(f"/annotate/{pid}").text
    with ctx(app).database.read() as db:
        rows = db.execute(sa.select(Label.item_id, Label.user_id).order_by(Label.id)).all()
        names = dict(db.execute(sa.text("SELECT id, username FROM users")).all())
        items = dict(db.execute(sa.text("SELECT id, external_id FROM items")).all())
    assert sorted((items[i], names[u]) for i, u in rows) == [("p-0", "a2"), ("p-0", "a3"), ("p-1", "a1"), ("p-1", "a3")]


def test_skip_needs_a_reason_and_frees_the_item(app: FastAPI) -> None:
    add_user(app, "a1")
    add_user(app, "a2")
    pid = add_project(app, "p", ["a1", "a2"], n_items=1, k=1)
    c1, c2 = session_client(app, "a1"), session_client(app, "a2")
    html = c1.get(f"/annotate/{pid}").text
    data = {"assignment_id": _assignment_id(html), "idempotency_key": "s1", "time_spent_ms": "50"}
    assert c1.post(f"/annotate/{pid}/skip", data={**data, "reason": "  "}).status_code == 400
    assert "Nothing left" in c2.get(f"/annotate/{pid}").text  # a1 holds the only slot
    assert c1.post(f"/annotate/{pid}/skip", data={**data, "reason": "I cannot judge code"}).status_code == 303
    with ctx(app).database.read() as db:
        label = db.execute(sa.select(Label)).scalar_one()
    assert label.skip_reason == "I cannot judge code" and label.choice is None
    assert _vote(c2, pid, "left:better").status_code == 303  # the skipped item went to a2
