"""Writers and readers in several processes on one database: nothing lost, no lock error, whole batches only."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.engine import create_engine
from tracestore.errors import StorageBusyError, StorageError
from tracestore.testing import make_traces

WORKER = str(Path(__file__).parent / "load_worker.py")
SECONDS = float(os.environ.get("TRACESTORE_LOAD_SECONDS", "3"))
BATCH = 20


def spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def report_of(process: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = process.communicate(timeout=SECONDS + 120)
    assert process.returncode == 0, f"a worker failed (rc {process.returncode}):\n{err}"
    return dict(json.loads(out))


def test_writer_and_reader_processes_lose_nothing_and_see_only_whole_batches(
    backend: Backend, store: TraceStore
) -> None:
    # Three writer processes (one on the async store) and two readers, all at once, for SECONDS.
    writers = [spawn("writer", backend.url, "w0", str(SECONDS), str(BATCH))]
    writers.append(spawn("writer", backend.url, "w1", str(SECONDS), str(BATCH)))
    writers.append(spawn("writer", backend.async_url, "w2", str(SECONDS), str(BATCH), "async"))
    readers = [spawn("reader", backend.url, str(SECONDS), str(BATCH)) for _ in range(2)]
    written = [report_of(process) for process in writers]  # a "database is locked" would fail its worker
    read = [report_of(process) for process in readers]

    acknowledged = [marker for report in written for marker in report["acknowledged"]]
    stored = Counter(str(trace.metadata["marker"]) for trace in store.query(namespace="load"))
    assert len(acknowledged) >= 3  # every writer got through at least once
    assert {marker: stored[marker] for marker in acknowledged} == dict.fromkeys(acknowledged, BATCH)
    assert all(count == BATCH for count in stored.values())  # no batch committed in part either
    assert [partial for report in read for partial in report["partial"]] == []
    if backend.is_sqlite:
        assert backend.rows("PRAGMA integrity_check") == [("ok",)]

    latencies = sorted(latency for report in read for latency in report["latencies"])
    assert len(latencies) > 10
    rows_per_second = len(acknowledged) * BATCH / max(report["seconds"] for report in written)
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    median = latencies[len(latencies) // 2] * 1000
    print(
        f"\n[{backend.name}] 3 writer processes, 2 reader processes, {SECONDS:g} s: {rows_per_second:,.0f} traces/s"
        f" stored in batches of {BATCH}; {len(latencies)} reads of the latest 200, median {median:.1f} ms,"
        f" p99 {p99:.1f} ms"
    )


# -- the retry, SQLite -------------------------------------------------------------------------------------
def impatient(store: TraceStore, *, busy_timeout_ms: int = 100, journal_mode: str | None = None) -> TraceStore:
    """The store's connections with a short busy_timeout (and another journal mode), set after tracestore's pragmas."""

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        if journal_mode is not None:
            dbapi_connection.execute(f"PRAGMA journal_mode={journal_mode}")

    event.listen(store.engine, "connect", on_connect)
    store.engine.dispose()
    return store


def hold(path: Path, statement: str, seconds: float) -> threading.Thread:
    """Another connection takes a lock (`statement`) now and keeps it for `seconds`."""
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("BEGIN IMMEDIATE" if statement == "write" else "BEGIN")
    if statement == "read":
        cursor = connection.execute("SELECT * FROM traces")  # an unfinished statement keeps the SHARED lock
        cursor.fetchone()

    def release() -> None:
        time.sleep(seconds)
        connection.execute("ROLLBACK")
        connection.close()

    thread = threading.Thread(target=release)
    thread.start()
    return thread


def count(path: Path) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute("SELECT count(*) FROM traces").fetchone()[0])


def test_a_write_outlasts_a_lock_held_longer_than_busy_timeout(db_path: Path) -> None:
    with TraceStore(f"sqlite:///{db_path}") as store:
        impatient(store, busy_timeout_ms=100)
        holder = hold(db_path, "write", 1.0)  # ten busy_timeouts: without the retry, "database is locked"
        store.store_batch(make_traces(50, session_uids=["s"], seed=1))
        holder.join()
    assert count(db_path) == 50


def test_past_the_deadline_the_write_fails_with_storage_busy_error_and_writes_nothing(db_path: Path) -> None:
    with TraceStore(f"sqlite:///{db_path}", retry_deadline=0.3) as store:
        impatient(store, busy_timeout_ms=50)
        holder = hold(db_path, "write", 1.5)
        with pytest.raises(StorageBusyError, match=r"stayed locked by other writers for 0.3 s .*nothing was written"):
            store.store_batch(make_traces(50, session_uids=["s"], seed=1))
        with pytest.raises(StorageBusyError, match="delete failed"):
            store.delete("no-such-id")
        holder.join()
        store.store_batch(make_traces(5, session_uids=["s"], seed=2))
    assert count(db_path) == 5


def test_locked_at_commit_is_not_retried(db_path: Path) -> None:
    # With a rollback journal, COMMIT needs every reader gone: a reader holding its SHARED lock makes the
    # COMMIT itself fail with "database is locked". The store's write path never runs a batch again once
    # its COMMIT was sent (on PostgreSQL a lost connection there leaves the outcome unknown).
    with TraceStore(f"sqlite:///{db_path}") as store:
        impatient(store, busy_timeout_ms=100, journal_mode="DELETE")
        store.store_batch(make_traces(1, session_uids=["s"], seed=1))
        holder = hold(db_path, "read", 1.0)
        with pytest.raises(StorageError, match=r"at COMMIT .*database is locked") as raised:
            store.store_batch(make_traces(50, session_uids=["s"], seed=2))
        assert not isinstance(raised.value, StorageBusyError)
        holder.join()
    assert count(db_path) == 1  # SQLAlchemy rolled the uncommitted batch back


def test_opening_a_rollback_journal_file_waits_for_its_writer_to_switch_it_to_wal(tmp_path: Path) -> None:
    # Leaving a rollback journal needs the exclusive lock, and SQLite answers "database is locked" at once, with
    # no busy handler, while a writer (here a previous release on a file not yet in WAL) holds the file.
    path = tmp_path / "legacy.db"
    with sqlite3.connect(path) as legacy:
        legacy.execute("CREATE TABLE traces (id TEXT PRIMARY KEY)")
    holder = hold(path, "write", 0.5)
    try:
        engine = create_engine(f"sqlite:///{path}")
        with engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()
    finally:
        holder.join()
