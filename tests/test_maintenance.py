"""The store's SQLite upkeep: a WAL that overlapping readers cannot grow without bound, fresh statistics."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
import time
from pathlib import Path

import sqlalchemy

from tracestore import AsyncTraceStore, TraceStore
from tracestore.retention.upkeep import refresh_statistics
from tracestore.testing import make_traces

MB = 1024 * 1024


def wal_size(path: Path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


class OverlappingReaders:
    """Two read transactions taking turns so that one is always open: the WAL is never free of readers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stop = threading.Event()
        self.cycles = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        connections = [sqlite3.connect(self.path, isolation_level=None, check_same_thread=False) for _ in range(2)]
        held: sqlite3.Connection | None = None
        while not self.stop.is_set():
            for connection in connections:
                connection.execute("BEGIN")
                # The snapshot is taken by the first read, so the new reader is in before the old one leaves.
                connection.execute("SELECT count(*) FROM trace_sessions WHERE session_uid = 's'").fetchone()
                if held is not None:
                    held.execute("COMMIT")
                held = connection
                self.cycles += 1
                time.sleep(0.01)
        if held is not None:
            held.execute("COMMIT")
        for connection in connections:
            connection.close()

    def __enter__(self) -> OverlappingReaders:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def write_under_overlapping_readers(path: Path, *, wal_limit: int) -> tuple[int, int, int]:
    """150 batches of 50 traces (2 KB payloads) with readers always open: (largest WAL, checkpoints, reader cycles)."""
    with TraceStore(f"sqlite:///{path}", wal_checkpoint_bytes=wal_limit) as store:
        upkeep = store._upkeep
        assert upkeep is not None
        store.store_batch(make_traces(10, session_uids=["s"], seed=0))
        largest = 0
        with OverlappingReaders(path) as readers:
            time.sleep(0.05)
            for index in range(150):
                store.store_batch(make_traces(50, session_uids=["s", f"b{index}"], payload_bytes=2000, seed=index + 1))
                largest = max(largest, wal_size(path))
        return largest, upkeep.checkpoints, readers.cycles


