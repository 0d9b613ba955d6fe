"""The chat task: an annotator talks to the project's model, picks the best of its drafts at every turn (the
other drafts, regenerated ones included, are worse than the pick), gives the picked answer a thumb up or
down, and goes on with the conversation; the picked draft becomes the assistant's turn.

A conversation is an Assignment, so the shared machinery applies: an imported prompt item is handed out
like any item (overlap k, never to its author), and skip, the label that finishes a conversation
(`{"turns": n}`, through services' own store and idempotent replay) and undo of a finished conversation
are the other tasks'. An annotator may also start a conversation by typing: that makes an item they own
(`Item.owner_id`), never handed to anyone else. Turns (`ChatTurn`) hold the user's messages, drafts
(`ChatDraft`) the model's answers by round (round 0 comes with the turn, each regenerate adds one) with the
model name and version that wrote them, picks (`ChatPick`) the choice and its thumb. Undo inside an open
conversation withdraws its latest pick (and the turn asked after it, if any).

The model is asked outside any transaction (a SQLite write transaction holds the whole database, and a
model may take a minute): the state is read and checked, the model asked (`chat.complete` with the
operator's allow-list), then the state is checked again and the turn with all its drafts written in one
transaction. A refused, failed or timed-out request leaves no row; a resent request (same idempotency key)
is answered from the database without asking the model again. The export of conversations is in exports.py.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.orm import Session

from alignloop.data import Message
from alignloop.feedback import chat, security, services, tasks
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
    User,
    utcnow,
)

logger = logging.getLogger(__name__)

EXPORT_KINDS = ("pairs", "thumbs", "conversations")
"""What a chat project exports (exports.py): the first is a download's default."""
MAX_DRAFTS = 9
"""Drafts per turn: one digit key each."""
MAX_MESSAGE_CHARS = 20_000
TEST_MESSAGE = "Say hello in one short sentence."
NO_MODEL = "this project has no model yet: an admin sets one on the project page (or PUT /api/v1/projects/{id}/model)"


class NotConfigured(services.Invalid):
    """The project has no model yet (answered 400; an admin sets one on the project page)."""


# ---------------------------------------------------------------------------------------------------------
# The project's model


