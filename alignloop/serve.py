"""`alignloop serve MODEL_DIR`: a policy checkpoint behind an OpenAI-compatible chat endpoint.

The feedback app's chat task (and anything that speaks OpenAI's API) asks this server for drafts. It
loads the folder with `models.load_causal_lm` / `load_tokenizer`, renders conversations with
`tokenization.encode_prompt` (the same chat format training used) and samples with
`generation.generate`, so a draft here is a draft the trainers would have produced.

Choices worth knowing:
- Every answer carries `model` (the served name) and `system_fingerprint` = the weights' version, a
  short hash of the safetensors files, so the app can record exactly which weights wrote each draft.
- Stop strings end generation as in `generate` (the completing token is sampled) but, as in OpenAI's
  API, the returned text ends before the stop string.
- Streaming sends OpenAI's `chat.completion.chunk` events as tokens are sampled (`generate`'s `on_step`
  hook, generation in a worker thread). Text that could still change is held back: a partial UTF-8
  character, trailing whitespace (answers are stripped) and an ending that may be the start of a stop
  string; so the pieces of a stream concatenate to exactly the non-streamed answer. A client that
  disconnects stops the generation at its next token.
- Requests run one at a time (a lock), each batching its `n` samples in one `generate` call.
- Bad requests answer 400 with OpenAI's error object; an unknown model 404; no path answers a
  traceback. `ALIGNLOOP_SERVE_API_KEY`, when set, is required as a Bearer token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from alignloop.config import GenConfig
from alignloop.data import DataError, Message
from alignloop.generation import Rollout, StepListener, decode_responses, generate
from alignloop.models import ModelError, load_causal_lm, load_tokenizer
from alignloop.tokenization import encode_prompt

log = logging.getLogger(__name__)

API_KEY_ENV = "ALIGNLOOP_SERVE_API_KEY"
MAX_N = 16
"""Most choices per request: n rows are sampled in one batch, so this bounds a request's memory."""
MAX_STOP = 4
"""Most stop strings per request (OpenAI's limit)."""
DISCONNECT_POLL_S = 0.25
"""While a stream waits for its next token, how often it checks whether the client has gone."""
DEFAULT_MAX_TOKENS = 256
"""Tokens sampled when a request gives no max_tokens (less when the context has less room)."""
# OpenAI parameters we cannot honour: refused when set to anything but an "off" value, rather than
# silently ignored (other unknown keys, such as `user` or `metadata`, are ignored as OpenAI-compatible
# servers do).
_UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs",
                "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty")


@dataclass
class ServedModel:
    """A loaded checkpoint and what answers name it by."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """The `model` id clients send and every answer carries."""
    version: str
    """Short hash of the weights (`weights_version`), returned as `system_fingerprint`."""
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while sampling: one request at a time shares the model and the CPU threads."""

    @property
    def context_length(self) -> int:
        """Longest prompt + response the model's positions cover."""
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 2048)


class BadRequest(Exception):
    """A request we refuse with an OpenAI-style error (400 unless `status` says otherwise)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The body of `POST /v1/chat/completions`; null means the default, as in OpenAI's API."""

    model_config = ConfigDict(extra="allow")

    messages: list[dict[str, Any]] = Field(min_length=1)
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None


# ----------------------------------------------------------------------------------------------
# Loading


def weights_version(model_dir: Path) -> str:
    """First 12 hex digits of a SHA-256 over the safetensors files (names and bytes): a folder that a
    later round overwrites gets a new version, and equal weights always get the same one."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors weights to serve")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:12]


def default_name(model_dir: Path) -> str:
    """The folder's name, with its parent's when it is a run's generic `final` folder."""
    return f"{model_dir.parent.name}/{model_dir.name}" if model_dir.name == "final" else model_dir.name


