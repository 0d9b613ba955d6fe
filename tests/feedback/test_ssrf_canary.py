"""W8: server-side request forgery through a chat project's model URL, against a real canary.

The canary is an HTTP server listening on every address of this machine (IPv4 and IPv6; a random port)
that counts each connection made to it. A matrix of URLs that all lead to it (loopback in every spelling,
the unspecified address, IPv4-mapped IPv6, a trailing dot, a name resolving to loopback, credentials in
the URL) and to other non-public addresses (cloud metadata, private ranges) goes through every way the
app reaches a model: the API (`PUT .../model`, `POST .../model/test`), the admin's forms (set, test) and
an annotator's chat message. Each must be refused and the canary must see 0 connections. A redirect from
an allow-listed server to the canary is not followed; a DNS answer that changes after the check
(rebinding) cannot move the connection. The control: once loopback is allow-listed
(`ALIGNLOOP_APP_MODEL_HOSTS`), the same requests do reach the canary, so a leak would be seen.

The app's model transport here (`Guard`) sends requests for loopback out for real, answers for the
stand-in public address in-process, and refuses any other address, recording every request: nothing
leaves this machine whatever the app does. Names are resolved by a fake resolver for `*.test` and by the
system for the rest.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from feedback_helpers import (
    PUBLIC_BASE,
    add_chat_project,
    add_user,
    ctx,
    session_client,
    table_snapshot,
    token_client,
)

from alignloop.feedback.app import create_app
from alignloop.feedback.chat import ENV_MODEL_HOSTS
from alignloop.feedback.db import ChatDraft
from alignloop.feedback.settings import Settings

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
"""The requests out do not depend on the database: these run on SQLite only."""
STAND_IN = "8.8.8.8"
"""A public address: allowed without the allow-list; the Guard answers for it, nothing is sent there."""
REDIRECTOR = "redirector.test"
"""The one allow-listed name (resolving to loopback): the redirecting server's."""


# ---------------------------------------------------------------------------------------------------------
# The canary, the redirector, the resolver and the transport


