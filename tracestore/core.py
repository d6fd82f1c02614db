"""The store's logic, written once and free of I/O: what each operation checks, which statements it runs
with which parameters, how rows become values, and which writes are retried.

Every operation of the store is a plan: a generator that yields what it needs from the database and is
sent the answer back (the pattern of tracestore.tail):

* `Read(stmt, params)`: one statement, one snapshot; the driver sends back its rows (`explain=True`: the
  planner's lines for it instead);
* `MIGRATING`: whether the database is still between revision 0002 and head (the driver asks the
  database where reads go); reads then use the legacy join, which does not need the backfilled copy;
* `Write(...)`: one write transaction. Its `steps()` is itself a generator of `Execute` requests, each
  sent back the rows it changed; the driver runs them in one transaction and runs the whole transaction
  again, with a fresh `steps()`, while the database is busy (tracestore.busy), never once COMMIT began.
  Inside a transaction of the caller's (`connection=`, tracestore.orm) it runs `in_callers_transaction()`
  once instead, and commits nothing.

TraceStore and AsyncTraceStore only execute these requests, the one blocking, the other awaiting; the
plans never touch a connection. Argument errors are raised before the first request, so bad input never
reaches (or opens) the database.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sqlalchemy import Executable, Select

from tracestore.errors import InvalidQueryError, InvalidTraceError
from tracestore.queries import LINK_COLUMNS, TRACE_COLUMNS, DriverSQL, Statements, query_statement
from tracestore.rows import WriteBatch, decode_row, decode_rows, refuse_nul, refuse_nul_arguments
from tracestore.types import Page, PageCursor, Query, TraceContext, check_cursor, check_query_string

if TYPE_CHECKING:  # tracestore.tail builds on this module's Read
    from tracestore.tail import Polled, SessionTail

T = TypeVar("T")

# Sessions per several-sessions query: each costs one index range read (at most `limit` entries), and all
# their candidates are sorted together, so this bounds one query's work whatever the caller passes.
MAX_SESSIONS = 10_000


class Read(NamedTuple):
    """One statement (one snapshot) to run where reads go; sent back: its rows (or, explain: its plan lines)."""

    stmt: Executable
    params: dict[str, Any]
    explain: bool = False


class _Migrating(Enum):
    """The question "is the database still between revision 0002 and head?"; sent back: a bool."""

    MIGRATING = "migrating"


MIGRATING = _Migrating.MIGRATING


class Mode(Enum):
    """How an Execute's rows are passed: as they are (one statement), one statement per row
    (executemany), or one statement per chunk of rows with one array per column (PostgreSQL)."""

    ONE = "one"
    MANY = "many"
    ARRAYS = "arrays"


class Execute(NamedTuple):
    """One statement of a write transaction; sent back: the number of rows it changed.

    `values`: the parameters (ONE), or rows of values in `columns` order (MANY, ARRAYS).
    """

    stmt: Executable
    values: Any = None
    mode: Mode = Mode.ONE
    columns: tuple[str, ...] = ()


def driver_calls(query: DriverSQL, request: Execute) -> list[tuple[Any, bool]]:
    """How a driver runs an Execute compiled as `query`: (arguments, executemany?) per call, in order."""
    if request.mode is Mode.ONE:
        return [(query.args(request.values or {}), False)]
    if request.mode is Mode.MANY:
        return [(query.args_many(request.columns, request.values), True)]
    return [(args, False) for args in query.args_arrays(request.columns, request.values)]


@dataclass(frozen=True)
class Write:
    """One write transaction, run whole or not at all, and again while the database is busy.

    `body` makes a fresh generator of its statements for each attempt; `setup` runs first in each of the
    store's own transactions. `failed` / `failed_at_commit`: how the StorageError of a failed attempt begins
    (a COMMIT that failed is never retried: on a lost connection its outcome is unknown).
    """

    what: str
    body: Callable[[], Generator[Execute, int, Any]]
    failed: str
    failed_at_commit: str
    setup: tuple[Executable, ...] = ()
    # In a transaction of the caller's: `setup`'s settings saved before and restored after the body.
    save_setup: tuple[Executable, ...] = ()
    restore_setup: tuple[Executable, ...] = ()

    @property
    def failed_inside(self) -> str:
        """How the StorageError of this write inside a transaction of the caller's begins."""
        return f"{self.what} failed inside the caller's transaction (roll it back: it may hold part of the write)"

    def steps(self) -> Generator[Execute, int, Any]:
        """The statements of one attempt in the store's own transaction (each sent back its row count)."""
        for setup in self.setup:
            yield Execute(setup)
        return (yield from self.body())

    def in_callers_transaction(self) -> Generator[Execute, int, Any]:
        """The statements to run inside a transaction of the caller's (`connection=`, tracestore.orm.add_traces):
        the same changes, and whatever the setup changes for the transaction put back after them."""
        for setup in (*self.save_setup, *self.setup):
            yield Execute(setup)
        result = yield from self.body()
        for restore in self.restore_setup:
            yield Execute(restore)
        return result


