"""Add trace_sessions.created_at and the triggers that keep it right (PostgreSQL: and the empty session index).

The "expand" step of an online migration; the backfill (0003) then fills the copy a batch at a time
and 0004 retires the legacy session index. Three short write transactions with the lock left free
between them (tracestore.online), so a writer waits for one step at a time, never for their sum; each
step is written to be run again, so a run killed between them is finished by the next `upgrade`.

1. ALTER TABLE ADD COLUMN (constant time in SQLite: no row is rewritten; nullable, since NOT NULL
   would need a full table rebuild) and the triggers (schema.COPY_TRIGGERS) that keep every copy
   equal to its trace's from this commit on, whoever writes: instances of the previous release keep
   inserting links without created_at and may update traces during a rolling deploy.
2. PostgreSQL: drop idx_trace_sessions_trace (the primary key's index starts with trace_id and serves
   the same lookups) and create idx_trace_sessions_uid_time, partial (WHERE created_at IS NOT NULL),
   empty, for the backfill's batches to fill. idx_trace_sessions_uid stays until 0004: readers of the
   previous release need it.
   SQLite: neither. The backfill fills the column with no session index to update, then builds the
   index in its own key order and attaches it whole (tracestore.migrate.index_build): filled a batch
   at a time in rowid order, nearly every entry lands on a different leaf and the upgrade writes
   about twice the index's pages per link. idx_trace_sessions_trace goes in 0004, so the pages the
   build writes are appended at the end of the file, in order, rather than scattered over the pages
   the drop would free.

On PostgreSQL, step 1 waits for its table locks at most online.LOCK_TIMEOUT_MS per try (queued
behind a long transaction, it would stall every query of the table), takes them in the order the
application does (traces, then trace_sessions) so that it cannot deadlock with a writer or a cascading
delete, and is tried again if it is chosen as a deadlock victim all the same. Steps 2 and 3 are
DROP/CREATE INDEX CONCURRENTLY outside any transaction, so neither holds a lock that stops writers.
A build interrupted last time (an INVALID index) is dropped and built again, and the new index is
checked valid before the revision is recorded.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from alembic import context, op

from tracestore.migrate.backfill import ORPHANS_TABLE, PROGRESS_TABLE
from tracestore.migrate.index_build import DROP_BUILD
from tracestore.migrate.online import ddl_step
from tracestore.migrate.schema import (
    column_names,
    create_copy_triggers,
    create_session_index_concurrently,
    drop_copy_triggers,
    drop_index_concurrently,
    drop_session_index,
)
from tracestore.models import SESSION_TIME_INDEX, EpochSeconds

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("tracestore.migrate")


def _add_column_and_triggers() -> None:
    # A database that ran the spec's hand-written migration may already have the column.
    if "created_at" not in column_names(op.get_bind(), "trace_sessions"):
        op.add_column("trace_sessions", sa.Column("created_at", EpochSeconds, nullable=True))
    for statement in create_copy_triggers(dialect=op.get_bind().dialect.name):
        op.execute(statement)


def upgrade() -> None:
    connection = op.get_bind()
    postgresql = connection.dialect.name == "postgresql"
    timings: dict[str, float] = {}
    with op.get_context().autocommit_block():
        started = time.monotonic()
        ddl_step(
            connection,
            _add_column_and_triggers,
            what="add trace_sessions.created_at and its triggers",
            locks=(("traces", "SHARE ROW EXCLUSIVE"), ("trace_sessions", "ACCESS EXCLUSIVE")),
        )
        timings["add_column_seconds"] = time.monotonic() - started

        if postgresql:  # no table lock held while running queries finish: CONCURRENTLY, outside a transaction
            started = time.monotonic()
            drop_index_concurrently(connection, "idx_trace_sessions_trace")
            timings["drop_trace_index_seconds"] = time.monotonic() - started
            started = time.monotonic()
            if create_session_index_concurrently(connection):
                log.warning("index %s was INVALID (an interrupted concurrent build): rebuilt", SESSION_TIME_INDEX)
            timings["index_seconds"] = time.monotonic() - started
    context.config.attributes.setdefault("reports", {}).setdefault("index", {}).update(timings)
    log.info("column and triggers added in %.1fs", timings["add_column_seconds"])
    if postgresql:
        log.info(
            "idx_trace_sessions_trace dropped in %.1fs, index %s created in %.1fs (empty: the backfill fills it)",
            timings["drop_trace_index_seconds"],
            SESSION_TIME_INDEX,
            timings["index_seconds"],
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for drop in DROP_BUILD:  # an interrupted 0003's build table: its triggers name the column
            op.execute(drop)
    # An interrupted 0003's saved position describes copies this downgrade drops: kept, it would make the
    # next upgrade's backfill skip every row it had reached and leave their created_at NULL.
    for table in (PROGRESS_TABLE, ORPHANS_TABLE):
        op.execute(f"DROP TABLE IF EXISTS {table}")
    op.execute(drop_session_index())
    op.create_index("idx_trace_sessions_trace", "trace_sessions", ["trace_id"], if_not_exists=True)
    for statement in drop_copy_triggers(dialect=op.get_bind().dialect.name):
        op.execute(statement)
    # SQLite >= 3.35 drops a column in place (no batch-mode copy of the table), rewriting each row
    # once in this transaction: it cannot be split into batches.
    op.drop_column("trace_sessions", "created_at")
