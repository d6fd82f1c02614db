"""PostgreSQL's plans for every shape of the session query, on a table large enough (and VACUUM
ANALYZEd) for the planner's choice to be the one it makes in production: 200,000 traces with
~300-byte payloads (87 MB), 250,000 links, a hot session of 50,000 traces. With tiny payloads the
traces table is small enough that a hash join over a sequential scan of it looks cheaper to the
planner than 1,000 primary-key lookups; at production sizes it never is.

The planner is part of the product: these fail if a statement or the index changes so that a LIMIT
no longer stops the index walk after N entries. EXPLAIN ANALYZE shows what was read, not only what
was planned: the backward index scan under a LIMIT 100 returns 100 rows, whatever the session's size.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from sqlalchemy import URL, create_engine, text

from tests.backends import Backend
from tracestore import PageCursor, TraceStore
from tracestore.core import prepare_page, prepare_query, prepare_sessions_query
from tracestore.migrate import upgrade
from tracestore.models import SESSION_TIME_INDEX
from tracestore.queries import compiled, statements_for

T0 = 1_700_000_000.0
TRACES = 200_000
END = T0 + TRACES  # one trace per second; the hot session holds every fourth
INDEX_SCAN = f"Index Only Scan Backward using {SESSION_TIME_INDEX}"


@pytest.fixture(scope="module")
def planner_db(pg_server_url: URL) -> Iterator[tuple[Backend, TraceStore]]:
    name = "tracestore_plans"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    backend = Backend("postgresql", pg_server_url.set(drivername="postgresql+psycopg", database=name))
    upgrade(backend.url)
    with backend.raw() as connection:
        connection.execute(
            text(
                "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
                " SELECT lpad(i::text, 8, '0'), 'span', 'web', '{\"text\": \"' || repeat('x', 300) || '\"}', '{}',"
                " :t0 + i, :t0 + i"
                " FROM generate_series(1, :n) AS i"
            ),
            {"t0": T0, "n": TRACES},
        )
        # Every trace in one of 2,000 sessions, the hot one every fourth; one in four also in "other".
        connection.execute(
            text(
                "INSERT INTO trace_sessions (trace_id, session_uid, created_at)"
                " SELECT lpad(i::text, 8, '0'), CASE WHEN mod(i, 4) = 0 THEN 'hot' ELSE 's' || mod(i, 2000) END,"
                " :t0 + i FROM generate_series(1, :n) AS i"
                " UNION ALL SELECT lpad(i::text, 8, '0'), 'other', :t0 + i FROM generate_series(1, :n, 4) AS i"
            ),
            {"t0": T0, "n": TRACES},
        )
    # What autovacuum does to a table that has been written: statistics, and the visibility map that
    # lets an index-only scan skip the heap. The planner's costs depend on both.
    with backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE")
    store = TraceStore(backend.url, auto_upgrade=False)
    try:
        yield backend, store
    finally:
        store.close()
        backend.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def analyzed(backend: Backend, stmt: object, params: dict[str, object]) -> str:
    """EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF): the plan with the rows each node really produced."""
    with backend.raw() as connection:
        query = compiled(stmt, connection.dialect)  # type: ignore[arg-type]
        rows = connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query.sql, query.args(params)
        )
        return "\n".join(str(row[0]) for row in rows)


def index_rows(plan: str) -> list[int]:
    """Rows returned by each backward scan of the session index, from EXPLAIN ANALYZE."""
    return [int(n) for n in re.findall(rf"{INDEX_SCAN} on trace_sessions \w+ \(actual rows=(\d+) loops=1\)", plan)]


@pytest.mark.parametrize(
    "args",
    [
        {"session_uid": "hot", "limit": 100},  # latest 100
        {"session_uid": "hot", "since": END - 4_000, "limit": 100},  # the window, capped
        {"session_uid": "hot", "since": END - 4_000, "until": END - 1_000, "limit": 100},
        {"session_uid": "hot", "namespace": "web", "limit": 100},
    ],
    ids=["latest", "window-limit", "bounded-window-limit", "namespace-limit"],
)
def test_a_limit_stops_the_index_walk_after_n_entries(
    planner_db: tuple[Backend, TraceStore], args: dict[str, object]
) -> None:
    backend, store = planner_db
    plan = analyzed(backend, *prepare_query(statements_for(store.engine.dialect.name), **args))  # type: ignore[arg-type]
    assert plan.startswith("Limit"), plan
    assert "Sort" not in plan, plan
    assert index_rows(plan) == [100], plan  # 100 entries read out of the session's 50,000


def test_latest_100_reads_two_primary_key_probes_per_returned_trace(planner_db: tuple[Backend, TraceStore]) -> None:
    """Beyond its 100 entries of the session index, a latest-100 reads per returned trace one probe of
    traces' primary key (the row) and one index-only probe of the junction's (the trace's session list,
    which the answer carries): 200 probes whatever the session's size or where its traces sit in time.
    No heap fetch of the junction once VACUUM has set the visibility map."""
    backend, store = planner_db
    plan = analyzed(backend, *prepare_query(statements_for(store.engine.dialect.name), session_uid="hot", limit=100))
    assert index_rows(plan) == [100], plan
    assert re.search(r"-> +Index Scan using \w+ on traces \(actual rows=1 loops=100\)", plan), plan
    session_list = r"-> +Index Only Scan using \w+ on trace_sessions s \(actual rows=1 loops=100\)\n"
    assert re.search(session_list + r" +Index Cond: \(trace_id = traces\.id\)\n +Heap Fetches: 0\b", plan), plan
    assert "Seq Scan" not in plan and "Sort" not in plan, plan


@pytest.mark.parametrize("session_uid", ["hot", "other", "s7"])
def test_answers_on_the_planner_database_match_the_oracle(
    planner_db: tuple[Backend, TraceStore], session_uid: str
) -> None:
    backend, store = planner_db
    for args in ({"limit": 100}, {"since": END - 4_000}, {"since": END - 90_000, "until": END - 80_000, "limit": 7}):
        assert store.query(session_uid=session_uid, **args) == backend.sql_oracle_query(  # type: ignore[arg-type]
            session_uid=session_uid, **args
        )


def test_a_page_deep_in_the_session_reads_only_its_own_entries(planner_db: tuple[Backend, TraceStore]) -> None:
    backend, store = planner_db
    for depth in (1, 1_000, 40_000):  # the cursor of the last trace of page 1, ~page 10, ~page 400
        created = END - 4 * depth
        cursor = PageCursor(created, f"{int(created - T0):08d}")
        plan = analyzed(
            backend,
            *prepare_page(
                statements_for(store.engine.dialect.name), session_uid="hot", since=None, limit=100, cursor=cursor
            ),
        )
        assert "Sort" not in plan, plan
        assert "Index Cond: ((session_uid = 'hot'::text) AND (ROW(created_at, trace_id) < ROW(" in plan, plan
        assert index_rows(plan) == [100], plan


def test_several_sessions_read_limit_entries_per_session(planner_db: tuple[Backend, TraceStore]) -> None:
    """One backward range of the session index per listed session (a LATERAL subquery run once per element
    of the id array), each stopped after the limit: hot and other hold 50,000 traces each, s1 100."""
    backend, store = planner_db
    prepared = prepare_sessions_query(
        statements_for(store.engine.dialect.name), session_uids=["hot", "other", "s1"], since=None, limit=100
    )
    assert prepared is not None
    plan = analyzed(backend, *prepared)
    assert re.search(
        rf"-> +Limit \(actual rows=100 loops=3\)\n +-> +{INDEX_SCAN} on trace_sessions ts \(actual rows=100 loops=3\)",
        plan,
    ), plan
    assert "Seq Scan" not in plan, plan


def test_an_unlimited_window_reads_just_its_rows(planner_db: tuple[Backend, TraceStore]) -> None:
    """Without a LIMIT every row of the window is returned anyway, so the order in which the index is
    read buys nothing: PostgreSQL may walk it backwards (no sort) or bitmap-scan it and sort just those
    rows. Either way it reads the window's ~1,000 entries of the session index and no other link.
    What it picks here (VACUUMed table, all-visible pages): the backward index-only scan, no Sort,
    because the scan never touches the heap and returns rows already in order."""
    backend, store = planner_db
    plan = analyzed(
        backend, *prepare_query(statements_for(store.engine.dialect.name), session_uid="hot", since=END - 4_000)
    )
    assert "Seq Scan" not in plan, plan
    scanned = re.findall(rf"(?:Bitmap Index Scan on|{INDEX_SCAN} on trace_sessions ts) \S* ?\(actual rows=(\d+)", plan)
    assert scanned == ["1001"], plan  # since is inclusive: END - 4000 .. END, every fourth second
    assert ("Sort" not in plan) if INDEX_SCAN in plan else ("Sort Key: ts.created_at DESC, ts.trace_id DESC" in plan)


def test_trace_id_as_a_key_column_beats_include(planner_db: tuple[Backend, TraceStore]) -> None:
    """The issue suggests a covering index `(session_uid, created_at) INCLUDE (trace_id)`. Ours already
    covers: trace_id is its third key column, so the scan is index-only AND in the full sort order
    (created_at, trace_id). With INCLUDE the same scan is still index-only but ties on created_at are
    not ordered by trace_id, and PostgreSQL adds an Incremental Sort on top (checked here, inside a
    transaction that is rolled back)."""
    backend, store = planner_db
    stmt, params = prepare_query(statements_for(store.engine.dialect.name), session_uid="hot", limit=100)
    with backend.engine.connect() as connection:  # rolled back at the end: the test database keeps its index
        query = compiled(stmt, connection.dialect)
        connection.exec_driver_sql(f"DROP INDEX {SESSION_TIME_INDEX}")
        connection.exec_driver_sql(
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at) INCLUDE (trace_id)"
            " WHERE created_at IS NOT NULL"
        )
        plan = "\n".join(str(row[0]) for row in connection.exec_driver_sql("EXPLAIN " + query.sql, query.args(params)))
        connection.rollback()
    assert INDEX_SCAN in plan and "Incremental Sort" in plan, plan
    assert "Incremental Sort" not in analyzed(backend, stmt, params)