Request = Read | _Migrating | Write
Plan = Generator[Request, Any, T]


class StoreCore:
    """The operations of a store on one dialect's statements, as plans."""

    def __init__(self, statements: Statements) -> None:
        self.sql = statements
        self._arrays = Mode.ARRAYS if statements.write_arrays else Mode.MANY

    # -- writes -------------------------------------------------------------------------------------------
    def store_batch(self, traces: Iterable[TraceContext]) -> Plan[list[str]]:
        """Store many traces in one transaction: all of them or none. Returns their ids, in order, each once."""
        batch = WriteBatch(traces)
        if not batch.traces:
            return []
        if not self.sql.rules.text_holds_nul:
            refuse_nul(batch)
        sql = self.sql
        yield Write(
            "store",
            lambda: self._write_batch(batch),
            failed="store failed, nothing of the batch was written",
            failed_at_commit="store failed at COMMIT (not retried; on a lost connection the outcome is unknown)",
            setup=sql.write_setup,
            save_setup=sql.save_write_setup,
            restore_setup=sql.restore_write_setup,
        )
        return [row[0] for row in batch.traces]

    def refusal(self, trace: TraceContext) -> str | None:
        """Why store_batch would refuse `trace` on this engine before writing anything, or None if it would not."""
        try:
            batch = WriteBatch((trace,))
            if not self.sql.rules.text_holds_nul:
                refuse_nul(batch)
        except InvalidTraceError as exc:
            return str(exc)
        return None

    def _write_batch(self, batch: WriteBatch) -> Generator[Execute, int, None]:
        sql = self.sql
        inserted = yield Execute(sql.insert_trace, batch.traces, self._arrays, TRACE_COLUMNS)
        if inserted != len(batch.traces):  # some ids exist (or the driver cannot tell): update them in place
            yield Execute(sql.upsert_trace, batch.traces, self._arrays, TRACE_COLUMNS)
        if batch.links:
            yield Execute(sql.insert_link, batch.links, self._arrays, LINK_COLUMNS)

    def delete(self, trace_id: str) -> Plan[bool]:
        """Delete a trace and its session links; whether there was such a trace.

        The links are deleted by their own statement, not left to ON DELETE CASCADE: an application's SQLite
        connection (`connection=`) may run with foreign keys off, where the cascade would not happen.
        """
        params = {"id": self.trace_id(trace_id)}

        def steps() -> Generator[Execute, int, int]:
            yield Execute(self.sql.delete_links, params)
            return (yield Execute(self.sql.delete_trace, params))

        deleted = yield Write(
            "delete",
            steps,
            failed="delete failed",
            failed_at_commit="delete failed at COMMIT (not retried; on a lost connection the outcome is unknown)",
        )
        return bool(deleted)

    # -- reads --------------------------------------------------------------------------------------------
    def get(self, trace_id: str) -> Plan[TraceContext | None]:
        rows = yield Read(self.sql.get_trace, {"id": self.trace_id(trace_id)})
        return decode_row(rows[0]) if rows else None

    def query(self, query: Query) -> Plan[list[TraceContext]]:
        """Traces matching every filter of `query`, newest first (ties: id descending)."""
        stmt, params = yield from self._query_statement(query)
        return decode_rows((yield Read(stmt, params)))

    def explain(self, query: Query) -> Plan[list[str]]:
        """The planner's lines for `query` (EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL)."""
        stmt, params = yield from self._query_statement(query)
        return [str(row[-1]) for row in (yield Read(stmt, params, explain=True))]

    def _query_statement(self, query: Query) -> Generator[Request, Any, tuple[Select[Any], dict[str, Any]]]:
        refuse_nul_arguments(self.sql, query.params())
        migrating = bool((yield MIGRATING)) if query.session_uid is not None else False
        return query_statement(self.sql, query, migrating=migrating)

    def sessions(
        self, session_uids: Sequence[str], *, since: float | None, limit: int | None
    ) -> Plan[list[TraceContext]]:
        """Traces of any of the sessions with created_at >= since, newest first, each trace once."""
        uids = self.session_list(session_uids)
        window = Query(since=since, limit=limit)
        if not uids:
            return []
        migrating = bool((yield MIGRATING))
        stmt, params = self.sessions_statement(uids, window, migrating=migrating)
        return decode_rows((yield Read(stmt, params)))

    def page(self, session_uid: str, *, since: float | None, limit: int, cursor: PageCursor | None) -> Plan[Page]:
        """One page of the session's traces, newest first, after `cursor` (keyset pagination on (created_at, id))."""
        query = self.page_query(session_uid, since=since, limit=limit, cursor=cursor)
        migrating = bool((yield MIGRATING))
        stmt, params = self.page_statement(query, cursor, migrating=migrating)
        items = decode_rows((yield Read(stmt, params)))
        last = items[-1] if len(items) == limit else None
        return Page(items, PageCursor(last.created_at, last.id) if last is not None else None)

    def scan(
        self,
        *,
        session_uid: str | None,
        since: float | None,
        until: float | None,
        limit: int,
        cursor: PageCursor | None,
    ) -> Plan[Page]:
        """One page of the traces with since <= created_at < until (of one session, or of all), oldest first
        (ties: id ascending), strictly after `cursor`: a keyset read of an index, so the last page of an export
        costs what the first one does. Its next_cursor is None after the last page."""
        query = self.scan_query(session_uid, since=since, until=until, limit=limit, cursor=cursor)
        migrating = bool((yield MIGRATING)) if session_uid is not None else False
        stmt, params = self.scan_statement(query, cursor, migrating=migrating)
        items = decode_rows((yield Read(stmt, params)))
        last = items[-1] if len(items) == limit else None
        return Page(items, PageCursor(last.created_at, last.id) if last is not None else None)

    def count(self, *, session_uid: str | None, since: float | None, until: float | None) -> Plan[int]:
        """How many traces scan() would return from the start: an index-only count, for a progress bar.

        While an upgrade is unfinished a session's links not yet backfilled are not counted.
        """
        query = Query(session_uid=session_uid, since=since, until=until)
        refuse_nul_arguments(self.sql, query.params())
        stmt = self.sql.count_traces(session=session_uid is not None, since=since is not None, until=until is not None)
        rows = yield Read(stmt, query.params())
        return int(rows[0][0])

    # -- the live tail ------------------------------------------------------------------------------------
    def tail(
        self, session_uid: str, *, since: float | None, poll_interval: float, lookback: float, limit: int
    ) -> SessionTail:
        """A live tail's state (its arguments checked); poll it with `poll`."""
        from tracestore.tail import SessionTail, check_tail_args

        check_tail_args(since=since, poll_interval=poll_interval, lookback=lookback, limit=limit)
        return SessionTail(self.sql, session_uid, since=since, lookback=lookback, limit=limit)

    def poll(self, follower: SessionTail) -> Plan[Polled]:
        """One poll of a live tail, by the clock now."""
        migrating = bool((yield MIGRATING))
        polled: Polled = yield from follower.poll(time.time(), migrating=migrating)
        return polled

    # -- argument checks and statements, also for tools that look at plans ---------------------------------
    def trace_id(self, trace_id: object) -> str:
        checked = check_query_string("trace_id", trace_id)
        refuse_nul_arguments(self.sql, {"trace_id": checked})
        return checked

    def session_list(self, session_uids: object) -> list[str]:
        """The distinct session ids of a several-sessions query, in order; InvalidQueryError for bad input."""
        if isinstance(session_uids, str) or not isinstance(session_uids, Sequence | set | frozenset):
            raise InvalidQueryError(f"session_uids must be a list of session ids, got {session_uids!r}")
        uids = list(dict.fromkeys(check_query_string("session_uid", uid) for uid in session_uids))
        if len(uids) > MAX_SESSIONS:
            raise InvalidQueryError(f"at most {MAX_SESSIONS} sessions per query, got {len(uids)}")
        for uid in uids:
            refuse_nul_arguments(self.sql, {"session_uid": uid})
        return uids

    def sessions_statement(
        self, uids: list[str], window: Query, *, migrating: bool = False
    ) -> tuple[Select[Any], dict[str, Any]]:
        """The statement of a several-sessions query: the ids are one parameter, so one statement per shape."""
        params: dict[str, Any] = {"session_uids": self.sql.list_argument(uids), **window.params()}
        shape = {"since": window.since is not None, "limit": window.limit is not None}
        return self.sql.sessions_traces(**shape, migrating=migrating), params

    def page_query(self, session_uid: str, *, since: float | None, limit: int, cursor: PageCursor | None) -> Query:
        check_query_string("session_uid", session_uid)
        if limit is None:
            raise InvalidQueryError("a page needs a limit")
        query = Query(session_uid=session_uid, since=since, limit=limit)
        self.check_cursor(cursor)
        refuse_nul_arguments(self.sql, query.params())
        return query

    def check_cursor(self, cursor: object) -> None:
        """InvalidQueryError unless `cursor` is None or a valid PageCursor this engine can match."""
        check_cursor(cursor)
        if isinstance(cursor, PageCursor):
            refuse_nul_arguments(self.sql, {"after_trace_id": cursor.trace_id})

    def page_statement(
        self, query: Query, cursor: PageCursor | None, *, migrating: bool = False
    ) -> tuple[Select[Any], dict[str, Any]]:
        params = query.params()
        if cursor is not None:
            params["after_created_at"], params["after_trace_id"] = float(cursor.created_at), cursor.trace_id
        stmt = self.sql.session_page(since=query.since is not None, after=cursor is not None, migrating=migrating)
        return stmt, params

    def scan_query(
        self,
        session_uid: str | None,
        *,
        since: float | None,
        until: float | None,
        limit: int,
        cursor: PageCursor | None,
    ) -> Query:
        if limit is None:
            raise InvalidQueryError("a page needs a limit")
        query = Query(session_uid=session_uid, since=since, until=until, limit=limit)
        self.check_cursor(cursor)
        refuse_nul_arguments(self.sql, query.params())
        return query

    def scan_statement(
        self, query: Query, cursor: PageCursor | None, *, migrating: bool = False
    ) -> tuple[Select[Any], dict[str, Any]]:
        # The first page starts after (since, ""), which sorts before every trace at `since` (ids are never
        # empty), so one statement per shape serves the first page and the next ones.
        if cursor is not None:
            after: tuple[float, str] = (float(cursor.created_at), cursor.trace_id)
        else:
            after = (-math.inf if query.since is None else query.since, "")
        params: dict[str, Any] = {"after_created_at": after[0], "after_trace_id": after[1], "limit": query.limit}
        until = query.until is not None
        if query.session_uid is None:
            if until:
                params["until"] = query.until
            return self.sql.traces_after(until=until), params
        params["session_uid"] = query.session_uid
        if until:  # (created_at, trace_id) < (until, ""): created_at < until
            params["until_created_at"], params["until_trace_id"] = query.until, ""
        return self.sql.session_after(keys_only=False, until=until, migrating=migrating), params


