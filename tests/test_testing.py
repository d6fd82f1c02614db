"""tracestore.testing: the factories, make_traces and the pytest plugin downstream projects enable."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import factory.random
import orjson
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tracestore import TraceContext, TraceStore
from tracestore.engine import create_engine
from tracestore.models import Trace, TraceSession
from tracestore.testing import (
    TraceContextFactory,
    TraceFactory,
    TraceSessionFactory,
    bind_session,
    make_payload,
    make_traces,
)
from tracestore.testing.factories import PAYLOAD_OVERHEAD

pytest_plugins = ["pytester", "tracestore.testing.fixtures"]

UUID7_SHAPE = (8, 4, 4, 4, 12)


def counts(url: str) -> tuple[int, int]:
    """Rows in traces and trace_sessions as another connection sees them (committed data only)."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return (
                connection.scalar(select(func.count()).select_from(Trace)) or 0,
                connection.scalar(select(func.count()).select_from(TraceSession)) or 0,
            )
    finally:
        engine.dispose()


@pytest.fixture
def unbound() -> Iterator[None]:
    previous = bind_session(None)
    yield
    bind_session(previous)


# -- TraceContextFactory and make_traces -----------------------------------------------------------------
def test_trace_context_factory_defaults() -> None:
    before = time.time()
    trace = TraceContextFactory()
    assert isinstance(trace, TraceContext)
    assert before - 600 <= trace.created_at <= time.time()
    assert trace.updated_at == trace.created_at
    assert len(trace.session_uids) == 1
    assert len(orjson.dumps(trace.data)) == 256
    assert tuple(len(part) for part in trace.id.split("-")) == UUID7_SHAPE
    assert trace.id[14] == "7"  # version nibble of a UUIDv7


def test_trace_context_factory_parameters() -> None:
    pool = ["a", "b", "c", "d"]
    traces = TraceContextFactory.build_batch(
        200, sessions=pool, sessions_per_trace=2, window_start=1000.0, window_end=2000.0, payload_bytes=1000
    )
    assert all(len(t.session_uids) == 2 and set(t.session_uids) <= set(pool) for t in traces)
    assert {uid for t in traces for uid in t.session_uids} == set(pool)
    assert all(1000.0 <= t.created_at <= 2000.0 for t in traces)
    assert max(t.created_at for t in traces) - min(t.created_at for t in traces) > 500  # spread, not clumped
    assert {len(orjson.dumps(t.data)) for t in traces} == {1000}
    assert len({t.id for t in traces}) == 200
    # Fields can still be given directly.
    fixed = TraceContextFactory(namespace="billing", session_uids=("x", "y"), created_at=5.0)
    assert (fixed.namespace, fixed.session_uids, fixed.created_at) == ("billing", ("x", "y"), 5.0)


@pytest.mark.parametrize("size", [0, 1, PAYLOAD_OVERHEAD, PAYLOAD_OVERHEAD + 1, 255, 4096])
def test_payload_size(size: int) -> None:
    assert len(orjson.dumps(make_payload(size))) == max(size, PAYLOAD_OVERHEAD)


def test_make_traces_defaults_share_one_session_in_the_last_ten_minutes() -> None:
    before = time.time()
    traces = make_traces(50)
    assert len(traces) == 50
    assert len({t.session_uids for t in traces}) == 1
    assert all(before - 600 <= t.created_at <= time.time() for t in traces)


def test_make_traces_window_sessions_and_fields() -> None:
    traces = make_traces(300, session_uids=["s1", "s2", "s3"], since=100.0, until=200.0, namespace="ns")
    assert all(100.0 <= t.created_at <= 200.0 and t.namespace == "ns" for t in traces)
    assert {t.session_uids for t in traces} == {("s1",), ("s2",), ("s3",)}
    assert all(t.created_at >= 50.0 for t in make_traces(20, until=650.0))
    assert make_traces(5, session_uids=[])[0].session_uids == ()


