"""The JSON API for programs (`/api/v1`): create projects and batches of items, set and test a chat
project's model, poll progress and quality, fetch labels. Every route is admin-only; programs authenticate with `Authorization: Bearer <API token>`
(`alignloop app token add`), browsers of admins with their session (and CSRF token for writes).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from alignloop.feedback import audit, conversations, exports, quality, records, schemas, services
from alignloop.feedback.auth import Principal, app_context, require

router = APIRouter(prefix="/api/v1", tags=["api"],
                   responses={401: {"model": schemas.ErrorOut}, 403: {"model": schemas.ErrorOut}})
Admin = Annotated[Principal, Depends(require("admin"))]
Kind = Annotated[str | None, Query(pattern="^(" + "|".join(exports.ALL_KINDS) + ")$",
                                   description="an export kind of the project's task (docs/feedback.md)")]


def _project_out(p: Any) -> schemas.ProjectOut:
    return schemas.ProjectOut(id=p.id, name=p.name, guidelines=p.guidelines, overlap_k=p.overlap_k, task=p.task,
                              version=p.version)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, me: Admin) -> JSONResponse:
    """The OpenAPI schema (admins only, like the API it describes)."""
    return JSONResponse(request.app.openapi())


@router.get("/projects")
def list_projects(request: Request, me: Admin) -> list[schemas.ProjectOut]:
    with app_context(request).database.read() as db:
        return [_project_out(p) for p in services.projects_for(db, me.user_id, admin=True)]


@router.post("/projects", status_code=201, responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut},
                                                     409: {"model": schemas.ErrorOut}})
def create_project(request: Request, me: Admin, body: schemas.ProjectIn) -> schemas.ProjectOut:
    with app_context(request).database.write() as db:
        project = services.create_project(db, body.name, body.guidelines, body.overlap_k, body.task)
        for name in body.annotators:
            services.add_member(db, project, name)
        return _project_out(project)


@router.patch("/projects/{project_id}", responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut},
                                                  409: {"model": schemas.ErrorOut}})
def edit_project(request: Request, project_id: schemas.RowId, me: Admin, body: schemas.ProjectEditIn) -> schemas.ProjectOut:
    """Change the name, guidelines or overlap k, from the `version` you read: 409 if someone changed the
    project since (or the name is taken). Every attempt is kept in the audit log."""
    changes = body.model_dump(exclude={"version"}, exclude_none=True)
    with app_context(request).database.write() as db:
        project, entry = audit.edit_project(db, project_id, me.user_id, me.username, body.version, changes)
        out = _project_out(project)
    audit.raise_if_refused(entry)
    return out


@router.post("/projects/{project_id}/members", status_code=204,
             responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def add_member(request: Request, project_id: schemas.RowId, me: Admin, body: schemas.MemberIn) -> Response:
    with app_context(request).database.write() as db:
        services.add_member(db, services.admin_project(db, project_id), body.username)
    return Response(status_code=204)


@router.post("/projects/{project_id}/items", status_code=201,
             responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def add_items(request: Request, project_id: schemas.RowId, me: Admin, body: schemas.ItemsIn) -> schemas.ItemsOut:
    """A batch of items, all or nothing: the first bad one gives 400 naming its 1-based `line` and `field`."""
    with app_context(request).database.read() as db:
        task = services.admin_project(db, project_id).task
    items = records.parse_items(enumerate(body.items, 1), "items", task)
    with app_context(request).database.write() as db:
        created = services.import_items(db, services.admin_project(db, project_id), items, "items")
    return schemas.ItemsOut(created=created)


def _model_out(model: conversations.Endpoint | None) -> schemas.ModelOut:
    if model is None:
        return schemas.ModelOut(base_url=None, model=None, api_key_set=False, n_drafts=None, temperature=None,
                                top_p=None, max_tokens=None, timeout_s=None)
    return schemas.ModelOut(**model.public())


@router.get("/projects/{project_id}/model", responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def get_model(request: Request, project_id: schemas.RowId, me: Admin) -> schemas.ModelOut:
    """A chat project's model (all null until set); the API key is never returned, only `api_key_set`."""
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        services._check_task(project, "chat")
        return _model_out(conversations.endpoint(db, project))


