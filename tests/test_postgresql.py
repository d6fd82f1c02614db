"""PostgreSQL: both drivers against the tests' real server, the migration lock, bounded transactions,
the triggers that keep the junction's created_at.

`make test` runs the suite inside scripts/with-postgres, which starts a
throwaway cluster; each test gets its own database (tests/conftest.py `pg_url`).
"""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import URL, text

from tests.oracle import make_trace, oracle_query
from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.engine import create_async_engine, create_engine
from tracestore.migrate import current_revision, downgrade, finalize, head_revision, upgrade
from tracestore.migrate.backfill import PROGRESS_TABLE
from tracestore.migrate.lock import migration_lock, migration_running
from tracestore.migrate.online import write_transaction
from tracestore.migrate.schema import (
    COPY_TRIGGERS,
    ROLLING_DEPLOY_TRIGGERS,
    column_names,
    create_copy_triggers,
    drop_copy_triggers,
    index_names,
    missing_copy_triggers,
    table_names,
)
from tracestore.models import SESSION_TIME_INDEX

# Unicode, quotes, nesting and a big integer: what trace payloads carry.
PAYLOAD: dict[str, Any] = {"text": 'naïve "quoted" 日本語 🚀', "nested": {"list": [1, 2.5, None, True]}, "big": 2**53}


def test_sync_driver_round_trips_jsonb(pg_url: URL) -> None:
    engine = create_engine(pg_url.render_as_string(hide_password=False))
    try:
        with engine.begin() as connection:
            assert engine.dialect.driver == "psycopg"
            assert connection.dialect.server_version_info >= (15,)
            connection.execute(text("CREATE TABLE t (v JSONB NOT NULL)"))
            connection.execute(text("INSERT INTO t VALUES (CAST(:v AS JSONB))"), {"v": orjson.dumps(PAYLOAD).decode()})
            assert connection.execute(text("SELECT v FROM t")).scalar_one() == PAYLOAD
    finally:
        engine.dispose()


async def test_async_driver_round_trips_jsonb(pg_async_url: URL) -> None:
    engine = create_async_engine(pg_async_url.render_as_string(hide_password=False))
    try:
        async with engine.begin() as connection:
            assert engine.dialect.driver == "asyncpg"
            assert connection.dialect.server_version_info >= (15,)
            await connection.execute(text("CREATE TABLE t (v JSONB NOT NULL)"))
            await connection.execute(
                text("INSERT INTO t VALUES (CAST(:v AS JSONB))"), {"v": orjson.dumps(PAYLOAD).decode()}
            )
            assert (await connection.execute(text("SELECT v FROM t"))).scalar_one() == PAYLOAD
    finally:
        await engine.dispose()


