"""What the migrations do only on PostgreSQL: CREATE/DROP INDEX CONCURRENTLY outside transactions, and
recovering from an interrupted concurrent build (an INVALID index left behind)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import URL, create_engine, event, text

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.migrate import current_revision, head_revision, upgrade
from tracestore.models import SESSION_TIME_INDEX
from tracestore.schema import index_is_valid, session_index_drift

from .oracle import oracle_query
from .test_migrations import legacy_rows, legacy_traces


@pytest.fixture
def pg(pg_url: URL) -> Iterator[Backend]:
    backend = Backend("postgresql", pg_url)
    try:
        yield backend
    finally:
        backend.dispose()


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_interrupted_concurrent_build_is_detected_and_rebuilt(pg: Backend, caplog: pytest.LogCaptureFixture) -> None:
    """Cancel 0002's CREATE INDEX CONCURRENTLY while it waits for an old snapshot: the index stays behind
    INVALID and the revision unrecorded. The next upgrade drops it, builds it again and checks it."""
    pg.create_legacy(legacy_rows(), orphan_links=[("gone-1", "s-ascii")])
    upgrade(pg.url, "0001")

    # A transaction holding a snapshot and no lock on trace_sessions: the concurrent build waits for it.
    snapshot_holder = pg.engine.connect()
    snapshot_holder.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ")
    snapshot_holder.exec_driver_sql("SELECT count(*) FROM pg_class")

    failure: list[BaseException] = []

    def run_0002() -> None:
        try:
            upgrade(pg.url, "0002")
        except BaseException as exc:
            failure.append(exc)

    migration = threading.Thread(target=run_0002)
    migration.start()
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
