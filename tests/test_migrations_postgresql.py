"""What the migrations do only on PostgreSQL: CREATE/DROP INDEX CONCURRENTLY outside transactions, and
recovering from an interrupted concurrent build (an INVALID index left behind)."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from sqlalchemy import Connection, create_engine, event, text

from tests.backends import Backend
from tracestore import MigrationError, TraceStore
from tracestore.dialects.postgresql import index_is_valid
from tracestore.migrate import current_revision, head_revision, online, upgrade
from tracestore.migrate.schema import column_names, session_index_drift
from tracestore.models import SESSION_TIME_INDEX

from .oracle import oracle_query
from .test_migrations import legacy_rows, legacy_traces


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def upgrade_in_a_thread(url: str, revision: str) -> tuple[threading.Thread, list[BaseException]]:
    """Start upgrade(url, revision) in a thread; the list receives what it raised, if anything."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            upgrade(url, revision)
        except BaseException as exc:  # the test inspects it
            failure.append(exc)

    migration = threading.Thread(target=run)
    migration.start()
    return migration, failure


def test_an_interrupted_concurrent_build_is_detected_and_rebuilt(pg: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """Cancel 0002's CREATE INDEX CONCURRENTLY while it waits for an old snapshot: the index stays behind
    INVALID and the revision unrecorded. The next upgrade drops it, builds it again and checks it."""
    pg.create_legacy(legacy_rows(), orphan_links=[("gone-1", "s-ascii")])
    upgrade(pg.url, "0001")

    # A transaction holding a snapshot and no lock on trace_sessions: the concurrent build waits for it.
    snapshot_holder = pg.engine.connect()
    snapshot_holder.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
    snapshot_holder.exec_driver_sql("SELECT count(*) FROM pg_class")

    migration, failure = upgrade_in_a_thread(pg.url, "0002")
    monitor = create_engine(pg.sync_url, isolation_level="AUTOCOMMIT")
    try:
        with monitor.connect() as connection:
            building = text(
                "SELECT pid, phase FROM pg_stat_progress_create_index WHERE index_relid = to_regclass(:name)"
            )

            def build_is_waiting() -> bool:
                row = connection.execute(building, {"name": SESSION_TIME_INDEX}).first()
                return row is not None and row.phase.startswith("waiting")

            wait_for(build_is_waiting)
            pid = connection.execute(building, {"name": SESSION_TIME_INDEX}).scalar_one()
            assert connection.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": pid}).scalar()
        migration.join(30)
        assert not migration.is_alive()
    finally:
        snapshot_holder.rollback()
        snapshot_holder.close()
        monitor.dispose()
    assert failure and "canceling statement" in str(failure[0]), failure

    with pg.raw() as connection:
        assert index_is_valid(connection, SESSION_TIME_INDEX) is False  # left behind, unusable
        assert "INVALID" in (session_index_drift(connection) or "")
    assert current_revision(pg.url) == "0001"  # 0002 not recorded: the next upgrade runs it again

    with caplog.at_level(logging.WARNING, logger="tracestore.migrate"):
        upgrade(pg.url)
    assert any("was INVALID" in record.getMessage() for record in caplog.records)
    assert current_revision(pg.url) == head_revision()
    with pg.raw() as connection:
        assert index_is_valid(connection, SESSION_TIME_INDEX) is True
        assert session_index_drift(connection) is None
    assert pg.junction_drift() == []
    traces = legacy_traces()
    with TraceStore(pg.url, auto_upgrade=False) as store:
        for uid in ("s-ascii", "セッション", "emoji-🚀"):
            assert store.get_by_session_uid(uid) == oracle_query(traces, session_uid=uid)


def test_index_ddl_runs_outside_transactions(pg: Backend) -> None:
    """Every CREATE/DROP INDEX of 0002 and 0004 on a legacy database is CONCURRENTLY (which PostgreSQL
    refuses inside a transaction block, so they ran in autocommit)."""
    pg.create_legacy(legacy_rows())
    statements: list[str] = []
    engine = create_engine(pg.sync_url)

    @event.listens_for(engine, "before_cursor_execute")
    def record(conn, cursor, statement, *args):  # type: ignore[no-untyped-def]
        if "INDEX" in statement.upper() and statement.lstrip().upper().startswith(("CREATE", "DROP")):
            statements.append(" ".join(statement.split()))

    try:
        upgrade(engine)
    finally:
        engine.dispose()
    index_ddl = [s for s in statements if "idx_trace_sessions" in s]
    assert index_ddl == [
        "DROP INDEX CONCURRENTLY IF EXISTS idx_trace_sessions_trace",
        f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {SESSION_TIME_INDEX} ON trace_sessions "
        "(session_uid, created_at, trace_id) WHERE created_at IS NOT NULL",
        "DROP INDEX CONCURRENTLY IF EXISTS idx_trace_sessions_uid",
    ], statements


def hold_a_read_lock(pg: Backend) -> Connection:
    """A transaction that has read trace_sessions and stays open: it holds ACCESS SHARE on the table."""
    connection = pg.engine.connect()
    connection.exec_driver_sql("BEGIN")
    connection.exec_driver_sql("SELECT count(*) FROM trace_sessions")
    return connection


def test_add_column_steps_aside_for_a_long_transaction_and_never_stalls_readers(
    pg: Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """ALTER TABLE queued behind a long transaction would make every new query of the table queue
    behind it. With a lock timeout per try, readers arriving meanwhile wait at most that long."""
    pg.create_legacy(legacy_rows())
    upgrade(pg.url, "0001")
    monkeypatch.setattr(online, "LOCK_TIMEOUT_MS", 200)
    long_transaction = hold_a_read_lock(pg)
    with caplog.at_level(logging.INFO, logger="tracestore.migrate"):
        migration, failure = upgrade_in_a_thread(pg.url, "0002")
        try:
            wait_for(lambda: any("table lock busy" in r.getMessage() for r in caplog.records))
            reader_waits = []
            for _ in range(5):  # readers arriving while the migration keeps trying
                started = time.monotonic()
                assert pg.rows("SELECT count(*) FROM trace_sessions")[0][0] > 0
                reader_waits.append(time.monotonic() - started)
            assert max(reader_waits) < 1.0, reader_waits  # at most about one 0.2 s try, never the whole wait
            assert migration.is_alive()  # still waiting for the long transaction
        finally:
            long_transaction.rollback()
            long_transaction.close()
        migration.join(60)
    assert not failure, failure
    assert current_revision(pg.url) == "0002"
    with pg.raw() as connection:
        assert "created_at" in column_names(connection, "trace_sessions")


def test_add_column_gives_up_with_a_clear_error_and_changes_nothing(
    pg: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    pg.create_legacy(legacy_rows())
    upgrade(pg.url, "0001")
    before = pg.dump()
    monkeypatch.setattr(online, "LOCK_TIMEOUT_MS", 100)
    monkeypatch.setattr(online, "LOCK_WAIT_SECONDS", 0.5)
    long_transaction = hold_a_read_lock(pg)
    try:
        with pytest.raises(MigrationError, match=r"could not take its table lock .* a long transaction holds"):
            upgrade(pg.url, "0002")
    finally:
        long_transaction.rollback()
        long_transaction.close()
    assert pg.dump() == before  # no column, no trigger, no index, still 0001
    assert current_revision(pg.url) == "0001"
    upgrade(pg.url)  # and once the transaction has ended, the upgrade goes through
    assert current_revision(pg.url) == head_revision()
