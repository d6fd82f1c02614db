"""What the tables and indexes are: the SQLAlchemy 2.x declarative models of the trace schema."""

from __future__ import annotations

from sqlalchemy import REAL, Double, ForeignKey, Index, MetaData, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeEngine

# Names for constraints the legacy schema left anonymous, so Alembic can address them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Epoch seconds: REAL (8-byte IEEE) in SQLite, as the legacy schema declares it; DOUBLE elsewhere
# (PostgreSQL's REAL is a 4-byte float and would lose sub-second precision).
EpochSeconds: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")

# The one index the hot query needs. It carries the whole sort key (created_at, trace_id): without
# trace_id the tie-break brings back "USE TEMP B-TREE FOR RIGHT PART OF ORDER BY", and with it the
# junction side of the join is a covering index scan. SQLite walks it backwards for "newest first".
# - Partial (WHERE created_at IS NOT NULL), so the migration can build it online: created while every
#   copy is still NULL it is empty (one table scan, no sort), and the batched backfill fills it a batch
#   at a time, instead of one CREATE INDEX holding the write lock for a full sort. Queries say
#   `created_at IS NOT NULL` to use it; a link whose trace is missing (the only way a copy stays
#   NULL, see migrate.schema.COPY_TRIGGERS) is never an answer anyway.
# - Ascending, not the original design's DESC: links arrive oldest first (the backfill walks rowids,
#   new traces are the newest), so each session's entries are appended at the end of its key range,
#   and SQLite's page splits leave the pages behind full; with DESC every insert lands at the front of
#   the range and the pages left behind stay partly empty. Backwards and forwards scans read the same
#   pages. (docs/design.md and docs/performance.md have the figures.)
SESSION_TIME_INDEX = "idx_trace_sessions_uid_time"
SESSION_TIME_INDEX_WHERE = "created_at IS NOT NULL"
# (column, descending) in index order; the migration and the schema check use the same definition.
SESSION_TIME_INDEX_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("session_uid", False),
    ("created_at", False),
    ("trace_id", False),
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Trace(Base):
    """A stored trace; columns exactly as the legacy `traces` table, JSON kept as TEXT."""

    __tablename__ = "traces"
    __table_args__ = (
        Index("idx_traces_created_at", "created_at"),
        Index("idx_traces_type", "context_type"),
        Index("idx_traces_namespace", "namespace"),
    )

    # The legacy DDL says `id TEXT PRIMARY KEY` without NOT NULL, which SQLite takes literally. Adding
    # NOT NULL means rebuilding the biggest table; the store never writes a NULL id, so the model
    # states the column as it is and `alembic check` stays meaningful on adopted databases.
    id: Mapped[str] = mapped_column(Text, primary_key=True, nullable=True)
    context_type: Mapped[str] = mapped_column(Text)
    namespace: Mapped[str] = mapped_column(Text)
    data: Mapped[str] = mapped_column(Text)
    # `metadata` is Declarative's own attribute, hence the trailing underscore.
    metadata_: Mapped[str | None] = mapped_column("metadata", Text, server_default=text("'{}'"))
    created_at: Mapped[float] = mapped_column(EpochSeconds)
    updated_at: Mapped[float] = mapped_column(EpochSeconds)


class TraceSession(Base):
    """Links a trace to a session; `created_at` is the trace's, copied here so one index serves the query."""

    __tablename__ = "trace_sessions"
    __table_args__ = (
        Index(
            SESSION_TIME_INDEX,
            *(text(f"{name} DESC") if desc else name for name, desc in SESSION_TIME_INDEX_COLUMNS),
            sqlite_where=text(SESSION_TIME_INDEX_WHERE),
            postgresql_where=text(SESSION_TIME_INDEX_WHERE),
        ),
    )

    trace_id: Mapped[str] = mapped_column(Text, ForeignKey("traces.id", ondelete="CASCADE"), primary_key=True)
    session_uid: Mapped[str] = mapped_column(Text, primary_key=True)
    # Nullable on purpose: SQLite cannot add NOT NULL to an existing column without rebuilding the
    # table (hours at 100 GB, and a cascade hazard), and writers of the previous release insert
    # links without it during a rolling deploy. The store always fills it; the migration backfills it.
    created_at: Mapped[float | None] = mapped_column(EpochSeconds)
