"""The JSON API for programs (`/api/v1`): create projects and batches of items, poll progress, fetch
labels. Every route is admin-only; programs authenticate with `Authorization: Bearer <API token>`
(`alignloop app token add`), browsers of admins with their session (and CSRF token for writes).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from alignloop.feedback import records, schemas, services
from alignloop.feedback.auth import Principal, app_context, require

router = APIRouter(prefix="/api/v1", tags=["api"],
                   responses={401: {"model": schemas.ErrorOut}, 403: {"model": schemas.ErrorOut}})
Admin = Annotated[Principal, Depends(require("admin"))]
Kind = Annotated[str, Query(pattern="^(" + "|".join(records.EXPORT_KINDS) + ")$",
                            description="pairs (consensus), annotator-pairs, votes (raw) or thumbs")]


def _project_out(p: Any) -> schemas.ProjectOut:
    return schemas.ProjectOut(id=p.id, name=p.name, guidelines=p.guidelines, overlap_k=p.overlap_k, task=p.task)


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, me: Admin) -> JSONResponse:
    """The OpenAPI schema (admins only, like the API it describes)."""
    return JSONResponse(request.app.openapi())


@router.get("/projects")
def list_projects(request: Request, me: Admin) -> list[schemas.ProjectOut]:
    with app_context(request).database.read() as db:
        return [_project_out(p) for p in services.projects_for(db, me.user_id, admin=True)]


@router.post("/projects", status_code=201, responses={409: {"model": schemas.ErrorOut}})
def create_project(request: Request, me: Admin, body: schemas.ProjectIn) -> schemas.ProjectOut:
    with app_context(request).database.write() as db:
        project = services.create_project(db, body.name, body.guidelines, body.overlap_k)
        for name in body.annotators:
            services.add_member(db, project, name)
        return _project_out(project)


@router.post("/projects/{project_id}/members", status_code=204, responses={404: {"model": schemas.ErrorOut}})
def add_member(request: Request, project_id: int, me: Admin, body: schemas.MemberIn) -> Response:
    with app_context(request).database.write() as db:
        services.add_member(db, services.admin_project(db, project_id), body.username)
    return Response(status_code=204)


@router.post("/projects/{project_id}/items", status_code=201,
             responses={400: {"model": schemas.ErrorOut}, 404: {"model": schemas.ErrorOut}})
def add_items(request: Request, project_id: int, me: Admin, body: schemas.ItemsIn) -> schemas.ItemsOut:
    """A batch of items, all or nothing: the first bad one gives 400 naming its 1-based `line` and `field`."""
    items = records.parse_items(enumerate(body.items, 1), "items")
    with app_context(request).database.write() as db:
        created = services.import_items(db, services.admin_project(db, project_id), items, "items")
    return schemas.ItemsOut(created=created)


@router.get("/projects/{project_id}/progress", responses={404: {"model": schemas.ErrorOut}})
def progress(request: Request, project_id: int, me: Admin) -> schemas.Progress:
    with app_context(request).database.read() as db:
        return schemas.Progress(**services.project_progress(db, services.admin_project(db, project_id)))


@router.get("/projects/{project_id}/labels", responses={404: {"model": schemas.ErrorOut}})
def labels(request: Request, project_id: int, me: Admin, kind: Kind = "votes") -> schemas.LabelsOut:
    """Labels as training records, with a report of what each conversion left out."""
    with app_context(request).database.read() as db:
        rows = services.vote_rows(db, services.admin_project(db, project_id))
    out, report = records.export_records(kind, rows)
    return schemas.LabelsOut(kind=kind, records=out, report=report)


@router.get("/projects/{project_id}/export.jsonl", response_class=PlainTextResponse,
            responses={404: {"model": schemas.ErrorOut}})
def export(request: Request, project_id: int, me: Admin, kind: Kind = "pairs") -> Response:
    """The same records as a JSON Lines download, ready for `alignloop reward --data.train_path`."""
    with app_context(request).database.read() as db:
        project = services.admin_project(db, project_id)
        rows = services.vote_rows(db, project)
    out, report = records.export_records(kind, rows)
    filename = f"{project.id}-{kind}.jsonl"
    return Response(records.jsonl(out), media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "X-Records-Kept": str(report.kept),
        "X-Records-Dropped": str(report.dropped)})