@dataclass(frozen=True)
class Endpoint:
    """A project's model settings, detached from the session (the request is made after it closes)."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    n_drafts: int = 2
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 60.0
    key_stored: bool = field(default=False, repr=False)
    """A key is stored (sealed); `api_key` holds it only where it was unsealed to call the model."""

    def public(self) -> dict[str, Any]:
        """Everything but the key, which is never shown again: only whether one is set."""
        out = dataclasses.asdict(self)
        key, stored = out.pop("api_key"), out.pop("key_stored")
        out["api_key_set"] = bool(key) or stored
        return out


def _in_range(name: str, value: float | None, lo: float, hi: float, *, open_lo: bool = False) -> None:
    """Invalid unless `value` is None or within [lo, hi] ((lo, hi] with open_lo; NaN never is)."""
    if value is None:
        return
    if not ((value > lo) if open_lo else (value >= lo)) or not value <= hi:
        raise services.Invalid(f"{name} must be {'above' if open_lo else 'at least'} {lo:g} and at most {hi:g}")


def check_endpoint(e: Endpoint) -> Endpoint:
    """The settings tidied and checked (Invalid names the field). Whether the host may be called is the
    operator's allow-list's business, checked at every request (a name can resolve elsewhere later)."""
    base = e.base_url.strip()
    try:
        url = httpx.URL(base)
    except (httpx.InvalidURL, TypeError):
        raise services.Invalid(f"base URL: {base!r} is not a URL") from None
    if url.scheme not in ("http", "https") or not url.host or len(base) > 2000:
        raise services.Invalid("base URL: give http:// or https:// with a host, e.g. http://gpu-box:8001/v1")
    if url.userinfo:
        raise services.Invalid("base URL: put no user name or password in it; use the API key field")
    model = e.model.strip()
    if not 1 <= len(model) <= 200:
        raise services.Invalid("model: the name the server serves, 1-200 characters")
    if not 1 <= e.n_drafts <= MAX_DRAFTS:
        raise services.Invalid(f"drafts per turn must be between 1 and {MAX_DRAFTS}")
    _in_range("temperature", e.temperature, 0, 2)
    _in_range("top_p", e.top_p, 0, 1, open_lo=True)
    _in_range("max_tokens", e.max_tokens, 1, 1_000_000)
    _in_range("timeout", e.timeout_s, 1, 600)
    key = (e.api_key or "").strip() or None
    if key is not None and (len(key) > 4096 or any(c.isspace() for c in key)):
        raise services.Invalid("API key: one token, no spaces")
    return dataclasses.replace(e, base_url=base, model=model, api_key=key)


KEY_UNREADABLE = ("the project's stored API key cannot be opened with this app secret (it was stored under another "
                  "one): an admin sets the key again on the project page")
NO_SECRET = "storing an API key needs the app secret (ALIGNLOOP_APP_SECRET_KEY or ALIGNLOOP_APP_SECRET_KEY_FILE)"


def endpoint(db: Session, project: Project, secret: str | None = None) -> Endpoint | None:
    """The project's model, or None when none is set. With the app `secret` its API key is unsealed (to call
    the model; NotConfigured KEY_UNREADABLE when the secret changed since); without, only `key_stored` says one is set."""
    row = db.get(ChatEndpoint, project.id)
    if row is None:
        return None
    key = None
    if row.api_key is not None and secret is not None:
        try:
            key = security.unseal(secret, row.api_key)
        except security.Unsealable:
            raise NotConfigured(KEY_UNREADABLE) from None
    return Endpoint(row.base_url, row.model, key, row.n_drafts, row.temperature, row.top_p, row.max_tokens,
                    row.timeout_s, key_stored=row.api_key is not None)


def set_endpoint(db: Session, project: Project, settings: Endpoint, *, secret: str | None,
                 keep_key: bool = False) -> Endpoint:
    """Store a chat project's model, its API key sealed under the app `secret`; keep_key leaves the stored key
    as it is (a blank form field). Returns the settings without the key (`key_stored` says whether one is set)."""
    services._check_task(project, "chat")
    checked = check_endpoint(settings)
    if not keep_key and checked.api_key is not None and not secret:
        raise services.Invalid(NO_SECRET)
    row = db.get(ChatEndpoint, project.id)
    if row is None:
        row = ChatEndpoint(project_id=project.id)
        db.add(row)
    if keep_key:
        key = row.api_key
    else:
        key = None if checked.api_key is None else security.seal(secret or "", checked.api_key)
    for name, value in dataclasses.asdict(checked).items():
        if name not in ("api_key", "key_stored"):
            setattr(row, name, value)
    row.api_key, row.updated_at = key, utcnow()
    db.flush()
    logger.info("chat model set", extra={"project": project.name, "base_url": checked.base_url, "model": checked.model})
    return dataclasses.replace(checked, api_key=None, key_stored=key is not None)


def seal_stored_keys(db: Session, secret: str) -> int:
    """Seal the API keys stored in clear before sealing existed; returns how many (the server runs it at start)."""
    rows = db.execute(sa.select(ChatEndpoint).where(ChatEndpoint.api_key.is_not(None))).scalars().all()
    clear = [row for row in rows if row.api_key is not None and not security.is_sealed(row.api_key)]
    for row in clear:
        row.api_key = security.seal(secret, row.api_key)  # type: ignore[arg-type]
    db.flush()
    return len(clear)


def ask_model(e: Endpoint, messages: Sequence[Message], hosts: Sequence[str], transport: httpx.BaseTransport | None,
              n: int | None = None) -> list[chat.Draft]:
    """Drafts from the project's model (chat.complete; HostRefused or ChatError when there are none)."""
    if e.key_stored and e.api_key is None:
        raise RuntimeError("the project's API key was not unsealed: read the endpoint with the app secret")
    start = time.perf_counter()
    extra = {"base_url": e.base_url, "model": e.model, "n": n or e.n_drafts}
    try:
        drafts = chat.complete(e.base_url, e.model, messages, n or e.n_drafts, api_key=e.api_key, temperature=e.temperature,
                               top_p=e.top_p, max_tokens=e.max_tokens, timeout=e.timeout_s, allowed_hosts=hosts,
                               transport=transport)
    except chat.ChatError as err:
        logger.warning("chat model failed: %s", err, extra=extra)
        raise
    logger.info("chat drafts", extra={**extra, "ms": round(1000 * (time.perf_counter() - start)),
                                      "version": drafts[0].version})
    return drafts


