"""Rank, rate and edit tasks and gold items: `items.gold`, `labels.answer`, and a label holds exactly one of
a pairwise choice, a task answer or a skip reason.

On SQLite the labels table is rebuilt (batch mode) to change its CHECK constraint; nothing references
labels, so dropping the old copy cascades nowhere. Items is never rebuilt (its rows' dependants would be
deleted by the cascade): its column is added and dropped with plain ALTER TABLE (SQLite 3.35+). Downgrading refuses while rank, rate or edit answers
exist (revision 0001 cannot hold them and acknowledged labels are never thrown away); gold answers are
dropped with their column (they come from the import file).

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

ONE_OUTCOME = ("(CASE WHEN choice IS NULL THEN 0 ELSE 1 END) + (CASE WHEN answer IS NULL THEN 0 ELSE 1 END)"
               " + (CASE WHEN skip_reason IS NULL THEN 0 ELSE 1 END) = 1")
VOTE_OR_SKIP = "(choice IS NULL) <> (skip_reason IS NULL)"


def upgrade() -> None:
    op.add_column('items', sa.Column('gold', sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table('labels') as batch:
        batch.add_column(sa.Column('answer', sa.JSON(none_as_null=True), nullable=True))
        batch.drop_constraint('ck_labels_vote_or_skip', type_='check')
        batch.create_check_constraint('ck_labels_one_outcome', sa.text(ONE_OUTCOME))


def downgrade() -> None:
    answers = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM labels WHERE answer IS NOT NULL")).scalar_one()
    if answers:
        raise RuntimeError(f"{answers} rank, rate or edit answers exist and revision 0001 cannot hold them: "
                           "export them (alignloop app export) and delete those projects first")
    with op.batch_alter_table('labels') as batch:
        batch.drop_constraint('ck_labels_one_outcome', type_='check')
        batch.drop_column('answer')
        batch.create_check_constraint('ck_labels_vote_or_skip', sa.text(VOTE_OR_SKIP))
    op.drop_column('items', 'gold')  # native ALTER TABLE ... DROP COLUMN: rebuilding items would cascade
