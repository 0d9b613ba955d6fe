"""Secure boot (W4), passwords and brute force (W5), CSRF and cookies (W6), and the app's independence
from torch. Each runs on SQLite and PostgreSQL where it touches the database."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from argon2 import extract_parameters
from fastapi import FastAPI
from fastapi.testclient import TestClient
from feedback_helpers import (
    FAST_HASHING,
    PASSWORD,
    SECRET,
    add_user,
    anonymous_client,
    count,
    ctx,
    form_csrf,
    session_client,
    table_snapshot,
)

from alignloop.feedback import auth, security
from alignloop.feedback.app import create_app
from alignloop.feedback.db import AuthSession, Project, User
from alignloop.feedback.settings import (
    OWASP_MEMORY_KIB,
    OWASP_PARALLELISM,
    OWASP_TIME_COST,
    Settings,
    SettingsError,
)

REPO = Path(__file__).resolve().parents[2]


def test_app_does_not_import_torch() -> None:
    code = ("import sys\nimport alignloop.feedback.app, alignloop.feedback.commands, alignloop.cli\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))\n"
            "assert 'transformers' not in sys.modules\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- W4: secure boot ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", ["", "short", "x" * 40, "abcdefgh" * 3])
def test_w4_refuses_missing_or_weak_secret(secret: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="SECRET_KEY"):
        create_app(Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", secret_key=secret))


def test_w4_secret_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    path.chmod(0o644)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", secret_key_file=str(path), **FAST_HASHING)
    with pytest.raises(SettingsError, match="readable by others"):
        settings.validate()
    path.chmod(stat.S_IRUSR | stat.S_IWUSR)
    settings.validate()
    assert settings.resolved_secret() == SECRET


def test_w4_settings_from_env_and_no_weak_hashing_by_env() -> None:
    env = {"ALIGNLOOP_APP_DATABASE_URL": "sqlite:///a.db", "ALIGNLOOP_APP_SECRET_KEY": SECRET,
           "ALIGNLOOP_APP_COOKIE_SECURE": "false", "ALIGNLOOP_APP_ALLOWED_ORIGINS": "https://a.example, https://b.example",
           "ALIGNLOOP_APP_ARGON2_MEMORY_KIB": "1024", "ALIGNLOOP_APP_ALLOW_WEAK_HASHING": "true"}
    settings = Settings.from_env(env)
    assert settings.database_url == "sqlite:///a.db" and settings.cookie_secure is False
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.allow_weak_hashing is False
    with pytest.raises(SettingsError, match="OWASP"):
        settings.validate()
    assert Settings().cookie_secure is True and Settings().secret_key == ""
    with pytest.raises(SettingsError, match="COOKIE_SECURE"):
        Settings.from_env({"ALIGNLOOP_APP_COOKIE_SECURE": "maybe"})


def test_w4_no_default_users_and_no_signup(app: FastAPI) -> None:
    assert count(app, User) == 0
    paths = {getattr(r, "path", "") for r in app.routes}
    assert not [p for p in paths if any(w in p for w in ("signup", "register", "sign-up"))]
    client = anonymous_client(app)
    for path in ("/signup", "/register", "/api/v1/users"):
        assert client.post(path, data={"username": "x", "password": PASSWORD}).status_code in (404, 405)
    assert count(app, User) == 0


# --- W5: passwords and brute force -------------------------------------------------------------------------


def test_w5_default_hash_is_argon2id_at_least_owasp(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'x.db'}", secret_key=SECRET)
    settings.validate()
    from alignloop.feedback.security import password_hasher

    digest = password_hasher(settings).hash(PASSWORD)
    params = extract_parameters(digest)
    assert digest.startswith("$argon2id$")
    assert params.memory_cost >= OWASP_MEMORY_KIB and params.time_cost >= OWASP_TIME_COST
    assert params.parallelism >= OWASP_PARALLELISM


def test_w5_stored_hashes_and_legacy_upgrade(app: FastAPI, settings: Settings) -> None:
    add_user(app, "ann")
    stronger = Settings(**{**vars(settings), "argon2_memory_kib": 128, "argon2_time_cost": 2})
    app2 = create_app(stronger)
    try:
        assert auth.login(ctx(app2), "ann", PASSWORD) is not None
        with ctx(app2).database.read() as db:
            digest = db.execute(sa.select(User.password_hash)).scalar_one()
        assert digest.startswith("$argon2id$") and extract_parameters(digest).memory_cost == 128
    finally:
        ctx(app2).database.dispose()


def test_w5_eleventh_failure_in_a_minute_is_429(app: FastAPI) -> None:
    add_user(app, "ann")
    client = anonymous_client(app)
    token = form_csrf(client.get("/login").text)
    statuses = [client.post("/login", data={"username": "ann", "password": f"wrong {i}", "csrf_token": token}).status_code
                for i in range(11)]
    assert statuses == [401] * 10 + [429]
    right = client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": token})
    assert right.status_code == 429 and count(app, AuthSession) == 0  # even the right password waits
    # another address is limited by the user name too
    other = anonymous_client(app)
    other_token = form_csrf(other.get("/login").text)
    assert other.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": other_token}).status_code == 429


def test_w5_unknown_user_and_wrong_password_look_alike(app: FastAPI) -> None:
    add_user(app, "ann")
    client = anonymous_client(app)
    token = form_csrf(client.get("/login").text)
    a = client.post("/login", data={"username": "ann", "password": "nope nope nope", "csrf_token": token})
    b = client.post("/login", data={"username": "nobody", "password": "nope nope nope", "csrf_token": token})
    assert a.status_code == b.status_code == 401 and "Wrong user name or password" in a.text and "Wrong" in b.text


# --- W6: CSRF and cookies ----------------------------------------------------------------------------------


def test_w6_writes_need_token_and_same_origin(app: FastAPI) -> None:
    add_user(app, "boss", "admin")
    client = session_client(app, "boss")
    good = client.headers.pop("X-CSRF-Token")
    before = table_snapshot(ctx(app).database)
    form = {"name": "p", "overlap_k": "1"}
    assert client.post("/admin/projects", data=form).status_code == 403
    assert client.post("/admin/projects", data={**form, "csrf_token": "0" * 64}).status_code == 403
    evil = {"Origin": "https://evil.example"}
    assert client.post("/admin/projects", data={**form, "csrf_token": good}, headers=evil).status_code == 403
    assert client.post("/admin/projects", data={**form, "csrf_token": good},
                       headers={"Referer": "https://evil.example/page"}).status_code == 403
    assert client.post("/api/v1/projects", json={"name": "p"}, headers={"Origin": "null", "X-CSRF-Token": good}).status_code == 403
    assert client.post("/logout").status_code == 403
    assert table_snapshot(ctx(app).database) == before
    ok = client.post("/admin/projects", data={**form, "csrf_token": good}, headers={"Origin": "http://testserver"})
    assert ok.status_code == 303 and count(app, Project) == 1


def test_w6_login_form_needs_its_token(app: FastAPI) -> None:
    add_user(app, "ann")
    client = anonymous_client(app)
    client.get("/login")
    assert client.post("/login", data={"username": "ann", "password": PASSWORD}).status_code == 403
    assert count(app, AuthSession) == 0


@pytest.mark.parametrize("secure", [True, False])
def test_w6_cookie_flags(settings: Settings, secure: bool) -> None:
    app = create_app(Settings(**{**vars(settings), "cookie_secure": secure, "cookie_samesite": "strict"}))
    try:
        add_user(app, "ann")
        client = TestClient(app, base_url="https://testserver" if secure else "http://testserver", follow_redirects=False)
        page = client.get("/login")
        response = client.post("/login", data={"username": "ann", "password": PASSWORD, "csrf_token": form_csrf(page.text)})
        assert response.status_code == 303
        cookie = next(c for c in response.headers.get_list("set-cookie") if "alignloop_session=" in c).lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
        assert ("secure" in cookie.split("; ")) is secure
        assert cookie.startswith("__host-alignloop_session=") is secure
    finally:
        ctx(app).database.dispose()


def test_security_headers(app: FastAPI) -> None:
    response = anonymous_client(app).get("/login")
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'nonce-" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["x-content-type-options"] == "nosniff" and response.headers["x-frame-options"] == "DENY"


def test_logout_ends_the_session(app: FastAPI) -> None:
    add_user(app, "ann")
    client = session_client(app, "ann")
    assert client.get("/annotate").status_code == 200
    assert client.post("/logout").status_code == 303 and count(app, AuthSession) == 0
    assert client.get("/annotate").status_code == 303  # back to the login page


def test_sealed_values_open_only_under_their_secret() -> None:
    """seal/unseal: a round trip under one secret; another secret or one altered character is Unsealable;
    each seal is new (random IV), and a value stored before sealing existed reads as it is."""
    one, two = "a" * 40, "b" * 40
    sealed = security.seal(one, "sk-é-123")
    assert sealed.startswith(security.SEALED_PREFIX) and "sk-" not in sealed
    assert security.unseal(one, sealed) == "sk-é-123"
    assert security.seal(one, "sk-é-123") != sealed
    with pytest.raises(security.Unsealable):
        security.unseal(two, sealed)
    body = sealed[len(security.SEALED_PREFIX):]
    flipped = body[:20] + ("A" if body[20] != "A" else "B") + body[21:]
    with pytest.raises(security.Unsealable):
        security.unseal(one, security.SEALED_PREFIX + flipped)
    assert security.unseal(one, "sk-from-before") == "sk-from-before"
