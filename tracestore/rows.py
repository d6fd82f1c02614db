"""Translation between TraceContext values and statement parameters / result rows (shared by both stores)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import Select

from tracestore.errors import InvalidQueryError, InvalidTraceError, StorageError
from tracestore.errors import storage_error as storage_error  # re-exported for the stores
from tracestore.queries import TRACE_COLUMNS, Statements, query_statement
from tracestore.types import Page, PageCursor, TraceContext, check_identifier

_loads = orjson.loads
_CREATED_AT = TRACE_COLUMNS.index("created_at")


class WriteBatch:
    """The rows of one write transaction, built (and so validated) before touching the database.

    `traces`: one row per distinct id, in queries.TRACE_COLUMNS order; `links`: one row per
    (trace, session), in queries.LINK_COLUMNS order. Tuples, not dicts: they go to the driver as they are.
    """

    __slots__ = ("links", "traces")

    def __init__(self, traces: Iterable[TraceContext]) -> None:
        # The same id twice in one batch behaves like two store() calls: the last one's fields win
        # and the sessions add up, all stamped with the final created_at.
        rows: dict[str, tuple[Any, ...]] = {}
        sessions: dict[str, tuple[str, ...]] = {}
        try:
            items = iter(traces)
        except TypeError:
            items = None
        if items is None:
            raise InvalidTraceError(f"store_batch needs an iterable of TraceContext, got {type(traces).__name__}")
        for trace in items:
            if not isinstance(trace, TraceContext):
                raise InvalidTraceError(f"expected a TraceContext, got {type(trace).__name__}")
            trace.validate()  # fields may have been reassigned since construction
            trace_id = trace.id
            # Encoded before de-duplication, so a bad entry fails even when a later one shares its id.
            rows[trace_id] = (
                trace_id,
                trace.context_type,
                trace.namespace,
                _dumps("data", trace),
                _dumps("metadata", trace),
                trace.created_at,
                trace.updated_at,
            )
            uids = trace.session_uids  # sorted and unique (validate)
            if trace_id in sessions:
                uids = tuple(sorted({*sessions[trace_id], *uids}))
            sessions[trace_id] = uids
        self.traces: list[tuple[Any, ...]] = list(rows.values())
        self.links: list[tuple[str, str, float]] = [
            (trace_id, uid, row[_CREATED_AT]) for trace_id, row in rows.items() for uid in sessions[trace_id]
        ]


def refuse_nul(batch: WriteBatch) -> None:
    """PostgreSQL's text cannot hold NUL (SQLite's can): one clear error before the database is touched.

    Payloads never carry one (JSON text escapes it); identifiers can. The write statements bind arrays
    in binary, where the server's own refusal only says "invalid byte sequence for encoding UTF8: 0x00".
    """
    for row in batch.traces:
        for name, value in zip(TRACE_COLUMNS[:3], row, strict=False):  # id, context_type, namespace
            if "\x00" in value:
                raise InvalidTraceError(f"trace {row[0]!r}: {name} contains NUL, which PostgreSQL text cannot store")
    for trace_id, uid, _ in batch.links:
        if "\x00" in uid:
            raise InvalidTraceError(
                f"trace {trace_id!r}: session uid {uid!r} contains NUL, which PostgreSQL cannot store"
            )


def refuse_nul_arguments(statements: Statements, params: dict[str, Any]) -> None:
    """PostgreSQL's text cannot hold NUL, so no stored value has one: say so as bad input (InvalidQueryError)
    instead of the driver's error surfacing as a StorageError. SQLite stores and matches NUL."""
    if statements.dialect_name != "postgresql":
        return
    for name, value in params.items():
        if isinstance(value, str) and "\x00" in value:
            shown_name = "the cursor's trace id" if name == "after_trace_id" else name.rstrip("_0123456789")
            raise InvalidQueryError(f"{shown_name} contains NUL, which PostgreSQL text cannot hold: {value!r}")


def _dumps(field_name: str, trace: TraceContext) -> str:
    value = getattr(trace, field_name)
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidTraceError(f"trace {trace.id!r}: {field_name} is not JSON-serializable: {exc}") from exc
    # orjson quietly turns NaN/inf into null, datetimes/UUIDs into strings, tuples into lists, dataclasses
    # into dicts: refuse what would not come back equal, so get(t.id) == t always holds.
    if _loads(encoded) != value:
        raise InvalidTraceError(
            f"trace {trace.id!r}: {field_name} would not survive a JSON round trip "
            "(NaN/inf, tuples, datetimes, UUIDs or other non-JSON values); convert it to plain JSON types"
        )
    return encoded.decode()


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


