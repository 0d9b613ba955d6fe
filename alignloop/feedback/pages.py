"""Server-rendered pages: login, the admin's projects and dashboard, and the annotator's task pages
(pairwise comparison, rank, rate, edit, chat: one page, `annotate.html`, with the task's part included).

Handlers are thin: check the role (the `require` dependency), open one transaction, call services,
render or redirect. Every write answers only after its transaction has committed (POST, then 303 to
the page that shows the new state), so a label the browser saw acknowledged is on disk.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from alignloop.feedback import (
    audit,
    auth,
    chat,
    conversations,
    exports,
    quality,
    records,
    security,
    services,
    tasks,
)
from alignloop.feedback.auth import LOGIN_COOKIE, Principal, app_context, require, require_login_form
from alignloop.feedback.db import TASKS
from alignloop.feedback.schemas import RowId

router = APIRouter(include_in_schema=False)
FLAG_KEYS = (("unsafe", "x", "Unsafe"), ("made_up_facts", "m", "Made-up facts"), ("off_topic", "t", "Off topic"))
"""Rating flags: (value, key, label); the keys avoid the digits, s (skip) and u (undo)."""
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
    return render(request, "admin.html", me, projects=projects, users=users, tasks=TASKS)


@router.post("/admin/projects")
def admin_create_project(request: Request, me: Admin, name: Annotated[str, Form(max_length=200)],
                         overlap_k: Annotated[int, Form(ge=1, le=100)] = 1,
                         guidelines: Annotated[str, Form(max_length=100_000)] = "",
                         task: Annotated[str, Form(max_length=32)] = "pairwise") -> Response:
    with app_context(request).database.write() as db:
        project = services.create_project(db, name, guidelines, overlap_k, task)
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
def admin_project(request: Request, project_id: RowId, me: Admin) -> Response:
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        progress = quality.project_progress(db, project)
        team = services.members(db, project)
        chat_model = conversations.endpoint(db, project) if project.task == "chat" else None
        chat_counts = conversations.counts(db, project) if project.task == "chat" else None
        edits = audit.history(db, "project", project.id, limit=20)
    return render(request, "project.html", me, project=project, progress=progress, members=team, edits=edits,
                  export_kinds=exports.EXPORT_KINDS[project.task], loads_as=exports.LOADS_AS,
                  chat_model=chat_model.public() if chat_model else None, chat_counts=chat_counts,
                  model_hosts=app_context(request).settings.model_hosts)


@router.post("/admin/projects/{project_id}/settings")
def admin_edit_project(request: Request, project_id: RowId, me: Admin, version: Annotated[int, Form(ge=1)],
                       name: Annotated[str, Form(max_length=200)], guidelines: Annotated[str, Form(max_length=100_000)],
                       overlap_k: Annotated[int, Form(ge=1, le=100)]) -> Response:
    """The settings form, sent with the version the page showed: 409 (the page says why) if another admin
    changed the project since. Every attempt is kept in the audit log shown on the project page."""
    changes = {"name": name, "guidelines": guidelines.replace("\r\n", "\n"), "overlap_k": overlap_k}
    with app_context(request).database.write() as db:
        _, entry = audit.edit_project(db, project_id, me.user_id, me.username, version, changes)
    audit.raise_if_refused(entry)
    return see_other(f"/admin/projects/{project_id}")


@router.get("/admin/projects/{project_id}/dashboard", response_class=HTMLResponse)
def admin_dashboard(request: Request, project_id: RowId, me: Admin) -> Response:
    """Agreement and per-annotator quality, computed from the labels at each request, with bar charts."""
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        figures = quality.project_quality(db, project)
    return render(request, "dashboard.html", me, project=project, q=figures, charts=quality.dashboard_charts(figures))


@router.post("/admin/projects/{project_id}/model")
def admin_set_model(request: Request, project_id: RowId, me: Admin, base_url: Annotated[str, Form(max_length=2000)],
                    model: Annotated[str, Form(max_length=200)], n_drafts: Annotated[int, Form()] = 2,
                    api_key: Annotated[str, Form(max_length=4096)] = "", clear_api_key: Annotated[bool, Form()] = False,
                    temperature: Annotated[str, Form(max_length=20)] = "", top_p: Annotated[str, Form(max_length=20)] = "",
                    max_tokens: Annotated[str, Form(max_length=20)] = "",
                    timeout_s: Annotated[float, Form()] = 60.0) -> Response:
    """A chat project's model; a blank API key field keeps the stored key (it is never shown)."""
    settings = conversations.Endpoint(base_url, model, api_key or None, n_drafts, _number(temperature, "temperature"),
                                      _number(top_p, "top_p"), _int(max_tokens, "max_tokens"), timeout_s)
    ctx = app_context(request)
    with ctx.database.write() as db:
        project = services.admin_project(db, project_id)
        conversations.set_endpoint(db, project, settings, secret=ctx.secret, keep_key=not api_key and not clear_api_key)
    return see_other(f"/admin/projects/{project_id}")


