"""The chat task end to end: a project's model (set by an admin, key never shown), the chat page (drafts,
pick, regenerate, thumbs, multi-turn, finish, undo, skip, resend), conversations started by typing, every
failure of the model server as a clear 400/502 that writes nothing, and the exports (pairs, thumbs,
conversations) loading with `alignloop.data.load_records`. The model is a fake OpenAI-compatible server
answered in-process (no torch) on SQLite and PostgreSQL; one test, on SQLite, talks to the real
`alignloop serve` on loopback."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from feedback_helpers import (
    FAST_HASHING,
    PUBLIC_BASE,
    SECRET,
    FakeModel,
    add_chat_project,
    add_user,
    count,
    ctx,
    form_csrf,
    session_client,
    table_snapshot,
    token_client,
)

from alignloop.data import DataError, load_records
from alignloop.feedback import conversations, exports
from alignloop.feedback.app import create_app
from alignloop.feedback.db import (
    Assignment,
    ChatDraft,
    ChatEndpoint,
    ChatPick,
    ChatTurn,
    Item,
    Label,
    Project,
)
from alignloop.feedback.records import parse_items
from alignloop.feedback.settings import Settings, SettingsError

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]


def _hidden(html: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', html)
    assert found, f"no {name} field on the page"
    return found.group(1)


def _key(html: str, action: str) -> str:
    """The page's idempotency key as the form for `action` would send it (also when that form is not shown)."""
    found = re.search(r'name="idempotency_key" value="(?:send|regen|pick|finish|skip)-([^"]+)"', html)
    assert found, "no idempotency key on the page"
    return f"{action}-{found.group(1)}"


def _draft_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'name="draft_id" value="(\d+)"', html)]


def _data(app: FastAPI) -> dict[str, Any]:
    """Every row but logins and tokens (made by the clients themselves)."""
    return {k: v for k, v in table_snapshot(ctx(app).database).items() if k not in ("auth_sessions", "api_tokens")}


def _assert_csp_safe(response: httpx.Response) -> None:
    nonce = re.search(r"'nonce-([^']+)'", response.headers["content-security-policy"]).group(1)
    scripts = re.findall(r"<script([^>]*)>", response.text)
    assert scripts and all(f'nonce="{nonce}"' in s for s in scripts), scripts
    assert not re.search(r"\son[a-z]+\s*=", response.text, re.I) and "javascript:" not in response.text


class Chat:
    """An annotator on a chat project's page: each action posts the page's own form fields."""

    def __init__(self, client: TestClient, pid: int) -> None:
        self.client, self.pid = client, pid
        self.page = client.get(f"/annotate/{pid}").text

    def reload(self) -> str:
        self.page = self.client.get(f"/annotate/{self.pid}").text
        return self.page

    def post(self, action: str, **data: Any) -> httpx.Response:
        data.setdefault("csrf_token", form_csrf(self.page))
        response = self.client.post(f"/annotate/{self.pid}/{action}", data=data)
        if response.status_code == 303:
            self.reload()
        return response

    @property
    def assignment(self) -> str:
        return _hidden(self.page, "assignment_id")

    def send(self, message: str | None = None, **extra: Any) -> httpx.Response:
        data = {"idempotency_key": _key(self.page, "send"), **extra}
        if 'name="assignment_id"' in self.page:
            data["assignment_id"] = self.assignment
        if message is not None:
            data["message"] = message
        return self.post("chat/send", **data)

    def regenerate(self) -> httpx.Response:
        return self.post("chat/regenerate", assignment_id=self.assignment,
                         idempotency_key=_key(self.page, "regen"))

    def pick(self, shown: int) -> httpx.Response:
        return self.post("chat/pick", assignment_id=self.assignment, draft_id=_draft_ids(self.page)[shown - 1],
                         idempotency_key=_key(self.page, "pick"), time_spent_ms=1500)

    def thumb(self, up: bool) -> httpx.Response:
        return self.post("chat/thumb", assignment_id=self.assignment, thumb="up" if up else "down")

    def finish(self) -> httpx.Response:
        return self.post("chat/finish", assignment_id=self.assignment,
                         idempotency_key=_key(self.page, "finish"), time_spent_ms=500)


