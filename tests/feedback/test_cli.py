"""`alignloop app ...`: the first admin, projects, import (all or nothing), export, tokens, migrate, and
`serve` refusing a weak secret and answering with JSON logs once started."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from feedback_helpers import PASSWORD, SECRET, item_row

from alignloop.cli import main
from alignloop.data import load_records
from alignloop.feedback import migrations, services
from alignloop.feedback.db import ChatEndpoint, Database
from alignloop.feedback.security import SEALED_PREFIX, unseal

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {"ALIGNLOOP_APP_DATABASE_URL": db_url, "ALIGNLOOP_APP_SECRET_KEY": SECRET,
              "ALIGNLOOP_APP_ARGON2_MEMORY_KIB": "19456", "ALIGNLOOP_APP_ARGON2_TIME_COST": "2",
              "ALIGNLOOP_APP_ARGON2_PARALLELISM": "1"}
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


def _user_add(monkeypatch: pytest.MonkeyPatch, *args: str, password: str = PASSWORD) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(password + "\n"))
    return main(["app", "user", "add", *args, "--password-stdin"])


def test_cli_setup_import_export(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert _user_add(monkeypatch, "boss", "--admin") == 0
    assert _user_add(monkeypatch, "boss") == 2  # taken
    assert _user_add(monkeypatch, "weak", password="short") == 2
    assert _user_add(monkeypatch, "ann") == 0
    assert main(["app", "project", "add", "cli", "--overlap", "1", "--annotator", "ann"]) == 0
    good = tmp_path / "items.jsonl"
    good.write_text("".join(json.dumps(item_row(f"c{i}")) + "\n" for i in range(3)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(item_row("z0")) + "\n" + json.dumps({**item_row("z1"), "responses": "nope"}) + "\n")
    capsys.readouterr()
    assert main(["app", "import", "cli", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "'responses'" in err and "D103" in err
    assert main(["app", "import", "cli", str(good)]) == 0
    assert "imported 3 items" in capsys.readouterr().out
    assert main(["app", "import", "cli", str(good)]) == 2  # the ids are taken now: nothing written twice
    assert main(["app", "import", "nope", str(good)]) == 2

    out = tmp_path / "votes.jsonl"
    assert main(["app", "export", "cli", "--kind", "votes", "--out", str(out)]) == 0
    assert out.read_text() == "" and '"kept": 0' in capsys.readouterr().out
    assert main(["app", "token", "add", "ann"]) == 2  # tokens are for admins
    assert main(["app", "token", "add", "boss"]) == 0
    token = capsys.readouterr().out.strip()
    assert len(token) >= 40


def test_cli_export_pairs_loads(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from alignloop.feedback import commands, services
    from alignloop.feedback.settings import Settings

    assert _user_add(monkeypatch, "ann") == 0
    assert main(["app", "project", "add", "p", "--annotator", "ann"]) == 0
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps(item_row("only")) + "\n")
    assert main(["app", "import", "p", str(items)]) == 0
    database = commands.open_database(Settings.from_env())
    try:
        with database.write() as db:
            project = services.project_by_name(db, "p")
            ann = next(u.id for u in services.users(db) if u.username == "ann")
            assignment = services.next_assignment(db, project, ann, 60)
            assert assignment is not None
            services.submit_label(db, project, ann, assignment.id, "left", "much better", 10, "k")
    finally:
        database.dispose()
    out = tmp_path / "pairs.jsonl"
    assert main(["app", "export", "p", "--out", str(out)]) == 0
    [pair] = load_records(out, "pair")
    assert pair.id == "only" and pair.margin == 3.0 and pair.strength == "much better"


def test_cli_migrate_down_and_up(env: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["app", "migrate", "--down"]) == 0
    assert "revision None" in capsys.readouterr().out
    assert main(["app", "migrate"]) == 0
    assert "revision 0005" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chat_project_with_a_clear_key(url: str) -> None:
    """A migrated database whose chat project's API key was stored in clear (as before keys were sealed)."""
    database = Database(url)
    try:
        migrations.upgrade(database.engine)
        with database.write() as db:
            project = services.create_project(db, "c", "", 1, "chat")
            db.add(ChatEndpoint(project_id=project.id, base_url="http://gpu-box:8001/v1", model="m", api_key="sk-clear-1"))
    finally:
        database.dispose()


def _stored_key(url: str) -> str | None:
    database = Database(url)
    try:
        with database.read() as db:
            return db.execute(sa.select(ChatEndpoint.api_key)).scalar_one()
    finally:
        database.dispose()


def test_serve_refuses_weak_secret_and_serves(tmp_path: Path) -> None:
    """`app serve` refuses a weak secret; with a good one it serves, logs each request as JSON, and first seals
    an API key stored in clear by an earlier version."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    _chat_project_with_a_clear_key(url)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "ALIGNLOOP_APP_DATABASE_URL": url}
    base.pop("ALIGNLOOP_APP_SECRET_KEY", None)
    command = [sys.executable, "-m", "alignloop.cli", "app", "serve"]
    weak = subprocess.run(command, env={**base, "ALIGNLOOP_APP_SECRET_KEY": "too-short"}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert weak.returncode == 2 and "SECRET_KEY is too weak" in weak.stderr
    port = _free_port()
    server = subprocess.Popen([*command, "--port", str(port)], env={**base, "ALIGNLOOP_APP_SECRET_KEY": SECRET},
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, response = time.monotonic() + 30, None
        while time.monotonic() < deadline and response is None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/login", timeout=2)
            except httpx.TransportError:
                time.sleep(0.2)
        assert response is not None and response.status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/v1/projects").status_code == 401
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    records = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("logger") == "alignloop.feedback.access"]
    assert {r["path"] for r in access} >= {"/login", "/api/v1/projects"} and all("ms" in r for r in access)
    assert any("sealed 1 chat model API keys" in r.get("message", "") for r in records), records[:5]
    stored = _stored_key(url)
    assert stored is not None and stored.startswith(SEALED_PREFIX) and unseal(SECRET, stored) == "sk-clear-1"
