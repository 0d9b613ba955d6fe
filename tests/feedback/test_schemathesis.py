"""Schemathesis against the API's OpenAPI schema (issue 7 acceptance 3): no 5xx, and every answer is one the
schema declares.

Every operation of the API router is fuzzed with requests Schemathesis generates from the schema the app
serves (`/api/v1/openapi.json`): valid ones (plus the schema's own examples) and, where the operation takes
input, invalid ones. As an admin with an API token, on SQLite and PostgreSQL, the checks are: not a server
error, status code, content type, headers and body as declared, and invalid input refused with 4xx. Most
generated project ids name the two existing projects (a labelled pairwise one, and a chat one whose model
is a fake answered in-process), so the handlers run past the lookup: the test asserts each operation got
answers other than 401, 403 and 404. As an annotator (session cookie and CSRF header) every request is
refused and the database is unchanged. Host names in model URLs are never looked up (numeric only).

EXAMPLES cases per operation and mode (derandomized, so CI sees the same ones); `-m slow` runs
SLOW_EXAMPLES fresh random ones. The regression tests below pin what the fuzzing found.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.routing import APIRoute
from feedback_helpers import (
    FakeModel,
    add_chat_project,
    add_project,
    add_user,
    answer_all,
    ctx,
    session_client,
    table_snapshot,
    token_client,
)
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis import checks
from schemathesis.core.failures import FailureGroup
from schemathesis.generation import GenerationMode

from alignloop.feedback import api
from alignloop.feedback.schemas import MAX_ROW_ID

OPERATIONS = sorted(f"{method} {route.path}" for route in api.router.routes
                    if isinstance(route, APIRoute) and route.include_in_schema for method in route.methods or ())
"""Every operation of the API router (a new route is fuzzed without editing this file)."""
EXAMPLES, SLOW_EXAMPLES = 25, 300
CHECKS = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
          checks.response_headers_conformance, checks.response_schema_conformance, checks.negative_data_rejection]


@dataclass
class Target:
    """The app with its data, the schema it serves, and who asks."""

    app: FastAPI
    schema: Any
    project_ids: tuple[int, ...]
    admin: dict[str, str]
    """Headers of an admin's API requests."""


@pytest.fixture
def target(app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Iterator[Target]:
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *args, **kwargs: real(
        host, port, *args, **{**kwargs, "flags": socket.AI_NUMERICHOST}))  # no DNS for generated host names
    ctx(app).model_transport = FakeModel().transport
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    add_user(app, "bob")
    pairwise = add_project(app, "pairs", ["ann", "bob"], n_items=3, k=2)
    for name in ("ann", "bob"):
        answer_all(app, pairwise, name, lambda item, order: ("a", "better"))
    chat = add_chat_project(app, "chat", ["ann"], [{"id": "c0", "prompt": "Hi?"}])
    admin = {"Authorization": token_client(app, "boss").headers["Authorization"]}
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app, headers=admin)
    yield Target(app, schema, (pairwise, chat), admin)


def _strategy(target: Target, label: str, mode: GenerationMode) -> st.SearchStrategy[Any]:
    """Cases for one operation: aimed at each existing project first (and, for valid input, the schema's
    examples), then with any project id."""
    method, path = label.split(" ", 1)
    operation = target.schema[path][method]
    aimed = [{"path_parameters": {"project_id": pid}} for pid in target.project_ids] if "{project_id}" in path else []
    strategies = [operation.as_strategy(mode, **kwargs) for kwargs in aimed]
    if mode == GenerationMode.POSITIVE:
        for kwargs in aimed or [{}]:
            strategies += target.schema.get_strategies_from_examples(operation, **kwargs)
    return st.one_of(*strategies, operation.as_strategy(mode))


def _modes(target: Target, label: str) -> list[GenerationMode]:
    """Invalid input only where there is input to get wrong."""
    method, path = label.split(" ", 1)
    operation = target.schema[path][method]
    takes_input = bool(operation.body or operation.path_parameters or operation.query)
    return [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if takes_input else [GenerationMode.POSITIVE]


def fuzz(target: Target, label: str, mode: GenerationMode, examples: int, *, headers: dict[str, str],
         cookies: dict[str, str] | None = None, derandomize: bool = True) -> Counter[int]:
    """Run the checks on `examples` generated cases; returns how often each status came back."""
    statuses: Counter[int] = Counter()

    @hypothesis_settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                         suppress_health_check=list(HealthCheck))
    @given(_strategy(target, label, mode))
    def run(case: Any) -> None:
        response = case.call(headers=headers, cookies=cookies)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    run()
    return statuses


