"""SQLite's rules: JSON text for lists, rowids, and the per-session bounded read without LATERAL."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import orjson
from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Table,
    Text,
    TextClause,
    bindparam,
    func,
    literal_column,
    select,
    text,
)
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import aliased
from sqlalchemy.sql.selectable import FromClause

from tracestore.dialects.base import (
    FOLLOW_TRIGGER,
    STAMP_LINK_TRIGGER,
    STAMP_TRACE_TRIGGER,
    EngineRules,
    dated,
    links_with_rowid,
    newest_first,
    normalized,
)
from tracestore.errors import TraceStoreError, storage_error
from tracestore.models import SESSION_TIME_INDEX, SESSION_TIME_INDEX_COLUMNS, SESSION_TIME_INDEX_WHERE, TraceSession


class SQLiteRules(EngineRules):
    name = "sqlite"
    # No arrays, and no round trips to save: executemany of one row each.
    write_arrays = False
    text_holds_nul = True
    explain_prefix = "EXPLAIN QUERY PLAN "
    one_write_lock = True
    # A deferred transaction that later upgrades to a write fails at once in WAL mode instead of waiting.
    begin_write = "BEGIN IMMEDIATE"
    write_isolation_level = "SERIALIZABLE"  # SQLAlchemy's name for SQLite's own transactions
    trigger_names_sql = "SELECT name FROM sqlite_master WHERE type = 'trigger'"

    def insert(self, target: Table) -> Any:
        return sqlite.insert(target)

    def session_list(self, session_uid: Any) -> ColumnElement[Any]:
        return func.json_group_array(session_uid)

    def listed(self, name: str) -> tuple[FromClause, ColumnElement[Any]]:
        # No arrays: a JSON array read with json_each, which (SQLite 3.40 at least) ends a string at an
        # escaped NUL; so list_argument escapes NUL as \x01 '0' (and \x01 as \x01 '1'), undone here. Every
        # \x01 of the escaped text starts a pair, so the two replaces cannot mistake one pair for another.
        each = func.json_each(bindparam(name, type_=Text)).table_valued("value").alias("j")
        unnul = func.replace(each.c.value, _char(1, ord("0")), _char(0))
        return each, func.replace(unnul, _char(1, ord("1")), _char(1))

    def list_argument(self, values: Iterable[str]) -> Any:
        escaped = [value.replace("\x01", "\x011").replace("\x00", "\x010") for value in values]
        return orjson.dumps(escaped).decode()

    def session_keys(self, *, since: bool, limit: bool) -> Select[*tuple[Any, ...]]:
        # No LATERAL. The nested loop over the listed sessions reads one index range each; to stop each
        # after :limit entries, a correlated list of the rowids of that session's newest links, run once
        # per listed session, each rowid then one lookup of its link.
        each, uid = self.listed("session_uids")
        if not limit:
            link = aliased(TraceSession, name="ts")
            keys = select(link.created_at, link.trace_id).select_from(each.join(link, link.session_uid == uid))
            return dated(keys, link.created_at, since=since)
        newest = links_with_rowid.alias("x")
        rowids = dated(select(newest.c.rowid).where(newest.c.session_uid == uid), newest.c.created_at, since=since)
        rowids = newest_first(rowids, newest.c.created_at, newest.c.trace_id, limit=True)
        found = links_with_rowid.alias("ts")
        return select(found.c.created_at, found.c.trace_id).select_from(each.join(found, found.c.rowid.in_(rowids)))

    def row_key(self, target: Any) -> Any:
        # traces is a rowid table, and idx_traces_created_at holds (created_at, rowid): a covering range
        # read, and each row found again by its rowid instead of a second search of the TEXT primary key.
        return literal_column(f"{target.name}.rowid")

    def create_triggers(self, names: tuple[str, ...]) -> tuple[TextClause, ...]:
        return tuple(text(f"CREATE TRIGGER IF NOT EXISTS {name} {TRIGGERS[name]}") for name in names)

    def drop_triggers(self, names: tuple[str, ...]) -> tuple[TextClause, ...]:
        return tuple(text(f"DROP TRIGGER IF EXISTS {name}") for name in names)

    def foreign_keys_off(self, connection: Connection) -> AbstractContextManager[None]:
        return _foreign_keys_off(connection)

    def freed_pages_not_zeroed(self, connection: Connection) -> AbstractContextManager[None]:
        return _freed_pages_not_zeroed(connection)

    def session_index_drift(self, connection: Connection) -> str | None:
        # Alembic cannot compare this index on SQLite (nor its DESC): read its shape and predicate.
        shape = index_shape(connection, SESSION_TIME_INDEX)
        if shape is None:
            return f"index {SESSION_TIME_INDEX} is missing"
        if shape != SESSION_TIME_INDEX_COLUMNS:
            return f"index {SESSION_TIME_INDEX} is {shape}, expected {SESSION_TIME_INDEX_COLUMNS}"
        where = index_where(connection, SESSION_TIME_INDEX)
        if where != normalized(SESSION_TIME_INDEX_WHERE):
            found = f"WHERE {where}" if where else "not partial"
            return f"index {SESSION_TIME_INDEX} is {found}, expected WHERE {SESSION_TIME_INDEX_WHERE}"
        return None


def pragma(connection: Connection, statement: str) -> Any:
    """Run a PRAGMA on the connection's DBAPI connection; its first value."""
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
def _foreign_keys_off(connection: Connection) -> Iterator[None]:
    # Migrations need this: a batch-mode rebuild of `traces` with foreign keys on deletes every
    # `trace_sessions` row through ON DELETE CASCADE, without any error.
    if connection.in_transaction():
        raise TraceStoreError("migrations need a connection that is not inside a transaction")
    previous = pragma(connection, "foreign_keys")
    pragma(connection, "foreign_keys=OFF")
    if pragma(connection, "foreign_keys") != 0:
        raise TraceStoreError("could not turn SQLite foreign keys off for the migration")
    try:
        yield
    finally:
        if connection.in_transaction():
            connection.rollback()
        pragma(connection, f"foreign_keys={'ON' if previous else 'OFF'}")


