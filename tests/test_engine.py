"""How connections are made (tracestore.engine): what is wrong with a path that is no database, a file path
given as a URL, and in-memory databases shared by threads and tasks."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.oracle import make_trace
from tracestore import AsyncTraceStore, StorageError, TraceStore, migrate
from tracestore.migrate.verify import verify

T0 = 1_700_000_000.0


# -- paths that are no SQLite database --------------------------------------------------------------------
def open_sync(url: str) -> None:
    TraceStore(url).close()


def open_async(url: str) -> None:
    async def opened() -> None:
        try:
            async with AsyncTraceStore(url.replace("sqlite://", "sqlite+aiosqlite://", 1)):
                pass
        finally:
            # aiosqlite stops a connection that failed to open without waiting for its thread, which then
            # reports to this loop: let it, before asyncio.run closes the loop.
            await asyncio.sleep(0.05)

    asyncio.run(opened())


OPENERS: dict[str, Callable[[str], Any]] = {
    "TraceStore": open_sync,
    "AsyncTraceStore": open_async,
    "upgrade": migrate.upgrade,
    "verify": verify,
}


@pytest.mark.parametrize("opener", OPENERS, ids=str)
def test_a_directory_is_named_as_one(tmp_path: Path, opener: str) -> None:
    with pytest.raises(StorageError) as raised:
        OPENERS[opener](f"sqlite:///{tmp_path}")
    assert str(raised.value) == f"{tmp_path} is a directory, not a SQLite database file"


@pytest.mark.parametrize("opener", OPENERS, ids=str)
def test_a_file_of_another_kind_is_named_and_left_alone(tmp_path: Path, opener: str) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("not a database\n")
    with pytest.raises(StorageError) as raised:
        OPENERS[opener](f"sqlite:///{notes}")
    assert str(raised.value) == f"{notes} is not a SQLite database (its header is not 'SQLite format 3')"
    assert notes.read_text() == "not a database\n" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_a_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match=f"the directory {tmp_path / 'nowhere'} does not exist"):
        TraceStore(f"sqlite:///{tmp_path / 'nowhere' / 'traces.db'}")


@pytest.mark.parametrize("given", ["traces.db", "/var/lib/app/traces.sqlite", "data/traces.db"])
def test_a_file_path_given_as_a_url_suggests_the_sqlite_url(given: str) -> None:
    with pytest.raises(StorageError, match=f"use sqlite:///{given}$"):
        TraceStore(given)
    with pytest.raises(StorageError, match=f"use sqlite\\+aiosqlite:///{given}$"):
        AsyncTraceStore(given)


def test_text_that_is_no_path_gets_no_suggestion() -> None:
    with pytest.raises(StorageError, match="not a usable database URL") as raised:
        TraceStore("not a url")
    assert "sqlite:///" not in str(raised.value)


# -- in-memory databases: one connection for every thread and task -----------------------------------------
def test_an_in_memory_store_is_the_same_database_in_every_thread() -> None:
    with TraceStore("sqlite://") as store:
        store.store(make_trace(id="main", session_uids=["s"], created_at=T0))

        def write_and_read(k: int) -> list[str]:
            for i in range(10):
                batch = [make_trace(id=f"{k}-{i}-{j}", session_uids=["s"], created_at=T0 + i) for j in range(3)]
                store.store_batch(batch)
            return [t.id for t in store.get_by_session_uid("s", limit=1000)]

        with ThreadPoolExecutor(4) as pool:
            seen = list(pool.map(write_and_read, range(4)))
        assert all("main" in ids for ids in seen)  # the tables, and the first trace, in every thread
        assert len(store.query(limit=1000)) == 1 + 4 * 10 * 3


async def test_an_in_memory_async_store_serves_concurrent_tasks_and_other_threads() -> None:
    async with AsyncTraceStore("sqlite+aiosqlite://") as store:

        async def writer(k: int) -> None:
            for i in range(10):
                await store.store_batch(
                    [make_trace(id=f"{k}-{i}-{j}", session_uids=[f"s{k}"], created_at=T0 + i) for j in range(3)]
                )

        # Each batch is its own transaction on the one connection: interleaved, they would share one.
        await asyncio.gather(*(writer(k) for k in range(4)))
        assert len(await store.query(limit=1000)) == 4 * 10 * 3

        found: list[int] = []
        thread = threading.Thread(target=lambda: found.append(len(asyncio.run(store.query(limit=1000)))))
        thread.start()
        while thread.is_alive():  # this loop stays free: the other thread's loop may wait for the connection
            await asyncio.sleep(0.01)
        assert found == [4 * 10 * 3]


def test_threads_wait_for_the_connection_instead_of_sharing_a_transaction() -> None:
    """A thread holding the connection in a transaction: another thread's write waits for it, then commits."""
    with TraceStore("sqlite://") as store:
        store.store(make_trace(id="first", created_at=T0))
        other_done = threading.Event()
        with store.engine.begin() as connection:
            connection.exec_driver_sql("DELETE FROM traces")
            other = make_trace(id="other", created_at=T0)
            thread = threading.Thread(target=lambda: (store.store(other), other_done.set()))
            thread.start()
            time.sleep(0.2)
            assert not other_done.is_set()  # waiting: not writing inside this transaction
        thread.join(5)
        assert other_done.is_set() and [t.id for t in store.query()] == ["other"]