def _fuzz_as_admin(target: Target, examples: int, derandomize: bool) -> None:
    """Every operation the schema lists, in turn (sharing the data they change); all failures are reported
    together."""
    served = sorted(f"{op.ok().method.upper()} {op.ok().path}" for op in target.schema.get_all_operations())
    assert served == OPERATIONS and len(OPERATIONS) >= 11
    failures, statuses = {}, {}
    for label in OPERATIONS:
        statuses[label] = Counter[int]()
        try:
            for mode in _modes(target, label):
                statuses[label] += fuzz(target, label, mode, examples, headers=target.admin, derandomize=derandomize)
        except (FailureGroup, Exception) as err:  # failed checks, or the server's own exception (a 500)
            failures[label] = f"{type(err).__name__}: {err}"
    assert not failures, "\n\n".join(f"{label}: {why}" for label, why in failures.items())
    for label, seen in statuses.items():
        assert not {401, 403} & set(seen), (label, seen)
        assert set(seen) - {404, 422}, f"{label}: no request got past the lookup and validation: {seen}"


def test_schemathesis_as_admin(target: Target) -> None:
    _fuzz_as_admin(target, EXAMPLES, derandomize=True)


@pytest.mark.slow
def test_schemathesis_as_admin_at_length(target: Target) -> None:
    _fuzz_as_admin(target, SLOW_EXAMPLES, derandomize=False)


def test_schemathesis_as_annotator_is_refused_and_changes_nothing(target: Target) -> None:
    client = session_client(target.app, "ann")
    headers, cookies = {"X-CSRF-Token": client.headers["X-CSRF-Token"]}, dict(client.cookies)
    before = table_snapshot(ctx(target.app).database)
    for label in OPERATIONS:
        statuses: Counter[int] = Counter()
        for mode in _modes(target, label):
            statuses += fuzz(target, label, mode, 5, headers=headers, cookies=cookies)
        # 400 and 422: a body FastAPI cannot decode (bad UTF-8, not JSON) is refused before the role is checked
        assert set(statuses) <= {400, 403, 422} and statuses[403] > 0, (label, statuses)
    assert table_snapshot(ctx(target.app).database) == before


# ---------------------------------------------------------------------------------------------------------
# What the fuzzing found (each was a 500 on one database or both)


def test_ids_beyond_the_databases_integers_are_422(target: Target) -> None:
    """PostgreSQL's ids are 32-bit and SQLite's 64-bit: a larger id in a URL or form failed in the driver."""
    api = token_client(target.app, "boss")
    assert api.get(f"/api/v1/projects/{MAX_ROW_ID}/progress").status_code == 404
    for too_big in (MAX_ROW_ID + 1, 2**63, 10**30):
        assert api.get(f"/api/v1/projects/{too_big}/progress").status_code == 422
        assert api.put(f"/api/v1/projects/{too_big}/model", json={"base_url": "http://8.8.8.8/v1", "model": "m"}
                       ).status_code == 422
    admin, ann = session_client(target.app, "boss"), session_client(target.app, "ann")
    assert admin.get(f"/admin/projects/{MAX_ROW_ID + 1}").status_code == 422
    assert ann.get(f"/annotate/{10**30}").status_code == 422
    pid = target.project_ids[1]
    for form in ({"assignment_id": str(MAX_ROW_ID + 1), "draft_id": "1"}, {"assignment_id": "1", "draft_id": str(2**63)}):
        assert ann.post(f"/annotate/{pid}/chat/pick", data={**form, "idempotency_key": "k"}).status_code == 422


NUL_BODIES = [
    ("/api/v1/projects", {"name": "a\x00b"}, "body.name"),
    ("/api/v1/projects", {"name": "p2", "annotators": ["ann", "\x00"]}, "body.annotators[1]"),
    ("/api/v1/projects/{pairs}/members", {"username": "ann\x00"}, "body.username"),
    ("/api/v1/projects/{pairs}/items", {"items": [{"id": "x", "prompt": "Q?", "responses": [
        {"text": "one", "model": "m"}, {"text": "tw\x00o", "model": "m"}]}]}, "body.items[0].responses[1].text"),
    ("/api/v1/projects/{pairs}/items", {"items": [{"id": "x", "prompt": "Q?", "meta": {"k\x00": 1}}]},
     "body.items[0].meta (a key)"),
    ("/api/v1/projects/{chat}/model/test", {"message": "hi\x00"}, "body.message"),
]


def test_nul_characters_in_a_body_are_422_and_write_nothing(target: Target) -> None:
    """PostgreSQL's text cannot hold NUL: such a body failed in the driver there (SQLite stored it)."""
    api = token_client(target.app, "boss")
    before = {k: v for k, v in table_snapshot(ctx(target.app).database).items() if k != "api_tokens"}
    for path, body, where in NUL_BODIES:
        response = api.post(path.format(pairs=target.project_ids[0], chat=target.project_ids[1]), json=body)
        assert response.status_code == 422, (path, response.text)
        assert f"{where}: text must not contain NUL characters" in response.text, (path, response.text)
    assert {k: v for k, v in table_snapshot(ctx(target.app).database).items() if k != "api_tokens"} == before