@contextmanager
def _freed_pages_not_zeroed(connection: Connection) -> Iterator[None]:
    # Builds with SECURE_DELETE on (Debian's) write every page of a dropped index full of zeros, seconds
    # of write lock on a big file. FAST still zeroes deleted content inside pages written anyway, and the
    # migrations only drop indexes whose keys are still in the table, so nothing private is left behind.
    previous = pragma(connection, "secure_delete")
    pragma(connection, "secure_delete=FAST")
    try:
        yield
    finally:
        pragma(connection, f"secure_delete={'FAST' if previous == 2 else previous}")


def index_shape(connection: Connection, index: str) -> tuple[tuple[str, bool], ...] | None:
    """(column, descending) of an index's key columns as SQLite stores them, or None if it is missing.

    SQLAlchemy's SQLite reflection drops DESC, so the shape is read from PRAGMA index_xinfo.
    """
    rows = connection.exec_driver_sql(f"PRAGMA index_xinfo('{index}')").all()
    if not rows:
        return None
    return tuple((row[2], bool(row[3])) for row in rows if row[5])  # key columns only, not the rowid


def index_where(connection: Connection, index: str) -> str | None:
    """The partial-index predicate of a SQLite index as stored in sqlite_master (normalized), or None."""
    sql = connection.exec_driver_sql(
        "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (index,)
    ).scalar()
    match = re.search(r"\)\s*WHERE\s+(.*)$", sql or "", re.IGNORECASE | re.DOTALL)
    return normalized(match.group(1)) if match else None


# name -> trigger body. Each covers a way a link can be born or a time can change.
TRIGGERS: dict[str, str] = {
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


def _char(*code_points: int) -> ColumnElement[Any]:
    """SQLite's char(...) of constant code points, written into the SQL (no bind parameters)."""
    return func.char(*(literal_column(str(int(point))) for point in code_points))