def check_query_args(
    *,
    session_uid: str | None,
    namespace: str | None,
    context_type: str | None,
    since: float | None,
    until: float | None,
    limit: int | None,
) -> None:
    """Refuse arguments that would silently return a wrong answer."""
    names = (("session_uid", session_uid), ("namespace", namespace), ("context_type", context_type))
    for name, value in names:
        if value is not None:
            check_query_string(name, value)
    for name, bound in (("since", since), ("until", until)):
        if bound is not None:
            try:
                valid = not isinstance(bound, bool) and isinstance(bound, int | float) and math.isfinite(bound)
            except OverflowError:  # an int beyond float range
                valid = False
            if not valid:
                raise InvalidQueryError(f"{name} must be finite epoch seconds, got {bound!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT):
        raise InvalidQueryError(f"limit must be an int between 1 and {MAX_LIMIT}, got {limit!r}")


MAX_LIMIT = 2**63 - 1  # SQLite binds LIMIT as a signed 64-bit integer


def check_query_string(name: str, value: object) -> str:
    """A non-empty str that SQLite can bind (lone surrogates cannot be encoded as UTF-8)."""
    try:
        check_identifier(name, value)
    except InvalidTraceError as exc:
        raise InvalidQueryError(str(exc)) from None
    return value  # type: ignore[return-value]


def check_trace_id(trace_id: object, statements: Statements | None = None) -> str:
    checked = check_query_string("trace_id", trace_id)
    if statements is not None:
        refuse_nul_arguments(statements, {"trace_id": checked})
    return checked


def prepare_query(
    statements: Statements,
    *,
    session_uid: str | None = None,
    namespace: str | None = None,
    context_type: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
    migrating: bool = False,
) -> tuple[Select[Any], dict[str, Any]]:
    """Validate query arguments, then pick the prebuilt statement and its parameters."""
    args: dict[str, Any] = {
        "session_uid": session_uid,
        "namespace": namespace,
        "context_type": context_type,
        "since": since,
        "until": until,
        "limit": limit,
    }
    check_query_args(**args)
    stmt, params = query_statement(statements, **args, migrating=migrating)
    refuse_nul_arguments(statements, params)
    return stmt, params


def prepare_page(
    statements: Statements,
    *,
    session_uid: str,
    since: float | None,
    limit: int,
    cursor: PageCursor | None,
    migrating: bool = False,
) -> tuple[Select[Any], dict[str, Any]]:
    """Validate page arguments, then pick the page statement and its parameters."""
    check_query_string("session_uid", session_uid)
    check_query_args(session_uid=session_uid, namespace=None, context_type=None, since=since, until=None, limit=limit)
    if limit is None:
        raise InvalidQueryError("a page needs a limit")
    if cursor is not None and not isinstance(cursor, PageCursor):
        raise InvalidQueryError(f"cursor must be a PageCursor (PageCursor.parse reads a token), got {cursor!r}")
    params: dict[str, Any] = {"session_uid": session_uid, "limit": limit}
    if since is not None:
        params["since"] = since
    if cursor is not None:
        cursor.check()
        params["after_created_at"], params["after_trace_id"] = float(cursor.created_at), cursor.trace_id
    refuse_nul_arguments(statements, params)
    stmt = statements.session_page(since=since is not None, after=cursor is not None, migrating=migrating)
    return stmt, params


# Sessions per query: each costs one index range read (at most `limit` entries), and all their candidates
# are sorted together, so this bounds one query's work whatever the caller passes.
MAX_SESSIONS = 10_000


def prepare_sessions_query(
    statements: Statements,
    *,
    session_uids: Sequence[str],
    since: float | None,
    limit: int | None,
    migrating: bool = False,
) -> tuple[Select[Any], dict[str, Any]] | None:
    """Validate a several-sessions query, then pick its statement; None when no session is asked for.

    The session ids are one parameter (Statements.list_argument), each id once: one statement per
    combination of since/limit, whatever the number of sessions.
    """
    if isinstance(session_uids, str) or not isinstance(session_uids, Sequence | set | frozenset):
        raise InvalidQueryError(f"session_uids must be a list of session ids, got {session_uids!r}")
    uids = list(dict.fromkeys(check_query_string("session_uid", uid) for uid in session_uids))
    check_query_args(session_uid=None, namespace=None, context_type=None, since=since, until=None, limit=limit)
    if len(uids) > MAX_SESSIONS:
        raise InvalidQueryError(f"at most {MAX_SESSIONS} sessions per query, got {len(uids)}")
    if not uids:
        return None
    for uid in uids:
        refuse_nul_arguments(statements, {"session_uid": uid})
    params: dict[str, Any] = {"session_uids": statements.list_argument(uids)}
    if since is not None:
        params["since"] = since
    if limit is not None:
        params["limit"] = limit
    stmt = statements.sessions_traces(since=since is not None, limit=limit is not None, migrating=migrating)
    return stmt, params


def page_of(items: list[TraceContext], limit: int) -> Page:
    """The page and, when it is full, the cursor after its last trace."""
    last = items[-1] if len(items) == limit else None
    return Page(items, PageCursor(last.created_at, last.id) if last is not None else None)
