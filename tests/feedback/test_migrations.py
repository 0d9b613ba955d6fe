"""Migrations shipped in the package upgrade an empty database to the models of db.py and downgrade it
back to empty, on SQLite and PostgreSQL; 0002 keeps the data of 0001 both ways and refuses to drop task
answers; 0003 (chat) keeps every row both ways and refuses to drop chat projects; the SQLite engine gets its
durability pragmas."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from feedback_helpers import skip_or_fail

from alignloop.feedback import migrations
from alignloop.feedback.db import Base, Database, make_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    factory = request.getfixturevalue("pg_databases")
    if isinstance(factory, str):
        skip_or_fail(factory)
    return str(factory("migrations"))


def _tables(engine: sa.Engine) -> set[str]:
    return set(sa.inspect(engine).get_table_names())


def test_upgrade_matches_models_and_downgrade_empties(empty_url: str) -> None:
    engine = make_engine(empty_url)
    try:
        assert migrations.current_revision(engine) is None and _tables(engine) == set()
        migrations.upgrade(engine)
        assert migrations.current_revision(engine) == "0005"
        assert _tables(engine) == set(Base.metadata.tables) | {"alembic_version"}
        with engine.connect() as conn:
            diff: list[Any] = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"migrations and models differ: {diff}"
        migrations.downgrade(engine, "base")
        assert migrations.current_revision(engine) is None
        assert _tables(engine) == {"alembic_version"}
        migrations.upgrade(engine)  # and up again from there
        assert migrations.current_revision(engine) == "0005"
    finally:
        engine.dispose()


def test_sqlite_pragmas_and_immediate_writes(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'p.db'}")
    statements: list[str] = []
    sa.event.listen(database.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *args: statements.append(statement))
    try:
        with database.read() as db:
            pragmas = {p: db.execute(sa.text(f"PRAGMA {p}")).scalar() for p in
                       ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")}
        assert pragmas == {"journal_mode": "wal", "synchronous": 2, "busy_timeout": 30000, "foreign_keys": 1}
        with database.write() as db:
            db.execute(sa.text("CREATE TABLE t (x INTEGER)"))
        assert "BEGIN IMMEDIATE" in statements and statements.count("BEGIN") == 1  # the read was deferred
    finally:
        database.dispose()


def test_in_memory_sqlite_and_other_databases_are_refused() -> None:
    with pytest.raises(ValueError, match="SQLite file"):
        make_engine("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        make_engine("mysql://u@h/db")


def _seed_0001(engine: sa.Engine) -> None:
    """A user, a pairwise project with one item, an assignment and a vote, written at revision 0001."""
    now = "2026-01-01 00:00:00"
    statements = [
        f"INSERT INTO users (id, username, password_hash, role, active, created_at) VALUES (1, 'ann', 'x', 'annotator', true, '{now}')",
        f"INSERT INTO projects (id, name, guidelines, overlap_k, task, created_at) VALUES (1, 'p', '', 1, 'pairwise', '{now}')",
        f"INSERT INTO items (id, project_id, external_id, prompt, meta, created_at) VALUES (1, 1, 'i0', '[]', '{{}}', '{now}')",
        "INSERT INTO responses (id, item_id, position, text, model_name, model_version) VALUES (1, 1, 0, 'a', 'm', ''), (2, 1, 1, 'b', 'm', '')",
        f"INSERT INTO assignments (id, project_id, item_id, user_id, presented_order, status, created_at, updated_at) "
        f"VALUES (1, 1, 1, 1, '[1, 0]', 'done', '{now}', '{now}')",
        f"INSERT INTO labels (id, assignment_id, project_id, item_id, user_id, choice, strength, presented_order, "
        f"idempotency_key, created_at) VALUES (1, 1, 1, 1, 1, 'a', 'better', '[1, 0]', 'k1', '{now}')",
    ]
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def _labels(engine: sa.Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text("SELECT id, choice, strength FROM labels ORDER BY id"))]


def test_0002_keeps_votes_and_refuses_to_drop_answers(empty_url: str) -> None:
    """0001 -> 0002 keeps every row; a label holds exactly one outcome; downgrading refuses while rank, rate or
    edit answers exist, and otherwise returns to 0001 with the votes intact (both directions, both databases)."""
    from alignloop.feedback.db import Label

    engine = make_engine(empty_url)
    try:
        migrations.upgrade(engine, "0001")
        _seed_0001(engine)
        migrations.upgrade(engine, "0002")
        assert migrations.current_revision(engine) == "0002" and _labels(engine) == [(1, "a", "better")]
        database = Database(empty_url)
        try:
            with database.read() as db:
                # (raw SQL for items: the model already has 0003's column)
                assert db.execute(sa.text("SELECT gold FROM items WHERE id = 1")).scalar() is None
                assert db.get(Label, 1).answer is None
            common = {"assignment_id": 1, "project_id": 1, "item_id": 1, "user_id": 1, "presented_order": [0, 1]}
            for bad in ({"choice": "a", "answer": {"ranking": [0, 1]}}, {}):  # two outcomes, or none
                with pytest.raises(sa.exc.IntegrityError), database.write() as db:
                    db.add(Label(id=2, idempotency_key="k2", undone_at=dt.datetime(2026, 1, 2), **common, **bad))
            with database.write() as db:
                db.add(Label(id=2, idempotency_key="k2", undone_at=dt.datetime(2026, 1, 2), answer={"ranking": [0, 1]},
                             **common))
            with pytest.raises(RuntimeError, match="1 rank, rate or edit answers exist"):
                migrations.downgrade(engine, "0001")
            assert migrations.current_revision(engine) == "0002" and len(_labels(engine)) == 2
            with database.write() as db:
                db.execute(sa.delete(Label).where(Label.id == 2))
        finally:
            database.dispose()
        migrations.downgrade(engine, "0001")
        assert migrations.current_revision(engine) == "0001" and _labels(engine) == [(1, "a", "better")]
        assert "gold" not in {c["name"] for c in sa.inspect(engine).get_columns("items")}
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:  # 0001's constraint is back
            conn.execute(sa.text("UPDATE labels SET choice = NULL WHERE id = 1"))
    finally:
        engine.dispose()


def _chat_rows(engine: sa.Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                for t in ("chat_endpoints", "chat_turns", "chat_drafts", "chat_picks")}


def test_0003_adds_chat_keeps_rows_and_refuses_to_drop_chat_projects(empty_url: str) -> None:
    """0002 -> 0003 keeps votes and items (items is not rebuilt: its cascade would delete them); a chat
    conversation can be stored; downgrading refuses while a chat project exists and otherwise returns to
    0002 with everything else intact (both databases)."""
    from alignloop.feedback.db import ChatDraft, ChatEndpoint, ChatPick, ChatTurn, Item

    engine = make_engine(empty_url)
    try:
        migrations.upgrade(engine, "0001")
        _seed_0001(engine)
        migrations.upgrade(engine, "0002")
        migrations.upgrade(engine, "0003")
        assert migrations.current_revision(engine) == "0003" and _labels(engine) == [(1, "a", "better")]
        database = Database(empty_url)
        try:
            with database.write() as db:
                assert db.get(Item, 1).owner_id is None
                # (raw SQL for projects: the model already has 0004's column)
                db.execute(sa.text("INSERT INTO projects (id, name, guidelines, overlap_k, task, created_at) "
                                   "VALUES (2, 'c', '', 1, 'chat', '2026-01-01')"))
                db.add(ChatEndpoint(project_id=2, base_url="http://x/v1", model="m"))
                db.add(Item(id=2, project_id=2, external_id="c0", prompt=[{"role": "user", "content": "hi"}], owner_id=1))
                db.flush()
                db.execute(sa.text("INSERT INTO assignments (id, project_id, item_id, user_id, presented_order, status, "
                                   "created_at, updated_at) VALUES (2, 2, 2, 1, '[]', 'open', '2026-01-01', '2026-01-01')"))
                db.add(ChatTurn(id=1, assignment_id=2, position=0, idempotency_key="k"))
                db.flush()
                db.add_all([ChatDraft(id=i, turn_id=1, round=0, position=i, text=f"d{i}", model_name="m",
                                      idempotency_key="k") for i in (1, 2)])
                db.flush()
                db.add(ChatPick(turn_id=1, draft_id=2, user_id=1, thumb=True, idempotency_key="p"))
            with pytest.raises(sa.exc.IntegrityError), database.write() as db:  # one active pick per turn
                db.add(ChatPick(turn_id=1, draft_id=1, user_id=1, idempotency_key="p2"))
            assert _chat_rows(engine) == {"chat_endpoints": 1, "chat_turns": 1, "chat_drafts": 2, "chat_picks": 1}
            with pytest.raises(RuntimeError, match="1 chat projects exist"):
                migrations.downgrade(engine, "0002")
            assert migrations.current_revision(engine) == "0003" and _chat_rows(engine)["chat_picks"] == 1
            with database.write() as db:
                db.execute(sa.text("DELETE FROM projects WHERE id = 2"))  # cascades to its items and conversations
            assert _chat_rows(engine) == {"chat_endpoints": 0, "chat_turns": 0, "chat_drafts": 0, "chat_picks": 0}
        finally:
            database.dispose()
        migrations.downgrade(engine, "0002")
        assert migrations.current_revision(engine) == "0002" and _labels(engine) == [(1, "a", "better")]
        assert not {"chat_endpoints", "chat_turns", "chat_drafts", "chat_picks"} & _tables(engine)
        assert "owner_id" not in {c["name"] for c in sa.inspect(engine).get_columns("items")}
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM responses")).scalar_one() == 2
    finally:
        engine.dispose()


def test_0004_versions_projects_and_keeps_rows(empty_url: str) -> None:
    """0003 -> 0004 gives existing projects version 1 and an empty audit log without touching their rows
    (projects is not rebuilt: its cascade would delete items and labels); downgrading drops both again."""
    engine = make_engine(empty_url)
    try:
        migrations.upgrade(engine, "0001")
        _seed_0001(engine)
        migrations.upgrade(engine, "0003")
        migrations.upgrade(engine, "0004")
        assert migrations.current_revision(engine) == "0004" and _labels(engine) == [(1, "a", "better")]
        with engine.begin() as conn:
            assert conn.execute(sa.text("SELECT id, version FROM projects")).all() == [(1, 1)]
            conn.execute(sa.text("INSERT INTO audit_log (created_at, user_id, username, action, object_type, object_id, "
                                 "outcome, details) VALUES ('2026-01-01', 1, 'ann', 'project.edit', 'project', 1, "
                                 "'applied', '{}')"))
        with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO audit_log (created_at, username, action, object_type, object_id, outcome, "
                                 "details) VALUES ('2026-01-01', 'ann', 'project.edit', 'project', 1, 'maybe', '{}')"))
        migrations.downgrade(engine, "0003")
        assert migrations.current_revision(engine) == "0003" and _labels(engine) == [(1, "a", "better")]
        assert "audit_log" not in _tables(engine)
        assert "version" not in {c["name"] for c in sa.inspect(engine).get_columns("projects")}
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT COUNT(*) FROM responses")).scalar_one() == 2
    finally:
        engine.dispose()
