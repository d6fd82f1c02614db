"""Several sessions at once: equal to the oracle, each trace once, each session read through the index,
and one statement (one parameter for the session ids) whatever the number of sessions."""

from __future__ import annotations

import itertools
import json
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backends import Backend
from tests.oracle import make_trace
from tracestore import AsyncTraceStore, InvalidQueryError, TraceContext, TraceStore
from tracestore.core import MAX_SESSIONS, prepare_sessions_query
from tracestore.queries import Statements, compiled, explain_statement, statements_for
from tracestore.rows import decode_rows

T0 = 1_750_000_000.0
SESSIONS = ["a", "b", "c-ü", "d"]
REPO = Path(__file__).resolve().parent.parent


def dataset(n: int = 400, seed: int = 5) -> list[TraceContext]:
    rng = random.Random(seed)
    return [
        make_trace(
            id=f"t{i:04d}",
            created_at=T0 + i // 3,  # ties
            session_uids=rng.sample(SESSIONS, rng.choice([1, 1, 2, 3])),  # traces in several listed sessions
        )
        for i in range(n)
    ]


def oracle_traces(
    traces: list[TraceContext], uids: list[str], since: float | None, limit: int | None
) -> list[TraceContext]:
    matching = [t for t in traces if set(t.session_uids) & set(uids) and (since is None or t.created_at >= since)]
    matching.sort(key=lambda t: (t.created_at, t.id), reverse=True)
    return matching if limit is None else matching[:limit]


def oracle(traces: list[TraceContext], uids: list[str], since: float | None, limit: int | None) -> list[str]:
    return [t.id for t in oracle_traces(traces, uids, since, limit)]


UID_SETS = [
    ["a"],
    ["a", "b"],
    ["c-ü", "d", "a"],
    SESSIONS,
    ["a", "a", "missing"],
    ["d", "c-ü", "d", "b", "a", "b", "c-ü"],  # duplicates count once
    ["missing"],
    [],
]


# Every combination against one data set per engine: storing it once and asking all the questions of it
# checks the same answers as a test per combination, at a fraction of the suite's time.
CASES = list(itertools.product(UID_SETS, [None, T0 + 50, T0 + 50.5, T0 + 9e9], [None, 1, 5, 1000]))


def test_several_sessions_equal_the_oracle(store: TraceStore) -> None:
    traces = dataset()
    store.store_batch(traces)
    by_id = {t.id: t for t in traces}
    wrong = []
    for uids, since, limit in CASES:
        got = store.get_by_session_uids(uids, since=since, limit=limit)
        ids = [t.id for t in got]
        # A trace in two of the sessions comes once, and every trace comes back whole.
        if ids != oracle(traces, uids, since, limit) or len(set(ids)) != len(ids) or any(t != by_id[t.id] for t in got):
            wrong.append((uids, since, limit))
    assert wrong == []


async def test_async_several_sessions(backend: Backend) -> None:
    traces = dataset(seed=6)
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        got = await store.get_by_session_uids(["a", "d"], since=T0 + 20, limit=17)
        assert [t.id for t in got] == oracle(traces, ["a", "d"], T0 + 20, 17)
        got = await store.get_by_session_uids(["c-ü", "b", "c-ü"])
        assert [t.id for t in got] == oracle(traces, ["c-ü", "b"], None, None)
        assert await store.get_by_session_uids([]) == []


# -- against the oracle, random data and queries ----------------------------------------------------------------
# Session ids that a list parameter must keep apart: the characters SQLite's list encoding escapes
# (\x01, and NUL where the engine stores it), its escapes' second characters, JSON's own
# metacharacters, and characters outside the BMP.
PROPERTY_UIDS = ["a", "0", "1", "\x01", "\x010", "\x011", "\x01\x01", '"', "\\", "[]", "c-ü", "😀", "e\u0301"]
NUL_UIDS = ["\x00", "\x00\x01", "\x010\x00"]


def uid_pool(backend: Backend) -> list[str]:
    return PROPERTY_UIDS + (NUL_UIDS if backend.is_sqlite else [])


