"""The queries the store is measured against: its own SQL run with plain sqlite3 (the floor) and the legacy query."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import Dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from tracestore import TraceContext
from tracestore.queries import compiled, query_statement, statements_for
from tracestore.types import Query

SQLITE = sqlite_dialect.dialect()

# The pre-migration implementation's query (the spec's "current query"), and its latest-N variant.
LEGACY_WINDOW_SQL = (
    "SELECT t.* FROM traces t INNER JOIN trace_sessions ts ON t.id = ts.trace_id"
    " WHERE ts.session_uid = ? AND t.created_at >= ? ORDER BY t.created_at DESC"
)
LEGACY_LATEST_SQL = (
    "SELECT t.* FROM traces t INNER JOIN trace_sessions ts ON t.id = ts.trace_id"
    " WHERE ts.session_uid = ? ORDER BY t.created_at DESC LIMIT ?"
)
LEGACY_WINDOW_LIMIT_SQL = LEGACY_WINDOW_SQL + " LIMIT ?"

Row = tuple[Any, ...]


def store_sql(*, session_uid: str, since: float | None = None, limit: int | None = None) -> tuple[str, Row]:
    """The exact SQL and positional parameters the store runs for get_by_session_uid()."""
    sql, args = compiled_sql(SQLITE, session_uid=session_uid, since=since, limit=limit)
    assert isinstance(args, tuple)
    return sql, args


def compiled_sql(
    dialect: Dialect, *, session_uid: str, since: float | None = None, limit: int | None = None
) -> tuple[str, Row | dict[str, Any]]:
    """The SQL text and driver arguments of get_by_session_uid() for `dialect`, compiled as the store compiles it."""
    stmt, params = query_statement(
        statements_for(dialect.name), Query(session_uid=session_uid, since=since, limit=limit)
    )
    query = compiled(stmt, dialect)
    return query.sql, query.args(params)


def legacy_sql(*, session_uid: str, since: float | None = None, limit: int | None = None) -> tuple[str, Row]:
    """The legacy implementation's query for the same question."""
    if since is None:
        return LEGACY_LATEST_SQL, (session_uid, limit if limit is not None else -1)
    if limit is None:
        return LEGACY_WINDOW_SQL, (session_uid, since)
    return LEGACY_WINDOW_LIMIT_SQL, (session_uid, since, limit)


def raw_query(connection: sqlite3.Connection, sql: str, params: Row) -> Callable[[], list[Row]]:
    """The floor: the store's SQL, decoded column for column as the store does, into plain tuples."""
    return lambda: decode(connection.execute(sql, params).fetchall())


def decode(rows: Iterable[Sequence[Any]]) -> list[Row]:
    """Trace rows as the store decodes them (JSON columns parsed, the session list sorted), as plain tuples."""
    loads = orjson.loads
    return [
        (
            i,
            ct,
            ns,
            loads(data),
            loads(meta) if meta is not None else {},
            c,
            u,
            tuple(sorted(loads(uids))) if uids is not None else (),
        )
        for i, ct, ns, data, meta, c, u, uids in rows
    ]


def fetch_only(connection: sqlite3.Connection, sql: str, params: Row) -> Callable[[], list[Row]]:
    """Only SQLite's share of a query: execute and fetch, no decoding."""
    return lambda: connection.execute(sql, params).fetchall()


def legacy_query(connection: sqlite3.Connection, sql: str, params: Row) -> Callable[[], list[Row]]:
    """The legacy query with the same decoding; generous to legacy: it never fetched the session list."""
    return lambda: decode_legacy(connection.execute(sql, params).fetchall())


def decode_legacy(rows: Iterable[Sequence[Any]]) -> list[Row]:
    """The legacy query's rows (no session list) decoded like the store's."""
    loads = orjson.loads
    return [
        (i, ct, ns, loads(data), loads(meta) if meta is not None else {}, c, u) for i, ct, ns, data, meta, c, u in rows
    ]


def as_rows(traces: list[TraceContext]) -> list[Row]:
    return [
        (t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at, t.session_uids)
        for t in traces
    ]


def plan(connection: sqlite3.Connection, sql: str, params: Row) -> list[str]:
    return [str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