def _number(text: str, name: str) -> float | None:
    """An optional number from a form field (blank: None, the server's default)."""
    try:
        return float(text) if text.strip() else None
    except ValueError:
        raise services.Invalid(f"{name}: {text!r} is not a number") from None


def _int(text: str, name: str) -> int | None:
    value = _number(text, name)
    if value is not None and not value.is_integer():
        raise services.Invalid(f"{name}: {text!r} is not a whole number")
    return None if value is None else int(value)


@router.post("/admin/projects/{project_id}/model/test", response_class=HTMLResponse)
def admin_test_model(request: Request, project_id: RowId, me: Admin) -> Response:
    """Ask the project's model for one draft now: the answer, or why there is none (400 or 502)."""
    ctx = app_context(request)
    with ctx.database.read() as db:
        project = services.admin_project(db, project_id)
        model = conversations.endpoint(db, project, ctx.secret)
    if model is None:
        raise conversations.NotConfigured(conversations.NO_MODEL)
    draft = conversations.ask_model(model, [{"role": "user", "content": conversations.TEST_MESSAGE}],
                                    ctx.settings.model_hosts, ctx.model_transport, n=1)[0]
    return render(request, "message.html", me, title="The model answered",
                  message=f"{draft.model} (version {draft.version or 'not given'}) answered "
                          f"{conversations.TEST_MESSAGE!r} with: {draft.text}")


@router.post("/admin/projects/{project_id}/members")
def admin_add_member(request: Request, project_id: RowId, me: Admin, username: Annotated[str, Form(max_length=64)]) -> Response:
    with app_context(request).database.write() as db:
        services.add_member(db, services.admin_project(db, project_id), username)
    return see_other(f"/admin/projects/{project_id}")


@router.post("/admin/projects/{project_id}/items")
async def admin_import(request: Request, project_id: RowId, me: Admin, file: Annotated[UploadFile, File()]) -> Response:
    """JSON Lines upload; all-or-nothing (DataError names the line and field, 400)."""
    ctx = app_context(request)
    data = await file.read(ctx.settings.max_upload_bytes + 1)
    if len(data) > ctx.settings.max_upload_bytes:
        raise services.Invalid(f"the upload is larger than {ctx.settings.max_upload_bytes} bytes")
    with ctx.database.read() as db:
        task = services.admin_project(db, project_id).task
    items = records.parse_jsonl(data, file.filename or "upload.jsonl", task)
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
def annotate(request: Request, project_id: RowId, me: Anyone) -> Response:
    """The next item (assigned now if the user has none open), with progress and the undo button."""
    return _annotate_page(request, project_id, me)


def _annotate_page(request: Request, project_id: int, me: Principal, status: int = 200, **extra: Any) -> Response:
    """The annotation page; `extra` (chat: an error and the message typed) goes to the template."""
    ctx = app_context(request)
    ttl = ctx.settings.assignment_ttl_minutes
    with ctx.database.write() as db:
        project = services.member_project(db, me.user_id, project_id, lock=True)
        assignment = services.next_assignment(db, project, me.user_id, ttl)
        view = services.item_view(db, assignment) if assignment is not None else None
        if assignment is not None and project.task == "chat":
            view = {**(view or {}), **conversations.view(db, assignment)}
        progress = services.user_progress(db, project, me.user_id, ttl)
    return render(request, "annotate.html", me, status, project=project, view=view, progress=progress,
                  idempotency_key=secrets.token_urlsafe(16), axes=tasks.RATE_AXES, scale=tasks.RATE_SCALE,
                  flags=FLAG_KEYS, **extra)