def run_raw(backend: Backend, stmt: Any, params: dict[str, Any]) -> list[TraceContext]:
    """A tracestore statement run through the tests' own connection, decoded as the stores decode rows."""
    with backend.raw() as connection:
        query = compiled(stmt, connection.dialect)
        return decode_rows(connection.exec_driver_sql(query.sql, query.args(params)).all())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_several_sessions_match_the_oracle_property(store: TraceStore, backend: Backend, data: st.DataObject) -> None:
    """Random traces (ties, several sessions each) and random session lists (duplicates, unknown ids, one
    to all), with and without since and limit: the store's answer, and the statement used while a
    migration is unfinished (run on the same rows), equal the oracle."""
    pool = uid_pool(backend)
    sessions = st.lists(st.sampled_from(pool), min_size=1, max_size=3)
    traces = data.draw(
        st.lists(
            st.builds(
                make_trace,
                id=st.text("xyz09ü", min_size=1, max_size=3),
                created_at=st.sampled_from([T0, T0 + 1, T0 + 1.5, T0 + 2]),
                session_uids=sessions,
            ),
            max_size=30,
            unique_by=lambda trace: trace.id,
        ),
        label="traces",
    )
    with backend.raw() as connection:  # each example starts empty
        connection.exec_driver_sql("DELETE FROM trace_sessions")
        connection.exec_driver_sql("DELETE FROM traces")
    store.store_batch(traces)
    for _ in range(data.draw(st.integers(1, 4), label="queries")):
        uids = data.draw(st.lists(st.sampled_from([*pool, "missing"]), min_size=1, max_size=20), label="uids")
        since = data.draw(st.sampled_from([None, T0, T0 + 1, T0 + 1.25, T0 + 3]), label="since")
        limit = data.draw(st.one_of(st.none(), st.integers(1, 12)), label="limit")
        expected = oracle_traces(traces, uids, since, limit)
        assert store.get_by_session_uids(uids, since=since, limit=limit) == expected
        migrating = prepare_sessions_query(
            statements_for(store.engine.dialect.name), session_uids=uids, since=since, limit=limit, migrating=True
        )
        assert migrating is not None
        assert run_raw(backend, *migrating) == expected


def test_each_listed_session_is_its_own(store: TraceStore, backend: Backend) -> None:
    """One trace per session id: asking for one id finds its trace and no other, alone or in a list."""
    pool = uid_pool(backend)
    traces = [make_trace(id=f"t{i:02d}", created_at=T0 + i, session_uids=[uid]) for i, uid in enumerate(pool)]
    store.store_batch(traces)
    for trace, uid in zip(traces, pool, strict=True):
        assert store.get_by_session_uids([uid]) == [trace], repr(uid)
        assert store.get_by_session_uids([uid, "missing"], limit=1) == [trace], repr(uid)
    assert store.get_by_session_uids(pool) == traces[::-1]
    assert store.get_by_session_uids([*pool, *pool], since=T0 + 2, limit=3) == traces[::-1][:3]


# -- one statement, bounded memory ------------------------------------------------------------------------------
def test_one_statement_whatever_the_number_of_sessions(store: TraceStore) -> None:
    """The session ids are one parameter: asking for 1 .. 120 sessions builds and compiles the statement of
    this since/limit combination at most once (never one per number of sessions)."""
    store.store_batch(dataset(200))
    others = [f"s{i}" for i in range(119)]
    built, compiled_before = Statements.sessions_traces.cache_info().misses, compiled.cache_info().misses
    for count in range(1, 121):
        got = store.get_by_session_uids(["a", *others[: count - 1]], since=T0 + 10, limit=7)
        assert [t.id for t in got] == oracle(dataset(200), ["a"], T0 + 10, 7)
        assert Statements.sessions_traces.cache_info().misses - built <= 1, count
        assert compiled.cache_info().misses - compiled_before <= 1, count


async def test_async_one_statement_whatever_the_number_of_sessions(backend: Backend) -> None:
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(dataset(60))
        built, compiled_before = Statements.sessions_traces.cache_info().misses, compiled.cache_info().misses
        for count in range(1, 41):
            await store.get_by_session_uids([f"s{i}" for i in range(count)], limit=3)
            assert Statements.sessions_traces.cache_info().misses - built <= 1, count
            assert compiled.cache_info().misses - compiled_before <= 1, count


RSS_BOUND_MB = 30.0
RSS_COUNTS = 120


