"""A project as one portable JSON Lines file (`alignloop app dump` and `alignloop app load`, RELIABILITY.md W14):
its settings and members, items with their tagged responses, assignments with the order they were shown in,
every label as given (skips and undone ones too) and, for chat, the model settings and every turn, draft
and pick. Unlike the training exports nothing is converted or left out, so a project moves between
databases (SQLite and PostgreSQL alike) and dump -> load -> dump gives the same bytes.

Rows name each other by what survives the move, never by database id: items by their import id, people by
user name, assignments by (item, annotator), chat turns by their idempotency key within the assignment,
drafts by (round, position). Lines come in id order within each kind, so a load inserts rows in their
original order and every export of the loaded project matches the original's. Keys are sorted on every
line. The chat model's API key is a secret and is not written: set it again after a load.

`dump` reads one snapshot (`Database.snapshot`), so a project dumped while annotators work is one
committed state. `load` writes everything in one transaction or nothing; the project's name must be free,
its users must exist already (`alignloop app user add`; no account is made behind an admin's back), and
labels whose idempotency keys are taken are refused as already loaded.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.feedback import services
from alignloop.feedback.db import (
    Assignment,
    ChatDraft,
    ChatEndpoint,
    ChatPick,
    ChatTurn,
    Database,
    Item,
    ItemAuthor,
    Label,
    Project,
    ProjectMember,
    Response,
    User,
)

FORMAT, VERSION = "alignloop-feedback-project", 1
LABEL_FIELDS = ("choice", "strength", "displayed_choice", "answer", "skip_reason", "presented_order", "time_spent_ms",
                "idempotency_key", "created_at", "undone_at")
ENDPOINT_FIELDS = ("base_url", "model", "n_drafts", "temperature", "top_p", "max_tokens", "timeout_s", "updated_at")
DRAFT_FIELDS = ("round", "position", "text", "model_name", "model_version", "finish_reason", "idempotency_key",
                "created_at")


def _time(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _parse_time(value: str | None) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)


def _fields(row: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The named columns of a row, times as ISO strings."""
    return {n: _time(v) if isinstance(v, dt.datetime) else v for n, v in ((n, getattr(row, n)) for n in names)}


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Dump


def dump(database: Database, name: str) -> str:
    """The project's dump (JSON Lines text), read from one snapshot."""
    with database.snapshot() as db:
        return "".join(_line(r) for r in _records(db, services.project_by_name(db, name)))


def _records(db: Session, project: Project) -> Iterator[dict[str, Any]]:
    names = dict(db.execute(sa.select(User.id, User.username)).all())
    endpoint = db.get(ChatEndpoint, project.id)
    yield {"format": FORMAT, "version": VERSION,
           "project": _fields(project, ("name", "task", "guidelines", "overlap_k", "created_at")),
           "members": services.members(db, project),
           "chat_model": None if endpoint is None else _fields(endpoint, ENDPOINT_FIELDS)}
    items = {}
    for item in db.execute(sa.select(Item).where(Item.project_id == project.id).order_by(Item.id)).scalars():
        items[item.id] = item.external_id
        authors = db.execute(sa.select(ItemAuthor.username).where(ItemAuthor.item_id == item.id)
                             .order_by(ItemAuthor.username)).scalars()
        yield {"item": {"id": item.external_id, "prompt": item.prompt, "meta": item.meta, "gold": item.gold,
                        "owner": names.get(item.owner_id) if item.owner_id is not None else None,
                        "created_at": _time(item.created_at), "authors": list(authors),
                        "responses": [{"text": r.text, "model": r.model_name, "version": r.model_version,
                                       "author": r.author} for r in item.responses]}}
    assignments = {}
    for a in db.execute(sa.select(Assignment).where(Assignment.project_id == project.id).order_by(Assignment.id)).scalars():
        assignments[a.id] = {"item": items[a.item_id], "annotator": names[a.user_id]}
        yield {"assignment": {**assignments[a.id], **_fields(a, ("presented_order", "status", "created_at", "updated_at"))}}
    for label in db.execute(sa.select(Label).where(Label.project_id == project.id).order_by(Label.id)).scalars():
        yield {"label": {**assignments[label.assignment_id], **_fields(label, LABEL_FIELDS)}}
    if project.task == "chat":
        yield from _chat_records(db, assignments)


