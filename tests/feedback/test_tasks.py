"""Rank, rate and edit projects end to end: their pages (keyboard script under the nonce, no inline
handlers), answers in import positions, the shared assignment/undo/skip/idempotency machinery, gold
items (validated, hidden, given to every member), and every export kind loading with
`alignloop.data.load_records`. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import typing
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import (
    add_task_project,
    add_user,
    answer_all,
    count,
    ctx,
    form_csrf,
    item_row,
    session_client,
    shown_numbers,
    table_snapshot,
    task_row,
    token_client,
)

from alignloop.data import DataError, load_records
from alignloop.feedback import exports, pages, schemas, services, tasks
from alignloop.feedback.db import TASKS, Assignment, Item, Label
from alignloop.feedback.records import parse_items


def _form(html: str) -> dict[str, str]:
    """The hidden fields of the page's answer form (assignment, idempotency key, CSRF token)."""
    found = {name: re.search(rf'name="{name}" value="([^"]+)"', html) for name in ("assignment_id", "idempotency_key")}
    assert all(found.values()), "no item on the page"
    return {name: m.group(1) for name, m in found.items() if m} | {"csrf_token": form_csrf(html), "time_spent_ms": "900"}


def _label(app: FastAPI) -> Label:
    with ctx(app).database.read() as db:
        return db.execute(sa.select(Label).where(Label.undone_at.is_(None)).order_by(Label.id.desc()).limit(1)).scalar_one()


def _assert_csp_safe(response) -> None:
    """Every script carries this response's nonce; no inline event handler or javascript: URL anywhere."""
    nonce = re.search(r"'nonce-([^']+)'", response.headers["content-security-policy"]).group(1)
    scripts = re.findall(r"<script([^>]*)>", response.text)
    assert scripts and all(f'nonce="{nonce}"' in s for s in scripts), scripts
    assert not re.search(r"\son[a-z]+\s*=", response.text, re.I) and "javascript:" not in response.text


def test_rank_page_answer_undo_and_resend(app: FastAPI) -> None:
    add_user(app, "ann")
    pid = add_task_project(app, "r", "rank", ["ann"], [task_row("r0", 3, gold={"ranking": [2, 0, 1]}), task_row("r1", 4)])
    client = session_client(app, "ann")
    page = client.get(f"/annotate/{pid}")
    assert page.status_code == 200 and f'action="/annotate/{pid}/rank"' in page.text
    assert "Response 3" in page.text and "Response 4" not in page.text and "keydown" in page.text
    assert "model-0" not in page.text and "gold" not in page.text.lower()  # no model names, no gold answer
    _assert_csp_safe(page)
    data = _form(page.text)
    with ctx(app).database.read() as db:
        order = db.get(Assignment, int(data["assignment_id"])).presented_order
    assert sorted(order) == [0, 1, 2]
    for bad in ("1,1,2", "1,2", "1,2,4", "best", ""):
        assert client.post(f"/annotate/{pid}/rank", data={**data, "ranking": bad}).status_code in (400, 422), bad
    assert client.post(f"/annotate/{pid}/rate", data={**data, "helpful": 3}).status_code == 400  # not this task
    assert client.post(f"/annotate/{pid}/label", data={**data, "vote": "tie"}).status_code == 400
    assert count(app, Label) == 0
    for _ in range(2):  # a resend stores nothing twice
        assert client.post(f"/annotate/{pid}/rank", data={**data, "ranking": "2 3 1"}).status_code == 303
    label = _label(app)
    assert count(app, Label) == 1 and label.answer == {"ranking": [order[1], order[2], order[0]]}
    assert label.presented_order == order and label.time_spent_ms == 900 and label.choice is None

    second = client.get(f"/annotate/{pid}").text
    assert "Response 4" in second and "labelled 1" in second
    client.post(f"/annotate/{pid}/undo", data={"csrf_token": form_csrf(second)})
    again = client.get(f"/annotate/{pid}").text
    assert _form(again)["assignment_id"] == data["assignment_id"]  # undo reopens the ranked item
    assert client.post(f"/annotate/{pid}/rank", data={**_form(again), "ranking": "123"}).status_code == 303
    assert _label(app).answer == {"ranking": order}


