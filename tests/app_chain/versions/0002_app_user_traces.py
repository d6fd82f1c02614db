"""The application's second revision: a display name, and its own table of users' traces.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("app_users") as batch:
        batch.add_column(sa.Column("display_name", sa.String(100)))
    op.create_table(
        "app_user_traces",
        sa.Column("user_id", sa.Integer, sa.ForeignKey("app_users.id"), primary_key=True),
        sa.Column("trace_id", sa.Text, primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("app_user_traces")
    with op.batch_alter_table("app_users") as batch:
        batch.drop_column("display_name")
