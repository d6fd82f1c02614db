"""The async store's reads of a SQLite file it opened itself: each read whole (take a connection, execute,
fetch, give it back) in one hop to a thread of the store's own, on a plain sqlite3 connection.

Used only while nobody listens to the engine's cursor events (tracestore.drive.listened): otherwise reads go
through SQLAlchemy, so instrumentation sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

from sqlalchemy import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool, PoolProxiedConnection

from tracestore.dialects.sqlite_memory import in_memory
from tracestore.engine import create_engine, sync_url
from tracestore.queries import compiled

T = TypeVar("T")


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
