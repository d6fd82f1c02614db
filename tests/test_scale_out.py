"""Beyond one machine: reads from a real streaming replica, and trace_sessions partitioned by time for retention.

The replica is a real one: `pg_basebackup -R` from the tests' server (scripts/with-postgres), started
on a socket of its own as the user the primary runs as, once per session (fixture `standby`, about
two seconds). Partitioning runs tracestore.partitioning on a real database with data, then the store.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import URL, Engine, NullPool, create_engine, make_url
from sqlalchemy.exc import DBAPIError

from tests.backends import Backend
from tests.oracle import make_trace, merge_restore, oracle_query
from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.errors import MigrationError, StorageError
from tracestore.migrate import current_revision, finalize, head_revision, upgrade
from tracestore.migrate.verify import verify
from tracestore.models import SESSION_TIME_INDEX
from tracestore.retention.partitions import OLD_PARTITION, add_partitions, drop_partitions_before, partition, partitions


# -- the streaming replica ---------------------------------------------------------------------------------
def _raw(url: URL) -> Engine:
    """The tests' own engine: plain SQLAlchemy, autocommit, no pool left behind."""
    return create_engine(url.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT", poolclass=NullPool)


def _scalar(url: URL, sql: str) -> Any:
    engine = _raw(url)
    try:
        with engine.connect() as connection:
            result = connection.exec_driver_sql(sql)
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def standby(pg_server_url: URL) -> Iterator[URL]:
    """A hot standby of the tests' server, streaming from it; its server URL (same user, its own socket)."""
    host, port = pg_server_url.query.get("host"), pg_server_url.query.get("port")
    if not isinstance(host, str) or not os.path.isdir(host) or not isinstance(port, str):
        pytest.skip("a streaming replica needs the tests' server on a local Unix socket (scripts/with-postgres)")
    bindir = _scalar(pg_server_url, "SELECT setting FROM pg_config WHERE name = 'BINDIR'")
    owner = os.stat(host).st_uid  # the server's socket directory belongs to the user the server runs as
    as_owner = [] if owner == os.getuid() else ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--"]
    workdir = tempfile.mkdtemp(prefix="tracestore-standby.")
    os.chown(workdir, owner, -1)
    standby_port = str(int(port) + 1)
    data = os.path.join(workdir, "data")
    user = pg_server_url.username or "postgres"

    def run(*command: str) -> None:
        subprocess.run([*as_owner, *command], check=True, capture_output=True, text=True, timeout=60)

    try:
        # -R writes standby.signal and primary_conninfo; initdb's pg_hba trusts local replication.
        run(f"{bindir}/pg_basebackup", "-D", data, "-R", "-h", host, "-p", port, "-U", user, "-X", "stream",
            "--checkpoint=fast")  # fmt: skip
        options = f"-c listen_addresses='' -k {workdir} -p {standby_port} -c fsync=off"
        run(f"{bindir}/pg_ctl", "-D", data, "-l", os.path.join(workdir, "server.log"), "-w", "-o", options, "start")
        yield pg_server_url.set(query={"host": workdir, "port": standby_port})
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot start a standby: {exc.cmd}: {exc.stderr}")
    finally:
        subprocess.run([*as_owner, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


def on_standby(database: URL, standby: URL) -> URL:
    """The same database on the standby."""
    return database.set(query=standby.query)


def wait_for_replay(primary: URL, standby: URL, timeout: float = 10.0) -> None:
    """Until the standby has replayed everything the primary has written so far."""
    target = _scalar(primary, "SELECT pg_current_wal_lsn()")
    deadline = time.monotonic() + timeout
    while not _scalar(standby, f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"):
        assert time.monotonic() < deadline, f"the standby did not replay up to {target} in {timeout} s"
        time.sleep(0.02)


@contextmanager
def replay_paused(standby: URL) -> Iterator[None]:
    """The standby stops applying WAL (it keeps receiving it): what a lagging replica looks like."""
    _scalar(standby, "SELECT pg_wal_replay_pause()")
    try:
        yield
    finally:
        _scalar(standby, "SELECT pg_wal_replay_resume()")


def client_connections(standby_database: URL) -> int:
    """Sessions connected to this database on the standby, other than the one asking."""
    return int(
        _scalar(
            standby_database,
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
    )


T0 = 1_700_000_000.0


def replica_dataset() -> list[TraceContext]:
    return [
        make_trace(
            id=f"t-{i:02d}",
            namespace=("web", "jobs")[i % 2],
            session_uids=(f"s{i % 3}", "all")[: 1 + i % 2],
            created_at=T0 + i // 3,
        )
        for i in range(30)
    ]


def test_sync_store_reads_from_a_streaming_replica_and_writes_to_the_primary(pg_url: URL, standby: URL) -> None:
    primary, replica = pg_url.render_as_string(hide_password=False), on_standby(pg_url, standby)
    upgrade(primary)
    wait_for_replay(pg_url, standby)
    assert _scalar(replica, "SELECT pg_is_in_recovery()")
    with pytest.raises(DBAPIError, match="read-only transaction"):
        _scalar(replica, "INSERT INTO traces (id, context_type, namespace, data, created_at, updated_at)"
                         " VALUES ('x', 'span', 'web', '{}', 0, 0)")  # fmt: skip
    traces = replica_dataset()
    with TraceStore(primary, read_engine=replica.render_as_string(hide_password=False)) as store:
        assert store.read_engine.url.query == replica.query and store.engine.url.query == pg_url.query
        store.store_batch(traces)  # the standby refuses writes (above): these went to the primary
        wait_for_replay(pg_url, standby)
        for uid, since, limit in itertools.product(["s0", "s1", "all", "none"], [None, T0 + 4], [None, 2]):
            assert store.get_by_session_uid(uid, since=since, limit=limit) == oracle_query(
                traces, session_uid=uid, since=since, limit=limit
            )
        assert store.query(namespace="jobs", limit=5) == oracle_query(traces, namespace="jobs", limit=5)
        assert list(store.iter_session("all", page_size=4)) == oracle_query(traces, session_uid="all")
        merged = store.get_by_session_uids(["s0", "s2"], limit=6)
        assert merged == oracle_query([t for t in traces if {"s0", "s2"} & set(t.session_uids)], limit=6)
        assert store.get(traces[5].id) == traces[5]

        # The reads come from the replica, so a write is not promised to be visible to the next read:
        # with the standby's replay paused, the primary has the new trace and the store does not see it.
        late = make_trace(id="t-late", session_uids=("s0",), created_at=T0 + 100)
        with replay_paused(replica):
            store.store(late)
            with TraceStore(primary) as on_primary:
                assert on_primary.get(late.id) == late
            assert store.get(late.id) is None
            assert store.get_by_session_uid("s0", limit=1) == oracle_query(traces, session_uid="s0", limit=1)
            # Every read method works while the primary has no `traces` table at all (renamed for a moment).
            _scalar(pg_url, "ALTER TABLE traces RENAME TO traces_away")
            try:
                assert store.get(traces[1].id) == traces[1]
                assert store.query(session_uid="all", limit=2) == oracle_query(traces, session_uid="all", limit=2)
                assert store.page_by_session_uid("s1", limit=2).items == oracle_query(traces, session_uid="s1", limit=2)
                assert store.get_by_session_uids(["s1", "s2"], limit=3) == oracle_query(
                    [t for t in traces if {"s1", "s2"} & set(t.session_uids)], limit=3
                )
                assert store.explain("s0", limit=1)[0].startswith("Limit")
                with pytest.raises(StorageError):
                    store.store(make_trace(id="t-lost", session_uids=("s0",)))  # writes: the primary
            finally:
                _scalar(pg_url, "ALTER TABLE traces_away RENAME TO traces")
        wait_for_replay(pg_url, standby)
        assert store.get(late.id) == late
        assert store.get_by_session_uid("s0", limit=1) == [late]
        assert client_connections(replica) > 0
    assert client_connections(replica) == 0  # the store created the read engine from a URL: disposed on close


def test_the_store_uses_the_index_only_once_the_replica_has_replayed_the_upgrade(pg_url: URL, standby: URL) -> None:
    """The revision that decides between the legacy join and the index query is the read engine's."""
    primary, replica = pg_url.render_as_string(hide_password=False), on_standby(pg_url, standby)
    upgrade(primary, "0003")
    traces = replica_dataset()
    with TraceStore(primary, auto_upgrade=False) as store:  # served at 0003 (legacy join), writes as usual
        store.store_batch(traces)
    wait_for_replay(pg_url, standby)
    with replay_paused(replica), TraceStore(primary, read_engine=replica.render_as_string()) as store:
        # Opening it upgraded the primary; the replica has not replayed that yet.
        assert (current_revision(primary), _scalar(replica, "SELECT version_num FROM tracestore_alembic_version")) == (
            head_revision(),
            "0003",
        )
        legacy_plan = "\n".join(store.explain("s1", limit=3))
        assert "traces.created_at DESC" in legacy_plan or "idx_traces_created_at" in legacy_plan, legacy_plan
        assert SESSION_TIME_INDEX not in legacy_plan, legacy_plan
        assert store.get_by_session_uid("s1", limit=3) == oracle_query(traces, session_uid="s1", limit=3)
    with TraceStore(primary, read_engine=replica.render_as_string()) as store:
        with replay_paused(replica):
            assert store.get_by_session_uid("all") == oracle_query(traces, session_uid="all")
        wait_for_replay(pg_url, standby)
        plan = "\n".join(store.explain("s1", limit=3))
        assert "traces.created_at DESC" not in plan and ("ts.created_at DESC" in plan or SESSION_TIME_INDEX in plan)
        assert store.get_by_session_uid("s1", limit=3) == oracle_query(traces, session_uid="s1", limit=3)


async def test_async_store_reads_from_a_streaming_replica_and_writes_to_the_primary(
    pg_url: URL, pg_async_url: URL, standby: URL
) -> None:
    upgrade(pg_url.render_as_string(hide_password=False))
    wait_for_replay(pg_url, standby)
    replica = on_standby(pg_async_url, standby)
    traces = replica_dataset()
    store = AsyncTraceStore(pg_async_url.render_as_string(hide_password=False), read_engine=replica.render_as_string())
    async with store:
        assert store.read_engine.url.query == replica.query
        await store.store_batch(traces)
        wait_for_replay(pg_url, standby)
        for uid, limit in itertools.product(["s0", "all"], [None, 3]):
            assert await store.get_by_session_uid(uid, limit=limit) == oracle_query(
                traces, session_uid=uid, limit=limit
            )
        page = await store.page_by_session_uid("s2", limit=3)
        assert page.items == oracle_query(traces, session_uid="s2", limit=3)
        assert [t async for t in store.iter_session("all", page_size=4)] == oracle_query(traces, session_uid="all")
        late = make_trace(id="t-late", session_uids=("s0",), created_at=T0 + 100)
        with replay_paused(on_standby(pg_url, standby)):
            await store.store(late)
            assert await store.get(late.id) is None
        wait_for_replay(pg_url, standby)
        assert await store.get_by_session_uids(["s0", "s1"], limit=1) == [late]
    assert client_connections(on_standby(pg_url, standby)) == 0


def test_a_read_engine_on_another_backend_is_refused(pg_url: URL, tmp_path: Any) -> None:
    with pytest.raises(StorageError, match="read engine is sqlite"):
        TraceStore(pg_url.render_as_string(hide_password=False), read_engine=f"sqlite:///{tmp_path / 'r.db'}")


# -- trace_sessions partitioned by month ---------------------------------------------------------------------
def epoch(year: int, month: int, day: int = 1) -> float:
    return datetime(year, month, day, tzinfo=UTC).timestamp()


JAN_10 = epoch(2024, 1, 10)
NOW = epoch(2024, 6, 10)  # partitions reach 3 months past June: to October 1st


def monthly_dataset(start: int = 0, count: int = 50) -> list[TraceContext]:
    """A trace every three days from January 10th 2024, in one or two of four sessions; ties on created_at."""
    traces = []
    for i in range(start, start + count):
        sessions = (f"s{i % 4}",) + ((f"s{(i + 1) % 4}",) if i % 3 == 0 else ())
        tie = 1 if i % 5 == 4 else 0  # the same created_at as the trace before
        created_at = JAN_10 + (i - tie) * 3 * 86_400
        traces.append(
            make_trace(id=f"m-{i:03d}", namespace=("web", "jobs")[i % 2], session_uids=sessions, created_at=created_at)
        )
    return traces


def assert_answers(store: TraceStore, traces: list[TraceContext]) -> None:
    for uid, since, limit in itertools.product(
        ["s0", "s1", "s3", "none"], [None, epoch(2024, 3, 1), epoch(2024, 5, 20)], [None, 1, 7]
    ):
        assert store.get_by_session_uid(uid, since=since, limit=limit) == oracle_query(
            traces, session_uid=uid, since=since, limit=limit
        )
    assert store.query(session_uid="s2", namespace="web", until=epoch(2024, 4, 1)) == oracle_query(
        traces, session_uid="s2", namespace="web", until=epoch(2024, 4, 1)
    )
    assert list(store.iter_session("s1", page_size=3)) == oracle_query(traces, session_uid="s1")
    merged = store.get_by_session_uids(["s0", "s2"], since=epoch(2024, 2, 1), limit=9)
    assert merged == oracle_query(
        [t for t in traces if {"s0", "s2"} & set(t.session_uids)], since=epoch(2024, 2, 1), limit=9
    )
    for trace in traces[::7]:
        assert store.get(trace.id) == trace


def link_drift(url: URL) -> int:
    """Links whose copy differs from their trace's time, or whose trace is gone (must be 0)."""
    return int(
        _scalar(
            url,
            "SELECT count(*) FROM trace_sessions ts LEFT JOIN traces t ON t.id = ts.trace_id"
            " WHERE t.id IS NULL OR ts.created_at <> t.created_at",
        )
    )


def test_partitioned_trace_sessions_answer_like_the_oracle(pg_url: URL) -> None:
    url = pg_url.render_as_string(hide_password=False)
    traces = monthly_dataset(0, 30)
    with TraceStore(url) as store:
        store.store_batch(traces)
    with pytest.raises(MigrationError, match="finalize"):  # the previous release's links have no created_at
        partition(url, now=NOW)
    finalize(url)
    made = partition(url, now=NOW)
    names = [p.name for p in made]
    assert names == [OLD_PARTITION] + [f"trace_sessions_p2024_{month:02d}" for month in range(1, 10)]
    assert made[0].lower is None and made[1].lower == epoch(2024, 1, 1) and made[-1].upper == epoch(2024, 10, 1)
    assert all(a.upper == b.lower for a, b in itertools.pairwise(made))  # contiguous, no gap
    assert _scalar(pg_url, "SELECT relkind FROM pg_class WHERE relname = 'trace_sessions'") == "p"
    with pytest.raises(MigrationError, match="partitioned already"):
        partition(url, now=NOW)
    with TraceStore(url) as store:
        assert_answers(store, traces)
        more = monthly_dataset(30, 20)  # into partitions that were empty at conversion
        store.store_batch(more)
        # A re-stored trace moves to another month, and to another partition: the copy trigger's UPDATE of
        # the partition key moves the row; its existing link meets ON CONFLICT DO NOTHING there.
        moved = make_trace(id=traces[2].id, created_at=epoch(2024, 8, 15), session_uids=("s3",))
        store.store(moved)
        expected = [t for t in traces + more if t.id != moved.id] + [merge_restore(traces[2], moved)]
        assert_answers(store, expected)
        home = "SELECT string_agg(DISTINCT tableoid::regclass::text, ',') FROM trace_sessions WHERE trace_id = "
        assert _scalar(pg_url, f"{home}'{moved.id}'") == "trace_sessions_p2024_08"
        # A trace newer than the last partition is refused, with its batch; add_partitions makes room.
        future = make_trace(id="m-future", session_uids=("s0",), created_at=epoch(2024, 11, 2))
        with pytest.raises(StorageError, match="no partition"):
            store.store_batch([monthly_dataset(60, 1)[0], future])
        assert store.get("m-060") is None
        assert add_partitions(url, now=epoch(2024, 9, 1), ahead=2) == [
            "trace_sessions_p2024_10",
            "trace_sessions_p2024_11",
        ]
        assert add_partitions(url, now=epoch(2024, 9, 1), ahead=2) == []
        store.store(future)
        assert store.get_by_session_uid("s0", limit=1) == [future]
        assert store.delete(traces[4].id) and store.get(traces[4].id) is None
    assert link_drift(pg_url) == 0
    report = verify(url)  # its seven checks read the partitioned table like the plain one
    assert report.ok, [check for check in report.checks if not check.ok]


def test_latest_100_on_partitions_prunes_and_never_sorts(pg_url: URL) -> None:
    """30,000 traces over 7 months, 3,000 in the hot session, ANALYZEd: the newest partitions' indexes in order.

    Partitions older than `since` are not in the plan; the others are read newest first by an ordered
    Append (no default partition, so the ranges order the partitions), each backwards through its
    copy of the session index: no Sort node, as on the plain table.
    """
    url = pg_url.render_as_string(hide_password=False)
    upgrade(url)
    finalize(url)
    engine = _raw(pg_url)
    try:
        with engine.connect() as connection:  # one trace every 10 minutes from January 10th
            connection.exec_driver_sql(
                "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
                f" SELECT lpad(i::text, 8, '0'), 'span', 'web', '{{}}', '{{}}', {JAN_10} + i * 600, {JAN_10} + i * 600"
                " FROM generate_series(1, 30000) AS i"
            )
            connection.exec_driver_sql(
                "INSERT INTO trace_sessions (trace_id, session_uid, created_at)"
                " SELECT lpad(i::text, 8, '0'), CASE WHEN mod(i, 10) = 0 THEN 'hot' ELSE 's' || mod(i, 500) END,"
                f" {JAN_10} + i * 600 FROM generate_series(1, 30000) AS i"
            )
    finally:
        engine.dispose()
    partition(url, now=JAN_10 + 30000 * 600)  # analyzes
    since = epoch(2024, 7, 1)  # about 500 hot traces since: fewer, and PostgreSQL sorts them after a bitmap scan
    with TraceStore(url) as store:
        latest = store.explain("hot", limit=100)
        window = store.explain("hot", since=since, limit=100)
        assert len(store.get_by_session_uid("hot", since=since, limit=100)) == 100
        newest = store.get_by_session_uid("hot", limit=100)
    sort_nodes = re.compile(r"(^|->\s*)(Incremental )?Sort\b")
    for plan in (latest, window):
        assert plan[0].startswith("Limit"), plan
        assert not any(sort_nodes.search(line.strip()) for line in plan), plan  # no Sort or Incremental Sort node
        assert any("Append" in line for line in plan), plan  # the partitions' index scans, in order
        newest_index = "Index Only Scan Backward using trace_sessions_p2024_07_session_uid_created_at"
        assert any(newest_index in line for line in plan), plan
    scanned = {m.group(1) for line in window for m in re.finditer(r" on (trace_sessions_\w+) ts", line)}
    assert scanned == {f"trace_sessions_p2024_{month:02d}" for month in (7, 8, 9, 10, 11)}, window
    assert [t.id for t in newest] == [f"{i:08d}" for i in range(30000, 29000, -10)]


def test_dropping_old_partitions_deletes_their_traces_and_keeps_the_rest(pg_url: URL) -> None:
    url = pg_url.render_as_string(hide_password=False)
    traces = monthly_dataset(0, 50)
    with TraceStore(url) as store:
        store.store_batch(traces)
    finalize(url)
    partition(url, now=NOW)
    before = epoch(2024, 3, 15)  # mid-March: January and February go, March stays whole
    retention = drop_partitions_before(url, before, batch_size=4)
    assert retention.dropped == [OLD_PARTITION, "trace_sessions_p2024_01", "trace_sessions_p2024_02"]
    assert retention.before == epoch(2024, 3, 1)
    expired = [t for t in traces if t.created_at < epoch(2024, 3, 1)]
    kept = [t for t in traces if t.created_at >= epoch(2024, 3, 1)]
    assert retention.traces_deleted == len(expired) > 4  # in several batches
    assert _scalar(pg_url, "SELECT to_regclass('trace_sessions_p2024_01')") is None
    assert [p.name for p in partitions_of(pg_url)][:2] == ["trace_sessions_p2024_03", "trace_sessions_p2024_04"]
    with TraceStore(url) as store:
        assert all(store.get(t.id) is None for t in expired)
        assert store.query(limit=1000) == oracle_query(kept)
        assert_answers(store, kept)
    assert link_drift(pg_url) == 0
    assert drop_partitions_before(url, before).dropped == []  # nothing more is old enough


def partitions_of(url: URL) -> list[Any]:
    engine = _raw(url)
    try:
        with engine.connect() as connection:
            return partitions(connection)
    finally:
        engine.dispose()


def test_a_database_the_previous_release_made_is_partitioned_too(pg: Backend) -> None:
    """A legacy PostgreSQL schema has PostgreSQL's own constraint names (trace_sessions_pkey, not tracestore's
    pk_trace_sessions): partition() does not depend on them."""
    traces = monthly_dataset(0, 12)
    pg.create_legacy(
        (t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at, tuple(t.session_uids))
        for t in traces
    )
    url = pg.url
    raw = make_url(url)
    assert _scalar(raw, "SELECT count(*) FROM pg_constraint WHERE conname = 'trace_sessions_pkey'") == 1
    upgrade(url)
    finalize(url)
    assert partition(url, now=NOW)[0].name == OLD_PARTITION
    with TraceStore(url) as store:
        assert_answers(store, traces)
    assert link_drift(raw) == 0