def test_rate_page_and_answer(app: FastAPI) -> None:
    add_user(app, "ann")
    pid = add_task_project(app, "t", "rate", ["ann"], [task_row("t0", 1), task_row("t1", 1)])
    client = session_client(app, "ann")
    page = client.get(f"/annotate/{pid}")
    assert f'action="/annotate/{pid}/rate"' in page.text and page.text.count('type="radio"') == 15
    assert all(f'value="{flag}"' in page.text for flag in tasks.RATE_FLAGS) and "t0 answer 0" in page.text
    _assert_csp_safe(page)
    data = _form(page.text)
    scores = {"helpful": "4", "honest": "5", "harmless": "2"}
    for bad in ({"helpful": "4", "honest": "5"}, {**scores, "harmless": "6"}, {**scores, "flags": ["rude"]}):
        assert client.post(f"/annotate/{pid}/rate", data={**data, **bad}).status_code == 400, bad
    response = client.post(f"/annotate/{pid}/rate", data={**data, **scores, "flags": ["off_topic", "unsafe", "unsafe"]})
    assert response.status_code == 303
    assert _label(app).answer == {"scores": {"helpful": 4, "honest": 5, "harmless": 2}, "flags": ["unsafe", "off_topic"]}
    skip = _form(client.get(f"/annotate/{pid}").text)
    assert client.post(f"/annotate/{pid}/skip", data={**skip, "reason": "not my language"}).status_code == 303
    assert "Nothing left for you" in client.get(f"/annotate/{pid}").text


def test_edit_page_normalises_newlines(app: FastAPI) -> None:
    add_user(app, "ann")
    rows = [{**task_row("e0", 1), "responses": [{"text": "\nFirst line\nsecond", "model": "sft"}]}, task_row("e1", 1)]
    pid = add_task_project(app, "e", "edit", ["ann"], rows)
    client = session_client(app, "ann")
    page = client.get(f"/annotate/{pid}")
    assert f'action="/annotate/{pid}/edit"' in page.text and "<textarea" in page.text
    assert 'id="edited" rows="14" required>\n\nFirst line' in page.text  # the parser drops one newline, not two
    _assert_csp_safe(page)
    data = _form(page.text)
    assert client.post(f"/annotate/{pid}/edit", data={**data, "edited": " \r\n "}).status_code == 400
    assert client.post(f"/annotate/{pid}/edit", data={**data, "edited": "\r\nFirst line\r\nsecond"}).status_code == 303
    assert _label(app).answer == {"edited": "\nFirst line\nsecond", "changed": False}  # as it was: needs no edit
    data = _form(client.get(f"/annotate/{pid}").text)
    assert client.post(f"/annotate/{pid}/edit", data={**data, "edited": "Better.\r\nMuch."}).status_code == 303
    assert _label(app).answer == {"edited": "Better.\nMuch.", "changed": True}


def test_w2_task_routes_refuse_other_peoples_assignments(app: FastAPI) -> None:
    for name in ("ann", "bob"):
        add_user(app, name)
    pid = add_task_project(app, "r", "rank", ["ann", "bob"], [task_row(f"r{i}", 2) for i in range(3)], k=2)
    private = add_task_project(app, "e", "edit", ["bob"], [task_row("e0", 1)])
    ann, bob = session_client(app, "ann"), session_client(app, "bob")
    bob_rank = _form(bob.get(f"/annotate/{pid}").text)["assignment_id"]
    bob_edit = _form(bob.get(f"/annotate/{private}").text)["assignment_id"]
    ann.get(f"/annotate/{pid}")
    before = table_snapshot(ctx(app).database)
    for url, data in ((f"/annotate/{pid}/rank", {"assignment_id": bob_rank, "ranking": "1,2"}),
                      (f"/annotate/{private}/edit", {"assignment_id": bob_edit, "edited": "x"}),
                      (f"/annotate/{pid}/edit", {"assignment_id": bob_edit, "edited": "x"})):
        response = ann.post(url, data={**data, "idempotency_key": "k"})
        assert response.status_code in (400, 404), (url, response.status_code)  # never stored
    assert ann.post(f"/annotate/{pid}/rank", data={"assignment_id": bob_rank, "ranking": "1,2",
                                                   "idempotency_key": "k2"}).status_code == 404
    assert table_snapshot(ctx(app).database) == before


