"""What `alignloop app ...` does, as functions of the settings (the CLI parses, calls, prints).

Every command but `serve` works on the database alone (no secret needed) and migrates it to the newest
schema first, so `alignloop app user add --admin` on an empty database is the whole setup; `backup` does not
(a backup is what you take before an upgrade).
"""

from __future__ import annotations

import logging
import logging.config
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alignloop.feedback import (
    archive,
    auth,
    backup,
    conversations,
    exports,
    migrations,
    records,
    security,
    services,
)
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
    logging.config.dictConfig(log_config(settings.log_json))  # uvicorn applies it again; set now for the start-up lines
    database = open_database(settings, migrate)
    with database.write() as db:
        if sealed := conversations.seal_stored_keys(db, settings.resolved_secret()):
            logger.info("sealed %d chat model API keys stored in clear", sealed)
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


def show_model(settings: Settings, project: str) -> dict[str, Any]:
    """A chat project's model as the API shows it (never the API key, only `api_key_set`); base_url None
    when none is set."""
    with _opened(settings) as database, database.read() as db:
        row = services.project_by_name(db, project)
        services._check_task(row, "chat")
        model = conversations.endpoint(db, row)
    return {"project": project, **(model.public() if model else {"base_url": None})}


def set_model(settings: Settings, project: str, model: conversations.Endpoint, keep_key: bool) -> dict[str, Any]:
    """Set a chat project's model through the API's own service (conversations.set_endpoint: the same
    checks); keep_key leaves a stored API key as it is. Returns what show_model would."""
    secret = settings.resolved_secret() if model.api_key and not keep_key else None  # SettingsError names what is missing
    with _opened(settings) as database, database.write() as db:
        stored = conversations.set_endpoint(db, services.project_by_name(db, project), model, secret=secret,
                                            keep_key=keep_key)
    return {"project": project, **stored.public()}


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
    _write_whole(out, records.jsonl(recs))
    return {"kind": kind} | {k: v for k, v in vars(report).items() if v} | {"kept": report.kept}


def _write_whole(out: Path, text: str) -> None:
    """Write `text` to a temporary name, then rename it into place: `out` is whole or absent."""
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)


def backup_database(settings: Settings, out: Path) -> dict[str, Any]:
    """A checked copy of the whole database, taken while it serves (backup.py); the schema is left as it is."""
    with _opened(settings, migrate=False) as database:
        return backup.backup(database, out)


def dump_project(settings: Settings, project: str, out: Path) -> dict[str, Any]:
    """Write a project's dump (archive.py) to `out`; returns its size in lines and bytes."""
    with _opened(settings) as database:
        text = archive.dump(database, project)
    _write_whole(out, text)
    return {"out": str(out), "lines": text.count("\n"), "bytes": len(text.encode("utf-8"))}


def load_project(settings: Settings, path: Path) -> dict[str, Any]:
    """Recreate a dumped project in this database (archive.py), all or nothing."""
    with _opened(settings) as database:
        return archive.load(database, path.read_text(encoding="utf-8"), str(path))
