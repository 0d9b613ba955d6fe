"""Editing a project's settings with optimistic concurrency, and the audit log of every attempt (W13).

An admin edits from the version they read (`Project.version`, shown by the API and the project page). The
edit locks the project row (`SELECT ... FOR UPDATE` on PostgreSQL; on SQLite `BEGIN IMMEDIATE` already
serialises writers), compares versions and, if they match, applies the change and raises the version. Two
admins editing from the same version therefore get exactly one applied edit and one Conflict (409), on
either database, however their requests interleave. Both attempts leave an audit row (who, when, what,
outcome) in the edit's own transaction: `edit_project` returns the refused attempt's row instead of raising,
so the caller commits it and then calls `raise_if_refused`.
"""

from __future__ import annotations

import logging
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.feedback.db import AuditEntry, Project
from alignloop.feedback.services import Conflict, Invalid, NotFound

logger = logging.getLogger(__name__)

EDITABLE = ("name", "guidelines", "overlap_k")
"""Project settings an admin may change (the task is fixed: items were validated for it)."""
MAX_GUIDELINES = 100_000


def _checked(changes: dict[str, Any]) -> dict[str, Any]:
    """The requested values, validated as `services.create_project` does (Invalid otherwise)."""
    unknown = set(changes) - set(EDITABLE)
    if unknown:
        raise Invalid(f"only {', '.join(EDITABLE)} can be edited, not {', '.join(sorted(unknown))}")
    out = dict(changes)
    if "name" in out:
        out["name"] = str(out["name"]).strip()
        if not out["name"] or len(out["name"]) > 200:
            raise Invalid("a project name is 1-200 characters")
    if "overlap_k" in out and not 1 <= int(out["overlap_k"]) <= 100:
        raise Invalid("overlap k must be between 1 and 100")
    if "guidelines" in out and len(out["guidelines"]) > MAX_GUIDELINES:
        raise Invalid(f"guidelines are at most {MAX_GUIDELINES} characters")
    return out


def edit_project(db: Session, project_id: int, user_id: int, username: str, version: int,
                 changes: dict[str, Any]) -> tuple[Project, AuditEntry]:
    """Apply `changes` (a subset of EDITABLE) if the project is still at `version`; the project and the
    audit row of the attempt, whose outcome is "applied" or "conflict" (a stale version or a taken name).
    Values equal to the current ones are no change, and an edit changing nothing keeps the version."""
    wanted = _checked(changes)
    project = db.execute(sa.select(Project).where(Project.id == project_id).with_for_update()).scalar_one_or_none()
    if project is None:
        raise NotFound("no such project")
    diff = {k: [getattr(project, k), v] for k, v in wanted.items() if getattr(project, k) != v}
    details: dict[str, Any] = {"version_read": version, "version_found": project.version, "changes": diff}
    reason = None
    if project.version != version:
        reason = (f"the project was changed since you read it (version {version}, now {project.version}): "
                  "reload it and make your edit again")
    elif "name" in diff and db.execute(sa.select(Project.id).where(Project.name == wanted["name"])).first():
        reason = f"project {wanted['name']!r} already exists"
    if reason is None and diff:
        for key, (_, value) in diff.items():
            setattr(project, key, value)
        project.version += 1
    entry = AuditEntry(user_id=user_id, username=username, action="project.edit", object_type="project",
                       object_id=project.id, outcome="applied" if reason is None else "conflict",
                       details=details | ({"reason": reason} if reason else {"version": project.version}))
    db.add(entry)
    db.flush()
    logger.info("project edit %s", entry.outcome, extra={"project": project.id, "user": username,
                                                         "fields": sorted(diff), "version_read": version})
    return project, entry


def raise_if_refused(entry: AuditEntry) -> None:
    """Conflict (409) for a refused attempt; call it after its transaction committed the audit row."""
    if entry.outcome != "applied":
        raise Conflict(entry.details["reason"])


def history(db: Session, object_type: str, object_id: int, limit: int = 50) -> list[AuditEntry]:
    """The latest audit rows of one object, newest first."""
    return list(db.execute(sa.select(AuditEntry).where(AuditEntry.object_type == object_type,
                                                       AuditEntry.object_id == object_id)
                           .order_by(AuditEntry.id.desc()).limit(limit)).scalars())
