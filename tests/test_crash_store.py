"""A writer killed with SIGKILL in the middle of store_batch: all of the batch or none, a clean database."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import text

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.migrate.verify import verify
from tracestore.testing import make_traces

WORKER = str(Path(__file__).parent / "load_worker.py")
BATCH = 2000


def markers(store: TraceStore) -> Counter[str]:
    return Counter(str(trace.metadata["marker"]) for trace in store.query(namespace="load"))


def still_works(backend: Backend, store: TraceStore) -> None:
    """The database opens cleanly, verify finds nothing wrong, and the store keeps writing and reading."""
    if backend.is_sqlite:
        assert backend.rows("PRAGMA integrity_check") == [("ok",)]
    report = verify(backend.url)
    assert report.ok, [check for check in report.problems]
    traces = make_traces(10, session_uids=["after-crash"], seed=3)
    store.store_batch(traces)
    assert {t.id for t in store.get_by_session_uid("after-crash")} == {t.id for t in traces}


def test_kill_inside_store_batch_leaves_none_of_the_batch(backend: Backend, store: TraceStore) -> None:
    blocker = None
    if not backend.is_sqlite:
        # PostgreSQL: an uncommitted row with the id of the batch's last trace makes the child's insert wait
        # inside its transaction (the worker's SQLite trace callback has no psycopg counterpart).
        blocker = backend.engine.connect()
        blocker.begin()
        blocker.execute(
            text(
                "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
                " VALUES ('stall-blocker', 't', 'blocker', '1', '{}', 1, 1)"
            )
        )
    child = subprocess.Popen(
        [sys.executable, WORKER, "stall", backend.url, str(BATCH)], stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(60, child.kill)  # a stall that never comes must not hang the suite
    watchdog.start()
    try:
        if backend.is_sqlite:
            assert child.stdout is not None
            assert child.stdout.readline() == "inside\n"  # every trace row written, the links next
        else:
            waiting = (
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'INSERT INTO traces%'"
            )
            while not backend.rows(waiting):
                assert child.poll() is None, "the writer ended before it could be killed"
                time.sleep(0.02)
            backend_pid = backend.rows(waiting)[0][0]
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
    if blocker is not None:
        blocker.rollback()
        blocker.close()
        # The server notices the dead client when the insert stops waiting, and rolls its transaction back.
        deadline = time.monotonic() + 30
        while backend.rows("SELECT 1 FROM pg_stat_activity WHERE pid = :pid", {"pid": backend_pid}):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert markers(store) == Counter()
    assert store.get("stall-blocker") is None
    still_works(backend, store)


def test_kills_at_random_moments_of_a_writing_loop_leave_only_whole_batches(
    backend: Backend, store: TraceStore
) -> None:
    rng = random.Random(6)
    for round_ in range(3):
        child = subprocess.Popen(
            [sys.executable, WORKER, "writer", backend.url, f"r{round_}", "30", "200"], stdout=subprocess.DEVNULL
        )
        stored_count = "SELECT count(*) FROM traces WHERE namespace = 'load'"
        before = backend.rows(stored_count)
        deadline = time.monotonic() + 60
        while backend.rows(stored_count) == before:  # writing has begun
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(rng.uniform(0.05, 0.5))  # somewhere in a batch, or in its COMMIT
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    stored = markers(store)
    assert len(stored) >= 3
    assert all(count == 200 for count in stored.values()), {m: n for m, n in stored.items() if n != 200}
    still_works(backend, store)
