"""Brute-force oracles for the query semantics in plain Python over values (the plain-SQL oracle over the
raw tables is tests.backends.Backend.sql_oracle_query, on either engine).

Neither uses tracestore's statements, indexes or the denormalized `trace_sessions.created_at`, so a
disagreement with the store points at the store (or at a stale junction row).
"""

from __future__ import annotations

from collections.abc import Iterable
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
