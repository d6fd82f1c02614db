"""Schema introspection and migration-time guards, the dialect-specific parts kept in one place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Index, TextClause, inspect, text
from sqlalchemy.schema import CreateIndex, DropIndex

from tracestore.errors import TraceStoreError
from tracestore.models import SESSION_TIME_INDEX, SESSION_TIME_INDEX_COLUMNS, Base

# Moves a trace's links when its created_at changes, whoever changes it (revision 0002 creates it).
FOLLOW_TRIGGER = "trace_sessions_follow_created_at"
# Bounded ANALYZE: statistics from a sample of each index, seconds even at 100 GB.
BOUNDED_ANALYZE = ("PRAGMA analysis_limit=1000", "ANALYZE", "PRAGMA analysis_limit=0")


def _pragma(connection: Connection, statement: str) -> Any:
    # Straight to the driver: through SQLAlchemy the statement would autobegin a transaction,
    # and PRAGMA foreign_keys is a silent no-op inside one.
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(f"PRAGMA {statement}")
        row = cursor.fetchone()
        return row[0] if row else None
    finally:
        cursor.close()


@contextmanager
def foreign_keys_off(connection: Connection) -> Iterator[None]:
    """Run a block with SQLite foreign keys off, restoring the previous setting after.

    Migrations need this: a batch-mode rebuild of `traces` with foreign keys on deletes every
    `trace_sessions` row through ON DELETE CASCADE, without any error.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    if connection.in_transaction():
        raise TraceStoreError("migrations need a connection that is not inside a transaction")
    previous = _pragma(connection, "foreign_keys")
    _pragma(connection, "foreign_keys=OFF")
    if _pragma(connection, "foreign_keys") != 0:
        raise TraceStoreError("could not turn SQLite foreign keys off for the migration")
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        _pragma(connection, f"foreign_keys={'ON' if previous else 'OFF'}")


def table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def column_names(connection: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns(table)}


def index_names(connection: Connection, table: str) -> set[str]:
    return {index["name"] for index in inspect(connection).get_indexes(table) if index["name"]}


def index_shape(connection: Connection, index: str) -> tuple[tuple[str, bool], ...] | None:
    """(column, descending) of an index's key columns as SQLite stores them, or None if it is missing.

    SQLAlchemy's SQLite reflection drops DESC, so the shape is read from PRAGMA index_xinfo.
    """
    rows = connection.exec_driver_sql(f"PRAGMA index_xinfo('{index}')").all()
    if not rows:
        return None
    return tuple((row[2], bool(row[3])) for row in rows if row[5])  # key columns only, not the rowid


def session_index_drift(connection: Connection) -> str | None:
    """Why idx_trace_sessions_uid_time differs from the model (missing, ascending, other columns), or None."""
    if connection.dialect.name != "sqlite":
        return None  # other dialects reflect sort order, so Alembic's own comparison covers them
    shape = index_shape(connection, SESSION_TIME_INDEX)
    if shape is None:
        return f"index {SESSION_TIME_INDEX} is missing"
    if shape != SESSION_TIME_INDEX_COLUMNS:
        return f"index {SESSION_TIME_INDEX} is {shape}, expected {SESSION_TIME_INDEX_COLUMNS}"
    return None


# -- DDL shared by the migrations and `tracestore verify --fix` ----------------------------------------
def create_follow_trigger() -> TextClause:
    """The trigger that keeps trace_sessions.created_at equal to its trace's when traces.created_at changes."""
    return text(
        f"CREATE TRIGGER IF NOT EXISTS {FOLLOW_TRIGGER} AFTER UPDATE OF created_at ON traces"
        " WHEN NEW.created_at IS NOT OLD.created_at"
        " BEGIN UPDATE trace_sessions SET created_at = NEW.created_at WHERE trace_id = NEW.id; END"
    )


def drop_follow_trigger() -> TextClause:
    return text(f"DROP TRIGGER IF EXISTS {FOLLOW_TRIGGER}")


def _session_index() -> Index:
    return next(index for index in Base.metadata.tables["trace_sessions"].indexes if index.name == SESSION_TIME_INDEX)


def create_session_index() -> CreateIndex:
    """CREATE INDEX IF NOT EXISTS idx_trace_sessions_uid_time, with its DESC columns, from the model."""
    return CreateIndex(_session_index(), if_not_exists=True)


def drop_session_index() -> DropIndex:
    return DropIndex(_session_index(), if_exists=True)


def refuse_dropping_traces(connection: Connection, *, drop_data: bool) -> None:
    """Raise MigrationError if going to base would drop a traces table that holds rows."""
    from tracestore.errors import MigrationError

    if drop_data or "traces" not in table_names(connection):
        return
    count = connection.exec_driver_sql("SELECT count(*) FROM traces").scalar_one()
    if count:
        raise MigrationError(
            f"refusing to drop the traces table: it holds {count} traces. Downgrade to 0001 (the legacy "
            "schema) to keep them, or pass drop_data (`-x drop_data=yes`) if dropping them is intended."
        )
