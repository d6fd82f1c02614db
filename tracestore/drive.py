"""How the requests of a plan (tracestore.core) meet a SQLAlchemy Connection, for both stores and the ORM helpers.

Two ways to the database: straight to the pooled DBAPI connection (SQLAlchemy's result and event machinery
cost more than a small read or write), or through `exec_driver_sql` whenever someone listens to the engine's
cursor events or it echoes its SQL (OpenTelemetry's and Sentry's SQLAlchemy integrations listen there), so that
instrumentation sees every statement the store runs. Which one is decided at each statement, so a listener
registered after the store opened is honoured from its next statement on.

The async store's reads of a SQLite file it opened itself take a third way when nobody listens: the whole read
in one hop to a thread of its own, on a plain sqlite3 connection (ThreadedReads).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable, Generator
from queue import SimpleQueue
from typing import Any, TypeVar

from sqlalchemy import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.pool import NullPool, PoolProxiedConnection

from tracestore.core import Execute, Mode, driver_calls
from tracestore.dialects.sqlite_memory import in_memory
from tracestore.engine import create_engine, sync_url
from tracestore.queries import compiled

T = TypeVar("T")


def instrumented(conn: Connection) -> bool:
    """Whether statements on `conn` must go through SQLAlchemy: a cursor listener is registered (on the
    connection, its engine, a parent engine of an engine view, or the Engine class), or the engine echoes.
    About 2 microseconds a statement (benchmarks/instrumented.py)."""
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
                    changed += _rowcount(conn.exec_driver_sql(query.sql, args))
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
        return list(conn.exec_driver_sql(query.sql, args).all())
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(query.sql, args)
        return list(cursor.fetchall())
    finally:
        cursor.close()


# -- the same on an AsyncConnection ---------------------------------------------------------------------------
def _raw_aiosqlite(conn: AsyncConnection) -> bool:
    """Whether to bypass SQLAlchemy's aiosqlite adapter: two thread round trips per statement instead of its
    three to five (cursor, execute, fetch, close), when nobody listens. Other async drivers go through it."""
    return conn.dialect.driver == "aiosqlite" and not instrumented(conn.sync_connection)  # type: ignore[arg-type]


async def execute_steps_async(steps: Generator[Execute, int, T], conn: AsyncConnection) -> T:
    """execute_steps on an AsyncConnection."""
    dialect = conn.dialect
    try:
        request = next(steps)
        while True:
            query = compiled(request.stmt, dialect)
            changed = 0
            for args, many in driver_calls(query, request):
                if many and request.mode is Mode.MANY and _raw_aiosqlite(conn):
                    raw: Any = (await conn.get_raw_connection()).driver_connection
                    async with raw.executemany(query.sql, args) as cursor:
                        changed += int(cursor.rowcount)
                else:
                    changed += _rowcount(await conn.exec_driver_sql(query.sql, args))
            request = steps.send(changed)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def fetch_rows_async(conn: AsyncConnection, stmt: Any, params: dict[str, Any]) -> list[Any]:
    """fetch_rows on an AsyncConnection."""
    query = compiled(stmt, conn.dialect)
    args = query.args(params)
    if _raw_aiosqlite(conn):
        raw: Any = (await conn.get_raw_connection()).driver_connection
        return list(await raw.execute_fetchall(query.sql, args))
    return list((await conn.exec_driver_sql(query.sql, args)).all())


def listened(engine: AsyncEngine) -> bool:
    """instrumented() before any connection is taken: a cursor listener on the engine (or a view's parent
    engine, or the Engine class), or the engine echoes."""
    sync_engine = engine.sync_engine
    dispatch = sync_engine.dispatch
    return bool(dispatch.before_cursor_execute or dispatch.after_cursor_execute) or sync_engine._should_log_info()


# How many reads run at once: as many as the async engine's default pool lends (5 + 10 overflow), so no fewer than
# through aiosqlite; SQLite steps each query outside the GIL.
READ_THREADS = 15


class ThreadedReads:
    """The async store's reads of a SQLite file, each in one hop to a thread of its own: take a connection,
    execute, fetch and give the connection back, all in that thread.

    Through SQLAlchemy's async pool and aiosqlite, a read is a pool checkout, a hop to the connection's thread,
    and another for the pool's ROLLBACK on return: more than a sub-millisecond query costs. The connections are
    plain sqlite3 ones made by a sync twin of the engine (the same URL through tracestore.engine.create_engine:
    the same pragmas, read-only handling and error messages), kept here between reads, one per read in flight.
    Only for an engine the store created from a URL: an application's engine keeps its own connection setup.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        url = sync_url(engine.url.render_as_string(hide_password=False))
        # Any thread may use any kept connection (one at a time): sqlite3's same-thread check must be off.
        self._twin = create_engine(url, poolclass=NullPool, connect_args={"check_same_thread": False})
        self._idle: list[PoolProxiedConnection] = []
        self._lock = threading.Lock()
        self._generation = 0  # bumped by dispose(): a read in flight then closes its connection
        self._threads = self._new_threads()

    def _new_threads(self) -> _Threads:
        threads = _Threads(READ_THREADS)
        # A store dropped without close(): its threads end instead of waiting for calls forever.
        self._release = weakref.finalize(self, threads.release)
        return threads

    @classmethod
    def usable(cls, engine: AsyncEngine) -> bool:
        """Whether `engine` is a SQLite file on aiosqlite (an in-memory database lives in its one connection)."""
        return engine.dialect.driver == "aiosqlite" and not in_memory(engine.url)

    async def fetch_rows(self, stmt: Any, params: dict[str, Any], dialect: Dialect) -> list[Any]:
        """fetch_rows_async in one thread hop. Cancelled, a read not started yet is skipped, and one in progress
        finishes in its thread, which keeps the connection for the next read."""
        query = compiled(stmt, dialect)
        rows: list[Any] = await self._threads.run(self._fetch, query.sql, query.args(params))
        return rows

    def _fetch(self, sql: str, args: Any) -> list[Any]:
        with self._lock:
            generation = self._generation
            connection = self._idle.pop() if self._idle else None
        if connection is None:
            connection = self._twin.raw_connection()
        try:
            cursor = connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql, args)
                rows: list[Any] = cursor.fetchall()
            finally:
                cursor.close()
        except BaseException:
            connection.invalidate()  # whatever failed, the next read gets a fresh connection
            raise
        with self._lock:
            if generation == self._generation:
                self._idle.append(connection)
                return rows
        connection.close()
        return rows

    async def dispose(self) -> None:
        """Close the kept connections once the reads in flight (cancelled ones too) are done: afterwards nothing of
        these reads holds the file. Later reads open new ones."""
        with self._lock:
            self._generation += 1  # a read in flight closes its connection instead of keeping it
            idle, self._idle = self._idle, []
        self._release.detach()
        threads, self._threads = self._threads, self._new_threads()
        try:
            for connection in idle:
                connection.close()
            await asyncio.to_thread(threads.stop)  # waits for the reads in flight without blocking the loop
        finally:
            self._twin.dispose()


