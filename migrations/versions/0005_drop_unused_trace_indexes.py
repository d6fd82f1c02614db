"""Drop idx_traces_type and idx_traces_namespace: no query tracestore runs reads them, and every stored
trace paid two b-tree inserts for them.

The session query walks idx_trace_sessions_uid_time and filters namespace and context_type on the rows
it joins; pruning and the export use idx_traces_created_at. A query of your own that selects traces by
namespace or context_type alone scans the table instead (docs/performance.md has what that costs).
`downgrade 0004` builds them again.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import logging
import time

from alembic import context, op

from tracestore.dialects.postgresql import index_is_valid
from tracestore.migrate.online import read_into_cache, write_step
from tracestore.migrate.schema import drop_index_concurrently, index_names

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

log = logging.getLogger("tracestore.migrate")

DROPPED = {"idx_traces_type": "context_type", "idx_traces_namespace": "namespace"}


def upgrade() -> None:
    connection = op.get_bind()
    started = time.monotonic()
    with op.get_context().autocommit_block():
        for index in DROPPED:
            if connection.dialect.name == "postgresql":
                drop_index_concurrently(connection, index)  # no lock that stops writers
                continue
            if index not in index_names(connection, "traces"):
                continue
            # DROP INDEX walks every page of the index under the write lock: read them first, without it.
            read_into_cache(connection, "traces", index)
            write_step(
                connection,
                lambda index=index: op.drop_index(index, table_name="traces", if_exists=True),  # type: ignore[misc]
                what=f"drop {index}",
            )
    seconds = time.monotonic() - started
    context.config.attributes.setdefault("reports", {}).setdefault("index", {}).update({"drop_unused_seconds": seconds})
    log.info("unused trace indexes dropped in %.1fs", seconds)


def downgrade() -> None:
    connection = op.get_bind()
    if connection.dialect.name != "postgresql":
        for index, column in DROPPED.items():
            op.create_index(index, "traces", [column], if_not_exists=True)
        return
    with op.get_context().autocommit_block():
        for index, column in DROPPED.items():
            if index_is_valid(connection, index) is False:  # an interrupted build left it INVALID
                drop_index_concurrently(connection, index)
            connection.exec_driver_sql(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {index} ON traces ({column})")
