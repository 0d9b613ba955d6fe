"""What the app does, apart from HTTP: projects, import, assignment, labels, progress, export rows.

Handlers stay thin by calling these with a session from `Database.write()` or `read()`. Visibility
rules live here: an annotator sees only projects they are a member of (others are "not found", so ids
do not leak), only their own labels, and is never assigned an item they wrote. Assignment honours the
project's overlap k: an item is handed out until k annotators have labelled it or hold a fresh open
assignment (older than the TTL, an open one stops counting so an absent annotator does not block it).
Gold items are the exception: each goes to every member once (that is what gives each annotator a gold
score), in import order among the others. Every task shares this machinery (assignment, skip, undo,
idempotent resend); only the answer differs (`submit_label` for pairwise, `submit_answer` for rank, rate and
edit; the chat task's turns, drafts and picks are in conversations.py).
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.data import DataError
from alignloop.feedback import tasks
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
from alignloop.feedback.records import STRENGTHS, ItemIn, VoteRow

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


def create_project(db: Session, name: str, guidelines: str = "", overlap_k: int = 1,
                   task: str = "pairwise") -> Project:
    """A new project; its task (db.TASKS) is fixed from now on, since items are validated for it."""
    name = name.strip()
    if not name or len(name) > 200:
        raise Invalid("a project name is 1-200 characters")
    if not 1 <= overlap_k <= 100:
        raise Invalid("overlap k must be between 1 and 100")
    try:
        tasks.check_task(task)
    except tasks.BadAnswer as err:
        raise Invalid(str(err)) from None
    if db.execute(sa.select(Project.id).where(Project.name == name)).first() is not None:
        raise Conflict(f"project {name!r} already exists")
    project = Project(name=name, guidelines=guidelines, overlap_k=overlap_k, task=task)
    db.add(project)
    db.flush()
    logger.info("project created", extra={"project": name, "overlap_k": overlap_k, "task": task})
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
        if item.task != project.task:
            raise DataError("D109", f"the row was read for a {item.task} project; this one is {project.task}",
                            path=source, line=item.line, record_id=item.id)
    for item in items:
        row = Item(project_id=project.id, external_id=item.id, prompt=item.prompt, meta=item.meta, gold=item.gold)
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
    """Items of the project this user may be given: not written by them, not already theirs, not a
    conversation someone started by typing (chat), and fewer than k annotators on them (gold: any number)."""
    taken = (sa.select(sa.func.count()).select_from(Assignment)
             .where(Assignment.item_id == Item.id, _counts_towards_k(cutoff)).scalar_subquery())
    return sa.select(Item).where(
        Item.project_id == project.id,
        Item.owner_id.is_(None),
        ~sa.exists().where(ItemAuthor.item_id == Item.id, ItemAuthor.username == user.username),
        ~sa.exists().where(Assignment.item_id == Item.id, Assignment.user_id == user.id),
        (taken < project.overlap_k) | Item.gold.is_not(None),
    )


def current_assignment(db: Session, project: Project, user_id: int) -> Assignment | None:
    """The user's open assignment, most recently (re)opened first (undo reopens one)."""
    return db.execute(sa.select(Assignment).where(
        Assignment.project_id == project.id, Assignment.user_id == user_id, Assignment.status == "open",
    ).order_by(Assignment.updated_at.desc(), Assignment.id.desc()).limit(1)).scalar_one_or_none()


def next_assignment(db: Session, project: Project, user_id: int, ttl_minutes: float) -> Assignment | None:
    """The user's open assignment, or a new one on the first eligible item in import order (its responses
    shown in a random order, recorded); None when nothing is left for them. Call with the project row
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
    order = list(range(len(item.responses)))
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


def _clamped_ms(time_spent_ms: int | None) -> int | None:
    """The page's own timer, kept within 0 ms and a day (a client can send anything)."""
    return None if time_spent_ms is None else max(0, min(int(time_spent_ms), 86_400_000))


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
    """Store one pairwise vote on the user's own open assignment (a replayed key returns the stored label)."""
    if (existing := _replay(db, user_id, key)) is not None:
        return existing
    _check_task(project, "pairwise")
    assignment = _own_assignment(db, project, user_id, assignment_id)
    choice, strength = _canonical_choice(displayed, strength or None, assignment.presented_order)
    return _store(db, assignment, key, "done", choice=choice, strength=strength, displayed_choice=displayed,
                  time_spent_ms=_clamped_ms(time_spent_ms))


def _check_task(project: Project, task: str) -> None:
    if project.task != task:
        raise Invalid(f"this project's task is {project.task}, not {task}")


def _answer(task: str, form: dict[str, Any], assignment: Assignment, item: Item) -> dict[str, Any]:
    """The stored answer of a rank, rate or edit form (see tasks.py), in import positions."""
    try:
        if task == "rank":
            return tasks.rank_answer(str(form.get("ranking") or ""), assignment.presented_order)
        if task == "rate":
            return tasks.rate_answer({a: form.get(a) for a in tasks.RATE_AXES}, list(form.get("flags") or []))
        if task == "edit":
            return tasks.edit_answer(str(form.get("edited") or ""), item.responses[0].text)
    except tasks.BadAnswer as err:
        raise Invalid(str(err)) from None
    raise Invalid(f"{task} answers are not taken here")


