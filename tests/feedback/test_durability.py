"""W11: the real server (`alignloop app serve` in a subprocess) is SIGKILLed mid-load again and again while
annotators submit labels over HTTP, and restarted each time. Afterwards every acknowledged label (303) is in
the database exactly once, nothing unacknowledged-and-unresent is there either, the database passes its
integrity checks (SQLite `integrity_check` and `foreign_key_check`; on both, no orphan rows and assignment
states that agree with their labels), and resending every acknowledged submission with its idempotency key
adds nothing. On SQLite and PostgreSQL; 10 kills in the default run, 50 (RELIABILITY.md) under -m slow.

The annotators behave like the page's own form: a request that got no answer (the server died under it) is
sent again, same key, until it is answered; so every submission ends acknowledged, and any label stored
twice or lost shows up as a count that differs from the acknowledgements.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import SECRET, add_project, add_user, ctx, login_token
from tiny_chat_model import free_port

from alignloop.feedback.backup import integrity_problems
from alignloop.feedback.db import Label, User

ANNOTATORS, ITEMS = 8, 400
ACKS_BEFORE_KILL = 3
"""Each kill waits for this many acknowledgements from the current server, so it lands mid-load."""
VOTES = ("left:better", "right:much better", "tie", "both_bad", "left:slightly better")
T = TypeVar("T")


LAUNCHER = """
import os, signal, sys
from alignloop.cli import main
import alignloop.feedback.app, alignloop.feedback.commands, uvicorn
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the servers that die
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(2, 1)
        os._exit(main(sys.argv[1:]))
    print(pid, flush=True)
