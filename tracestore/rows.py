"""Translation between TraceContext values and statement parameters / result rows (shared by both stores)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from tracestore.errors import InvalidQueryError, InvalidTraceError, StorageError
from tracestore.queries import TRACE_COLUMNS, Statements
from tracestore.types import TraceContext, encode_json, refuse_nul_text

_loads = orjson.loads
_CREATED_AT = TRACE_COLUMNS.index("created_at")


class WriteBatch:
    """The rows of one write transaction, built (and so validated) before touching the database.

    `traces`: one row per distinct id, in queries.TRACE_COLUMNS order; `links`: one row per
    (trace, session), in queries.LINK_COLUMNS order. Tuples, not dicts: they go to the driver as they are.
    """

    __slots__ = ("links", "traces")

    def __init__(self, traces: Iterable[TraceContext]) -> None:
        try:
            items = iter(traces)
        except TypeError:
            items = None
        if items is None:
            raise InvalidTraceError(f"store_batch needs an iterable of TraceContext, got {type(traces).__name__}")
        rows: list[tuple[Any, ...]] = []
        links: list[tuple[str, str, float]] = []
        seen: set[str] = set()
        given: list[TraceContext] = []
        for trace in items:
            if not isinstance(trace, TraceContext):
                raise InvalidTraceError(f"expected a TraceContext, got {type(trace).__name__}")
            trace.validate()  # fields may have been reassigned since construction
            given.append(trace)
            trace_id, created_at = trace.id, trace.created_at
            rows.append(
                (
                    trace_id,
                    trace.context_type,
                    trace.namespace,
                    encode_json(trace.data, "data", trace_id),
                    encode_json(trace.metadata, "metadata", trace_id),
                    created_at,
                    trace.updated_at,
                )
            )
            if trace_id in seen:
                continue  # merged below, once every entry is known to encode
            seen.add(trace_id)
            for uid in trace.session_uids:  # sorted and unique (validate)
                links.append((trace_id, uid, created_at))
        if len(seen) != len(rows):
            rows, links = _merged(given, rows)
        self.traces: list[tuple[Any, ...]] = rows
        self.links: list[tuple[str, str, float]] = links


def _merged(
    given: list[TraceContext], rows: list[tuple[Any, ...]]
) -> tuple[list[tuple[Any, ...]], list[tuple[str, str, float]]]:
    """The rows of a batch holding an id more than once, as that many store() calls would leave them: the
    last entry's fields win and the sessions add up, all stamped with the final created_at."""
    last: dict[str, tuple[Any, ...]] = {}
    sessions: dict[str, set[str]] = {}
    for trace, row in zip(given, rows, strict=True):
        last[trace.id] = row
        sessions.setdefault(trace.id, set()).update(trace.session_uids)
    links = [(trace_id, uid, row[_CREATED_AT]) for trace_id, row in last.items() for uid in sorted(sessions[trace_id])]
    return list(last.values()), links


def refuse_nul(batch: WriteBatch) -> None:
    """PostgreSQL's text cannot hold NUL (SQLite's can): one clear error before the database is touched.

    The write statements bind arrays in binary, where the server's own refusal would not name the trace.
    """
    for row in batch.traces:
        for name, value in zip(TRACE_COLUMNS[:3], row, strict=False):  # id, context_type, namespace
            refuse_nul_text(value, name, row[0])
    for trace_id, uid, _ in batch.links:
        refuse_nul_text(uid, "session uid", trace_id)


def refuse_nul_arguments(statements: Statements, params: dict[str, Any]) -> None:
    """PostgreSQL's text cannot hold NUL, so no stored value has one: say so as bad input (InvalidQueryError)
    instead of the driver's error surfacing as a StorageError. SQLite stores and matches NUL."""
    if statements.rules.text_holds_nul:
        return
    for name, value in params.items():
        if isinstance(value, str) and "\x00" in value:
            shown_name = "the cursor's trace id" if name == "after_trace_id" else name.rstrip("_0123456789")
            raise InvalidQueryError(f"{shown_name} contains NUL, which PostgreSQL text cannot hold: {value!r}")


def decode_row(row: Sequence[Any]) -> TraceContext:
    """A result row of any trace-returning statement (see queries._trace_columns) as a TraceContext."""
    return decode_rows((row,))[0]


def decode_rows(rows: Iterable[Sequence[Any]]) -> list[TraceContext]:
    """Result rows as TraceContexts: the hot loop of every read, so one flat loop with no calls per row
    beyond the JSON decoding (this loop is ~a quarter of a 1,000-row window read)."""
    loads, new, cls = _loads, object.__new__, TraceContext
    traces = []
    try:
        for trace_id, context_type, namespace, data, metadata, created_at, updated_at, sessions in rows:
            trace = new(cls)
            trace.id = trace_id
            trace.context_type = context_type
            trace.namespace = namespace
            trace.data = loads(data)
            trace.metadata = loads(metadata) if metadata is not None else {}
            trace.created_at = created_at
            trace.updated_at = updated_at
            # Rows the store wrote are already validated: no TraceContext.__post_init__ checks here.
            trace.session_uids = tuple(sorted(loads(sessions))) if sessions is not None else ()
            traces.append(trace)
    except orjson.JSONDecodeError as exc:
        raise StorageError(f"trace {trace_id!r} holds invalid JSON: {exc}") from exc
    return traces
