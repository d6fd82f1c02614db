"""Drop the two junction indexes the new schema makes redundant.

idx_trace_sessions_uid (session_uid) is a prefix of idx_trace_sessions_uid_time, and
idx_trace_sessions_trace (trace_id) a prefix of the primary key's own index: keeping them costs
space and a b-tree update on every insert, and no query plan uses them (see the README's measurements).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("idx_trace_sessions_uid", table_name="trace_sessions", if_exists=True)
    op.drop_index("idx_trace_sessions_trace", table_name="trace_sessions", if_exists=True)


def downgrade() -> None:
    op.create_index("idx_trace_sessions_uid", "trace_sessions", ["session_uid"], if_not_exists=True)
    op.create_index("idx_trace_sessions_trace", "trace_sessions", ["trace_id"], if_not_exists=True)
