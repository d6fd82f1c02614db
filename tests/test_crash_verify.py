"""kill -9 during `tracestore verify --fix`: the repair is a batched backfill, so whole batches are
repaired or not, the database stays consistent, and running it again finishes the job."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.backends import Backend
from tests.oracle import make_trace
from tracestore import TraceStore
from tracestore.migrate.verify import verify

TRACESTORE = Path(sys.executable).parent / "tracestore"
T0 = 1_750_000_000.0
TRACES = 20_000


def broken_links(backend: Backend) -> int:
    return int(backend.rows("SELECT count(*) FROM trace_sessions WHERE created_at IS NULL")[0][0])


def test_kill_during_verify_fix_leaves_whole_batches_and_a_rerun_finishes(backend: Backend) -> None:
    traces = [make_trace(id=f"t{i:06d}", created_at=T0 + i, session_uids=["s", f"s{i % 50}"]) for i in range(TRACES)]
    with TraceStore(backend.url) as store:
        for start in range(0, TRACES, 5_000):
            store.store_batch(traces[start : start + 5_000])
    with backend.raw() as connection:  # every link loses its copy of the time: 40,000 links to repair
        connection.exec_driver_sql("UPDATE trace_sessions SET created_at = NULL")
    total = broken_links(backend)
    assert total == 2 * TRACES

    repair = subprocess.Popen(
        [str(TRACESTORE), "--url", backend.url, "verify", "--fix", "--batch-size", "50"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while broken_links(backend) > total - 2_000:  # a few dozen batches have committed
            assert repair.poll() is None, "verify --fix finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        repair.send_signal(signal.SIGKILL)
    finally:
        repair.wait(timeout=30)
    left = broken_links(backend)
    assert 0 < left <= total - 2_000 and (total - left) % 50 == 0  # only whole batches of 50 were repaired
    assert all(copy is None for _, _, copy, _ in backend.junction_drift())  # repaired copies are right
    if backend.is_sqlite:
        assert backend.rows("PRAGMA integrity_check") == [("ok",)]

    result = subprocess.run(
        [str(TRACESTORE), "--url", backend.url, "verify", "--fix", "--batch-size", "50"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert broken_links(backend) == 0 and backend.junction_drift() == []
    assert verify(backend.url).ok
    with TraceStore(backend.url) as store:
        assert [t.id for t in store.get_by_session_uid("s7", limit=3)] == ["t019957", "t019907", "t019857"]
