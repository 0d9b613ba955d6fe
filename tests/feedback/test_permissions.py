"""W1: every route x method x role answers as the committed matrix says (permission_matrix.json).

The test enumerates the app's routes: a new route without an entry fails, and so does an entry for a
route that no longer exists. Each request carries the role's credentials (session cookie with its CSRF
token, or an admin's API token) and no body, so the status tells only whether the role gets through:
401 or 303 (to /login) = not logged in, 403 = wrong role, 404 = not visible, anything else = allowed
(422 = allowed, body missing). To review changes, run with ALIGNLOOP_WRITE_MATRIX=1 and diff the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from feedback_helpers import add_project, add_user, anonymous_client, session_client, token_client

MATRIX = Path(__file__).with_name("permission_matrix.json")
ROLES = ("anonymous", "annotator", "annotator_other_project", "admin", "admin_token")


def _routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, through included routers (FastAPI >= 0.16x keeps them nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        routes: list[Any] = [r for r in app.routes if isinstance(r, APIRoute)]
        assert len(routes) == len(app.routes), "a route that is not an API route: give it an entry and a role check"
    else:
        routes = list(iter_route_contexts(app.routes))
    out = []
    for route in routes:
        assert route.path and route.methods, f"{route!r} has no path or methods"
        out += [(method, route.path) for method in sorted(route.methods)]
    return sorted(out)


def _observe(app: FastAPI) -> dict[str, dict[str, int]]:
    add_user(app, "boss", "admin")
    add_user(app, "ann")
    add_user(app, "other")
    pid = add_project(app, "p", ["ann"], n_items=50)
    add_project(app, "q", ["other"], n_items=1)
    observed = {}
    for method, path in _routes(app):
        url = path.replace("{project_id}", str(pid))
        assert "{" not in url, f"unknown path parameter in {path}: extend this test"
        row = {}
        for role in ROLES:
            client = {
                "anonymous": lambda: anonymous_client(app),
                "annotator": lambda: session_client(app, "ann"),
                "annotator_other_project": lambda: session_client(app, "other"),
                "admin": lambda: session_client(app, "boss"),
                "admin_token": lambda: token_client(app, "boss"),
            }[role]()  # a fresh login each time: /logout ends the session it is sent with
            row[role] = client.request(method, url).status_code
        observed[f"{method} {path}"] = row
    return observed


def test_w1_route_role_matrix(app: FastAPI) -> None:
    observed = _observe(app)
    if os.environ.get("ALIGNLOOP_WRITE_MATRIX") == "1":
        MATRIX.write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
    expected = json.loads(MATRIX.read_text())
    assert sorted(observed) == sorted(expected), (
        f"routes without a matrix entry: {sorted(set(observed) - set(expected))}; "
        f"entries without a route: {sorted(set(expected) - set(observed))}")
    wrong = {key: (expected[key], got) for key, got in observed.items() if got != expected[key]}
    assert not wrong, f"(expected, observed) per route: {json.dumps(wrong, indent=1)}"


def test_w1_matrix_never_lets_lower_roles_into_admin_routes() -> None:
    """A guard on the matrix file itself: admin-only areas refuse annotators and strangers."""
    for key, row in json.loads(MATRIX.read_text()).items():
        _, path = key.split(" ", 1)
        if path.startswith(("/admin", "/api/")):
            assert row["annotator"] == row["annotator_other_project"] == 403, key
            assert row["anonymous"] in (303, 401), key
        if key != "GET /login" and key != "POST /login":
            assert row["anonymous"] in (303, 401), key
