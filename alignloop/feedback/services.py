"""What the app does, apart from HTTP: projects, import, assignment, labels, progress, export rows.

Handlers stay thin by calling these with a session from `Database.write()` or `read()`. Visibility
rules live here: an annotator sees only projects they are a member of (others are "not found", so ids
do not leak), only their own labels, and is never assigned an item they wrote. Assignment honours the
project's overlap k: an item is handed out until k annotators have labelled it or hold a fresh open
assignment (older than the TTL, an open one stops counting so an absent annotator does not block it).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.data import DataError
from alignloop.feedback.db import (
    Assignment,
    Item,
    ItemAuthor,
    Label,
    Project,
    ProjectMember,
    Response,
    User,
    utcnow,
)
from alignloop.feedback.records import STRENGTHS, ItemIn, VoteRow, agreement

logger = logging.getLogger(__name__)

DISPLAYED_CHOICES = ("left", "right", "tie", "both_bad")
_rng = secrets.SystemRandom()


class NotFound(LookupError):
    """No such thing, or not visible to this user (answered 404 either way)."""


class Conflict(RuntimeError):
    """The request contradicts the current state (answered 409)."""


class Invalid(ValueError):
    """A malformed request value (answered 400)."""


# ---------------------------------------------------------------------------------------------------------
# Projects and members


def create_project(db: Session, name: str, guidelines: str = "", overlap_k: int = 1) -> Project:
    name = name.strip()
    if not name or len(name) > 200:
        raise Invalid("a project name is 1-200 characters")
    if not 1 <= overlap_k <= 100:
        raise Invalid("overlap k must be between 1 and 100")
    if db.execute(sa.select(Project.id).where(Project.name == name)).first() is not None:
        raise Conflict(f"project {name!r} already exists")
    project = Project(name=name, guidelines=guidelines, overlap_k=overlap_k)
    db.add(project)
    db.flush()
    logger.info("project created", extra={"project": name, "overlap_k": overlap_k})
    return project


def project_by_name(db: Session, name: str) -> Project:
    project = db.execute(sa.select(Project).where(Project.name == name)).scalar_one_or_none()
    if project is None:
        raise NotFound(f"no project named {name!r}")
    return project


def add_member(db: Session, project: Project, username: str) -> None:
    """Let a user label the project (idempotent)."""
    user = db.execute(sa.select(User).where(User.username == username)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"no user named {username!r}")
    if db.get(ProjectMember, (project.id, user.id)) is None:
        db.add(ProjectMember(project_id=project.id, user_id=user.id))


def admin_project(db: Session, project_id: int) -> Project:
    project = db.get(Project, project_id)
    if project is None:
        raise NotFound("no such project")
    return project


def member_project(db: Session, user_id: int, project_id: int, *, lock: bool = False) -> Project:
    """The project if `user_id` is a member; NotFound otherwise (also for projects that do not exist)."""
    query = (sa.select(Project).join(ProjectMember, ProjectMember.project_id == Project.id)
             .where(Project.id == project_id, ProjectMember.user_id == user_id))
    project = db.execute(query.with_for_update(of=Project) if lock else query).scalar_one_or_none()
    if project is None:
        raise NotFound("no such project")
    return project


def projects_for(db: Session, user_id: int, *, admin: bool) -> list[Project]:
    query = sa.select(Project).order_by(Project.id)
    if not admin:
        query = query.join(ProjectMember, ProjectMember.project_id == Project.id).where(ProjectMember.user_id == user_id)
    return list(db.execute(query).scalars())


def users(db: Session) -> list[User]:
    return list(db.execute(sa.select(User).order_by(User.username)).scalars())


def members(db: Session, project: Project) -> list[str]:
    return list(db.execute(sa.select(User.username).join(ProjectMember, ProjectMember.user_id == User.id)
                           .where(ProjectMember.project_id == project.id).order_by(User.username)).scalars())


# ---------------------------------------------------------------------------------------------------------
# Import


def import_items(db: Session, project: Project, items: list[ItemIn], source: str) -> int:
    """Add validated items; an id already in the project raises DataError (D107) and, the caller's
    transaction rolling back, nothing is written."""
    ids = [i.id for i in items]
    taken = set(db.execute(sa.select(Item.external_id).where(Item.project_id == project.id,
                                                             Item.external_id.in_(ids))).scalars())
    for item in items:
        if item.id in taken:
            raise DataError("D107", "an item with this id is already in the project", path=source, line=item.line,
                            field="id", record_id=item.id)
    for item in items:
        row = Item(project_id=project.id, external_id=item.id, prompt=item.prompt, meta=item.meta)
        row.responses = [Response(position=i, text=r.text, model_name=r.model, model_version=r.version, author=r.author)
                         for i, r in enumerate(item.responses)]
        db.add(row)
        db.flush()
        db.add_all(ItemAuthor(item_id=row.id, username=name) for name in sorted(item.authors))
    logger.info("items imported", extra={"project": project.name, "count": len(items), "source": source})
    return len(items)


# ---------------------------------------------------------------------------------------------------------
# Assignment and labels


def _counts_towards_k(cutoff: dt.datetime) -> sa.ColumnElement[bool]:
    return (Assignment.status == "done") | ((Assignment.status == "open") & (Assignment.updated_at > cutoff))


def _eligible_items(project: Project, user: User, cutoff: dt.datetime) -> sa.Select[Any]:
    """Items of the project this user may be given: not written by them, not already theirs, and
    fewer than k annotators on them."""
    taken = (sa.select(sa.func.count()).select_from(Assignment)
             .where(Assignment.item_id == Item.id, _counts_towards_k(cutoff)).scalar_subquery())
    return sa.select(Item).where(
        Item.project_id == project.id,
        ~sa.exists().where(ItemAuthor.item_id == Item.id, ItemAuthor.username == user.username),
        ~sa.exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id),
        taken < project.overlap_k,
    )


def current_assignment(db: Session, project: Project, user_id: int) -> Assignment | None:
    """The user's open assignment, most recently (re)opened first (undo reopens one)."""
    return db.execute(sa.select(Assignment).where(
        Assignment.project_id == project.id, Assignment.user_id == user_id, Assignment.status == "open",
    ).order_by(Assignment.updated_at.desc(), Assignment.id.desc()).limit(1)).scalar_one_or_none()