def rss_child(url: str, counts_text: str, bound_text: str) -> None:
    """Run in a new process: RSS growth over one call per number of sessions 1 .. counts; stops early once
    the growth passes the bound (MB). Prints {"counts": how many were run, "growth_mb": ...}."""
    import gc

    counts, bound_mb = int(counts_text), float(bound_text)

    def rss_mb() -> float:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))

    sessions = [f"s{i}" for i in range(counts)]
    with TraceStore(url) as store:
        store.get_by_session_uids(sessions[:1], limit=10)
        gc.collect()
        before = rss_mb()
        for count in range(1, counts + 1):
            store.get_by_session_uids(sessions[:count], limit=10)
            if count % 10 == 0 or count == counts:
                gc.collect()
                growth = rss_mb() - before
                if growth > bound_mb or count == counts:
                    print(json.dumps({"counts": count, "growth_mb": growth}))
                    return


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_memory_stays_flat_over_many_session_counts(store: TraceStore, backend: Backend) -> None:
    """A long-running service asking for ever different numbers of sessions keeps no statement per number: in
    a process of its own (a clean measure), calls with 1 .. 120 sessions grow RSS by less than the bound."""
    store.store_batch(
        [make_trace(id=f"t{i:03d}", created_at=T0 + i, session_uids=[f"s{i % RSS_COUNTS}"]) for i in range(240)]
    )
    code = "import sys; from tests.test_sessions_query import rss_child; rss_child(*sys.argv[1:])"
    result = subprocess.run(
        [sys.executable, "-c", code, backend.url, str(RSS_COUNTS), str(RSS_BOUND_MB)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["counts"] == RSS_COUNTS and measured["growth_mb"] < RSS_BOUND_MB, measured


# -- the plans -----------------------------------------------------------------------------------------------------
THREE = ["a", "b", "c-ü"]
BOUNDS = [(None, None), (None, 20), (T0, None), (T0, 20)]
BOUND_IDS = ["all", "limit", "since", "since-limit"]


def sqlite_plan(store: TraceStore, stmt: Any, params: dict[str, Any]) -> list[tuple[int, int, str]]:
    """EXPLAIN QUERY PLAN as (node, parent, detail)."""
    with store.engine.connect() as connection:
        sql, args = explain_statement(stmt, params, connection.dialect)
        return [(row[0], row[1], row[-1]) for row in connection.exec_driver_sql(sql, args)]


def below(plan: list[tuple[int, int, str]], detail: str) -> list[str]:
    """The details of every node under the (one) node whose detail starts with `detail`."""
    (top,) = [node for node, _, text in plan if text.startswith(detail)]
    inside = {top}
    for node, parent, _ in plan:  # EXPLAIN QUERY PLAN lists parents before their children
        if parent in inside:
            inside.add(node)
    return [text for node, _, text in plan if node in inside and node != top]


def settle(backend: Backend) -> None:
    """Statistics, and on PostgreSQL the visibility map that lets an index-only scan skip the heap (what
    autovacuum gives a table that has been written): the planner's costs depend on both."""
    if backend.is_sqlite:
        backend.analyze()
        return
    with backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE")


def postgresql_plan(backend: Backend, stmt: Any, params: dict[str, Any]) -> str:
    """EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF): the plan with the rows each node really produced."""
    with backend.raw() as connection:
        query = compiled(stmt, connection.dialect)
        rows = connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) " + query.sql, query.args(params)
        )
        return "\n".join(str(row[0]) for row in rows)


@pytest.mark.parametrize(("since", "limit"), BOUNDS, ids=BOUND_IDS)
def test_each_session_is_one_index_range_read(
    store: TraceStore, backend: Backend, since: float | None, limit: int | None
) -> None:
    """The list is read once, and each listed session is one range of the composite index (stopped after
    `limit` entries with a limit): never a scan of trace_sessions, whatever the number of sessions."""
    store.store_batch(dataset(3_000))
    settle(backend)
    prepared = prepare_sessions_query(
        statements_for(store.engine.dialect.name), session_uids=THREE, since=since, limit=limit
    )
    assert prepared is not None
    range_read = "USING COVERING INDEX idx_trace_sessions_uid_time (session_uid=? AND created_at>?)"
    if backend.is_sqlite:
        nodes = sqlite_plan(store, *prepared)
        details = [text for _, _, text in nodes]
        assert "SCAN j VIRTUAL TABLE INDEX 1:" in details, nodes  # json_each, once
        assert not any(re.match(r"SCAN (ts|x|traces)\b", text) for text in details), nodes
        if limit is None:  # each session's range, whole: the nested loop's inner side
            assert f"SEARCH ts {range_read}" in details, nodes
        else:  # the newest `limit` rowids of each session, then each link by its rowid
            assert below(nodes, "CORRELATED LIST SUBQUERY") == [f"SEARCH x {range_read}"], nodes
            assert "SEARCH ts USING INTEGER PRIMARY KEY (rowid=?)" in details, nodes
        return
    plan = postgresql_plan(backend, *prepared)
    assert "Seq Scan on trace_sessions" not in plan, plan
    assert re.search(r"Function Scan on unnest j \(actual rows=3 loops=1\)", plan), plan
    scans = re.findall(
        r"-> +Index (?:Only )?Scan Backward using idx_trace_sessions_uid_time on trace_sessions ts "
        r"\(actual rows=(\d+) loops=(\d+)\)",
        plan,
    )
    assert [loops for _, loops in scans] == ["3"], plan  # one backward range per listed session
    if limit is not None:
        assert int(scans[0][0]) <= limit, plan  # rows per loop: stopped after `limit` entries
        assert re.search(r"-> +Limit \(actual rows=\d+ loops=3\)\n +-> +Index (Only )?Scan Backward", plan), plan