def load_served(model_dir: str | Path, name: str | None = None, dtype: str = "float32",
                device: str = "auto") -> ServedModel:
    """Load a Hugging Face model folder (safetensors) for serving; ModelError when it cannot be."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ModelError(f"{folder}: not a model folder")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(str(folder), dtype=dtype)
    model.to(device)  # type: ignore[arg-type]  # (transformers' wrapped `to` confuses mypy; it moves in place)
    model.eval()
    tokenizer = load_tokenizer(str(folder))
    return ServedModel(model, tokenizer, name or default_name(folder), weights_version(folder))


# ----------------------------------------------------------------------------------------------
# Requests -> prompts and sampling settings


def plain_messages(raw: list[dict[str, Any]]) -> list[Message]:
    """OpenAI messages as our `{role, content}` turns: text parts joined, `developer` read as `system`,
    `name` dropped. Roles and turn order are checked later by `encode_prompt`."""
    out: list[Message] = []
    for i, msg in enumerate(raw):
        role, content = msg.get("role"), msg.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise BadRequest("only text content parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(role, str) or not isinstance(content, str):
            raise BadRequest("each message needs a string role and string (or text-part) content", f"messages[{i}]")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _stop_strings(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(s == "" for s in stops):
        raise BadRequest(f"stop: at most {MAX_STOP} non-empty strings", "stop")
    return stops


def _check_supported(req: ChatRequest) -> None:
    for key in _UNSUPPORTED:
        value = (req.model_extra or {}).get(key)
        if value not in (None, False, 0, [], {}) and not (key == "response_format" and value == {"type": "text"}):
            raise BadRequest(f"{key} is not supported by this server", key, "unsupported_parameter")


def prepare(served: ServedModel, req: ChatRequest) -> tuple[list[int], GenConfig]:
    """The prompt's token ids and the sampling settings for one request; BadRequest when it cannot run."""
    _check_supported(req)
    if req.model is not None and req.model != served.name:
        raise BadRequest(f"The model `{req.model}` does not exist (this server serves `{served.name}`)",
                         "model", "model_not_found", status=404)
    try:
        prompt = encode_prompt(plain_messages(req.messages), served.tokenizer)
    except DataError as err:
        raise BadRequest(f"{err.field or 'messages'}: {err.detail} ({err.code} {err.name})", err.field or "messages") from None
    room = served.context_length - len(prompt)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise BadRequest(f"the prompt has {len(prompt)} tokens and the model's context is {served.context_length}: "
                         f"room for {max(room, 0)} more, {asked or 1} asked", "max_tokens", "context_length_exceeded")
    n = req.n or 1
    cfg = GenConfig(max_new_tokens=asked or min(DEFAULT_MAX_TOKENS, room),
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    num_samples=n, batch_size=n, stop_strings=_stop_strings(req.stop))
    return prompt, cfg


# ----------------------------------------------------------------------------------------------
# Sampling -> answers


@dataclass
class Choice:
    """One sampled answer: its text and why it ended."""

    text: str
    finish_reason: str


def cut_at_stop(text: str, stops: list[str]) -> str:
    """Text before the earliest stop string (OpenAI returns responses without it)."""
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[: min(ends)] if ends else text


def sample(served: ServedModel, prompt: list[int], cfg: GenConfig, seed: int | None,
           on_step: StepListener | None = None) -> tuple[list[Choice], Rollout]:
    """Sample cfg.num_samples answers with `generation.generate` (one batch, under the model's lock)."""
    with served.lock:
        rollout = generate(served.model, served.tokenizer, [prompt], cfg, seed=seed, on_step=on_step)
    texts = decode_responses(rollout, served.tokenizer)
    choices = []
    for i, text in enumerate(texts):
        choices.append(Choice(cut_at_stop(text, cfg.stop_strings), "stop" if rollout.ended[i] else "length"))
    return choices, rollout


def _usage(prompt: list[int], rollout: Rollout) -> dict[str, int]:
    completion = int(rollout.response_mask.sum())
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