def test_make_traces_seed_is_reproducible_and_leaves_global_random_alone() -> None:
    state = factory.random.randgen.getstate()
    first = make_traces(20, session_uids=["s"], since=0.0, until=10.0, seed=42)
    assert factory.random.randgen.getstate() == state
    assert make_traces(20, session_uids=["s"], since=0.0, until=10.0, seed=42) == first
    assert make_traces(20, session_uids=["s"], since=0.0, until=10.0, seed=43) != first
    # Ids are time-ordered like the store's own, so a seed cannot make two traces collide.
    assert len({t.id for t in first}) == 20


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"n": -1}, ValueError),
        ({"n": 1, "since": 10.0, "until": 5.0}, ValueError),
        ({"n": 1, "session_uids": "abc"}, TypeError),
    ],
)
def test_make_traces_refuses(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        make_traces(**kwargs)  # type: ignore[arg-type]


def test_made_traces_round_trip_through_the_store(store: TraceStore) -> None:
    traces = make_traces(40, session_uids=["s1", "s2"], seed=7)
    store.store_batch(traces)
    for session_uid in ("s1", "s2"):
        expected = sorted(
            (t for t in traces if session_uid in t.session_uids), key=lambda t: (t.created_at, t.id), reverse=True
        )
        assert store.get_by_session_uid(session_uid, since=time.time() - 3600) == expected


# -- ORM model factories ----------------------------------------------------------------------------
def test_model_factories_build_without_a_database() -> None:
    trace = TraceFactory.build(payload={"k": 1})
    assert trace.data == {"k": 1} and trace.metadata_ == {}
    assert trace.updated_at == trace.created_at
    link = TraceSessionFactory.build(session_uid="s")
    assert link.session_uid == "s" and link.created_at is not None


def test_model_factories_need_a_bound_session(unbound: None) -> None:
    with pytest.raises(RuntimeError, match="trace_db_session"):
        TraceFactory()


def test_model_factories_flush_and_never_commit(trace_store: TraceStore, tracestore_url: str) -> None:
    with Session(trace_store.engine) as session:
        previous = bind_session(session)
        try:
            traces = TraceFactory.create_batch(3, sessions=["s1", "s2"])
            assert session.scalar(select(func.count()).select_from(Trace)) == 3
            links = session.scalars(select(TraceSession)).all()
            assert len(links) == 6
            by_id = {t.id: t for t in traces}
            assert all(link.created_at == by_id[link.trace_id].created_at for link in links)
            assert not session.dirty and not session.new  # flushed
            assert counts(tracestore_url) == (0, 0)  # but not committed: nobody else sees them
            session.rollback()
        finally:
            bind_session(previous)
    assert counts(tracestore_url) == (0, 0)


def test_model_rows_are_readable_by_the_store(trace_db_session: Session, trace_store: TraceStore) -> None:
    trace = TraceFactory(sessions=["s1"], payload={"step": 1}, created_at=time.time() - 5)
    trace_db_session.flush()
    # The session's transaction is not visible to the store's own connections; read it from inside.
    row = trace_db_session.execute(
        select(Trace.data, Trace.metadata_, TraceSession.session_uid, TraceSession.created_at).join(
            TraceSession, TraceSession.trace_id == Trace.id
        )
    ).one()
    assert (row.data, row.metadata_, row.session_uid) == ({"step": 1}, {}, "s1")
    assert row.created_at == trace.created_at


def test_trace_session_factory_links(trace_db_session: Session) -> None:
    made = TraceSessionFactory()  # makes its own trace
    assert trace_db_session.scalar(select(func.count()).select_from(Trace)) == 1
    assert made.created_at == trace_db_session.get(Trace, made.trace_id).created_at  # type: ignore[union-attr]
    # An existing trace by id: no new trace, and created_at read from it when the link is inserted.
    by_id = TraceSessionFactory(trace_id=made.trace_id, session_uid="other")
    assert by_id.created_at == made.created_at
    assert trace_db_session.scalar(select(func.count()).select_from(Trace)) == 1
    assert trace_db_session.scalar(select(func.count()).select_from(TraceSession)) == 2


def test_factories_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import tracestore.testing

    monkeypatch.setitem(sys.modules, "factory", None)
    monkeypatch.delitem(sys.modules, "tracestore.testing.factories")
    with pytest.raises(ImportError, match=r"tracestore\[testing\]"):
        tracestore.testing.make_traces  # noqa: B018
    assert not hasattr(tracestore.testing, "no_such_name")


# -- the pytest plugin, as a downstream project uses it ---------------------------------------------------
DOWNSTREAM_TESTS = """
import time

import pytest
from sqlalchemy import func, select

from tracestore.models import Trace
from tracestore.testing import TraceFactory, make_traces

pytest_plugins = ["tracestore.testing.fixtures"]


@pytest.fixture(scope="session")
def shared_db(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('shared') / 'traces.db'}"


def test_url_is_a_temporary_sqlite_file(tracestore_url, tmp_path):
    assert tracestore_url == f"sqlite:///{tmp_path / 'tracestore.db'}"


def test_sync_store(trace_store):
    traces = make_traces(5, session_uids=["s"])
    trace_store.store_batch(traces)
    assert len(trace_store.get_by_session_uid("s", since=time.time() - 600)) == 5


ASYNC_MARK
async def test_async_store(async_trace_store):
    await async_trace_store.store_batch(make_traces(4, session_uids=["s"]))
    assert len(await async_trace_store.get_by_session_uid("s", since=time.time() - 600)) == 4


class TestSharedDatabase:
    @pytest.fixture
    def tracestore_url(self, shared_db):
        return shared_db

    def test_1_writes_through_the_factories(self, trace_db_session):
        TraceFactory.create_batch(3, sessions=["s"])
        trace_db_session.commit()
        assert trace_db_session.scalar(select(func.count()).select_from(Trace)) == 3

    def test_2_sees_nothing_of_the_previous_test(self, trace_db_session, trace_store):
        assert trace_db_session.scalar(select(func.count()).select_from(Trace)) == 0
        assert trace_store.get_by_session_uid("s") == []
"""


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_fixtures_plugin_in_a_downstream_project(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makeini(f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n")
    # Strict mode needs the mark on the async test; the fixture works in both modes (pytest_asyncio.fixture).
    mark = "@pytest.mark.asyncio\n" if mode == "strict" else ""
    pytester.makepyfile(test_downstream=DOWNSTREAM_TESTS.replace("ASYNC_MARK\n", mark))
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error::sqlalchemy.exc.SAWarning")
    result.assert_outcomes(passed=5)


def test_fixtures_plugin_files_live_under_tmp_path(tracestore_url: str, tmp_path: Path) -> None:
    assert tracestore_url.startswith("sqlite:///") and tracestore_url.endswith("tracestore.db")
    assert Path(tracestore_url.removeprefix("sqlite:///")).parent == tmp_path
