"""W2: an annotator cannot read or change another annotator's labels or assignments, nor another
project's items: 404 (or 403 for admin areas) and the database unchanged; lists show nothing foreign."""

from __future__ import annotations

import re

from fastapi import FastAPI
from feedback_helpers import add_project, add_user, ctx, session_client, table_snapshot

from alignloop.feedback import services


def _assignment(client, pid: int) -> int:
    found = re.search(r'name="assignment_id" value="(\d+)"', client.get(f"/annotate/{pid}").text)
    assert found
    return int(found.group(1))


def test_w2_idor(app: FastAPI) -> None:
    for name in ("ann", "bob"):
        add_user(app, name)
    add_user(app, "boss", "admin")
    shared = add_project(app, "shared", ["ann", "bob"], n_items=4, k=2)
    private = add_project(app, "bobs", ["bob"], n_items=2)
    ann, bob = session_client(app, "ann"), session_client(app, "bob")
    bob_shared = _assignment(bob, shared)
    assert bob.post(f"/annotate/{shared}/label", data={"assignment_id": bob_shared, "vote": "left:better",
                                                       "idempotency_key": "b1"}).status_code == 303
    bob_open = _assignment(bob, shared)  # bob's next, still open
    bob_private = _assignment(bob, private)
    _assignment(ann, shared)  # ann's own assignment exists before the snapshot
    before = table_snapshot(ctx(app).database)

    attempts = [
        ("get", f"/annotate/{private}", {}),
        ("post", f"/annotate/{private}/label", {"assignment_id": bob_private, "vote": "tie", "idempotency_key": "x1"}),
        ("post", f"/annotate/{private}/skip", {"assignment_id": bob_private, "reason": "r", "idempotency_key": "x2"}),
        ("post", f"/annotate/{private}/undo", {}),
        ("post", f"/annotate/{shared}/label", {"assignment_id": bob_open, "vote": "tie", "idempotency_key": "x3"}),
        ("post", f"/annotate/{shared}/label", {"assignment_id": bob_private, "vote": "tie", "idempotency_key": "x4"}),
        ("post", f"/annotate/{shared}/skip", {"assignment_id": bob_open, "reason": "r", "idempotency_key": "x5"}),
        ("post", f"/annotate/{shared}/label", {"assignment_id": 10**9, "vote": "tie", "idempotency_key": "x6"}),
        ("post", f"/annotate/{10**9}/label", {"assignment_id": bob_open, "vote": "tie", "idempotency_key": "x7"}),
    ]
    for method, url, data in attempts:
        response = ann.request(method, url, data=data or None)
        assert response.status_code == 404, (url, data, response.status_code)
    for url in (f"/admin/projects/{shared}", f"/api/v1/projects/{shared}/labels", f"/api/v1/projects/{private}/progress",
                f"/api/v1/projects/{shared}/export.jsonl?kind=votes", "/admin"):
        assert ann.get(url).status_code == 403, url
    assert table_snapshot(ctx(app).database) == before

    # ann's undo withdraws nothing of bob's (she has no answer yet)
    assert ann.post(f"/annotate/{shared}/undo").status_code == 303
    assert table_snapshot(ctx(app).database) == before
    home = ann.get("/annotate").text
    assert "shared" in home and "bobs" not in home
    page = ann.get(f"/annotate/{shared}").text
    assert "labelled 0" in page  # her own counts only; no one else's votes appear anywhere for her
    with ctx(app).database.read() as db:
        assert [p.name for p in services.projects_for(db, 0, admin=False)] == []

