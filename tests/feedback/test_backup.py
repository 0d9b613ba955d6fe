"""W14: backups and project dumps taken while annotators submit. `alignloop app backup` gives a copy that
passes the integrity checks and holds at least the labels there were when it started (SQLite: the online
backup API; PostgreSQL: pg_dump, restored here with pg_restore); `alignloop app dump` -> `load` into a fresh
database of the other kind -> `dump` gives the same sha256; every task (pairwise with skips and undos,
rank, rate, edit, chat) round-trips with identical training exports; a load that cannot be done writes nothing."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from feedback_helpers import (
    FAST_HASHING,
    PASSWORD,
    SECRET,
    FakeModel,
    add_chat_project,
    add_project,
    add_task_project,
    add_user,
    answer_all,
    ctx,
    skip_or_fail,
    table_snapshot,
    task_row,
)

from alignloop.cli import main
from alignloop.feedback import archive, auth, conversations, exports, migrations, security, services
from alignloop.feedback.backup import integrity_problems, libpq, row_counts
from alignloop.feedback.db import ChatTurn, Database, Label, User, make_engine
from alignloop.feedback.settings import Settings

ANNOTATORS = 6
FreshUrl = Callable[[str], str]


@pytest.fixture
def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> FreshUrl:
    """A factory of new, migrated, empty databases of either kind."""
    def make(kind: str) -> str:
        if kind == "sqlite":
            path = tmp_path / f"fresh-{uuid.uuid4().hex[:8]}.db"
            shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
            return f"sqlite:///{path}"
        factory = request.getfixturevalue("pg_databases")
        if isinstance(factory, str):
            skip_or_fail(factory)
        url = str(factory("fresh"))
        engine = make_engine(url)
        migrations.upgrade(engine)
        engine.dispose()
        return url
    return make


@pytest.fixture
def use_database(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Point the `alignloop app` CLI at a database."""
    return lambda url: monkeypatch.setenv("ALIGNLOOP_APP_DATABASE_URL", url)


def _labels(database: Database) -> int:
    with database.read() as db:
        return int(db.execute(sa.select(sa.func.count()).select_from(Label)).scalar_one())


def _keep_labelling(app: FastAPI, pid: int, name: str, stop: threading.Event) -> int:
    """Label (every 7th a skip, every 11th undone again) until told to stop; how many answers were given."""
    with ctx(app).database.read() as db:
        uid = db.execute(sa.select(User.id).where(User.username == name)).scalar_one()
    n = 0
    while not stop.is_set():
        with ctx(app).database.write() as db:
            project = services.member_project(db, uid, pid, lock=True)
            assignment = services.next_assignment(db, project, uid, 60)
            if assignment is None:
                return n
            if n % 7 == 3:
                services.skip(db, project, uid, assignment.id, "unsure", 50, f"{name}-{n}")
            else:
                services.submit_label(db, project, uid, assignment.id, ("left", "right")[n % 2], "better", 100 + n,
                                      f"{name}-{n}")
            if n % 11 == 5:
                services.undo_last(db, project, uid)
        n += 1
    return n


