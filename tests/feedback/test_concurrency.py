"""W10 (in-process): 20 annotators labelling at once, 200 submissions: all acknowledged, 200 rows, no
duplicate, no "database is locked"; and the left/right order is really randomised and recorded."""

from __future__ import annotations

import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import add_project, add_user, ctx, session_client

from alignloop.feedback.db import Assignment, Label

ANNOTATORS, ITEMS = 20, 10


def _label_everything(app: FastAPI, pid: int, name: str) -> list[int]:
    client = session_client(app, name)
    statuses = []
    for i in range(ITEMS):
        html = client.get(f"/annotate/{pid}").text
        found = re.search(r'name="assignment_id" value="(\d+)"', html)
        assert found, f"{name} got no item at step {i}"
        vote = ("left:better", "right:much better", "tie", "both_bad")[i % 4]
        response = client.post(f"/annotate/{pid}/label", data={"assignment_id": found.group(1), "vote": vote,
                                                                "idempotency_key": f"{name}-{i}"})
        statuses.append(response.status_code)
    return statuses


def test_w10_concurrent_submissions(app: FastAPI) -> None:
    names = [f"ann{i:02d}" for i in range(ANNOTATORS)]
    for name in names:
        add_user(app, name)
    pid = add_project(app, "busy", names, n_items=ITEMS, k=ANNOTATORS)
    with ThreadPoolExecutor(max_workers=ANNOTATORS) as pool:
        results = list(pool.map(lambda n: _label_everything(app, pid, n), names))
    assert [s for r in results for s in r] == [303] * ANNOTATORS * ITEMS
    with ctx(app).database.read() as db:
        rows = db.execute(sa.select(Label.item_id, Label.user_id)).all()
        orders = Counter(tuple(o) for o in db.execute(sa.select(Assignment.presented_order)).scalars())
    assert len(rows) == ANNOTATORS * ITEMS and len(set(rows)) == len(rows)
    # 200 fair coin flips: each order appears (P(all one way) = 2^-199), neither implausibly often
    assert set(orders) == {(0, 1), (1, 0)} and 60 <= orders[(0, 1)] <= 140