def _fake(app: FastAPI, **kwargs: Any) -> FakeModel:
    fake = FakeModel(**kwargs)
    ctx(app).model_transport = fake.transport
    return fake


def _two_turn_conversation(app: FastAPI, fake: FakeModel) -> Chat:
    """ann: asks on prompt c0, regenerates, picks the 2nd new draft, thumb down; says more, picks the 1st, thumb up; finishes."""
    me = Chat(session_client(app, "ann"), app.state.pid)
    assert me.send().status_code == 303 and me.regenerate().status_code == 303
    assert me.pick(2).status_code == 303 and me.thumb(False).status_code == 303
    assert me.send("And of Italy?").status_code == 303
    assert me.pick(1).status_code == 303 and me.thumb(True).status_code == 303
    assert me.finish().status_code == 303
    assert len(fake.calls) == 3
    return me


@pytest.fixture
def chat_app(app: FastAPI) -> FastAPI:
    """ann and bob in a chat project with two imported prompts (k = 1), the fake model behind it."""
    add_user(app, "ann")
    add_user(app, "bob")
    add_user(app, "boss", "admin")
    app.state.pid = add_chat_project(app, "c", ["ann", "bob"], [{"id": "c0", "prompt": PROMPT}, {"id": "c1", "prompt": "Hi?"}],
                                     api_key="sk-secret-777")
    return app


# ---------------------------------------------------------------------------------------------------------
# The page and its actions


def test_a_conversation_drafts_regenerate_pick_thumbs_and_next_turn(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app)
    me = Chat(session_client(app, "ann"), pid)
    first = me.client.get(f"/annotate/{pid}")
    _assert_csp_safe(first)
    assert 'id="ask"' in first.text and "What is the capital of France?" in first.text and "alignloopTask" in first.text
    assert "policy" not in first.text and "sk-secret" not in first.text  # no model name, never the key

    assert me.send().status_code == 303
    call = fake.calls[0]
    assert call["body"] == {"model": "policy", "messages": PROMPT, "n": 2, "temperature": 0.7, "max_tokens": 64}
    assert call["authorization"] == "Bearer sk-secret-777" and call["url"] == "http://8.8.8.8/v1/chat/completions"
    assert "reply 1.0" in me.page and "reply 1.1" in me.page and 'id="pick-2"' in me.page and 'id="regenerate"' in me.page
    _assert_csp_safe(me.client.get(f"/annotate/{pid}"))

    assert me.regenerate().status_code == 303
    assert fake.calls[1]["body"]["messages"] == PROMPT
    assert "2 earlier drafts" in me.page and "reply 2.1" in me.page and 'id="thumb-up"' not in me.page
    assert me.send("too early").status_code == 409  # drafts are waiting to be picked
    assert me.pick(2).status_code == 303
    assert 'id="thumb-up"' in me.page and 'id="chat-message"' in me.page and 'id="finish"' in me.page
    assert me.thumb(False).status_code == 303 and "(thumb down)" in me.page
    assert me.send("").status_code == 400  # a blank message is not sent
    assert me.send("And of Italy?").status_code == 303
    assert fake.calls[2]["body"]["messages"] == [*PROMPT, {"role": "assistant", "content": "reply 2.1"},
                                                 {"role": "user", "content": "And of Italy?"}]
    assert me.pick(1).status_code == 303 and me.thumb(True).status_code == 303

    with ctx(app).database.read() as db:
        drafts = db.execute(sa.select(ChatDraft).order_by(ChatDraft.id)).scalars().all()
        picks = db.execute(sa.select(ChatPick).order_by(ChatPick.id)).scalars().all()
    assert [(d.round, d.position, d.text) for d in drafts[:4]] == [(0, 0, "reply 1.0"), (0, 1, "reply 1.1"),
                                                                  (1, 0, "reply 2.0"), (1, 1, "reply 2.1")]
    assert {(d.model_name, d.model_version, d.finish_reason) for d in drafts} == {("policy", "fp-1", "stop")}
    assert [(p.draft_id, p.thumb, p.time_spent_ms) for p in picks] == [(drafts[3].id, False, 1500), (drafts[4].id, True, 1500)]

    assert me.finish().status_code == 303
    with ctx(app).database.read() as db:
        label = db.execute(sa.select(Label)).scalar_one()
    assert label.answer == {"turns": 2} and label.time_spent_ms == 3500  # both picks' time and the last page's
    assert "Hi?" in me.page and 'id="ask"' in me.page and "labelled 1" in me.page  # the next prompt