"""
"""Forks `alignloop app serve ARGS` (alignloop.cli.main, as the console script runs it) for each line on stdin
and prints the server's pid. The imports are done once, before forking: a restart then costs what `serve`
itself does (0.1-0.3 s) instead of 2-3 s of imports on a busy 2-core machine, so 10 kills fit in seconds."""


@dataclass
class Server:
    """`alignloop app serve` on one port and database, SIGKILLed and restarted at will."""

    db_url: str
    log_path: Path
    port: int = field(default_factory=free_port)
    launcher: subprocess.Popen[str] | None = None
    pid: int | None = None
    starts: list[float] = field(default_factory=list)
    """Seconds from each (re)start to the first answer."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Fork a server and wait for its first answer."""
        if self.launcher is None:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNLOOP_APP_DATABASE_URL": self.db_url,
                   "ALIGNLOOP_APP_SECRET_KEY": SECRET, "ALIGNLOOP_APP_COOKIE_SECURE": "0",
                   "ALIGNLOOP_APP_ARGON2_MEMORY_KIB": "19456", "ALIGNLOOP_APP_ARGON2_TIME_COST": "2",
                   "ALIGNLOOP_APP_ARGON2_PARALLELISM": "1"}
            with self.log_path.open("ab") as log:
                self.launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, "app", "serve", "--port", str(self.port)],
                                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                                 text=True)
        assert self.launcher.stdin is not None and self.launcher.stdout is not None
        began = time.monotonic()
        self.launcher.stdin.write("serve\n")
        self.launcher.stdin.flush()
        line = self.launcher.stdout.readline()
        if not line:
            raise AssertionError(f"the launcher exited with {self.launcher.wait()}:\n{self.log()}")
        self.pid = int(line)
        while time.monotonic() < began + 60:
            if not self._alive():
                raise AssertionError(f"the server exited:\n{self.log()}")
            try:
                if httpx.get(self.url + "/login", timeout=2).status_code == 200:
                    self.starts.append(time.monotonic() - began)
                    return
            except httpx.TransportError:
                time.sleep(0.01)
        raise AssertionError(f"the server did not answer within 60 s:\n{self.log()}")

    def _alive(self) -> bool:
        try:
            os.kill(self.pid or 0, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the server and wait until it is gone."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        while self._alive():
            time.sleep(0.005)

    def stop(self) -> None:
        if self.pid is not None and self._alive():
            self.kill()
        if self.launcher is not None:
            self.launcher.communicate(timeout=30)  # closes its stdin: it exits

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@dataclass
class Load:
    """What the annotators saw: acknowledged submissions (user, key, assignment id, vote), requests that got
    no answer, and any answer other than the expected one."""

    acked: list[tuple[str, str, int, str]] = field(default_factory=list)
    cut_off: int = 0
    """Requests the server received and died under (the connection broke after it was made)."""
    resent: int = 0
    """Requests sent again because the first try got no answer (cut off, or no server listening)."""
    unexpected: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    deadline: float = 0.0


def _until_answered(load: Load, request: Callable[[], T]) -> T:
    """Send until the server answers: a dead server's requests are resent, as the page does."""
    tries = 0
    while True:
        try:
            return request()
        except httpx.TransportError as err:
            with load.lock:
                load.cut_off += tries == 0 and not isinstance(err, httpx.ConnectError)
                load.resent += tries == 0
            tries += 1
            if time.monotonic() > load.deadline:
                raise
            time.sleep(0.05)


def _annotate(server: Server, pid: int, name: str, cookie: str, csrf: str, load: Load) -> None:
    headers = {"Cookie": f"alignloop_session={cookie}", "X-CSRF-Token": csrf}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        n = 0
        while not load.stop.is_set():
            page = _until_answered(load, lambda: http.get(f"/annotate/{pid}"))
            found = re.search(r'name="assignment_id" value="(\d+)"', page.text)
            if page.status_code != 200 or found is None:
                load.unexpected.append(f"{name}: GET {page.status_code}, no item")
                return
            key, vote = f"{name}-{n}", VOTES[n % len(VOTES)]
            form = {"assignment_id": found.group(1), "vote": vote, "idempotency_key": key}
            status = _until_answered(load, lambda f=form: http.post(f"/annotate/{pid}/label", data=f).status_code)
            if status != 303:
                load.unexpected.append(f"{name}: POST {key} answered {status}")
                return
            with load.lock:
                load.acked.append((name, key, int(found.group(1)), vote))
            n += 1


def _stored_labels(app: FastAPI) -> list[tuple[str, str, int, str | None, str | None]]:
    with ctx(app).database.read() as db:
        return [tuple(r) for r in db.execute(  # type: ignore[misc]
            sa.select(User.username, Label.idempotency_key, Label.assignment_id, Label.displayed_choice,
                      Label.strength).join(User, User.id == Label.user_id).order_by(Label.id)).all()]


def _as_stored(vote: str) -> tuple[str, str | None]:
    side, _, strength = vote.partition(":")
    return side, strength or None


@pytest.mark.parametrize("kills", [10, pytest.param(50, marks=pytest.mark.slow)])
def test_w11_sigkill_mid_load_loses_no_acknowledged_label(app: FastAPI, db_url: str, tmp_path: Path, kills: int) -> None:
    names = [f"ann{i}" for i in range(ANNOTATORS)]
    for name in names:
        add_user(app, name)
    pid = add_project(app, "crash", names, n_items=ITEMS, k=ANNOTATORS)
    logins = {name: login_token(app, name) for name in names}
    server = Server(db_url, tmp_path / "server.log")
    load = Load(deadline=time.monotonic() + 30 + 10 * kills)
    began = time.monotonic()
    server.start()
    workers = [threading.Thread(target=_annotate, args=(server, pid, n, *logins[n], load)) for n in names]
    for worker in workers:
        worker.start()
    rng = random.Random(11)
    try:
        for _ in range(kills):
            acked_before = len(load.acked)
            while len(load.acked) < acked_before + ACKS_BEFORE_KILL and not load.unexpected:
                assert time.monotonic() < load.deadline, f"no progress:\n{server.log()}"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.2))
            server.kill()
            server.start()
        load.stop.set()
        for worker in workers:
            worker.join(timeout=60)
        assert not any(w.is_alive() for w in workers)
        assert load.unexpected == []

        stored = _stored_labels(app)
        acked = {(name, key): (assignment, *_as_stored(vote)) for name, key, assignment, vote in load.acked}
        assert len(acked) == len(load.acked)
        assert {(name, key): tuple(rest) for name, key, *rest in stored} == acked
        assert len(stored) == len(acked)  # no label twice, none without an acknowledgement
        assert integrity_problems(ctx(app).database.engine) == []

        def resend(name: str, key: str, assignment: int, vote: str) -> int:
            cookie, csrf = logins[name]
            form = {"assignment_id": str(assignment), "vote": vote, "idempotency_key": key}
            return httpx.post(f"{server.url}/annotate/{pid}/label", data=form, timeout=30,
                              headers={"Cookie": f"alignloop_session={cookie}", "X-CSRF-Token": csrf}).status_code

        assert {resend(*submission) for submission in load.acked} == {303}
        assert _stored_labels(app) == stored
    finally:
        load.stop.set()
        server.stop()
    elapsed = time.monotonic() - began
    # The kills landed on requests in flight (8 annotators never pause), so resends really happened.
    assert load.cut_off >= kills
    print(f"\nW11 {ctx(app).database.dialect}: {kills} SIGKILLs in {elapsed:.1f} s, {len(load.acked)} labels "
          f"acknowledged and all present; {load.cut_off} requests cut off by a kill, {load.resent} resent; server "
          f"start {min(server.starts):.2f}-{max(server.starts):.2f} s")
