"""SQLite connections the store borrows from an application's Engine: what one operation sets on such a
connection and puts back before it returns to the application's pool, the transaction recipe for a connection
tracestore runs migrations on, and the switch of the file to WAL.

An Engine the application passes in keeps its own connection setup (tracestore.engine): no pool or connect
listener, so its pragmas and its driver's transaction control stay the application's. The store sets what an
operation needs right before it, outside any transaction (PRAGMA foreign_keys is a silent no-op inside one), and
restores it after COMMIT or ROLLBACK.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import URL

from tracestore.busy import is_busy
from tracestore.dialects.sqlite_connect import SQLITE_PRAGMAS, WRITE, access, set_journal_mode
from tracestore.errors import StorageError

log = logging.getLogger("tracestore.engine")

# The store's own busy_timeout (SQLITE_PRAGMAS): a write waits that long for a competing writer before its
# retry loop (tracestore.busy) takes over, so a borrowed connection that waits less is raised to it.
BUSY_TIMEOUT_MS = int(dict(SQLITE_PRAGMAS)["busy_timeout"])


def borrow(dbapi_connection: Any, *, foreign_keys: bool) -> dict[str, int]:
    """Set what one of the store's operations needs on an application's connection that is in no transaction:
    busy_timeout at least the store's, and with `foreign_keys` enforcement on (retention's deletes cascade to the
    links). Returns the previous values of what it changed, for give_back()."""
    # Each value is noted before it is set, so that a failure midway puts back everything that may have changed.
    changed: dict[str, int] = {}
    cursor = dbapi_connection.cursor()
    try:
        busy_timeout = _pragma(cursor, "busy_timeout")
        if busy_timeout < BUSY_TIMEOUT_MS:
            changed["busy_timeout"] = busy_timeout
            cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if foreign_keys and not _pragma(cursor, "foreign_keys"):
            changed["foreign_keys"] = 0
            cursor.execute("PRAGMA foreign_keys=ON")
            if not _pragma(cursor, "foreign_keys"):  # a transaction left open by the driver: the pragma did nothing
                raise StorageError("could not turn SQLite foreign keys on: the connection is inside a transaction")
    except BaseException:
        give_back(dbapi_connection, changed)
        raise
    finally:
        cursor.close()
    return changed


def give_back(dbapi_connection: Any, changed: dict[str, int]) -> None:
    """Put back what borrow() or take_over() changed; the connection must be in no transaction."""
    if not changed:
        return
    cursor = dbapi_connection.cursor()
    try:
        for name, value in changed.items():
            cursor.execute(f"PRAGMA {name}={int(value)}")
    finally:
        cursor.close()


def in_transaction(connection: Connection) -> bool:
    """Whether the driver has a transaction open (SQLAlchemy's own state may say otherwise: pysqlite begins
    by itself before DML, and an application's begin hook may have sent BEGIN)."""
    return bool(connection.connection.driver_connection.in_transaction)  # type: ignore[union-attr]


# -- a connection tracestore runs migrations on -------------------------------------------------------------
_KEEP = object()


@dataclass
class Taken:
    """What take_over() changed on a connection, for hand_back()."""

    isolation_level: Any = _KEEP
    pragmas: dict[str, int] = field(default_factory=dict)


def take_over(dbapi_connection: Any, url: URL) -> Taken:
    """Set an application's connection up as tracestore's own are, for a migration: transaction control taken
    from the driver (the BEGIN comes from recipe_view's hook), busy_timeout, foreign keys on, the file in WAL."""
    taken = Taken()
    try:
        # pysqlite begins by itself only before DML, so DDL would run outside the migration's transaction.
        taken.isolation_level, dbapi_connection.isolation_level = dbapi_connection.isolation_level, None
        taken.pragmas = borrow(dbapi_connection, foreign_keys=True)
        switch_to_wal(dbapi_connection, url)
    except BaseException:
        hand_back(dbapi_connection, taken)
        raise
    return taken


def hand_back(dbapi_connection: Any, taken: Taken) -> None:
    """Put back what take_over() changed; the connection must be in no transaction."""
    give_back(dbapi_connection, taken.pragmas)
    if taken.isolation_level is not _KEEP:
        dbapi_connection.isolation_level = taken.isolation_level


def install_recipe(view: Engine) -> None:
    """Make the transactions of a view of an application's Engine BEGIN explicitly (BEGIN IMMEDIATE with the
    WRITE execution option, as migrations/env.py sets it), the way SQLAlchemy's recipe for pysqlite does; the
    hooks are on the view only, so the application's own connections never see them."""
    event.listen(view, "before_cursor_execute", _begin_first, retval=True)
    event.listen(view, "set_connection_execution_options", _note_isolation_change)


# Connections of a recipe view whose isolation level SQLAlchemy will reset when they return to the pool.
_isolation_changed: weakref.WeakSet[Connection] = weakref.WeakSet()


def _note_isolation_change(conn: Connection, options: dict[str, Any]) -> None:
    if "isolation_level" in options:  # an autocommit block (Alembic's), and its end
        _isolation_changed.add(conn)


def keeps_driver_control(conn: Connection, taken: Taken) -> bool:
    """Whether the application's transaction control survives the connection's return to the pool: SQLAlchemy
    resets an isolation level changed on it (an autocommit block) to pysqlite's default, "" (the driver begins
    before DML), which is not what an application on SQLAlchemy's recipe (None) had."""
    return conn not in _isolation_changed or taken.isolation_level in ("", _KEEP)


# What follows BEGIN in a deferred BEGIN statement.
DEFERRED = ("DEFERRED", "TRANSACTION", ";")


def _begin_first(
    conn: Connection, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
) -> tuple[str, Any]:
    # Not a begin hook: the view's hooks fire before the Engine's, so an application whose own begin hook sends
    # BEGIN (SQLAlchemy's pysqlite recipe) would find ours already sent. At the first statement of a transaction
    # either one was sent, or this sends it.
    if in_transaction(conn):
        return statement, parameters
    options = conn.get_execution_options()
    autocommit = options.get("isolation_level") == "AUTOCOMMIT"
    words = statement.split()
    if words and words[0].upper() == "BEGIN" and (len(words) == 1 or words[1].upper() in DEFERRED):
        # tracestore sends BEGIN IMMEDIATE or nothing, so a deferred BEGIN is an application's begin hook: made
        # BEGIN IMMEDIATE for a write, and not sent in an autocommit block (Alembic's), which sends its own.
        if autocommit:
            return "-- autocommit block: the application's BEGIN is not sent", parameters
        return ("BEGIN IMMEDIATE" if options.get(WRITE) else statement), parameters
    # Outside SQLAlchemy's transaction a statement runs only in a begin hook: the application's business.
    if autocommit or not conn.in_transaction() or (words and words[0].upper() == "BEGIN"):
        return statement, parameters
    begin = "BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN"
    own = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        own.execute(begin)
    finally:
        own.close()
    return statement, parameters


# -- WAL --------------------------------------------------------------------------------------------------
def switch_to_wal(dbapi_connection: Any, url: URL) -> None:
    """Switch the file to WAL where the connection can write (a property of the file, kept once set).

    The store's concurrency rests on it: readers never block the writer and the writer never blocks readers.
    A file that cannot switch now (another connection is inside a transaction, a file system without shared
    memory) keeps its mode, with a warning: it works, with writers and readers waiting for each other.
    """
    read_only, immutable = access(url)
    cursor = dbapi_connection.cursor()
    try:
        try:
            set_journal_mode(cursor, "WAL", read_only=read_only, immutable=immutable, driver=url.drivername)
            cursor.execute("PRAGMA journal_mode")
            mode = str(cursor.fetchone()[0]).lower()
        except Exception as exc:  # the driver's own error class
            if not is_busy(exc):
                raise
            log.warning("could not switch %s to WAL journal mode now (another connection holds it): %s", url, exc)
            return
    finally:
        cursor.close()
    if mode not in ("wal", "memory") and not read_only:
        log.warning("%s stays in %s journal mode: SQLite could not switch it to WAL", url.database, mode)


def _pragma(cursor: Any, name: str) -> int:
    cursor.execute(f"PRAGMA {name}")
    row = cursor.fetchone()
    return int(row[0]) if row else 0