def test_resends_store_once_and_do_not_ask_again(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app)
    me = Chat(session_client(app, "ann"), pid)
    page = me.page
    for _ in range(2):
        me.page = page
        assert me.send().status_code == 303
    assert len(fake.calls) == 1 and count(app, ChatTurn) == 1 and count(app, ChatDraft) == 2
    page = me.page
    for _ in range(2):
        me.page = page
        assert me.pick(1).status_code == 303
    assert count(app, ChatPick) == 1
    me.page = page
    assert me.regenerate().status_code == 409  # that page's drafts are picked already: nothing to regenerate
    assert len(fake.calls) == 1


def test_undo_withdraws_the_last_pick_then_reopens_a_finished_conversation(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    _fake(app)
    me = Chat(session_client(app, "ann"), pid)
    me.send()
    me.pick(1)
    me.send("More?")
    assert _draft_ids(me.page) and "More?" in me.page
    assert me.post("undo").status_code == 303  # the pick of turn 0, and turn 1 asked after it
    assert "More?" not in me.page and len(_draft_ids(me.page)) == 2 and "reply 1.0" in me.page
    with ctx(app).database.read() as db:
        assert db.execute(sa.select(sa.func.count()).where(ChatPick.undone_at.is_not(None))).scalar_one() == 1
        assert db.execute(sa.select(sa.func.count()).where(ChatTurn.undone_at.is_not(None))).scalar_one() == 1
    me.pick(2)
    me.finish()
    assert "Hi?" in me.page
    assert me.post("undo").status_code == 303  # nothing picked in the new one: the finished one reopens
    assert "reply 1.1" in me.page and 'id="finish"' in me.page
    with ctx(app).database.read() as db:
        assert db.execute(sa.select(Label.undone_at)).scalar_one() is not None
        assert db.execute(sa.select(Assignment.status).where(Assignment.id == int(me.assignment))).scalar_one() == "open"
    me.send("Thanks!")
    me.pick(1)
    assert me.finish().status_code == 303
    with ctx(app).database.read() as db:
        assert db.execute(sa.select(Label.answer).where(Label.undone_at.is_(None))).scalar_one() == {"turns": 2}


def test_conversations_started_by_typing_are_the_annotators_own(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app, version=None)
    ann, bob = Chat(session_client(app, "ann"), pid), Chat(session_client(app, "bob"), pid)
    for who in (ann, bob):  # the two imported prompts (k = 1), one each
        who.send()
        who.pick(1)
        who.finish()
    assert "No prompts are waiting" in ann.page and 'autofocus' in ann.page and 'name="assignment_id"' not in ann.page
    assert ann.send("   ").status_code == 400
    assert ann.send("Write me a haiku.").status_code == 303
    assert fake.calls[-1]["body"]["messages"] == [{"role": "user", "content": "Write me a haiku."}]
    assert "Write me a haiku." in ann.page and len(_draft_ids(ann.page)) == 2
    page = ann.page
    assert ann.send("A second one at once?").status_code == 409  # drafts wait to be picked
    ann.page = re.sub(r'<input type="hidden" name="assignment_id"[^>]*>', "", page)
    assert ann.send("A second one at once?").status_code == 409  # finish or skip the open one first
    assert "No prompts are waiting" in bob.reload()  # never handed to anyone else
    with ctx(app).database.read() as db:
        item = db.execute(sa.select(Item).where(Item.owner_id.is_not(None))).scalar_one()
        versions = set(db.execute(sa.select(ChatDraft.model_version)).scalars())
    assert item.external_id.startswith("chat-") and item.meta == {"started_by": "ann"} and versions == {None}
    ann.page = page
    ann.pick(1)
    skip = {"assignment_id": ann.assignment, "reason": "done enough", "idempotency_key": "s1", "time_spent_ms": 10}
    assert ann.post("skip", **skip).status_code == 303 and "No prompts are waiting" in ann.page


@pytest.mark.parametrize("case", ["loopback", "down", "timeout", "server_error", "not_set"])
def test_model_failures_are_clear_never_500_and_write_nothing(app: FastAPI, case: str) -> None:
    add_user(app, "ann")
    add_user(app, "boss", "admin")
    base = "http://127.0.0.1:9/v1" if case == "loopback" else PUBLIC_BASE

    def fail(request: httpx.Request) -> httpx.Response:
        if case == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if case == "timeout":
            raise httpx.ReadTimeout("timed out", request=request)
        return httpx.Response(500, json={"error": {"message": "CUDA out of memory"}})

    fake = _fake(app, fail=fail)
    pid = add_chat_project(app, "c", ["ann"], [{"id": "c0", "prompt": "Hi?"}], base_url=base)
    if case == "not_set":
        with ctx(app).database.write() as db:
            db.execute(sa.text("DELETE FROM chat_endpoints"))
    me = Chat(session_client(app, "ann"), pid)
    before = _data(app)
    response = me.send()
    status, words = {"loopback": (400, "ALIGNLOOP_APP_MODEL_HOSTS"), "down": (502, "cannot connect"),
                     "timeout": (502, "did not answer within"), "server_error": (502, "CUDA out of memory"),
                     "not_set": (400, "no model yet")}[case]
    assert response.status_code == status and words in response.text and 'role="alert"' in response.text
    assert 'id="ask"' in response.text  # the page again, ready to retry
    assert _data(app) == before
    assert len(fake.calls) == (0 if case in ("loopback", "not_set") else 1)  # refused: nothing was sent

    api = token_client(app, "boss")
    tried = api.post(f"/api/v1/projects/{pid}/model/test", json={})
    assert tried.status_code == status and words in tried.json()["detail"]
    admin = session_client(app, "boss")
    page = admin.post(f"/admin/projects/{pid}/model/test")
    assert page.status_code == status and words in page.text
    assert _data(app) == before


def test_loopback_works_once_the_operator_allows_it(settings: Settings) -> None:
    app = create_app(dataclasses.replace(settings, model_hosts=("127.0.0.1",)))
    try:
        fake = _fake(app)
        add_user(app, "ann")
        pid = add_chat_project(app, "c", ["ann"], [{"id": "c0", "prompt": "Hi?"}], base_url="http://127.0.0.1:9/v1")
        me = Chat(session_client(app, "ann"), pid)
        assert me.send().status_code == 303 and len(_draft_ids(me.page)) == 2
        assert fake.calls[0]["url"] == "http://127.0.0.1:9/v1/chat/completions"
    finally:
        ctx(app).database.dispose()


def test_w2_chat_routes_refuse_other_peoples_conversations(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app)
    ann, bob = Chat(session_client(app, "ann"), pid), Chat(session_client(app, "bob"), pid)
    bob.send()
    ann.send()
    bobs, bobs_draft = bob.assignment, _draft_ids(bob.page)[0]
    calls, before = len(fake.calls), _data(app)
    attempts = [("chat/pick", {"assignment_id": bobs, "draft_id": bobs_draft, "idempotency_key": "x1"}),
                ("chat/pick", {"assignment_id": ann.assignment, "draft_id": bobs_draft, "idempotency_key": "x2"}),
                ("chat/regenerate", {"assignment_id": bobs, "idempotency_key": "x3"}),
                ("chat/send", {"assignment_id": bobs, "message": "hi", "idempotency_key": "x4"}),
                ("chat/thumb", {"assignment_id": bobs, "thumb": "up"}),
                ("chat/finish", {"assignment_id": bobs, "idempotency_key": "x5"})]
    for action, data in attempts:
        assert ann.post(action, **data).status_code == 404, action
    assert _data(app) == before and len(fake.calls) == calls


# ---------------------------------------------------------------------------------------------------------
# The model's settings


def test_the_key_is_stored_sealed_and_another_secret_must_set_it_again(chat_app: FastAPI) -> None:
    """The database holds the API key only sealed under the app secret (on SQLite, not even the file's bytes
    show it). A server started with another secret cannot open it: chatting says so (400, nothing sent to the
    model), the project page still says a key is set, and setting the key again makes the chat work."""
    app, pid = chat_app, chat_app.state.pid
    with ctx(app).database.read() as db:
        stored = db.execute(sa.select(ChatEndpoint.api_key).where(ChatEndpoint.project_id == pid)).scalar_one()
    assert stored.startswith("sealed:v1:") and "sk-secret" not in stored
    url = ctx(app).database.engine.url
    if url.get_backend_name() == "sqlite":
        with ctx(app).database.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        raw = b"".join(Path(f"{url.database}{tail}").read_bytes() for tail in ("", "-wal")
                       if Path(f"{url.database}{tail}").exists())
        assert b"sk-secret" not in raw and stored.encode() in raw

    other = create_app(dataclasses.replace(ctx(app).settings, secret_key="another-secret-" + "y" * 30),
                       database=ctx(app).database)
    fake = _fake(other)
    me = Chat(session_client(other, "ann"), pid)
    refused = me.send()
    assert refused.status_code == 400 and "cannot be opened with this app secret" in refused.text
    assert fake.calls == []
    admin = session_client(other, "boss")
    assert "API key set" in admin.get(f"/admin/projects/{pid}").text
    api = token_client(other, "boss")
    body = {"base_url": PUBLIC_BASE, "model": "policy", "api_key": "sk-rotated-9"}
    assert api.put(f"/api/v1/projects/{pid}/model", json=body).json()["api_key_set"] is True
    assert me.send().status_code == 303 and fake.calls[-1]["authorization"] == "Bearer sk-rotated-9"


def test_keys_stored_in_clear_before_sealing_are_used_and_sealed(chat_app: FastAPI) -> None:
    """A key stored in clear by an earlier version still reaches the model, and `seal_stored_keys` (run when the
    server starts) seals it in place."""
    app, pid = chat_app, chat_app.state.pid
    with ctx(app).database.write() as db:
        db.execute(sa.update(ChatEndpoint).where(ChatEndpoint.project_id == pid).values(api_key="sk-legacy-1"))
    fake = _fake(app)
    me = Chat(session_client(app, "ann"), pid)
    assert me.send().status_code == 303 and fake.calls[-1]["authorization"] == "Bearer sk-legacy-1"
    with ctx(app).database.write() as db:
        assert conversations.seal_stored_keys(db, ctx(app).secret) == 1
        assert conversations.seal_stored_keys(db, ctx(app).secret) == 0
    with ctx(app).database.read() as db:
        stored = db.execute(sa.select(ChatEndpoint.api_key).where(ChatEndpoint.project_id == pid)).scalar_one()
        assert stored.startswith("sealed:v1:") and "sk-legacy" not in stored
        assert conversations.endpoint(db, db.get(Project, pid), ctx(app).secret).api_key == "sk-legacy-1"


def test_model_settings_keep_the_key_secret(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    api, admin = token_client(app, "boss"), session_client(app, "boss")
    got = api.get(f"/api/v1/projects/{pid}/model").json()
    assert got["api_key_set"] is True and "api_key" not in got and "sk-secret" not in str(got)
    page = admin.get(f"/admin/projects/{pid}").text
    assert "sk-secret" not in page and "API key set" in page and 'id="chat-model"' in page
    body = {"base_url": "https://models.example.org/v1", "model": "sft-round2", "n_drafts": 3, "temperature": 0.2}
    assert api.put(f"/api/v1/projects/{pid}/model", json=body).json()["api_key_set"] is True  # left out: kept
    with ctx(app).database.read() as db:
        assert conversations.endpoint(db, db.get(Project, pid), ctx(app).secret).api_key == "sk-secret-777"
    assert api.put(f"/api/v1/projects/{pid}/model", json={**body, "api_key": None}).json()["api_key_set"] is False
    form = {"base_url": "http://gpu-box:8001/v1", "model": "m", "n_drafts": "4", "api_key": "sk-new-1",
            "temperature": "", "top_p": "0.9", "max_tokens": "32", "timeout_s": "30"}
    assert admin.post(f"/admin/projects/{pid}/model", data=form).status_code == 303
    assert api.get(f"/api/v1/projects/{pid}/model").json() == {
        "base_url": "http://gpu-box:8001/v1", "model": "m", "api_key_set": True, "n_drafts": 4, "temperature": None,
        "top_p": 0.9, "max_tokens": 32, "timeout_s": 30.0}
    assert admin.post(f"/admin/projects/{pid}/model", data={**form, "api_key": ""}).status_code == 303
    assert api.get(f"/api/v1/projects/{pid}/model").json()["api_key_set"] is True  # blank field: kept
    assert admin.post(f"/admin/projects/{pid}/model", data={**form, "api_key": "", "clear_api_key": "true"}).status_code == 303
    assert api.get(f"/api/v1/projects/{pid}/model").json()["api_key_set"] is False
    before = _data(app)
    for bad in ({"base_url": "ftp://x/v1"}, {"base_url": "http://u:p@x/v1"}, {"base_url": "not a url"},
                {"n_drafts": "10"}, {"temperature": "hot"}, {"top_p": "0"}, {"max_tokens": "1.5"}):
        assert admin.post(f"/admin/projects/{pid}/model", data={**form, **bad}).status_code == 400, bad
    for bad in ({"n_drafts": 0}, {"temperature": 3}, {"base_url": ""}, {"extra": 1}):
        assert api.put(f"/api/v1/projects/{pid}/model", json={**body, **bad}).status_code == 422, bad
    assert api.put(f"/api/v1/projects/{pid}/model", json={**body, "base_url": "gopher://x"}).status_code == 400
    assert _data(app) == before
    pairwise = api.post("/api/v1/projects", json={"name": "p"}).json()["id"]
    assert api.put(f"/api/v1/projects/{pairwise}/model", json=body).status_code == 400
    assert api.get(f"/api/v1/projects/{pairwise}/model").status_code == 400
    schema = api.get("/api/v1/openapi.json").json()
    assert {"/api/v1/projects/{project_id}/model", "/api/v1/projects/{project_id}/model/test"} <= set(schema["paths"])


def test_testing_the_model_reports_name_and_version(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app, version="abc123def456")
    out = token_client(app, "boss").post(f"/api/v1/projects/{pid}/model/test", json={"message": "ping"}).json()
    assert (out["text"], out["model"], out["version"]) == ("reply 1.0", "policy", "abc123def456")
    assert fake.calls[0]["body"]["n"] == 1 and fake.calls[0]["body"]["messages"] == [{"role": "user", "content": "ping"}]
    page = session_client(app, "boss").post(f"/admin/projects/{pid}/model/test")
    assert page.status_code == 200 and "abc123def456" in page.text and "sk-secret" not in page.text


def test_settings_read_the_model_hosts() -> None:
    env = {"ALIGNLOOP_APP_MODEL_HOSTS": "localhost, 10.0.0.0/8,vllm.internal", "ALIGNLOOP_APP_SECRET_KEY": SECRET}
    settings = Settings.from_env(env)
    assert settings.model_hosts == ("localhost", "10.0.0.0/8", "vllm.internal")
    Settings(secret_key=SECRET, model_hosts=settings.model_hosts).validate()
    assert Settings.from_env({}).model_hosts == ()
    with pytest.raises(SettingsError, match="ALIGNLOOP_APP_MODEL_HOSTS"):
        Settings.from_env({**env, "ALIGNLOOP_APP_MODEL_HOSTS": "http://gpu-box:8001"}).validate()


def test_chat_items_hold_a_prompt_only() -> None:
    [item] = parse_items([(1, {"id": "c0", "prompt": PROMPT, "source": "hh"})], "f", "chat")
    assert item.responses == [] and item.prompt == PROMPT and item.meta == {"source": "hh"}
    assert parse_items([(1, {"id": "c0", "prompt": "Hi", "responses": []})], "f", "chat")[0].responses == []
    for bad, fld in (({"responses": [{"text": "t", "model": "m"}]}, "responses"), ({"gold": {"choice": "a"}}, "gold"),
                     ({"prompt": [{"role": "assistant", "content": "x"}]}, "prompt[0].role")):
        with pytest.raises(DataError) as info:
            parse_items([(1, {"id": "c0", "prompt": "Hi", **bad})], "f", "chat")
        assert info.value.field == fld


# ---------------------------------------------------------------------------------------------------------
# Exports


def test_exports_load_as_training_records(chat_app: FastAPI, tmp_path: Path) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app)
    _two_turn_conversation(app, fake)
    api = token_client(app, "boss")

    def download(kind: str) -> list[Any]:
        response = api.get(f"/api/v1/projects/{pid}/export.jsonl", params={"kind": kind})
        assert response.status_code == 200, response.text
        path = tmp_path / f"{kind}.jsonl"
        path.write_bytes(response.content)
        return load_records(path, exports.LOADS_AS[kind])

    pairs = {p.id: p for p in download("pairs")}
    assert sorted(pairs) == ["c0:ann:0:0.0", "c0:ann:0:0.1", "c0:ann:0:1.0", "c0:ann:1:0.1"]
    first, later = pairs["c0:ann:0:0.0"], pairs["c0:ann:1:0.1"]
    assert (first.prompt, first.chosen, first.rejected) == (PROMPT, "reply 2.1", "reply 1.0")
    assert later.prompt == [*PROMPT, {"role": "assistant", "content": "reply 2.1"}, {"role": "user", "content": "And of Italy?"}]
    assert (later.chosen, later.rejected) == ("reply 3.0", "reply 3.1")
    assert first.meta["chosen_model"] == first.meta["rejected_model"] == {"name": "policy", "version": "fp-1"}
    assert first.meta["chosen_draft"] == [1, 1] and first.meta["rejected_draft"] == [0, 0] and first.meta["rounds"] == 2
    assert first.meta["annotator_id"] == "ann" and first.meta["prompt_id"] == "c0" and first.meta["turn"] == 0
    thumbs = {t.id: t for t in download("thumbs")}
    assert {k: (t.response, t.up) for k, t in thumbs.items()} == {"c0:ann:0": ("reply 2.1", False),
                                                                   "c0:ann:1": ("reply 3.0", True)}
    [conv] = download("conversations")
    assert conv.id == "c0:ann" and conv.messages[-1] == {"role": "assistant", "content": "reply 3.0"}
    assert len(conv.messages) == 5 and conv.meta["finished"] is True
    assert [len(t["drafts"]) for t in conv.meta["turns"]] == [4, 2] and conv.meta["turns"][1]["user"] == "And of Italy?"
    assert conv.meta["turns"][0]["drafts"][0]["model"] == {"name": "policy", "version": "fp-1"}
    labels = api.get(f"/api/v1/projects/{pid}/labels").json()
    assert labels["kind"] == "conversations" and len(labels["records"]) == 1
    assert api.get(f"/api/v1/projects/{pid}/export.jsonl").headers["content-disposition"].endswith('-pairs.jsonl"')
    assert api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "votes"}).status_code == 400
    for path in (f"/api/v1/projects/{pid}/progress", f"/api/v1/projects/{pid}/quality"):
        assert api.get(path).status_code == 200
    admin = session_client(app, "boss")
    assert admin.get(f"/admin/projects/{pid}/dashboard").status_code == 200
    project_page = " ".join(admin.get(f"/admin/projects/{pid}").text.split())
    assert "1 conversations, 2 picked turns from 6 drafts; thumbs 1 up, 1 down" in project_page