# -- one migration at a time, and bounded transactions (tracestore.migration_lock, tracestore.online) ----------
HOLD_LOCK = """
import sys, time
from sqlalchemy import make_url
from tracestore.migrate.lock import migration_lock
with migration_lock(make_url(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_migration_lock_is_held_across_processes_and_freed_by_kill_9(pg_url: URL) -> None:
    url = pg_url.render_as_string(hide_password=False)
    assert not migration_running(pg_url)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert migration_running(pg_url)
        with migration_lock(pg_url.set(database="postgres")):  # another database: its own lock
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    deadline = time.monotonic() + 10  # the server ends the killed client's session on the closed socket
    while migration_running(pg_url) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not migration_running(pg_url)


def test_a_second_migration_waits_for_the_first(pg_url: URL) -> None:
    order: list[str] = []
    first_holds = threading.Event()

    def first() -> None:
        with migration_lock(pg_url):
            order.append("first in")
            first_holds.set()
            time.sleep(0.5)
            order.append("first out")

    thread = threading.Thread(target=first)
    thread.start()
    first_holds.wait(10)
    with migration_lock(pg_url):
        order.append("second in")
        with migration_lock(pg_url):  # nested in one thread: no self-deadlock
            assert not migration_running(pg_url)  # this thread is the migration
    thread.join(10)
    assert order == ["first in", "first out", "second in"]


def test_write_transaction_commits_or_rolls_back_on_postgresql(pg_url: URL) -> None:
    engine = create_engine(pg_url.render_as_string(hide_password=False))
    try:
        with engine.connect() as setup:
            setup.execute(text("CREATE TABLE t (v INTEGER)"))
            setup.commit()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            with write_transaction(connection):
                connection.execute(text("INSERT INTO t VALUES (1)"))
            with pytest.raises(RuntimeError), write_transaction(connection):
                connection.execute(text("INSERT INTO t VALUES (2)"))
                raise RuntimeError("mid-transaction failure")
            assert connection.execute(text("SELECT array_agg(v) FROM t")).scalar_one() == [1]
    finally:
        engine.dispose()


# -- the copy triggers (tracestore.schema), on tables shaped as at revision 0002 ---------------------------------
TABLES_AT_0002 = """
CREATE TABLE traces (id TEXT PRIMARY KEY, created_at DOUBLE PRECISION NOT NULL);
CREATE TABLE trace_sessions (
    trace_id TEXT NOT NULL, session_uid TEXT NOT NULL, created_at DOUBLE PRECISION,
    PRIMARY KEY (trace_id, session_uid)
)
"""  # no foreign key: the legacy writers could insert links before their trace


def links(connection: Any) -> dict[tuple[str, str], float | None]:
    rows = connection.execute(text("SELECT trace_id, session_uid, created_at FROM trace_sessions")).all()
    return {(trace_id, uid): created for trace_id, uid, created in rows}


def test_copy_triggers_keep_the_junction_time_right_on_postgresql(pg_url: URL) -> None:
    engine = create_engine(pg_url.render_as_string(hide_password=False))
    try:
        with engine.begin() as connection:
            for statement in TABLES_AT_0002.split(";"):
                connection.exec_driver_sql(statement)
            assert missing_copy_triggers(connection) == list(COPY_TRIGGERS)
            for statement in create_copy_triggers(dialect="postgresql"):
                connection.execute(statement)
            assert missing_copy_triggers(connection) == []

            run = connection.exec_driver_sql
            run("INSERT INTO traces VALUES ('t1', 100.5)")
            run("INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('t1', 'a')")  # previous release
            run("INSERT INTO trace_sessions VALUES ('t1', 'b', 100.5)")  # the store
            run("INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('t2', 'a')")  # before its trace
            assert links(connection)[("t2", "a")] is None
            run("INSERT INTO traces VALUES ('t2', 200.25)")
            assert links(connection) == {("t1", "a"): 100.5, ("t1", "b"): 100.5, ("t2", "a"): 200.25}
            run("UPDATE traces SET created_at = 300.0 WHERE id = 't1'")  # a re-stored trace moves
            assert links(connection) == {("t1", "a"): 300.0, ("t1", "b"): 300.0, ("t2", "a"): 200.25}

            for statement in drop_copy_triggers(ROLLING_DEPLOY_TRIGGERS, dialect="postgresql"):  # finalize
                connection.execute(statement)
            assert missing_copy_triggers(connection) == list(ROLLING_DEPLOY_TRIGGERS)
            run("INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('t2', 'c')")
            assert links(connection)[("t2", "c")] is None  # no stamp any more: verify --fix's job
            run("UPDATE traces SET created_at = 400.0 WHERE id = 't2'")
            assert links(connection)[("t2", "a")] == 400.0  # the follow trigger stays
            for statement in drop_copy_triggers(dialect="postgresql"):
                connection.execute(statement)
            assert missing_copy_triggers(connection) == list(COPY_TRIGGERS)
            functions = connection.execute(
                text("SELECT count(*) FROM pg_proc WHERE proname = ANY(:names)"), {"names": list(COPY_TRIGGERS)}
            ).scalar_one()
            assert functions == 0  # the trigger functions go with them
    finally:
        engine.dispose()


# -- the migration chain on PostgreSQL, as far as it runs there today --------------------------------------------
def test_0001_and_0002_up_and_down_on_postgresql(pg_url: URL) -> None:
    url = pg_url.render_as_string(hide_password=False)
    upgrade(url, "0002")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            assert current_revision(connection) == "0002"
            assert "created_at" in column_names(connection, "trace_sessions")
            assert missing_copy_triggers(connection) == []
            indexes = dict(
                connection.exec_driver_sql(
                    "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'trace_sessions'"
                ).all()
            )
            assert "idx_trace_sessions_trace" not in indexes
            assert indexes[SESSION_TIME_INDEX].endswith("WHERE (created_at IS NOT NULL)")
        downgrade(url, "0001")
        with engine.connect() as connection:
            assert current_revision(connection) == "0001"
            assert "created_at" not in column_names(connection, "trace_sessions")
            assert missing_copy_triggers(connection) == list(COPY_TRIGGERS)
            assert set(index_names(connection, "trace_sessions")) >= {
                "idx_trace_sessions_uid",
                "idx_trace_sessions_trace",
            }
            assert SESSION_TIME_INDEX not in index_names(connection, "trace_sessions")
    finally:
        engine.dispose()


LEGACY_TRACES = {f"t{i}-ü": 1_700_000_000.0 + (i // 3) for i in range(20)}  # ties: three traces per second
LEGACY_LINKS = [(trace_id, f"s{i % 4}") for i, trace_id in enumerate(LEGACY_TRACES)]
LEGACY_LINKS += [(trace_id, "shared-ß") for trace_id in list(LEGACY_TRACES)[::5]]  # traces in two sessions


def legacy_database(url: str) -> None:
    """A database at 0001 holding LEGACY_TRACES and LEGACY_LINKS, plus two links to missing traces."""
    upgrade(url, "0001")  # the legacy tables
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO traces (id, context_type, namespace, data, created_at, updated_at)"
                    " VALUES (:id, 'span', 'web', '{}', :t, :t)"
                ),
                [{"id": trace_id, "t": created} for trace_id, created in LEGACY_TRACES.items()],
            )
            connection.execute(
                text("INSERT INTO trace_sessions VALUES (:t, :s)"), [{"t": t, "s": s} for t, s in LEGACY_LINKS]
            )
            # Links to traces that do not exist, as a writer without the foreign key left them.
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
            connection.execute(
                text("INSERT INTO trace_sessions VALUES (:t, 's0')"), [{"t": "gone-1"}, {"t": "zz-gone-2"}]
            )
    finally:
        engine.dispose()


ORPHANS = [("gone-1", "s0"), ("zz-gone-2", "s0")]


def assert_upgraded(url: str) -> None:
    """At head, every link filled; the two orphan links kept (NULL) until finalize, which removes them."""
    engine = create_engine(url)
    try:
        for links in (sorted(LEGACY_LINKS + ORPHANS), sorted(LEGACY_LINKS)):
            with engine.connect() as connection:
                assert current_revision(connection) == head_revision()
                rows = connection.exec_driver_sql(
                    "SELECT ts.trace_id, ts.session_uid, ts.created_at, t.created_at"
                    " FROM trace_sessions ts LEFT JOIN traces t ON t.id = ts.trace_id"
                ).all()
                assert sorted((trace_id, uid) for trace_id, uid, _, _ in rows) == links
                assert all(copy == original for _, _, copy, original in rows)
                assert "idx_trace_sessions_uid" not in index_names(connection, "trace_sessions")
                assert PROGRESS_TABLE not in table_names(connection)
            finalize(engine)
    finally:
        engine.dispose()


def test_upgrade_head_backfills_in_key_batches_and_keeps_orphans_for_finalize_on_postgresql(pg_url: URL) -> None:
    url = pg_url.render_as_string(hide_password=False)
    legacy_database(url)
    reports = upgrade(url, batch_size=4)
    backfill = reports["backfill"]
    assert backfill.orphans_kept == 2 and backfill.rows_updated == len(LEGACY_LINKS)
    assert backfill.rows_scanned == len(LEGACY_LINKS) + 2  # ceil(28 / 4) batches, every row once
    assert_upgraded(url)


KILL = str(Path(__file__).resolve().parent / "kill_during_upgrade.py")


@pytest.mark.parametrize(
    ("pattern", "occurrence"),
    [
        ("^UPDATE trace_sessions SET created_at = traces.created_at", 3),  # mid-batch: filled, not committed
        (f"^INSERT INTO {PROGRESS_TABLE}", 4),  # position written, not committed
        ("^COMMIT$", 5),  # right after the 2nd batch commits (the first three are 0002's transactions)
    ],
)
def test_backfill_killed_with_sigkill_resumes_on_postgresql(pg_url: URL, pattern: str, occurrence: int) -> None:
    url = pg_url.render_as_string(hide_password=False)
    legacy_database(url)
    killed = subprocess.run([sys.executable, KILL, url, pattern, str(occurrence), "4"], check=False, timeout=60)
    assert killed.returncode == -signal.SIGKILL
    reports = upgrade(url, batch_size=4)
    assert_upgraded(url)
    assert reports["backfill"].rows_scanned < len(LEGACY_LINKS) + 2  # resumed, not started over


# -- the store on PostgreSQL -------------------------------------------------------------------------------------
def store_dataset() -> list[TraceContext]:
    traces = []
    for i in range(40):
        sessions = (f"s{i % 3}",) + (("shared-ß",) if i % 4 == 0 else ())
        data: Any = {"i": i, "text": "ünïcödé 🚀" * (20_000 if i == 7 else 1)}  # one ~200 KB payload
        traces.append(
            make_trace(id=f"{'é' if i % 2 else 'e'}-{i:02d}", session_uids=sessions, data=data, created_at=T0 + i // 4)
        )
    return traces  # ties: four traces per second, ids differing in their first (non-ASCII) character


T0 = 1_700_000_000.0


def test_sync_store_answers_like_the_oracle_on_postgresql(pg_url: URL) -> None:
    traces = store_dataset()
    with TraceStore(pg_url.render_as_string(hide_password=False)) as store:
        store.store_batch(traces)
        for uid, since, limit in itertools.product(
            ["s0", "s1", "shared-ß", "none"], [None, T0 + 3, T0 + 99], [None, 3]
        ):
            assert store.get_by_session_uid(uid, since=since, limit=limit) == oracle_query(
                traces, session_uid=uid, since=since, limit=limit
            )
        pages, cursor = [], None
        while True:
            page = store.page_by_session_uid("s1", limit=4, cursor=cursor)
            pages += page.items
            if (cursor := page.next_cursor) is None:
                break
        assert pages == oracle_query(traces, session_uid="s1")
        several = store.get_by_session_uids(["s0", "shared-ß"], limit=7)
        assert [t.id for t in several] == [
            t.id for t in oracle_query([t for t in traces if {"s0", "shared-ß"} & set(t.session_uids)], limit=7)
        ]
        assert store.get(traces[7].id) == traces[7]
        assert store.delete(traces[7].id) and store.get(traces[7].id) is None


async def test_async_store_answers_like_the_sync_one_on_postgresql(pg_url: URL, pg_async_url: URL) -> None:
    traces = store_dataset()
    async with AsyncTraceStore(pg_async_url.render_as_string(hide_password=False)) as store:
        await store.store_batch(traces)
        for uid, limit in itertools.product(["s0", "shared-ß"], [None, 5]):
            assert await store.get_by_session_uid(uid, limit=limit) == oracle_query(
                traces, session_uid=uid, limit=limit
            )
        page = await store.page_by_session_uid("s2", limit=3)
        assert page.items == oracle_query(traces, session_uid="s2", limit=3)


def test_plans_on_postgresql_read_the_session_index(pg_url: URL) -> None:
    """On a table large enough (and ANALYZEd) for the planner's choice to be the real one: latest-N
    walks the composite index backwards and stops after N (no Sort node); an unlimited window may be
    a bitmap scan of the same index plus a sort of just its rows, which is what PostgreSQL picks for
    ~100 rows here (cheaper than ordered random reads)."""
    url = pg_url.render_as_string(hide_password=False)
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:  # 30,000 traces, 3,000 in the hot session, one per second
            connection.exec_driver_sql(
                "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
                " SELECT lpad(i::text, 8, '0'), 'span', 'web', '{}', '{}', 1700000000 + i, 1700000000 + i"
                " FROM generate_series(1, 30000) AS i"
            )
            connection.exec_driver_sql(
                "INSERT INTO trace_sessions (trace_id, session_uid, created_at)"
                " SELECT lpad(i::text, 8, '0'), CASE WHEN mod(i, 10) = 0 THEN 'hot' ELSE 's' || mod(i, 500) END,"
                " 1700000000 + i FROM generate_series(1, 30000) AS i"
            )
            connection.exec_driver_sql("ANALYZE")
        with TraceStore(url, auto_upgrade=False) as store:
            latest = store.explain("hot", limit=100)
            window = store.explain("hot", since=1_700_029_000.0)
            assert len(store.get_by_session_uid("hot", since=1_700_029_000.0)) == 101  # since is inclusive
    finally:
        engine.dispose()
    assert any(f"Index Only Scan Backward using {SESSION_TIME_INDEX}" in line for line in latest), latest
    assert not any("Sort" in line for line in latest), latest
    assert latest[0].startswith("Limit"), latest
    assert any(SESSION_TIME_INDEX in line for line in window), window
    assert not any("Seq Scan on trace_sessions" in line for line in window), window


# -- store_batch on PostgreSQL: one statement of arrays per table (queries.Statements.write_arrays) ------------
import asyncio  # noqa: E402 - this section's own imports, kept with it

from tests.oracle import merge_restore  # noqa: E402
from tracestore import queries  # noqa: E402
from tracestore.errors import StorageError  # noqa: E402

# Every UPDATE of a trace row logged, so a test sees whether the upsert ran and on which ids.
UPDATE_LOG = (
    "CREATE TABLE updated_ids (id TEXT NOT NULL)",
    "CREATE FUNCTION log_update() RETURNS trigger LANGUAGE plpgsql AS"
    " $$ BEGIN INSERT INTO updated_ids VALUES (NEW.id); RETURN NULL; END $$",
    "CREATE TRIGGER log_update AFTER UPDATE ON traces FOR EACH ROW EXECUTE FUNCTION log_update()",
)
DRIVERS = ("psycopg", "asyncpg")


def store_batches(url: URL, driver: str, batches: list[list[TraceContext]]) -> None:
    """Each batch through one store's store_batch: the sync store on psycopg, or the async one on asyncpg."""
    if driver == "psycopg":
        with TraceStore(url.render_as_string(hide_password=False)) as store:
            for batch in batches:
                store.store_batch(batch)
        return

    async def run() -> None:
        async with AsyncTraceStore(url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)) as s:
            for batch in batches:
                await s.store_batch(batch)

    asyncio.run(run())


