"""How the requests of a plan (tracestore.core) meet a SQLAlchemy Connection, for both stores and the ORM helpers.

Two ways to the database: straight to the pooled DBAPI connection (SQLAlchemy's result and event machinery
cost more than a small read or write), or through `exec_driver_sql` whenever someone listens to the engine's
cursor events or it echoes its SQL (OpenTelemetry's and Sentry's SQLAlchemy integrations listen there), so that
instrumentation sees every statement the store runs. Which one is decided at each statement, so a listener
registered after the store opened is honoured from its next statement on.

The async store's reads of a SQLite file it opened itself take a third way when nobody listens: the whole read
in one hop to a thread of its own, on a plain sqlite3 connection (tracestore.dialects.sqlite_reads).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tracestore.core import Execute, Mode, driver_calls
from tracestore.queries import compiled

T = TypeVar("T")


def instrumented(conn: Connection) -> bool:
    """Whether statements on `conn` must go through SQLAlchemy: a cursor listener is registered (on the
    connection, its engine, a parent engine of an engine view, or the Engine class), or the engine echoes.
    About 2 microseconds a statement (benchmarks/instrumented.py)."""
    return _cursor_listeners(conn.dispatch) or bool(conn._echo)


def _cursor_listeners(dispatch: Any) -> bool:
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute)


def execute_steps(steps: Generator[Execute, int, T], conn: Connection) -> T:
    """Run a write's statements on `conn`, in whatever transaction it is in; each is sent back its row count.

    Nothing is committed here: the caller's transaction (the store's, or the application's own) decides.
    """
    dialect = conn.dialect
    cursor: Any = None
    try:
        request = next(steps)
        while True:
            query = compiled(request.stmt, dialect)
            changed = 0
            for args, many in driver_calls(query, request):
                if instrumented(conn):
                    changed += _rowcount(conn.exec_driver_sql(query.sql, args))
                    continue
                if cursor is None:
                    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                (cursor.executemany if many else cursor.execute)(query.sql, args)
                changed += cursor.rowcount
            request = steps.send(changed)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    finally:
        if cursor is not None:
            cursor.close()


def fetch_rows(conn: Connection, stmt: Any, params: dict[str, Any]) -> list[Any]:
    """The rows of one compiled read statement on `conn`, as driver tuples (see instrumented())."""
    query = compiled(stmt, conn.dialect)
    args = query.args(params)
    if instrumented(conn):
        return list(conn.exec_driver_sql(query.sql, args).all())
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(query.sql, args)
        return list(cursor.fetchall())
    finally:
        cursor.close()


# -- the same on an AsyncConnection ---------------------------------------------------------------------------
def _raw_aiosqlite(conn: AsyncConnection) -> bool:
    """Whether to bypass SQLAlchemy's aiosqlite adapter: two thread round trips per statement instead of its
    three to five (cursor, execute, fetch, close), when nobody listens. Other async drivers go through it."""
    return conn.dialect.driver == "aiosqlite" and not instrumented(conn.sync_connection)  # type: ignore[arg-type]


async def execute_steps_async(steps: Generator[Execute, int, T], conn: AsyncConnection) -> T:
    """execute_steps on an AsyncConnection."""
    dialect = conn.dialect
    try:
        request = next(steps)
        while True:
            query = compiled(request.stmt, dialect)
            changed = 0
            for args, many in driver_calls(query, request):
                if many and request.mode is Mode.MANY and _raw_aiosqlite(conn):
                    raw: Any = (await conn.get_raw_connection()).driver_connection
                    async with raw.executemany(query.sql, args) as cursor:
                        changed += int(cursor.rowcount)
                else:
                    changed += _rowcount(await conn.exec_driver_sql(query.sql, args))
            request = steps.send(changed)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def fetch_rows_async(conn: AsyncConnection, stmt: Any, params: dict[str, Any]) -> list[Any]:
    """fetch_rows on an AsyncConnection."""
    query = compiled(stmt, conn.dialect)
    args = query.args(params)
    if _raw_aiosqlite(conn):
        raw: Any = (await conn.get_raw_connection()).driver_connection
        return list(await raw.execute_fetchall(query.sql, args))
    return list((await conn.exec_driver_sql(query.sql, args)).all())


def listened(engine: AsyncEngine) -> bool:
    """instrumented() before any connection is taken: a cursor listener on the engine (or a view's parent
    engine, or the Engine class), or the engine echoes."""
    sync_engine = engine.sync_engine
    return _cursor_listeners(sync_engine.dispatch) or sync_engine._should_log_info()


def _rowcount(result: Any) -> int:
    rowcount = int(result.rowcount)
    result.close()  # a SELECT among a write's statements (PostgreSQL's set_config) has rows nobody reads
    return rowcount
