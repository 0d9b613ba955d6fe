"""Server-rendered pages: login, the admin's projects, and the annotator's pairwise comparison.

Handlers are thin: check the role (the `require` dependency), open one transaction, call services,
render or redirect. Every write answers only after its transaction has committed (POST, then 303 to
the page that shows the new state), so a label the browser saw acknowledged is on disk.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from alignloop.feedback import auth, records, security, services
from alignloop.feedback.auth import LOGIN_COOKIE, Principal, app_context, require, require_login_form

router = APIRouter(include_in_schema=False)
Admin = Annotated[Principal, Depends(require("admin"))]
Anyone = Annotated[Principal, Depends(require("admin", "annotator"))]


def render(request: Request, name: str, me: Principal | None, status: int = 200, **values: Any) -> Response:
    """A template with the user, their CSRF token and this response's CSP nonce."""
    ctx = app_context(request)
    csrf = security.csrf_token(ctx.secret, me.session_hash) if me and me.session_hash else ""
    return ctx.templates.TemplateResponse(
        request, name, {"me": me, "csrf": csrf, "nonce": request.state.csp_nonce, **values}, status_code=status)


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    settings = app_context(request).settings
    response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, secure=settings.cookie_secure,
                        samesite=settings.cookie_samesite)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Login


@router.get("/")
def home(me: Anyone) -> RedirectResponse:
    return see_other("/admin" if me.is_admin else "/annotate")


def _login_page(request: Request, status: int = 200, error: str = "") -> Response:
    """The login form with a CSRF token bound to a pre-login cookie (set here if missing)."""
    ctx = app_context(request)
    nonce = request.cookies.get(LOGIN_COOKIE) or security.new_token()
    response = render(request, "login.html", None, status, error=error,
                      login_csrf=security.csrf_token(ctx.secret, "login:" + nonce))
    _set_cookie(request, response, LOGIN_COOKIE, nonce, 3600)
    return response


@router.get("/login")
def login_form(request: Request) -> Response:
    return _login_page(request)


@router.post("/login", dependencies=[Depends(require_login_form)])
def login(request: Request, username: Annotated[str, Form(max_length=64)],
          password: Annotated[str, Form(max_length=1024)]) -> Response:
    """Sign in; after `login_failures_per_minute` failures for a name or address, 429 for a minute."""
    ctx = app_context(request)
    keys = (f"user:{username.lower()}", f"ip:{request.client.host if request.client else '?'}")
    if ctx.throttle.blocked(*keys):
        auth.logger.warning("login throttled", extra={"user": username})
        return _login_page(request, 429, "Too many failed logins; wait a minute.")
    token = auth.login(ctx, username, password)
    if token is None:
        ctx.throttle.failed(*keys)
        auth.logger.warning("login failed", extra={"user": username})
        return _login_page(request, 401, "Wrong user name or password.")
    ctx.throttle.reset(keys[0])
    response = see_other("/")
    _set_cookie(request, response, ctx.session_cookie, token, int(ctx.settings.session_hours * 3600))
    return response


@router.post("/logout")
def logout(request: Request, me: Anyone) -> Response:
    ctx = app_context(request)
    auth.logout(ctx, me)
    response = see_other("/login")
    response.delete_cookie(ctx.session_cookie, path="/", secure=ctx.settings.cookie_secure, httponly=True,
                           samesite=ctx.settings.cookie_samesite)  # type: ignore[arg-type]
    return response


# ---------------------------------------------------------------------------------------------------------
# Admin


@router.get("/admin", response_class=HTMLResponse)
def admin_home(request: Request, me: Admin) -> Response:
    with app_context(request).database.read() as db:
        projects = services.projects_for(db, me.user_id, admin=True)
        users = services.users(db)
    return render(request, "admin.html", me, projects=projects, users=users)


@router.post("/admin/projects")
def admin_create_project(request: Request, me: Admin, name: Annotated[str, Form(max_length=200)],
                         overlap_k: Annotated[int, Form(ge=1, le=100)] = 1,
                         guidelines: Annotated[str, Form(max_length=100_000)] = "") -> Response:
    with app_context(request).database.write() as db:
        project = services.create_project(db, name, guidelines, overlap_k)
    return see_other(f"/admin/projects/{project.id}")


@router.post("/admin/users")
def admin_create_user(request: Request, me: Admin, username: Annotated[str, Form(max_length=64)],
                      password: Annotated[str, Form(max_length=1024)],
                      role: Annotated[str, Form()] = "annotator") -> Response:
    ctx = app_context(request)
    with ctx.database.write() as db:
        try:
            auth.create_user(db, ctx.hasher, username, password, role)
        except ValueError as err:
            raise services.Invalid(str(err)) from None
    return see_other("/admin")