def test_candidates_are_cut_to_the_limit_before_traces_are_read(store: TraceStore, backend: Backend) -> None:
    """With a limit, the keys (created_at, trace_id) of every session are de-duplicated, sorted and cut in
    the subquery `k`; only then does the join read trace rows and session lists."""
    store.store_batch(dataset(3_000))
    settle(backend)
    prepared = prepare_sessions_query(
        statements_for(store.engine.dialect.name), session_uids=SESSIONS, since=None, limit=20
    )
    assert prepared is not None
    if backend.is_sqlite:
        nodes = sqlite_plan(store, *prepared)
        inside = below(nodes, "MATERIALIZE k")
        assert "USE TEMP B-TREE FOR GROUP BY" in inside, nodes  # the candidates, sorted once
        assert not any("traces" in text for text in inside), nodes
        outside = [text for _, _, text in nodes if text not in inside and text != "MATERIALIZE k"]
        assert outside[:2] == ["SCAN k", "SEARCH traces USING INDEX sqlite_autoindex_traces_1 (id=?)"], nodes
        return
    plan = postgresql_plan(backend, *prepared)
    lines = plan.splitlines()
    # The cut (a Limit of 20 rows) is below the join that reads traces, whichever join the planner picks
    # (on a table this small, a hash join over a scan of traces may look cheaper than 20 key lookups).
    join = next(i for i, line in enumerate(lines) if "Join" in line or "Nested Loop" in line)
    cut = next(i for i, line in enumerate(lines) if re.search(r"-> +Limit \(actual rows=20 loops=1\)", line))
    assert join < cut, plan
    # Below the cut, only the candidates: at most limit per session, from the index, no trace row.
    depth = len(lines[cut]) - len(lines[cut].lstrip())
    subtree = itertools.takewhile(lambda line: len(line) - len(line.lstrip()) > depth, lines[cut + 1 :])
    candidates = "\n".join(subtree)
    assert "traces" not in candidates.replace("trace_sessions", ""), plan
    (read,) = re.findall(r"Nested Loop \(actual rows=(\d+) loops=1\)", candidates)
    assert int(read) <= 20 * len(SESSIONS), plan


def test_a_limit_stops_each_session_after_limit_entries_sqlite(db_path: Path) -> None:
    """What the plan promises, counted: SQLite's virtual machine runs about as many instructions for a list
    holding a session of 5,000 traces as for one whose sessions hold 20 each (latest 5)."""
    import sqlite3

    with TraceStore(f"sqlite:///{db_path}") as store:
        big = [make_trace(id=f"b{i:05d}", created_at=T0 + i, session_uids=["big"]) for i in range(5_000)]
        small = [make_trace(id=f"s{i:05d}", created_at=T0 + i, session_uids=[f"small{i % 2}"]) for i in range(40)]
        store.store_batch(big + small)

        def instructions(uids: list[str]) -> int:
            prepared = prepare_sessions_query(
                statements_for(store.engine.dialect.name), session_uids=uids, since=None, limit=5
            )
            assert prepared is not None
            query = compiled(prepared[0], store.engine.dialect)
            count = [0]
            with sqlite3.connect(db_path) as connection:

                def step() -> int:
                    count[0] += 1
                    return 0

                connection.set_progress_handler(step, 10)
                assert len(connection.execute(query.sql, query.args(prepared[1])).fetchall()) == 5
            return count[0]

        assert instructions(["big", "small0"]) < 1.5 * instructions(["small1", "small0"])


# -- bad input ------------------------------------------------------------------------------------------------------
def test_bad_session_lists_are_refused(store: TraceStore) -> None:
    for bad in ["a", None, [None], [""], [1], ["ok", "\ud800"], {"a": 1}.keys()]:
        with pytest.raises(InvalidQueryError):
            store.get_by_session_uids(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidQueryError, match=f"at most {MAX_SESSIONS}"):
        store.get_by_session_uids([f"s{i}" for i in range(MAX_SESSIONS + 1)])
    many = [f"s{i}" for i in range(MAX_SESSIONS)]
    assert store.get_by_session_uids(many, limit=3) == []
    store.store(make_trace(id="t", created_at=T0, session_uids=["a"]))
    assert [t.id for t in store.get_by_session_uids(["a"] * (MAX_SESSIONS + 1))] == ["t"]  # each id counts once
