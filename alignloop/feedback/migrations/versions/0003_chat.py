"""The chat task: a project's model endpoint, conversations (turns hanging off assignments), the drafts of
each turn and the annotator's picks with their thumbs; `items.owner_id` marks a conversation an annotator
started by typing (never handed out).

Only new tables are created, and one nullable column is added to items with a plain ALTER TABLE (no
foreign key: adding one on SQLite would rebuild items, and the rebuild's DROP would cascade to every
assignment and label). Downgrading refuses while a chat project exists: revision 0002 knows no chat task,
and acknowledged picks are never thrown away (export them, then delete those projects first).

Revision ID: 0003
Revises: 0002
Create Date: 2026-03-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

ACTIVE = sa.text("undone_at IS NULL")


def upgrade() -> None:
    op.add_column('items', sa.Column('owner_id', sa.Integer(), nullable=True))
    op.create_table('chat_endpoints',
    sa.Column('project_id', sa.Integer(), nullable=False),
    sa.Column('base_url', sa.String(length=2000), nullable=False),
    sa.Column('model', sa.String(length=200), nullable=False),
    sa.Column('api_key', sa.Text(), nullable=True),
    sa.Column('n_drafts', sa.Integer(), nullable=False),
    sa.Column('temperature', sa.Double(), nullable=True),
    sa.Column('top_p', sa.Double(), nullable=True),
    sa.Column('max_tokens', sa.Integer(), nullable=True),
    sa.Column('timeout_s', sa.Double(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.CheckConstraint('n_drafts >= 1 AND n_drafts <= 9', name='ck_chat_endpoints_n_drafts'),
    sa.ForeignKeyConstraint(['project_id'], ['projects.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('project_id')
    )
    op.create_table('chat_turns',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('assignment_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('user_message', sa.Text(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('undone_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['assignment_id'], ['assignments.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('assignment_id', 'idempotency_key', name='uq_chat_turns_assignment_idempotency')
    )
    op.create_index('uq_chat_turns_active_position', 'chat_turns', ['assignment_id', 'position'], unique=True,
                    sqlite_where=ACTIVE, postgresql_where=ACTIVE)
    op.create_table('chat_drafts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('turn_id', sa.Integer(), nullable=False),
    sa.Column('round', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('model_name', sa.String(length=200), nullable=False),
    sa.Column('model_version', sa.String(length=200), nullable=True),
    sa.Column('finish_reason', sa.String(length=32), nullable=True),
    sa.Column('idempotency_key', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['turn_id'], ['chat_turns.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('turn_id', 'round', 'position', name='uq_chat_drafts_turn_round_position')
    )
    op.create_index(op.f('ix_chat_drafts_turn_id'), 'chat_drafts', ['turn_id'], unique=False)
    op.create_table('chat_picks',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('turn_id', sa.Integer(), nullable=False),
    sa.Column('draft_id', sa.Integer(), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('thumb', sa.Boolean(), nullable=True),
    sa.Column('time_spent_ms', sa.Integer(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('undone_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['draft_id'], ['chat_drafts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['turn_id'], ['chat_turns.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('user_id', 'idempotency_key', name='uq_chat_picks_user_idempotency')
    )
    op.create_index('uq_chat_picks_active_turn', 'chat_picks', ['turn_id'], unique=True,
                    sqlite_where=ACTIVE, postgresql_where=ACTIVE)


def downgrade() -> None:
    projects = op.get_bind().execute(sa.text("SELECT COUNT(*) FROM projects WHERE task = 'chat'")).scalar_one()
    if projects:
        raise RuntimeError(f"{projects} chat projects exist and revision 0002 cannot hold them: export their "
                           "labels (alignloop app export) and delete those projects first")
    op.drop_index('uq_chat_picks_active_turn', table_name='chat_picks')
    op.drop_table('chat_picks')
    op.drop_index(op.f('ix_chat_drafts_turn_id'), table_name='chat_drafts')
    op.drop_table('chat_drafts')
    op.drop_index('uq_chat_turns_active_position', table_name='chat_turns')
    op.drop_table('chat_turns')
    op.drop_table('chat_endpoints')
    op.drop_column('items', 'owner_id')  # native ALTER TABLE ... DROP COLUMN: rebuilding items would cascade
