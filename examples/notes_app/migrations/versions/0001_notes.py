"""notes table

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

# The same revision id as tracestore's first revision, on purpose: the two chains never share a version table.
revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "notes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_id", sa.Text(), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("created_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_notes_session_id", "notes", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_notes_session_id", table_name="notes")
    op.drop_table("notes")
