"""Retire the legacy session index (SQLite: and idx_trace_sessions_trace, see 0002) now that
idx_trace_sessions_uid_time holds every link; ANALYZE
(PostgreSQL: VACUUM ANALYZE).

idx_trace_sessions_uid (session_uid) served the legacy query; the composite index (built empty in
0002, filled by the 0003 backfill) answers the session query in index order and stops after LIMIT
entries. Keeping both would cost every insert a second session-keyed b-tree update.

Readers of the previous release that are still running lose their index here: their session query
keeps returning the right rows, by scanning the junction table. Run this step once the previous
release is gone if that matters (`alembic upgrade 0003`, roll out, then `upgrade head`).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import logging
import time

from alembic import context, op
from sqlalchemy import Connection

from tracestore.migrate.online import read_into_cache, write_step
from tracestore.migrate.schema import BOUNDED_ANALYZE, drop_index_concurrently, index_names

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

log = logging.getLogger("tracestore.migrate")


def upgrade() -> None:
    connection = op.get_bind()
    with op.get_context().autocommit_block():
        if connection.dialect.name == "postgresql":
            started = time.monotonic()
            drop_index_concurrently(connection, "idx_trace_sessions_uid")  # no lock that stops writers
        else:
            # idx_trace_sessions_trace too on SQLite, where 0002 leaves it (the primary key serves its lookups).
            started = time.monotonic()
            for legacy in ("idx_trace_sessions_uid", "idx_trace_sessions_trace"):
                _drop_sqlite(connection, legacy)
        dropped = time.monotonic()
    if connection.dialect.name == "postgresql":
        # The backfill updated every link: each has a dead old version, and no page is marked
        # all-visible, so index-only scans fetch every row from the heap until autovacuum comes by.
        # VACUUM makes the dead versions reusable and sets the visibility map; it blocks no one.
        # ANALYZE samples a bounded number of rows by itself.
        with op.get_context().autocommit_block():
            connection.exec_driver_sql("VACUUM (ANALYZE) trace_sessions")
    else:
        for statement in BOUNDED_ANALYZE:  # SQLite's ANALYZE reads everything unless limited
            op.execute(statement)
    analyzed = time.monotonic()
    context.config.attributes.setdefault("reports", {}).setdefault("index", {}).update(
        {"drop_seconds": dropped - started, "analyze_seconds": analyzed - dropped}
    )
    log.info("legacy index dropped in %.1fs, ANALYZE %.1fs", dropped - started, analyzed - dropped)


def _drop_sqlite(connection: Connection, index: str) -> None:
    # DROP INDEX walks every page of the index under the write lock: read them first, without it.
    if index in index_names(connection, "trace_sessions"):
        read_into_cache(connection, "trace_sessions", index)
    write_step(
        connection,
        lambda: op.drop_index(index, table_name="trace_sessions", if_exists=True),
        what=f"drop {index}",
    )


def downgrade() -> None:
    op.create_index("idx_trace_sessions_uid", "trace_sessions", ["session_uid"], if_not_exists=True)