@router.post("/annotate/{project_id}/label")
def annotate_label(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                   vote: Annotated[str, Form(max_length=40)], idempotency_key: Annotated[str, Form(max_length=64)],
                   time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    """`vote` is "left:<strength>", "right:<strength>", "tie" or "both_bad" (one button each)."""
    displayed, _, strength = vote.partition(":")
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        services.submit_label(db, project, me.user_id, assignment_id, displayed, strength or None, time_spent_ms,
                              idempotency_key)
    return see_other(f"/annotate/{project_id}")


def _answer(request: Request, project_id: int, me: Principal, task: str, assignment_id: int, form: dict[str, Any],
            time_spent_ms: int | None, key: str) -> Response:
    """Store a rank, rate or edit answer (committed), then show the next item."""
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        services.submit_answer(db, project, me.user_id, assignment_id, task, form, time_spent_ms, key)
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/rank")
def annotate_rank(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                  ranking: Annotated[str, Form(max_length=100)], idempotency_key: Annotated[str, Form(max_length=64)],
                  time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    """`ranking`: the numbers of the responses as shown, best first ("2,1,3")."""
    return _answer(request, project_id, me, "rank", assignment_id, {"ranking": ranking}, time_spent_ms,
                   idempotency_key)


@router.post("/annotate/{project_id}/rate")
def annotate_rate(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                  idempotency_key: Annotated[str, Form(max_length=64)],
                  helpful: Annotated[int | None, Form()] = None, honest: Annotated[int | None, Form()] = None,
                  harmless: Annotated[int | None, Form()] = None, flags: Annotated[list[str] | None, Form()] = None,
                  time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    """Scores 1-5 on each axis and any of the flags (checkboxes named `flags`)."""
    form = {"helpful": helpful, "honest": honest, "harmless": harmless, "flags": flags or []}
    return _answer(request, project_id, me, "rate", assignment_id, form, time_spent_ms, idempotency_key)


@router.post("/annotate/{project_id}/edit")
def annotate_edit(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                  edited: Annotated[str, Form(max_length=2 * tasks.MAX_EDIT_CHARS)],
                  idempotency_key: Annotated[str, Form(max_length=64)],
                  time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    """The response as the annotator rewrote it (unchanged: it needs no edit)."""
    return _answer(request, project_id, me, "edit", assignment_id, {"edited": edited}, time_spent_ms, idempotency_key)


@router.post("/annotate/{project_id}/skip")
def annotate_skip(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                  reason: Annotated[str, Form(max_length=1000)], idempotency_key: Annotated[str, Form(max_length=64)],
                  time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        services.skip(db, project, me.user_id, assignment_id, reason, time_spent_ms, idempotency_key)
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/undo")
def annotate_undo(request: Request, project_id: RowId, me: Anyone) -> Response:
    """Withdraw the last answer (chat: the open conversation's last pick, else the last finished one)."""
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        (conversations.undo if project.task == "chat" else services.undo_last)(db, project, me.user_id)
    return see_other(f"/annotate/{project_id}")


# ---------------------------------------------------------------------------------------------------------
# Chat (conversations.py): each action answers after its commit with a 303 to the page; a model that is
# refused, down or slow gives the page again with the reason (400 or 502) and the message kept.


def _chat_drafts(request: Request, project_id: int, me: Principal, assignment_id: int | None, message: str | None,
                 key: str, regenerate: bool) -> Response:
    ctx = app_context(request)
    try:
        conversations.converse(ctx.database, project_id, me.user_id, assignment_id, message, key, regenerate=regenerate,
                               hosts=ctx.settings.model_hosts, transport=ctx.model_transport, secret=ctx.secret)
    except (chat.ChatError, conversations.NotConfigured) as err:
        status = 502 if isinstance(err, chat.ChatError) and not isinstance(err, chat.HostRefused) else 400
        error = (f"The model could not answer: {err}. Try again, skip the item, or ask an admin to check the "
                 "project's model." if status == 502 else f"The model cannot be used: {err}. Ask an admin.")
        return _annotate_page(request, project_id, me, status, chat_error=error, chat_message=message or "")
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/chat/send")
def chat_send(request: Request, project_id: RowId, me: Anyone, idempotency_key: Annotated[str, Form(max_length=64)],
              assignment_id: Annotated[RowId | None, Form()] = None,
              message: Annotated[str | None, Form(max_length=2 * conversations.MAX_MESSAGE_CHARS)] = None) -> Response:
    """Ask the model for drafts: a typed message starts a conversation (no assignment) or continues one
    after a pick; no message asks for the first answer to an imported prompt."""
    return _chat_drafts(request, project_id, me, assignment_id, message, idempotency_key, regenerate=False)


@router.post("/annotate/{project_id}/chat/regenerate")
def chat_regenerate(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                    idempotency_key: Annotated[str, Form(max_length=64)]) -> Response:
    """New drafts for the open turn; the ones shown now are kept, as worse than the eventual pick."""
    return _chat_drafts(request, project_id, me, assignment_id, None, idempotency_key, regenerate=True)


@router.post("/annotate/{project_id}/chat/pick")
def chat_pick(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
              draft_id: Annotated[RowId, Form()], idempotency_key: Annotated[str, Form(max_length=64)],
              time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        conversations.pick(db, project, me.user_id, assignment_id, draft_id, time_spent_ms, idempotency_key)
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/chat/thumb")
def chat_thumb(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
               thumb: Annotated[str, Form(pattern="^(up|down)$")], turn: Annotated[int | None, Form()] = None) -> Response:
    """Thumb up or down on a picked answer (default: the latest); giving it again replaces it."""
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        conversations.thumb(db, project, me.user_id, assignment_id, thumb == "up", turn)
    return see_other(f"/annotate/{project_id}")


@router.post("/annotate/{project_id}/chat/finish")
def chat_finish(request: Request, project_id: RowId, me: Anyone, assignment_id: Annotated[RowId, Form()],
                idempotency_key: Annotated[str, Form(max_length=64)],
                time_spent_ms: Annotated[int | None, Form()] = None) -> Response:
    """End the conversation (every turn picked); the next prompt comes up."""
    with app_context(request).database.write() as db:
        project = services.member_project(db, me.user_id, project_id)
        conversations.finish(db, project, me.user_id, assignment_id, time_spent_ms, idempotency_key)
    return see_other(f"/annotate/{project_id}")