def stored_state(url: str) -> tuple[set[str], dict[tuple[str, str], float | None]]:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            updated = {trace_id for (trace_id,) in connection.exec_driver_sql("SELECT id FROM updated_ids")}
            return updated, links(connection)
    finally:
        engine.dispose()


def prepared_database(pg_url: URL) -> str:
    url = pg_url.render_as_string(hide_password=False)
    upgrade(url)
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            for statement in UPDATE_LOG:
                connection.exec_driver_sql(statement)
    finally:
        engine.dispose()
    return url


@pytest.mark.parametrize("driver", DRIVERS)
def test_store_batch_upserts_only_when_an_id_exists_on_postgresql(pg_url: URL, driver: str) -> None:
    url = prepared_database(pg_url)
    old = make_trace(id="é-old", session_uids=["a", "shared-ß"], data={"v": 1}, created_at=T0, updated_at=T0)
    tied = [
        make_trace(id=f"t-{i}", session_uids=["a"], created_at=T0 + 5, data={"t": "日本語 🚀" * i}) for i in range(3)
    ]
    huge = make_trace(id="huge", session_uids=["b"], data={"blob": "x" * 3_000_000, "nul": "a\u0000b"}, created_at=T0)
    store_batches(pg_url, driver, [[old, *tied, huge]])
    assert stored_state(url)[0] == set()  # new ids only: the insert's rowcount was right, no upsert ran

    again = make_trace(
        id="é-old", session_uids=["c"], data={"v": 2}, metadata={"m": 1}, created_at=T0 + 9, updated_at=T0 + 10
    )
    new = make_trace(id="new", session_uids=["c", "a"], created_at=T0 + 9)
    store_batches(pg_url, driver, [[new, again]])
    updated, got_links = stored_state(url)
    assert "é-old" in updated

    expected = [merge_restore(old, again), *tied, huge, new]
    with TraceStore(url) as store:
        for trace in expected:
            assert store.get(trace.id) == trace
        for uid in ("a", "c", "shared-ß"):
            assert store.get_by_session_uid(uid) == oracle_query(expected, session_uid=uid)
    # The re-stored trace's old links follow its new created_at (the follow trigger), new ones carry it.
    assert got_links == {(t.id, uid): t.created_at for t in expected for uid in t.session_uids}


