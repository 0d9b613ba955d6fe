"""Import (JSONL upload and JSON API), progress, labels and export; the pairs file loads with the reward
trainer's loader. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import add_user, count, ctx, item_row, session_client, table_snapshot, token_client

from alignloop.data import load_records
from alignloop.feedback import services
from alignloop.feedback.db import Item, Response

# (annotator, wanted canonical choice, strength) per item: see test_export_kinds_and_reward_loader.
VOTES = {
    0: [("a1", "a", "much better"), ("a2", "a", "better"), ("a3", "b", "slightly better")],
    1: [("a1", "tie", None), ("a2", "tie", None), ("a3", "a", "better")],
    2: [("a1", "both_bad", None), ("a2", "b", "much better"), ("a3", "b", "slightly better")],
    3: [("a1", "a", "better"), ("a2", "b", "better"), ("a3", "tie", None)],
}


def test_api_batch_progress_labels(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    api = token_client(app, "boss")
    created = api.post("/api/v1/projects", json={"name": "batch", "overlap_k": 1, "annotators": ["ann"],
                                                 "guidelines": "Be kind."})
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    assert api.post("/api/v1/projects", json={"name": "batch"}).status_code == 409
    assert api.post("/api/v1/projects", json={"name": "x", "overlap_k": 0}).status_code == 422

    bad = [item_row("i0"), item_row("i1"), {**item_row("i2"), "responses": [{"text": "t", "model": "m"}, {"text": "u"}]}]
    before = table_snapshot(ctx(app).database)
    response = api.post(f"/api/v1/projects/{pid}/items", json={"items": bad})
    assert response.status_code == 400
    body = response.json()
    assert body["line"] == 3 and body["field"] == "responses[1].model" and body["code"] == "D102"
    assert table_snapshot(ctx(app).database) == before
    assert api.post(f"/api/v1/projects/{pid}/items", json={"items": bad[:2]}).json() == {"created": 2}
    dup = api.post(f"/api/v1/projects/{pid}/items", json={"items": [item_row("i9"), item_row("i1")]})
    assert dup.status_code == 400 and dup.json()["line"] == 2 and count(app, Item) == 2

    ann = session_client(app, "ann")
    html = ann.get(f"/annotate/{pid}").text
    assert "Be kind." in html
    progress = api.get(f"/api/v1/projects/{pid}/progress").json()
    assert progress["items"] == 2 and progress["votes"] == 0 and progress["agreement"]["krippendorff_alpha"] is None
    labels = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "votes"}).json()
    assert labels["records"] == [] and labels["report"]["kept"] == 0
    assert api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "bogus"}).status_code == 422
    assert api.get("/api/v1/projects/999999/progress").status_code == 404
    schema = api.get("/api/v1/openapi.json").json()
    assert "/api/v1/projects/{project_id}/items" in schema["paths"] and "/annotate" not in schema["paths"]


def test_jsonl_upload_all_or_nothing(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    admin = session_client(app, "boss")
    pid = admin.post("/api/v1/projects", json={"name": "up"}).json()["id"]
    rows = [item_row("u0"), item_row("u1"), {**item_row("u2"), "prompt": ""}]
    upload = "\n".join(json.dumps(r) for r in rows).encode()
    response = admin.post(f"/admin/projects/{pid}/items", files={"file": ("batch.jsonl", upload, "application/x-ndjson")})
    assert response.status_code == 400
    assert "batch.jsonl:3" in response.text and "prompt" in response.text and count(app, Item) == 0
    broken = admin.post(f"/admin/projects/{pid}/items", files={"file": ("b.jsonl", b'{"id": "x"}\n{oops\n', "text/plain")})
    assert broken.status_code == 400 and "b.jsonl:2" in broken.text and count(app, Item) == 0
    ok = admin.post(f"/admin/projects/{pid}/items",
                    files={"file": ("batch.jsonl", b"\n".join(json.dumps(r).encode() for r in rows[:2]), "text/plain")})
    assert ok.status_code == 303 and count(app, Item) == 2 and count(app, Response) == 4
    with ctx(app).database.read() as db:
        models = db.execute(sa.select(Response.model_name, Response.model_version).order_by(Response.id)).all()
    assert [tuple(m) for m in models[:2]] == [("policy", "v1"), ("reference", "v0")]


def _label_all(app: FastAPI, pid: int) -> None:
    """Cast VOTES through the services, translating each wanted choice into the side it was shown on."""
    with ctx(app).database.read() as db:
        names = dict(db.execute(sa.text("SELECT username, id FROM users")).all())
    for _round in range(4):
        for name in ("a1", "a2", "a3"):
            with ctx(app).database.write() as db:
                project = services.member_project(db, names[name], pid, lock=True)
                assignment = services.next_assignment(db, project, names[name], 60)
                assert assignment is not None
                index = int(db.get(Item, assignment.item_id).external_id.split("-")[1])
                _, choice, strength = next(v for v in VOTES[index] if v[0] == name)
                displayed = choice if choice in ("tie", "both_bad") else (
                    "left" if assignment.presented_order[0] == "ab".index(choice) else "right")
                services.submit_label(db, project, names[name], assignment.id, displayed, strength, 500,
                                      f"{name}-{index}")


def test_export_kinds_and_reward_loader(app: FastAPI, tmp_path: Path) -> None:
    add_user(app, "boss", "admin")
    for name in ("a1", "a2", "a3"):
        add_user(app, name)
    api = token_client(app, "boss")
    pid = api.post("/api/v1/projects", json={"name": "ex", "overlap_k": 3, "annotators": ["a1", "a2", "a3"]}).json()["id"]
    api.post(f"/api/v1/projects/{pid}/items", json={"items": [item_row(f"ex-{i}") for i in range(4)]})
    _label_all(app, pid)

    progress = api.get(f"/api/v1/projects/{pid}/progress").json()
    assert progress["votes"] == 12 and progress["items_complete"] == 4
    assert progress["votes_per_annotator"] == {"a1": 4, "a2": 4, "a3": 4}
    assert -1.0 <= progress["agreement"]["krippendorff_alpha"] <= 1.0

    votes = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "votes"}).json()
    assert votes["report"]["kept"] == 12
    assert sorted(r["choice"] for r in votes["records"]).count("tie") == 3  # ties and both-bad kept raw
    first = next(r for r in votes["records"] if r["id"] == "ex-0:a1")
    assert first["meta"]["annotator_id"] == "a1" and first["meta"]["time_spent_ms"] == 500
    assert sorted(first["meta"]["presented_order"]) == [0, 1] and first["meta"]["model_a"]["name"] == "policy"

    pairs = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "pairs"}).json()
    assert pairs["report"] == {**pairs["report"], "kept": 2, "dropped_ties": 1, "dropped_no_majority": 1}
    by_id = {r["id"]: r for r in pairs["records"]}
    assert by_id["ex-0"]["chosen"] == "answer one to ex-0" and by_id["ex-0"]["margin"] == 2.0
    assert by_id["ex-0"]["strength"] == "better" and by_id["ex-0"]["meta"]["chosen_model"]["name"] == "policy"
    assert by_id["ex-2"]["chosen"] == "answer two to ex-2" and by_id["ex-2"]["margin"] == 1.0
    assert by_id["ex-2"]["meta"]["votes"] == {"a": 0, "b": 2, "tie": 0, "both_bad": 1}

    per_annotator = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "annotator-pairs"}).json()
    assert per_annotator["report"]["kept"] == 8 and per_annotator["report"]["dropped_ties"] == 3
    assert per_annotator["report"]["dropped_both_bad"] == 1
    thumbs = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "thumbs"}).json()
    assert thumbs["report"]["kept"] == 24

    download = api.get(f"/api/v1/projects/{pid}/export.jsonl", params={"kind": "pairs"})
    assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(download.content)
    from alignloop.train.reward import RewardConfig, load_comparisons

    cfg = RewardConfig()
    cfg.data.train_path = cfg.data.eval_path = str(path)
    train, _ = load_comparisons(cfg)
    assert sorted((p.id, p.margin) for p in train) == [("ex-0", 2.0), ("ex-2", 1.0)]
    thumbs_path = tmp_path / "thumbs.jsonl"
    thumbs_path.write_bytes(api.get(f"/api/v1/projects/{pid}/export.jsonl", params={"kind": "thumbs"}).content)
    assert len(load_records(thumbs_path, "thumb")) == 24