# ---------------------------------------------------------------------------------------------------------
# A conversation's state


def _turns(db: Session, assignment_id: int) -> list[ChatTurn]:
    """The conversation's active turns in order (positions 0, 1, ...: undo withdraws only a suffix)."""
    return list(db.execute(sa.select(ChatTurn).where(ChatTurn.assignment_id == assignment_id, ChatTurn.undone_at.is_(None))
                           .order_by(ChatTurn.position)).scalars())


def active_picks(db: Session, turns: Sequence[ChatTurn]) -> dict[int, ChatPick]:
    """The active pick of each turn that has one, by turn id."""
    if not turns:
        return {}
    return {p.turn_id: p for p in db.execute(sa.select(ChatPick).where(
        ChatPick.turn_id.in_([t.id for t in turns]), ChatPick.undone_at.is_(None))).scalars()}


def picked_draft(turn: ChatTurn, pick: ChatPick) -> ChatDraft:
    return next(d for d in turn.drafts if d.id == pick.draft_id)


def latest_round(turn: ChatTurn) -> int:
    return max(d.round for d in turn.drafts)


def _state(assignment: Assignment, turns: Sequence[ChatTurn], picks: dict[int, ChatPick]) -> tuple[Any, ...]:
    """What must not change between checking a request and storing the model's answer to it."""
    return (assignment.status, tuple((t.id, len(t.drafts), picks[t.id].id if t.id in picks else None) for t in turns))


def _context(item: Item, turns: Sequence[ChatTurn], picks: dict[int, ChatPick], upto: int,
             user_message: str | None) -> list[Message]:
    """The conversation before turn `upto`'s answer: the item's prompt, each earlier turn's user message
    and picked draft, then `user_message` (None for the first turn: the prompt ends with the user)."""
    messages = [dict(m) for m in item.prompt]
    for turn in turns[:upto]:
        if turn.user_message is not None:
            messages.append({"role": "user", "content": turn.user_message})
        messages.append({"role": "assistant", "content": picked_draft(turn, picks[turn.id]).text})
    if user_message is not None:
        messages.append({"role": "user", "content": user_message})
    return messages


def _open_conversation(db: Session, project: Project, user_id: int,
                       assignment_id: int) -> tuple[Assignment, list[ChatTurn], dict[int, ChatPick]]:
    """The user's own open conversation in a chat project, with its turns and picks."""
    services._check_task(project, "chat")
    assignment = services._own_assignment(db, project, user_id, assignment_id)
    if assignment.status != "open":
        raise services.Conflict("this conversation is finished; undo first to go on with it")
    turns = _turns(db, assignment.id)
    return assignment, turns, active_picks(db, turns)


# ---------------------------------------------------------------------------------------------------------
# Asking for drafts: check, ask (no transaction open), store


@dataclass(frozen=True)
class Ask:
    """A checked request for drafts: what the model is sent and where its answer goes."""

    assignment_id: int | None
    """None: a conversation the user starts by typing `user_message`."""
    position: int
    round: int
    user_message: str | None
    messages: list[Message]
    endpoint: Endpoint
    state: tuple[Any, ...]


