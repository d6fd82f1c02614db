"""What an application runs with its own Session or AsyncSession: the session query as ORM selects of `Trace`
entities (`recent_traces`, `recent_traces_page`) and `add_traces`, the store's write inside the app's unit of work.

The selects are the store's own session query with `Trace` entities for columns: filtered and ordered on the
junction's copy of created_at, so they walk idx_trace_sessions_uid_time and stop after `limit` entries. Run them
through a Session (not a bare Connection): importing this module registers one `do_orm_execute` listener on
the Session class, which leaves every statement but these alone and, while a database's backfill is unfinished
(between revision 0002 and head), points them at the trace's own created_at, as the store does; it refuses
a database older than that.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Generator, Iterable, Sequence
from functools import cache
from typing import Any, cast, overload

from sqlalchemy import Engine, Select, Table, bindparam, event, select, tuple_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.sql import visitors

from tracestore.core import StoreCore, Write, session_query
from tracestore.drive import execute_steps
from tracestore.errors import InvalidQueryError, SchemaOutOfDateError, storage_error
from tracestore.migrate import MIGRATING_READS_FROM, head_revision, is_at_least, revision_in
from tracestore.models import Trace, TraceSession
from tracestore.queries import Shape, statements_for
from tracestore.rows import refuse_nul_arguments
from tracestore.types import PageCursor, TraceContext, check_cursor, check_limit

__all__ = ["add_traces", "next_page_cursor", "recent_traces", "recent_traces_page"]

# The junction as these selects name it. One object for all of them, so that the listener can find its
# created_at in a statement the application has added to (options, filters) and swap it.
_LINKS = cast(Table, TraceSession.__table__).alias("ts")
_TRACES = cast(Table, Trace.__table__)
# The execution option that marks a select of this module; its value: the (name, value) of its parameters.
_SESSION_READ = "tracestore_session_read"


def recent_traces(
    session_uid: str,
    *,
    since: float | None = None,
    until: float | None = None,
    limit: int | None = None,
    namespace: str | None = None,
    context_type: str | None = None,
) -> Select[Trace]:
    """A select of the session's traces as `Trace` entities, newest first (created_at, then id, descending).

    The filters are the store's (`TraceStore.get_by_session_uid` / `query`): `since` inclusive, `until`
    exclusive (epoch seconds), at most `limit`; `namespace` and `context_type` must match. Bad arguments raise
    InvalidQueryError here. Run it with `session.scalars(...)`; add `.options(selectinload(Trace.sessions))`
    to load every trace's links in one more query.
    """
    query = session_query(session_uid, since, limit, until=until, namespace=namespace, context_type=context_type)
    return _with_values(_statement(Shape.of(query), after=False), query.params())


def recent_traces_page(
    session_uid: str, *, since: float | None = None, limit: int = 100, cursor: PageCursor | None = None
) -> Select[Trace]:
    """One page of the session's traces, newest first, strictly after `cursor` (keyset pagination on
    (created_at, id)): `TraceStore.page_by_session_uid`'s page as a select of `Trace` entities.

    The first page has no cursor; `next_page_cursor(page, limit=limit)` gives the next one's (None after the
    last page). A page costs the same wherever it starts, and traces stored between two pages are neither
    skipped nor repeated.
    """
    query = session_query(session_uid, since, _page_limit(limit))
    params = query.params()
    check_cursor(cursor)
    if cursor is not None:
        params.update(after_created_at=float(cursor.created_at), after_trace_id=cursor.trace_id)
    return _with_values(_statement(Shape.of(query), after=cursor is not None), params)


def next_page_cursor(traces: Sequence[Trace], *, limit: int) -> PageCursor | None:
    """The cursor of the page after `traces` (a page `recent_traces_page(..., limit=limit)` returned), or None
    when it was the last page: fewer traces than `limit`."""
    if len(traces) < _page_limit(limit):
        return None
    last = traces[-1]
    return PageCursor(last.created_at, last.id)


def _page_limit(limit: object) -> int:
    if limit is None:
        raise InvalidQueryError("a page needs a limit")
    return check_limit(limit)


def _with_values(stmt: Select[Trace], params: dict[str, Any]) -> Select[Trace]:
    # A copy of the shape's statement with its parameters' values: building the select anew (ORM entity,
    # join, filters) would cost about as much as reading 100 traces.
    return stmt.params(params).execution_options(**{_SESSION_READ: tuple(params.items())})


@cache
def _statement(shape: Shape, *, after: bool) -> Select[Trace]:
    """The session query of one shape on `Trace` entities, with a parameter for each value: the filters and
    order of the store's (queries.Statements.session_traces and session_page), on the junction's copy of
    created_at, so the index serves the filter and the whole sort key."""
    time, tie = _LINKS.c.created_at, _LINKS.c.trace_id
    filters = [_LINKS.c.session_uid == bindparam("session_uid"), time.is_not(None)]
    if shape.since:
        filters.append(time >= bindparam("since"))
    if shape.until:
        filters.append(time < bindparam("until"))
    if shape.namespace:
        filters.append(_TRACES.c.namespace == bindparam("namespace"))
    if shape.context_type:
        filters.append(_TRACES.c.context_type == bindparam("context_type"))
    if after:
        filters.append(tuple_(time, tie) < tuple_(bindparam("after_created_at"), bindparam("after_trace_id")))
    stmt = (
        select(Trace)
        .select_from(_LINKS)
        .join(Trace, _TRACES.c.id == tie)
        .where(*filters)
        .order_by(time.desc(), tie.desc())
    )
    return stmt.limit(bindparam("limit")) if shape.limit else stmt


# -- while a backfill is unfinished --------------------------------------------------------------------------------
# Engines whose database was found at head: a database does not go back, so it is asked once per engine.
_AT_HEAD: weakref.WeakSet[Engine] = weakref.WeakSet()


@event.listens_for(Session, "do_orm_execute")
def _read_as_the_store_does(state: ORMExecuteState) -> None:
    marked = state.execution_options.get(_SESSION_READ)
    if marked is None:
        return  # every other statement of the application: nothing to do
    connection = state.session.connection(bind_arguments=state.bind_arguments)
    refuse_nul_arguments(statements_for(connection.dialect.name), dict(marked))
    engine = connection.engine
    if engine in _AT_HEAD:
        return
    revision = revision_in(connection)
    if revision == head_revision():
        _AT_HEAD.add(engine)
        return
    if revision is None or not is_at_least(revision, MIGRATING_READS_FROM):
        raise SchemaOutOfDateError(
            f"database is at revision {revision or 'none (legacy or empty)'}, tracestore.orm needs "
            f"{MIGRATING_READS_FROM} or later (head: {head_revision()}): run `tracestore upgrade` first"
        )
    # Links the backfill has not reached have no copy of the time yet: filter and sort on the trace's own
    # (the legacy join; the join condition keeps ts.trace_id equal to traces.id, so the tie-break holds).
    swapped = visitors.replacement_traverse(cast(Select[Any], state.statement), _NO_OPTIONS, _trace_time_for_link_time)
    state.statement = cast(Select[Any], swapped)


_NO_OPTIONS: dict[str, Any] = {}


def _trace_time_for_link_time(element: Any, **kw: Any) -> Any:
    return _TRACES.c.created_at if element is _LINKS.c.created_at else None


# -- writes in the application's unit of work ------------------------------------------------------------------------
@overload
def add_traces(session: AsyncSession, traces: Iterable[TraceContext]) -> Awaitable[list[str]]: ...
@overload
def add_traces(session: Session, traces: Iterable[TraceContext]) -> list[str]: ...
def add_traces(session: Session | AsyncSession, traces: Iterable[TraceContext]) -> list[str] | Awaitable[list[str]]:
    """Store `traces` as `TraceStore.store_batch` does (a new id is inserted, an existing one updated in place,
    its links kept and the new ones added), inside the session's transaction: committed with the application's
    own rows, gone on rollback. Returns their ids, in order, each once; with an AsyncSession, an awaitable of them.

    The session's pending changes are flushed first (when autoflush is on, as a query would), and the `Trace`
    and `TraceSession` entities of these ids it holds are expired, so they are read again when next used.
    Bad input raises InvalidTraceError before any SQL; a failed write raises StorageError, after which the
    session's transaction must be rolled back. Nothing is retried here: a database busy past the driver's own
    timeout fails the call, and the application's transaction decides what happens next.
    """
    sync_session = session.sync_session if isinstance(session, AsyncSession) else session
    dialect = sync_session.get_bind(mapper=Trace).dialect
    plan = StoreCore(statements_for(dialect.name)).store_batch(traces)
    try:
        write = cast(Write, next(plan))  # the batch is checked (InvalidTraceError) before this returns
    except StopIteration as empty:
        ids: list[str] = empty.value
        return _done(ids) if isinstance(session, AsyncSession) else ids
    if isinstance(session, AsyncSession):
        return session.run_sync(_write, plan, write)
    return _write(session, plan, write)


def _write(session: Session, plan: Generator[Any, Any, list[str]], write: Write) -> list[str]:
    if session.autoflush:
        session.flush()
    connection = session.connection(bind_arguments={"mapper": Trace})
    try:
        execute_steps(write.in_callers_transaction(), connection)
    except (SQLAlchemyError, connection.dialect.loaded_dbapi.Error) as exc:  # the fast path meets the driver's own
        raise storage_error("add_traces failed; roll the session's transaction back", exc) from exc
    ids = _result(plan)
    _expire(session, set(ids))
    return ids


def _result(plan: Generator[Any, Any, list[str]]) -> list[str]:
    """What the plan returns once its one write is done."""
    try:
        plan.send(None)
    except StopIteration as done:
        ids: list[str] = done.value
        return ids
    raise AssertionError("store_batch's plan has one write")


def _expire(session: Session, ids: set[str]) -> None:
    """Expire the session's entities of these traces (their rows and links changed behind the ORM's back),
    except those with changes of the application's own not flushed yet."""
    for state in session.identity_map.all_states():
        key, entity = state.key, state.obj()
        ours = key is not None and issubclass(key[0], Trace | TraceSession) and key[1][0] in ids
        if ours and entity is not None and not state.modified:
            session.expire(entity)


async def _done(ids: list[str]) -> list[str]:
    return ids
