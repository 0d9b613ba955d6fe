"""Alembic environment: the engine comes from `alignloop.feedback.migrations.alembic_config`."""

from __future__ import annotations

from alembic import context

from alignloop.feedback.db import Base

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, transaction_per_migration=True,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