def test_import_validates_each_task_and_gold(app: FastAPI) -> None:
    def error(task: str, row: dict) -> tuple[str, str | None]:
        with pytest.raises(DataError) as info:
            parse_items([(1, row)], "f.jsonl", task)
        return info.value.code, info.value.field

    assert error("rank", task_row("x", 1)) == ("D109", "responses")
    assert error("rank", task_row("x", 10)) == ("D109", "responses")
    assert error("rate", task_row("x", 2)) == ("D109", "responses")
    assert error("pairwise", {**task_row("x", 3)}) == ("D109", "responses")
    same = {**task_row("x", 3), "responses": [{"text": "t", "model": "a"}, {"text": "u", "model": "a"},
                                              {"text": "t", "model": "b"}]}
    assert error("rank", same) == ("D109", "responses[2].text")
    assert error("pairwise", task_row("x", 2, gold={"choice": "c"})) == ("D109", "gold.choice")
    assert error("pairwise", task_row("x", 2, gold="a")) == ("D103", "gold")
    assert error("rank", task_row("x", 3, gold={"ranking": [0, 1, 1]})) == ("D109", "gold.ranking")
    assert error("rate", task_row("x", 1, gold={"scores": {"funny": 3}})) == ("D109", "gold.scores")
    assert error("rate", task_row("x", 1, gold={"scores": {"honest": 0}})) == ("D109", "gold.scores.honest")
    assert error("edit", task_row("x", 1, gold={"edited": "y"})) == ("D109", "gold")
    [ok] = parse_items([(1, task_row("x", 1, gold={"scores": {"honest": 5}}, source="web"))], "f", "rate")
    assert ok.gold == {"scores": {"honest": 5}} and ok.meta == {"source": "web"} and ok.task == "rate"

    add_user(app, "boss", "admin")
    api = token_client(app, "boss")
    pid = api.post("/api/v1/projects", json={"name": "ranks", "task": "rank"}).json()["id"]
    assert api.post("/api/v1/projects", json={"name": "x", "task": "poll"}).status_code == 422
    assert api.post(f"/api/v1/projects/{pid}/items", json={"items": [item_row("p0")]}).json() == {"created": 1}
    bad = api.post(f"/api/v1/projects/{pid}/items", json={"items": [task_row("k0", 3), task_row("k1", 1)]})
    assert bad.status_code == 400 and bad.json()["line"] == 2 and count(app, Item) == 1
    upload = "\n".join(json.dumps(task_row(f"u{i}", 3, gold={"ranking": [1, 2, 0]})) for i in range(2)).encode()
    admin = session_client(app, "boss")
    assert admin.post(f"/admin/projects/{pid}/items", files={"file": ("u.jsonl", upload, "text/plain")}).status_code == 303
    with ctx(app).database.read() as db:
        golds = dict(db.execute(sa.select(Item.external_id, Item.gold)).all())
        project = services.admin_project(db, pid)
    assert golds == {"p0": None, "u0": {"ranking": [1, 2, 0]}, "u1": {"ranking": [1, 2, 0]}}
    with ctx(app).database.write() as db, pytest.raises(DataError, match="read for a pairwise project"):
        services.import_items(db, project, parse_items([(1, item_row("z"))], "f"), "f")
    assert admin.post("/admin/projects", data={"name": "bad", "task": "poll"}).status_code == 400
    created = admin.post("/admin/projects", data={"name": "rates", "task": "rate"})
    assert created.status_code == 303 and "<strong>rate</strong>" in admin.get(created.headers["location"]).text