def session_query(session_uid: str, since: float | None, limit: int | None, **filters: Any) -> Query:
    """The Query of a one-session read: the session must be named (None would mean every session)."""
    check_query_string("session_uid", session_uid)
    return Query(session_uid=session_uid, since=since, limit=limit, **filters)


# -- the statements of the store's reads, for tools that look at them (plans, benchmarks) --------------------
def prepare_query(
    statements: Statements, *, migrating: bool = False, **filters: Any
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement and parameters query(**filters) runs; InvalidQueryError for bad filters."""
    query = Query(**filters)
    refuse_nul_arguments(statements, query.params())
    return query_statement(statements, query, migrating=migrating)


def prepare_page(
    statements: Statements,
    *,
    session_uid: str,
    since: float | None,
    limit: int,
    cursor: PageCursor | None,
    migrating: bool = False,
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement and parameters page_by_session_uid(...) runs."""
    core = StoreCore(statements)
    query = core.page_query(session_uid, since=since, limit=limit, cursor=cursor)
    return core.page_statement(query, cursor, migrating=migrating)


def prepare_scan(
    statements: Statements,
    *,
    session_uid: str | None = None,
    since: float | None = None,
    until: float | None = None,
    limit: int = 1000,
    cursor: PageCursor | None = None,
    migrating: bool = False,
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement and parameters one page of iter_traces(...) runs."""
    core = StoreCore(statements)
    query = core.scan_query(session_uid, since=since, until=until, limit=limit, cursor=cursor)
    return core.scan_statement(query, cursor, migrating=migrating)


def prepare_sessions_query(
    statements: Statements,
    *,
    session_uids: Sequence[str],
    since: float | None,
    limit: int | None,
    migrating: bool = False,
) -> tuple[Select[Any], dict[str, Any]] | None:
    """The statement and parameters get_by_session_uids(...) runs; None when no session is asked for."""
    core = StoreCore(statements)
    uids = core.session_list(session_uids)
    window = Query(since=since, limit=limit)
    return core.sessions_statement(uids, window, migrating=migrating) if uids else None