class _Threads:
    """Up to `limit` threads taking calls off one queue, started as calls find none waiting.

    Leaner than loop.run_in_executor, whose concurrent.futures Future, work item and chaining are a measurable
    share of a sub-millisecond read (docs/performance.md): a call is one queue entry, and its result goes back
    with one call_soon_threadsafe.
    """

    def __init__(self, limit: int) -> None:
        self._calls: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # threads between calls that no call has claimed yet
        self._started: list[threading.Thread] = []
        self._limit = limit

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def call() -> None:
            if future.cancelled():  # cancelled before its turn: nothing to do
                return
            try:
                result = function(*args)
            except BaseException as exc:
                _settle(loop, future, None, exc)
            else:
                _settle(loop, future, result, None)

        with self._lock:
            if self._waiting:
                self._waiting -= 1
            elif len(self._started) < self._limit:
                thread = threading.Thread(target=self._work, name="tracestore-read", daemon=True)
                self._started.append(thread)
                thread.start()
        self._calls.put(call)
        return await future

    def _work(self) -> None:
        while True:
            call = self._calls.get()
            if call is None:
                return
            call()
            del call  # while waiting, hold on to no finished call (and so to no store)
            with self._lock:
                self._waiting += 1

    def release(self) -> list[threading.Thread]:
        """Let every thread finish the calls queued before, then end; the threads."""
        with self._lock:
            started, self._started = self._started, []
        for _ in started:
            self._calls.put(None)
        return started

    def stop(self) -> None:
        """release(), and return once the threads have ended."""
        for thread in self.release():
            thread.join()


def _settle(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    """Hand a thread's result to the future's loop (which may have closed meanwhile: nobody waits then)."""

    def settle() -> None:
        if future.done():  # cancelled while the thread ran
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed
        loop.call_soon_threadsafe(settle)


def _rowcount(result: Any) -> int:
    rowcount = int(result.rowcount)
    result.close()  # a SELECT among a write's statements (PostgreSQL's set_config) has rows nobody reads
    return rowcount
