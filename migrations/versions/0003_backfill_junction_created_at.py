"""Backfill trace_sessions.created_at from traces in bounded batches; record orphan links for finalize.

Runs outside the migration transaction (autocommit block): every batch commits on its own and saves
its position, so a killed run resumes where it stopped. On PostgreSQL each batch also fills the
partial session index that 0002 created empty; on SQLite the index is then built in key order and
attached whole (tracestore.migrate.index_build). Batch size: `-x batch_size=N`, then $TRACESTORE_BATCH_SIZE, then the
default (tracestore upgrade --batch-size sets the same).

A link whose trace does not exist is kept: the previous release, still writing during a rolling
deploy, commits a trace's links before the trace. The backfill records such links and `tracestore
finalize` deletes the ones whose trace never came (tracestore.backfill).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import logging
import os

from alembic import context, op

from tracestore.migrate.backfill import DEFAULT_BATCH_SIZE, ORPHANS_TABLE, backfill
from tracestore.migrate.index_build import DROP_BUILD

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

log = logging.getLogger("tracestore.migrate")


def _batch_size() -> int:
    configured = context.get_x_argument(as_dictionary=True).get("batch_size") or os.environ.get("TRACESTORE_BATCH_SIZE")
    return int(configured) if configured else int(context.config.attributes.get("batch_size", DEFAULT_BATCH_SIZE))


def upgrade() -> None:
    migration = op.get_context()
    with migration.autocommit_block():
        report = backfill(
            op.get_bind(),
            batch_size=_batch_size(),
            on_progress=context.config.attributes.get("on_progress"),
        )
    context.config.attributes.setdefault("reports", {})["backfill"] = report
    if report.orphans_kept:
        log.warning(
            "kept %d trace_sessions rows whose trace does not exist (yet): `tracestore finalize` removes those whose"
            " trace never comes",
            report.orphans_kept,
        )


def downgrade() -> None:
    # At revision 0002 the column exists and may hold values (writers of this release fill it), so it
    # stays. The record of kept orphan links goes: the links themselves stay, as the legacy schema had them.
    op.execute(f"DROP TABLE IF EXISTS {ORPHANS_TABLE}")
    if op.get_bind().dialect.name == "sqlite":
        for statement in DROP_BUILD:  # SQLite: the session index's build table, if a killed upgrade left it
            op.execute(statement)
