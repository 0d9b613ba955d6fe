"""Every table of the feedback app (SQLAlchemy models) and the engine with its durability settings.

The schema itself is created and changed only by the Alembic migrations in `migrations/` (0001 matches
these models; a test compares them). SQLite gets WAL, `synchronous=FULL`, `busy_timeout=30000` and
foreign keys on every connection, and write transactions start with `BEGIN IMMEDIATE`: a deferred
transaction that later writes can fail with "database is locked" under concurrent submissions, an
immediate one waits its turn (RELIABILITY.md W10-W12). PostgreSQL runs with `synchronous_commit=on`, and
`jit=off`: compiling a plan took 120 ms of a 390 ms quality query and saves nothing on the app's short ones.
Times are naive UTC (SQLite keeps no zone). A label is never deleted: undo sets `undone_at`.
Nullable JSON columns (`Item.gold`, `Label.answer`) store Python None as SQL NULL, so `IS NULL` works.
The chat task's conversations (0003) hang off assignments: turns, their drafts and the annotator's picks.
Project settings carry a version and every attempted edit an audit row (0004).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

ROLES = ("admin", "annotator")
ASSIGNMENT_STATUSES = ("open", "done", "skipped")
CHOICES = ("a", "b", "tie", "both_bad")
TASKS = ("pairwise", "rank", "rate", "edit", "chat")
"""What annotators do with a project's items (`Project.task`; fixed when the project is made)."""


def utcnow() -> dt.datetime:
    """Naive UTC now: the one time representation stored in both databases."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: sa.JSON, list[Any]: sa.JSON}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (sa.CheckConstraint("role IN ('admin', 'annotator')", name="ck_users_role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(sa.String(255))
    role: Mapped[str] = mapped_column(sa.String(16))
    active: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token for programs; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    token_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class AuthSession(Base):
    """A browser login; the cookie holds the token, the table its SHA-256 (a leaked table logs no one in)."""

    __tablename__ = "auth_sessions"

    token_hash: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]


class Project(Base):
    __tablename__ = "projects"
    __table_args__ = (sa.CheckConstraint("overlap_k >= 1", name="ck_projects_overlap_k"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200), unique=True)
    guidelines: Mapped[str] = mapped_column(sa.Text, default="")
    overlap_k: Mapped[int] = mapped_column(default=1)
    task: Mapped[str] = mapped_column(sa.String(32), default="pairwise")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    version: Mapped[int] = mapped_column(default=1, server_default=sa.text("1"))
    """Raised by every accepted edit of the settings (0004): an edit made from an older version gets 409."""


class AuditEntry(Base):
    """One attempted change (0004, audit.py): who, when, what (`details`) and whether it was applied or
    refused as a conflict. Names its object by type and id, without a foreign key, to outlive it."""

    __tablename__ = "audit_log"
    __table_args__ = (
        sa.CheckConstraint("outcome IN ('applied', 'conflict')", name="ck_audit_log_outcome"),
        sa.Index("ix_audit_log_object", "object_type", "object_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    user_id: Mapped[int | None] = mapped_column(sa.ForeignKey("users.id", ondelete="SET NULL"))
    username: Mapped[str] = mapped_column(sa.String(64))
    action: Mapped[str] = mapped_column(sa.String(64))
    object_type: Mapped[str] = mapped_column(sa.String(32))
    object_id: Mapped[int]
    outcome: Mapped[str] = mapped_column(sa.String(16))
    details: Mapped[dict[str, Any]]


class ProjectMember(Base):
    """An annotator who may label a project's items (admins see every project)."""

    __tablename__ = "project_members"

    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)