@router.put("/projects/{project_id}/model", responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def set_model(request: Request, project_id: schemas.RowId, me: Admin, body: schemas.ModelIn) -> schemas.ModelOut:
    """Set a chat project's model. `api_key` left out keeps the stored one; null removes it."""
    settings = conversations.Endpoint(body.base_url, body.model, body.api_key, body.n_drafts, body.temperature,
                                      body.top_p, body.max_tokens, body.timeout_s)
    ctx = app_context(request)
    with ctx.database.write() as db:
        project = services.admin_project(db, project_id)
        model = conversations.set_endpoint(db, project, settings, secret=ctx.secret,
                                           keep_key="api_key" not in body.model_fields_set)
    return _model_out(model)


@router.post("/projects/{project_id}/model/test",
             responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}, 502: {"model": schemas.ErrorOut}})
def try_model(request: Request, project_id: schemas.RowId, me: Admin, body: schemas.ModelTestIn | None = None) -> schemas.ModelTestOut:
    """Ask the project's model for one draft now: 400 when it is not set or its host is not allowed
    (`ALIGNLOOP_APP_MODEL_HOSTS`), 502 when the server is down, slow or answers something else."""
    ctx = app_context(request)
    with ctx.database.read() as db:
        model = conversations.endpoint(db, services.admin_project(db, project_id), ctx.secret)
    if model is None:
        raise conversations.NotConfigured(conversations.NO_MODEL)
    start = time.perf_counter()
    message = body.message if body is not None else conversations.TEST_MESSAGE
    draft = conversations.ask_model(model, [{"role": "user", "content": message}], ctx.settings.model_hosts,
                                    ctx.model_transport, n=1)[0]
    return schemas.ModelTestOut(text=draft.text, model=draft.model, version=draft.version,
                                finish_reason=draft.finish_reason, ms=round(1000 * (time.perf_counter() - start)))


@router.get("/projects/{project_id}/progress", responses={404: {"model": schemas.ErrorOut}})
def progress(request: Request, project_id: schemas.RowId, me: Admin) -> schemas.Progress:
    with app_context(request).database.read() as db:
        return schemas.Progress(**quality.project_progress(db, services.admin_project(db, project_id)))


@router.get("/projects/{project_id}/quality", responses={404: {"model": schemas.ErrorOut}})
def project_quality(request: Request, project_id: schemas.RowId, me: Admin) -> schemas.QualityOut:
    """The dashboard's figures: agreement (Cohen per pair, Fleiss, Krippendorff) and per-annotator quality."""
    with app_context(request).database.read() as db:
        return schemas.QualityOut(**quality.project_quality(db, services.admin_project(db, project_id)))


@router.get("/projects/{project_id}/labels", responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def labels(request: Request, project_id: schemas.RowId, me: Admin, kind: Kind = None) -> schemas.LabelsOut:
    """Labels as training records (default: every annotator's raw answers), with a report of what each
    conversion left out."""
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        kind = exports.resolve_kind(project.task, kind, raw=True)
        out, report = exports.export(db, project, kind)
    return schemas.LabelsOut(kind=kind, records=out, report=report)


@router.get("/projects/{project_id}/export.jsonl", response_class=Response, responses={
    200: {"description": "One training record per line", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
    400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def export(request: Request, project_id: schemas.RowId, me: Admin, kind: Kind = None) -> Response:
    """The same records as a JSON Lines download (default: the task's consensus kind), ready for
    `alignloop reward --data.train_path` and the other trainers' loaders."""
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        kind = exports.resolve_kind(project.task, kind)
        out, report = exports.export(db, project, kind)
    filename = f"{project.id}-{kind}.jsonl"
    return Response(records.jsonl(out), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "X-Records-Kept": str(report.kept),
        "X-Records-Dropped": str(report.dropped)})