def test_gold_items_go_to_every_member(app: FastAPI) -> None:
    names = ["a1", "a2", "a3"]
    for name in names:
        add_user(app, name)
    rows = [item_row("g0", gold={"choice": "a"}), item_row("n0"), item_row("n1"), item_row("n2")]
    with ctx(app).database.write() as db:
        project = services.create_project(db, "gold", "", 1)
        for name in names:
            services.add_member(db, project, name)
        services.import_items(db, project, parse_items(enumerate(rows, 1), "t"), "t")
        pid = project.id
    seen = {name: answer_all(app, pid, name, lambda item, order: ("a", "better")) for name in names}
    assert seen == {"a1": ["g0", "n0", "n1", "n2"], "a2": ["g0"], "a3": ["g0"]}  # gold to all, others to k = 1


def _rank_project(app: FastAPI) -> int:
    for name in ("x1", "x2", "x3"):
        add_user(app, name)
    pid = add_task_project(app, "r", "rank", ["x1", "x2", "x3"], [task_row("r0", 3)], k=3)
    wanted = {"x1": [0, 1, 2], "x2": [1, 0, 2], "x3": [0, 2, 1]}
    for name, ranking in wanted.items():
        answer_all(app, pid, name, lambda item, order, r=ranking: {"ranking": shown_numbers(r, order)})
    return pid


def _download(api, pid: int, kind: str, path: Path) -> list:
    response = api.get(f"/api/v1/projects/{pid}/export.jsonl", params={"kind": kind})
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    return load_records(path, exports.LOADS_AS[kind])


def test_rank_exports_load(app: FastAPI, tmp_path: Path) -> None:
    pid = _rank_project(app)
    add_user(app, "boss", "admin")
    api = token_client(app, "boss")
    [consensus] = _download(api, pid, "rankings", tmp_path / "r.jsonl")
    assert consensus.id == "r0" and consensus.responses == ["r0 answer 0", "r0 answer 1", "r0 answer 2"]
    assert consensus.meta["mean_ranks"] == pytest.approx([4 / 3, 2.0, 8 / 3])
    assert consensus.meta["agreement"] == pytest.approx(7 / 9) and consensus.meta["annotators"] == ["x1", "x2", "x3"]
    assert [m["name"] for m in consensus.meta["models"]] == ["model-0", "model-1", "model-2"]
    raw = {r.id: r for r in _download(api, pid, "annotator-rankings", tmp_path / "a.jsonl")}
    assert raw["r0:x3"].responses == ["r0 answer 0", "r0 answer 2", "r0 answer 1"]
    assert raw["r0:x2"].meta["annotator_id"] == "x2" and raw["r0:x2"].meta["prompt_id"] == "r0"
    pairs = _download(api, pid, "pairs", tmp_path / "p.jsonl")
    assert sorted(p.id for p in pairs) == ["r0:0>1", "r0:0>2", "r0:1>2"]
    assert len(_download(api, pid, "annotator-pairs", tmp_path / "ap.jsonl")) == 9
    assert api.get(f"/api/v1/projects/{pid}/export.jsonl").headers["content-disposition"].endswith('-rankings.jsonl"')
    assert api.get(f"/api/v1/projects/{pid}/labels").json()["kind"] == "annotator-rankings"
    wrong = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "votes"})
    assert wrong.status_code == 400 and "rankings" in wrong.json()["detail"]
    progress = api.get(f"/api/v1/projects/{pid}/progress").json()
    assert progress["task"] == "rank" and progress["votes"] == 3 and progress["items_complete"] == 1


