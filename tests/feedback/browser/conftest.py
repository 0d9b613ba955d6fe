"""Browser tests: the real server (`alignloop app serve` in a subprocess) driven by headless Chromium.

Playwright for Python drives Debian's Chromium (`/usr/bin/chromium`); it never downloads a browser of
its own. What is missing is installed once per session where it can be: `apt-get install -y chromium`
(as root). The `playwright` package comes with the `dev` extra. Where either cannot be had, the tests
are skipped with the reason, except under CI=true, where they fail.

Each test gets its own server on a free port with a temporary SQLite database, a random 48-character
secret and plain-HTTP cookies; users, projects and memberships are made with the `alignloop app` CLI
against the same database. Screenshots and the server's log go to `$ALIGNLOOP_TEST_ARTIFACTS/<test>/`
(default: the test's tmp_path).
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import ARGON2_ENV, PASSWORD

CHROMIUM = Path("/usr/bin/chromium")


def skip_or_fail(reason: str) -> None:
    """Skip, or fail under CI=true where the browser tests must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " (CI=true: the browser tests must run)", pytrace=False)
    pytest.skip(reason)


def _apt_install_chromium() -> str:
    """Install Debian's chromium; returns '' on success or what went wrong."""
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install chromium"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:  # a stale or missing package list: update once, then try again
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"apt-get install chromium failed: {err}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["?"]
        return f"apt-get install chromium exited {done.returncode}: {tail[0]}"
    return ""


@pytest.fixture(scope="session")
def chromium_path() -> Path:
    """Debian's Chromium, installed with apt-get on first use if missing (once per session)."""
    if not CHROMIUM.exists():
        problem = _apt_install_chromium()
        if problem or not CHROMIUM.exists():
            skip_or_fail(f"{CHROMIUM} is missing and could not be installed: {problem or 'not there afterwards'}")
    return CHROMIUM


@pytest.fixture(scope="session")
def browser(chromium_path: Path) -> Iterator[Any]:
    """One headless Chromium for the session (each test opens its own contexts)."""
    if importlib.util.find_spec("playwright") is None:
        skip_or_fail("the playwright package is not installed (pip install -e '.[dev]')")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium_path), headless=True)
        yield browser
        browser.close()


# ---------------------------------------------------------------------------------------------------------
# The server under test


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alignloop_command() -> list[str]:
    """The `alignloop` console script of this interpreter's environment (or the module behind it)."""
    script = Path(sys.executable).with_name("alignloop")
    return [str(script)] if script.exists() else [sys.executable, "-c", "import sys; from alignloop.cli import main; sys.exit(main())"]


@dataclass
class LiveServer:
    """A running `alignloop app serve` and the `alignloop app` CLI on its database."""

    url: str
    env: dict[str, str]
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    users: dict[str, str] = field(default_factory=dict)

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `alignloop app ARGS...` against the server's database."""
        done = subprocess.run([*_alignloop_command(), "app", *args], env=self.env, cwd=self.workdir, input=stdin,
                              capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise AssertionError(f"alignloop app {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def add_user(self, name: str, admin: bool = False) -> str:
        self.cli("user", "add", name, *(["--admin"] if admin else []), "--password-stdin", stdin=PASSWORD + "\n")
        self.users[name] = PASSWORD
        return name

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""


def _wait_until_up(server: LiveServer, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    assert server.process is not None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise AssertionError(f"the server exited with {server.process.returncode}:\n{server.log()[-3000:]}")
        try:
            with urllib.request.urlopen(server.url + "/login", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise AssertionError(f"the server did not answer within {timeout_s} s:\n{server.log()[-3000:]}")


@pytest.fixture
def artifacts(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """Where this test's screenshots and server log go: $ALIGNLOOP_TEST_ARTIFACTS/<test> or tmp_path."""
    root = os.environ.get("ALIGNLOOP_TEST_ARTIFACTS")
    if not root:
        return tmp_path
    out = Path(root) / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture
def live_server(tmp_path: Path, artifacts: Path) -> Iterator[LiveServer]:
    """`alignloop app serve` on a free port with a fresh SQLite database (migrated by serve itself)."""
    workdir = tmp_path / "server"
    workdir.mkdir()
    port = free_port()
    env = {**os.environ, **ARGON2_ENV,
           "ALIGNLOOP_APP_DATABASE_URL": f"sqlite:///{workdir / 'feedback.db'}",
           "ALIGNLOOP_APP_SECRET_KEY": secrets.token_urlsafe(36),  # 48 characters
           "ALIGNLOOP_APP_COOKIE_SECURE": "false", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ALIGNLOOP_APP_SECRET_KEY_FILE", None)
    assert len(env["ALIGNLOOP_APP_SECRET_KEY"]) == 48
    server = LiveServer(url=f"http://127.0.0.1:{port}", env=env, workdir=workdir, log_path=artifacts / "server.log")
    with server.log_path.open("wb") as log:
        server.process = subprocess.Popen([*_alignloop_command(), "app", "serve", "--host", "127.0.0.1",
                                           "--port", str(port)], env=env, cwd=workdir, stdout=log, stderr=log)
        try:
            _wait_until_up(server)
            yield server
        finally:
            server.process.terminate()
            try:
                server.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()
