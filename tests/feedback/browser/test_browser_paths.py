"""W9: no request reaches a file outside the app, however its path or file name is spelled.

The live server runs in a folder beside a sentinel file holding a random token. Every GET route of
the app that takes a path parameter (found by walking the app's routes, so routes added later are
covered), every mount, and a few bare prefixes get `../` in many spellings (encoded once and twice,
backslashes, overlong UTF-8, `..;/`), absolute paths and the database's own file name, sent byte for
byte (no client-side normalisation), logged in as an admin and logged out. Each answer must be a
client error (or, logged out, the redirect to /login) and never contain the sentinel, /etc/passwd,
the SQLite database or our own source. Upload file names with `../` and absolute paths are used as
labels only: nothing is written where they point.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from browser_helpers import Shots, Visitor, cookie_header, raw_get
from starlette.routing import Mount

from alignloop.feedback.app import create_app
from alignloop.feedback.settings import Settings

pytestmark = pytest.mark.browser

DEPTH = 10
LEAKS = (b"root:x:0:0", b"SQLite format 3", b"{% extends", b"def create_app", b"[core]\n")
PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[a-z]+)?\}")


def traversals(sentinel: Path) -> list[str]:
    """Spellings of "a file outside the app" for one path segment (or several, where a route takes a path)."""
    up = [("../", "etc/passwd"), ("..%2f", "etc%2fpasswd"), ("%2e%2e/", "etc/passwd"), ("%2e%2e%2f", "etc%2fpasswd"),
          ("%252e%252e%252f", "etc%252fpasswd"), ("..%252f", "etc%252fpasswd"), ("....//", "etc/passwd"),
          ("..\\", "etc\\passwd"), ("..%5c", "etc%5cpasswd"), ("%c0%ae%c0%ae/", "etc/passwd"), ("..;/", "etc/passwd"),
          ("%2e%2e%5c", "etc%5cpasswd")]
    out = [step * DEPTH + target for step, target in up]
    out += [step + sentinel.name for step, _ in up]  # the server's cwd is one level below the sentinel
    out += ["/etc/passwd", "%2fetc%2fpasswd", "//etc/passwd", str(sentinel), quote(str(sentinel), safe=""),
            "feedback.db", "../server/feedback.db", "file:///etc/passwd", "..%00/etc/passwd", "%00", ".git/config",
            "alignloop/feedback/app.py", "templates/base.html", "..", "%2e%2e", "."]
    return out


def _routes(app: Any) -> list[tuple[str, set[str] | None]]:
    """(path, methods or None for a mount) of every route, through included routers (FastAPI >= 0.16x
    keeps them nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is flat
        return [(r.path, None if isinstance(r, Mount) else set(r.methods or ())) for r in app.routes]
    return [(str(r.path), None if isinstance(r.route, Mount) else set(r.methods or ()))
            for r in iter_route_contexts(app.routes)]


def route_paths(app: Any, variants: list[str]) -> list[str]:
    """Each GET route with a parameter, each mount, and bare prefixes, with every variant put in."""
    prefixes = {"/", "/static/", "/admin/", "/annotate/", "/api/v1/", "/api/v1/projects/"}
    templates = []
    for path, methods in _routes(app):
        if methods is None:
            prefixes.add(path.rstrip("/") + "/")
        elif PARAM.search(path) and "GET" in methods:
            templates.append(path)
    assert templates, "no GET route takes a path parameter: has the app changed shape?"
    paths = [prefix + v for prefix in sorted(prefixes) for v in variants]
    for template in templates:
        for v in variants:
            paths.append(PARAM.sub(v.replace("\\", "\\\\"), template))  # a backslash is literal here
            paths.append(PARAM.sub("1", template) + "/" + v)
            paths.append(PARAM.sub("1", template) + f"?kind={v}&path={v}&file={v}&name={v}")
    return [p if p.startswith("/") else "/" + p for p in paths]


def assert_no_leak(body: bytes, sentinel_token: bytes, where: str) -> None:
    assert sentinel_token not in body, f"the sentinel file was served at {where}"
    for leak in LEAKS:
        assert leak not in body, f"{leak!r} served at {where}"


def test_traversal_never_reaches_files_outside_the_app(live_server: Any, browser: Any, artifacts: Path,
                                                       tmp_path: Path) -> None:
    token = secrets.token_hex(16)
    sentinel = tmp_path / f"sentinel-{token[:8]}.txt"
    sentinel.write_text(f"SENTINEL {token}\n", encoding="utf-8")
    assert live_server.workdir.parent == tmp_path
    live_server.add_user("ada", admin=True)
    live_server.cli("project", "add", "paths")

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'routes.db'}", secret_key=secrets.token_urlsafe(36)))
    paths = route_paths(app, traversals(sentinel))
    app.state.ctx.database.dispose()

    admin = Visitor(browser, live_server.url, Shots(artifacts), "ada")
    admin.login("ada")
    statuses: dict[int, int] = {}
    for cookie in (cookie_header(admin.context), ""):
        for path in paths:
            status, headers, body = raw_get(live_server.url, path, cookie)
            where = f"{path} ({'admin' if cookie else 'anonymous'})"
            assert_no_leak(body, token.encode(), where)
            statuses[status] = statuses.get(status, 0) + 1
            if "?" in path:  # a page that ignores an unknown query parameter may answer; it serves no file
                assert status in (200, 303, 400, 401, 404, 422), f"{where}: {status}"
            elif cookie:
                assert status in (400, 404, 405, 422), f"{where}: {status}"
            else:
                assert status in (303, 400, 401, 404, 405, 422), f"{where}: {status}"
            if status in (301, 302, 303, 307, 308):
                assert headers["location"] in ("/login", "http://127.0.0.1/login") or headers["location"].startswith(
                    live_server.url + "/login"), f"{where} redirects to {headers['location']}"
    assert statuses.get(404, 0) > 0
    (artifacts / "statuses.json").write_text(json.dumps({"requests": 2 * len(paths), "statuses": statuses}) + "\n")

    # Upload file names are labels, never paths: nothing is written where they point.
    outside = tmp_path / "outside"
    outside.mkdir()
    names = ["../../outside/evil.jsonl", f"{outside}/evil-abs.jsonl", "..\\..\\outside\\evil-bs.jsonl",
             f"../{sentinel.name}"]
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "server" not in p.parts}
    admin.goto("/admin")
    admin.navigate(lambda: admin.page.click("a:text-is('paths')"))
    for i, name in enumerate(names):
        row = {"id": f"u{i}", "prompt": "Which?", "responses": [{"text": f"one {i}", "model": "m"},
                                                                 {"text": f"two {i}", "model": "m"}]}
        admin.page.set_input_files("input[type=file]", files={"name": name, "mimeType": "application/x-ndjson",
                                                              "buffer": (json.dumps(row) + "\n").encode()})
        response = admin.navigate(lambda: admin.page.click("form[enctype='multipart/form-data'] button"))
        assert response.status == 200 and admin.path().startswith("/admin/projects/")
    assert f"{len(names)} items" in admin.page.inner_text("body")
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "server" not in p.parts}
    new = set(after) - set(before)
    assert all(p.parent == Path(artifacts) for p in new), f"files appeared outside the server's folder: {new}"
    assert after[sentinel] == before[sentinel] and sentinel.read_text(encoding="utf-8") == f"SENTINEL {token}\n"
    admin.close()
