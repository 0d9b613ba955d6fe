"""Editing project settings (RELIABILITY.md W13): `projects.version`, raised by every accepted edit so that an
edit made from an older version is refused (409), and `audit_log`, one row per attempted change (who, when,
what, outcome), refused ones included.

`projects.version` is added with a plain ALTER TABLE (a server default of 1 fills existing rows): rebuilding
projects on SQLite would cascade its DROP to every item and label. The audit log names its object by type and
id without a foreign key, so that it outlives what it describes. Downgrading drops both (the log with them).

Revision ID: 0004
Revises: 0003
Create Date: 2026-03-15
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('projects', sa.Column('version', sa.Integer(), server_default=sa.text('1'), nullable=False))
    op.create_table('audit_log',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=True),
    sa.Column('username', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=False),
    sa.Column('object_id', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('details', sa.JSON(), nullable=False),
    sa.CheckConstraint("outcome IN ('applied', 'conflict')", name='ck_audit_log_outcome'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_audit_log_object', 'audit_log', ['object_type', 'object_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_audit_log_object', table_name='audit_log')
    op.drop_table('audit_log')
    op.drop_column('projects', 'version')  # native ALTER TABLE ... DROP COLUMN: rebuilding projects would cascade