class Busy:
    """ANNOTATORS threads labelling one project until the block ends; `wait_for(n)` waits for n labels."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.names = [f"ann{i}" for i in range(ANNOTATORS)]
        for name in self.names:
            add_user(app, name)
        self.pid = add_project(app, "busy", self.names, n_items=300, k=ANNOTATORS)
        self.stop = threading.Event()
        self.done: list[int] = []
        self.threads = [threading.Thread(target=lambda n=n: self.done.append(_keep_labelling(app, self.pid, n, self.stop)))
                        for n in self.names]

    def __enter__(self) -> Busy:
        for thread in self.threads:
            thread.start()
        return self

    def wait_for(self, labels: int) -> int:
        deadline = time.monotonic() + 60
        while (now := _labels(ctx(self.app).database)) < labels:
            assert time.monotonic() < deadline, f"only {now} labels after 60 s"
            time.sleep(0.02)
        return now

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        assert len(self.done) == ANNOTATORS, "an annotator thread failed"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _restore_pg(dump: Path, request: pytest.FixtureRequest) -> str:
    """pg_restore the dump into a new, empty database; its URL."""
    factory = request.getfixturevalue("pg_databases")
    url = str(factory("restored"))
    dsn, env = libpq(url)
    done = subprocess.run(["pg_restore", "--no-owner", "--exit-on-error", f"--dbname={dsn}", str(dump)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return url


def test_w14_backup_under_load(app: FastAPI, db_url: str, tmp_path: Path, use_database: Callable[[str], None],
                               request: pytest.FixtureRequest,
                               capsys: pytest.CaptureFixture[str]) -> None:
    use_database(db_url)
    out = tmp_path / "backup.db"
    database = ctx(app).database
    with Busy(app) as busy:
        at_start = busy.wait_for(30)
        began = time.monotonic()
        assert main(["app", "backup", str(out)]) == 0
        took = time.monotonic() - began
        at_end = _labels(database)
        busy.wait_for(at_end + 10)  # still labelling after the backup: it never blocked the writers
    assert main(["app", "backup", str(out)]) == 2 and "exists" in capsys.readouterr().err
    if database.dialect == "sqlite":
        assert not out.with_name(out.name + "-wal").exists()
        with sqlite3.connect(out) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        copy = make_engine(f"sqlite:///{out}")
    else:
        copy = make_engine(_restore_pg(out, request))
    try:
        assert migrations.current_revision(copy) == migrations.current_revision(database.engine)
        assert integrity_problems(copy) == []
        counts = row_counts(copy)
        assert at_start <= counts["labels"] <= at_end
        assert counts["users"] == ANNOTATORS and counts["items"] == 300
    finally:
        copy.dispose()
    assert integrity_problems(database.engine) == []
    print(f"\nW14 backup {database.dialect}: {took:.2f} s under load, {at_start} labels at its start, "
          f"{counts['labels']} in the copy, {at_end} when it returned")


def _create_users(url: str, names: list[str]) -> None:
    """Annotator accounts in another database (a load needs its users to exist)."""
    database = Database(url)
    hasher = security.password_hasher(Settings(database_url=url, secret_key=SECRET, **FAST_HASHING))
    try:
        with database.write() as db:
            for name in names:
                auth.create_user(db, hasher, name, PASSWORD, "annotator")
    finally:
        database.dispose()


def test_w14_dump_under_load_loads_elsewhere_byte_identical(app: FastAPI, db_url: str, tmp_path: Path,
                                                            use_database: Callable[[str], None],
                                                            fresh_url: FreshUrl) -> None:
    """Dumped while 6 annotators label, loaded into a fresh database of the other kind, dumped again: same
    sha256; the loaded project passes the integrity checks and holds exactly the dumped labels."""
    use_database(db_url)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    with Busy(app) as busy:
        busy.wait_for(60)
        assert main(["app", "dump", "busy", "--out", str(first)]) == 0
        busy.wait_for(_labels(ctx(app).database) + 10)
    other = fresh_url("postgresql" if ctx(app).database.dialect == "sqlite" else "sqlite")
    _create_users(other, busy.names)
    use_database(other)
    assert main(["app", "load", str(first)]) == 0
    assert main(["app", "dump", "busy", "--out", str(second)]) == 0
    assert _sha256(first) == _sha256(second)
    dumped = first.read_text().splitlines()
    engine = make_engine(other)
    try:
        assert integrity_problems(engine) == []
        assert row_counts(engine)["labels"] == sum(line.startswith('{"label"') for line in dumped) >= 60
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------------
# Every task round-trips, with identical training exports


def _chat(app: FastAPI, pid: int, name: str, model: FakeModel) -> None:
    """A two-turn conversation on an imported prompt (regenerated once, picked, thumbed, finished) and one
    started by typing, left open after its first pick."""
    database = ctx(app).database
    with database.read() as db:
        uid = db.execute(sa.select(User.id).where(User.username == name)).scalar_one()
    with database.write() as db:
        assignment = services.next_assignment(db, services.member_project(db, uid, pid, lock=True), uid, 60)
        assert assignment is not None
    talk = lambda aid, message, key, **kw: conversations.converse(  # noqa: E731
        database, pid, uid, aid, message, f"{name}-{key}", transport=model.transport, **kw)

    def pick(aid: int, key: str, thumb: bool | None) -> None:
        with database.write() as db:
            project = services.member_project(db, uid, pid)
            turn = db.execute(sa.select(ChatTurn).where(ChatTurn.assignment_id == aid, ChatTurn.undone_at.is_(None))
                              .order_by(ChatTurn.position.desc()).limit(1)).scalar_one()
            conversations.pick(db, project, uid, aid, turn.drafts[-1].id, 500, f"{name}-{key}")
            if thumb is not None:
                conversations.thumb(db, project, uid, aid, thumb)

    talk(assignment.id, None, "t0")
    talk(assignment.id, None, "t0r", regenerate=True)
    pick(assignment.id, "p0", True)
    talk(assignment.id, "And Germany?", "t1")
    pick(assignment.id, "p1", False)
    with database.write() as db:
        conversations.finish(db, services.member_project(db, uid, pid), uid, assignment.id, 100, f"{name}-f")
    typed = talk(None, "Tell me a joke.", "s0")
    pick(typed, "sp0", None)


def _projects(app: FastAPI) -> dict[str, int]:
    names = ["a1", "a2"]
    for name in names:
        add_user(app, name)
    pair = add_project(app, "pairs", names, n_items=6, k=2)
    for name in names:
        answer_all(app, pair, name, lambda item, order: None if item.endswith("-4") else ("a", "much better"))
    with ctx(app).database.write() as db:
        a1 = db.execute(sa.select(User.id).where(User.username == "a1")).scalar_one()
        services.undo_last(db, services.project_by_name(db, "pairs"), a1)
    ids = {"pairs": pair}
    forms = {"rank": lambda item, order: {"ranking": "3,1,2"},
             "rate": lambda item, order: {"helpful": 4, "honest": 5, "harmless": 3, "flags": ["off_topic"]},
             "edit": lambda item, order: {"edited": f"Better: {item}" if item.endswith("1") else f"{item} answer 0"}}
    for task, decide in forms.items():
        n = 3 if task == "rank" else 1
        ids[task] = add_task_project(app, task, task, names, [task_row(f"{task}-{i}", n) for i in range(3)], k=2)
        for name in names:
            answer_all(app, ids[task], name, decide)
    ids["chat"] = add_chat_project(app, "chat", names, [{"id": "c0", "prompt": "What is the capital of France?"}])
    _chat(app, ids["chat"], "a1", FakeModel())
    return ids


def _exports(database: Database, name: str) -> dict[str, Any]:
    with database.read() as db:
        project = services.project_by_name(db, name)
        return {kind: exports.export(db, project, kind) for kind in exports.EXPORT_KINDS[project.task]}


def test_w14_every_task_round_trips(app: FastAPI, fresh_url: FreshUrl) -> None:
    ids = _projects(app)
    database = ctx(app).database
    target_url = fresh_url(database.dialect)
    _create_users(target_url, ["a1", "a2"])
    target = Database(target_url)
    try:
        for name in ids:
            text = archive.dump(database, name)
            result = archive.load(target, text, name)
            assert archive.dump(target, name) == text, name
            assert _exports(target, name) == _exports(database, name), name
            with database.read() as db:
                n_labels = db.execute(sa.select(sa.func.count()).select_from(Label)
                                      .where(Label.project_id == ids[name])).scalar_one()
            assert result["labels"] == n_labels > 0, name
        assert result["turns"] == 3 and result["picks"] == 3  # (chat: 2 + 1 turns, each picked)
        chat_head = archive.dump(target, "chat").splitlines()[0]
        assert '"base_url": "http://8.8.8.8/v1"' in chat_head and "api_key" not in chat_head
        assert integrity_problems(target.engine) == []
        pairs = archive.dump(database, "pairs")
        assert pairs.count('"skip_reason": "cannot judge"') == 2 and pairs.count('"undone_at": "') == 1
    finally:
        target.dispose()


def test_w14_refused_loads_write_nothing(app: FastAPI, tmp_path: Path, fresh_url: FreshUrl,
                                         use_database: Callable[[str], None], capsys: pytest.CaptureFixture[str]) -> None:
    _projects(app)
    dump = tmp_path / "pairs.jsonl"
    dump.write_text(archive.dump(ctx(app).database, "pairs"))
    url = fresh_url(ctx(app).database.dialect)
    use_database(url)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text('{"hello": 1}\n')
    truncated = tmp_path / "truncated.jsonl"
    truncated.write_text("".join(line for line in dump.read_text().splitlines(keepends=True) if not line.startswith('{"item"')))
    assert main(["app", "load", str(dump)]) == 2  # no users a1, a2 there
    assert "the dump names users this database lacks: a1, a2" in capsys.readouterr().err
    _create_users(url, ["a1", "a2"])
    target = Database(url)
    try:
        before = table_snapshot(target)
        assert main(["app", "load", str(garbage)]) == 2 and "not a project dump" in capsys.readouterr().err
        assert main(["app", "load", str(truncated)]) == 2 and "a malformed dump (KeyError" in capsys.readouterr().err
        broken = tmp_path / "broken.jsonl"
        broken.write_text(dump.read_text().replace("\n", "\nnot json\n", 1))
        assert main(["app", "load", str(broken)]) == 2 and f"{broken}:2: not JSON" in capsys.readouterr().err
        broken.write_text(dump.read_text().replace("\n", "\n[1, 2]\n", 1))
        assert main(["app", "load", str(broken)]) == 2 and f"{broken}:2: a dump line is a JSON object" in capsys.readouterr().err
        assert table_snapshot(target) == before
        assert main(["app", "load", str(dump)]) == 0
        loaded = table_snapshot(target)
        assert main(["app", "load", str(dump)]) == 2 and "project 'pairs' already exists" in capsys.readouterr().err
        with target.write() as db:
            services.project_by_name(db, "pairs").name = "renamed"
        renamed = table_snapshot(target)
        assert main(["app", "load", str(dump)]) == 2 and "already stored here" in capsys.readouterr().err
        assert table_snapshot(target) == renamed and len(loaded["labels"]) == len(renamed["labels"])
    finally:
        target.dispose()


def test_integrity_check_finds_orphans_and_half_written_answers(app: FastAPI) -> None:
    """The checker the backups and W11 rely on does report what they must never contain."""
    add_user(app, "ann")
    pid = add_project(app, "p", ["ann"], n_items=2)
    answer_all(app, pid, "ann", lambda item, order: ("a", "better"))
    engine = ctx(app).database.engine
    assert integrity_problems(engine) == []
    with engine.begin() as conn:  # an answer without its label: what a torn write would leave
        conn.execute(sa.text("UPDATE labels SET undone_at = created_at WHERE id = 1"))
    assert integrity_problems(engine) == ["1 assignments whose status disagrees with their labels"]
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE labels SET undone_at = NULL WHERE id = 1"))
    if engine.dialect.name == "sqlite":  # rows left behind by a delete with foreign keys off
        raw = engine.raw_connection()
        try:
            sqlite = raw.driver_connection
            assert sqlite is not None
            sqlite.execute("PRAGMA foreign_keys = OFF")  # (outside a transaction: inside, it is a no-op)
            sqlite.execute("DELETE FROM items WHERE id = 2")
            sqlite.execute("PRAGMA foreign_keys = ON")
        finally:
            raw.close()
        problems = integrity_problems(engine)
        assert "1 rows of labels point at no items" in problems and "2 rows of responses point at no items" in problems
        assert any(p.startswith("foreign_key_check: ('labels'") for p in problems)
