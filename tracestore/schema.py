"""Schema introspection and migration-time guards, the dialect-specific parts kept in one place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, inspect

from tracestore.errors import TraceStoreError


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
    from tracestore.models import SESSION_TIME_INDEX, SESSION_TIME_INDEX_COLUMNS

    if connection.dialect.name != "sqlite":
        return None  # other dialects reflect sort order, so Alembic's own comparison covers them
    shape = index_shape(connection, SESSION_TIME_INDEX)
    if shape is None:
        return f"index {SESSION_TIME_INDEX} is missing"
    if shape != SESSION_TIME_INDEX_COLUMNS:
        return f"index {SESSION_TIME_INDEX} is {shape}, expected {SESSION_TIME_INDEX_COLUMNS}"
    return None


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