def submit_answer(db: Session, project: Project, user_id: int, assignment_id: int, task: str, form: dict[str, Any],
                  time_spent_ms: int | None, key: str) -> Label:
    """Store a rank, rate or edit answer (`form` holds the task's fields) on the user's own open
    assignment; a replayed key returns the stored label, as for votes."""
    if (existing := _replay(db, user_id, key)) is not None:
        return existing
    _check_task(project, task)
    assignment = _own_assignment(db, project, user_id, assignment_id)
    item = db.get(Item, assignment.item_id)
    assert item is not None
    answer = _answer(task, form, assignment, item)
    return _store(db, assignment, key, "done", answer=answer, time_spent_ms=_clamped_ms(time_spent_ms))


def skip(db: Session, project: Project, user_id: int, assignment_id: int, reason: str, time_spent_ms: int | None,
         key: str) -> Label:
    """Record a skip with its reason; the item goes to someone else (a skip does not count towards k)."""
    if (existing := _replay(db, user_id, key)) is not None:
        return existing
    reason = reason.strip()
    if not reason or len(reason) > 1000:
        raise Invalid("a skip needs a reason (at most 1000 characters)")
    assignment = _own_assignment(db, project, user_id, assignment_id)
    return _store(db, assignment, key, "skipped", skip_reason=reason, time_spent_ms=_clamped_ms(time_spent_ms))


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
    """What the annotation page shows: prompt and responses in the presented order (`shown`; pairwise
    also `left` and `right`). Model names and gold answers are left out: annotators judge the text, not
    the brand, and cannot tell a gold item from any other."""
    item = db.get(Item, assignment.item_id)
    assert item is not None
    texts = [r.text for r in item.responses]
    shown = [texts[p] for p in assignment.presented_order]
    view: dict[str, Any] = {"assignment_id": assignment.id, "prompt": item.prompt, "shown": shown}
    if len(shown) == 2:
        view["left"], view["right"] = shown
    return view


# ---------------------------------------------------------------------------------------------------------
# Progress and export


def active_answers() -> sa.ColumnElement[bool]:
    """Labels that count: not undone, not skips (a vote or a task answer)."""
    return Label.undone_at.is_(None) & Label.skip_reason.is_(None)


def answer_of(label: Label) -> dict[str, Any]:
    """A label's answer in the shape of tasks.py (a pairwise vote is {"choice": ...})."""
    return {"choice": label.choice} if label.choice is not None else dict(label.answer or {})


def user_progress(db: Session, project: Project, user_id: int, ttl_minutes: float) -> dict[str, int]:
    """The annotator's own counts: labelled, skipped, and items still available to them."""
    user = db.get(User, user_id)
    assert user is not None
    mine = sa.select(sa.func.count()).select_from(Label).where(
        Label.project_id == project.id, Label.user_id == user_id, Label.undone_at.is_(None))
    labelled = db.execute(mine.where(Label.skip_reason.is_(None))).scalar_one()
    skipped = db.execute(mine.where(Label.skip_reason.is_not(None))).scalar_one()
    cutoff = utcnow() - dt.timedelta(minutes=ttl_minutes)
    available = db.execute(sa.select(sa.func.count()).select_from(_eligible_items(project, user, cutoff).subquery())).scalar_one()
    return {"labelled": labelled, "skipped": skipped, "remaining": available}


def active_labels(db: Session, project: Project) -> list[tuple[Label, Item, str]]:
    """Every answer that counts (not undone, not a skip), oldest first, with its item and annotator name."""
    return [tuple(row) for row in db.execute(  # type: ignore[misc]
        sa.select(Label, Item, User.username).join(Item, Item.id == Label.item_id).join(User, User.id == Label.user_id)
        .where(Label.project_id == project.id, active_answers()).order_by(Label.id)).all()]


def response_models(item: Item) -> list[dict[str, Any]]:
    """The model (name, version) or author tag of each response, in import order."""
    return [{"name": r.model_name, "version": r.model_version, **({"author": r.author} if r.author else {})}
            for r in item.responses]


def label_meta(project: Project, label: Label, item: Item) -> dict[str, Any]:
    """What every exported raw record says about how its label was made."""
    return {"project": project.name, "presented_order": label.presented_order, "time_spent_ms": label.time_spent_ms,
            "labelled_at": label.created_at.isoformat() + "Z", **({"item_meta": item.meta} if item.meta else {})}


def vote_rows(db: Session, project: Project) -> list[VoteRow]:
    """Every active pairwise vote of the project, oldest first, with its item's texts and model tags."""
    out = []
    for label, item, username in active_labels(db, project):
        if label.choice is None:
            continue
        responses, models = item.responses, response_models(item)
        meta = {**label_meta(project, label, item), "displayed_choice": label.displayed_choice}
        out.append(VoteRow(item.external_id, item.prompt, (responses[0].text, responses[1].text),
                           (models[0], models[1]), username, str(label.choice), label.strength, meta))
    return out