def test_rate_and_edit_exports_load(app: FastAPI, tmp_path: Path) -> None:
    names = ("x1", "x2", "x3")
    for name in names:
        add_user(app, name)
    add_user(app, "boss", "admin")
    api = token_client(app, "boss")
    rate = add_task_project(app, "t", "rate", list(names), [task_row("t0", 1)], k=3)
    forms = {"x1": (4, 3, 5, ["unsafe"]), "x2": (5, 3, 4, ["unsafe", "off_topic"]), "x3": (2, 5, 4, [])}
    for name, (h, o, a, flags) in forms.items():
        answer_all(app, rate, name, lambda item, order, f=(h, o, a, flags): dict(
            zip(("helpful", "honest", "harmless", "flags"), f, strict=True)))
    [consensus] = _download(api, rate, "ratings", tmp_path / "c.jsonl")
    assert consensus.scores == {"helpful": 4.0, "honest": 3.0, "harmless": 4.0} and consensus.flags == ["unsafe"]
    assert consensus.meta["flag_counts"] == {"unsafe": 2, "made_up_facts": 0, "off_topic": 1}
    raw = {r.id: r for r in _download(api, rate, "annotator-ratings", tmp_path / "r.jsonl")}
    assert raw["t0:x2"].flags == ["unsafe", "off_topic"] and raw["t0:x3"].scores["helpful"] == 2.0

    edit = add_task_project(app, "e", "edit", list(names), [task_row("e0", 1)], k=3)
    texts = {"x1": "A much better answer.", "x2": "e0 answer 0", "x3": "Another rewrite."}
    for name, text in texts.items():
        answer_all(app, edit, name, lambda item, order, t=text: {"edited": t})
    edits = _download(api, edit, "edits", tmp_path / "e.jsonl")
    assert sorted(e.id for e in edits) == ["e0:x1", "e0:x3"] and edits[0].original == "e0 answer 0"
    report = api.get(f"/api/v1/projects/{edit}/labels").json()["report"]
    assert report["kept"] == 2 and report["dropped_identical"] == 1  # x2 left it as it was
    pairs = {p.id: p for p in _download(api, edit, "pairs", tmp_path / "p.jsonl")}
    assert pairs["e0:x1"].chosen == "A much better answer." and pairs["e0:x1"].rejected == "e0 answer 0"
    thumbs = {t.id: t.up for t in _download(api, edit, "thumbs", tmp_path / "t.jsonl")}
    assert thumbs == {"e0:x1": False, "e0:x2": True, "e0:x3": False}


def test_cli_task_project_import_export(db_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from feedback_helpers import SECRET

    from alignloop.cli import build_app_parser, main

    monkeypatch.setenv("ALIGNLOOP_APP_DATABASE_URL", db_url)
    monkeypatch.setenv("ALIGNLOOP_APP_SECRET_KEY", SECRET)
    parser = build_app_parser()
    for kind in exports.ALL_KINDS:  # the CLI offers every kind the app exports, and every task
        assert parser.parse_args(["export", "p", "--kind", kind, "--out", "o"]).kind == kind
    for task in TASKS:
        assert parser.parse_args(["project", "add", "p", "--task", task]).task == task
    assert main(["app", "project", "add", "ranked", "--task", "rank"]) == 0
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps(task_row("c0", 3)) + "\n")
    assert main(["app", "import", "ranked", str(items)]) == 0
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    assert main(["app", "export", "ranked", "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out) == {"out": str(out), "kind": "rankings", "kept": 0}
    assert out.read_text() == ""
    assert main(["app", "export", "ranked", "--kind", "votes", "--out", str(out)]) == 2
    assert "exports rankings" in capsys.readouterr().err


def test_task_constants_agree() -> None:
    """The page's flag keys, the schema's task list and the export table cover the same things."""
    assert tuple(v for v, _, _ in pages.FLAG_KEYS) == tasks.RATE_FLAGS
    assert tuple(exports.EXPORT_KINDS) == TASKS == tuple(tasks.RESPONSES) == tuple(tasks.ALPHA_LEVEL)
    assert typing.get_args(schemas.ProjectIn.model_fields["task"].annotation) == TASKS
    assert set(exports.ALL_KINDS) == set(exports.LOADS_AS)
    guide = (Path(__file__).resolve().parents[2] / "docs" / "feedback.md").read_text()
    documented = [f"`{x}`" for x in (*exports.ALL_KINDS, *tasks.RATE_AXES)] + [
        "/admin/projects/{id}/dashboard", "/api/v1/projects/{id}/quality", "--task", '"gold"']
    assert [x for x in documented if x not in guide] == [], "docs/feedback.md misses these"