@router.post("/admin/tokens", response_class=HTMLResponse)
def admin_create_token(request: Request, me: Admin, name: Annotated[str, Form(max_length=100)] = "token") -> Response:
    with app_context(request).database.write() as db:
        token = auth.create_api_token(db, me.username, name)
    return render(request, "message.html", me, title="New API token",
                  message="Copy this token now; it is not shown again.", secret=token)


@router.get("/admin/projects/{project_id}", response_class=HTMLResponse)
def admin_project(request: Request, project_id: int, me: Admin) -> Response:
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        progress = services.project_progress(db, project)
        team = services.members(db, project)
    return render(request, "project.html", me, project=project, progress=progress, members=team,
                  export_kinds=records.EXPORT_KINDS)


@router.post("/admin/projects/{project_id}/members")
def admin_add_member(request: Request, project_id: int, me: Admin, username: Annotated[str, Form(max_length=64)]) -> Response:
    with app_context(request).database.write() as db:
        services.add_member(db, services.admin_project(db, project_id), username)
    return see_other(f"/admin/projects/{project_id}")


@router.post("/admin/projects/{project_id}/items")
async def admin_import(request: Request, project_id: int, me: Admin, file: Annotated[UploadFile, File()]) -> Response:
    """JSON Lines upload; all-or-nothing (DataError names the line and field, 400)."""
    ctx = app_context(request)
    data = await file.read(ctx.settings.max_upload_bytes + 1)
    if len(data) > ctx.settings.max_upload_bytes:
        raise services.Invalid(f"the upload is larger than {ctx.settings.max_upload_bytes} bytes")
    items = records.parse_jsonl(data, file.filename or "upload.jsonl")
    with ctx.database.write() as db:
        services.import_items(db, services.admin_project(db, project_id), items, file.filename or "upload.jsonl")
    return see_other(f"/admin/projects/{project_id}")


# ---------------------------------------------------------------------------------------------------------
# Annotation


@router.get("/annotate", response_class=HTMLResponse)
def annotate_home(request: Request, me: Anyone) -> Response:
    ctx = app_context(request)
    with ctx.database.read() as db:
        projects = services.projects_for(db, me.user_id, admin=False)
        rows = [(p, services.user_progress(db, p, me.user_id, ctx.settings.assignment_ttl_minutes)) for p in projects]
    return render(request, "annotate_home.html", me, rows=rows)


@router.get("/annotate/{project_id}", response_class=HTMLResponse)
def annotate(request: Request, project_id: int, me: Anyone) -> Response:
    """The next item (assigned now if the user has none open), with progress and the undo button."""
    ctx = app_context(request)
    ttl = ctx.settings.assignment_ttl_minutes
    with ctx.database.write() as db:
        project = services.member_project(db, me.user_id, project_id, lock=True)
        assignment = services.next_assignment(db, project, me.user_id, ttl)
        view = services.item_view(db, assignment) if assignment is not None else None
        progress = services.user_progress(db, project, me.user_id, ttl)
    return render(request, "annotate.html", me, project=project, view=view, progress=progress,
                  idempotency_key=secrets.token_urlsafe(16))


@router.post("/annotate/{project_id}/label")
def annotate_label(request: Request, project_id: int, me: Anyone, assignment_id: Annotated[int, Form()],
                   vote: Annotated[str, Form(max_length=40)], idempotency_key: Annotated[str, Form(max_length=64)],
                   time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    """`vote` is "left:<strength>", "right:<strength>", "tie" or "both_bad" (one button each)."""
    displayed, _, strength = vote.partition(":")
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        services.submit_label(db, project, me.user_id, assignment_id, displayed, strength or None, time_spent_ms,
                              idempotency_key)
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/skip")
def annotate_skip(request: Request, project_id: int, me: Anyone, assignment_id: Annotated[int, Form()],
                  reason: Annotated[str, Form(max_length=1000)], idempotency_key: Annotated[str, Form(max_length=64)],
                  time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        services.skip(db, project, me.user_id, assignment_id, reason, time_spent_ms, idempotency_key)
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/undo")
def annotate_undo(request: Request, project_id: int, me: Anyone) -> Response:
    with app_context(request).database.write() as db:
        services.undo_last(db, services.member_project(db, me.user_id, project_id), me.user_id)
    return see_other(f"/annotate/{project_id}")