def next_assignment(db: Session, project: Project, user_id: int, ttl_minutes: float) -> Assignment | None:
    """The user's open assignment, or a new one on the first eligible item in import order (shown in a
    random left/right order, recorded); None when nothing is left for them. Call with the project row
    locked (member_project(lock=True)) so concurrent requests cannot overfill an item."""
    open_one = current_assignment(db, project, user_id)
    if open_one is not None:
        return open_one
    user = db.get(User, user_id)
    assert user is not None
    cutoff = utcnow() - dt.timedelta(minutes=ttl_minutes)
    item = db.execute(_eligible_items(project, user, cutoff).order_by(Item.id).limit(1)).scalar_one_or_none()
    if item is None:
        return None
    order = [0, 1]
    _rng.shuffle(order)
    assignment = Assignment(project_id=project.id, item_id=item.id, user_id=user_id, presented_order=order)
    db.add(assignment)
    db.flush()
    return assignment


def _own_assignment(db: Session, project: Project, user_id: int, assignment_id: int) -> Assignment:
    assignment = db.get(Assignment, assignment_id)
    if assignment is None or assignment.user_id != user_id or assignment.project_id != project.id:
        raise NotFound("no such assignment")
    return assignment


def _canonical_choice(displayed: str, strength: str | None, order: list[int]) -> tuple[str, str | None]:
    """("a" | "b" | "tie" | "both_bad", strength) from what was clicked on the page shown in `order`."""
    if displayed not in DISPLAYED_CHOICES:
        raise Invalid(f"choice must be one of {DISPLAYED_CHOICES}")
    if displayed in ("tie", "both_bad"):
        if strength:
            raise Invalid(f"a {displayed} vote takes no strength")
        return displayed, None
    if strength not in STRENGTHS:
        raise Invalid(f"strength must be one of {STRENGTHS}")
    position = order[0] if displayed == "left" else order[1]
    return ("a", "b")[position], strength


def _replay(db: Session, user_id: int, key: str) -> Label | None:
    """The label already stored under this idempotency key: a resent request returns it, no duplicate."""
    if not key or len(key) > 64:
        raise Invalid("an idempotency key of 1-64 characters is required")
    return db.execute(sa.select(Label).where(Label.user_id == user_id, Label.idempotency_key == key)).scalar_one_or_none()


def _store(db: Session, assignment: Assignment, key: str, status: str, **fields: Any) -> Label:
    if assignment.status != "open":
        raise Conflict("this item is already answered; undo first to change the answer")
    label = Label(assignment_id=assignment.id, project_id=assignment.project_id, item_id=assignment.item_id,
                  user_id=assignment.user_id, presented_order=assignment.presented_order, idempotency_key=key,
                  **fields)
    assignment.status, assignment.updated_at = status, utcnow()
    db.add(label)
    db.flush()
    return label


def submit_label(db: Session, project: Project, user_id: int, assignment_id: int, displayed: str,
                 strength: str | None, time_spent_ms: int | None, key: str) -> Label:
    """Store one vote on the user's own open assignment (a replayed key returns the stored label)."""
    if (existing := _replay(db, user_id, key)) is not None:
        return existing
    assignment = _own_assignment(db, project, user_id, assignment_id)
    choice, strength = _canonical_choice(displayed, strength or None, assignment.presented_order)
    spent = None if time_spent_ms is None else max(0, min(int(time_spent_ms), 86_400_000))
    return _store(db, assignment, key, "done", choice=choice, strength=strength, displayed_choice=displayed,
                  time_spent_ms=spent)


