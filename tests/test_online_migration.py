"""Upgrading while the application runs: answers during an unfinished backfill, one migration at a time.

The partial state is the real one: revision 0002 committed, some backfill batches committed (rowid
ranges filled, the position saved), the rest still NULL, and writes of both releases in between.
"""

from __future__ import annotations

import itertools
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import text

from tests.legacy import create_legacy_db
from tests.oracle import make_trace, oracle_query
from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.errors import SchemaOutOfDateError
from tracestore.migrate import current_revision, head_revision, upgrade
from tracestore.migrate.backfill import PROGRESS_TABLE
from tracestore.migrate.lock import lock_path, migration_lock, migration_running

T0 = 1_760_000_000.0
SESSIONS = ["s-a", "s-b", "sé-ü ☃", "s-tie", "s-empty-window"]


def legacy_dataset(seed: int = 7) -> list[TraceContext]:
    """Ties on created_at, unicode ids, multi-session traces, a large payload, an old-only session."""
    rng = random.Random(seed)
    traces = []
    for n in range(400):
        created = T0 + (n // 3)  # three traces share each second: ties broken by id
        sessions = tuple(rng.sample(SESSIONS[:4], rng.choice([1, 1, 2, 3])))
        traces.append(make_trace(id=f"t-{n:04d}-ü", created_at=created, updated_at=created, session_uids=sessions))
    traces.append(make_trace(id="big", data={"blob": "x" * 300_000}, created_at=T0 + 50, session_uids=("s-a",)))
    traces.append(make_trace(id="old", created_at=T0 - 10_000, session_uids=("s-empty-window",)))
    return traces


def legacy_rows(traces: list[TraceContext]) -> list[tuple]:
    return [
        (t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at, t.session_uids)
        for t in traces
    ]


def half_backfilled(path: Path, traces: list[TraceContext]) -> list[TraceContext]:
    """Revision 0002 plus the first third of the backfill committed; old-release writes on both sides.

    Returns the traces the oracle must see.
    """
    create_legacy_db(path, legacy_rows(traces), orphan_links=[("ghost", "s-a")])
    url = f"sqlite:///{path}"
    upgrade(url, "0002")
    with sqlite3.connect(path) as connection:  # what the 0003 backfill's first batches leave behind
        (rows,) = connection.execute("SELECT max(rowid) FROM trace_sessions").fetchone()
        filled = rows // 3
        connection.execute(
            "UPDATE trace_sessions SET created_at = (SELECT created_at FROM traces WHERE id = trace_id)"
            " WHERE rowid <= ?",
            (filled,),
        )
        connection.execute(f"CREATE TABLE {PROGRESS_TABLE} (task TEXT PRIMARY KEY, last_rowid INTEGER NOT NULL)")
        connection.execute(f"INSERT INTO {PROGRESS_TABLE} VALUES ('trace_sessions.created_at', ?)", (filled,))
    written = [make_trace(id=f"new-{n}", created_at=T0 + 200 + n, session_uids=("s-b", "s-new")) for n in range(5)]
    with sqlite3.connect(path) as old_release:  # the previous release keeps writing, knowing no created_at
        for trace in written:
            old_release.execute(
                "INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?)",
                (trace.id, trace.context_type, trace.namespace, '{"k": 1}', "{}", trace.created_at, trace.updated_at),
            )
            old_release.executemany(
                "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)",
                [(trace.id, uid) for uid in trace.session_uids],
            )
        # ...and moves a trace the backfill has not reached yet into the future.
        old_release.execute("UPDATE traces SET created_at = ? WHERE id = 't-0399-ü'", (T0 + 10_000,))
    moved = next(t for t in traces if t.id == "t-0399-ü")
    moved.created_at = T0 + 10_000
    return traces + written


QUERIES = list(
    itertools.product(
        [*SESSIONS, "s-new", "missing"],
        [None, T0, T0 + 66, T0 + 66.5, T0 + 100_000],  # everything, inclusive tie boundary, empty window
        [None, 1, 7, 1000],
    )
)


def assert_answers_like_the_oracle(store: TraceStore, expected: list[TraceContext]) -> None:
    for uid, since, limit in QUERIES:
        got = [trace.id for trace in store.get_by_session_uid(uid, since=since, limit=limit)]
        assert got == [t.id for t in oracle_query(expected, session_uid=uid, since=since, limit=limit)], (
            uid,
            since,
            limit,
        )


def test_partial_backfill_answers_like_the_oracle(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "partial.db"
    expected = half_backfilled(path, legacy_dataset())
    url = f"sqlite:///{path}"
    with sqlite3.connect(path) as connection:  # the state is really partial
        assert connection.execute("SELECT count(*) FROM trace_sessions WHERE created_at IS NULL").fetchone()[0] > 100
    with TraceStore(url, auto_upgrade=False) as store:
        assert "session queries use the legacy join" in caplog.text
        assert not any("idx_trace_sessions_uid_time" in line for line in store.explain("s-a", since=T0))
        assert_answers_like_the_oracle(store, expected)
        several = [t.id for t in store.get_by_session_uids(["s-a", "s-tie", "s-new"], since=T0 + 66, limit=25)]
        matching = [t for t in expected if {"s-a", "s-tie", "s-new"} & set(t.session_uids) and t.created_at >= T0 + 66]
        assert several == [t.id for t in sorted(matching, key=lambda t: (t.created_at, t.id), reverse=True)[:25]]
        for uid in SESSIONS:  # keyset pages too, across filled and unfilled links
            paged = [t.id for t in store.iter_session(uid, since=T0 + 10, page_size=7)]
            assert paged == [t.id for t in oracle_query(expected, session_uid=uid, since=T0 + 10)]
        # This release writes during the migration too, and its traces are answered at once.
        mine = make_trace(id="mine", created_at=T0 + 300, session_uids=("s-a",))
        store.store(mine)
        expected.append(mine)
        assert_answers_like_the_oracle(store, expected)

        upgrade(url)  # the migration finishes while the store is open...
        assert_answers_like_the_oracle(store, expected)
        # ...and the same store switches to the composite index.
        assert any("idx_trace_sessions_uid_time" in line for line in store.explain("s-a", since=T0))


async def test_partial_backfill_answers_like_the_oracle_async(tmp_path: Path) -> None:
    path = tmp_path / "partial.db"
    expected = half_backfilled(path, legacy_dataset(seed=8))
    async with AsyncTraceStore(f"sqlite+aiosqlite:///{path}", auto_upgrade=False) as store:
        for uid, since, limit in QUERIES:
            got = [trace.id for trace in await store.get_by_session_uid(uid, since=since, limit=limit)]
            assert got == [t.id for t in oracle_query(expected, session_uid=uid, since=since, limit=limit)]
        upgrade(f"sqlite:///{path}")
        assert any("idx_trace_sessions_uid_time" in line for line in await store.explain("s-a", since=T0))
        assert [t.id for t in await store.get_by_session_uid("s-b", since=T0)] == [
            t.id for t in oracle_query(expected, session_uid="s-b", since=T0)
        ]


HOLD_LOCK = """
import sys, time
from sqlalchemy.engine import make_url
from tracestore.migrate.lock import migration_lock
with migration_lock(make_url(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_lock_in_another_process(url: str, seconds: float) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, url, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "locked"
    return process


def test_auto_upgrade_during_another_migration_answers_instead_of_migrating_twice(tmp_path: Path) -> None:
    path = tmp_path / "busy.db"
    expected = half_backfilled(path, legacy_dataset(seed=9))
    url = f"sqlite:///{path}"
    holder = hold_lock_in_another_process(url, 30)
    try:
        assert migration_running(sa_create_engine(url).url)
        with TraceStore(url) as store:  # auto_upgrade=True, but someone else is migrating
            assert current_revision(url) == "0002"  # it did not start a second migration
            assert_answers_like_the_oracle(store, expected)
    finally:
        holder.kill()
        holder.wait()
    assert not migration_running(sa_create_engine(url).url)  # a killed holder leaves no lock behind
    with TraceStore(url) as store:  # nobody migrating now: the store finishes the upgrade itself
        assert current_revision(url) == head_revision()
        assert_answers_like_the_oracle(store, expected)


def test_second_upgrade_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    create_legacy_db(path, legacy_rows(legacy_dataset()))
    url = f"sqlite:///{path}"
    holder = hold_lock_in_another_process(url, 2.0)
    started = time.monotonic()
    try:
        upgrade(url)  # blocks until the holder exits, then runs from the revision it finds
    finally:
        holder.wait()
    assert time.monotonic() - started >= 1.5
    assert current_revision(url) == head_revision()
    assert Path(lock_path(sa_create_engine(url).url) or "").exists()


def test_too_old_for_migration_time_reads_is_still_refused(tmp_path: Path) -> None:
    path = tmp_path / "legacy.db"
    create_legacy_db(path, legacy_rows(legacy_dataset()))
    url = f"sqlite:///{path}"
    upgrade(url, "0001")
    with pytest.raises(SchemaOutOfDateError, match="tracestore upgrade"):
        TraceStore(url, auto_upgrade=False)


def test_lock_path_only_for_files() -> None:
    from sqlalchemy.engine import make_url

    assert lock_path(make_url("sqlite:///:memory:")) is None
    assert lock_path(make_url("sqlite://")) is None
    assert lock_path(make_url("postgresql://u@h/db")) is None
    assert lock_path(make_url("sqlite:////data/t.db")) == "/data/t.db-migration.lock"
    with migration_lock(make_url("sqlite://")):
        pass


def test_store_reads_do_not_open_transactions_on_the_version_table(tmp_path: Path) -> None:
    """While migrating, every read re-checks the revision; the check must not leave a lock behind."""
    path = tmp_path / "partial.db"
    half_backfilled(path, legacy_dataset())
    url = f"sqlite:///{path}"
    with TraceStore(url, auto_upgrade=False) as store:
        store.get_by_session_uid("s-a")
        engine = sa_create_engine(url, connect_args={"timeout": 0.1})
        with engine.begin() as connection:  # a writer gets the lock at once
            connection.execute(text("UPDATE traces SET updated_at = updated_at WHERE id = 'old'"))
        engine.dispose()


HOLD_LOCK_THEN_UPGRADE = """
import sys, time
from sqlalchemy.engine import make_url
from tracestore.migrate import upgrade
from tracestore.migrate.lock import migration_lock
with migration_lock(make_url(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(1.0)  # a legacy file, locked, not yet at 0002: a store opening now must wait for 0002
    upgrade(sys.argv[1], "0002")  # nested: the lock this process holds is not taken twice
    time.sleep(30)
"""


def test_auto_upgrade_waits_for_another_migration_to_reach_servable_revision(tmp_path: Path) -> None:
    path = tmp_path / "starting.db"
    traces = legacy_dataset(seed=10)
    create_legacy_db(path, legacy_rows(traces))
    url = f"sqlite:///{path}"
    process = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_THEN_UPGRADE, url], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "locked"
        with TraceStore(url) as store:  # waits about a second, then serves with migration-time reads
            assert current_revision(url) == "0002"
            assert_answers_like_the_oracle(store, traces)
    finally:
        process.kill()
        process.wait()
