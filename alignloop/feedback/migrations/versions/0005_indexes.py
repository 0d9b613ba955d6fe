"""Indexes for the pages that must answer in under 100 ms at 10,000 items and 50,000 labels
(benchmarks/feedback_pages.py): the active answers of a project by annotator and time, with every column
the quality figures read (a partial index, so undone labels and skips take no room); the active skips; and
the assignments of an item by status, which is all that counting an item's annotators reads. Indexes only:
no row changes either way.

Revision ID: 0005
Revises: 0004
Create Date: 2026-03-16
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

ACTIVE_ANSWER = sa.text("undone_at IS NULL AND skip_reason IS NULL")
ACTIVE_SKIP = sa.text("undone_at IS NULL AND skip_reason IS NOT NULL")


def upgrade() -> None:
    op.create_index('ix_assignments_item_status', 'assignments', ['item_id', 'status', 'updated_at'], unique=False)
    op.create_index('ix_labels_active_answers', 'labels',
                    ['project_id', 'user_id', 'time_spent_ms', 'displayed_choice', 'item_id', 'choice', 'undone_at',
                     'skip_reason'], unique=False, sqlite_where=ACTIVE_ANSWER, postgresql_where=ACTIVE_ANSWER)
    op.create_index('ix_labels_skips', 'labels', ['project_id', 'user_id'], unique=False,
                    sqlite_where=ACTIVE_SKIP, postgresql_where=ACTIVE_SKIP)


def downgrade() -> None:
    op.drop_index('ix_labels_skips', table_name='labels')
    op.drop_index('ix_labels_active_answers', table_name='labels')
    op.drop_index('ix_assignments_item_status', table_name='assignments')