def _chat_records(db: Session, assignments: dict[int, dict[str, str]]) -> Iterator[dict[str, Any]]:
    turns = {}
    for turn in db.execute(sa.select(ChatTurn).where(ChatTurn.assignment_id.in_(assignments)).order_by(ChatTurn.id)).scalars():
        turns[turn.id] = {**assignments[turn.assignment_id], "turn": turn.idempotency_key}
        yield {"turn": {**turns[turn.id], **_fields(turn, ("position", "user_message", "created_at", "undone_at")),
                        "drafts": [_fields(d, DRAFT_FIELDS) for d in turn.drafts]}}
    drafts = {d.id: [d.round, d.position] for d in db.execute(sa.select(ChatDraft).where(ChatDraft.turn_id.in_(turns))).scalars()}
    for pick in db.execute(sa.select(ChatPick).where(ChatPick.turn_id.in_(turns)).order_by(ChatPick.id)).scalars():
        yield {"pick": {**turns[pick.turn_id], "draft": drafts[pick.draft_id],
                        **_fields(pick, ("thumb", "time_spent_ms", "idempotency_key", "created_at", "undone_at"))}}


# ---------------------------------------------------------------------------------------------------------
# Load


def load(database: Database, text: str, source: str) -> dict[str, Any]:
    """Recreate a dumped project in this database, all or nothing; the project's name and row counts."""
    lines = _parse_lines(text, source)
    if not lines or lines[0].get("format") != FORMAT or lines[0].get("version") != VERSION:
        raise services.Invalid(f"{source}: not a project dump (`alignloop app dump`, format {FORMAT} {VERSION})")
    with database.write() as db:
        try:
            return _load(db, lines)
        except services.Invalid:
            raise
        except (KeyError, TypeError, ValueError, StopIteration) as err:
            raise services.Invalid(f"{source}: a malformed dump ({type(err).__name__}: {err})") from None