def completion_body(served: ServedModel, choices: list[Choice], usage: dict[str, int]) -> dict[str, Any]:
    """OpenAI's `chat.completion` object."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
        "model": served.name, "system_fingerprint": served.version,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": usage,
    }


def settled_text(tokenizer: PreTrainedTokenizerBase, token_ids: list[int], stops: list[str]) -> str:
    """The part of a growing answer that no later token can change: decoded and stripped as
    `decode_responses` does, cut before a stop string, without a trailing partial UTF-8 character,
    trailing whitespace, or an ending that is the start of a stop string."""
    text = cut_at_stop(tokenizer.decode(token_ids, skip_special_tokens=True).lstrip(), stops)
    text = text.rstrip("\ufffd").rstrip()
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[: len(text) - held]


class _Cancelled(Exception):
    """Raised inside generation when the streaming client has gone."""


async def stream_events(served: ServedModel, prompt: list[int], cfg: GenConfig, seed: int | None,
                        include_usage: bool, request: Request) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format while generating: a role chunk per choice, content
    chunks as text settles, a finish chunk per choice; then the usage chunk when asked; then `[DONE]`.
    Generation runs in a worker thread and hands its tokens over through a queue; this loop checks for
    a disconnected client between them (uvicorn drops writes to a closed connection silently)."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": served.name, "system_fingerprint": served.version}

    def event(choice_list: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**head, 'choices': choice_list, **extra}, ensure_ascii=False)}\n\n"

    def content(index: int, piece: str) -> str:
        return event([{"index": index, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}])

    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    gone = threading.Event()

    def hand_over(item: tuple[str, Any]) -> None:
        try:
            loop.call_soon_threadsafe(updates.put_nowait, item)
        except RuntimeError:  # the server's loop has closed (shutdown): nobody is listening
            raise _Cancelled from None

    def on_step(rows: torch.Tensor, tokens: torch.Tensor, ended: torch.Tensor) -> None:
        if gone.is_set():
            raise _Cancelled
        hand_over(("tokens", (rows.tolist(), tokens.tolist())))

    def work() -> None:
        try:
            result = sample(served, prompt, cfg, seed, on_step)
            hand_over(("done", result))
        except _Cancelled:
            log.info("streaming client disconnected: generation stopped")
        except Exception as err:  # reported to the client below; the HTTP status is already sent
            log.exception("chat completion failed while streaming")
            with contextlib.suppress(_Cancelled):
                hand_over(("error", err))

    token_ids: list[list[int]] = [[] for _ in range(cfg.num_samples)]
    sent = [""] * cfg.num_samples
    threading.Thread(target=work, name="serve-stream", daemon=True).start()
    try:
        for i in range(cfg.num_samples):
            yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        while True:
            try:
                kind, payload = await asyncio.wait_for(updates.get(), DISCONNECT_POLL_S)
            except TimeoutError:  # waiting for the model's lock, or a slow step
                kind, payload = "wait", None
            if await request.is_disconnected():
                return
            if kind == "error":
                error = {"message": "internal error while generating (see the server log)", "type": "server_error"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            if kind == "tokens":
                for row, token in zip(*payload, strict=True):
                    token_ids[row].append(token)
                    text = settled_text(served.tokenizer, token_ids[row], cfg.stop_strings)
                    if len(text) > len(sent[row]) and text.startswith(sent[row]):
                        yield content(row, text[len(sent[row]):])
                        sent[row] = text
            if kind != "done":
                continue
            choices, rollout = payload
            for i, choice in enumerate(choices):
                if len(choice.text) > len(sent[i]) and choice.text.startswith(sent[i]):
                    yield content(i, choice.text[len(sent[i]):])
                yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}])
            if include_usage:
                yield event([], usage=_usage(prompt, rollout))
            yield "data: [DONE]\n\n"
            return
    finally:
        gone.set()


# ----------------------------------------------------------------------------------------------
# The app


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as `param: message`, the param dotted without the leading `body`."""
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {first.get('msg')}" if param else str(first.get("msg"))), param


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_: Request, err: BadRequest) -> JSONResponse:
        return _error(err.status, err.message, err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(400, *_validation_message(err))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def crash(_: Request, err: Exception) -> JSONResponse:
        log.exception("chat completion failed")
        return _error(500, "internal error while generating (see the server log)")


def _auth(api_key: str | None) -> Any:
    """A dependency that requires `Authorization: Bearer <api_key>` when a key is set."""

    def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise BadRequest("Incorrect or missing API key (send Authorization: Bearer <key>)", None,
                             "invalid_api_key", status=401)

    return check


def create_app(served: ServedModel, api_key: str | None = None) -> FastAPI:
    """The OpenAI-compatible app over one loaded model (`GET /v1/models`, `POST /v1/chat/completions`)."""
    app = FastAPI(title="alignloop serve", docs_url=None, redoc_url=None, dependencies=[Depends(_auth(api_key))])
    _install_error_handlers(app)

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {"id": served.name, "object": "model", "created": served.created, "owned_by": "alignloop",
                "version": served.version, "max_model_len": served.context_length}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", response_model=None)
    def chat_completions(req: ChatRequest, request: Request) -> JSONResponse | StreamingResponse:
        prompt, cfg = prepare(served, req)
        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(stream_events(served, prompt, cfg, req.seed, bool(include), request),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices, rollout = sample(served, prompt, cfg, req.seed)
        return JSONResponse(completion_body(served, choices, _usage(prompt, rollout)))

    return app


def run(model_dir: str | Path, host: str, port: int, name: str | None, api_key: str | None,
        dtype: str = "float32", device: str = "auto") -> None:
    """Load the checkpoint and serve it with uvicorn until interrupted."""
    import uvicorn

    served = load_served(model_dir, name, dtype, device)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who can reach it can use the model (set %s)",
                    host, API_KEY_ENV)
    log.info("serving %s (version %s) at http://%s:%d/v1", served.name, served.version, host, port)
    uvicorn.run(create_app(served, api_key), host=host, port=port, server_header=False)