@pytest.mark.parametrize("driver", DRIVERS)
def test_store_batch_in_several_array_chunks_is_still_one_transaction_on_postgresql(
    pg_url: URL, driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = prepared_database(pg_url)
    monkeypatch.setattr(queries, "ARRAY_CHUNK_CHARS", 500)  # ~3 traces per statement
    first = [
        make_trace(id=f"a-{i:02d}", session_uids=["s", f"own-{i}"], data={"i": i}, created_at=T0 + i) for i in range(20)
    ]
    store_batches(pg_url, driver, [first])
    assert stored_state(url)[0] == set()  # the rowcounts of all chunks add up to the batch

    # A mixed batch over several chunks: every id of the batch is upserted once one of them exists.
    mixed = [
        make_trace(id=f"a-{i:02d}", session_uids=["t"], data={"i": -i}, created_at=T0 + i) for i in range(0, 20, 7)
    ]
    mixed += [make_trace(id=f"b-{i:02d}", session_uids=["t"], created_at=T0 + 30 + i) for i in range(10)]
    store_batches(pg_url, driver, [mixed])
    by_id = {t.id: t for t in first}
    for trace in mixed:
        by_id[trace.id] = merge_restore(by_id.get(trace.id), trace)
    with TraceStore(url) as store:
        assert store.get_by_session_uid("t") == oracle_query(list(by_id.values()), session_uid="t")
        assert [store.get(trace_id) for trace_id in sorted(by_id)] == [by_id[trace_id] for trace_id in sorted(by_id)]

    # A failure in a later chunk leaves nothing of the earlier ones.
    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("ALTER TABLE traces ADD CONSTRAINT no_boom CHECK (namespace <> 'boom')")
    finally:
        engine.dispose()
    doomed = [make_trace(id=f"c-{i:02d}", session_uids=["u"], created_at=T0 + i) for i in range(10)]
    doomed.append(make_trace(id="c-boom", namespace="boom", session_uids=["u"], created_at=T0))
    with pytest.raises(StorageError, match="nothing of the batch was written"):
        store_batches(pg_url, driver, [doomed])
    with TraceStore(url) as store:
        assert store.get_by_session_uid("u") == [] and store.get("c-00") is None


def test_copy_trigger_plans_cached_by_the_store_stay_index_scans_on_postgresql(pg_url: URL) -> None:
    """The store's first batches into an empty database plan the copy triggers' UPDATE of trace_sessions;
    PL/pgSQL caches that plan per connection. Planned as a sequential scan on the empty table, it stayed
    one as the table grew (every trace scanned every link), until autovacuum's first ANALYZE. The write
    transaction's Statements.write_setup makes those plans index scans; auto_explain shows the cached one."""
    engine = create_engine(pg_url.render_as_string(hide_password=False), pool_size=1, max_overflow=0)
    batches = [[make_trace(session_uids=["s"], created_at=T0 + b * 100 + i) for i in range(50)] for b in range(4)]
    plans: list[str] = []
    try:
        with TraceStore(engine) as store:
            for batch in batches[:3]:  # more than the 5 custom plans PostgreSQL makes before caching a generic one
                store.store_batch(batch)
            with engine.connect() as connection:  # the pool's one connection, where the store's plans are cached
                raw: Any = connection.connection.dbapi_connection
                raw.add_notice_handler(lambda diagnostic: plans.append(diagnostic.message_primary or ""))
                for setting in (
                    "LOAD 'auto_explain'",
                    "SET auto_explain.log_min_duration = 0",
                    "SET auto_explain.log_nested_statements = on",
                    "SET auto_explain.log_level = notice",
                ):
                    connection.exec_driver_sql(setting)
                connection.commit()
            store.store_batch(batches[3])
    finally:
        engine.dispose()
    trigger_plans = [plan for plan in plans if "UPDATE trace_sessions" in plan]
    assert trigger_plans, plans
    assert all("Index Scan" in plan and "Seq Scan" not in plan for plan in trigger_plans), trigger_plans
