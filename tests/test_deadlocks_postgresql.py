"""PostgreSQL: migrations and repairs that meet the application's writers finish instead of aborting.

A transaction PostgreSQL picks as a deadlock victim is rolled back whole, so a backfill batch or a
schema step can simply run again; the schema steps also take their table locks in the order the
application takes them (traces, then trace_sessions), so they do not deadlock with a cascading delete
in the first place. The deadlocks here are real ones, set up step by step between two sessions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, create_engine, text

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.migrate import current_revision, finalize, head_revision, upgrade
from tracestore.migrate.verify import verify
from tracestore.testing import make_traces

from .test_migrations import legacy_rows


def in_a_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `work` in a thread; the list receives its result or what it raised."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except BaseException as exc:  # the test inspects it
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def waiting_for_a_lock(pg: Backend, *, besides: int) -> bool:
    """Whether a session other than `besides` (a backend pid) waits for a lock."""
    rows = pg.rows(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> :pid AND datname ="
        " current_database()",
        {"pid": besides},
    )
    return bool(rows[0][0])


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def other_session(pg: Backend) -> tuple[Connection, int]:
    """A session of 'the application', slow to detect deadlocks, so the migration's side detects them first."""
    engine = create_engine(pg.sync_url)
    connection = engine.connect()
    connection.exec_driver_sql("SET deadlock_timeout = '20s'")  # superuser setting; the test server's role is one
    pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
    return connection, int(pid)


def test_a_backfill_batch_chosen_as_a_deadlock_victim_runs_again(pg: Backend) -> None:
    pg.create_legacy(legacy_rows())
    upgrade(pg.url, "0002")
    last = pg.rows("SELECT max(trace_id) FROM trace_sessions")[0][0]
    app, app_pid = other_session(pg)
    try:
        app.exec_driver_sql("UPDATE trace_sessions SET session_uid = session_uid WHERE trace_id = %s", (last,))
        # One batch for the whole table: it locks the first links, then waits for the last one.
        thread, outcome = in_a_thread(lambda: upgrade(pg.url, batch_size=10_000))
        wait_for(lambda: waiting_for_a_lock(pg, besides=app_pid))
        # The application now wants the links the batch holds: a deadlock, which the batch's session detects.
        app.exec_driver_sql("UPDATE trace_sessions SET session_uid = session_uid WHERE trace_id <> %s", (last,))
        app.commit()
    finally:
        app.close()
    thread.join(60)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert current_revision(pg.url) == head_revision()
    assert pg.junction_drift() == []


def test_the_schema_step_takes_traces_first_and_never_deadlocks_with_a_writer(pg: Backend) -> None:
    """The previous release, mid-transaction, has written a trace and is about to write its link when the
    upgrade's add-column step starts: the step waits for traces first, so the writer's link goes in."""
    pg.create_legacy(legacy_rows())
    upgrade(pg.url, "0001")
    app, app_pid = other_session(pg)
    try:
        app.exec_driver_sql("INSERT INTO traces VALUES ('mid', 'a', 'b', '{}', '{}', 1.0, 1.0)")
        thread, outcome = in_a_thread(lambda: upgrade(pg.url, "0002"))
        wait_for(lambda: waiting_for_a_lock(pg, besides=app_pid))
        app.exec_driver_sql("INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('mid', 's')")
        app.commit()
    finally:
        app.close()
    thread.join(60)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert current_revision(pg.url) == "0002"
    upgrade(pg.url)
    assert pg.rows("SELECT created_at FROM trace_sessions WHERE trace_id = 'mid'") == [(1.0,)]


def test_finalize_takes_traces_first_and_never_deadlocks_with_a_cascading_delete(pg: Backend) -> None:
    with TraceStore(pg.url) as store:
        store.store_batch(make_traces(50, session_uids=["s"], seed=3))
    victim = pg.rows("SELECT id FROM traces ORDER BY id LIMIT 1")[0][0]
    app, app_pid = other_session(pg)
    try:
        app.exec_driver_sql("LOCK TABLE traces IN ROW EXCLUSIVE MODE")  # a delete of traces has begun
        thread, outcome = in_a_thread(lambda: finalize(pg.url))
        wait_for(lambda: waiting_for_a_lock(pg, besides=app_pid))
        app.exec_driver_sql("DELETE FROM traces WHERE id = %s", (victim,))  # ...and cascades to trace_sessions
        app.commit()
    finally:
        app.close()
    thread.join(60)
    assert outcome and not isinstance(outcome[0], BaseException), outcome
    assert outcome[0].dropped  # the triggers went
    assert pg.rows("SELECT count(*) FROM trace_sessions WHERE trace_id = :id", {"id": victim}) == [(0,)]


def test_verify_fix_during_a_prune_finishes_and_loses_nothing(pg: Backend) -> None:
    """The adversarial run's case: verify --fix repairing a seventh of the links while prune deletes."""
    now = time.time()
    old = make_traces(6_000, session_uids=[f"s{i}" for i in range(40)], since=now - 7_200, until=now - 3_700, seed=1)
    new = make_traces(6_000, session_uids=[f"s{i}" for i in range(40)], since=now - 3_500, until=now, seed=2)
    with TraceStore(pg.url) as store:
        for start in range(0, 6_000, 2_000):
            store.store_batch(old[start : start + 2_000] + new[start : start + 2_000])
    finalize(pg.url)
    with pg.raw() as connection:
        connection.execute(text("UPDATE trace_sessions SET created_at = NULL WHERE ascii(md5(trace_id)) % 7 = 0"))
    broken = pg.rows("SELECT count(*) FROM trace_sessions WHERE created_at IS NULL")[0][0]
    assert broken > 1_000

    def prune() -> Any:
        with TraceStore(pg.url) as store:
            return store.prune(now - 3_600, batch_size=50)

    pruning, pruned = in_a_thread(prune)
    repairing, repaired = in_a_thread(lambda: verify(pg.url, fix=True, batch_size=50))
    pruning.join(120)
    repairing.join(120)
    assert pruned and not isinstance(pruned[0], BaseException), pruned
    assert repaired and not isinstance(repaired[0], BaseException), repaired
    assert pruned[0].deleted == len(old)
    assert verify(pg.url).ok
    assert pg.junction_drift() == []
    expected = {(t.id, uid) for t in new for uid in t.session_uids}
    assert set(pg.rows("SELECT trace_id, session_uid FROM trace_sessions")) == expected