def _message(text: str | None) -> str | None:
    """A typed message with browser line endings normalised; None when blank."""
    if text is None or not text.strip():
        return None
    text = tasks.normalise_newlines(text).strip()
    if len(text) > MAX_MESSAGE_CHARS or "\x00" in text:
        raise services.Invalid(f"a message is text of at most {MAX_MESSAGE_CHARS} characters")
    return text


def plan(db: Session, project: Project, user_id: int, assignment_id: int | None, message: str | None,
         regenerate: bool = False, *, secret: str | None = None) -> Ask:
    """What to ask the model for: the first drafts of a new conversation (no assignment yet), of an
    imported prompt (no message), of the next turn (a message after a pick), or new drafts for the open
    turn (regenerate). Invalid or Conflict when the request does not fit the conversation's state."""
    services._check_task(project, "chat")
    model = endpoint(db, project, secret)
    if model is None:
        raise NotConfigured(NO_MODEL)
    text = _message(message)
    if assignment_id is None:
        if regenerate or text is None:
            raise services.Invalid("type a message to start a conversation")
        if services.current_assignment(db, project, user_id) is not None:
            raise services.Conflict("finish or skip your open conversation first")
        return Ask(None, 0, 0, text, [{"role": "user", "content": text}], model, ())
    assignment, turns, picks = _open_conversation(db, project, user_id, assignment_id)
    item = db.get(Item, assignment.item_id)
    assert item is not None
    state = _state(assignment, turns, picks)
    open_turn = turns[-1] if turns and turns[-1].id not in picks else None
    if regenerate:
        if open_turn is None:
            raise services.Conflict("there are no drafts to regenerate")
        return Ask(assignment.id, open_turn.position, latest_round(open_turn) + 1, open_turn.user_message,
                   _context(item, turns, picks, open_turn.position, open_turn.user_message), model, state)
    if open_turn is not None:
        raise services.Conflict("pick one of the drafts first (or regenerate them)")
    if turns and text is None:
        raise services.Invalid("type a message to send")
    if not turns and text is not None:
        raise services.Invalid("this conversation starts from its prompt: ask the model before writing")
    return Ask(assignment.id, len(turns), 0, text, _context(item, turns, picks, len(turns), text), model, state)


def _replayed(db: Session, user_id: int, key: str) -> int | None:
    """The conversation whose drafts this request key already brought (a resend), or None."""
    return db.execute(sa.select(ChatTurn.assignment_id).join(ChatDraft, ChatDraft.turn_id == ChatTurn.id)
                      .join(Assignment, Assignment.id == ChatTurn.assignment_id)
                      .where(Assignment.user_id == user_id, ChatDraft.idempotency_key == key).limit(1)).scalar_one_or_none()


def _start(db: Session, project: Project, user_id: int, message: str) -> Assignment:
    """A conversation the user starts by typing: an item of their own, assigned to them alone."""
    if services.current_assignment(db, project, user_id) is not None:
        raise services.Conflict("finish or skip your open conversation first")
    user = db.get(User, user_id)
    assert user is not None
    item = Item(project_id=project.id, external_id=f"chat-{secrets.token_hex(8)}",
                prompt=[{"role": "user", "content": message}], meta={"started_by": user.username}, owner_id=user_id)
    db.add(item)
    db.flush()
    db.add(ItemAuthor(item_id=item.id, username=user.username))
    assignment = Assignment(project_id=project.id, item_id=item.id, user_id=user_id, presented_order=[])
    db.add(assignment)
    db.flush()
    return assignment


