"""`alignloop app model PROJECT`: show a chat project's model, or set it with --url through the same service
(and so the same checks) as `PUT /api/v1/projects/{id}/model`; the API key comes from an environment
variable and is never printed."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from alignloop.cli import main
from alignloop.feedback import commands, conversations, services
from alignloop.feedback.db import ChatEndpoint
from alignloop.feedback.settings import Settings

KEY = "sk-cli-model-123"
SECRET = "cli-model-test-secret-" + "x" * 24


@pytest.fixture
def env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A migrated database with a chat project "c" and a pairwise project "p"."""
    monkeypatch.setenv("ALIGNLOOP_APP_DATABASE_URL", db_url)
    monkeypatch.setenv("MODEL_KEY", KEY)
    monkeypatch.setenv("ALIGNLOOP_APP_SECRET_KEY", SECRET)  # the key is stored sealed under it
    monkeypatch.delenv("UNSET_KEY", raising=False)
    assert main(["app", "project", "add", "c", "--task", "chat"]) == 0
    assert main(["app", "project", "add", "p"]) == 0


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, object] | str]:
    """Exit status and the printed JSON (or the error line)."""
    capsys.readouterr()
    status = main(["app", "model", *args])
    out, err = capsys.readouterr()
    assert KEY not in out + err
    return status, json.loads(out) if status == 0 else err.strip()


def _stored(project: str) -> conversations.Endpoint | None:
    database = commands.open_database(Settings.from_env(), migrate=False)
    try:
        with database.read() as db:
            return conversations.endpoint(db, services.project_by_name(db, project), Settings.from_env().resolved_secret())
    finally:
        database.dispose()


def test_set_and_show_a_chat_projects_model(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "c") == (0, {"project": "c", "base_url": None})
    status, shown = _run(capsys, "c", "--url", " http://gpu-box:8001/v1 ", "--model", "sft-2", "--drafts", "3",
                         "--temperature", "0.5", "--max-tokens", "64", "--api-key-env", "MODEL_KEY")
    expected = {"project": "c", "base_url": "http://gpu-box:8001/v1", "model": "sft-2", "api_key_set": True,
                "n_drafts": 3, "temperature": 0.5, "top_p": None, "max_tokens": 64, "timeout_s": 60.0}
    assert (status, shown) == (0, expected)
    assert _run(capsys, "c") == (0, expected)
    assert _stored("c") == conversations.Endpoint("http://gpu-box:8001/v1", "sft-2", KEY, 3, 0.5, None, 64, 60.0,
                                                  key_stored=True)

    # Options left out take their defaults; the key stays unless replaced or cleared.
    assert _run(capsys, "c", "--url", "http://127.0.0.1:8001/v1", "--model", "tiny")[0] == 0
    assert _stored("c") == conversations.Endpoint("http://127.0.0.1:8001/v1", "tiny", KEY, key_stored=True)
    status, shown = _run(capsys, "c", "--url", "http://127.0.0.1:8001/v1", "--model", "tiny", "--clear-api-key")
    assert status == 0 and isinstance(shown, dict) and shown["api_key_set"] is False
    assert _stored("c") == conversations.Endpoint("http://127.0.0.1:8001/v1", "tiny", None)


REFUSED = [
    (["c", "--url", "ftp://gpu-box/v1", "--model", "m"], "Invalid: base URL: give http:// or https://"),
    (["c", "--url", "http://user:pw@gpu-box/v1", "--model", "m"], "Invalid: base URL: put no user name or password"),
    (["c", "--url", "http://gpu-box/v1", "--model", "m", "--drafts", "10"], "Invalid: drafts per turn must be between 1 and 9"),
    (["c", "--url", "http://gpu-box/v1", "--model", "m", "--top-p", "0"], "Invalid: top_p must be above 0"),
    (["c", "--url", "http://gpu-box/v1", "--model", "m", "--api-key-env", "UNSET_KEY"], "UNSET_KEY is not set"),
    (["c", "--url", "http://gpu-box/v1"], "--model is required with --url"),
    (["c", "--model", "m"], "give --url to set the model"),
    (["p", "--url", "http://gpu-box/v1", "--model", "m"], "Invalid: this project's task is pairwise, not chat"),
    (["p"], "Invalid: this project's task is pairwise, not chat"),
    (["nope", "--url", "http://gpu-box/v1", "--model", "m"], "NotFound"),
]


def test_refused_settings_change_nothing(env: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(capsys, "c", "--url", "http://gpu-box:8001/v1", "--model", "m", "--api-key-env", "MODEL_KEY")[0] == 0
    before = _stored("c")
    for args, message in REFUSED:
        status, error = _run(capsys, *args)
        assert status == 2 and isinstance(error, str), (args, error)
        assert error.startswith("alignloop app model: ") and message in error, (args, error)
    assert _stored("c") == before


def test_a_key_is_only_stored_sealed(env: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the app secret a key cannot be sealed, so the command refuses it and stores nothing; with it,
    the database holds only the sealed form."""
    monkeypatch.delenv("ALIGNLOOP_APP_SECRET_KEY")
    status, error = _run(capsys, "c", "--url", "http://gpu-box:8001/v1", "--model", "m", "--api-key-env", "MODEL_KEY")
    assert status == 2 and isinstance(error, str) and "secret" in error.lower(), error
    assert _run(capsys, "c") == (0, {"project": "c", "base_url": None})
    assert _run(capsys, "c", "--url", "http://gpu-box:8001/v1", "--model", "m")[0] == 0  # no key: no secret needed
    monkeypatch.setenv("ALIGNLOOP_APP_SECRET_KEY", SECRET)
    assert _run(capsys, "c", "--url", "http://gpu-box:8001/v1", "--model", "m", "--api-key-env", "MODEL_KEY")[0] == 0
    database = commands.open_database(Settings.from_env(), migrate=False)
    try:
        with database.read() as db:
            stored = db.execute(sa.select(ChatEndpoint.api_key)).scalar_one()
    finally:
        database.dispose()
    assert stored.startswith("sealed:v1:") and KEY not in stored
