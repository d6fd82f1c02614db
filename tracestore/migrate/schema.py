"""Schema introspection and migration-time guards, the dialect-specific parts kept in one place."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Index, TextClause, inspect, text
from sqlalchemy.schema import CreateIndex, DropIndex

from tracestore.errors import TraceStoreError, storage_error
from tracestore.models import SESSION_TIME_INDEX, SESSION_TIME_INDEX_COLUMNS, SESSION_TIME_INDEX_WHERE, Base

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
    except connection.dialect.loaded_dbapi.Error as exc:
        raise storage_error(f"PRAGMA {statement} failed", exc) from exc
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


@contextmanager
def freed_pages_not_zeroed(connection: Connection) -> Iterator[None]:
    """Run a block with PRAGMA secure_delete=FAST, restoring the previous setting after.

    Debian's SQLite is built with SECURE_DELETE on, so dropping an index writes every one of its pages
    full of zeros: at 10M traces, 545 MB of WAL for idx_trace_sessions_trace, seconds of write lock.
    FAST still zeroes deleted content inside pages that are written anyway, but not whole freed pages.
    The migrations only drop indexes whose keys are still in the table, so nothing private is left
    behind that was not there before.
    """
    if connection.dialect.name != "sqlite":
        yield
        return
    previous = _pragma(connection, "secure_delete")
    _pragma(connection, "secure_delete=FAST")
    try:
        yield
    finally:
        _pragma(connection, f"secure_delete={'FAST' if previous == 2 else previous}")


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
        # Columns and order: Alembic's own comparison (PostgreSQL reflection keeps DESC). Not what
        # reflection hides: an interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index.
        if index_is_valid(connection, SESSION_TIME_INDEX) is False:
            return f"index {SESSION_TIME_INDEX} is INVALID (an interrupted CREATE INDEX CONCURRENTLY)"
        return None
    shape = index_shape(connection, SESSION_TIME_INDEX)
    if shape is None:
        return f"index {SESSION_TIME_INDEX} is missing"
    if shape != SESSION_TIME_INDEX_COLUMNS:
        return f"index {SESSION_TIME_INDEX} is {shape}, expected {SESSION_TIME_INDEX_COLUMNS}"
    where = index_where(connection, SESSION_TIME_INDEX)
    if where != _normalized(SESSION_TIME_INDEX_WHERE):
        found = f"WHERE {where}" if where else "not partial"
        return f"index {SESSION_TIME_INDEX} is {found}, expected WHERE {SESSION_TIME_INDEX_WHERE}"
    return None


def index_where(connection: Connection, index: str) -> str | None:
    """The partial-index predicate of a SQLite index as stored in sqlite_master (normalized), or None."""
    sql = connection.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (index,)
    ).scalar()
    match = re.search(r"\)\s*WHERE\s+(.*)$", sql or "", re.IGNORECASE | re.DOTALL)
    return _normalized(match.group(1)) if match else None


def _normalized(sql: str) -> str:
    return " ".join(sql.split()).upper()


# -- DDL shared by the migrations and `tracestore verify --fix` ----------------------------------------
# The triggers that keep trace_sessions.created_at equal to its trace's at every moment after revision
# 0002, whoever writes: this release, or the previous one during a rolling deploy (it knows nothing of
# the column). A NULL copy would hide the link from the partial session index, so every way a link can
# be born or a time can change is covered. Name -> (table, trigger body).
FOLLOW_TRIGGER = "trace_sessions_follow_created_at"
STAMP_LINK_TRIGGER = "trace_sessions_stamp_created_at"
STAMP_TRACE_TRIGGER = "traces_stamp_links_created_at"
COPY_TRIGGERS: dict[str, str] = {
    # A trace's created_at changed (re-stored by the store, or updated by the previous release).
    FOLLOW_TRIGGER: "AFTER UPDATE OF created_at ON traces WHEN NEW.created_at IS NOT OLD.created_at"
    " BEGIN UPDATE trace_sessions SET created_at = NEW.created_at WHERE trace_id = NEW.id; END",
    # A link inserted without created_at (the previous release): copy its trace's.
    STAMP_LINK_TRIGGER: "AFTER INSERT ON trace_sessions WHEN NEW.created_at IS NULL"
    " BEGIN UPDATE trace_sessions SET created_at ="
    " (SELECT created_at FROM traces WHERE id = NEW.trace_id) WHERE rowid = NEW.rowid; END",
    # A trace inserted after its links (legacy writers ran with foreign keys off, so links first was
    # allowed): its links get its time. One primary-key probe per inserted trace, usually finding nothing.
    STAMP_TRACE_TRIGGER: "AFTER INSERT ON traces"
    " BEGIN UPDATE trace_sessions SET created_at = NEW.created_at"
    " WHERE trace_id = NEW.id AND created_at IS NOT NEW.created_at; END",
}


# The store itself relies on FOLLOW_TRIGGER (a re-stored trace's links follow it). The two stamp
# triggers exist for writers of the previous release only, and cost every insert (measured at 1M
# traces: plain inserts 0.71x as fast with both), so `tracestore finalize` drops them once the rolling
# deploy is over; verify then no longer expects them.
REQUIRED_TRIGGERS = (FOLLOW_TRIGGER,)
ROLLING_DEPLOY_TRIGGERS = (STAMP_LINK_TRIGGER, STAMP_TRACE_TRIGGER)


# The same three triggers on PostgreSQL: a trigger there runs a function. (table, timing and event,
# WHEN condition, function body). The link stamp is a BEFORE trigger that fills the row being
# inserted, which PostgreSQL allows and SQLite does not (there it is a second UPDATE).
_PG_TRIGGERS: dict[str, tuple[str, str, str, str]] = {
    FOLLOW_TRIGGER: (
        "traces",
        "AFTER UPDATE OF created_at",
        "NEW.created_at IS DISTINCT FROM OLD.created_at",
        "UPDATE trace_sessions SET created_at = NEW.created_at WHERE trace_id = NEW.id; RETURN NULL;",
    ),
    STAMP_LINK_TRIGGER: (
        "trace_sessions",
        "BEFORE INSERT",
        "NEW.created_at IS NULL",
        "NEW.created_at := (SELECT created_at FROM traces WHERE id = NEW.trace_id); RETURN NEW;",
    ),
    STAMP_TRACE_TRIGGER: (
        "traces",
        "AFTER INSERT",
        "TRUE",
        "UPDATE trace_sessions SET created_at = NEW.created_at"
        " WHERE trace_id = NEW.id AND created_at IS DISTINCT FROM NEW.created_at; RETURN NULL;",
    ),
}


def create_copy_triggers(
    names: tuple[str, ...] = tuple(COPY_TRIGGERS), *, dialect: str = "sqlite"
) -> tuple[TextClause, ...]:
    if dialect == "postgresql":
        statements = []
        for name in names:
            table, event, condition, body = _PG_TRIGGERS[name]
            statements += [
                text(f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$"),
                text(
                    f"CREATE OR REPLACE TRIGGER {name} {event} ON {table} FOR EACH ROW WHEN ({condition})"
                    f" EXECUTE FUNCTION {name}()"
                ),
            ]
        return tuple(statements)
    return tuple(text(f"CREATE TRIGGER IF NOT EXISTS {name} {COPY_TRIGGERS[name]}") for name in names)


def drop_copy_triggers(
    names: tuple[str, ...] = tuple(COPY_TRIGGERS), *, dialect: str = "sqlite"
) -> tuple[TextClause, ...]:
    if dialect == "postgresql":
        return tuple(
            statement
            for name in names
            for statement in (
                text(f"DROP TRIGGER IF EXISTS {name} ON {_PG_TRIGGERS[name][0]}"),
                text(f"DROP FUNCTION IF EXISTS {name}()"),
            )
        )
    return tuple(text(f"DROP TRIGGER IF EXISTS {name}") for name in names)


def missing_copy_triggers(connection: Connection, names: tuple[str, ...] = tuple(COPY_TRIGGERS)) -> list[str]:
    query = (
        "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
        if connection.dialect.name == "postgresql"
        else "SELECT name FROM sqlite_master WHERE type = 'trigger'"
    )
    present = {name for (name,) in connection.exec_driver_sql(query).all()}
    return [name for name in names if name not in present]


def rolling_deploy_triggers(connection: Connection) -> list[str]:
    """The rolling-deploy triggers still present: none once `tracestore finalize` has run."""
    missing = missing_copy_triggers(connection, ROLLING_DEPLOY_TRIGGERS)
    return [name for name in ROLLING_DEPLOY_TRIGGERS if name not in missing]


def _session_index() -> Index:
    return next(index for index in Base.metadata.tables["trace_sessions"].indexes if index.name == SESSION_TIME_INDEX)


def create_session_index() -> CreateIndex:
    """CREATE INDEX IF NOT EXISTS idx_trace_sessions_uid_time (partial), from the model."""
    return CreateIndex(_session_index(), if_not_exists=True)


def drop_session_index() -> DropIndex:
    return DropIndex(_session_index(), if_exists=True)


def index_is_valid(connection: Connection, index: str) -> bool | None:
    """PostgreSQL: whether `index` can answer queries; None if there is no such index.

    A CREATE INDEX CONCURRENTLY that fails or is cancelled leaves its index behind marked INVALID:
    every write keeps maintaining it, no query ever uses it, and IF NOT EXISTS skips over it.
    """
    valid = connection.execute(
        text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": index}
    ).scalar()
    return None if valid is None else bool(valid)


def drop_index_concurrently(connection: Connection, index: str) -> None:
    """PostgreSQL: DROP INDEX CONCURRENTLY IF EXISTS, which waits for running queries instead of
    blocking every reader and writer of the table behind its lock. Needs an autocommit connection."""
    quoted = connection.dialect.identifier_preparer.quote(index)
    connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {quoted}")


def create_session_index_concurrently(connection: Connection) -> bool:
    """PostgreSQL: build idx_trace_sessions_uid_time with CREATE INDEX CONCURRENTLY (writers carry on)
    and check it is valid; an INVALID one left by an interrupted build is dropped and built again.

    Needs an autocommit connection. Returns whether an INVALID index was rebuilt.
    """
    from tracestore.errors import MigrationError

    rebuilt = index_is_valid(connection, SESSION_TIME_INDEX) is False
    if rebuilt:
        drop_index_concurrently(connection, SESSION_TIME_INDEX)
    sql = str(create_session_index().compile(dialect=connection.dialect))
    assert sql.startswith("CREATE INDEX IF NOT EXISTS "), sql
    connection.exec_driver_sql(sql.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1))
    if index_is_valid(connection, SESSION_TIME_INDEX) is not True:
        raise MigrationError(
            f"index {SESSION_TIME_INDEX} is not valid after CREATE INDEX CONCURRENTLY: run the upgrade again "
            "(it drops and rebuilds an INVALID index)"
        )
    return rebuilt


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
