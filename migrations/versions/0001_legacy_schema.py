"""The legacy schema, as the pre-Alembic implementation created it.

On a database the old implementation wrote (tables present, no alembic_version) this revision
recognises what exists and creates only what is missing, so `upgrade head` adopts the database.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from tracestore.migrate.schema import index_names, refuse_dropping_traces, table_names
from tracestore.models import EpochSeconds

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

LEGACY_INDEXES = (
    ("idx_trace_sessions_uid", "trace_sessions", ["session_uid"]),
    ("idx_trace_sessions_trace", "trace_sessions", ["trace_id"]),
    ("idx_traces_created_at", "traces", ["created_at"]),
    ("idx_traces_type", "traces", ["context_type"]),
    ("idx_traces_namespace", "traces", ["namespace"]),
)


def upgrade() -> None:
    bind = op.get_bind()
    existing = table_names(bind)
    if "traces" not in existing:
        op.create_table(
            "traces",
            sa.Column("id", sa.Text, primary_key=True, nullable=True),  # as the legacy DDL: no NOT NULL
            sa.Column("context_type", sa.Text, nullable=False),
            sa.Column("namespace", sa.Text, nullable=False),
            sa.Column("data", sa.Text, nullable=False),
            sa.Column("metadata", sa.Text, server_default=sa.text("'{}'")),
            sa.Column("created_at", EpochSeconds, nullable=False),
            sa.Column("updated_at", EpochSeconds, nullable=False),
        )
    if "trace_sessions" not in existing:
        op.create_table(
            "trace_sessions",
            sa.Column("trace_id", sa.Text, sa.ForeignKey("traces.id", ondelete="CASCADE"), nullable=False),
            sa.Column("session_uid", sa.Text, nullable=False),
            sa.PrimaryKeyConstraint("trace_id", "session_uid"),
        )
    for name, table, columns in LEGACY_INDEXES:
        if name not in index_names(bind, table):
            op.create_index(name, table, columns)


def downgrade() -> None:
    # Dropping the tables is the only way back to "no schema"; refuse to do it to a database that
    # holds traces unless asked explicitly, so a mistyped downgrade cannot destroy years of data.
    # (env.py checks this before the first step of `downgrade base`; this covers relative steps.)
    drop_data = context.get_x_argument(as_dictionary=True).get("drop_data") == "yes"
    refuse_dropping_traces(op.get_bind(), drop_data=drop_data or bool(context.config.attributes.get("drop_data")))
    op.drop_table("trace_sessions")
    op.drop_table("traces")
