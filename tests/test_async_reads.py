"""How AsyncTraceStore reads: on a SQLite file it opened from a URL, each read in one hop to a thread of its
own (tracestore.dialects.sqlite_reads.ThreadedReads), never through its AsyncEngine's pool, while no cursor
listener is registered; otherwise (a listener, an engine passed in, PostgreSQL) through the engine. Either way
the same answers, reads cancelled at any point leave the store answering, and close() leaves no connection
open."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.ext.asyncio import create_async_engine

from tests.backends import Backend
from tests.oracle import make_trace
from tracestore import AsyncTraceStore, StorageError, TraceContext

T0 = 1_700_000_000.0


def session_traces(count: int = 30) -> list[TraceContext]:
    return [make_trace(id=f"t{i:03d}", session_uids=["s"], created_at=T0 + i) for i in range(count)]


@contextmanager
def checkouts(engine: Engine) -> Iterator[list[int]]:
    """Counts the connections taken from `engine`'s pool while the block runs."""
    taken: list[int] = []

    def count(*args: Any) -> None:
        taken.append(1)

    event.listen(engine, "checkout", count)
    try:
        yield taken
    finally:
        event.remove(engine, "checkout", count)


async def reads(store: AsyncTraceStore) -> list[Any]:
    """One call of each kind of read."""
    return [
        await store.get("t003"),
        await store.get_by_session_uid("s", limit=5),
        await store.query(session_uid="s", since=T0 + 20),
        (await store.page_by_session_uid("s", limit=4)).items,
        await store.get_by_session_uids(["s", "none"], limit=3),
        await store.count_traces(session_uid="s"),
    ]


def expected_reads(traces: list[TraceContext]) -> list[Any]:
    newest = traces[::-1]
    return [traces[3], newest[:5], newest[:10], newest[:4], newest[:3], len(traces)]


async def test_reads_on_a_file_the_store_opened_skip_the_engines_pool_while_nobody_listens(backend: Backend) -> None:
    traces = session_traces()
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        engine = store.engine.sync_engine
        with checkouts(engine) as taken:
            assert await reads(store) == expected_reads(traces)
        # SQLite: no connection from the AsyncEngine's pool; PostgreSQL: the engine's path, one per read.
        assert len(taken) == (0 if backend.is_sqlite else 6)

        seen: list[str] = []
        listener = lambda conn, cursor, statement, *args: seen.append(statement)  # noqa: E731
        event.listen(engine, "before_cursor_execute", listener)
        try:
            with checkouts(engine) as taken:
                assert await reads(store) == expected_reads(traces)
            assert len(taken) == 6 and len(seen) == 6  # the listener sees every read
        finally:
            event.remove(engine, "before_cursor_execute", listener)
        with checkouts(engine) as taken:
            assert await reads(store) == expected_reads(traces)
        assert len(taken) == (0 if backend.is_sqlite else 6)


async def test_a_listener_on_the_engine_class_sees_the_async_reads(backend: Backend) -> None:
    traces = session_traces(3)
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        event.listen(Engine, "before_cursor_execute", record)
        try:
            assert await store.get_by_session_uid("s") == traces[::-1]
        finally:
            event.remove(Engine, "before_cursor_execute", record)
    assert any("FROM trace_sessions" in statement for statement in seen)


async def test_reads_on_an_engine_passed_in_go_through_it(backend: Backend) -> None:
    """An application's engine keeps its own connection setup: the store reads through its pool."""
    traces = session_traces(3)
    engine = create_async_engine(backend.async_url)
    try:
        async with AsyncTraceStore(engine) as store:
            await store.store_batch(traces)
            with checkouts(engine.sync_engine) as taken:
                assert await store.get_by_session_uid("s") == traces[::-1]
            assert len(taken) == 1
    finally:
        await engine.dispose()


async def test_concurrent_reads_get_the_same_answers(backend: Backend) -> None:
    traces = session_traces()
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        answers = await asyncio.gather(*(reads(store) for _ in range(20)))
    assert answers == [expected_reads(traces)] * 20


async def test_reads_cancelled_at_any_point_leave_the_store_answering_and_close_leaves_nothing_open(
    backend: Backend,
) -> None:
    traces = session_traces()
    store = AsyncTraceStore(backend.async_url)
    try:
        await store.store_batch(traces)
        expected = traces[::-1]
        finished = 0
        # Cancelled after 0, 1, 2, ... turns of the event loop, until the read finishes first.
        for turns in range(1000):
            task = asyncio.create_task(store.get_by_session_uid("s"))
            for _ in range(turns):
                await asyncio.sleep(0)
            task.cancel()
            try:
                assert await task == expected
            except asyncio.CancelledError:
                continue
            finished += 1
            if finished == 3:
                break
        assert finished == 3, "no read ever finished"
        assert await reads(store) == expected_reads(traces)
        # Reads cancelled in flight, then close() at once: on SQLite their threads may still be reading.
        tasks = [asyncio.create_task(store.get_by_session_uid("s")) for _ in range(10)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await store.close()
    assert open_connections(backend) == 0


async def test_a_store_dropped_without_close_leaves_no_read_thread_behind(backend: Backend) -> None:
    before = set(threading.enumerate())
    store = AsyncTraceStore(backend.async_url)
    await store.store_batch(session_traces(3))
    await asyncio.gather(*(store.get_by_session_uid("s") for _ in range(5)))
    await store.engine.dispose()  # its engine's connections; the store itself is dropped, not closed
    del store
    gc.collect()
    left = [thread for thread in threading.enumerate() if thread not in before and thread.name == "tracestore-read"]
    for thread in left:
        thread.join(timeout=10)
    assert [thread for thread in left if thread.is_alive()] == []


def open_connections(backend: Backend) -> int:
    """Connections other than the one asking that hold the database: on SQLite, leaving WAL needs them all gone."""
    if not backend.is_sqlite:
        backend.dispose()  # the tests' own pool
        # A server process leaves pg_stat_activity a moment after its client hung up: a leak is one still there
        # seconds later.
        deadline = time.monotonic() + 5
        while True:
            count = int(
                backend.rows(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )[0][0]
            )
            if count == 0 or time.monotonic() > deadline:
                return count
            time.sleep(0.05)
    connection = sqlite3.connect(backend.path, isolation_level=None, timeout=0)
    try:
        try:
            connection.execute("PRAGMA journal_mode=DELETE")
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
            return 1
        connection.execute("PRAGMA journal_mode=WAL")
        return 0
    finally:
        connection.close()


async def test_a_failed_read_raises_storage_error_and_the_next_one_works(backend: Backend) -> None:
    traces = session_traces(3)
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        with backend.raw() as connection:
            connection.exec_driver_sql("ALTER TABLE trace_sessions RENAME TO trace_sessions_away")
        try:
            with pytest.raises(StorageError, match="query failed"):
                await store.get_by_session_uid("s")
        finally:
            with backend.raw() as connection:
                connection.exec_driver_sql("ALTER TABLE trace_sessions_away RENAME TO trace_sessions")
        assert await store.get_by_session_uid("s") == traces[::-1]
