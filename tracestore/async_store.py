"""The asyncio store: runs the plans of tracestore.core on an AsyncEngine, awaiting each request.

The same operations, checks, statements and decoding as TraceStore (tracestore.core writes them once);
tests/test_parity.py runs one behaviour suite on both stores.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tracestore.busy import BUSY_DEADLINE, Attempt, retry_busy_async
from tracestore.core import MIGRATING, Plan, Read, StoreCore, Write, session_query
from tracestore.dialects.sqlite_reads import ThreadedReads
from tracestore.drive import execute_steps_async, fetch_rows_async, listened
from tracestore.engine import (
    AsyncStoreEngine,
    async_tracestore_connection,
    check_connection,
    create_async_engine,
    shown,
)
from tracestore.errors import StorageError, storage_error
from tracestore.migrate import at_head, ensure_head, refuse_missing_database
from tracestore.queries import explain_statement, statements_for
from tracestore.retention import prune as retention
from tracestore.retention import upkeep as maintenance
from tracestore.tail import DEFAULT_LOOKBACK, DEFAULT_POLL_LIMIT, SessionTail
from tracestore.types import Page, PageCursor, Query, TraceContext

plan_log = logging.getLogger("tracestore.plan")
upkeep_log = logging.getLogger("tracestore.maintenance")

DEFAULT_URL = "sqlite+aiosqlite:///traces.db"
T = TypeVar("T")


class AsyncTraceStore:
    """`async with AsyncTraceStore(url_or_async_engine) as store:` — the TraceStore API, awaited.

    The schema check (and upgrade, with `auto_upgrade=True`) runs on first use or in `__aenter__`.
    The tuning arguments are TraceStore's.
    """

    def __init__(
        self,
        url_or_engine: str | AsyncEngine = DEFAULT_URL,
        *,
        auto_upgrade: bool = True,
        read_engine: str | AsyncEngine | None = None,
        retry_deadline: float = BUSY_DEADLINE,
        wal_checkpoint_bytes: int = maintenance.WAL_CHECKPOINT_BYTES,
        analyze_every: int = maintenance.STATISTICS_EVERY,
    ) -> None:
        owned = isinstance(url_or_engine, str)
        self._main = AsyncStoreEngine(
            create_async_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
        )
        engine = self._main.engine
        self._engine = engine
        self._owned = owned
        # Where reads go (see TraceStore): `read_engine`, owned when given as a URL, else the same engine.
        self._reader = self._main
        self._reader_owned = False
        if read_engine is not None:
            reader = AsyncStoreEngine(create_async_engine(read_engine) if isinstance(read_engine, str) else read_engine)
            if reader.engine.dialect.name != engine.dialect.name:  # the statements are per dialect
                if isinstance(read_engine, str):
                    reader.engine.sync_engine.dispose()
                raise StorageError(
                    f"the read engine is {reader.engine.dialect.name}, the store's is {engine.dialect.name}"
                )
            self._reader, self._reader_owned = reader, isinstance(read_engine, str)
        # Reads of a SQLite file on an engine made here skip the async pool (see ThreadedReads).
        reader_owned = self._reader_owned if read_engine is not None else owned
        self._threaded = (
            ThreadedReads(self._reader.engine) if reader_owned and ThreadedReads.usable(self._reader.engine) else None
        )
        # What a failing database call can raise: SQLAlchemy's errors; the driver's own from the raw
        # aiosqlite calls and the threaded reads (aiosqlite's errors are sqlite3's); and asyncpg's socket
        # errors (OSError: refused, no such socket, reset), which SQLAlchemy does not wrap.
        self._failures: tuple[type[BaseException], ...] = (
            SQLAlchemyError,
            OSError,
            engine.dialect.loaded_dbapi.Error,
            self._reader.engine.dialect.loaded_dbapi.Error,
        )
        self._core = StoreCore(statements_for(engine.dialect.name))
        self._retry_deadline = retry_deadline
        self._upkeep = maintenance.Upkeep.for_engine(
            engine.sync_engine, wal_limit=wal_checkpoint_bytes, statistics_every=analyze_every
        )
        self._checkpointer = maintenance.Checkpointer.for_store(self, self._upkeep, owned=owned)
        self._auto_upgrade = auto_upgrade
        self._ready = False
        self._migrating = False
        self._opening = asyncio.Lock()

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def read_engine(self) -> AsyncEngine:
        """The engine reads go to: `read_engine` if one was given, else `engine`."""
        return self._reader.engine

    async def _open(self) -> None:
        """Check (or upgrade) the schema once: on `async with` or the first operation (__init__ cannot await)."""
        async with self._opening:
            if self._ready:
                return
            try:
                refuse_missing_database(self._engine.url, auto_upgrade=self._auto_upgrade)
                async with async_tracestore_connection(self._engine) as conn:
                    # True while an upgrade is unfinished (see migrate.ensure_head): session queries
                    # then use the legacy join, which does not depend on the backfilled copy.
                    self._migrating = await conn.run_sync(
                        lambda sync_conn: ensure_head(sync_conn, auto_upgrade=self._auto_upgrade)
                    )
                if self._reader is not self._main and not self._migrating:
                    # A replica replays the upgrade after the primary: until its own revision is head
                    # it gets the legacy join too, which returns the same rows at any revision.
                    await self._still_migrating()
            except self._failures as exc:
                raise self._error(f"cannot open {shown(self._engine.url)}", exc) from exc
            self._ready = True

    # -- writes -----------------------------------------------------------------------------------
    def refusal(self, trace: TraceContext) -> str | None:
        """Why store_batch would refuse `trace` (InvalidTraceError, nothing written), or None: lets a caller leave
        out the traces refused on their own and store the others in one transaction."""
        return self._core.refusal(trace)

    async def store(self, trace: TraceContext, *, connection: AsyncConnection | None = None) -> str:
        """Insert a trace, or update it in place; its id (see TraceStore.store)."""
        return (await self._write_plan(self._core.store_batch((trace,)), connection))[0]

    async def store_batch(self, traces: Iterable[TraceContext], *, connection: AsyncConnection | None = None) -> None:
        """Store the traces in one transaction: all of them or none (see TraceStore.store_batch).

        Cancelled (a timeout, a task group) before its COMMIT is sent, the call stores nothing: the
        transaction is rolled back or its connection discarded. Cancelled while COMMIT is in flight, the
        batch may or may not be stored and the CancelledError cannot say which; cancelled after it (the
        SQLite upkeep that follows a write), the batch is stored. Either way it is the whole batch or
        nothing, and storing the same traces again is safe: their ids are the caller's, so a trace already
        stored is updated in place (its sessions added), not duplicated.

        `connection`: an AsyncConnection of the application's; the statements run inside its transaction
        (see TraceStore.store_batch).
        """
        await self._write_plan(self._core.store_batch(traces), connection)

    async def delete(self, trace_id: str, *, connection: AsyncConnection | None = None) -> bool:
        """Delete the trace and its session links; whether it existed. Cancelled, as store_batch: nothing
        before COMMIT is sent, unknown while it is in flight; deleting again is safe. `connection`: as
        store_batch."""
        return await self._write_plan(self._core.delete(trace_id), connection)

    # -- reads ------------------------------------------------------------------------------------
    async def get(self, trace_id: str) -> TraceContext | None:
        return await self._run(self._core.get(trace_id))

    async def get_by_session_uid(
        self, session_uid: str, *, since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """The session's traces with created_at >= since, newest first (see TraceStore.get_by_session_uid)."""
        return await self._run(self._core.query(session_query(session_uid, since, limit)))

    async def query(
        self,
        *,
        session_uid: str | None = None,
        namespace: str | None = None,
        context_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[TraceContext]:
        """Traces matching every given filter, newest first (see TraceStore.query)."""
        return await self._run(self._core.query(Query(session_uid, namespace, context_type, since, until, limit)))

    async def get_by_session_uids(
        self, session_uids: Sequence[str], *, since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """Traces of any of the sessions with created_at >= since, newest first, each trace once."""
        return await self._run(self._core.sessions(session_uids, since=since, limit=limit))

    async def page_by_session_uid(
        self, session_uid: str, *, since: float | None = None, limit: int = 100, cursor: PageCursor | None = None
    ) -> Page:
        """One page of the session's traces, newest first; pass `next_cursor` back for the next one."""
        return await self._run(self._core.page(session_uid, since=since, limit=limit, cursor=cursor))

    async def iter_session(
        self, session_uid: str, *, since: float | None = None, page_size: int = 1000
    ) -> AsyncIterator[TraceContext]:
        """Every trace of the session (created_at >= since), newest first, a page at a time: bounded memory."""
        cursor: PageCursor | None = None
        while True:
            items, cursor = await self.page_by_session_uid(session_uid, since=since, limit=page_size, cursor=cursor)
            for item in items:
                yield item
            if cursor is None:
                return

    async def iter_traces(
        self,
        *,
        session_uid: str | None = None,
        since: float | None = None,
        until: float | None = None,
        page_size: int = 1000,
    ) -> AsyncIterator[TraceContext]:
        """Every trace with since <= created_at < until, of one session or of all, oldest first, a page at a
        time: bounded memory (see TraceStore.iter_traces)."""
        cursor: PageCursor | None = None
        while True:
            items, cursor = await self._run(
                self._core.scan(session_uid=session_uid, since=since, until=until, limit=page_size, cursor=cursor)
            )
            for item in items:
                yield item
            if cursor is None:
                return

    async def count_traces(
        self, *, session_uid: str | None = None, since: float | None = None, until: float | None = None
    ) -> int:
        """How many traces iter_traces(...) with the same bounds would yield now (an index-only count)."""
        return await self._run(self._core.count(session_uid=session_uid, since=since, until=until))

    def tail(
        self,
        session_uid: str,
        *,
        since: float | None = None,
        poll_interval: float = 1.0,
        lookback: float = DEFAULT_LOOKBACK,
        limit_per_poll: int = DEFAULT_POLL_LIMIT,
    ) -> AsyncIterator[list[TraceContext]]:
        """Follow the session live: one list per poll of the traces that arrived (see TraceStore.tail)."""
        follower = self._core.tail(
            session_uid, since=since, poll_interval=poll_interval, lookback=lookback, limit=limit_per_poll
        )
        return self._follow(follower, poll_interval)

    async def _follow(self, follower: SessionTail, poll_interval: float) -> AsyncIterator[list[TraceContext]]:
        while True:
            polled = await self._run(self._core.poll(follower))
            yield polled.traces
            if not polled.more:
                await asyncio.sleep(poll_interval)

    async def explain(
        self, session_uid: str, *, since: float | None = None, limit: int | None = None, **filters: Any
    ) -> list[str]:
        """The query plan of query(session_uid=..., ...), one line per plan step."""
        return await self._run(self._core.explain(session_query(session_uid, since, limit, **filters)))

    # -- running plans ------------------------------------------------------------------------------
    async def _write_plan(self, plan: Plan[T], connection: AsyncConnection | None) -> T:
        if connection is None:
            return await self._run(plan)
        check_connection(connection, AsyncConnection, self._engine.dialect.name)
        return await self._run(plan, connection)

    async def _run(self, plan: Plan[T], connection: AsyncConnection | None = None) -> T:
        """Answer each request of a plan (tracestore.core) until it returns; the plan's own checks run before
        the database is opened."""
        try:
            request = next(plan)
            if not self._ready:
                await self._open()
            while True:
                if isinstance(request, Read):
                    answer: Any = await self._read(request)
                elif request is MIGRATING:
                    answer = self._migrating and await self._still_migrating()
                elif connection is not None:
                    answer = await self._write_in(connection, request)
                else:
                    answer = await self._write(request)
                request = plan.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _write(self, write: Write) -> Any:
        """One write transaction, retried while the database is busy, then the writer's upkeep."""
        result = await retry_busy_async(
            lambda attempt: self._transaction(write, attempt), what=write.what, deadline=self._retry_deadline
        )
        await self._after_write()
        return result

    async def _transaction(self, write: Write, attempt: Attempt) -> Any:
        """One try of a write transaction: its statements (tracestore.drive), then COMMIT."""
        try:
            async with self._main.transaction() as conn:
                result = await execute_steps_async(write.steps(), conn)
                attempt.committing()
            return result
        except self._failures as exc:
            raise self._error(write.failed_at_commit if attempt.at_commit else write.failed, exc) from exc

    async def _write_in(self, connection: AsyncConnection, write: Write) -> Any:
        """A write inside the caller's transaction: once, never committed here."""
        if not connection.in_transaction():
            await connection.begin()  # what SQLAlchemy's autobegin does; the raw path would bypass it
        try:
            return await execute_steps_async(write.in_callers_transaction(), connection)
        except self._failures as exc:
            raise self._error(write.failed_inside, exc) from exc

    async def _after_write(self) -> None:
        """The writer's SQLite upkeep after a committed write (see TraceStore._after_write).

        A cancellation may cut it short: the write has committed anyway, and an upkeep left undone is
        due again after the next write (see _run_upkeep for the connection it ran on).
        """
        if self._checkpointer is not None:
            self._checkpointer.wrote()
        job = self._upkeep.due() if self._upkeep is not None else None
        if job is not None:
            await self._run_upkeep(job)

    async def _run_upkeep(self, job: maintenance.Job) -> None:
        """Run an upkeep job on a pooled connection; a failure is logged, as Upkeep.run does (nothing to undo)."""
        assert self._upkeep is not None
        lock = self._checkpointer.running if self._checkpointer is not None and job == "checkpoint" else None
        if lock is not None and not lock.acquire(blocking=False):
            return  # the checkpointer thread is copying the WAL back right now: due again after the next write
        try:
            async with self._engine.connect() as conn:
                try:
                    await conn.run_sync(self._upkeep.run, job)
                except asyncio.CancelledError:
                    # aiosqlite finishes the statement in flight in its thread all the same, so a checkpoint
                    # cut off there leaves its short busy_timeout behind: close the connection, do not pool it.
                    await conn.invalidate()
                    raise
        except self._failures as exc:
            upkeep_log.warning("SQLite %s failed (the write itself committed): %s", job, exc)
        finally:
            if lock is not None:
                lock.release()

    async def _read(self, read: Read) -> list[Any]:
        planned = read.explain or plan_log.isEnabledFor(logging.DEBUG)
        try:
            if self._threaded is not None and not planned and not listened(self._reader.read):
                return await self._threaded.fetch_rows(read.stmt, read.params, self._reader.engine.dialect)
            async with self._reader.read.connect() as conn:
                if planned:
                    lines = await _plan(conn, read.stmt, read.params)
                    if read.explain:
                        return lines
                    plan_log.debug("plan:\n  %s", "\n  ".join(str(line[-1]) for line in lines))
                return await fetch_rows_async(conn, read.stmt, read.params)
        except self._failures as exc:
            raise self._error("explain failed" if read.explain else "query failed", exc, self._reader.engine) from exc

    async def _still_migrating(self) -> bool:
        """Re-read the revision where reads go; once it reached head, switch to the fast query for good."""
        try:
            async with self._reader.engine.connect() as conn:
                self._migrating = not await conn.run_sync(at_head)
        except self._failures as exc:
            raise self._error("cannot read the schema revision", exc, self._reader.engine) from exc
        return self._migrating

    def _error(self, action: str, exc: BaseException, engine: AsyncEngine | None = None) -> StorageError:
        """The StorageError for a failed database call: what failed and the driver's reason. asyncpg's socket
        errors name neither the server nor their kind ('[Errno 2] No such file or directory'), so those do."""
        if isinstance(exc, OSError):
            url = shown((engine or self._engine).url)
            return StorageError(f"{action}: the connection to {url} failed ({type(exc).__name__}: {exc})")
        return storage_error(action, exc)

    # -- lifecycle --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Dispose of the engines the store created (an engine passed in stays the caller's), even when
        cancelled or when the database is gone: connections the server dropped are discarded, not raised."""
        try:
            if self._checkpointer is not None:
                await asyncio.to_thread(self._checkpointer.close)
            if self._upkeep is not None and self._upkeep.writes:  # statistics for the next opener (maintenance)
                await self._run_upkeep("statistics")
        finally:
            try:
                if self._threaded is not None:
                    await self._threaded.dispose()
            finally:
                if self._owned:
                    await self._engine.dispose()
            if self._reader_owned:
                await self._reader.engine.dispose()

    async def __aenter__(self) -> AsyncTraceStore:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- retention --------------------------------------------------------------------------------
    async def prune(
        self,
        older_than: float | datetime | timedelta,
        *,
        batch_size: int = retention.DEFAULT_BATCH_SIZE,
        on_progress: retention.OnProgress | None = None,
        vacuum: bool = False,
        dry_run: bool = False,
    ) -> retention.PruneReport:
        """Delete every trace with created_at < the cutoff, oldest first in batches (see TraceStore.prune).

        Cancelled, the batches committed before stay deleted and the one in progress is rolled back (or,
        with its COMMIT in flight, may have committed): running prune again finishes the job.
        """
        request = retention.prune_request(older_than, batch_size=batch_size, vacuum=vacuum, dry_run=dry_run)
        if not self._ready:
            await self._open()
        return await retention.run_async(self._main, request, on_progress, retry_deadline=self._retry_deadline)


async def _plan(conn: AsyncConnection, stmt: Any, params: dict[str, Any]) -> list[Any]:
    """The planner's rows for a statement (EXPLAIN QUERY PLAN on SQLite, EXPLAIN elsewhere)."""
    sql, driver_params = explain_statement(stmt, params, conn.dialect)
    return list((await conn.exec_driver_sql(sql, driver_params)).all())