def _parse_lines(text: str, source: str) -> list[dict[str, Any]]:
    """Each non-blank line as a JSON object; a bad one is named by file and line, before anything is written."""
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise services.Invalid(f"{source}:{number}: not JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(row, dict):
            raise services.Invalid(f"{source}:{number}: a dump line is a JSON object, not {type(row).__name__}")
        rows.append(row)
    return rows


def _user_ids(db: Session, lines: list[dict[str, Any]]) -> dict[str, int]:
    """Ids of everyone the dump names; NotFound listing those missing."""
    wanted = set(lines[0]["members"])
    for line in lines[1:]:
        row = next(iter(line.values()))
        wanted |= {row.get("annotator"), row.get("owner")} - {None}
    found = dict(db.execute(sa.select(User.username, User.id).where(User.username.in_(wanted))).all())
    missing = sorted(wanted - set(found))
    if missing:
        raise services.NotFound(f"the dump names users this database lacks: {', '.join(missing)}; add them first "
                                "(alignloop app user add)")
    return found


def _load(db: Session, lines: list[dict[str, Any]]) -> dict[str, Any]:
    head = lines[0]
    users = _user_ids(db, lines)
    spec = head["project"]
    project = services.create_project(db, spec["name"], spec["guidelines"], spec["overlap_k"], spec["task"])
    project.created_at = _parse_time(spec["created_at"])  # type: ignore[assignment]
    db.add_all(ProjectMember(project_id=project.id, user_id=users[n]) for n in head["members"])
    if head.get("chat_model"):
        db.add(ChatEndpoint(project_id=project.id, **{**head["chat_model"],
                                                      "updated_at": _parse_time(head["chat_model"]["updated_at"])}))
    items: dict[str, int] = {}
    assignments: dict[tuple[str, str], Assignment] = {}
    turns: dict[tuple[str, str, str], ChatTurn] = {}
    counts = {"items": 0, "assignments": 0, "labels": 0, "turns": 0, "picks": 0}
    for line in lines[1:]:
        (kind, row), = line.items()
        if kind == "item":
            items[row["id"]] = _add_item(db, project, row, users)
        elif kind == "assignment":
            a = Assignment(project_id=project.id, item_id=items[row["item"]], user_id=users[row["annotator"]],
                           presented_order=row["presented_order"], status=row["status"],
                           created_at=_parse_time(row["created_at"]), updated_at=_parse_time(row["updated_at"]))
            db.add(a)
            db.flush()
            assignments[row["item"], row["annotator"]] = a
        elif kind == "label":
            a = assignments[row["item"], row["annotator"]]
            _refuse_taken_key(db, Label, a.user_id, row["idempotency_key"])
            db.add(Label(assignment_id=a.id, project_id=project.id, item_id=a.item_id, user_id=a.user_id,
                         **_times(row, LABEL_FIELDS)))
        elif kind == "turn":
            a = assignments[row["item"], row["annotator"]]
            turn = ChatTurn(assignment_id=a.id, idempotency_key=row["turn"],
                            **_times(row, ("position", "user_message", "created_at", "undone_at")))
            turn.drafts = [ChatDraft(**_times(d, DRAFT_FIELDS)) for d in row["drafts"]]
            db.add(turn)
            turns[row["item"], row["annotator"], row["turn"]] = turn
        elif kind == "pick":
            turn = turns[row["item"], row["annotator"], row["turn"]]
            a = assignments[row["item"], row["annotator"]]
            _refuse_taken_key(db, ChatPick, a.user_id, row["idempotency_key"])
            db.flush()
            draft = next(d for d in turn.drafts if [d.round, d.position] == row["draft"])
            db.add(ChatPick(turn_id=turn.id, draft_id=draft.id, user_id=a.user_id,
                            **_times(row, ("thumb", "time_spent_ms", "idempotency_key", "created_at", "undone_at"))))
        else:
            raise ValueError(f"unknown line kind {kind!r}")
        counts[kind + "s"] += 1
        db.flush()
    return {"project": project.name, "id": project.id, **counts}


def _times(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The named fields of a dumped row, `*_at` parsed back to datetimes."""
    return {n: _parse_time(row[n]) if n.endswith("_at") else row[n] for n in names}


def _add_item(db: Session, project: Project, row: dict[str, Any], users: dict[str, int]) -> int:
    item = Item(project_id=project.id, external_id=row["id"], prompt=row["prompt"], meta=row["meta"], gold=row["gold"],
                owner_id=users[row["owner"]] if row["owner"] else None, created_at=_parse_time(row["created_at"]))
    item.responses = [Response(position=i, text=r["text"], model_name=r["model"], model_version=r["version"],
                               author=r["author"]) for i, r in enumerate(row["responses"])]
    db.add(item)
    db.flush()
    db.add_all(ItemAuthor(item_id=item.id, username=name) for name in row["authors"])
    return item.id


def _refuse_taken_key(db: Session, table: type[Label] | type[ChatPick], user_id: int, key: str) -> None:
    """Conflict when this user already has an answer under the key: the dump was loaded here before (the
    key is how a resent answer is recognised, so two rows under one key cannot be)."""
    taken = db.execute(sa.select(table.id).where(table.user_id == user_id, table.idempotency_key == key)).first()
    if taken is not None:
        raise services.Conflict(f"an answer with idempotency key {key!r} is already stored here: was this dump loaded "
                                "before?")