def store(db: Session, project: Project, user_id: int, ask: Ask, drafts: Sequence[chat.Draft], key: str) -> int:
    """Write the asked turn (or round) with all its drafts, if the conversation is as it was when checked;
    returns the conversation's assignment id."""
    if ask.assignment_id is None:
        assignment = _start(db, project, user_id, str(ask.user_message))
        turns: list[ChatTurn] = []
    else:
        assignment, turns, picks = _open_conversation(db, project, user_id, ask.assignment_id)
        if _state(assignment, turns, picks) != ask.state:
            raise services.Conflict("the conversation changed while the model was answering; reload the page")
    if ask.round == 0:
        message = ask.user_message if ask.assignment_id is not None else None  # a started one's is the prompt
        turn = ChatTurn(assignment_id=assignment.id, position=ask.position, user_message=message, idempotency_key=key)
        db.add(turn)
        db.flush()
    else:
        turn = turns[ask.position]
    db.add_all(ChatDraft(turn_id=turn.id, round=ask.round, position=i, text=d.text, model_name=d.model[:200],
                         model_version=d.version[:200] if d.version else None,
                         finish_reason=d.finish_reason[:32] if d.finish_reason else None, idempotency_key=key)
               for i, d in enumerate(drafts))
    assignment.updated_at = utcnow()  # the conversation stays the user's current one and holds its place
    db.flush()
    return assignment.id


def _checked_key(key: str) -> str:
    if not key or len(key) > 64:
        raise services.Invalid("an idempotency key of 1-64 characters is required")
    return key


def converse(database: Database, project_id: int, user_id: int, assignment_id: int | None, message: str | None,
             key: str, *, regenerate: bool = False, hosts: Sequence[str] = (),
             transport: httpx.BaseTransport | None = None, secret: str | None = None) -> int:
    """Ask the model for a turn's drafts and store them (see the module docstring); returns the
    conversation's assignment id. Raises chat.HostRefused or chat.ChatError with nothing written."""
    key = _checked_key(key)
    with database.read() as db:
        project = services.member_project(db, user_id, project_id)
        if (done := _replayed(db, user_id, key)) is not None:
            return done
        ask = plan(db, project, user_id, assignment_id, message, regenerate, secret=secret)
    drafts = ask_model(ask.endpoint, ask.messages, hosts, transport)
    with database.write() as db:
        project = services.member_project(db, user_id, project_id, lock=True)
        if (done := _replayed(db, user_id, key)) is not None:
            return done
        return store(db, project, user_id, ask, drafts, key)


# ---------------------------------------------------------------------------------------------------------
# Picks, thumbs, finish, undo


def pick(db: Session, project: Project, user_id: int, assignment_id: int, draft_id: int, time_spent_ms: int | None,
         key: str) -> ChatPick:
    """Choose one draft of the open turn's latest round: it becomes the assistant's turn, and every other
    draft of the turn is recorded as worse. A replayed key returns the stored pick."""
    key = _checked_key(key)
    existing = db.execute(sa.select(ChatPick).where(ChatPick.user_id == user_id, ChatPick.idempotency_key == key))
    if (found := existing.scalar_one_or_none()) is not None:
        return found
    assignment, turns, picks = _open_conversation(db, project, user_id, assignment_id)
    if not turns or turns[-1].id in picks:
        raise services.Conflict("there is no draft to pick: send a message first")
    turn = turns[-1]
    draft = next((d for d in turn.drafts if d.id == draft_id), None)
    if draft is None:
        raise services.NotFound("no such draft")
    if draft.round != latest_round(turn):
        raise services.Conflict("these drafts were regenerated: pick one of the new ones")
    chosen = ChatPick(turn_id=turn.id, draft_id=draft.id, user_id=user_id, idempotency_key=key,
                      time_spent_ms=services._clamped_ms(time_spent_ms))
    db.add(chosen)
    assignment.updated_at = utcnow()
    db.flush()
    return chosen


def thumb(db: Session, project: Project, user_id: int, assignment_id: int, up: bool, position: int | None = None) -> None:
    """A thumb up or down on a picked turn of the open conversation (default: the latest picked one);
    giving it again replaces it."""
    assignment, turns, picks = _open_conversation(db, project, user_id, assignment_id)
    picked = [t for t in turns if t.id in picks and (position is None or t.position == position)]
    if not picked:
        raise services.Conflict("pick a draft before giving it a thumb")
    picks[picked[-1].id].thumb = up
    assignment.updated_at = utcnow()
    db.flush()


