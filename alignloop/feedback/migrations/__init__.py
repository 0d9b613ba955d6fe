"""Alembic migrations of the feedback database, run from code (no alembic.ini): `upgrade(engine)` brings
an empty or older database to the newest schema, `downgrade(engine, "base")` removes every table.

Shipped inside the package (each folder has an `__init__.py` so that wheels carry the revision files).
Write a new revision by hand as `versions/NNNN_<what>.py` with `down_revision` the previous one; the
test suite upgrades and downgrades every revision on SQLite and PostgreSQL and compares head with
the models in `db.py`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Engine

HERE = Path(__file__).resolve().parent


def alembic_config(engine: Engine) -> Config:
    """A Config pointing at this folder and handing `engine` to env.py (no URL round trip)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["engine"] = engine
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to `revision` (in one transaction per revision)."""
    command.upgrade(alembic_config(engine), revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    """Undo migrations down to `revision` ("base": no tables left but alembic's own)."""
    command.downgrade(alembic_config(engine), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, None for an empty database."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
