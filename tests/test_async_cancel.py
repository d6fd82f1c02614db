"""Cancelling the async store's writes (a timeout, a task group): all or nothing, no connection left in a transaction.

SQLAlchemy's `commit` event fires before COMMIT is sent. A write cancelled before it must leave nothing
behind; one cancelled after it may have committed (the outcome of a COMMIT in flight is unknown), but
only as a whole. Two sweeps move the cancellation through a write: after 0, 1, 2, ... turns of the
event loop until a call finishes first, which lands it in turn wherever the write waits; and as each
statement, or each COMMIT, is sent, which lands it at exactly that statement. After every cancellation
the pool must hold no connection inside a transaction, no other connection may be left holding a lock,
and the store must go on working.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tests.backends import Backend
from tests.oracle import make_trace
from tracestore import AsyncTraceStore, TraceContext
from tracestore.dialects.sqlite_connect import SQLITE_PRAGMAS

T0 = 1_700_000_000.0
CUTOFF = T0 + 100  # the prune tests' traces are created just after T0
MAX_TURNS = 3000  # a sweep that has not seen its call finish by then fails
BUSY_TIMEOUT = int(dict(SQLITE_PRAGMAS)["busy_timeout"])


@dataclass(frozen=True)
class Landing:
    """Where a cancellation landed: after how many COMMITs of the call, and whether the call had returned."""

    commits: int
    finished: bool


class Canceller:
    """Runs a store call as a task and cancels it at a chosen point, counting the COMMITs it issued before.

    The points: a number of event-loop turns after the call starts, or its nth "statement" or "commit".
    A statement on SQLite is each one the aiosqlite thread starts (sqlite3's trace callback, so the
    store's direct driver calls count too), on PostgreSQL each one SQLAlchemy sends; a commit is
    SQLAlchemy's `commit` event, which fires before COMMIT is sent. Cancelled from there, the call is
    cancelled at the await of that very statement.
    """

    def __init__(self, store: AsyncTraceStore) -> None:
        self.store = store
        self.sqlite = store.engine.dialect.name == "sqlite"
        self.commits = 0
        self._events: dict[str, int] = {}
        self._anchor: tuple[str, int] | None = None
        self._task: asyncio.Task[Any] | None = None
        self._landed: tuple[int, bool] | None = None  # (COMMITs so far, whether the call had returned)

    def __enter__(self) -> Canceller:
        engine = self.store.engine.sync_engine
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, *(("checkout", self._trace) if self.sqlite else ("before_cursor_execute", self._on_sql)))
        return self

    def __exit__(self, *exc: object) -> None:
        engine = self.store.engine.sync_engine
        event.remove(engine, "commit", self._on_commit)
        event.remove(engine, *(("checkout", self._trace) if self.sqlite else ("before_cursor_execute", self._on_sql)))

    def _trace(self, dbapi_connection: Any, *args: Any) -> None:
        dbapi_connection.run_async(lambda driver: driver.set_trace_callback(self._on_sql))

    def _on_commit(self, connection: Any) -> None:
        self.commits += 1
        self._seen("commit")

    def _on_sql(self, *args: Any) -> None:
        self._seen("statement")

    def _seen(self, kind: str) -> None:
        task = self._task  # SQLite's trace callback runs in aiosqlite's thread
        if task is None:
            return
        self._events[kind] = self._events.get(kind, 0) + 1
        if self._anchor == (kind, self._events[kind]):
            task.get_loop().call_soon_threadsafe(self._cancel, task, 0)

    def _cancel(self, task: asyncio.Task[Any], turns: int) -> None:
        if task is not self._task:  # that call has ended
            return
        if turns:
            task.get_loop().call_soon(self._cancel, task, turns - 1)
            return
        self._landed = (self.commits, task.done())
        task.cancel()

    async def run(
        self, call: Callable[[], Awaitable[Any]], *, turns: int = 0, at: tuple[str, int] | None = None
    ) -> Landing:
        """Cancel `call` `turns` turns of the event loop after it starts or, with `at` = (kind, n), as its nth
        statement or COMMIT starts; wait for it to end."""
        before = self.commits
        self._events, self._anchor, self._landed = {}, at, None
        self._task = task = asyncio.create_task(call())
        try:
            if at is None:
                self._cancel(task, turns)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        finally:
            self._task = None
        if self._landed is None:  # the call ended before its cancel came
            return Landing(self.commits - before, finished=True)
        commits, finished = self._landed
        if not finished:
            assert task.cancelled(), "a call cancelled before it returned must raise CancelledError"
        return Landing(commits - before, finished=finished)


async def sweep_turns(
    store: AsyncTraceStore,
    prepare: Callable[[int], Awaitable[Any]],
    call: Callable[[int], Awaitable[Any]],
    check: Callable[[int, Landing], Awaitable[None]],
) -> list[Landing]:
    """Cancel call(i) i turns of the event loop after it starts, i = 0, 1, 2, ... until a call finishes first.

    prepare(i) runs unimpeded before each try: it must use the store the way call(i) does, so that the
    pool holds a connection with the statements prepared (a call cancelled mid-statement loses its
    connection) and the try spends its turns on the call itself.
    """
    landings = []
    with Canceller(store) as canceller:
        for i in range(MAX_TURNS):
            await prepare(i)
            landing = await canceller.run(lambda: call(i), turns=i)  # noqa: B023 (awaited at once)
            await assert_nothing_left_open(store)
            await check(i, landing)
            landings.append(landing)
            if landing.finished:
                break
    assert landings[-1].finished, f"no call finished within {MAX_TURNS} turns"
    return landings


async def sweep_statements(
    store: AsyncTraceStore,
    prepare: Callable[[int], Awaitable[Any]],
    call: Callable[[int], Awaitable[Any]],
    check: Callable[[int, Landing], Awaitable[None]],
    kind: str = "statement",
) -> list[Landing]:
    """Cancel call(i) as its ith statement (kind="commit": its ith COMMIT) is sent, i = 1, 2, ... until
    a call runs to its end."""
    landings = []
    with Canceller(store) as canceller:
        for i in range(1, 100):
            await prepare(i)
            landing = await canceller.run(lambda: call(i), at=(kind, i))  # noqa: B023 (awaited at once)
            await assert_nothing_left_open(store)
            await check(i, landing)
            landings.append(landing)
            if landing.finished:
                break
    assert len(landings) > 1 and landings[-1].finished
    return landings


async def assert_nothing_left_open(store: AsyncTraceStore) -> None:
    """No connection of the store is checked out, none in its pool is inside a transaction, and no
    connection anywhere still holds a lock or a transaction on the database."""
    pool: Any = store.engine.sync_engine.pool
    assert pool.checkedout() == 0
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(pool.checkedin()):
            connection = await stack.enter_async_context(store.engine.connect())
            driver: Any = (await connection.get_raw_connection()).driver_connection
            in_transaction = (
                driver.is_in_transaction() if hasattr(driver, "is_in_transaction") else driver.in_transaction
            )
            assert not in_transaction, "a connection went back to the pool inside a transaction"
    database = store.engine.url.database
    if store.engine.dialect.name == "sqlite":
        assert database is not None
        other = sqlite3.connect(database, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # the write lock is free at once
            other.execute("ROLLBACK")
        except sqlite3.OperationalError as exc:
            pytest.fail(f"the write lock is still taken after the cancel ({exc})")
        finally:
            other.close()
    else:
        # A connection cut off mid-transaction is closed, and the server ends its transaction on noticing.
        deadline = time.monotonic() + 2
        async with store.engine.connect() as connection:
            while open_transactions := (
                await connection.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND backend_type = 'client backend' AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
                )
            ).scalar_one():
                assert time.monotonic() < deadline, f"{open_transactions} sessions still in a transaction"
                await asyncio.sleep(0.01)
            await connection.rollback()


async def assert_usable(store: AsyncTraceStore) -> None:
    batch = [make_trace(id="after-1", session_uids=["after"]), make_trace(id="after-2", session_uids=["after"])]
    await store.store_batch(batch)
    assert await store.get("after-1") == batch[0]
    assert {trace.id for trace in await store.get_by_session_uid("after")} == {"after-1", "after-2"}
    assert await store.delete("after-2") is True
    await assert_nothing_left_open(store)


def stored(backend: Backend, tag: str) -> tuple[int, int]:
    """(traces, session links) of the traces tagged `tag` (ids `tag-n`, each in session `tag`)."""
    traces = backend.rows("SELECT count(*) FROM traces WHERE id LIKE :tag", {"tag": f"{tag}-%"})[0][0]
    links = backend.rows("SELECT count(*) FROM trace_sessions WHERE session_uid = :tag", {"tag": tag})[0][0]
    return int(traces), int(links)


def batch_of(tag: str, size: int = 3, created_at: float | None = None) -> list[TraceContext]:
    return [
        make_trace(id=f"{tag}-{n}", session_uids=[tag], data={"n": n}, created_at=created_at or time.time())
        for n in range(size)
    ]


async def busy_timeouts(store: AsyncTraceStore) -> set[int]:
    """PRAGMA busy_timeout of every connection in the pool."""
    pool: Any = store.engine.sync_engine.pool
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(store.engine.connect()) for _ in range(pool.checkedin())]
        return {(await c.exec_driver_sql("PRAGMA busy_timeout")).scalar_one() for c in connections}


# -- store_batch -------------------------------------------------------------------------------------------------
async def check_batch(backend: Backend, tag: str, landing: Landing, size: int = 3) -> None:
    traces, links = stored(backend, tag)
    assert (traces, links) in ((0, 0), (size, size)), f"a partial batch after a cancel at {landing}"
    if not landing.commits:
        assert traces == 0, f"cancelled before COMMIT was sent, yet stored ({landing})"
    if landing.finished:
        assert traces == size


async def test_a_cancelled_store_batch_stores_nothing_before_commit_and_never_part(
    async_store: AsyncTraceStore, backend: Backend
) -> None:
    async def prepare(i: int) -> None:
        await async_store.store_batch(batch_of(f"warm{i}"))

    async def check(i: int, landing: Landing) -> None:
        await check_batch(backend, f"b{i}", landing)

    landings = await sweep_turns(async_store, prepare, lambda i: async_store.store_batch(batch_of(f"b{i}")), check)
    assert sum(not landing.commits for landing in landings) >= 3, "the sweep never cancelled before COMMIT"
    await assert_usable(async_store)


@pytest.mark.parametrize("kind", ["statement", "commit"])
async def test_a_store_batch_cancelled_as_a_statement_is_sent(
    async_store: AsyncTraceStore, backend: Backend, kind: str
) -> None:
    async def prepare(i: int) -> None:
        pass

    async def check(i: int, landing: Landing) -> None:
        await check_batch(backend, f"s{i}", landing)

    await sweep_statements(async_store, prepare, lambda i: async_store.store_batch(batch_of(f"s{i}")), check, kind)
    await assert_usable(async_store)


async def test_storing_a_batch_again_after_a_cancel_stores_it_once(
    async_store: AsyncTraceStore, backend: Backend
) -> None:
    # What to do after a cancel whose outcome is unknown: store the same traces again.
    batch = batch_of("again")
    for turns in (0, 5, 50):
        with Canceller(async_store) as canceller:
            await canceller.run(lambda: async_store.store_batch(batch), turns=turns)
        await async_store.store_batch(batch)
        assert stored(backend, "again") == (3, 3)
        assert [await async_store.get(trace.id) for trace in batch] == batch


# -- delete -----------------------------------------------------------------------------------------------------
async def check_delete(backend: Backend, tag: str, landing: Landing) -> None:
    traces, links = stored(backend, tag)
    assert (traces, links) in ((0, 0), (1, 1)), f"a trace without its links after a cancel at {landing}"
    if not landing.commits:
        assert traces == 1, f"cancelled before COMMIT was sent, yet deleted ({landing})"
    if landing.finished:
        assert traces == 0


async def test_a_cancelled_delete_deletes_nothing_before_commit(async_store: AsyncTraceStore, backend: Backend) -> None:
    async def prepare(i: int) -> None:
        await async_store.store_batch(batch_of(f"d{i}", size=1))
        await async_store.delete("no-such-trace")  # prepares the DELETE on the pooled connection

    async def check(i: int, landing: Landing) -> None:
        await check_delete(backend, f"d{i}", landing)

    landings = await sweep_turns(async_store, prepare, lambda i: async_store.delete(f"d{i}-0"), check)
    assert sum(not landing.commits for landing in landings) >= 3, "the sweep never cancelled before COMMIT"
    await assert_usable(async_store)


@pytest.mark.parametrize("kind", ["statement", "commit"])
async def test_a_delete_cancelled_as_a_statement_is_sent(
    async_store: AsyncTraceStore, backend: Backend, kind: str
) -> None:
    async def prepare(i: int) -> None:
        await async_store.store_batch(batch_of(f"d{i}", size=1))

    async def check(i: int, landing: Landing) -> None:
        await check_delete(backend, f"d{i}", landing)

    await sweep_statements(async_store, prepare, lambda i: async_store.delete(f"d{i}-0"), check, kind)
    await assert_usable(async_store)


# -- prune ------------------------------------------------------------------------------------------------------
# Three old traces in batches of two: three transactions (two traces, one, and a last pass that finds none).
PRUNED, PRUNE_BATCH = 3, 2


@pytest.mark.parametrize("kind", ["statement", "commit"])
async def test_a_cancelled_prune_deletes_whole_committed_batches_only(
    async_store: AsyncTraceStore, backend: Backend, kind: str
) -> None:
    async def prepare(i: int) -> None:
        # What a cancelled prune left behind: running it again finishes the job.
        await async_store.prune(CUTOFF, batch_size=PRUNE_BATCH)
        assert stored(backend, f"p{i - 1}") == (0, 0)
        await async_store.store_batch(batch_of(f"p{i}", size=PRUNED, created_at=T0))

    async def check(i: int, landing: Landing) -> None:
        traces, links = stored(backend, f"p{i}")
        deleted = PRUNED - traces
        # Each COMMIT ends one batch; the last one sent may or may not have landed.
        whole = {min(PRUNE_BATCH * n, PRUNED) for n in (landing.commits - 1, landing.commits) if n >= 0}
        assert deleted in whole, f"{deleted} traces deleted after a cancel at {landing}"
        assert links == traces, "deleted traces left their links behind"
        if landing.finished:
            assert deleted == PRUNED
        if backend.is_sqlite:  # each batch's WAL checkpoint lowers busy_timeout while it runs, then puts it back
            assert await busy_timeouts(async_store) <= {BUSY_TIMEOUT}, "a pooled connection kept the checkpoint's"

    landings = await sweep_statements(
        async_store, prepare, lambda i: async_store.prune(CUTOFF, batch_size=PRUNE_BATCH), check, kind
    )
    assert len(landings) >= 4  # three batches, each cancelled as it is sent, or its COMMIT
    await assert_usable(async_store)


# -- the SQLite upkeep after a committed write ---------------------------------------------------------------------
async def test_a_cancel_during_the_upkeep_after_commit_leaves_the_pool_as_configured(
    db_path: Path, backend: Backend
) -> None:
    # A WAL checkpoint after every write: it lowers busy_timeout while it waits for readers, then puts it back.
    async with AsyncTraceStore(backend.async_url, wal_checkpoint_bytes=1) as store:
        upkeep = store._upkeep
        assert upkeep is not None

        async def prepare(i: int) -> None:
            pass

        async def check(i: int, landing: Landing) -> None:
            await check_batch(backend, f"u{i}", landing)
            assert await busy_timeouts(store) <= {BUSY_TIMEOUT}, (
                f"a pooled connection kept the checkpoint's ({landing})"
            )

        # Each statement in turn, the checkpoint's among them: BEGIN, the INSERTs, COMMIT, then the upkeep.
        landings = await sweep_statements(store, prepare, lambda i: store.store_batch(batch_of(f"u{i}")), check)
        assert sum(landing.commits > 0 and not landing.finished for landing in landings) > 3
        assert upkeep.checkpoints > 0
        await assert_usable(store)
