"""The asyncio store: the same statements and decoding as TraceStore, on an AsyncEngine.

Mirrors tracestore.store method for method; tests/test_async_store.py holds the parity test.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tracestore.busy import BUSY_DEADLINE, Attempt, retry_busy_async
from tracestore.engine import WRITE, configure_async_engine, create_async_engine, read_options, shown
from tracestore.errors import StorageError
from tracestore.migrate import at_head, ensure_head
from tracestore.queries import (
    LINK_COLUMNS,
    TRACE_COLUMNS,
    DriverSQL,
    Statements,
    compiled,
    explain_statement,
    statements_for,
)
from tracestore.retention import prune as retention
from tracestore.retention import upkeep as maintenance
from tracestore.rows import (
    WriteBatch,
    check_query_args,
    check_query_string,
    check_trace_id,
    decode_row,
    decode_rows,
    page_of,
    prepare_page,
    prepare_query,
    prepare_sessions_query,
    refuse_nul,
    storage_error,
)
from tracestore.store import _refuse_missing_file
from tracestore.tail import DEFAULT_LOOKBACK, DEFAULT_POLL_LIMIT, Polled, SessionTail, check_tail_args
from tracestore.types import Page, PageCursor, TraceContext

plan_log = logging.getLogger("tracestore.plan")
upkeep_log = logging.getLogger("tracestore.maintenance")

DEFAULT_URL = "sqlite+aiosqlite:///traces.db"


class AsyncTraceStore:
    """`async with AsyncTraceStore(url_or_async_engine) as store:` — the TraceStore API, awaited.

    The schema check (and upgrade, with `auto_upgrade=True`) runs on first use or in `__aenter__`.
    """

    # Write-path tunables, as on TraceStore.
    _busy_deadline: float = BUSY_DEADLINE
    _upkeep: maintenance.Upkeep | None = None

    def __init__(
        self,
        url_or_engine: str | AsyncEngine = DEFAULT_URL,
        *,
        auto_upgrade: bool = True,
        read_engine: str | AsyncEngine | None = None,
    ) -> None:
        owned = not isinstance(url_or_engine, AsyncEngine)
        engine = (
            create_async_engine(url_or_engine)
            if isinstance(url_or_engine, str)
            else configure_async_engine(url_or_engine)
        )
        self._engine = engine
        self._owned = owned
        # Where reads go (see TraceStore): `read_engine`, owned when given as a URL, else the same engine.
        self._reader = engine
        self._reader_owned = False
        if read_engine is not None:
            self._reader_owned = isinstance(read_engine, str)
            if isinstance(read_engine, str):
                self._reader = create_async_engine(read_engine)
            else:
                self._reader = configure_async_engine(read_engine)
        # What a failing database call can raise: SQLAlchemy's errors; the driver's own from the raw
        # aiosqlite calls; and asyncpg's socket errors (OSError: refused, no such socket, reset), which
        # SQLAlchemy does not wrap.
        self._failures: tuple[type[BaseException], ...] = (
            SQLAlchemyError,
            OSError,
            engine.dialect.loaded_dbapi.Error,
            self._reader.dialect.loaded_dbapi.Error,
        )
        self._write_engine = engine.execution_options(**{WRITE: True})
        self._read_engine = self._reader.execution_options(**read_options(self._reader.dialect.name))
        self._sql: Statements = statements_for(engine.dialect.name)
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
        return self._reader

    async def _open(self) -> None:
        """Check (or upgrade) the schema once: on `async with` or the first operation (__init__ cannot await)."""
        async with self._opening:
            if self._ready:
                return
            try:
                if self._reader.dialect.name != self._engine.dialect.name:  # the statements are per dialect
                    raise StorageError(
                        f"the read engine is {self._reader.dialect.name}, the store's is {self._engine.dialect.name}"
                    )
                _refuse_missing_file(self._engine.url, auto_upgrade=self._auto_upgrade)
                async with self._engine.connect() as conn:
                    # True while an upgrade is unfinished (see migrate.ensure_head): session queries
                    # then use the legacy join, which does not depend on the backfilled copy.
                    self._migrating = await conn.run_sync(
                        lambda sync_conn: ensure_head(sync_conn, auto_upgrade=self._auto_upgrade)
                    )
                if self._reader is not self._engine and not self._migrating:
                    # A replica replays the upgrade after the primary: until its own revision is head
                    # it gets the legacy join too, which returns the same rows at any revision.
                    await self._still_migrating()
            except self._failures as exc:
                raise self._error(f"cannot open {shown(self._engine.url)}", exc) from exc
            self._ready = True

    # -- writes -----------------------------------------------------------------------------------
    async def store(self, trace: TraceContext) -> None:
        await self.store_batch((trace,))

    async def store_batch(self, traces: Iterable[TraceContext]) -> None:
        """Store the traces in one transaction: all of them or none (see TraceStore.store_batch).

        Cancelled (a timeout, a task group) before its COMMIT is sent, the call stores nothing: the
        transaction is rolled back or its connection discarded. Cancelled while COMMIT is in flight, the
        batch may or may not be stored and the CancelledError cannot say which; cancelled after it (the
        SQLite upkeep that follows a write), the batch is stored. Either way it is the whole batch or
        nothing, and storing the same traces again is safe: their ids are the caller's, so a trace already
        stored is updated in place (its sessions added), not duplicated.
        """
        batch = WriteBatch(traces)
        if not batch.traces:
            return
        if self._sql.dialect_name == "postgresql":
            refuse_nul(batch)
        if not self._ready:
            await self._open()
        await retry_busy_async(
            lambda attempt: self._write_batch(batch, attempt), what="store", deadline=self._busy_deadline
        )
        await self._after_write()

    async def _write_batch(self, batch: WriteBatch, attempt: Attempt) -> None:
        """One try of store_batch's transaction (retry_busy_async runs it again while the database is locked)."""
        insert, upsert, link = (self._driver_sql(stmt) for stmt in self._sql.write_statements)
        try:
            async with self._write_engine.begin() as conn:
                for setup in self._sql.write_setup:
                    await conn.exec_driver_sql(self._driver_sql(setup).sql)
                inserted = await self._write(conn, insert, TRACE_COLUMNS, batch.traces)
                if inserted != len(batch.traces):  # some ids exist (or the driver cannot tell)
                    await self._write(conn, upsert, TRACE_COLUMNS, batch.traces)
                if batch.links:
                    await self._write(conn, link, LINK_COLUMNS, batch.links)
                attempt.committing()
        except self._failures as exc:
            if attempt.at_commit:
                raise self._error(
                    "store failed at COMMIT (not retried; on a lost connection the outcome is unknown)", exc
                ) from exc
            raise self._error("store failed, nothing of the batch was written", exc) from exc

    async def delete(self, trace_id: str) -> bool:
        """Delete the trace and its session links; whether it existed. Cancelled, as store_batch: nothing
        before COMMIT is sent, unknown while it is in flight; deleting again is safe."""
        query = self._driver_sql(self._sql.delete_trace)
        args = query.args({"id": check_trace_id(trace_id, self._sql)})
        if not self._ready:
            await self._open()
        deleted = await retry_busy_async(
            lambda attempt: self._delete(query, args, attempt), what="delete", deadline=self._busy_deadline
        )
        await self._after_write()
        return deleted

    async def _delete(self, query: DriverSQL, args: Any, attempt: Attempt) -> bool:
        """One try of delete's transaction; a COMMIT that failed is not retried (its count would be wrong)."""
        try:
            async with self._write_engine.begin() as conn:
                deleted = bool((await conn.exec_driver_sql(query.sql, args)).rowcount)
                attempt.committing()
            return deleted
        except self._failures as exc:
            if attempt.at_commit:
                raise self._error("delete failed at COMMIT (on a lost connection the outcome is unknown)", exc) from exc
            raise self._error("delete failed", exc) from exc

    async def _after_write(self) -> None:
        """The writer's SQLite upkeep after a committed write (see TraceStore._after_write).

        A cancellation may cut it short: the write has committed anyway, and an upkeep left undone is
        due again after the next write (see _run_upkeep for the connection it ran on).
        """
        upkeep = self._upkeep = self._upkeep or maintenance.Upkeep.for_engine(self._engine.sync_engine)
        job = upkeep.due() if upkeep is not None else None
        if job is not None:
            await self._run_upkeep(job)

    async def _run_upkeep(self, job: maintenance.Job) -> None:
        """Run an upkeep job on a pooled connection; a failure is logged, as Upkeep.run does (nothing to undo)."""
        assert self._upkeep is not None
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

    # -- reads ------------------------------------------------------------------------------------
    async def get(self, trace_id: str) -> TraceContext | None:
        params = {"id": check_trace_id(trace_id, self._sql)}
        rows = await self._fetch(self._sql.get_trace, params)
        return decode_row(rows[0]) if rows else None

    async def get_by_session_uid(
        self, session_uid: str, since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        check_query_string("session_uid", session_uid)  # None here would mean "every session"
        return await self.query(session_uid=session_uid, since=since, limit=limit)

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
        args: dict[str, Any] = {"session_uid": session_uid, "namespace": namespace, "context_type": context_type}
        args |= {"since": since, "until": until, "limit": limit}
        check_query_args(**args)  # bad input fails before the database is opened
        if not self._ready:
            await self._open()
        migrating = self._migrating and await self._still_migrating()
        stmt, params = prepare_query(self._sql, **args, migrating=migrating)
        return decode_rows(await self._fetch(stmt, params))

    async def get_by_session_uids(
        self, session_uids: Sequence[str], since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """Traces of any of the sessions with created_at >= since, newest first, each trace once."""
        args: dict[str, Any] = {"session_uids": session_uids, "since": since, "limit": limit}
        if prepare_sessions_query(self._sql, **args) is None:  # bad input fails before the database is opened
            return []
        if not self._ready:
            await self._open()
        migrating = self._migrating and await self._still_migrating()
        prepared = prepare_sessions_query(self._sql, **args, migrating=migrating)
        assert prepared is not None
        return decode_rows(await self._fetch(*prepared))

    async def page_by_session_uid(
        self, session_uid: str, since: float | None = None, limit: int = 100, cursor: PageCursor | None = None
    ) -> Page:
        """One page of the session's traces, newest first; pass `next_cursor` back for the next one."""
        prepare_page(self._sql, session_uid=session_uid, since=since, limit=limit, cursor=cursor)  # bad input first
        if not self._ready:
            await self._open()
        migrating = self._migrating and await self._still_migrating()
        stmt, params = prepare_page(
            self._sql, session_uid=session_uid, since=since, limit=limit, cursor=cursor, migrating=migrating
        )
        return page_of(decode_rows(await self._fetch(stmt, params)), limit)

    async def iter_session(
        self, session_uid: str, since: float | None = None, page_size: int = 1000
    ) -> AsyncIterator[TraceContext]:
        """Every trace of the session (created_at >= since), newest first, a page at a time: bounded memory."""
        cursor: PageCursor | None = None
        while True:
            items, cursor = await self.page_by_session_uid(session_uid, since, page_size, cursor)
            for item in items:
                yield item
            if cursor is None:
                return

    async def tail(
        self,
        session_uid: str,
        *,
        since: float | None = None,
        poll_interval: float = 1.0,
        lookback: float = DEFAULT_LOOKBACK,
        limit_per_poll: int = DEFAULT_POLL_LIMIT,
    ) -> AsyncIterator[list[TraceContext]]:
        """Follow the session live: one list per poll of the traces that arrived (see TraceStore.tail)."""
        check_tail_args(since=since, poll_interval=poll_interval, lookback=lookback, limit=limit_per_poll)
        follower = SessionTail(self._sql, session_uid, since=since, lookback=lookback, limit=limit_per_poll)
        if not self._ready:
            await self._open()
        while True:
            migrating = self._migrating and await self._still_migrating()
            poll = follower.poll(time.time(), migrating=migrating)
            try:  # tail.drive, awaited
                read = next(poll)
                while True:
                    read = poll.send(await self._fetch(*read))
            except StopIteration as stop:
                polled: Polled = stop.value
            yield polled.traces
            if not polled.more:
                await asyncio.sleep(poll_interval)

    async def explain(
        self, session_uid: str, since: float | None = None, limit: int | None = None, **filters: Any
    ) -> list[str]:
        check_query_string("session_uid", session_uid)
        if not self._ready:
            await self._open()
        migrating = self._migrating and await self._still_migrating()
        stmt, params = prepare_query(
            self._sql, session_uid=session_uid, since=since, limit=limit, migrating=migrating, **filters
        )
        try:
            async with self._reader.connect() as conn:
                return await _plan(conn, stmt, params)
        except self._failures as exc:
            raise self._error("explain failed", exc, self._reader) from exc

    async def _still_migrating(self) -> bool:
        """Re-read the revision where reads go; once it reached head, switch to the fast query for good."""
        try:
            async with self._reader.connect() as conn:
                self._migrating = not await conn.run_sync(at_head)
        except self._failures as exc:
            raise self._error("cannot read the schema revision", exc, self._reader) from exc
        return self._migrating

    def _driver_sql(self, stmt: Any) -> DriverSQL:
        return compiled(stmt, self._engine.dialect)

    def _error(self, action: str, exc: BaseException, engine: AsyncEngine | None = None) -> StorageError:
        """The StorageError for a failed database call: what failed and the driver's reason. asyncpg's socket
        errors name neither the server nor their kind ('[Errno 2] No such file or directory'), so those do."""
        if isinstance(exc, OSError):
            url = shown((engine or self._engine).url)
            return StorageError(f"{action}: the connection to {url} failed ({type(exc).__name__}: {exc})")
        return storage_error(action, exc)

    async def _write(
        self, conn: AsyncConnection, query: DriverSQL, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> int:
        """Run a write statement over `rows` in the connection's transaction; the driver's count of changed rows.

        One statement per chunk of arrays where the statements take them (Statements.write_arrays),
        else executemany of one row each.
        """
        if not self._sql.write_arrays:
            return await self._executemany(conn, query.sql, query.args_many(columns, rows))
        changed = 0
        for args in query.args_arrays(columns, rows):
            changed += int((await conn.exec_driver_sql(query.sql, args)).rowcount)
        return changed

    async def _executemany(self, conn: AsyncConnection, sql: str, rows: list[Any]) -> int:
        """Run one statement for many rows in the connection's transaction; the driver's count of changed rows."""
        if self._engine.dialect.driver == "aiosqlite":
            # Straight to aiosqlite (see _fetch): two thread round trips per statement instead of
            # SQLAlchemy's adapter's three, and no result object.
            raw = await conn.get_raw_connection()
            async with raw.driver_connection.executemany(sql, rows) as cursor:  # type: ignore[union-attr]
                return int(cursor.rowcount)
        return int((await conn.exec_driver_sql(sql, rows)).rowcount)

    async def _fetch(self, stmt: Any, params: dict[str, Any]) -> list[Any]:
        if not self._ready:
            await self._open()
        query = compiled(stmt, self._reader.dialect)
        args = query.args(params)
        try:
            async with self._read_engine.connect() as conn:
                if plan_log.isEnabledFor(logging.DEBUG):
                    plan_log.debug("plan:\n  %s", "\n  ".join(await _plan(conn, stmt, params)))
                if self._reader.dialect.driver == "aiosqlite":
                    # One thread round trip instead of five (cursor, execute, fetchall, close through
                    # SQLAlchemy's adapter): 3.8x -> 2.0x of raw sqlite3 on a latest-100 read. The price:
                    # these reads do not fire SQLAlchemy's cursor events or echo.
                    raw = await conn.get_raw_connection()
                    return list(await raw.driver_connection.execute_fetchall(query.sql, args))  # type: ignore[union-attr]
                return list((await conn.exec_driver_sql(query.sql, args)).all())
        except self._failures as exc:
            raise self._error("query failed", exc, self._reader) from exc

    # -- lifecycle --------------------------------------------------------------------------------
    async def close(self) -> None:
        """Dispose of the engines the store created (an engine passed in stays the caller's), even when
        cancelled or when the database is gone: connections the server dropped are discarded, not raised."""
        try:
            if self._upkeep is not None and self._upkeep.writes:  # statistics for the next opener (maintenance)
                await self._run_upkeep("statistics")
        finally:
            if self._owned:
                await self._engine.dispose()
            if self._reader_owned:
                await self._reader.dispose()

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
        return await retention.run_async(self._engine, request, on_progress)


async def _plan(conn: AsyncConnection, stmt: Any, params: dict[str, Any]) -> list[str]:
    sql, driver_params = explain_statement(stmt, params, conn.dialect)
    rows = (await conn.exec_driver_sql(sql, driver_params)).all()
    return [str(row[-1]) for row in rows]