class Item(Base):
    """A prompt with candidate responses (2 to compare, 2-9 to rank, 1 to rate or edit); `external_id` is
    the id given at import. A gold item also holds its known answer, for per-annotator quality."""

    __tablename__ = "items"
    __table_args__ = (sa.UniqueConstraint("project_id", "external_id", name="uq_items_project_external"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str] = mapped_column(sa.String(200))
    prompt: Mapped[list[Any]]
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    gold: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON(none_as_null=True), default=None)
    """The known answer, in the shape of `Label.answer` (pairwise: {"choice": "a"}), or None."""
    owner_id: Mapped[int | None] = mapped_column(default=None)
    """Chat: the user who started this conversation by typing its first message; such an item is theirs
    alone and never handed out. A plain column, not a foreign key: adding one on SQLite would rebuild the
    items table, and users are never deleted (they are deactivated)."""
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    responses: Mapped[list[Response]] = relationship(order_by="Response.position", lazy="selectin")


class Response(Base):
    """One candidate answer, tagged with the model (and version) or person that wrote it."""

    __tablename__ = "responses"
    __table_args__ = (sa.UniqueConstraint("item_id", "position", name="uq_responses_item_position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id", ondelete="CASCADE"))
    position: Mapped[int]
    text: Mapped[str] = mapped_column(sa.Text)
    model_name: Mapped[str] = mapped_column(sa.String(200))
    model_version: Mapped[str] = mapped_column(sa.String(200), default="")
    author: Mapped[str | None] = mapped_column(sa.String(64), default=None)


class ItemAuthor(Base):
    """A user name that wrote the item's prompt or a response: never assigned that item."""

    __tablename__ = "item_authors"

    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id", ondelete="CASCADE"), primary_key=True)
    username: Mapped[str] = mapped_column(sa.String(64), primary_key=True)


