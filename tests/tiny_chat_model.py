"""A tiny chat model folder and `alignloop serve` running it as a real process, shared by the serve tests
and the browser test whose chat task talks to the served model through the feedback app.

torch is imported only when a model is built, so importing this module (at collection) stays cheap.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from alignloop.config import TinyModelConfig

# Untied head: a fresh tied model's argmax just repeats its last input token.
TINY = TinyModelConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False)
WORDS = "the quick brown fox jumps over a lazy dog while seven red birds sing about data and models".split()


def build_tiny_chat_model(folder: Path) -> Path:
    """A randomly initialised 2-layer Llama with a 300-token BPE tokenizer, saved to `folder` (a few seconds)."""
    from alignloop.models import save_pretrained, tiny_model, train_tokenizer

    texts = [" ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 4 + i % 9)) + f" {i}" for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    return save_pretrained(tiny_model(TINY, tokenizer, seed=0), tokenizer, folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServeProcess:
    """A running `alignloop serve MODEL_DIR` on 127.0.0.1 (its output goes to `log_path`)."""

    url: str
    """The OpenAI-style base URL, `http://127.0.0.1:PORT/v1`."""
    process: subprocess.Popen[bytes]
    log_path: Path
    api_key: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Block until `GET /v1/models` answers 200 (loading torch and the model takes a few seconds)."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.process.poll() is None, f"alignloop serve exited {self.process.returncode}:\n{self.log()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/models", headers=headers, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"alignloop serve did not answer within {timeout_s} s:\n{self.log()[-3000:]}"
            time.sleep(0.2)


@contextmanager
def serve_process(model_dir: Path, name: str, log_path: Path, api_key: str | None = None) -> Iterator[ServeProcess]:
    """Start `alignloop serve` on a free port (returns at once: call `wait_ready` before using it); stopped on exit."""
    from alignloop.serve import API_KEY_ENV

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    cmd = [sys.executable, "-m", "alignloop.cli", "serve", str(model_dir), "--port", str(port), "--model-name", name,
           "--device", "cpu"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServeProcess(f"http://127.0.0.1:{port}/v1", process, log_path, api_key)
    try:
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
