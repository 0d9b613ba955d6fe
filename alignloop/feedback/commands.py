"""What `alignloop app ...` does, as functions of the settings (the CLI parses, calls, prints).

Every command but `serve` works on the database alone (no secret needed) and migrates it to the newest
schema first, so `alignloop app user add --admin` on an empty database is the whole setup.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alignloop.feedback import auth, exports, migrations, records, security, services
from alignloop.feedback.db import Database
from alignloop.feedback.settings import Settings

logger = logging.getLogger(__name__)


def open_database(settings: Settings, migrate: bool = True) -> Database:
    """The settings' database, brought to the newest schema unless migrate=False."""
    settings.validate(require_secret=False)
    database = Database(settings.database_url)
    if migrate:
        migrations.upgrade(database.engine)
    return database


@contextmanager
def _opened(settings: Settings, migrate: bool = True) -> Iterator[Database]:
    """`open_database` for one command, disposed of afterwards whatever happens."""
    database = open_database(settings, migrate)
    try:
        yield database
    finally:
        database.dispose()


def serve(settings: Settings, host: str, port: int, migrate: bool = True) -> None:
    """Run the app with uvicorn (one process: the login throttle counts per process)."""
    import uvicorn

    from alignloop.feedback.app import create_app, log_config

    settings.validate()
    database = open_database(settings, migrate)
    app = create_app(settings, database=database)
    uvicorn.run(app, host=host, port=port, log_config=log_config(settings.log_json), server_header=False)


def migrate(settings: Settings, revision: str = "head", down: bool = False) -> str | None:
    """Upgrade (or downgrade) to `revision`; returns the revision the database is then at."""
    with _opened(settings, migrate=False) as database:
        (migrations.downgrade if down else migrations.upgrade)(database.engine, revision)
        return migrations.current_revision(database.engine)


def add_user(settings: Settings, username: str, password: str, admin: bool) -> None:
    with _opened(settings) as database, database.write() as db:
        auth.create_user(db, security.password_hasher(settings), username, password, "admin" if admin else "annotator")


def add_token(settings: Settings, username: str, name: str) -> str:
    """A new API token for an admin; only its hash is stored, so this is the one time it is seen."""
    with _opened(settings) as database, database.write() as db:
        return auth.create_api_token(db, username, name)


def add_project(settings: Settings, name: str, overlap_k: int, guidelines: str, annotators: list[str],
                task: str = "pairwise") -> int:
    with _opened(settings) as database, database.write() as db:
        project = services.create_project(db, name, guidelines, overlap_k, task)
        for username in annotators:
            services.add_member(db, project, username)
        return project.id


def add_member(settings: Settings, project: str, username: str) -> None:
    with _opened(settings) as database, database.write() as db:
        services.add_member(db, services.project_by_name(db, project), username)


def import_items(settings: Settings, project: str, path: Path) -> int:
    """Import a JSON Lines file into a project, all or nothing (DataError names line and field)."""
    with _opened(settings) as database:
        with database.read() as db:
            task = services.project_by_name(db, project).task
        items = records.parse_jsonl(path.read_bytes(), str(path), task)
        with database.write() as db:
            return services.import_items(db, services.project_by_name(db, project), items, str(path))


def export_labels(settings: Settings, project: str, kind: str | None, out: Path) -> dict[str, int | str]:
    """Write the `kind` export of a project (default: its task's consensus kind) to `out` (written whole,
    then renamed into place); returns the kind and the conversion report."""
    with _opened(settings) as database, database.read() as db:
        row = services.project_by_name(db, project)
        kind = exports.resolve_kind(row.task, kind)
        recs, report = exports.export(db, row, kind)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(records.jsonl(recs), encoding="utf-8")
    tmp.replace(out)
    return {"kind": kind} | {k: v for k, v in vars(report).items() if v} | {"kept": report.kept}
