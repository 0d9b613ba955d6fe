"""Backups of the whole feedback database while it serves, and the integrity checks they and the crash
tests (RELIABILITY.md W11, W14) run.

SQLite: the sqlite3 online backup API copies every page in one step from a read transaction, so the copy
is one committed state even while annotators write (WAL readers do not block writers); the copy is switched
to a rollback journal (one self-contained file), checked, fsynced and only then renamed to its name.
PostgreSQL: `pg_dump --format=custom` (one REPEATABLE READ snapshot; restore with `pg_restore`), checked by
`pg_restore --list`. Either way the backup is written whole or not at all.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from alignloop.feedback.db import Assignment, Base, Database, Label, normalise_url
from alignloop.files import fsync_dir


class BackupError(RuntimeError):
    """The backup could not be made or failed its check; nothing was left at the output path."""


def integrity_problems(engine: sa.Engine) -> list[str]:
    """Everything wrong with a feedback database, [] when sound: SQLite's own `integrity_check` and
    `foreign_key_check`, then on any database rows whose foreign key points at nothing and assignments
    whose status disagrees with their labels (done or skipped = exactly one active answer or skip)."""
    problems: list[str] = []
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            problems += [f"integrity_check: {r}" for (r,) in conn.exec_driver_sql("PRAGMA integrity_check") if r != "ok"]
            problems += [f"foreign_key_check: {tuple(r)}" for r in conn.exec_driver_sql("PRAGMA foreign_key_check")]
        for table in Base.metadata.sorted_tables:
            for fk in table.foreign_key_constraints:
                child, parent = list(fk.columns), fk.referred_table
                joined = sa.and_(*(e.column == e.parent for e in fk.elements))
                orphans = conn.execute(sa.select(sa.func.count()).select_from(table).where(
                    sa.and_(*(c.is_not(None) for c in child)), ~sa.exists().where(joined))).scalar_one()
                if orphans:
                    problems.append(f"{orphans} rows of {table.name} point at no {parent.name}")
        active = Label.undone_at.is_(None)
        answered = (sa.select(sa.func.count()).where(Label.assignment_id == Assignment.id, active,
                                                     Label.skip_reason.is_(None)).scalar_subquery())
        skipped = (sa.select(sa.func.count()).where(Label.assignment_id == Assignment.id, active,
                                                    Label.skip_reason.is_not(None)).scalar_subquery())
        wrong = conn.execute(sa.select(sa.func.count()).select_from(Assignment).where(sa.or_(
            (answered != sa.case((Assignment.status == "done", 1), else_=0)),
            (skipped != sa.case((Assignment.status == "skipped", 1), else_=0))))).scalar_one()
        if wrong:
            problems.append(f"{wrong} assignments whose status disagrees with their labels")
    return problems


def row_counts(engine: sa.Engine) -> dict[str, int]:
    """Rows per table of the feedback schema."""
    with engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in Base.metadata.sorted_tables}


def backup(database: Database, out: Path) -> dict[str, Any]:
    """Write a consistent, checked copy of the database to `out` (which must not exist); returns what
    was written: the path, its size and, for SQLite, the rows per table of the copy."""
    if out.exists():
        raise BackupError(f"{out} exists; give a new path")
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        counts = _sqlite_backup(database, tmp) if database.dialect == "sqlite" else _pg_dump(database, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(out.parent)
    return {"out": str(out), "database": database.dialect, "bytes": out.stat().st_size,
            **({"rows": counts} if counts else {})}


def _sqlite_backup(database: Database, tmp: Path) -> dict[str, int]:
    raw = database.engine.raw_connection()
    try:
        target = sqlite3.connect(tmp)
        try:
            raw.driver_connection.backup(target)  # type: ignore[union-attr]
            target.execute("PRAGMA journal_mode=DELETE")
        finally:
            target.close()
    finally:
        raw.close()
    engine = sa.create_engine(f"sqlite:///{tmp}")
    try:
        problems = integrity_problems(engine)
        if problems:
            raise BackupError(f"the copy failed its check: {problems}")
        return row_counts(engine)
    finally:
        engine.dispose()


def libpq(url: str | sa.URL) -> tuple[str, dict[str, str]]:
    """A PostgreSQL URL as libpq clients (pg_dump, pg_restore, psql) read it, and the environment to run them
    with: the password goes in PGPASSWORD, out of the command line that `ps` shows."""
    parsed = normalise_url(url if isinstance(url, str) else url.render_as_string(hide_password=False))
    env = {**os.environ, **({"PGPASSWORD": parsed.password} if parsed.password else {})}
    return parsed.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def _pg_tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise BackupError(f"{name} is not installed (Debian: apt-get install postgresql-client)")
    return found


def _pg_dump(database: Database, tmp: Path) -> dict[str, int]:
    dsn, env = libpq(database.engine.url)
    done = subprocess.run([_pg_tool("pg_dump"), "--format=custom", "--no-owner", f"--file={tmp}", f"--dbname={dsn}"],
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"pg_dump failed: {done.stderr.strip()}")
    listed = subprocess.run([_pg_tool("pg_restore"), "--list", str(tmp)], capture_output=True, text=True, check=False)
    if listed.returncode != 0 or "TABLE DATA public labels" not in listed.stdout:
        raise BackupError(f"pg_restore cannot read the dump: {listed.stderr.strip()}")
    return {}
