"""Several sessions at once: equal to the oracle, each trace once, each session read through the index."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from tests.backends import Backend
from tests.oracle import make_trace
from tracestore import AsyncTraceStore, InvalidQueryError, TraceContext, TraceStore
from tracestore.queries import explain_statement
from tracestore.rows import MAX_SESSIONS, prepare_sessions_query

T0 = 1_750_000_000.0
SESSIONS = ["a", "b", "c-ü", "d"]


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


def oracle(traces: list[TraceContext], uids: list[str], since: float | None, limit: int | None) -> list[str]:
    matching = [t for t in traces if set(t.session_uids) & set(uids) and (since is None or t.created_at >= since)]
    matching.sort(key=lambda t: (t.created_at, t.id), reverse=True)
    return [t.id for t in (matching if limit is None else matching[:limit])]


UID_SETS = [["a"], ["a", "b"], ["c-ü", "d", "a"], SESSIONS, ["a", "a", "missing"], ["missing"], []]


@pytest.mark.parametrize(
    ("uids", "since", "limit"),
    list(itertools.product(UID_SETS, [None, T0 + 50, T0 + 50.5, T0 + 9e9], [None, 1, 5, 1000])),
)
def test_several_sessions_equal_the_oracle(
    store: TraceStore, uids: list[str], since: float | None, limit: int | None
) -> None:
    traces = dataset()
    store.store_batch(traces)
    got = store.get_by_session_uids(uids, since, limit)
    assert [t.id for t in got] == oracle(traces, uids, since, limit)
    assert len({t.id for t in got}) == len(got)  # a trace in two of the sessions comes once
    by_id = {t.id: t for t in traces}
    assert all(t == by_id[t.id] for t in got)


async def test_async_several_sessions(backend: Backend) -> None:
    traces = dataset(seed=6)
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        got = await store.get_by_session_uids(["a", "d"], T0 + 20, 17)
        assert [t.id for t in got] == oracle(traces, ["a", "d"], T0 + 20, 17)
        assert await store.get_by_session_uids([]) == []


def test_each_session_is_an_index_range_read_with_limit(store: TraceStore, backend: Backend) -> None:
    store.store_batch(dataset(3_000))
    backend.analyze()
    stmt, params = prepare_sessions_query(store._sql, session_uids=SESSIONS, since=T0, limit=20)  # type: ignore[misc]
    plan = backend.plan(stmt, params)
    if not backend.is_sqlite:
        # Each arm: a Limit over a backward index-only scan of its session's range, no Sort inside;
        # the keys of all arms are sorted and cut (the inner Limit) below the join to traces.
        text = "\n".join(plan)
        scan = "Index Only Scan Backward using idx_trace_sessions_uid_time"
        arms = [i for i, line in enumerate(plan) if scan in line]
        assert len(arms) == len(SESSIONS), text
        assert all(plan[i - 1].strip().startswith("->  Limit") for i in arms), text
        join = next(i for i, line in enumerate(plan) if "Join" in line or "Nested Loop" in line)
        first_limit = next(i for i, line in enumerate(plan) if "Limit" in line)
        assert join < first_limit, text
        return
    searches = [line for line in plan if "SEARCH ts USING COVERING INDEX idx_trace_sessions_uid_time" in line]
    assert len(searches) == len(SESSIONS), plan  # one index range per session
    assert not any(line.startswith("SCAN ts") or "SCAN trace_sessions" in line for line in plan), plan


def test_candidates_are_cut_to_the_limit_before_traces_are_read(store: TraceStore, db_path: Path) -> None:
    """With a limit, the keys (created_at, trace_id) of every arm are sorted and cut inside the
    materialized subquery `k`; only then does the join read trace rows and session lists. Joining
    first made a 10-session latest-100 read 13-15x one session's at 1M traces; now ~4x.
    (SQLite's plan shape; PostgreSQL's is checked in test_each_session_is_an_index_range_read_with_limit.)"""
    store.store_batch(dataset(3_000))
    stmt, params = prepare_sessions_query(store._sql, session_uids=SESSIONS, since=None, limit=20)  # type: ignore[misc]
    with store.engine.connect() as connection:
        sql, args = explain_statement(stmt, params, connection.dialect)
        plan = [(row[0], row[1], row[-1]) for row in connection.exec_driver_sql(sql, args)]
    (keys,) = [node for node, _, detail in plan if detail == "MATERIALIZE k"]
    inside = {keys}
    for node, parent, _ in plan:  # EXPLAIN QUERY PLAN lists parents before their children
        if parent in inside:
            inside.add(node)
    assert any(detail == "USE TEMP B-TREE FOR ORDER BY" for node, _, detail in plan if node in inside), plan
    assert not any("SEARCH traces" in detail for node, _, detail in plan if node in inside), plan
    assert [detail for node, _, detail in plan if node not in inside][:2] == [
        "SCAN k",
        "SEARCH traces USING INDEX sqlite_autoindex_traces_1 (id=?)",
    ], plan


def test_bad_session_lists_are_refused(store: TraceStore) -> None:
    for bad in ["a", None, [None], [""], [1], ["ok", "\ud800"]]:
        with pytest.raises(InvalidQueryError):
            store.get_by_session_uids(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidQueryError, match=f"at most {MAX_SESSIONS}"):
        store.get_by_session_uids([f"s{i}" for i in range(MAX_SESSIONS + 1)])
    many = [f"s{i}" for i in range(MAX_SESSIONS)]
    assert store.get_by_session_uids(many, limit=3) == []