def finish(db: Session, project: Project, user_id: int, assignment_id: int, time_spent_ms: int | None,
           key: str) -> Label:
    """Close the conversation with a label `{"turns": n}` (every turn picked); its time is the picks'
    plus this page's. The next item comes up, as after any answer."""
    if (existing := services._replay(db, user_id, key)) is not None:
        return existing
    assignment, turns, picks = _open_conversation(db, project, user_id, assignment_id)
    if not turns or turns[-1].id not in picks:
        raise services.Invalid("pick a draft for the last turn before finishing")
    spent = sum(p.time_spent_ms or 0 for p in picks.values()) + (services._clamped_ms(time_spent_ms) or 0)
    return services._store(db, assignment, key, "done", answer={"turns": len(turns)},
                           time_spent_ms=services._clamped_ms(spent))


def undo(db: Session, project: Project, user_id: int) -> None:
    """Withdraw the latest pick of the user's open conversation (kept, marked undone: its drafts are shown
    again, and a turn asked after it is withdrawn too); with no pick there, the shared undo of the last
    answer, which reopens the last finished conversation."""
    current = services.current_assignment(db, project, user_id)
    if current is not None:
        turns = _turns(db, current.id)
        picks = active_picks(db, turns)
        picked = [t for t in turns if t.id in picks]
        if picked:
            now = utcnow()
            picks[picked[-1].id].undone_at = now
            for turn in turns[picked[-1].position + 1:]:
                turn.undone_at = now
            current.updated_at = now
            db.flush()
            return
    services.undo_last(db, project, user_id)


# ---------------------------------------------------------------------------------------------------------
# The page


def view(db: Session, assignment: Assignment) -> dict[str, Any]:
    """What the chat page shows: the prompt, each turn (the user's message, the picked answer and its
    thumb, or the latest drafts to pick from and how many earlier rounds were regenerated away), and the
    state: "ask" (no drafts yet), "pick" (drafts waiting) or "say" (the user's turn). No model names."""
    item = db.get(Item, assignment.item_id)
    assert item is not None
    turns = _turns(db, assignment.id)
    picks = active_picks(db, turns)
    shown = []
    for turn in turns:
        pick_ = picks.get(turn.id)
        latest = latest_round(turn)
        shown.append({"position": turn.position, "user": turn.user_message,
                      "picked": picked_draft(turn, pick_).text if pick_ else None, "thumb": pick_.thumb if pick_ else None,
                      "drafts": [] if pick_ else [{"id": d.id, "text": d.text} for d in turn.drafts if d.round == latest],
                      "earlier": [] if pick_ else [d.text for d in turn.drafts if d.round < latest]})
    state = "ask" if not turns else ("say" if turns[-1].id in picks else "pick")
    return {"assignment_id": assignment.id, "prompt": item.prompt, "turns": shown, "state": state,
            "started_by_me": item.owner_id == assignment.user_id}


def counts(db: Session, project: Project) -> dict[str, int]:
    """The admin's figures: conversations with a turn, picked turns, drafts, thumbs up and down."""
    turns = (sa.select(ChatTurn.id).join(Assignment, Assignment.id == ChatTurn.assignment_id)
             .where(Assignment.project_id == project.id, ChatTurn.undone_at.is_(None)))
    picks = sa.select(ChatPick.thumb).where(ChatPick.turn_id.in_(turns), ChatPick.undone_at.is_(None))
    thumbs = [t for (t,) in db.execute(picks).all()]
    conversations = db.execute(sa.select(sa.func.count(sa.distinct(ChatTurn.assignment_id)))
                               .where(ChatTurn.id.in_(turns))).scalar_one()
    drafts = db.execute(sa.select(sa.func.count()).select_from(ChatDraft).where(ChatDraft.turn_id.in_(turns))).scalar_one()
    return {"conversations": conversations, "picked_turns": len(thumbs), "drafts": drafts,
            "thumbs_up": sum(t is True for t in thumbs), "thumbs_down": sum(t is False for t in thumbs)}
