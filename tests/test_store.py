"""TraceStore on SQLite and PostgreSQL: query semantics vs brute-force oracles, writes, errors, connections.

Behaviour tests take `backend` / `store` and run on both engines; the SQLite-only ones (files, pragmas, WAL,
BEGIN IMMEDIATE, `sqlite:///` URLs) take `db_path`, and their PostgreSQL counterparts take `pg_server_url`.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import logging
import math
import os
import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import URL, make_url

from tests.backends import Backend
from tests.oracle import make_trace as make
from tests.oracle import merge_restore, oracle_query
from tracestore import (
    InvalidQueryError,
    InvalidTraceError,
    SchemaOutOfDateError,
    StorageError,
    TraceContext,
    TraceStore,
    TraceStoreError,
    migrate,
)
from tracestore.models import SESSION_TIME_INDEX

T0 = 1_700_000_000.0


def assert_matches_oracles(store: TraceStore, backend: Backend, traces: list[TraceContext], **args: Any) -> None:
    expected = oracle_query(traces, **args)
    assert store.query(**args) == expected, args
    assert backend.sql_oracle_query(**args) == expected, args


# -- round trip -------------------------------------------------------------------------------------
UNICODE_TEXT = "emoji 😀👩‍👩‍👧 CJK 中文字符 combining e\u0301 Å\u030a nul a\x00b rtl עברית \u2028 \"'\\"

PAYLOADS: list[Any] = [
    None,
    True,
    0,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.0,
    5e-324,
    1.7976931348623157e308,
    "",
    UNICODE_TEXT,
    [],
    {},
    [1, "two", None, [3.25, {"four": False}]],
    {UNICODE_TEXT: {"nested": [UNICODE_TEXT, {"": None}]}},
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=repr)
def test_round_trip_exact(store: TraceStore, payload: Any) -> None:
    trace = make(data=payload, metadata={"payload": payload}, session_uids=["s"], created_at=T0 + 0.123456789)
    store.store(trace)
    assert store.get(trace.id) == trace
    assert store.get_by_session_uid("s") == [trace]
    assert store.query() == [trace]
    assert store.query(namespace="web", context_type="span", session_uid="s") == [trace]


def test_round_trip_unicode_identifiers(store: TraceStore, backend: Backend) -> None:
    sessions = ["😀", "中文", "e\u0301", "é", *nul_identifiers(backend, "a\x00b"), "a", "x\"y'z\\", " ", "\u2028"]
    traces = [
        make(
            id=f"id-{index}-{uid}",
            namespace=f"ns-{uid}",
            context_type=f"type-{uid}",
            data=UNICODE_TEXT,
            session_uids=[uid, "shared"],
            created_at=T0 + index,
        )
        for index, uid in enumerate(sessions)
    ]
    store.store_batch(traces)
    for trace in traces:
        assert store.get(trace.id) == trace
        uid = next(uid for uid in trace.session_uids if uid != "shared")
        assert store.get_by_session_uid(uid) == [trace]
        assert store.query(namespace=trace.namespace, context_type=trace.context_type) == [trace]
    # NFC and NFD spellings (and on SQLite "a" vs "a\0b") stay distinct sessions.
    assert_matches_oracles(store, backend, traces, session_uid="shared")
    assert_matches_oracles(store, backend, traces, session_uid="a")


def test_one_mebibyte_payload(store: TraceStore) -> None:
    payload = {"blob": "x" * (1 << 20), "list": list(range(50_000)), "text": UNICODE_TEXT * 1000}
    trace = make(data=payload, session_uids=["big"])
    store.store(trace)
    assert store.get(trace.id) == trace
    assert store.get_by_session_uid("big", limit=1) == [trace]


def test_get_unknown_id_is_none(store: TraceStore) -> None:
    assert store.get("nope") is None
    store.store(make(id="yes"))
    assert store.get("nope") is None


def test_multi_session_trace_found_through_every_session(store: TraceStore) -> None:
    trace = make(session_uids=["c", "a", "b"], created_at=T0)
    store.store(trace)
    for uid in ("a", "b", "c"):
        assert store.get_by_session_uid(uid) == [trace]
    assert store.get_by_session_uid("d") == []
    assert store.get(trace.id).session_uids == ("a", "b", "c")  # type: ignore[union-attr]


def test_trace_without_sessions(store: TraceStore) -> None:
    trace = make(created_at=T0)
    store.store(trace)
    assert store.get(trace.id) == trace
    assert store.query() == [trace]
    assert store.query(session_uid="any") == []


def nul_identifiers(backend: Backend, *identifiers: str) -> tuple[str, ...]:
    """`identifiers` (holding NUL) on SQLite, which stores them; none on PostgreSQL, whose text cannot hold
    NUL: test_nul_in_an_identifier_is_refused_on_postgresql covers that."""
    return identifiers if backend.is_sqlite else ()


def test_nul_in_an_identifier_is_refused_on_postgresql(pg_url: URL) -> None:
    # Refused before the database is touched, nothing of the batch written (SQLite stores these: see
    # nul_identifiers); reads with NUL fail with a library error (StorageError today: nothing can match).
    with TraceStore(pg_url.render_as_string(hide_password=False)) as store:
        store.store(make(id="keep", session_uids=["a"], created_at=T0))
        for bad in [
            make(id="a\x00b"),
            make(namespace="n\x00"),
            make(context_type="\x00"),
            make(session_uids=["a", "s\x00"]),
        ]:
            with pytest.raises(InvalidTraceError, match="NUL"):
                store.store_batch([make(id="fresh", session_uids=["a"]), bad])
            assert store.get("fresh") is None
            assert [trace.id for trace in store.query()] == ["keep"]
            assert [trace.id for trace in store.get_by_session_uid("a")] == ["keep"]
        for read in [
            lambda: store.get("a\x00b"),
            lambda: store.get_by_session_uid("s\x00"),
            lambda: store.query(namespace="n\x00"),
            lambda: store.delete("a\x00b"),
        ]:
            with pytest.raises(TraceStoreError, match="NUL"):
                read()


# -- oracle comparisons on a fixed data set ------------------------------------------------------------
SESSIONS = ("s1", "s2", "s3", "😀")
TIE = T0 + 50.0


def fixed_traces() -> list[TraceContext]:
    rng = random.Random(20240601)
    traces = []
    for index in range(90):
        # A third of the traces share one timestamp, a few more share another: ties everywhere.
        created = TIE if index % 3 == 0 else T0 + rng.choice([10.0, 20.5, 20.5, 30.0]) + rng.randrange(40)
        traces.append(
            make(
                id=rng.choice(["", "z", "ä", "0"]) + new_id(rng),
                namespace=rng.choice(["web", "web", "worker"]),
                context_type=rng.choice(["span", "log", "log"]),
                data={"index": index},
                session_uids=rng.sample(SESSIONS, rng.choice([0, 1, 1, 2, 3])),
                created_at=created,
            )
        )
    return traces


def new_id(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


@pytest.fixture
def fixed(store: TraceStore) -> list[TraceContext]:
    """The fixed data set in `store`: the first 40 traces in one batch, the rest one by one."""
    traces = fixed_traces()
    store.store_batch(traces[:40])
    for trace in traces[40:]:
        store.store(trace)
    return traces


QUERY_GRID = list(
    itertools.product(
        [None, "s1", "😀", "missing"],  # session_uid
        [None, "web", "worker"],  # namespace
        [None, "log"],  # context_type
        [None, TIE, T0 + 25.0],  # since
        [None, TIE, T0 + 100.0],  # until
        [None, 1, 7, 1000],  # limit
    )
)


def test_all_filter_combinations_match_oracles(store: TraceStore, backend: Backend, fixed: list[TraceContext]) -> None:
    traces = fixed
    for session_uid, namespace, context_type, since, until, limit in QUERY_GRID:
        args = {
            "session_uid": session_uid,
            "namespace": namespace,
            "context_type": context_type,
            "since": since,
            "until": until,
            "limit": limit,
        }
        assert_matches_oracles(store, backend, traces, **args)


def test_get_by_session_uid_matches_oracle(store: TraceStore, fixed: list[TraceContext]) -> None:
    traces = fixed
    for uid, since, limit in itertools.product(SESSIONS, [None, T0, TIE, TIE + 0.001], [None, 1, 5, 500]):
        expected = oracle_query(traces, session_uid=uid, since=since, limit=limit)
        assert store.get_by_session_uid(uid, since=since, limit=limit) == expected
        assert store.get_by_session_uid(uid, since=since, limit=limit) == expected


def test_ties_ordered_by_id_descending(store: TraceStore, fixed: list[TraceContext]) -> None:
    traces = fixed
    tied = store.query(since=TIE, until=TIE + 0.001)
    assert len(tied) == sum(trace.created_at == TIE for trace in traces) >= 20
    assert [trace.id for trace in tied] == sorted((trace.id for trace in tied), reverse=True)
    # Paging through the tie with growing limits is stable: each page is a prefix of the next.
    pages = [store.query(session_uid="s1", since=TIE, until=TIE + 0.001, limit=n) for n in range(1, 12)]
    for shorter, longer in itertools.pairwise(pages):
        assert longer[: len(shorter)] == shorter


def test_results_are_deterministic(store: TraceStore, fixed: list[TraceContext]) -> None:
    assert len({tuple(t.id for t in store.query(session_uid="s2")) for _ in range(5)}) == 1


# -- boundaries ----------------------------------------------------------------------------------------
@pytest.fixture
def timeline(store: TraceStore) -> list[TraceContext]:
    traces = [make(id=f"t{n}", created_at=T0 + n, session_uids=["s"]) for n in range(5)]
    store.store_batch(traces)
    return traces


@pytest.mark.parametrize("session_uid", [None, "s"])
def test_since_is_inclusive_until_is_exclusive(
    store: TraceStore, timeline: list[TraceContext], session_uid: str | None
) -> None:
    newest_first = timeline[::-1]
    assert store.query(session_uid=session_uid, since=T0 + 2) == newest_first[:3]
    assert store.query(session_uid=session_uid, until=T0 + 2) == newest_first[3:]
    assert store.query(session_uid=session_uid, since=T0 + 2, until=T0 + 3) == [timeline[2]]
    assert store.query(session_uid=session_uid, since=T0 + 2, until=T0 + 2) == []
    # Just off the boundary, by the smallest float step.
    assert store.query(session_uid=session_uid, since=math.nextafter(T0 + 2, math.inf)) == newest_first[:2]
    assert store.query(session_uid=session_uid, until=math.nextafter(T0 + 2, math.inf)) == newest_first[2:]


@pytest.mark.parametrize("session_uid", [None, "s"])
def test_empty_windows(store: TraceStore, timeline: list[TraceContext], session_uid: str | None) -> None:
    assert store.query(session_uid=session_uid, since=T0 + 100) == []
    assert store.query(session_uid=session_uid, until=T0 - 100) == []
    assert store.query(session_uid=session_uid, since=T0 + 3, until=T0 + 1) == []
    assert store.query(session_uid=session_uid, until=T0) == []
    if session_uid is not None:
        assert store.get_by_session_uid(session_uid, since=T0 + 4.5) == []


@pytest.mark.parametrize("session_uid", [None, "s"])
def test_limit(store: TraceStore, timeline: list[TraceContext], session_uid: str | None) -> None:
    newest_first = timeline[::-1]
    assert store.query(session_uid=session_uid, limit=1) == newest_first[:1]
    assert store.query(session_uid=session_uid, limit=5) == newest_first
    assert store.query(session_uid=session_uid, limit=6) == newest_first
    assert store.query(session_uid=session_uid, limit=2**63 - 1) == newest_first


@pytest.mark.parametrize("limit", [2**63, 10**30])
def test_huge_limit_is_not_a_driver_error(store: TraceStore, timeline: list[TraceContext], limit: int) -> None:
    # A positive int passes validation, so it must mean "no limit" or be refused as InvalidQueryError.
    try:
        result = store.query(session_uid="s", limit=limit)
    except InvalidQueryError:
        return
    assert result == timeline[::-1]


def test_int_bounds_compare_like_floats(store: TraceStore, timeline: list[TraceContext]) -> None:
    assert store.query(since=int(T0) + 3) == timeline[::-1][:2]
    assert store.query(session_uid="s", until=int(T0) + 1) == [timeline[0]]


# -- property tests against the oracle -----------------------------------------------------------------
TIMES = [-1.5, 0.0, 1.0, 1.0 + 2**-40, 2.0, T0, T0 + 0.001]
BOUNDS = st.one_of(st.none(), st.sampled_from([*TIMES, 0.5, 1.5, T0 - 1, 253402300799.0, -1e300]))
PROP_SESSIONS = ["a", "b", "é", "e\u0301", "😀"]
JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=8,
)


def trace_strategy(ids: st.SearchStrategy[str]) -> st.SearchStrategy[TraceContext]:
    return st.builds(
        TraceContext,
        context_type=st.sampled_from(["span", "log"]),
        namespace=st.sampled_from(["web", "worker"]),
        data=JSON_VALUES,
        metadata=st.dictionaries(st.text(max_size=3), JSON_VALUES, max_size=2),
        session_uids=st.lists(st.sampled_from(PROP_SESSIONS), max_size=3),
        created_at=st.sampled_from(TIMES),
        updated_at=st.sampled_from(TIMES),
        id=ids,
    )


QUERY_ARGS = st.fixed_dictionaries(
    {
        "session_uid": st.one_of(st.none(), st.sampled_from([*PROP_SESSIONS, "nobody"])),
        "namespace": st.one_of(st.none(), st.sampled_from(["web", "worker"])),
        "context_type": st.one_of(st.none(), st.sampled_from(["span", "log"])),
        "since": BOUNDS,
        "until": BOUNDS,
        "limit": st.one_of(st.none(), st.integers(min_value=1, max_value=30)),
    }
)


def empty_tables(backend: Backend) -> None:
    """Every hypothesis example starts from no traces: function-scoped fixtures are shared across examples,
    and a fresh migrated database per example costs a second on PostgreSQL."""
    with backend.raw() as connection:
        connection.exec_driver_sql("DELETE FROM trace_sessions")
        connection.exec_driver_sql("DELETE FROM traces")
    assert backend.table_rows("traces") == backend.table_rows("trace_sessions") == []


PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    # The shared store is emptied at the start of every example (empty_tables).
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@PROPERTY_SETTINGS
@given(data=st.data(), queries=st.lists(QUERY_ARGS, min_size=1, max_size=6), chunk=st.integers(1, 25))
def test_query_matches_oracle_property(
    store: TraceStore, backend: Backend, data: st.DataObject, queries: list[dict[str, Any]], chunk: int
) -> None:
    ids = st.text(alphabet="ab0é😀" + "".join(nul_identifiers(backend, "\x00")), min_size=1, max_size=3)
    traces = data.draw(st.lists(trace_strategy(ids), max_size=25, unique_by=lambda trace: trace.id), label="traces")
    empty_tables(backend)
    for start in range(0, len(traces), chunk):
        store.store_batch(traces[start : start + chunk])
    assert backend.junction_drift() == []
    for args in queries:
        assert_matches_oracles(store, backend, traces, **args)
    for trace in traces:
        assert store.get(trace.id) == trace


ID_POOL = ["x", "y", "ä", "😀"]
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("store"), trace_strategy(st.sampled_from(ID_POOL))),
        # Repeated ids within one batch too: they must act like successive store() calls.
        st.tuples(st.just("batch"), st.lists(trace_strategy(st.sampled_from(ID_POOL)), max_size=4)),
        st.tuples(st.just("delete"), st.sampled_from([*ID_POOL, "never-stored"])),
    ),
    max_size=12,
)


@PROPERTY_SETTINGS
@given(operations=OPERATIONS, queries=st.lists(QUERY_ARGS, min_size=1, max_size=4))
def test_restore_and_delete_match_model_property(
    store: TraceStore, backend: Backend, operations: list[Any], queries: list[dict[str, Any]]
) -> None:
    empty_tables(backend)
    model: dict[str, TraceContext] = {}
    for kind, argument in operations:
        if kind == "store":
            store.store(argument)
            model[argument.id] = merge_restore(model.get(argument.id), argument)
        elif kind == "batch":
            store.store_batch(argument)
            for trace in argument:
                model[trace.id] = merge_restore(model.get(trace.id), trace)
        else:
            assert store.delete(argument) is (model.pop(argument, None) is not None)
    assert backend.junction_drift() == []
    for trace_id in [*ID_POOL, "never-stored"]:
        assert store.get(trace_id) == model.get(trace_id)
    for args in queries:
        assert_matches_oracles(store, backend, list(model.values()), **args)


# -- re-store -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("new_time", [T0 + 10, T0 - 10], ids=["later", "earlier"])
def test_restore_updates_in_place_adds_sessions_and_moves_links(
    store: TraceStore, backend: Backend, new_time: float
) -> None:
    first = make(id="x", data={"v": 1}, metadata={"m": 1}, session_uids=["a", "b"], created_at=T0, updated_at=T0)
    store.store(first)
    assert backend.links("x") == [("a", T0), ("b", T0)]
    second = make(
        id="x",
        namespace="worker",
        context_type="log",
        data=[2],
        metadata={"m": 2},
        session_uids=["c", "b"],
        created_at=new_time,
        updated_at=T0 + 20,
    )
    store.store(second)
    expected = dataclasses.replace(second, session_uids=("a", "b", "c"))
    assert store.get("x") == expected
    assert store.query() == [expected]
    assert backend.links("x") == [("a", new_time), ("b", new_time), ("c", new_time)]
    for uid in ("a", "b", "c"):
        assert store.get_by_session_uid(uid, since=new_time) == [expected]
        assert store.query(session_uid=uid, since=new_time, until=new_time + 1) == [expected]
        # Not at the old time any more.
        assert store.query(session_uid=uid, since=T0, until=T0 + 1) == []
    assert store.query(namespace="web") == []
    assert store.query(namespace="worker", context_type="log") == [expected]


def test_restore_without_sessions_keeps_links(store: TraceStore, backend: Backend) -> None:
    store.store(make(id="x", session_uids=["a"], created_at=T0))
    store.store(make(id="x", data="new", created_at=T0 + 1))
    assert store.get("x") == make(id="x", data="new", session_uids=["a"], created_at=T0 + 1)
    assert backend.links("x") == [("a", T0 + 1)]


def test_restore_same_time_is_idempotent(store: TraceStore, backend: Backend) -> None:
    trace = make(id="x", session_uids=["a", "b"], created_at=T0)
    for _ in range(3):
        store.store(trace)
    assert store.get("x") == trace
    assert store.get_by_session_uid("a") == [trace]
    assert backend.links("x") == [("a", T0), ("b", T0)]


def test_same_id_twice_in_one_batch_behaves_like_two_stores(store: TraceStore, backend: Backend) -> None:
    first = make(id="x", data=1, session_uids=["a"], created_at=T0)
    second = make(id="x", data=2, session_uids=["b"], created_at=T0 + 100)
    store.store_batch([first, second])
    expected = merge_restore(first, second)
    assert store.get("x") == expected
    assert backend.links("x") == [("a", T0 + 100), ("b", T0 + 100)]
    assert store.get_by_session_uid("a", since=T0 + 50) == [expected]


def test_batch_of_new_and_restored_traces(store: TraceStore, backend: Backend) -> None:
    # The store inserts first and upserts only when the insert skipped an id: both kinds in one batch.
    old = make(id="old", data=1, session_uids=["a"], created_at=T0)
    store.store(old)
    fresh = [make(id=f"new{i}", session_uids=["a", "c"], created_at=T0 + i) for i in range(3)]
    again = make(id="old", data=2, metadata={"m": 2}, session_uids=["b"], created_at=T0 + 10, updated_at=T0 + 11)
    store.store_batch([fresh[0], again, *fresh[1:]])
    assert store.get("old") == merge_restore(old, again)
    assert backend.links("old") == [("a", T0 + 10), ("b", T0 + 10)]
    for trace in fresh:
        assert store.get(trace.id) == trace
        assert backend.links(trace.id) == [("a", trace.created_at), ("c", trace.created_at)]
    assert [t.id for t in store.get_by_session_uid("a")] == ["old", "new2", "new1", "new0"]


def recording_connections(executed: list[str]) -> Callable[[Any, Any], None]:
    """A "connect" listener that makes the driver itself report the SQL each new connection runs: the
    store writes and reads through the DBAPI cursor, past SQLAlchemy's cursor events.

    sqlite3 traces every statement it runs (BEGIN and ROLLBACK included, values inlined); psycopg gets
    a cursor class that records what it is given to execute or copy."""

    def record(dbapi_connection: Any, connection_record: Any) -> None:
        if hasattr(dbapi_connection, "set_trace_callback"):
            dbapi_connection.set_trace_callback(executed.append)
            return

        def text(query: Any) -> str:
            return query.decode() if isinstance(query, bytes) else str(query)

        class Recording(dbapi_connection.cursor_factory):  # type: ignore[misc,name-defined]
            def execute(self, query: Any, *args: Any, **kwargs: Any) -> Any:
                executed.append(text(query))
                return super().execute(query, *args, **kwargs)

            def executemany(self, query: Any, *args: Any, **kwargs: Any) -> Any:
                executed.append(text(query))
                return super().executemany(query, *args, **kwargs)

            def copy(self, statement: Any, *args: Any, **kwargs: Any) -> Any:
                executed.append(text(statement))
                return super().copy(statement, *args, **kwargs)

        dbapi_connection.cursor_factory = Recording

    return record


def executed_statements(engine: sqlalchemy.Engine, run: Callable[[], Any]) -> list[str]:
    """The statements the driver ran for `run` on new connections of `engine`."""
    executed: list[str] = []
    listener = recording_connections(executed)
    sqlalchemy.event.listen(engine, "connect", listener)
    engine.dispose()
    try:
        run()
    finally:
        sqlalchemy.event.remove(engine, "connect", listener)
        engine.dispose()
    return executed


def trace_writes(executed: list[str]) -> set[str]:
    """The statements that wrote `traces`, each cut before its values, marked when they were the upsert."""
    return {
        sql.split(" VALUES ")[0].split(" SELECT ")[0] + (" DO UPDATE" if "DO UPDATE" in sql else "")
        for sql in executed
        if sql.startswith("INSERT INTO traces ")
    }


def test_new_traces_are_inserted_without_the_upsert(store: TraceStore) -> None:
    store.store(make(id="old", session_uids=["a"], created_at=T0))
    insert = "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
    new_only = trace_writes(
        executed_statements(store.engine, lambda: store.store_batch([make(session_uids=["a"]), make()]))
    )
    assert new_only == {insert}
    mixed = trace_writes(
        executed_statements(
            store.engine, lambda: store.store_batch([make(), make(id="old", data="again", created_at=T0)])
        )
    )
    assert f"{insert} DO UPDATE" in mixed
    assert store.get("old") == make(id="old", data="again", session_uids=["a"], created_at=T0)


# -- delete -----------------------------------------------------------------------------------------------
def test_delete_removes_trace_and_links(store: TraceStore, backend: Backend) -> None:
    doomed = make(session_uids=["a", "b"], created_at=T0)
    other = make(session_uids=["a"], created_at=T0 - 1)
    store.store_batch([doomed, other])
    assert store.delete(doomed.id) is True
    assert store.get(doomed.id) is None
    assert backend.links(doomed.id) == []
    assert store.get_by_session_uid("a") == [other]
    assert store.get_by_session_uid("b") == []
    assert store.query() == [other]
    assert store.delete(doomed.id) is False
    assert store.delete("never-stored") is False
    # Stored again, it does not get the deleted links back.
    store.store(dataclasses.replace(doomed, session_uids=["c"]))
    assert store.get(doomed.id).session_uids == ("c",)  # type: ignore[union-attr]
    assert store.get_by_session_uid("b") == []


# -- batch atomicity -------------------------------------------------------------------------------------
class Opaque:
    pass


BAD_BATCH_ITEMS: list[Callable[[], Any]] = [
    lambda: make(data={1, 2}),
    lambda: make(data=object()),
    lambda: make(data=[1, Opaque()]),
    lambda: make(data={1: "int key"}),
    lambda: make(data=2**70),
    lambda: make(data=b"bytes"),
    lambda: make(metadata={"m": {3}}),
    lambda: "not a trace",
    lambda: None,
    lambda: {"context_type": "span", "namespace": "web", "data": 1},
]


@pytest.mark.parametrize("bad", BAD_BATCH_ITEMS, ids=range(len(BAD_BATCH_ITEMS)))
def test_invalid_item_in_batch_keeps_nothing(store: TraceStore, backend: Backend, bad: Callable[[], Any]) -> None:
    existing = make(id="keep", session_uids=["a"], created_at=T0)
    store.store(existing)
    before = backend.dump()
    batch = [
        make(session_uids=["a"], created_at=T0 + 1),
        make(id="keep", data="changed", session_uids=["new"], created_at=T0 + 5),
        bad(),
        make(session_uids=["b"]),
    ]
    with pytest.raises(InvalidTraceError):
        store.store_batch(batch)
    assert backend.dump() == before
    assert store.get("keep") == existing


def fail_links_to_session(backend: Backend, session_uid: str) -> None:
    """A trigger (the tests' own, in each engine's dialect) that fails any insert of a link to `session_uid`
    with the error message "boom"."""
    with backend.raw() as connection:
        if backend.is_sqlite:
            connection.exec_driver_sql(
                f"CREATE TRIGGER boom BEFORE INSERT ON trace_sessions WHEN NEW.session_uid = '{session_uid}' "
                "BEGIN SELECT RAISE(ABORT, 'boom'); END"
            )
        else:
            connection.exec_driver_sql(
                "CREATE FUNCTION boom() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$"
            )
            connection.exec_driver_sql(
                "CREATE TRIGGER boom BEFORE INSERT ON trace_sessions FOR EACH ROW "
                f"WHEN (NEW.session_uid = '{session_uid}') EXECUTE FUNCTION boom()"
            )


def test_database_failure_mid_batch_rolls_everything_back(store: TraceStore, backend: Backend) -> None:
    existing = make(id="keep", session_uids=["a"], created_at=T0)
    store.store(existing)
    # Fails the last statement of the transaction, after traces were upserted and links moved.
    fail_links_to_session(backend, "boom")
    before = backend.dump()
    batch = [
        make(session_uids=["a"], created_at=T0 + 1),
        make(id="keep", data="changed", session_uids=["new"], created_at=T0 + 5),
        make(session_uids=["boom"]),
    ]
    with pytest.raises(StorageError):
        store.store_batch(batch)
    assert backend.dump() == before
    assert store.get("keep") == existing
    assert store.query() == [existing]


def test_invalid_entry_shadowed_by_same_id_still_fails_the_batch(store: TraceStore, backend: Backend) -> None:
    # Like successive store() calls: the first one would raise, so the batch must too.
    before = backend.dump()
    with pytest.raises(InvalidTraceError):
        store.store_batch([make(id="x", data={1, 2}), make(id="x", data="fine")])
    assert backend.dump() == before
    assert store.get("x") is None


def test_reassigned_fields_are_checked_when_stored(store: TraceStore, backend: Backend) -> None:
    trace = make(id="x", session_uids=["a"])
    store.store(trace)
    before = backend.dump()
    for field_name, value in [("namespace", ""), ("created_at", "soon"), ("session_uids", "abc"), ("id", 3)]:
        broken = make(id="x", session_uids=["a"])
        setattr(broken, field_name, value)
        with pytest.raises(InvalidTraceError):
            store.store(broken)
        with pytest.raises(InvalidTraceError):
            store.store_batch([make(), broken])
    assert backend.dump() == before
    assert store.get("x") == trace


def test_empty_batch_is_a_no_op(store: TraceStore, backend: Backend) -> None:
    before = backend.dump()
    store.store_batch([])
    store.store_batch(iter(()))
    assert backend.dump() == before


def test_batch_accepts_any_iterable(store: TraceStore) -> None:
    traces = [make(created_at=T0 + n) for n in range(3)]
    store.store_batch(trace for trace in traces)
    assert store.query() == traces[::-1]


# -- bad input: library errors, database unchanged -------------------------------------------------------
BAD_CALLS: list[tuple[str, Callable[[TraceStore], Any], type[Exception]]] = [
    ("data-set", lambda s: s.store(make(data={1})), InvalidTraceError),
    ("data-object", lambda s: s.store(make(data=object())), InvalidTraceError),
    ("data-too-deep", lambda s: s.store(make(data=nested(600))), InvalidTraceError),
    ("data-lone-surrogate", lambda s: s.store(make(data="\ud800")), InvalidTraceError),
    ("metadata-object", lambda s: s.store(make(metadata={"m": object()})), InvalidTraceError),
    ("created-nan", lambda s: s.store(make(created_at=math.nan)), InvalidTraceError),
    ("created-inf", lambda s: s.store(make(created_at=math.inf)), InvalidTraceError),
    ("created-str", lambda s: s.store(make(created_at="1")), InvalidTraceError),
    ("created-bool", lambda s: s.store(make(created_at=True)), InvalidTraceError),
    ("updated-nan", lambda s: s.store(make(updated_at=math.nan)), InvalidTraceError),
    ("updated-bool", lambda s: s.store(make(updated_at=False)), InvalidTraceError),
    ("created-int-overflow", lambda s: s.store(make(created_at=10**400)), InvalidTraceError),
    ("id-empty", lambda s: s.store(make(id="")), InvalidTraceError),
    ("id-int", lambda s: s.store(make(id=7)), InvalidTraceError),
    ("id-lone-surrogate", lambda s: s.store(make(id="\ud800")), InvalidTraceError),
    ("namespace-lone-surrogate", lambda s: s.store(make(namespace="\udfff")), InvalidTraceError),
    ("session-empty", lambda s: s.store(make(session_uids=[""])), InvalidTraceError),
    ("session-int", lambda s: s.store(make(session_uids=[1])), InvalidTraceError),
    ("session-bare-string", lambda s: s.store(make(session_uids="abc")), InvalidTraceError),
    ("session-lone-surrogate", lambda s: s.store(make(session_uids=["\ud800"])), InvalidTraceError),
    ("store-not-a-trace", lambda s: s.store("trace"), InvalidTraceError),
    ("store-none", lambda s: s.store(None), InvalidTraceError),
    ("limit-zero", lambda s: s.query(limit=0), InvalidQueryError),
    ("limit-negative", lambda s: s.query(session_uid="a", limit=-1), InvalidQueryError),
    ("limit-float", lambda s: s.query(limit=1.0), InvalidQueryError),
    ("limit-bool", lambda s: s.query(limit=True), InvalidQueryError),
    ("limit-str", lambda s: s.query(limit="5"), InvalidQueryError),
    ("since-nan", lambda s: s.query(since=math.nan), InvalidQueryError),
    ("since-inf", lambda s: s.query(session_uid="a", since=math.inf), InvalidQueryError),
    ("since-str", lambda s: s.query(since="0"), InvalidQueryError),
    ("since-bool", lambda s: s.query(since=True), InvalidQueryError),
    ("since-int-overflow", lambda s: s.query(since=10**400), InvalidQueryError),
    ("until-nan", lambda s: s.query(until=math.nan), InvalidQueryError),
    ("until-neg-inf", lambda s: s.query(session_uid="a", until=-math.inf), InvalidQueryError),
    ("until-bool", lambda s: s.query(until=False), InvalidQueryError),
    ("until-int-overflow", lambda s: s.query(session_uid="a", until=-(10**400)), InvalidQueryError),
    ("session-uid-empty", lambda s: s.query(session_uid=""), InvalidQueryError),
    ("session-uid-int", lambda s: s.query(session_uid=5), InvalidQueryError),
    ("session-uid-lone-surrogate", lambda s: s.query(session_uid="\ud800"), InvalidQueryError),
    ("namespace-empty", lambda s: s.query(namespace=""), InvalidQueryError),
    ("context-type-int", lambda s: s.query(context_type=1), InvalidQueryError),
    ("by-session-empty", lambda s: s.get_by_session_uid(""), InvalidQueryError),
    ("by-session-none", lambda s: s.get_by_session_uid(None), InvalidQueryError),
    ("by-session-limit-zero", lambda s: s.get_by_session_uid("a", limit=0), InvalidQueryError),
    ("by-session-since-nan", lambda s: s.get_by_session_uid("a", since=math.nan), InvalidQueryError),
    ("get-empty", lambda s: s.get(""), InvalidQueryError),
    ("get-none", lambda s: s.get(None), InvalidQueryError),
    ("get-int", lambda s: s.get(5), InvalidQueryError),
    ("get-lone-surrogate", lambda s: s.get("\ud800"), InvalidQueryError),
    ("delete-empty", lambda s: s.delete(""), InvalidQueryError),
    ("delete-int", lambda s: s.delete(5), InvalidQueryError),
    ("explain-empty", lambda s: s.explain(""), InvalidQueryError),
    ("explain-none", lambda s: s.explain(None), InvalidQueryError),
    ("explain-limit-bool", lambda s: s.explain("a", limit=True), InvalidQueryError),
    ("explain-until-nan", lambda s: s.explain("a", until=math.nan), InvalidQueryError),
]


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
def populated(store: TraceStore, backend: Backend) -> dict[str, list[tuple[Any, ...]]]:
    store.store_batch(
        [make(id="one", session_uids=["a"], created_at=T0), make(id="two", session_uids=["a", "b"], created_at=T0)]
    )
    return backend.dump()


def test_bad_input_raises_library_error_and_changes_nothing(
    store: TraceStore, backend: Backend, populated: dict[str, list[tuple[Any, ...]]]
) -> None:
    # Every bad call against one populated database (a fresh one per call cost 24 s of the suite), which
    # must still be exactly as it was after each.
    for name, call, error in BAD_CALLS:
        try:
            with pytest.raises(error):
                call(store)
        except (pytest.fail.Exception, Exception) as failed:
            raise AssertionError(f"{name}: {failed!r}") from failed
        assert backend.dump() == populated, name


NOT_JSON_VALUES: list[Any] = [
    math.inf,
    {"x": -math.inf},
    [math.nan],
    datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC),
    uuid.UUID(int=1),
    dataclasses.make_dataclass("Point", ["x"])(1),
    (1, 2),
]


@pytest.mark.parametrize("value", NOT_JSON_VALUES, ids=repr)
@pytest.mark.parametrize("field_name", ["data", "metadata"])
def test_non_json_value_is_refused_or_round_trips(store: TraceStore, value: Any, field_name: str) -> None:
    # orjson would write these as null / strings / objects / arrays: accepted, they must come back equal.
    trace = make(**{field_name: value if field_name == "data" else {"v": value}})
    try:
        store.store(trace)
    except InvalidTraceError:
        assert store.get(trace.id) is None
        return
    assert store.get(trace.id) == trace


def test_not_a_sqlite_file_raises_and_is_left_alone(tmp_path: Path) -> None:
    junk = random.Random(3).randbytes(16_384)
    path = tmp_path / "junk.db"
    path.write_bytes(junk)
    for auto_upgrade in (True, False):
        with pytest.raises(StorageError):
            TraceStore(f"sqlite:///{path}", auto_upgrade=auto_upgrade)
        assert path.read_bytes() == junk


def test_text_file_raises_and_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some notes\n" * 100)
    with pytest.raises(StorageError):
        TraceStore(f"sqlite:///{path}")
    assert path.read_bytes() == b"just some notes\n" * 100


@pytest.mark.parametrize(
    "url",
    ["", "not a url", "://", "sqlite+aiosqlite:///traces.db", "nosuchdialect://host/db", "sqlite:////no/such/dir/x.db"],
)
def test_bad_url_raises_storage_error(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError):
        TraceStore(url)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+nosuchdriver://app:s3cret-pw@db.example/traces",  # unknown driver
        "postgresql+asyncpg://app:s3cret-pw@db.example/traces",  # async driver for the sync store
        "postgresql+psycopg://app:s3cret-pw@127.0.0.1:1/traces",  # nothing listens
    ],
)
def test_errors_never_show_the_password(url: str) -> None:
    with pytest.raises(StorageError) as raised:
        TraceStore(url)
    error: BaseException | None = raised.value
    while error is not None:  # nor does any exception it was raised from
        assert "s3cret-pw" not in str(error), error
        error = error.__cause__


def test_unusable_postgresql_url_raises_storage_error(pg_server_url: URL, tmp_path: Path) -> None:
    # PostgreSQL's counterparts of a bad file: no such database, no server, the wrong driver kind.
    missing = pg_server_url.set(database=f"tracestore_missing_{uuid.uuid4().hex[:12]}")
    urls = [
        missing,
        pg_server_url.update_query_dict({"host": str(tmp_path / "no-server-here")}),
        make_url("postgresql+psycopg://postgres@127.0.0.1:1/postgres"),  # nothing listens on port 1
        pg_server_url.set(drivername="postgresql+asyncpg"),
    ]
    for url, auto_upgrade in itertools.product(urls, (True, False)):
        with pytest.raises(StorageError):
            TraceStore(url.render_as_string(hide_password=False), auto_upgrade=auto_upgrade)
    # Nothing was created on the server, and it still serves.
    admin = sqlalchemy.create_engine(pg_server_url, poolclass=sqlalchemy.NullPool)
    try:
        with admin.connect() as connection:
            found = connection.exec_driver_sql(
                "SELECT datname FROM pg_database WHERE datname = %(name)s", {"name": missing.database}
            )
            assert found.all() == []
    finally:
        admin.dispose()
    assert os.listdir(tmp_path) == []


# -- connections ------------------------------------------------------------------------------------------
@pytest.fixture(params=["url", "engine"])
def any_store(request: pytest.FixtureRequest, backend: Backend) -> Iterator[TraceStore]:
    if request.param == "url":
        with TraceStore(backend.url) as store:
            yield store
        return
    engine = sqlalchemy.create_engine(backend.url)
    with TraceStore(engine) as store:
        assert store.engine is engine
        yield store
    engine.dispose()


# These three take `db_path` to run on SQLite only: pragmas, a deferred BEGIN and BEGIN IMMEDIATE are
# SQLite's (tracestore.engine leaves PostgreSQL connections as the driver makes them). The first two are about
# the engine a store creates from a URL: an application's Engine keeps its own setup (tests/test_app_engine.py).
def test_every_connection_has_the_pragmas(store: TraceStore, db_path: Path) -> None:
    with store.engine.connect() as first, store.engine.connect() as second:
        for conn in (first, second):
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


def test_reads_see_one_snapshot(store: TraceStore, db_path: Path) -> None:
    store.store(make(id="before", session_uids=["a"], created_at=T0))
    with store.engine.connect() as reader:
        first = reader.exec_driver_sql("SELECT count(*) FROM traces").scalar()
        assert reader.connection.dbapi_connection.in_transaction  # type: ignore[union-attr]
        store.store(make(id="after", session_uids=["a"], created_at=T0 + 1))
        assert reader.exec_driver_sql("SELECT count(*) FROM traces").scalar() == first == 1
    assert [trace.id for trace in store.get_by_session_uid("a")] == ["after", "before"]


def test_writes_take_the_write_lock_up_front(any_store: TraceStore, db_path: Path) -> None:
    executed: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        executed.append(" ".join(statement.split()[:2]).upper())

    sqlalchemy.event.listen(any_store.engine, "before_cursor_execute", record)
    try:
        any_store.store(make(id="x", session_uids=["a"]))
        any_store.delete("x")
    finally:
        sqlalchemy.event.remove(any_store.engine, "before_cursor_execute", record)
    assert [statement for statement in executed if statement.startswith("BEGIN")] == ["BEGIN IMMEDIATE"] * 2


def test_each_store_read_is_one_statement(any_store: TraceStore) -> None:
    # The store skips BEGIN for its reads on SQLite (engine.SINGLE_STATEMENT_READ): that is only a
    # single snapshot because every read is exactly one SELECT, which this pins down. On SQLite the
    # driver's trace shows BEGIN and ROLLBACK too; psycopg sends its BEGIN itself, past the cursor, and
    # under READ COMMITTED one statement is one snapshot as well.
    any_store.store(make(id="x", session_uids=["a"]))
    reads: list[Callable[[], Any]] = [
        lambda: any_store.get("x"),
        lambda: any_store.get("missing"),
        lambda: any_store.get_by_session_uid("a", since=0, limit=3),
        lambda: any_store.query(),
        lambda: any_store.query(session_uid="a", namespace="web", context_type="span", until=T0 * 2),
    ]
    for read in reads:
        executed = executed_statements(any_store.engine, read)
        assert [statement.split()[0].upper() for statement in executed] == ["SELECT"], executed


def crowd_sessions(backend: Backend, traces: int = 20_000, *, per_second: int = 1) -> None:
    """`traces` traces, one in ten in session "a", the rest spread over 500 others, `per_second` of them sharing
    each created_at, then ANALYZE: enough rows for PostgreSQL's planner to make the choice it makes on real data
    (plain SQL, quick)."""
    with backend.raw() as connection:
        if backend.is_sqlite:
            numbers = f"WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {traces}) "
            source, padded = "n", "printf('%08d', i)"
        else:
            numbers, source, padded = "", f"generate_series(1, {traces}) AS n(i)", "lpad(i::text, 8, '0')"
        connection.execute(
            sqlalchemy.text(
                f"{numbers}INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at) "
                f"SELECT {padded}, 'span', 'web', '{{}}', '{{}}', {T0} + i / {per_second}, {T0} + i FROM {source}"
            )
        )
        connection.execute(
            sqlalchemy.text(
                f"{numbers}INSERT INTO trace_sessions (trace_id, session_uid, created_at) "
                f"SELECT {padded}, CASE WHEN i % 10 = 0 THEN 'a' ELSE 's' || (i % 500) END, {T0} + i / {per_second} "
                f"FROM {source}"
            )
        )
    backend.analyze()


def reads_the_session_index(backend: Backend, plan: list[str]) -> bool:
    """SQLite: a SEARCH of the composite index. PostgreSQL: an index scan of it, and no sequential scan of
    the junction."""
    if backend.is_sqlite:
        return any("SEARCH" in line and SESSION_TIME_INDEX in line for line in plan)
    return any("Index" in line and SESSION_TIME_INDEX in line for line in plan) and not any(
        "Seq Scan on trace_sessions" in line for line in plan
    )


def test_plan_is_logged_at_debug(store: TraceStore, backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    crowd_sessions(backend)
    caplog.set_level(logging.INFO, logger="tracestore.plan")
    store.get_by_session_uid("a")
    assert not [r for r in caplog.records if r.name == "tracestore.plan"]
    caplog.set_level(logging.DEBUG, logger="tracestore.plan")
    assert len(store.get_by_session_uid("a", since=T0 - 10**6, limit=5)) == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "tracestore.plan"]
    assert len(messages) == 1
    assert reads_the_session_index(backend, messages[0].splitlines()), messages[0]


def test_explain_describes_the_session_query(store: TraceStore, backend: Backend) -> None:
    crowd_sessions(backend)
    plan = store.explain("a", since=T0, limit=10, until=T0 + 1, namespace="web", context_type="span")
    assert all(isinstance(line, str) for line in plan)
    assert reads_the_session_index(backend, plan), plan


# -- schema revision ---------------------------------------------------------------------------------------
LEGACY_ROWS = [
    ("l1", "span", "web", {"a": 1}, {"m": 1}, T0, T0 + 1, ("s1", "s2")),
    ("l2", "log", "worker", [1, 2], {}, T0, T0, ("s1",)),
    ("l3", "span", "web", "text", {"k": "v"}, T0 + 5, T0 + 6, ("s2",)),
    ("l4", "span", "web", None, {}, T0 - 5, T0 - 5, ()),
]


def legacy_traces() -> list[TraceContext]:
    return [
        TraceContext(
            id=trace_id,
            context_type=ctype,
            namespace=ns,
            data=data,
            metadata=metadata,
            created_at=created,
            updated_at=updated,
            session_uids=sessions,
        )
        for trace_id, ctype, ns, data, metadata, created, updated, sessions in LEGACY_ROWS
    ]


# 0002 and 0003 are served with migration-time reads instead (tests/test_online_migration.py).
@pytest.mark.parametrize("revision", [None, "0001"])
def test_old_revision_refused_without_auto_upgrade(backend: Backend, revision: str | None) -> None:
    backend.create_legacy(LEGACY_ROWS)
    if revision is not None:
        migrate.upgrade(backend.url, revision)
    before = backend.dump()
    with pytest.raises(SchemaOutOfDateError, match="tracestore upgrade"):
        TraceStore(backend.url, auto_upgrade=False)
    assert backend.dump() == before
    with TraceStore(backend.url) as store:
        assert migrate.current_revision(backend.url) == migrate.head_revision()
        assert backend.junction_drift() == []
        traces = legacy_traces()
        for trace in traces:
            assert store.get(trace.id) == trace
        for uid, since, limit in itertools.product(["s1", "s2", "none"], [None, T0, T0 + 1], [None, 1]):
            assert store.get_by_session_uid(uid, since=since, limit=limit) == oracle_query(
                traces, session_uid=uid, since=since, limit=limit
            )
        assert_matches_oracles(store, backend, traces)


def test_empty_database_refused_without_auto_upgrade(backend: Backend) -> None:
    # Nothing to create without auto_upgrade: on SQLite not even the file, on PostgreSQL no table.
    with pytest.raises(SchemaOutOfDateError, match="tracestore upgrade"):
        TraceStore(backend.url, auto_upgrade=False)
    if backend.path is not None:
        assert not backend.path.exists()
    assert backend.dump() == {"schema": []}


def test_head_database_opens_without_upgrade(backend: Backend) -> None:
    with TraceStore(backend.url) as store:
        store.store(make(id="x"))
    before = backend.dump()
    with TraceStore(backend.url, auto_upgrade=False) as store:
        assert store.get("x") is not None
    assert backend.dump() == before
