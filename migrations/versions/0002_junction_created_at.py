"""Add trace_sessions.created_at, the triggers that keep it right, and the (empty) session index.

One short transaction, the "expand" step of an online migration; the backfill (0003) then fills the
copy a batch at a time and 0004 retires the legacy session index.

- ALTER TABLE ADD COLUMN is a constant-time schema change in SQLite (no row is rewritten). The column
  is nullable: NOT NULL would need a full table rebuild.
- The triggers (schema.COPY_TRIGGERS) keep every copy equal to its trace's from this commit on,
  whoever writes: instances of the previous release keep inserting links without created_at and may
  update traces during a rolling deploy.
- idx_trace_sessions_uid_time is partial (WHERE created_at IS NOT NULL). Created now, while every
  copy is NULL, it costs one scan of the junction table and no sort; each backfill batch then adds
  its own rows to it. A full CREATE INDEX after the backfill held the write lock for the whole sort
  (2.7 s at 1M traces, about ten times that at 10M), stalling every writer.
- idx_trace_sessions_trace (trace_id) is dropped here: the primary key's index starts with trace_id
  and serves the same lookups, and the pages it frees are reused by the backfill instead of growing
  the file. idx_trace_sessions_uid stays until 0004: readers of the previous release need it.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from alembic import context, op

from tracestore.models import SESSION_TIME_INDEX, EpochSeconds
from tracestore.schema import (
    column_names,
    create_copy_triggers,
    create_session_index,
    drop_copy_triggers,
    drop_session_index,
)

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("tracestore.migrate")


def upgrade() -> None:
    started = time.monotonic()
    # A database that ran the spec's hand-written migration may already have the column.
    if "created_at" not in column_names(op.get_bind(), "trace_sessions"):
        op.add_column("trace_sessions", sa.Column("created_at", EpochSeconds, nullable=True))
    for statement in create_copy_triggers():
        op.execute(statement)
    op.drop_index("idx_trace_sessions_trace", table_name="trace_sessions", if_exists=True)
    indexed = time.monotonic()
    op.execute(create_session_index())
    done = time.monotonic()
    context.config.attributes.setdefault("reports", {}).setdefault("index", {}).update(
        {"add_column_seconds": indexed - started, "index_seconds": done - indexed}
    )
    log.info(
        "column and triggers added in %.1fs; index %s created in %.1fs (empty: the backfill fills it)",
        indexed - started,
        SESSION_TIME_INDEX,
        done - indexed,
    )


def downgrade() -> None:
    op.execute(drop_session_index())
    op.create_index("idx_trace_sessions_trace", "trace_sessions", ["trace_id"], if_not_exists=True)
    for statement in drop_copy_triggers():
        op.execute(statement)
    # SQLite >= 3.35 drops a column in place (no batch-mode copy of the table), rewriting each row
    # once in this transaction: it cannot be split into batches.
    op.drop_column("trace_sessions", "created_at")