class Listener(ThreadingHTTPServer):
    """An HTTP server on every address of this machine that counts connections. It answers a chat
    completion ("canary" drafts) or, with `redirect`, 302 to that URL."""

    daemon_threads = True
    address_family = socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET

    def __init__(self, redirect: str | None = None) -> None:
        self.redirect, self.connections, self.lock = redirect, 0, threading.Lock()
        super().__init__(("::" if self.address_family == socket.AF_INET6 else "0.0.0.0", 0), _Answer)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:  # one socket for IPv4 (mapped) and IPv6
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self.lock:
            self.connections += 1
        return True

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Answer(BaseHTTPRequestHandler):
    server: Listener

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
        if self.server.redirect:
            self.send_response(302)
            self.send_header("Location", self.server.redirect)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        choices = [{"index": i, "message": {"role": "assistant", "content": f"canary {i}"}, "finish_reason": "stop"}
                   for i in range(int(body.get("n", 1)))]
        out = json.dumps({"model": "canary", "system_fingerprint": "canary-1", "choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


def _listening(redirect: str | None = None) -> Iterator[Listener]:
    server = Listener(redirect)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def canary() -> Iterator[Listener]:
    yield from _listening()


@pytest.fixture(scope="module")
def redirector(canary: Listener) -> Iterator[Listener]:
    yield from _listening(redirect=f"http://127.0.0.1:{canary.port}/v1/chat/completions")


class Resolver:
    """socket.getaddrinfo with fake `*.test` names: each maps to a list of answers, one per lookup
    (the last repeats); every lookup of a fake name is counted."""

    def __init__(self, real: Callable[..., Any], names: dict[str, list[list[str]]]) -> None:
        self.real, self.names, self.lookups = real, names, dict.fromkeys(names, 0)

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else str(host)
        name = name.lower().rstrip(".")
        if name not in self.names:
            return self.real(host, port, *args, **kwargs)  # type: ignore[no-any-return]
        answers = self.names[name][min(self.lookups[name], len(self.names[name]) - 1)]
        self.lookups[name] += 1
        return [info for address in answers for info in self.real(address, port, *args, **kwargs)]


class Guard(httpx.BaseTransport):
    """The app's model transport in these tests: loopback goes out for real (the canary counts it), the
    stand-in public address is answered here, any other address is refused; every request is recorded."""

    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()
        self.sent: list[tuple[str, str]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        self.sent.append((host, request.headers.get("host", "")))
        if host == STAND_IN:
            n = json.loads(request.content)["n"]
            return httpx.Response(200, json={"model": "stand-in", "choices": [
                {"index": i, "message": {"content": f"stand-in {i}"}, "finish_reason": "stop"} for i in range(n)]})
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None  # a name: out for real (its resolution goes through the Resolver)
        if address is not None and not (address.is_loopback or address.is_unspecified or (
                isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
                and address.ipv4_mapped.is_loopback)):
            raise httpx.ConnectError(f"the test refuses to connect to {host}", request=request)
        return self.real.handle_request(request)


# ---------------------------------------------------------------------------------------------------------
# The app, with a chat project and its admin and annotator


@dataclass
class W8:
    app: FastAPI
    pid: int
    api: TestClient
    admin: TestClient
    annotator: TestClient
    guard: Guard
    resolver: Resolver

    def set_by_api(self, url: str) -> httpx.Response:
        return self.api.put(f"/api/v1/projects/{self.pid}/model", json={"base_url": url, "model": "m", "n_drafts": 2})

    def set_by_form(self, url: str) -> httpx.Response:
        return self.admin.post(f"/admin/projects/{self.pid}/model", data={
            "base_url": url, "model": "m", "n_drafts": "2", "api_key": "", "temperature": "", "top_p": "",
            "max_tokens": "", "timeout_s": "5"})

    def calls(self) -> dict[str, httpx.Response]:
        """Every way the app asks the model, with the URL now stored."""
        return {"api test": self.api.post(f"/api/v1/projects/{self.pid}/model/test", json={}),
                "form test": self.admin.post(f"/admin/projects/{self.pid}/model/test"),
                "chat send": self.annotator.post(f"/annotate/{self.pid}/chat/send",
                                                 data={"message": "Hello?", "idempotency_key": "w8-send"})}


def _data(app: FastAPI) -> dict[str, Any]:
    """Every row but logins, tokens and the model's settings (which the tests set)."""
    return {k: v for k, v in table_snapshot(ctx(app).database).items()
            if k not in ("auth_sessions", "api_tokens", "chat_endpoints")}


@pytest.fixture
def w8(settings: Settings, canary: Listener, redirector: Listener, monkeypatch: pytest.MonkeyPatch) -> Iterator[W8]:
    resolver = Resolver(socket.getaddrinfo, {
        REDIRECTOR: [["127.0.0.1"]], "loopback.test": [["127.0.0.1"]], "six.test": [["::1"]],
        "mixed.test": [[STAND_IN, "127.0.0.1"]], "metadata.test": [["169.254.169.254"]],
        "rebind.test": [[STAND_IN], ["127.0.0.1"]]})
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    guard = Guard()
    app = create_app(dataclasses.replace(settings, model_hosts=(REDIRECTOR,)), model_transport=guard)
    try:
        add_user(app, "boss", "admin")
        add_user(app, "ann")
        pid = add_chat_project(app, "w8", ["ann"])
        yield W8(app, pid, token_client(app, "boss"), session_client(app, "boss"), session_client(app, "ann"), guard,
                 resolver)
    finally:
        ctx(app).database.dispose()
        guard.real.close()


# ---------------------------------------------------------------------------------------------------------
# The matrix: refused, 0 connections


REFUSED_AT_CALL = [
    "http://127.0.0.1:{port}/v1", "http://localhost:{port}/v1", "http://LocalHost:{port}/v1",
    "http://localhost.:{port}/v1", "http://127.1:{port}/v1", "http://127.0.0.2:{port}/v1",
    "http://0x7f000001:{port}/v1", "http://2130706433:{port}/v1", "http://017700000001:{port}/v1",
    "http://[::1]:{port}/v1", "http://[::ffff:127.0.0.1]:{port}/v1", "http://[::ffff:7f00:1]:{port}/v1",
    "http://0.0.0.0:{port}/v1", "http://0:{port}/v1", "http://[::]:{port}/v1",
    "http://loopback.test:{port}/v1", "http://loopback.test.:{port}/v1", "http://six.test:{port}/v1",
    "http://mixed.test:{port}/v1", "https://127.0.0.1:{port}/v1", "http://127.0.0.1:{port}/v1/chat/completions",
    "http://127.0.0.1:{port}#@" + REDIRECTOR + "/v1",
    "http://169.254.169.254:{port}/latest/meta-data", "http://metadata.test:{port}/v1",
    "http://[::ffff:169.254.169.254]:{port}/v1", "http://10.0.0.1:{port}/v1", "http://172.16.0.1:{port}/v1",
    "http://192.168.0.1:{port}/v1", "http://100.64.0.1:{port}/v1", "http://[fc00::1]:{port}/v1",
    "http://[fe80::1]:{port}/v1",
]
REFUSED_AT_SET = [
    "http://" + REDIRECTOR + "@127.0.0.1:{port}/v1", "http://" + REDIRECTOR + ":pw@127.0.0.1:{port}/v1",
    "http://" + REDIRECTOR + "\\@127.0.0.1:{port}/v1", "http://0177.0.0.1:{port}/v1", "ftp://127.0.0.1:{port}/v1",
    "file:///etc/passwd",
]


@SQLITE
@pytest.mark.parametrize("template", REFUSED_AT_CALL)
def test_w8_non_public_model_urls_are_refused_when_called(w8: W8, canary: Listener, template: str) -> None:
    url, before, data = template.format(port=canary.port), canary.connections, _data(w8.app)
    for set_model, stored in ((w8.set_by_api, 200), (w8.set_by_form, 303)):
        assert set_model(url).status_code == stored  # kept: the allow-list is checked at every request
        for route, response in w8.calls().items():
            assert response.status_code == 400, (route, response.text)
            assert ENV_MODEL_HOSTS in response.text and "not a public address" in response.text, (route, response.text)
    assert _data(w8.app) == data  # no conversation, turn or draft
    assert w8.guard.sent == [] and canary.connections == before


@SQLITE
@pytest.mark.parametrize("template", REFUSED_AT_SET)
def test_w8_credentials_and_malformed_urls_are_refused_when_set(w8: W8, canary: Listener, template: str) -> None:
    url, before = template.format(port=canary.port), canary.connections
    api, form = w8.set_by_api(url), w8.set_by_form(url)
    assert (api.status_code, form.status_code) == (400, 400), (api.text, form.text)
    assert w8.api.get(f"/api/v1/projects/{w8.pid}/model").json()["base_url"] == PUBLIC_BASE  # nothing stored
    assert {route: r.status_code for route, r in w8.calls().items()} == {"api test": 200, "form test": 200, "chat send": 303}
    assert {host for host, _ in w8.guard.sent} == {STAND_IN}  # still the model set before
    assert canary.connections == before


# ---------------------------------------------------------------------------------------------------------
# Redirect and rebinding


@SQLITE
def test_w8_a_redirect_to_the_canary_is_not_followed(w8: W8, canary: Listener, redirector: Listener) -> None:
    before, reached, data = canary.connections, redirector.connections, _data(w8.app)
    assert w8.set_by_api(f"http://{REDIRECTOR}:{redirector.port}/v1").status_code == 200
    for route, response in w8.calls().items():
        assert response.status_code == 502 and "redirects are not followed" in response.text, (route, response.text)
    assert _data(w8.app) == data
    assert redirector.connections == reached + 3  # the allow-listed server was asked, once per call
    assert [sent for sent, _ in w8.guard.sent] == ["127.0.0.1"] * 3
    assert canary.connections == before


@SQLITE
def test_w8_dns_rebinding_cannot_move_the_connection(w8: W8, canary: Listener) -> None:
    """rebind.test answers a public address to the first lookup and loopback afterwards: the request goes to
    the address that was checked (named rebind.test in its Host header), and the next one is refused."""
    before = canary.connections
    assert w8.set_by_api(f"http://rebind.test:{canary.port}/v1").status_code == 200
    first = w8.api.post(f"/api/v1/projects/{w8.pid}/model/test", json={})
    assert first.status_code == 200 and first.json()["model"] == "stand-in"
    assert w8.guard.sent == [(STAND_IN, f"rebind.test:{canary.port}")] and w8.resolver.lookups["rebind.test"] == 1
    for route, response in w8.calls().items():
        assert response.status_code == 400 and "resolves to 127.0.0.1" in response.text, (route, response.text)
    assert len(w8.guard.sent) == 1 and canary.connections == before


# ---------------------------------------------------------------------------------------------------------
# The control: allow-listed, the canary is reached (so the tests above can fail)


@SQLITE
@pytest.mark.parametrize("allowed, template", [("127.0.0.1", "http://127.0.0.1:{port}/v1"),
                                               ("localhost", "http://localhost:{port}/v1"),
                                               ("::1", "http://[::1]:{port}/v1"),
                                               ("loopback.test", "http://loopback.test:{port}/v1")])
def test_w8_the_canary_is_reached_once_allow_listed(w8: W8, canary: Listener, allowed: str, template: str) -> None:
    if allowed == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    settings = dataclasses.replace(ctx(w8.app).settings, model_hosts=(REDIRECTOR, allowed))
    app = create_app(settings, database=ctx(w8.app).database, model_transport=w8.guard)
    api, admin, ann = token_client(app, "boss"), session_client(app, "boss"), session_client(app, "ann")
    before = canary.connections
    assert api.put(f"/api/v1/projects/{w8.pid}/model",
                   json={"base_url": template.format(port=canary.port), "model": "m"}).status_code == 200
    tested = api.post(f"/api/v1/projects/{w8.pid}/model/test", json={})
    assert tested.status_code == 200 and (tested.json()["model"], tested.json()["version"]) == ("canary", "canary-1")
    assert admin.post(f"/admin/projects/{w8.pid}/model/test").status_code == 200
    sent = ann.post(f"/annotate/{w8.pid}/chat/send", data={"message": "Hello?", "idempotency_key": "w8-ok"})
    assert sent.status_code == 303
    assert canary.connections == before + 3
    with ctx(app).database.read() as db:
        drafts = db.execute(sa.select(ChatDraft.text, ChatDraft.model_name)).all()
    assert sorted(drafts) == [("canary 0", "canary"), ("canary 1", "canary")]


# ---------------------------------------------------------------------------------------------------------
# The other way: what a model server answers cannot break the app either


BROKEN_ANSWERS: list[tuple[dict[str, Any], str]] = [
    ({"choices": [{"message": "just text"}]}, "has no text content"),
    ({"choices": [{"index": 0, "message": {"content": "a"}}, {"index": "1", "message": {"content": "b"}}]},
     "asked for 1 drafts and the model server gave 2"),
]


def test_a_model_answer_cannot_make_a_500(app: FastAPI) -> None:
    """Each of these was a 500: a message that is not an object and mixed index types (both databases),
    NUL characters (PostgreSQL cannot store them: they become U+FFFD; a small model's byte tokens make
    them). A number as finish_reason or fingerprint is kept as text."""
    add_user(app, "ann")
    pid = add_chat_project(app, "c", ["ann"], n_drafts=1)
    answer: dict[str, Any] = {}
    ctx(app).model_transport = httpx.MockTransport(lambda request: httpx.Response(200, json={"model": "m", **answer}))
    ann, before = session_client(app, "ann"), _data(app)
    for broken, message in BROKEN_ANSWERS:
        answer = broken
        response = ann.post(f"/annotate/{pid}/chat/send", data={"message": "Hi?", "idempotency_key": "k1"})
        assert response.status_code == 502 and message in response.text, (broken, response.text)
    assert _data(app) == before
    answer = {"model": "m\x00", "system_fingerprint": "v\x00", "choices": [
        {"index": "x", "message": {"content": "a\x00b"}, "finish_reason": 5}]}
    assert ann.post(f"/annotate/{pid}/chat/send", data={"message": "Hi?", "idempotency_key": "k2"}).status_code == 303
    with ctx(app).database.read() as db:
        stored = db.execute(sa.select(ChatDraft.text, ChatDraft.model_name, ChatDraft.model_version,
                                      ChatDraft.finish_reason)).all()
    assert stored == [("a\ufffdb", "m\ufffd", "v\ufffd", "5")]
    answer = {"system_fingerprint": 7, "choices": [{"message": {"content": "ok"}}]}
    add_user(app, "boss", "admin")
    tested = token_client(app, "boss").post(f"/api/v1/projects/{pid}/model/test", json={})
    assert tested.status_code == 200 and (tested.json()["version"], tested.json()["finish_reason"]) == ("7", None)
