"""Brute-force oracles for the query semantics: plain Python over values, plain SQL over the raw tables.

Neither uses tracestore's statements, indexes or the denormalized `trace_sessions.created_at`, so a
disagreement with the store points at the store (or at a stale junction row).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tracestore import TraceContext


def make_trace(**overrides: Any) -> TraceContext:
    """A valid trace; tests override only the fields they are about."""
    fields: dict[str, Any] = {"context_type": "span", "namespace": "web", "data": {"k": 1}}
    fields.update(overrides)
    return TraceContext(**fields)


def oracle_query(
    traces: Iterable[TraceContext],
    *,
    session_uid: str | None = None,
    namespace: str | None = None,
    context_type: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
) -> list[TraceContext]:
    """What query() must return: AND of the filters, newest first, ties by id descending, then the limit."""
    matching = [
        trace
        for trace in traces
        if (session_uid is None or session_uid in trace.session_uids)
        and (namespace is None or trace.namespace == namespace)
        and (context_type is None or trace.context_type == context_type)
        and (since is None or trace.created_at >= since)
        and (until is None or trace.created_at < until)
    ]
    # Python compares str by code point, SQLite's BINARY collation by UTF-8 bytes: the same order.
    matching.sort(key=lambda trace: (trace.created_at, trace.id), reverse=True)
    return matching if limit is None else matching[:limit]


def merge_restore(existing: TraceContext | None, new: TraceContext) -> TraceContext:
    """The stored value after store(new) when `existing` was stored before: fields replaced, sessions added."""
    if existing is None:
        return new
    return TraceContext(
        context_type=new.context_type,
        namespace=new.namespace,
        data=new.data,
        metadata=new.metadata,
        session_uids=(*existing.session_uids, *new.session_uids),
        created_at=new.created_at,
        updated_at=new.updated_at,
        id=new.id,
    )


def connect(path: Path | str) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def sql_oracle_query(
    path: Path | str,
    *,
    session_uid: str | None = None,
    namespace: str | None = None,
    context_type: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
) -> list[TraceContext]:
    """The same question in plain SQL over the raw tables, sorted on traces.created_at (never the junction copy)."""
    clauses: list[str] = []
    params: list[Any] = []
    if session_uid is not None:
        clauses.append("EXISTS (SELECT 1 FROM trace_sessions s WHERE s.trace_id = t.id AND s.session_uid = ?)")
        params.append(session_uid)
    for column, value in (("namespace", namespace), ("context_type", context_type)):
        if value is not None:
            clauses.append(f"t.{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("t.created_at >= ?")
        params.append(since)
    if until is not None:
        clauses.append("t.created_at < ?")
        params.append(until)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    sql = (
        "SELECT t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at "
        f"FROM traces t NOT INDEXED {where} ORDER BY t.created_at DESC, t.id DESC LIMIT ?"
    )
    params.append(-1 if limit is None else limit)
    connection = connect(path)
    try:
        rows = connection.execute(sql, params).fetchall()
        return [
            TraceContext(
                id=trace_id,
                context_type=ctype,
                namespace=ns,
                data=json.loads(data),
                metadata=json.loads(metadata) if metadata is not None else {},
                created_at=created,
                updated_at=updated,
                session_uids=[
                    uid
                    for (uid,) in connection.execute(
                        "SELECT session_uid FROM trace_sessions WHERE trace_id = ?", (trace_id,)
                    )
                ],
            )
            for trace_id, ctype, ns, data, metadata, created, updated in rows
        ]
    finally:
        connection.close()


def junction_drift(path: Path | str) -> list[tuple[Any, ...]]:
    """Junction rows whose denormalized created_at differs from their trace's (must always be empty)."""
    connection = connect(path)
    try:
        return connection.execute(
            "SELECT s.trace_id, s.session_uid, s.created_at, t.created_at FROM trace_sessions s "
            "JOIN traces t ON t.id = s.trace_id WHERE s.created_at IS NOT t.created_at"
        ).fetchall()
    finally:
        connection.close()


def dump_db(path: Path | str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, sorted: equal dumps mean equal content."""
    connection = connect(path)
    try:
        tables = [
            name
            for (name,) in connection.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_stat%' ORDER BY name"
            )
        ]
        dump = {table: sorted(connection.execute(f'SELECT * FROM "{table}"').fetchall(), key=repr) for table in tables}
        dump["sqlite_master"] = sorted(connection.execute("SELECT * FROM sqlite_master").fetchall(), key=repr)
        return dump
    finally:
        connection.close()
