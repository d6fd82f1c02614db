"""Keyset pagination: pages concatenate to the oracle's answer, never skip or repeat under concurrent inserts."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backends import Backend
from tests.oracle import make_trace, oracle_query
from tracestore import AsyncTraceStore, InvalidQueryError, PageCursor, TraceContext, TraceStore
from tracestore.core import prepare_page
from tracestore.queries import statements_for

T0 = 1_750_000_000.0


def dataset(n: int = 300, seed: int = 3) -> list[TraceContext]:
    """Ties (four traces per second), unicode ids and sessions, traces in two sessions."""
    rng = random.Random(seed)
    traces = []
    for i in range(n):
        sessions = ["s"] if rng.random() < 0.7 else ["s", "セッション"]
        if rng.random() < 0.2:
            sessions = ["other"]
        traces.append(make_trace(id=f"t{i:04d}-ü", created_at=T0 + i // 4, session_uids=sessions))
    return traces


def all_pages(store: TraceStore, uid: str, since: float | None, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        items, cursor = store.page_by_session_uid(uid, since=since, limit=limit, cursor=cursor)
        pages.append([t.id for t in items])
        if cursor is None:
            return pages


@pytest.mark.parametrize("since", [None, T0 + 10, T0 + 10.5, T0 + 10_000])
@pytest.mark.parametrize("uid", ["s", "セッション", "missing"])
def test_pages_concatenate_to_the_oracle(store: TraceStore, uid: str, since: float | None) -> None:
    traces = dataset()
    store.store_batch(traces)
    expected = [t.id for t in oracle_query(traces, session_uid=uid, since=since)]
    for limit in (1, 3, 4, 7, 100, 1000):  # one data set for every page size: the same checks, stored once
        pages = all_pages(store, uid, since, limit)
        assert [trace_id for page in pages for trace_id in page] == expected, limit
        assert all(len(page) == limit for page in pages[:-1]) and len(pages[-1]) <= limit, limit
        assert list(t.id for t in store.iter_session(uid, since=since, page_size=limit)) == expected, limit


async def test_async_pages_match_the_sync_ones(backend: Backend) -> None:
    traces = dataset(seed=4)
    with TraceStore(backend.url) as sync_store:
        sync_store.store_batch(traces)
        expected = all_pages(sync_store, "s", T0 + 5, 9)
    async with AsyncTraceStore(backend.async_url) as store:
        pages, cursor = [], None
        while True:
            items, cursor = await store.page_by_session_uid("s", since=T0 + 5, limit=9, cursor=cursor)
            pages.append([t.id for t in items])
            if cursor is None:
                break
        assert pages == expected
        assert [t.id async for t in store.iter_session("s", since=T0 + 5, page_size=9)] == [
            i for p in expected for i in p
        ]


def test_the_cursor_is_the_sort_key_and_a_token(store: TraceStore) -> None:
    traces = dataset()
    store.store_batch(traces)
    items, cursor = store.page_by_session_uid("s", limit=5)
    assert cursor == PageCursor(items[-1].created_at, items[-1].id)
    assert PageCursor.parse(str(cursor)) == cursor
    again, _ = store.page_by_session_uid("s", limit=5, cursor=PageCursor.parse(str(cursor)))
    assert again[0].id != items[-1].id
    for bad in ["", "not base64 !", "W10=", "WzEsMl0=", "WyJ4IiwieSJd"]:  # [], [1, 2], ["x", "y"]
        with pytest.raises(InvalidQueryError, match="not a page cursor"):
            PageCursor.parse(bad)
    with pytest.raises(InvalidQueryError, match="cursor must be a PageCursor"):
        store.page_by_session_uid("s", cursor="abc")  # type: ignore[arg-type]
    for limit in (0, -1, None, True, 1.5):
        with pytest.raises(InvalidQueryError):
            store.page_by_session_uid("s", limit=limit)  # type: ignore[arg-type]


def test_a_page_after_a_cursor_is_an_index_range_read(store: TraceStore, backend: Backend) -> None:
    store.store_batch(dataset(2_000))
    backend.analyze()
    for since in (None, T0):
        stmt, params = prepare_page(
            statements_for(store.engine.dialect.name),
            session_uid="s",
            since=since,
            limit=50,
            cursor=PageCursor(T0 + 100, "t0400-ü"),
        )
        plan = backend.plan(stmt, params)
        if backend.is_sqlite:
            assert any("SEARCH ts USING COVERING INDEX idx_trace_sessions_uid_time" in line for line in plan), plan
            assert any("(created_at,trace_id)<(?,?)" in line for line in plan), plan
            assert not any("TEMP B-TREE" in line or "SCAN" in line for line in plan), plan
        else:
            # The cursor is the start of the index range (an Index Cond, not a Filter), read in index
            # order: a Limit over a nested loop whose outer side walks the index backwards, no Sort.
            text = "\n".join(plan)
            assert plan[0].startswith("Limit"), text
            assert "Index Only Scan Backward using idx_trace_sessions_uid_time on trace_sessions ts" in text, text
            assert "Index Cond: ((session_uid = " in text and "ROW(created_at, trace_id) < ROW(" in text, text
            assert "Sort" not in text, text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10_000),
    limit=st.integers(1, 12),
    arrivals=st.lists(st.tuples(st.integers(-30, 120), st.booleans()), max_size=60),
)
def test_no_skip_no_repeat_while_traces_arrive(backend: Backend, seed: int, limit: int, arrivals: list) -> None:
    """Traces stored between pages (newer, older, tied with the cursor, in and out of the session) never make
    a page repeat a trace or skip one that existed when paging started."""
    with TraceStore(backend.url) as store:
        with backend.raw() as connection:  # each example starts empty
            connection.exec_driver_sql("DELETE FROM trace_sessions")
            connection.exec_driver_sql("DELETE FROM traces")
        start = dataset(80, seed=seed)
        store.store_batch(start)
        existing = [t.id for t in oracle_query(start, session_uid="s")]
        seen: list[str] = []
        cursor = None
        pending = list(arrivals)
        n = 0
        while True:
            items, cursor = store.page_by_session_uid("s", limit=limit, cursor=cursor)
            seen += [t.id for t in items]
            for offset, in_session in pending[:3]:  # a few traces arrive between two requests
                n += 1
                store.store(
                    make_trace(id=f"new-{n}", created_at=T0 + offset // 4, session_uids=["s" if in_session else "x"])
                )
            pending = pending[3:]
            if cursor is None:
                break
        assert len(seen) == len(set(seen))  # nothing repeated
        assert set(existing) <= set(seen)  # nothing that existed was skipped
        assert [i for i in seen if i in set(existing)] == existing  # and in the order of the sort key
