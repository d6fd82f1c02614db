"""Add trace_sessions.created_at, the denormalized copy of the trace's creation time.

ALTER TABLE ADD COLUMN is a constant-time schema change in SQLite (no rows are rewritten), and the
column is nullable: adding NOT NULL would need a full table rebuild. The backfill is the next revision.

Two triggers keep the copy right whoever writes, from this revision on (not only after the backfill):
- a trace's created_at changes (the store re-storing it, or the previous release updating it):
  its links follow;
- a link is inserted without created_at (the previous release during a rolling deploy): it is
  stamped with its trace's. The store always inserts links with created_at, so for it the
  trigger's WHEN clause is false and its body never runs.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from tracestore.models import EpochSeconds
from tracestore.schema import column_names, index_names

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


FOLLOW_TRIGGER = "trace_sessions_follow_created_at"
STAMP_TRIGGER = "trace_sessions_stamp_created_at"


def upgrade() -> None:
    # A database that ran the spec's hand-written migration may already have the column.
    if "created_at" not in column_names(op.get_bind(), "trace_sessions"):
        op.add_column("trace_sessions", sa.Column("created_at", EpochSeconds, nullable=True))
    op.execute(
        f"CREATE TRIGGER IF NOT EXISTS {FOLLOW_TRIGGER} AFTER UPDATE OF created_at ON traces"
        " WHEN NEW.created_at IS NOT OLD.created_at"
        " BEGIN UPDATE trace_sessions SET created_at = NEW.created_at WHERE trace_id = NEW.id; END"
    )
    op.execute(
        f"CREATE TRIGGER IF NOT EXISTS {STAMP_TRIGGER} AFTER INSERT ON trace_sessions"
        " WHEN NEW.created_at IS NULL"
        " BEGIN UPDATE trace_sessions SET created_at ="
        " (SELECT created_at FROM traces WHERE traces.id = NEW.trace_id) WHERE rowid = NEW.rowid; END"
    )


def downgrade() -> None:
    op.execute(f"DROP TRIGGER IF EXISTS {STAMP_TRIGGER}")
    op.execute(f"DROP TRIGGER IF EXISTS {FOLLOW_TRIGGER}")
    # SQLite >= 3.35 drops a column in place (no batch-mode copy of the table). It refuses while an
    # index names the column, hence the check: 0004's downgrade normally removed it already.
    if "idx_trace_sessions_uid_time" in index_names(op.get_bind(), "trace_sessions"):
        op.drop_index("idx_trace_sessions_uid_time", table_name="trace_sessions")
    op.drop_column("trace_sessions", "created_at")