def test_identical_drafts_give_no_pair_and_open_turns_no_record(chat_app: FastAPI) -> None:
    app, pid = chat_app, chat_app.state.pid
    fake = _fake(app, same_text=True)
    me = Chat(session_client(app, "ann"), pid)
    me.send()
    me.pick(1)
    me.send("Again?")  # drafts waiting: not a judgement yet
    api = token_client(app, "boss")
    out = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "pairs"}).json()
    assert out["records"] == [] and out["report"]["dropped_identical"] == 1
    [conv] = api.get(f"/api/v1/projects/{pid}/labels").json()["records"]
    assert len(conv["messages"]) == 3 and conv["meta"]["finished"] is False and len(fake.calls) == 2


# ---------------------------------------------------------------------------------------------------------
# The real model server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`alignloop serve` on a tiny Llama, as a separate process on a free loopback port: (base URL, version)."""
    pytest.importorskip("torch")
    from alignloop import serve
    from alignloop.config import TinyModelConfig
    from alignloop.models import save_pretrained, tiny_model, train_tokenizer

    words = "the quick brown fox jumps over a lazy dog while seven red birds sing".split()
    tokenizer = train_tokenizer([" ".join(words[(i * k) % len(words)] for k in range(1, 4 + i % 7)) for i in range(200)],
                                vocab_size=280)
    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False)
    folder = save_pretrained(tiny_model(cfg, tokenizer, seed=1), tokenizer, tmp_path_factory.mktemp("chat") / "final")
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(serve.API_KEY_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "alignloop.cli", "serve", str(folder), "--port", str(port),
                             "--model-name", "tiny", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "alignloop serve did not start"
            time.sleep(0.3)
        yield base, serve.weights_version(folder)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_chat_turn_with_the_real_alignloop_serve(served_model: tuple[str, str], sqlite_template: Path,
                                                   tmp_path: Path) -> None:
    import shutil

    base, version = served_model
    path = tmp_path / "feedback.db"
    shutil.copyfile(sqlite_template, path)
    settings = Settings(database_url=f"sqlite:///{path}", secret_key=SECRET, cookie_secure=False,
                        model_hosts=("127.0.0.1",), **FAST_HASHING)
    app = create_app(settings)
    try:
        add_user(app, "ann")
        add_user(app, "boss", "admin")
        pid = add_chat_project(app, "c", ["ann"], base_url=base)
        api = token_client(app, "boss")
        model = {"base_url": base, "model": "tiny", "n_drafts": 2, "temperature": 1.0, "max_tokens": 12, "timeout_s": 120}
        assert api.put(f"/api/v1/projects/{pid}/model", json=model).status_code == 200
        me = Chat(session_client(app, "ann"), pid)
        assert me.send("the quick brown fox").status_code == 303, me.page
        assert len(_draft_ids(me.page)) == 2
        assert me.pick(1).status_code == 303 and me.thumb(True).status_code == 303
        assert me.send("jumps over").status_code == 303 and me.pick(2).status_code == 303
        with ctx(app).database.read() as db:
            tags = set(db.execute(sa.select(ChatDraft.model_name, ChatDraft.model_version)).all())
        assert tags == {("tiny", version)} and len(version) == 12
        records = api.get(f"/api/v1/projects/{pid}/labels", params={"kind": "thumbs"}).json()["records"]
        assert len(records) == 1 and records[0]["meta"]["chosen_model"] == {"name": "tiny", "version": version}
    finally:
        ctx(app).database.dispose()
