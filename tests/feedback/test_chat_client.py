"""The chat client (`alignloop.feedback.chat`): drafts from `alignloop serve` running in a thread on a
real loopback port, and the SSRF allow-list (W8) with a recording mock transport that proves a refused
request never leaves."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
import uvicorn

from alignloop.feedback import chat
from alignloop.feedback.chat import ChatError, HostRefused

if TYPE_CHECKING:
    from alignloop.serve import ServedModel

MESSAGES = [{"role": "user", "content": "the quick brown fox"}]
PUBLIC_IP = "8.8.8.8"  # a global address: with a mock transport nothing is sent anywhere
KEY = "sk-client-789"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> ServedModel:
    from alignloop import serve
    from alignloop.config import TinyModelConfig
    from alignloop.models import save_pretrained, tiny_model, train_tokenizer

    words = "the quick brown fox jumps over a lazy dog while seven red birds sing".split()
    texts = [" ".join(words[(i * k) % len(words)] for k in range(1, 4 + i % 7)) for i in range(200)]
    tokenizer = train_tokenizer(texts, vocab_size=280)
    cfg = TinyModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                          max_position_embeddings=96, tie_word_embeddings=False)
    folder = save_pretrained(tiny_model(cfg, tokenizer, seed=1), tokenizer, tmp_path_factory.mktemp("chat") / "policy")
    return serve.load_served(folder, name="policy-v1", device="cpu")


@pytest.fixture(scope="module")
def server(served: ServedModel) -> Iterator[int]:
    """`alignloop serve`'s app under uvicorn in a thread; yields its port."""
    from alignloop import serve

    config = uvicorn.Config(serve.create_app(served, api_key=KEY), host="127.0.0.1", port=0, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield int(instance.servers[0].sockets[0].getsockname()[1])
    instance.should_exit = True
    thread.join(timeout=10)


def recorder(respond: Callable[[httpx.Request], httpx.Response]) -> tuple[httpx.MockTransport, list[httpx.Request]]:
    """A mock transport that keeps every request it was given."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return respond(request)

    return httpx.MockTransport(handle), seen


def ok(n: int = 1, **extra: object) -> Callable[[httpx.Request], httpx.Response]:
    choices = [{"index": i, "message": {"role": "assistant", "content": f"draft {i}"}, "finish_reason": "stop"}
               for i in reversed(range(n))]
    return lambda request: httpx.Response(200, json={"model": "m", "choices": choices, **extra})


# ----------------------------------------------------------------------------------------------
# Against our server


def test_drafts_from_alignloop_serve_carry_model_and_version(server, served):
    base = f"http://127.0.0.1:{server}/v1"
    drafts = chat.complete(base, "policy-v1", MESSAGES, n=3, seed=4, max_tokens=12, api_key=KEY,
                           allowed_hosts=["127.0.0.1"])
    assert len(drafts) == 3
    assert {(d.model, d.version) for d in drafts} == {("policy-v1", served.version)}
    assert all(d.finish_reason in ("stop", "length") for d in drafts)
    again = chat.complete(base + "/chat/completions", "policy-v1", MESSAGES, n=3, seed=4, max_tokens=12,
                          api_key=KEY, allowed_hosts=["127.0.0.0/8"])
    assert again == drafts
    greedy = chat.complete(base, "policy-v1", MESSAGES, n=2, temperature=0, max_tokens=12, api_key=KEY,
                           allowed_hosts=["127.0.0.1"])
    assert greedy[0].text == greedy[1].text


def test_a_listed_host_name_is_reached_whatever_it_resolves_to(server):
    drafts = chat.complete(f"http://localhost:{server}/v1", "policy-v1", MESSAGES, max_tokens=4, api_key=KEY,
                           allowed_hosts=["LOCALHOST"])
    assert len(drafts) == 1


def test_server_errors_come_back_as_clear_chat_errors(server):
    base, allow = f"http://127.0.0.1:{server}/v1", ["127.0.0.1"]
    with pytest.raises(ChatError, match="401.*API key"):
        chat.complete(base, "policy-v1", MESSAGES, allowed_hosts=allow)
    with pytest.raises(ChatError, match="400.*context"):
        chat.complete(base, "policy-v1", MESSAGES, max_tokens=10_000, api_key=KEY, allowed_hosts=allow)
    with pytest.raises(ChatError, match="404.*does not exist"):
        chat.complete(base, "other-model", MESSAGES, api_key=KEY, allowed_hosts=allow)
    with pytest.raises(ChatError, match="404"):
        chat.complete(f"http://127.0.0.1:{server}/wrong", "policy-v1", MESSAGES, api_key=KEY, allowed_hosts=allow)


def test_loopback_is_refused_by_default(server):
    for host in ("127.0.0.1", "localhost", "[::1]"):
        with pytest.raises(HostRefused, match="not a public address"):
            chat.complete(f"http://{host}:{server}/v1", "policy-v1", MESSAGES, api_key=KEY)


def test_nothing_listening_gives_a_connect_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # free again once closed: connecting is refused
    with pytest.raises(ChatError, match="cannot connect"):
        chat.complete(f"http://127.0.0.1:{port}/v1", "m", MESSAGES, allowed_hosts=["127.0.0.1"], timeout=5)


# ----------------------------------------------------------------------------------------------
# The allow-list (W8)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/v1", "http://127.1/v1", "http://2130706433/v1", "http://0x7f000001/v1", "http://[::1]/v1",
    "http://0.0.0.0/v1", "http://10.1.2.3/v1", "http://172.16.0.1/v1", "http://192.168.1.1/v1",
    "http://169.254.169.254/latest/meta-data", "http://100.64.0.1/v1", "http://224.0.0.1/v1",
    "http://[::ffff:127.0.0.1]/v1", "http://[::ffff:a9fe:a9fe]/v1", "http://[fe80::1]/v1", "http://[fc00::1]/v1",
    "http://[2002:7f00:1::]/v1", "http://[64:ff9b::a00:1]/v1", "http://localhost/v1", "https://LOCALHOST./v1",
])
def test_non_public_addresses_are_refused_before_anything_is_sent(url):
    transport, seen = recorder(ok())
    with pytest.raises(HostRefused):
        chat.complete(url, "m", MESSAGES, transport=transport)
    assert seen == []


@pytest.mark.parametrize("url", [
    "ftp://8.8.8.8/v1", "file:///etc/passwd", "http://user:pw@8.8.8.8/v1", "http:///v1", "gopher://8.8.8.8/",
])
def test_other_schemes_credentials_and_hostless_urls_are_refused(url):
    transport, seen = recorder(ok())
    with pytest.raises(HostRefused):
        chat.complete(url, "m", MESSAGES, transport=transport)
    assert seen == []


@pytest.mark.parametrize("allowed, url, passes", [
    (["127.0.0.1"], "http://127.0.0.1:9/v1", True),
    (["127.0.0.0/8"], "http://127.0.0.2/v1", True),
    (["10.0.0.0/8"], "http://127.0.0.1/v1", False),
    (["::1"], "http://[::1]/v1", True),
    (["[::1]"], "http://[::1]/v1", True),
    (["169.254.169.254"], "http://169.254.169.253/v1", False),
    (["localhost"], "http://127.0.0.1/v1", False),  # a name allows that name, not its addresses
])
def test_the_operator_allow_list(allowed, url, passes):
    if passes:
        assert chat.check_url(url, allowed).url == httpx.URL(url)
    else:
        with pytest.raises(HostRefused):
            chat.check_url(url, allowed)


def test_every_resolved_address_must_pass_and_the_checked_one_is_used(monkeypatch):
    answers = {"mixed.example": [PUBLIC_IP, "10.0.0.5"], "public.example": ["1.1.1.1", PUBLIC_IP]}
    monkeypatch.setattr(chat, "_resolve", lambda host, port: answers[host])
    transport, seen = recorder(ok())
    with pytest.raises(HostRefused, match="10.0.0.5"):
        chat.complete("http://mixed.example/v1", "m", MESSAGES, transport=transport)
    assert seen == []
    assert chat.complete("http://mixed.example/v1", "m", MESSAGES, transport=transport,
                         allowed_hosts=["10.0.0.0/24"])[0].text == "draft 0"
    chat.complete("https://public.example:8443/v1", "m", MESSAGES, transport=transport)
    pinned = seen[-1]
    # Connected to the address that was checked (no second DNS lookup to rebind), named as asked.
    assert pinned.url.host == "1.1.1.1" and pinned.url.port == 8443 and pinned.url.path == "/v1/chat/completions"
    assert pinned.headers["host"] == "public.example:8443"
    assert pinned.extensions["sni_hostname"] == "public.example"


def test_a_redirect_is_not_followed():
    transport, seen = recorder(lambda r: httpx.Response(302, headers={"location": "http://169.254.169.254/latest"}))
    with pytest.raises(ChatError, match="redirect"):
        chat.complete(f"http://{PUBLIC_IP}/v1", "m", MESSAGES, transport=transport)
    assert len(seen) == 1 and seen[0].url.host == PUBLIC_IP


def test_parse_model_hosts_and_the_environment():
    assert chat.parse_model_hosts(" vllm.internal , 10.0.0.0/8,, [::1], Localhost. ") == (
        "vllm.internal", "10.0.0.0/8", "::1", "localhost")
    assert chat.model_hosts_from_env({}) == ()
    assert chat.model_hosts_from_env({chat.ENV_MODEL_HOSTS: "gpu-box"}) == ("gpu-box",)
    for bad in ("http://gpu-box", "gpu-box:8001", "10.0.0.0/33", "a b"):
        with pytest.raises(ValueError, match=chat.ENV_MODEL_HOSTS):
            chat.parse_model_hosts(bad)


# ----------------------------------------------------------------------------------------------
# The request and the answer


def test_the_request_body_key_and_draft_order():
    transport, seen = recorder(ok(2, system_fingerprint="abc123"))
    drafts = chat.complete(f"http://{PUBLIC_IP}/v1/", "m", MESSAGES, n=2, api_key="sk-x", temperature=0.7,
                           stop=["\n"], transport=transport)
    assert [d.text for d in drafts] == ["draft 0", "draft 1"]
    assert drafts[0] == chat.Draft("draft 0", "m", "abc123", "stop")
    request = seen[0]
    assert request.headers["authorization"] == "Bearer sk-x"
    assert json.loads(request.content) == {"model": "m", "messages": MESSAGES, "n": 2, "temperature": 0.7, "stop": ["\n"]}


@pytest.mark.parametrize("respond, match", [
    (lambda r: httpx.Response(200, text="<html>hello</html>"), "not JSON"),
    (lambda r: httpx.Response(200, json=[1]), "not a JSON object"),
    (lambda r: httpx.Response(200, json={"choices": "x"}), "no `choices`"),
    (lambda r: httpx.Response(200, json={"choices": [{"message": {"content": None}}]}), "no text content"),
    (ok(1), "asked for 2 drafts"),
    (lambda r: httpx.Response(500, text="boom"), "500: boom"),
    (lambda r: httpx.Response(429, json={"error": {"message": "slow down"}}), "429: slow down"),
])
def test_bad_answers_are_chat_errors(respond, match):
    transport, _ = recorder(respond)
    with pytest.raises(ChatError, match=match):
        chat.complete(f"http://{PUBLIC_IP}/v1", "m", MESSAGES, n=2, transport=transport)


def test_timeouts_and_oversized_answers(monkeypatch):
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("read timed out", request=request)

    with pytest.raises(ChatError, match="within 3 s"):
        chat.complete(f"http://{PUBLIC_IP}/v1", "m", MESSAGES, timeout=3, transport=httpx.MockTransport(slow))
    monkeypatch.setattr(chat, "MAX_RESPONSE_BYTES", 1000)
    huge = recorder(lambda r: httpx.Response(200, content=b"x" * 5000))[0]
    with pytest.raises(ChatError, match="larger than 1000 bytes"):
        chat.complete(f"http://{PUBLIC_IP}/v1", "m", MESSAGES, transport=huge)


def test_the_client_does_not_import_torch():
    code = "import sys, alignloop.feedback.chat; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[2]).returncode == 0