class Assignment(Base):
    """An item handed to one annotator, with the order its responses are shown in (`presented_order[d]` is
    the position of the response shown d-th; pairwise: [left, right])."""

    __tablename__ = "assignments"
    __table_args__ = (
        sa.UniqueConstraint("item_id", "user_id", name="uq_assignments_item_user"),
        sa.CheckConstraint("status IN ('open', 'done', 'skipped')", name="ck_assignments_status"),
        sa.Index("ix_assignments_project_user_status", "project_id", "user_id", "status"),
        # 0005: counting the annotators on each item (who may still be given it) reads only this index.
        sa.Index("ix_assignments_item_status", "item_id", "status", "updated_at"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    presented_order: Mapped[list[Any]]
    status: Mapped[str] = mapped_column(sa.String(16), default="open")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


ONE_OUTCOME = ("(CASE WHEN choice IS NULL THEN 0 ELSE 1 END) + (CASE WHEN answer IS NULL THEN 0 ELSE 1 END)"
               " + (CASE WHEN skip_reason IS NULL THEN 0 ELSE 1 END) = 1")
ACTIVE_ANSWER = "undone_at IS NULL AND skip_reason IS NULL"
ACTIVE_SKIP = "undone_at IS NULL AND skip_reason IS NOT NULL"


class Label(Base):
    """One annotator's raw answer (or skip) on an assignment: exactly one of `choice` (pairwise, in response
    positions: "a" = position 0; `displayed_choice` as clicked, "left", "right", ...), `answer` (rank, rate,
    edit: see tasks.py) or `skip_reason`. Undo sets `undone_at`."""

    __tablename__ = "labels"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_labels_user_idempotency"),
        sa.CheckConstraint("choice IS NULL OR choice IN ('a', 'b', 'tie', 'both_bad')", name="ck_labels_choice"),
        sa.CheckConstraint(ONE_OUTCOME, name="ck_labels_one_outcome"),
        sa.Index("uq_labels_active_assignment", "assignment_id", unique=True,
                 sqlite_where=sa.text("undone_at IS NULL"), postgresql_where=sa.text("undone_at IS NULL")),
        sa.Index("ix_labels_project_user", "project_id", "user_id"),
        # 0005: the quality figures read the active answers from this index alone (walking it per annotator in
        # time order for medians); it names undone_at and skip_reason (always NULL here) so that SQLite
        # sees it covers those queries and prefers it. Skips have their own small index.
        sa.Index("ix_labels_active_answers", "project_id", "user_id", "time_spent_ms", "displayed_choice", "item_id",
                 "choice", "undone_at", "skip_reason", sqlite_where=sa.text(ACTIVE_ANSWER),
                 postgresql_where=sa.text(ACTIVE_ANSWER)),
        sa.Index("ix_labels_skips", "project_id", "user_id", sqlite_where=sa.text(ACTIVE_SKIP),
                 postgresql_where=sa.text(ACTIVE_SKIP)),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(sa.ForeignKey("assignments.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(sa.ForeignKey("items.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    choice: Mapped[str | None] = mapped_column(sa.String(16), default=None)
    strength: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    displayed_choice: Mapped[str | None] = mapped_column(sa.String(16), default=None)
    answer: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON(none_as_null=True), default=None)
    skip_reason: Mapped[str | None] = mapped_column(sa.Text, default=None)
    presented_order: Mapped[list[Any]]
    time_spent_ms: Mapped[int | None] = mapped_column(default=None)
    idempotency_key: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    undone_at: Mapped[dt.datetime | None] = mapped_column(default=None)


# ---------------------------------------------------------------------------------------------------------
# The chat task (see conversations.py)


class ChatEndpoint(Base):
    """The OpenAI-compatible model a chat project's annotators talk to, set by an admin. `api_key` is
    sent to the model server and never shown again (pages and the API say only whether one is set)."""

    __tablename__ = "chat_endpoints"
    __table_args__ = (sa.CheckConstraint("n_drafts >= 1 AND n_drafts <= 9", name="ck_chat_endpoints_n_drafts"),)

    project_id: Mapped[int] = mapped_column(sa.ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True)
    base_url: Mapped[str] = mapped_column(sa.String(2000))
    model: Mapped[str] = mapped_column(sa.String(200))
    api_key: Mapped[str | None] = mapped_column(sa.Text, default=None)
    n_drafts: Mapped[int] = mapped_column(default=2)
    temperature: Mapped[float | None] = mapped_column(default=None)
    top_p: Mapped[float | None] = mapped_column(default=None)
    max_tokens: Mapped[int | None] = mapped_column(default=None)
    timeout_s: Mapped[float] = mapped_column(default=60.0)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ChatTurn(Base):
    """One assistant turn of a conversation (an assignment): the user's message asking for it (None for
    the first turn, which answers the item's prompt) and its drafts. Undo withdraws a turn (`undone_at`)."""

    __tablename__ = "chat_turns"
    __table_args__ = (
        sa.UniqueConstraint("assignment_id", "idempotency_key", name="uq_chat_turns_assignment_idempotency"),
        sa.Index("uq_chat_turns_active_position", "assignment_id", "position", unique=True,
                 sqlite_where=sa.text("undone_at IS NULL"), postgresql_where=sa.text("undone_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    assignment_id: Mapped[int] = mapped_column(sa.ForeignKey("assignments.id", ondelete="CASCADE"))
    position: Mapped[int]
    user_message: Mapped[str | None] = mapped_column(sa.Text, default=None)
    idempotency_key: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    undone_at: Mapped[dt.datetime | None] = mapped_column(default=None)
    drafts: Mapped[list[ChatDraft]] = relationship(order_by="[ChatDraft.round, ChatDraft.position]", lazy="selectin")


class ChatDraft(Base):
    """One response the model gave for a turn, with the model name and version that produced it. Round 0
    came with the turn; each regenerate adds a round (drafts are never deleted)."""

    __tablename__ = "chat_drafts"
    __table_args__ = (sa.UniqueConstraint("turn_id", "round", "position", name="uq_chat_drafts_turn_round_position"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(sa.ForeignKey("chat_turns.id", ondelete="CASCADE"), index=True)
    round: Mapped[int]
    position: Mapped[int]
    text: Mapped[str] = mapped_column(sa.Text)
    model_name: Mapped[str] = mapped_column(sa.String(200))
    model_version: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    """The server's `system_fingerprint` (ours: a hash of the weights); None when it gave none."""
    finish_reason: Mapped[str | None] = mapped_column(sa.String(32), default=None)
    idempotency_key: Mapped[str] = mapped_column(sa.String(64))
    """The request that asked for this round: a resent request finds its drafts instead of asking again."""
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class ChatPick(Base):
    """The annotator's choice of one draft of a turn (every other draft of the turn, all rounds, is worse)
    and their thumb on it. At most one active pick per turn; undo sets `undone_at`."""

    __tablename__ = "chat_picks"
    __table_args__ = (
        sa.UniqueConstraint("user_id", "idempotency_key", name="uq_chat_picks_user_idempotency"),
        sa.Index("uq_chat_picks_active_turn", "turn_id", unique=True,
                 sqlite_where=sa.text("undone_at IS NULL"), postgresql_where=sa.text("undone_at IS NULL")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    turn_id: Mapped[int] = mapped_column(sa.ForeignKey("chat_turns.id", ondelete="CASCADE"))
    draft_id: Mapped[int] = mapped_column(sa.ForeignKey("chat_drafts.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(sa.ForeignKey("users.id", ondelete="CASCADE"))
    thumb: Mapped[bool | None] = mapped_column(default=None)
    """Up (True) or down (False) on the picked draft, or not given."""
    time_spent_ms: Mapped[int | None] = mapped_column(default=None)
    idempotency_key: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    undone_at: Mapped[dt.datetime | None] = mapped_column(default=None)


# ---------------------------------------------------------------------------------------------------------
# Engine and sessions


def normalise_url(url: str) -> URL:
    """`postgresql://` and `postgres://` mean psycopg 3 (the driver the `app` extra installs)."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1) if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str) -> Engine:
    """An engine with the durability settings of this module's docstring."""
    parsed = normalise_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("the feedback app needs a SQLite file (sqlite:///path.db), not an in-memory database")
        engine = sa.create_engine(parsed, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    elif parsed.get_backend_name() == "postgresql":
        engine = sa.create_engine(parsed, pool_pre_ping=True,
                                  connect_args={"options": "-c synchronous_commit=on -c jit=off"})
    else:
        raise ValueError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite or postgresql")
    event.listen(engine, "before_cursor_execute", _refuse_nul_text)
    return engine


class UnstorableText(ValueError):
    """A text value with a NUL character: PostgreSQL cannot store one, so neither database is given one (400)."""


def _refuse_nul_text(_conn: Any, _cursor: Any, _statement: str, parameters: Any, _context: Any, executemany: bool) -> None:
    """One rule for every write path (forms, API, CLI), checked where the values meet the database."""
    rows = parameters if executemany and isinstance(parameters, (list, tuple)) else [parameters]
    for row in rows:
        values = row.values() if isinstance(row, dict) else row if isinstance(row, (list, tuple)) else [row]
        if any(isinstance(value, str) and "\x00" in value for value in values):
            raise UnstorableText("text must not contain a NUL character (\\x00)")


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Hand transaction control to _sqlite_begin: pysqlite's own would issue a deferred BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "busy_timeout=30000", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("alignloop_write") else "BEGIN")


class Database:
    """The engine and two ways in: `read()` and `write()` transactions (write commits on success)."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self.engine.execution_options(alignloop_write=True), expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only transaction (closed, never committed, at the end; loaded objects stay readable)."""
        with self._reader() as session:
            yield session

    @contextmanager
    def snapshot(self) -> Iterator[Session]:
        """A read-only transaction that sees one committed state from its first query to its end, for
        reading many tables while others write (dumps): REPEATABLE READ on PostgreSQL, where `read()` is
        READ COMMITTED; a SQLite read transaction in WAL mode already sees one state."""
        if self.dialect != "postgresql":
            with self.read() as session:
                yield session
            return
        with Session(self.engine.execution_options(isolation_level="REPEATABLE READ"), expire_on_commit=False) as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """A write transaction, `BEGIN IMMEDIATE` on SQLite, committed before the block's caller goes on:
        a handler that returns after this block acknowledges only committed data."""
        with self._writer() as session, session.begin():
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
