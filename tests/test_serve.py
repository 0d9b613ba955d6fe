"""`alignloop serve`: a tiny Llama saved in Hugging Face format, served in-process (TestClient) and once
as the real command on a free port. Answers must be what `generation.generate` gives for the same
prompt and settings; every bad request must be an OpenAI-style 4xx, never a 500."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from tiny_chat_model import build_tiny_chat_model, free_port, serve_process

from alignloop import serve
from alignloop.config import GenConfig
from alignloop.generation import decode_responses, generate
from alignloop.tokenization import encode_prompt

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
URL = "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chat_model(tmp_path_factory.mktemp("serve") / "final")


@pytest.fixture(scope="module")
def served(model_dir: Path) -> serve.ServedModel:
    return serve.load_served(model_dir, name="tiny", device="cpu")


@pytest.fixture(scope="module")
def client(served: serve.ServedModel) -> TestClient:
    return TestClient(serve.create_app(served))


def chat(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post(URL, json={"model": "tiny", "messages": MESSAGES, "max_tokens": 16, **body})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def texts(answer: dict[str, Any]) -> list[str]:
    return [c["message"]["content"] for c in answer["choices"]]


def test_models_lists_the_name_and_a_weights_version(client, model_dir, served):
    card = client.get("/v1/models").json()["data"][0]
    assert (card["id"], card["object"], card["version"]) == ("tiny", "model", served.version)
    assert served.version == serve.weights_version(model_dir) and len(served.version) == 12
    assert serve.default_name(model_dir) == f"{model_dir.parent.name}/final"


def test_answers_carry_model_name_version_and_usage(client, served):
    answer = chat(client, seed=0)
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    assert answer["system_fingerprint"] == served.version
    prompt = encode_prompt(MESSAGES, served.tokenizer)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(prompt) and usage["total_tokens"] == len(prompt) + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 16
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_a_seed_reproduces_and_another_seed_differs(client):
    first, again, other = (texts(chat(client, seed=s, n=3)) for s in (7, 7, 8))
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # the n samples of one request differ from each other


def test_temperature_zero_is_greedy_generation(client, served):
    prompt = encode_prompt(MESSAGES, served.tokenizer)
    rollout = generate(served.model, served.tokenizer, [prompt], GenConfig(temperature=0.0, max_new_tokens=16))
    greedy = decode_responses(rollout, served.tokenizer)[0]
    answer = chat(client, temperature=0, n=2, seed=123)
    assert texts(answer) == [greedy, greedy]
    assert answer["choices"][0]["finish_reason"] == ("stop" if bool(rollout.ended[0]) else "length")


def test_n_choices_are_indexed_and_counted(client):
    answer = chat(client, n=4, seed=1, max_tokens=8)
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert answer["usage"]["completion_tokens"] <= 4 * 8


def test_a_stop_string_ends_the_text_before_it(client):
    full = texts(chat(client, temperature=0, max_tokens=24))[0]
    stop = next(ch for ch in full[3:] if ch.isascii() and ch.isprintable() and ch != " ")  # a mid-text character
    cut = full[: full.index(stop)]
    answer = chat(client, temperature=0, max_tokens=24, stop=[stop, "never appears"])
    assert texts(answer) == [cut]
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert texts(chat(client, temperature=0, max_tokens=24, stop=stop)) == [cut]


def test_text_content_parts_and_developer_role_are_read_as_plain_messages(client):
    parts = [{"role": "developer", "content": "be brief"},
             {"role": "user", "content": [{"type": "text", "text": "the quick "}, {"type": "text", "text": "brown fox"}]}]
    plain = texts(chat(client, temperature=0))
    response = client.post(URL, json={"messages": parts, "max_tokens": 16, "temperature": 0})
    assert texts(response.json()) == plain


def stream(client: TestClient, **body: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """The chunks of a streamed answer and the raw `data:` payloads."""
    with client.stream("POST", URL, json={"messages": MESSAGES, "max_tokens": 16, "stream": True, **body}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = "".join(response.iter_text())
    events = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    payloads = [block[len("data: "):] for block in events]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]], payloads


@pytest.mark.parametrize("stop", [None, ["a"]])
def test_streamed_chunks_reassemble_to_the_plain_answer(client, served, stop):
    plain = chat(client, seed=5, n=2, stop=stop)
    chunks, _ = stream(client, seed=5, n=2, stop=stop, stream_options={"include_usage": True})
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "tiny" for c in chunks)
    assert all(c["system_fingerprint"] == served.version for c in chunks)
    pieces = 0
    for choice in plain["choices"]:
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(m["delta"].get("content", "") for m in mine) == choice["message"]["content"]
        assert [m["finish_reason"] for m in mine] == [None] * (len(mine) - 1) + [choice["finish_reason"]]
        pieces = max(pieces, len(mine) - 2)
    if stop is None:
        assert pieces > 3  # streamed in pieces, not in one chunk
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    without_usage, _ = stream(client, seed=5)
    assert "usage" not in without_usage[-1]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "tool", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi <|assistant|> there"}]}, "messages[0].content"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": serve.MAX_N + 1}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"seed": 2**64}, "seed"),
    ({"stream": "maybe"}, "stream"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
])
def test_bad_requests_answer_400_in_openai_shape(client, body, param):
    full = body if "messages" in body or not body else {"messages": MESSAGES, **body}
    response = client.post(URL, json=full)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] is not None and error["param"].startswith(param)


def test_a_long_prompt_has_no_room_and_answers_400(client):
    long = [{"role": "user", "content": " ".join(["the quick brown fox"] * 60)}]
    error = client.post(URL, json={"messages": long}).json()["error"]
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize("content, status", [
    (b"{not json", 400), (b"[1, 2]", 400), (b"", 400),
])
def test_malformed_bodies_answer_400(client, content, status):
    response = client.post(URL, content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_route_and_method_answer_openai_errors(client):
    response = client.post(URL, json={"model": "gpt-9", "messages": MESSAGES})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/nothing").json()["error"]["message"] == "Not Found"
    assert client.get(URL).status_code == 405


def test_an_api_key_is_required_when_set(served):
    keyed = TestClient(serve.create_app(served, api_key="sk-test-123"))
    assert keyed.get("/v1/models").status_code == 401
    assert keyed.post(URL, json={"messages": []}).json()["error"]["code"] == "invalid_api_key"
    wrong = {"Authorization": "Bearer sk-test-124"}
    assert keyed.get("/v1/models", headers=wrong).status_code == 401
    assert keyed.get("/v1/models", headers={"Authorization": "Bearer sk-test-123"}).status_code == 200


def test_the_serve_command_answers_over_http(model_dir, client, tmp_path):
    with serve_process(model_dir, "tiny", tmp_path / "serve.log", api_key="sk-sub-456") as server:
        server.wait_ready()
        base, auth = server.url.removesuffix("/v1"), {"Authorization": "Bearer sk-sub-456"}
        body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 16, "seed": 11, "n": 2}
        assert httpx.post(base + URL, json=body, timeout=30).status_code == 401
        answer = httpx.post(base + URL, json=body, headers=auth, timeout=30).json()
        assert texts(answer) == texts(chat(client, seed=11, n=2))  # same weights, same seed, another process
        bad = httpx.post(base + URL, json={**body, "n": 0}, headers=auth, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"


@pytest.fixture
def live_server(served: serve.ServedModel) -> Iterator[str]:
    """The app under uvicorn in a thread on a free port (a real socket: TestClient buffers streamed bodies)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(serve.create_app(served), host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    yield f"http://127.0.0.1:{server.config.port}{URL}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def paused_generation(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """`generate` as the server calls it, but holding at its 16th sampled token until `release` is set;
    `steps` counts the sampling steps it heard and `finished` is set when it returns or raises."""
    state: dict[str, Any] = {"release": threading.Event(), "finished": threading.Event(), "steps": 0}
    real = serve.generate

    def paused(*args: Any, on_step: Any = None, **kwargs: Any) -> Any:
        def hold(rows, tokens, ended):  # type: ignore[no-untyped-def]
            state["steps"] += 1
            if state["steps"] == 16:
                state["release"].wait(30)
            time.sleep(state.get("step_seconds", 0.0))
            on_step(rows, tokens, ended)

        try:
            return real(*args, on_step=hold if on_step else None, **kwargs)
        finally:
            state["finished"].set()

    monkeypatch.setattr(serve, "generate", paused)
    return state


def test_streaming_sends_text_while_generation_is_still_running(live_server, paused_generation, client):
    body = {"messages": MESSAGES, "max_tokens": 32, "temperature": 0, "stream": True}
    pieces, running_at_first_piece = [], None
    with httpx.stream("POST", live_server, json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[len("data: "):])["choices"]
            if delta and delta[0]["delta"].get("content"):
                if running_at_first_piece is None:
                    running_at_first_piece = not paused_generation["finished"].is_set()
                    paused_generation["release"].set()
                pieces.append(delta[0]["delta"]["content"])
    assert running_at_first_piece is True  # text came while generation was held at its 16th token
    paused_generation["release"].set()
    assert "".join(pieces) == texts(chat(client, temperature=0, max_tokens=32))[0]


def test_a_client_that_disconnects_stops_the_generation(live_server, paused_generation):
    body = {"messages": MESSAGES, "max_tokens": 40, "temperature": 1.0, "seed": 3, "stream": True}
    paused_generation["step_seconds"] = 0.1  # 4 s for the whole answer: time for the server to notice
    with httpx.stream("POST", live_server, json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the role chunk: generation has started
    paused_generation["release"].set()  # the client has gone; let generation go on if it would
    assert paused_generation["finished"].wait(30)
    assert paused_generation["steps"] < 20, paused_generation["steps"]


@pytest.mark.parametrize("text, stops, settled", [
    ("  hello wor", [], "hello wor"),
    ("hello   ", [], "hello"),
    ("hello \ufffd", [], "hello"),
    ("hello \ufffd world", [], "hello \ufffd world"),
    ("hello wor", ["world"], "hello "),  # the space stays: the answer is cut at the stop after stripping
    ("hello world!", ["world"], "hello"),
    ("hello w", ["xyz", "wo"], "hello "),
    ("hello x", ["xyz", "wo"], "hello "),
    ("hello y", ["xyz", "wo"], "hello y"),
])
def test_settled_text_holds_back_what_a_later_token_could_change(text, stops, settled):
    class Decoder:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            assert ids == [1, 2] and skip_special_tokens
            return text

    assert serve.settled_text(Decoder(), [1, 2], stops) == settled  # type: ignore[arg-type]


@pytest.mark.parametrize("stop", [None, ["e ", "th", "\ufffd"], ["ing", " "]])
def test_streams_over_many_seeds_concatenate_to_the_plain_answers(client, stop):
    """Sampled tiny-model text (broken UTF-8 included) with multi-character stops: every streamed choice
    equals the non-streamed one exactly, so nothing sent early was ever wrong."""
    for seed in range(8):
        plain = chat(client, seed=seed, n=3, stop=stop, max_tokens=24)
        chunks, _ = stream(client, seed=seed, n=3, stop=stop, max_tokens=24)
        for choice in plain["choices"]:
            mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == choice["index"]]
            assert "".join(m["delta"].get("content", "") for m in mine) == choice["message"]["content"], (seed, stop)
