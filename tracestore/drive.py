"""How the requests of a plan (tracestore.core) meet a SQLAlchemy Connection, for both stores and the ORM helpers.

Two ways to the database: straight to the pooled DBAPI cursor (SQLAlchemy's result and event machinery
cost more than a small read or write), or through `Connection.exec_driver_sql` whenever someone listens
to the engine's cursor events or echoes its SQL (OpenTelemetry's and Sentry's SQLAlchemy integrations
listen there), so that instrumentation sees every statement the store runs.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

from sqlalchemy import Connection

from tracestore.core import Execute, driver_calls
from tracestore.queries import compiled

T = TypeVar("T")


def instrumented(conn: Connection) -> bool:
    """Whether statements on `conn` must go through SQLAlchemy: a cursor listener is registered (on the
    connection, its engine, a parent engine of an engine view, or the Engine class), or the engine echoes.

    Checked on every call, so a listener registered after the store opened is honoured from then on.
    """
    dispatch = conn.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute) or bool(conn._echo)


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
                    changed += int(conn.exec_driver_sql(query.sql, args).rowcount)
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
        return list(conn.exec_driver_sql(query.sql, args).tuples())
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(query.sql, args)
        return list(cursor.fetchall())
    finally:
        cursor.close()