def skip(db: Session, project: Project, user_id: int, assignment_id: int, reason: str, time_spent_ms: int | None,
         key: str) -> Label:
    """Record a skip with its reason; the item goes to someone else (a skip does not count towards k)."""
    if (existing := _replay(db, user_id, key)) is not None:
        return existing
    reason = reason.strip()
    if not reason or len(reason) > 1000:
        raise Invalid("a skip needs a reason (at most 1000 characters)")
    assignment = _own_assignment(db, project, user_id, assignment_id)
    spent = None if time_spent_ms is None else max(0, min(int(time_spent_ms), 86_400_000))
    return _store(db, assignment, key, "skipped", skip_reason=reason, time_spent_ms=spent)


def undo_last(db: Session, project: Project, user_id: int) -> Label | None:
    """Withdraw the user's latest answer in the project (kept, marked undone) and reopen its item."""
    label = db.execute(sa.select(Label).where(
        Label.project_id == project.id, Label.user_id == user_id, Label.undone_at.is_(None),
    ).order_by(Label.id.desc()).limit(1)).scalar_one_or_none()
    if label is None:
        return None
    now = utcnow()
    label.undone_at = now
    assignment = db.get(Assignment, label.assignment_id)
    assert assignment is not None
    assignment.status, assignment.updated_at = "open", now
    db.flush()
    return label


def item_view(db: Session, assignment: Assignment) -> dict[str, Any]:
    """What the annotation page shows: prompt and the two responses in the presented order. Model names
    are left out so annotators judge the text, not the brand."""
    item = db.get(Item, assignment.item_id)
    assert item is not None
    texts = [r.text for r in item.responses]
    left, right = (texts[p] for p in assignment.presented_order)
    return {"assignment_id": assignment.id, "prompt": item.prompt, "left": left, "right": right}


# ---------------------------------------------------------------------------------------------------------
# Progress and export


def _active_votes() -> sa.ColumnElement[bool]:
    return Label.undone_at.is_(None) & Label.choice.is_not(None)


def user_progress(db: Session, project: Project, user_id: int, ttl_minutes: float) -> dict[str, int]:
    """The annotator's own counts: labelled, skipped, and items still available to them."""
    user = db.get(User, user_id)
    assert user is not None
    mine = sa.select(sa.func.count()).select_from(Label).where(
        Label.project_id == project.id, Label.user_id == user_id, Label.undone_at.is_(None))
    labelled = db.execute(mine.where(Label.choice.is_not(None))).scalar_one()
    skipped = db.execute(mine.where(Label.skip_reason.is_not(None))).scalar_one()
    cutoff = utcnow() - dt.timedelta(minutes=ttl_minutes)
    available = db.execute(sa.select(sa.func.count()).select_from(_eligible_items(project, user, cutoff).subquery())).scalar_one()
    return {"labelled": labelled, "skipped": skipped, "remaining": available}


def project_progress(db: Session, project: Project) -> dict[str, Any]:
    """Items, votes, items with k votes, votes per annotator, skips, and inter-annotator agreement."""
    items = db.execute(sa.select(sa.func.count()).select_from(Item).where(Item.project_id == project.id)).scalar_one()
    votes = db.execute(sa.select(Label.item_id, Label.choice, User.username).join(User, User.id == Label.user_id)
                       .where(Label.project_id == project.id, _active_votes())).all()
    skips = db.execute(sa.select(sa.func.count()).select_from(Label).where(
        Label.project_id == project.id, Label.undone_at.is_(None), Label.skip_reason.is_not(None))).scalar_one()
    by_item: dict[int, list[str]] = {}
    per_annotator: dict[str, int] = {}
    for item_id, choice, username in votes:
        by_item.setdefault(item_id, []).append(str(choice))
        per_annotator[username] = per_annotator.get(username, 0) + 1
    complete = sum(len(c) >= project.overlap_k for c in by_item.values())
    return {"project": project.name, "items": items, "overlap_k": project.overlap_k, "votes": len(votes),
            "items_complete": complete, "skips": skips, "votes_per_annotator": per_annotator,
            "agreement": agreement(by_item.values())}


def vote_rows(db: Session, project: Project) -> list[VoteRow]:
    """Every active vote of the project, oldest first, with its item's texts and model tags."""
    rows = db.execute(sa.select(Label, Item, User.username).join(Item, Item.id == Label.item_id)
                      .join(User, User.id == Label.user_id)
                      .where(Label.project_id == project.id, _active_votes()).order_by(Label.id)).all()
    out = []
    for label, item, username in rows:
        responses = item.responses
        models = tuple({"name": r.model_name, "version": r.model_version, **({"author": r.author} if r.author else {})}
                       for r in responses)
        meta = {"project": project.name, "presented_order": label.presented_order,
                "displayed_choice": label.displayed_choice, "time_spent_ms": label.time_spent_ms,
                "labelled_at": label.created_at.isoformat() + "Z", **({"item_meta": item.meta} if item.meta else {})}
        out.append(VoteRow(item.external_id, item.prompt, (responses[0].text, responses[1].text),
                           (models[0], models[1]), username, str(label.choice), label.strength, meta))
    return out
