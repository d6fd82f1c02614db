"""One behaviour suite, both stores: every test here runs on TraceStore and on AsyncTraceStore (driven to
completion from synchronous test code), on SQLite and on PostgreSQL, and checks answers against the oracle.

Both stores run the same plans (tracestore.core); this suite is what shows that their drivers answer them
the same way, error for error.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from tests.backends import Backend
from tests.oracle import make_trace, merge_restore, oracle_query
from tracestore import (
    AsyncTraceStore,
    InvalidQueryError,
    InvalidTraceError,
    PageCursor,
    TraceContext,
    TraceStore,
)

T0 = 1_700_000_000.0
SESSIONS = ("s-a", "s-b", "sé-ü ☃", "s-empty")


class Blocking:
    """An AsyncTraceStore driven from synchronous code: each call runs to completion on one event loop, and its
    async iterators are read the same way, so a test reads the same on both stores."""

    def __init__(self, store: AsyncTraceStore, loop: asyncio.AbstractEventLoop) -> None:
        self._async, self._loop = store, loop

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._async, name)
        if inspect.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._loop.run_until_complete(attribute(*args, **kwargs))
        if name in ("iter_session", "tail"):
            return lambda *args, **kwargs: self._iterate(attribute(*args, **kwargs))
        return attribute

    def _iterate(self, iterator: AsyncIterator[Any]) -> Iterator[Any]:
        while True:
            try:
                yield self._loop.run_until_complete(anext(iterator))
            except StopAsyncIteration:
                return


@pytest.fixture(params=["sync", "async"])
def either(request: pytest.FixtureRequest, backend: Backend) -> Iterator[Any]:
    """A store on `backend`: TraceStore, or AsyncTraceStore behind Blocking."""
    if request.param == "sync":
        with TraceStore(backend.url) as store:
            yield store
        return
    loop = asyncio.new_event_loop()
    async_store = AsyncTraceStore(backend.async_url)
    try:
        yield Blocking(async_store, loop)
    finally:
        loop.run_until_complete(async_store.close())
        loop.close()


def dataset() -> list[TraceContext]:
    """Ties on created_at (three per second), unicode session ids, traces in several sessions, a big payload."""
    traces = []
    for n in range(120):
        sessions = [SESSIONS[n % 3]] + ([SESSIONS[(n + 1) % 3]] if n % 4 == 0 else [])
        traces.append(
            make_trace(
                id=f"t{n:03d}-ü",
                created_at=T0 + n // 3,
                namespace=("web", "jobs")[n % 2],
                context_type=("llm", "tool", "span")[n % 3],
                session_uids=sessions,
            )
        )
    traces.append(make_trace(id="big", data={"blob": "x" * 200_000}, created_at=T0 + 17, session_uids=["s-a"]))
    return traces


@pytest.fixture
def stored(either: Any) -> tuple[Any, list[TraceContext]]:
    traces = dataset()
    either.store_batch(traces[:60])
    either.store_batch(traces[60:])
    return either, traces


def test_store_returns_the_id_and_get_gives_the_trace_back(either: Any) -> None:
    trace = make_trace(session_uids=["b", "a", "a"], data={"nested": [1, 2.5, None, "ü"]})
    assert either.store(trace) == trace.id
    assert either.get(trace.id) == trace
    assert either.get("missing") is None
    assert either.store(make_trace(id="given-id")) == "given-id"


def test_queries_match_the_oracle(stored: tuple[Any, list[TraceContext]]) -> None:
    store, traces = stored
    for uid, since, limit in itertools.product([*SESSIONS, None], [None, T0, T0 + 20], [None, 1, 7]):
        expected = oracle_query(traces, session_uid=uid, since=since, limit=limit)
        assert store.query(session_uid=uid, since=since, limit=limit) == expected, (uid, since, limit)
        if uid is not None:
            assert store.get_by_session_uid(uid, since=since, limit=limit) == expected
    for namespace, context_type, until in itertools.product(["web", None], ["llm", None], [None, T0 + 30]):
        expected = oracle_query(traces, namespace=namespace, context_type=context_type, until=until, limit=20)
        assert store.query(namespace=namespace, context_type=context_type, until=until, limit=20) == expected


def test_several_sessions_match_the_oracle(stored: tuple[Any, list[TraceContext]]) -> None:
    store, traces = stored
    for uids, since, limit in itertools.product(
        [["s-a"], ["s-a", "s-b"], ["s-b", "sé-ü ☃", "s-b", "missing"], []], [None, T0 + 10], [None, 5]
    ):
        matching = [t for t in traces if set(uids) & set(t.session_uids)]
        expected = oracle_query(matching, since=since, limit=limit)
        assert store.get_by_session_uids(uids, since=since, limit=limit) == expected, (uids, since, limit)


def test_pages_walk_the_session_once_and_iter_session_agrees(stored: tuple[Any, list[TraceContext]]) -> None:
    store, traces = stored
    for uid in SESSIONS:
        expected = oracle_query(traces, session_uid=uid, since=T0 + 5)
        walked: list[TraceContext] = []
        cursor: PageCursor | None = None
        while True:
            page = store.page_by_session_uid(uid, since=T0 + 5, limit=7, cursor=cursor)
            walked += page.items
            if page.next_cursor is None:
                break
            cursor = PageCursor.parse(str(page.next_cursor))  # through the token, as an HTTP API would
        assert walked == expected
        assert list(store.iter_session(uid, since=T0 + 5, page_size=4)) == expected


def test_restore_merges_sessions_and_moves_the_trace(either: Any) -> None:
    first = make_trace(id="r", created_at=T0, session_uids=["x"])
    either.store(first)
    again = make_trace(id="r", created_at=T0 + 50, session_uids=["y"], data={"v": 2})
    either.store(again)
    assert either.get("r") == merge_restore(first, again)
    assert [t.id for t in either.get_by_session_uid("x", since=T0 + 50)] == ["r"]  # its link moved with it
    assert either.delete("r") is True
    assert either.delete("r") is False
    assert either.get_by_session_uid("x") == [] and either.get_by_session_uid("y") == []


def test_prune_deletes_what_is_older_and_says_so(stored: tuple[Any, list[TraceContext]]) -> None:
    store, traces = stored
    cutoff = T0 + 20
    dry = store.prune(cutoff, dry_run=True)
    assert (dry.dry_run, dry.deleted) == (True, len([t for t in traces if t.created_at < cutoff]))
    report = store.prune(cutoff, batch_size=7)
    assert report.deleted == dry.deleted and report.batches >= report.deleted // 7
    assert store.query() == oracle_query([t for t in traces if t.created_at >= cutoff])


def test_tail_brings_the_backlog_then_what_arrives(either: Any) -> None:
    now = time.time()
    either.store_batch([make_trace(id=f"b{i}", created_at=now - 30 + i, session_uids=["live"]) for i in range(3)])
    polls = either.tail("live", since=now - 60, poll_interval=0)
    assert [t.id for t in next(polls)] == ["b0", "b1", "b2"]
    either.store(make_trace(id="new", created_at=time.time(), session_uids=["live"]))
    assert [t.id for t in next(polls)] == ["new"]
    assert next(polls) == []


def test_explain_gives_the_plan_of_the_session_query(stored: tuple[Any, list[TraceContext]]) -> None:
    """SQLite reads the session index here; PostgreSQL may scan a table this small (tests/test_plans_postgresql.py
    checks its plans on a realistic one)."""
    store = stored[0]
    lines = store.explain("s-a", since=T0, limit=10)
    assert lines and any("trace_sessions" in line for line in lines), lines
    if store.engine.dialect.name == "sqlite":
        assert any("idx_trace_sessions_uid_time" in line for line in lines), lines


BAD_CALLS: dict[str, tuple[Callable[[Any], Any], type[Exception], str]] = {
    "limit 0": (lambda s: s.query(limit=0), InvalidQueryError, "limit must be an int"),
    "since as text": (lambda s: s.get_by_session_uid("s", since="yesterday"), InvalidQueryError, "since must be"),
    "no session": (lambda s: s.get_by_session_uid(None), InvalidQueryError, "session_uid must be a str"),
    "empty session": (lambda s: s.get_by_session_uids(["a", ""]), InvalidQueryError, "must not be empty"),
    "a str of sessions": (lambda s: s.get_by_session_uids("abc"), InvalidQueryError, "list of session ids"),
    "a cursor that is a token": (
        lambda s: s.page_by_session_uid("s", cursor="abc"),
        InvalidQueryError,
        "cursor must be a PageCursor",
    ),
    "a page without limit": (lambda s: s.page_by_session_uid("s", limit=None), InvalidQueryError, "needs a limit"),
    "not a trace": (lambda s: s.store("trace"), InvalidTraceError, "expected a TraceContext"),
    "a trace id of bytes": (lambda s: s.get(b"id"), InvalidQueryError, "trace_id must be a str"),
    "a negative lookback": (lambda s: s.tail("s", lookback=-1), InvalidQueryError, "lookback must be"),
    "since positional": (lambda s: s.get_by_session_uid("s", T0), TypeError, "positional argument"),
}


@pytest.mark.parametrize("call", list(BAD_CALLS))
def test_bad_calls_fail_the_same_way_before_the_database(either: Any, call: str) -> None:
    act, error, message = BAD_CALLS[call]
    with pytest.raises(error, match=message):
        result = act(either)
        if inspect.isgenerator(result) or isinstance(result, Iterator):
            next(result)