def test_overlapping_readers_starve_the_autocheckpoint_and_the_store_bounds_the_wal(tmp_path: Path) -> None:
    # The problem: SQLite's autocheckpoint copies pages back, but restarts the WAL from its beginning only
    # when no reader uses it. With readers that always overlap it never does: the WAL grows with every
    # write, here past three times the database it belongs to (105 MB for 33 MB when measured).
    starved = tmp_path / "starved.db"
    largest, checkpoints, cycles = write_under_overlapping_readers(starved, wal_limit=0)  # 0: the store's fix off
    assert checkpoints == 0 and cycles > 10
    assert largest > 20 * MB
    assert largest > os.path.getsize(starved)
    # The fix: past wal_limit the writer checkpoints with TRUNCATE, which waits (bounded) for the readers
    # of older snapshots only; readers starting meanwhile read the database file.
    bounded = tmp_path / "bounded.db"
    largest, checkpoints, cycles = write_under_overlapping_readers(bounded, wal_limit=2 * MB)
    assert checkpoints > 0 and cycles > 10
    assert largest < 4 * MB  # the limit plus what the writes between two checks add
    with sqlite3.connect(bounded) as connection:
        assert connection.execute("SELECT count(*) FROM traces").fetchone() == (7510,)
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_the_async_store_checkpoints_too(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with AsyncTraceStore(f"sqlite+aiosqlite:///{path}", wal_checkpoint_bytes=64 * 1024) as store:
        upkeep = store._upkeep
        assert upkeep is not None
        for index in range(5):
            await store.store_batch(make_traces(200, session_uids=["s"], payload_bytes=1000, seed=index))
            assert wal_size(path) <= 64 * 1024  # truncated right after the write that passed the limit
        assert upkeep.checkpoints == 5


def stats(path: Path) -> dict[str, int]:
    """Rows per table as sqlite_stat1 says (the planner's belief)."""
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT tbl, max(CAST(stat AS INTEGER)) FROM sqlite_stat1 GROUP BY tbl").fetchall()
    return {table: count for table, count in rows if table in ("traces", "trace_sessions")}


def test_statistics_follow_the_tables_growth_during_writes_and_on_close(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    with TraceStore(f"sqlite:///{path}", analyze_every=10) as store:
        assert stats(path) == {}  # 0004's ANALYZE ran on empty tables: the planner knows nothing
        for index in range(9):
            store.store_batch(make_traces(100, session_uids=["s", f"b{index}"], seed=index))
        assert stats(path) == {}
        store.store_batch(make_traces(100, session_uids=["s"], seed=99))  # the 10th write transaction
        # Estimates (ANALYZE read at most analysis_limit rows per index) of 1,000 traces and 1,900 links.
        assert sorted(stats(path)) == ["trace_sessions", "traces"]
        assert all(500 < count < 4000 for count in stats(path).values())
        for index in range(10, 19):  # grows under 10x: nothing to do, and nothing is done
            store.store_batch(make_traces(100, session_uids=["s"], seed=index))
        before = stats(path)
    assert stats(path) == before  # close checked, found them fresh enough
    with TraceStore(f"sqlite:///{path}", analyze_every=0) as store:  # only on close
        store.store_batch(make_traces(9000, session_uids=["s"], seed=1000))
        assert stats(path) == before
    after = stats(path)
    assert after["traces"] > 5 * before["traces"]  # 11,900 traces now


def test_refresh_statistics_is_bounded_and_cheap_when_fresh(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    with TraceStore(f"sqlite:///{path}") as store:
        store.store_batch(make_traces(3000, session_uids=["s"], seed=1))
    with sqlite3.connect(path, isolation_level=None) as connection:
        assert refresh_statistics(connection.cursor()) == []  # close analyzed them already
        connection.execute("DELETE FROM sqlite_stat1")
        executed: list[str] = []
        connection.set_trace_callback(executed.append)
        assert refresh_statistics(connection.cursor()) == ["traces", "trace_sessions"]
        analyzed = executed.index("ANALYZE traces")
        assert "PRAGMA analysis_limit=400" in executed[:analyzed]
        # The limit is a setting of the connection, which may be an application's: put back after.
        assert connection.execute("PRAGMA analysis_limit").fetchone() == (0,)


def checkpointer_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == "tracestore-checkpointer"}


def test_the_checkpointer_thread_copies_the_wal_back_after_writes_and_stops_on_close(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    with TraceStore(f"sqlite:///{path}") as store:
        checkpointer = store._checkpointer
        assert checkpointer is not None and checkpointer.thread is None  # nothing written yet
        for index in range(3):
            store.store_batch(make_traces(100, session_uids=["s"], seed=index))
        checkpointer.idle()
        thread = checkpointer.thread
        assert checkpointer.checkpoints >= 1 and thread is not None and thread.is_alive()
        # Far below SQLite's autocheckpoint threshold, yet the main file alone holds every trace: the thread
        # copied the WAL into it while the store went on.
        assert wal_size(path) > 0
        alone = tmp_path / "main-file-only.db"
        alone.write_bytes(path.read_bytes())
        with sqlite3.connect(alone) as connection:
            assert connection.execute("SELECT count(*) FROM traces").fetchone() == (300,)
    assert not thread.is_alive()


def test_a_store_dropped_without_close_ends_its_checkpointer_thread(tmp_path: Path) -> None:
    store = TraceStore(f"sqlite:///{tmp_path / 'traces.db'}")
    store.store_batch(make_traces(10, session_uids=["s"]))
    assert store._checkpointer is not None
    thread = store._checkpointer.thread
    assert thread is not None and thread.is_alive()
    store._engine.dispose()
    del store
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_no_checkpointer_on_an_application_engine_or_when_checkpoints_are_off(tmp_path: Path) -> None:
    before = checkpointer_threads()  # other tests' stores, not closed yet, may have theirs
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    try:
        with TraceStore(engine) as store:  # the application's database keeps its own checkpoints
            store.store_batch(make_traces(10, session_uids=["s"]))
            assert store._checkpointer is None and checkpointer_threads() <= before
    finally:
        engine.dispose()
    with TraceStore(f"sqlite:///{tmp_path / 'off.db'}", wal_checkpoint_bytes=0) as store:
        store.store_batch(make_traces(10, session_uids=["s"]))
        assert store._checkpointer is None and checkpointer_threads() <= before


async def test_the_async_store_checkpoints_from_the_thread_too(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    async with AsyncTraceStore(f"sqlite+aiosqlite:///{path}") as store:
        checkpointer = store._checkpointer
        assert checkpointer is not None
        await store.store_batch(make_traces(100, session_uids=["s"]))
        await asyncio.to_thread(checkpointer.idle)
        thread = checkpointer.thread
        assert thread is not None
        alone = tmp_path / "main-file-only.db"
        alone.write_bytes(path.read_bytes())
        with sqlite3.connect(alone) as connection:
            assert connection.execute("SELECT count(*) FROM traces").fetchone() == (100,)
    assert not thread.is_alive()
