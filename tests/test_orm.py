"""tracestore inside an application's own SQLAlchemy: the models (JSON values, relationships, defaults, the link's
created_at) and tracestore.orm (recent_traces, its pages, add_traces) through the application's own Session and
AsyncSession, on an Engine made with plain SQLAlchemy, on SQLite and PostgreSQL; answers against the oracle.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import io
import itertools
import math
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import URL, Engine, Text, event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, selectinload

from tests.backends import Backend
from tests.oracle import make_trace, merge_restore, oracle_query
from tracestore import (
    InvalidQueryError,
    InvalidTraceError,
    PageCursor,
    SchemaOutOfDateError,
    StorageError,
    TraceContext,
    TraceStore,
)
from tracestore.migrate import finalize, upgrade
from tracestore.models import SESSION_TIME_INDEX, Trace, TraceSession
from tracestore.orm import add_traces, next_page_cursor, recent_traces, recent_traces_page
from tracestore.testing.bulk import generate

T0 = 1_700_000_000.0
SESSIONS = ("s-a", "s-b", "sé-ü ☃")


def dataset() -> list[TraceContext]:
    """Ties on created_at (three per second), unicode ids, traces in two sessions, two namespaces and types."""
    return [
        make_trace(
            id=f"t{n:03d}-ü",
            created_at=T0 + n // 3,
            namespace=("web", "jobs")[n % 2],
            context_type=("llm", "tool", "span")[n % 3],
            data={"n": n, "text": "é" * (n % 5)},
            session_uids=[SESSIONS[n % 3]] + ([SESSIONS[(n + 1) % 3]] if n % 4 == 0 else []),
        )
        for n in range(90)
    ]


class App:
    """The application's own Session on its own Engine (plain SQLAlchemy), or its AsyncSession driven to
    completion from synchronous test code, so that one test body covers both. Both keep their entities'
    attributes at commit (expire_on_commit=False, as async applications do)."""

    def __init__(self, backend: Backend, mode: str) -> None:
        self.mode = mode
        if mode == "sync":
            self.engine: Engine = sqlalchemy.create_engine(backend.sync_url)
            self.session: Session | AsyncSession = Session(self.engine, expire_on_commit=False)
        else:
            self.loop = asyncio.new_event_loop()
            self.async_engine = create_async_engine(backend.async_url)
            self.engine = self.async_engine.sync_engine
            self.session = AsyncSession(self.async_engine, expire_on_commit=False)
        self.statements: list[str] = []

    def watch(self) -> None:
        """Record the statements the application's Engine runs (a cursor listener, as instrumentation adds)."""
        event.listen(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.statements.append(statement)

    def run(self, value: Any) -> Any:
        return self.loop.run_until_complete(value) if inspect.isawaitable(value) else value

    def sync(self, function: Callable[[Session], Any]) -> Any:
        """`function` with the sync Session (an AsyncSession's runs where lazy loads work)."""
        if isinstance(self.session, AsyncSession):
            return self.run(self.session.run_sync(function))
        return function(self.session)

    def scalars(self, stmt: Any) -> list[Any]:
        return list(self.run(self.session.scalars(stmt)).all())

    def add_traces(self, traces: list[TraceContext]) -> list[str]:
        ids: list[str] = self.run(add_traces(self.session, traces))
        return ids

    def __getattr__(self, name: str) -> Callable[..., Any]:  # commit, rollback, flush, get, execute, ...
        method = getattr(self.session, name)
        return lambda *args, **kwargs: self.run(method(*args, **kwargs))

    def close(self) -> None:
        self.run(self.session.close())
        if self.mode == "sync":
            self.engine.dispose()
        else:
            self.loop.run_until_complete(self.async_engine.dispose())
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def app(request: pytest.FixtureRequest, store: TraceStore, backend: Backend) -> Iterator[App]:
    """The application's Session (sync or async) on a database at head, beside a TraceStore on the same one."""
    session = App(backend, request.param)
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def orm(store: TraceStore, backend: Backend) -> Iterator[Session]:
    """The application's own sync Session on a database at head (plain SQLAlchemy Engine)."""
    engine = sqlalchemy.create_engine(backend.sync_url)
    try:
        with Session(engine) as session:
            yield session
    finally:
        engine.dispose()


def stored_link_times(backend: Backend, session_uid: str) -> list[tuple[str, float | None]]:
    return backend.rows(
        "SELECT trace_id, created_at FROM trace_sessions WHERE session_uid = :uid ORDER BY trace_id",
        {"uid": session_uid},
    )


# -- the models: JSON values, defaults, checks --------------------------------------------------------------------
def test_json_values_round_trip_between_the_orm_and_the_store(app: App, store: TraceStore, backend: Backend) -> None:
    """Each side encodes once: what the ORM writes the store reads as the same value, and the other way round."""
    data = {"text": "é☃\x00", "nested": [1, 2.5, None, True, {"k": []}]}
    written = Trace(context_type="span", namespace="web", data=data, metadata_={"m": "ü"}, created_at=T0)
    written.sessions.append(TraceSession(session_uid="s-a"))
    app.add(written)
    app.commit()
    expected = TraceContext(
        context_type="span", namespace="web", data=data, metadata={"m": "ü"}, session_uids=["s-a"],
        created_at=T0, updated_at=T0, id=written.id,
    )  # fmt: skip
    assert store.get(written.id) == expected
    # Also when the store's reads go through SQLAlchemy (a cursor listener): still driver SQL, decoded once.
    listener = lambda *args: None  # noqa: E731
    event.listen(store.engine, "before_cursor_execute", listener)
    try:
        assert store.get(written.id) == expected
        assert store.get_by_session_uid("s-a") == [expected]
    finally:
        event.remove(store.engine, "before_cursor_execute", listener)
    assert backend.rows("SELECT data, metadata FROM traces") == [
        ('{"text":"é☃\\u0000","nested":[1,2.5,null,true,{"k":[]}]}', '{"m":"ü"}')
    ]  # encoded once, as the store encodes

    for value in ("a string", [1, "two"], 3.5, None, {"deep": {"er": [{}]}}):
        from_store = make_trace(data=value, metadata={"v": 1}, session_uids=["s-b"])
        store.store(from_store)
        app.expire_all()
        (entity,) = app.scalars(select(Trace).where(Trace.id == from_store.id))
        assert (entity.data, entity.metadata_) == (value, {"v": 1})


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, (1, 2), datetime.datetime(2024, 1, 1), uuid.uuid4(), {1, 2}, object(), {"k": [math.nan]}],
    ids=["nan", "inf", "tuple", "datetime", "uuid", "set", "object", "nested-nan"],
)
def test_the_orm_refuses_what_trace_context_refuses(orm: Session, value: object) -> None:
    orm.add(Trace(context_type="span", namespace="web", data=value))
    with pytest.raises(InvalidTraceError, match="data"):
        orm.flush()
    orm.rollback()
    with pytest.raises(InvalidTraceError, match="metadata"):
        orm.execute(insert(Trace).values(context_type="span", namespace="web", data={}, metadata_={"k": value}))
    orm.rollback()
    assert orm.scalar(select(func.count()).select_from(Trace)) == 0


def test_nul_is_refused_on_postgresql_and_stored_on_sqlite(orm: Session, backend: Backend) -> None:
    trace = Trace(context_type="sp\x00an", namespace="web", data={"text": "\x00"})
    trace.sessions.append(TraceSession(session_uid="s\x00"))
    orm.add(trace)
    if not backend.is_sqlite:
        with pytest.raises(InvalidTraceError, match="context_type contains NUL"):
            orm.flush()
        orm.rollback()
        trace = Trace(context_type="span", namespace="web", data={}, sessions=[TraceSession(session_uid="s\x00")])
        orm.add(trace)
        with pytest.raises(InvalidTraceError, match="session uid contains NUL"):
            orm.flush()
        return
    orm.commit()
    assert orm.scalars(select(TraceSession.session_uid)).all() == ["s\x00"]


def test_defaults_are_those_of_trace_context(orm: Session, store: TraceStore) -> None:
    trace = Trace(context_type="span", namespace="web", data={"k": 1})
    context = TraceContext(context_type="span", namespace="web", data={"k": 1})
    assert abs(trace.created_at - context.created_at) < 5 and trace.updated_at == trace.created_at
    assert trace.metadata_ == {} and trace.sessions == []
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", trace.id)
    assert int(trace.id.replace("-", "")[:12], 16) == int(trace.created_at * 1000)  # time-ordered, as the store's
    # The same for Core's insert(Trace), which the constructor does not see.
    orm.execute(insert(Trace).values(context_type="span", namespace="core", data=[1]))
    orm.commit()
    (row,) = orm.scalars(select(Trace).where(Trace.namespace == "core")).all()
    assert (row.metadata_, row.updated_at, row.data) == ({}, row.created_at, [1])
    assert abs(int(row.id.replace("-", "")[:12], 16) / 1000 - row.created_at) < 1
    assert store.get(row.id) == row.to_context()


def test_a_trace_converts_to_and_from_a_trace_context(app: App, store: TraceStore) -> None:
    context = make_trace(data={"n": [1]}, metadata={"m": 2}, session_uids=["s-b", "s-a"], created_at=T0)
    entity = Trace.from_context(context)
    assert [link.session_uid for link in entity.sessions] == ["s-a", "s-b"]
    assert entity.to_context() == context
    app.add(entity)
    app.commit()
    assert store.get(context.id) == context
    (loaded,) = app.scalars(select(Trace).options(selectinload(Trace.sessions)))
    assert loaded.to_context() == context


# -- relationships, cascade, the link's created_at ------------------------------------------------------------------
def test_links_are_added_and_removed_through_the_relationship(app: App, store: TraceStore, backend: Backend) -> None:
    trace = Trace(context_type="span", namespace="web", data={}, created_at=T0 + 5)
    trace.sessions.append(TraceSession(session_uid="s-a"))
    trace.sessions.append(TraceSession(session_uid="s-b"))
    app.add(trace)
    app.commit()
    assert trace.sessions[0].trace is trace
    assert store.get(trace.id).session_uids == ("s-a", "s-b")  # type: ignore[union-attr]
    (loaded,) = app.scalars(select(Trace).options(selectinload(Trace.sessions)))
    loaded.sessions.remove(loaded.sessions[0])  # delete-orphan: the link row goes
    app.commit()
    assert store.get(trace.id).session_uids == ("s-b",)  # type: ignore[union-attr]
    assert backend.links(trace.id) == [("s-b", T0 + 5)]


def test_deleting_a_trace_deletes_its_links_with_foreign_keys_off(app: App, backend: Backend) -> None:
    """The ORM's own cascade: the application's SQLite connections have foreign keys off (SQLite's default)."""
    if backend.is_sqlite:
        assert app.scalars(text("PRAGMA foreign_keys")) == [0]
    keep = Trace(context_type="span", namespace="web", data={}, sessions=[TraceSession(session_uid="s-a")])
    gone = Trace(context_type="span", namespace="web", data={}, sessions=[TraceSession(session_uid="s-a")])
    app.add_all([keep, gone])
    app.commit()
    kept_id, gone_id = keep.id, gone.id
    app.expire_all()
    app.delete(app.get(Trace, gone_id))  # its links not loaded: the cascade loads them to delete them
    app.commit()
    assert backend.rows("SELECT trace_id FROM trace_sessions") == [(kept_id,)]
    assert backend.rows("SELECT id FROM traces") == [(kept_id,)]


def test_a_link_gets_its_traces_created_at_before_and_after_finalize(
    app: App, store: TraceStore, backend: Backend
) -> None:
    """A link added through the ORM (with its trace, by trace_id alone, or by Core's insert) is stamped with its
    trace's created_at by the model, not by the rolling-deploy triggers, which finalize drops."""

    def add_links(tag: str, created_at: float) -> list[str]:
        with_trace = Trace(context_type="span", namespace="web", data={}, created_at=created_at)
        with_trace.sessions.append(TraceSession(session_uid=tag))
        existing = make_trace(created_at=created_at - 1, session_uids=["other"])
        by_core = make_trace(created_at=created_at - 2, session_uids=["other"])
        store.store_batch([existing, by_core])
        app.add(with_trace)
        app.add(TraceSession(trace_id=existing.id, session_uid=tag))
        app.execute(insert(TraceSession).values(trace_id=by_core.id, session_uid=tag))
        app.commit()
        return [with_trace.id, existing.id, by_core.id]

    before = add_links("before", T0)
    finalize(backend.url)
    after = add_links("after", T0 + 100)
    for tag, ids, created_at in (("before", before, T0), ("after", after, T0 + 100)):
        assert [t.id for t in store.get_by_session_uid(tag)] == ids
        assert stored_link_times(backend, tag) == sorted(
            zip(ids, (created_at, created_at - 1, created_at - 2), strict=True)
        )
        assert [t.id for t in app.scalars(recent_traces(tag))] == ids
    assert backend.junction_drift() == []


def test_moving_a_trace_in_time_moves_its_links(app: App, store: TraceStore, backend: Backend) -> None:
    first, second = make_trace(created_at=T0, session_uids=["s-a"]), make_trace(created_at=T0 + 1, session_uids=["s-a"])
    store.store_batch([first, second])
    (entity,) = app.scalars(select(Trace).where(Trace.id == first.id))
    entity.created_at = T0 + 2
    app.commit()
    assert [t.id for t in app.scalars(recent_traces("s-a"))] == [first.id, second.id]
    assert backend.junction_drift() == []


def test_a_link_before_its_trace_stays_null_as_the_stores_writers_leave_it(orm: Session, backend: Backend) -> None:
    """Possible only without the foreign key's check (SQLite's default); PostgreSQL refuses such a link."""
    orm.add(TraceSession(trace_id="not-yet", session_uid="s-a"))
    if not backend.is_sqlite:
        with pytest.raises(sqlalchemy.exc.IntegrityError, match="foreign key"):
            orm.commit()
        return
    orm.commit()
    assert stored_link_times(backend, "s-a") == [("not-yet", None)]


# -- recent_traces and its pages ---------------------------------------------------------------------------------------
QUERIES = [
    {"since": since, "until": until, "limit": limit, **filters}
    for since, until, limit, filters in itertools.product(
        [None, T0, T0 + 10, T0 + 10.5, T0 + 10_000],  # everything, an inclusive tie boundary, an empty window
        [None, T0 + 20],
        [None, 1, 7],
        [{}, {"namespace": "web"}, {"context_type": "tool", "namespace": "jobs"}],
    )
]


def test_recent_traces_answer_like_the_oracle(app: App, store: TraceStore) -> None:
    traces = dataset()
    store.store_batch(traces)
    for uid, args in itertools.product([*SESSIONS, "missing"], QUERIES):
        got = app.scalars(recent_traces(uid, **args))
        assert [t.id for t in got] == [t.id for t in oracle_query(traces, session_uid=uid, **args)], (uid, args)
    # The entities are whole: fields, JSON values, links.
    got = app.scalars(recent_traces(SESSIONS[2], limit=5).options(selectinload(Trace.sessions)))
    assert [t.to_context() for t in got] == oracle_query(traces, session_uid=SESSIONS[2], limit=5)


def test_pages_cover_the_session_once_in_order(app: App, store: TraceStore) -> None:
    traces = dataset()
    store.store_batch(traces)
    for uid, since, limit in itertools.product(SESSIONS, [None, T0 + 10], [1, 7, 100]):
        seen, cursor = [], None
        while True:
            page = app.scalars(recent_traces_page(uid, since=since, limit=limit, cursor=cursor))
            stores_page = store.page_by_session_uid(uid, since=since, limit=limit, cursor=cursor)
            assert [t.id for t in page] == [t.id for t in stores_page.items]
            cursor = next_page_cursor(page, limit=limit)
            assert cursor == stores_page.next_cursor
            seen += page
            if cursor is None:
                break
        assert [t.id for t in seen] == [t.id for t in oracle_query(traces, session_uid=uid, since=since)]
    # A trace stored between two pages, newer than the cursor, is neither skipped nor repeated (keyset).
    first = app.scalars(recent_traces_page("s-a", limit=10))
    store.store(make_trace(created_at=T0 + 1_000, session_uids=["s-a"]))
    rest = app.scalars(recent_traces_page("s-a", limit=1000, cursor=next_page_cursor(first, limit=10)))
    assert [t.id for t in first + rest] == [t.id for t in oracle_query(traces, session_uid="s-a")]


def test_sessions_load_in_one_more_statement(app: App, store: TraceStore) -> None:
    store.store_batch(dataset())
    stmt = recent_traces("s-a", limit=20).options(selectinload(Trace.sessions))
    app.scalars(stmt)  # the first read on an engine also asks for the database's revision
    app.expire_all()
    app.watch()
    traces = app.scalars(recent_traces("s-a", limit=20).options(selectinload(Trace.sessions)))
    assert all(t.sessions for t in traces) and len(traces) == 20
    assert len(app.statements) == 2, app.statements


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"session_uid": ""}, "session_uid must not be empty"),
        ({"session_uid": None}, "session_uid must be a str"),
        ({"session_uid": "s", "since": T0 * 1000}, "milliseconds"),
        ({"session_uid": "s", "until": "yesterday"}, "until must be a number"),
        ({"session_uid": "s", "limit": 0}, "limit must be an int"),
        ({"session_uid": "s", "limit": True}, "limit must be an int"),
        ({"session_uid": "s", "namespace": ""}, "namespace must not be empty"),
    ],
)
def test_bad_arguments_are_refused_before_any_sql(args: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidQueryError, match=message):
        recent_traces(**args)
    page_args = {name: value for name, value in args.items() if name in ("session_uid", "since", "limit")}
    if len(page_args) == len(args):
        with pytest.raises(InvalidQueryError, match=message):
            recent_traces_page(**page_args)


def test_bad_page_arguments_are_refused() -> None:
    with pytest.raises(InvalidQueryError, match="needs a limit"):
        recent_traces_page("s", limit=None)  # type: ignore[arg-type]
    with pytest.raises(InvalidQueryError, match="must be a PageCursor"):
        recent_traces_page("s", cursor="token")  # type: ignore[arg-type]
    with pytest.raises(InvalidQueryError, match="not a page cursor"):
        recent_traces_page("s", cursor=PageCursor(math.nan, "x"))
    with pytest.raises(InvalidQueryError, match="needs a limit"):
        next_page_cursor([], limit=None)  # type: ignore[arg-type]


def test_nul_in_a_query_is_bad_input_on_postgresql(orm: Session, backend: Backend) -> None:
    stmt = recent_traces("s\x00", namespace="w\x00")
    if backend.is_sqlite:
        assert orm.scalars(stmt).all() == []
        return
    with pytest.raises(InvalidQueryError, match="session_uid contains NUL"):
        orm.scalars(stmt)
    with pytest.raises(InvalidQueryError, match="cursor's trace id contains NUL"):
        orm.scalars(recent_traces_page("s", cursor=PageCursor(T0, "x\x00")))


def test_a_database_between_0002_and_head_is_answered_with_the_legacy_join(backend: Backend) -> None:
    """Links the backfill has not reached have no created_at yet: the selects then filter and sort on the
    trace's own, keeping what the application added to them (options, filters), until the database is at head."""
    traces = dataset()
    backend.create_legacy(
        (t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at, t.session_uids)
        for t in traces
    )
    upgrade(backend.url, "0002")
    with backend.raw() as connection:  # what the backfill's first batches leave behind: a third of the links
        connection.execute(
            text(
                "UPDATE trace_sessions SET created_at = (SELECT created_at FROM traces WHERE id = trace_id)"
                " WHERE trace_id < 't030'"
            )
        )
    assert backend.rows("SELECT count(*) FROM trace_sessions WHERE created_at IS NULL") == [(75,)]  # of 113
    engine = sqlalchemy.create_engine(backend.sync_url)
    try:
        with Session(engine) as session:
            for uid, args in itertools.product(SESSIONS, QUERIES[::5]):
                got = session.scalars(recent_traces(uid, **args)).all()
                assert [t.id for t in got] == [t.id for t in oracle_query(traces, session_uid=uid, **args)]
            extended = recent_traces("s-a", limit=5).options(selectinload(Trace.sessions))
            got = session.scalars(extended.where(Trace.context_type == "tool")).all()
            assert [t.to_context() for t in got] == oracle_query(traces, session_uid="s-a", context_type="tool")[:5]
            page = session.scalars(recent_traces_page("s-b", limit=4)).all()
            cursor = next_page_cursor(page, limit=4)
            rest = session.scalars(recent_traces_page("s-b", limit=100, cursor=cursor)).all()
            assert [t.id for t in page + rest] == [t.id for t in oracle_query(traces, session_uid="s-b")]
        upgrade(backend.url)
        with Session(engine) as session:
            session.connection().exec_driver_sql("UPDATE trace_sessions SET created_at = NULL")  # proves the form
            assert session.scalars(recent_traces("s-a")).all() == []  # at head: the junction's copy, indexed
    finally:
        engine.dispose()


def test_a_database_below_0002_is_refused(backend: Backend) -> None:
    backend.create_legacy()
    engine = sqlalchemy.create_engine(backend.sync_url)
    try:
        with Session(engine) as session, pytest.raises(SchemaOutOfDateError, match="tracestore upgrade"):
            session.scalars(recent_traces("s-a"))
    finally:
        engine.dispose()


# -- add_traces --------------------------------------------------------------------------------------------------
class AppBase(DeclarativeBase):
    pass


class Order(AppBase):
    """A row of the application's own, in the same database."""

    __tablename__ = "app_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    trace_id: Mapped[str] = mapped_column(Text)


@pytest.fixture
def with_orders(backend: Backend, store: TraceStore) -> Iterator[None]:
    AppBase.metadata.create_all(backend.engine)
    yield
    AppBase.metadata.drop_all(backend.engine)


def test_add_traces_commits_with_the_applications_rows(
    app: App, store: TraceStore, backend: Backend, with_orders: None
) -> None:
    kept = make_trace(session_uids=["s-a"], created_at=T0)
    dropped = make_trace(session_uids=["s-a"], created_at=T0 + 1)
    app.add(Order(id=1, trace_id=kept.id))
    assert app.add_traces([kept]) == [kept.id]
    app.commit()
    app.add(Order(id=2, trace_id=dropped.id))
    assert app.add_traces([dropped]) == [dropped.id]
    # The application's transaction sees its own writes; nobody else does before it commits.
    assert [t.id for t in app.scalars(recent_traces("s-a"))] == [dropped.id, kept.id]
    app.rollback()
    assert store.get(kept.id) == kept and store.get(dropped.id) is None
    assert backend.rows("SELECT id, trace_id FROM app_orders") == [(1, kept.id)]
    assert store.get_by_session_uid("s-a") == [kept]


def test_add_traces_inserts_or_updates_as_store_batch_does(app: App, store: TraceStore, backend: Backend) -> None:
    first = make_trace(data={"v": 1}, session_uids=["s-a", "s-b"], created_at=T0)
    store.store(first)
    again = make_trace(id=first.id, data={"v": 2}, session_uids=["s-b", "s-c"], created_at=T0 + 7)
    new = make_trace(data=[1, 2], session_uids=["s-c"], created_at=T0 + 3)
    assert app.add_traces([again, new, again]) == [first.id, new.id]
    app.commit()
    assert store.get(first.id) == merge_restore(first, again)
    assert store.get(new.id) == new
    assert backend.links(first.id) == [("s-a", T0 + 7), ("s-b", T0 + 7), ("s-c", T0 + 7)]  # kept, and following
    assert app.add_traces([]) == []


def test_add_traces_flushes_first_and_expires_what_it_changed(app: App, store: TraceStore) -> None:
    stored = make_trace(data={"v": 1}, session_uids=["s-a"], created_at=T0)
    store.store(stored)
    (entity,) = app.scalars(select(Trace).options(selectinload(Trace.sessions)))
    assert [link.session_uid for link in entity.sessions] == ["s-a"]
    # A trace the application added and has not flushed: it goes first, and the batch then updates it.
    pending = Trace(context_type="span", namespace="web", data={"pending": True}, created_at=T0 + 1)
    app.add(pending)
    batch = [
        make_trace(id=stored.id, data={"v": 2}, session_uids=["s-b"], created_at=T0),
        make_trace(id=pending.id, data={"v": 3}, session_uids=["s-a"], created_at=T0 + 1),
    ]
    app.add_traces(batch)
    app.commit()
    # The session's entities of those ids were expired: read again, they are what the batch made of them.
    read = app.sync(lambda session: [(t.data, [link.session_uid for link in t.sessions]) for t in (entity, pending)])
    assert read == [({"v": 2}, ["s-a", "s-b"]), ({"v": 3}, ["s-a"])]
    assert store.get(pending.id) == batch[1]


def test_add_traces_checks_the_batch_before_any_sql(app: App, backend: Backend) -> None:
    app.watch()
    good = make_trace(session_uids=["s-a"])
    for bad in (
        [good, make_trace(data={"x": math.nan})],
        [good, "not a trace"],
        "not a list",
        [make_trace(session_uids=["s\x00"])] if not backend.is_sqlite else [make_trace(metadata={"t": (1,)})],
    ):
        with pytest.raises(InvalidTraceError):
            app.add_traces(bad)  # type: ignore[arg-type]
    assert app.statements == []
    assert app.add_traces([good]) == [good.id]  # the session is still usable


@pytest.fixture(params=["sync", "async"])
def pg_app(request: pytest.FixtureRequest, pg: Backend) -> Iterator[App]:
    upgrade(pg.url)
    session = App(pg, request.param)
    try:
        yield session
    finally:
        session.close()


def test_add_traces_leaves_the_transactions_settings_as_they_were(pg_app: App) -> None:
    """The store's write turns sequential scans off for its own statements (tracestore.dialects.postgresql);
    in the application's transaction, which goes on after it, the setting is put back."""
    assert pg_app.execute(text("SHOW enable_seqscan")).scalar() == "on"
    pg_app.add_traces([make_trace(session_uids=["s-a"])])
    assert pg_app.execute(text("SHOW enable_seqscan")).scalar() == "on"
    pg_app.execute(text("SET LOCAL enable_seqscan = off"))  # the application's own choice is kept too
    pg_app.add_traces([make_trace(session_uids=["s-a"])])
    assert pg_app.execute(text("SHOW enable_seqscan")).scalar() == "off"
    pg_app.rollback()


def test_a_failed_write_is_a_storage_error(app: App, backend: Backend) -> None:
    read_only = "PRAGMA query_only = ON" if backend.is_sqlite else "SET TRANSACTION READ ONLY"
    app.execute(text(read_only))
    with pytest.raises(StorageError, match=r"add_traces failed.*(readonly|read-only)"):
        app.add_traces([make_trace(session_uids=["s-a"])])
    app.rollback()
    if backend.is_sqlite:
        app.execute(text("PRAGMA query_only = OFF"))


def test_add_traces_goes_through_the_applications_cursor_events(app: App) -> None:
    """A listener on the application's Engine (OpenTelemetry's, Sentry's) sees the store's write."""
    app.watch()
    app.add_traces([make_trace(session_uids=["s-a"])])
    assert any("INSERT INTO traces" in statement for statement in app.statements), app.statements
    app.commit()


# -- query plans on data large enough for the planner's choice to be production's -------------------------------
# The shapes whose plans are checked: "window" and "window-end" are resolved against the data set's end, and
# the namespace and type are common ones (a rare one may rightly be read through its own index first).
FILTERS = {
    "latest": {"limit": 100},
    "window-limit": {"since": "window", "limit": 100},
    "bounded-window-limit": {"since": "window", "until": "window-end", "limit": 10},
    "window": {"since": "window"},
    "namespace-limit": {"namespace": "common", "limit": 100},
    "type-limit": {"context_type": "common", "limit": 100},
    "namespace-type-window-limit": {"namespace": "common", "context_type": "common", "since": "window", "limit": 100},
}
PAGES = ("latest", "window-limit")


@pytest.fixture(scope="module")
def sqlite_planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path = tmp_path_factory.mktemp("orm-plans") / "traces.db"
    generate(path, schema="head", traces=20_000, recent_burst=500, now=T0)  # ANALYZEd, as a migrated file is
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    yield engine
    engine.dispose()


def explain(engine: Engine, stmt: Any) -> list[str]:
    with engine.connect() as connection:
        compiled = stmt.compile(dialect=connection.dialect)
        prefix = "EXPLAIN QUERY PLAN " if connection.dialect.name == "sqlite" else "EXPLAIN "
        params = (
            compiled.params if compiled.positiontup is None else tuple(compiled.params[k] for k in compiled.positiontup)
        )
        return [str(row[-1]) for row in connection.exec_driver_sql(prefix + str(compiled), params)]


def planner_args(shape: str, now: float, *, namespace: str, context_type: str) -> dict[str, Any]:
    values = {"window": now - 600, "window-end": now - 100, "common": None}
    args = {
        name: values.get(value, value) if isinstance(value, str) else value for name, value in FILTERS[shape].items()
    }
    if "namespace" in args:
        args["namespace"] = namespace
    if "context_type" in args:
        args["context_type"] = context_type
    return args


def sqlite_plan_is_the_index_walk(plan: list[str]) -> None:
    assert any(line.startswith(f"SEARCH ts USING COVERING INDEX {SESSION_TIME_INDEX}") for line in plan), plan
    assert not any("TEMP B-TREE" in line for line in plan), plan


@pytest.mark.parametrize("shape", FILTERS)
def test_sqlite_walks_the_session_index_without_a_sort(sqlite_planner: Engine, shape: str) -> None:
    args = planner_args(shape, T0, namespace="prod", context_type="llm_call")
    sqlite_plan_is_the_index_walk(explain(sqlite_planner, recent_traces("hot", **args)))


@pytest.mark.parametrize("shape", PAGES)
def test_sqlite_starts_a_page_at_its_cursor_in_the_index(sqlite_planner: Engine, shape: str) -> None:
    args = planner_args(shape, T0, namespace="prod", context_type="llm_call")
    stmt = recent_traces_page("hot", cursor=PageCursor(T0 - 300, "f" * 36), **args)
    sqlite_plan_is_the_index_walk(explain(sqlite_planner, stmt))


@pytest.fixture(scope="module")
def postgresql_planner(pg_server_url: URL) -> Iterator[tuple[Engine, float]]:
    """50,000 traces with 300-byte payloads, a hot session of 12,500, VACUUM ANALYZEd: with less, a hash join over
    a sequential scan of traces looks cheaper to the planner than the index walk, which it never is in production."""
    name = f"tracestore_orm_plans_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    url = pg_server_url.set(drivername="postgresql+psycopg", database=name)
    engine = sqlalchemy.create_engine(url)
    try:
        upgrade(url.render_as_string(hide_password=False))
        count = 50_000
        with engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
                    " SELECT lpad(i::text, 8, '0'), CASE WHEN mod(i, 10) = 0 THEN 'rare' ELSE 'span' END,"
                    " CASE WHEN mod(i, 7) = 0 THEN 'rare' ELSE 'web' END,"
                    " '{\"text\": \"' || repeat('x', 300) || '\"}', '{}', :t0 + i, :t0 + i"
                    " FROM generate_series(1, :n) AS i"
                ),
                {"t0": T0, "n": count},
            )
            connection.execute(
                text(
                    "INSERT INTO trace_sessions (trace_id, session_uid, created_at) SELECT lpad(i::text, 8, '0'),"
                    " CASE WHEN mod(i, 4) = 0 THEN 'hot' ELSE 's' || mod(i, 2000) END, :t0 + i"
                    " FROM generate_series(1, :n) AS i"
                ),
                {"t0": T0, "n": count},
            )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
        yield engine, T0 + count
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.mark.parametrize("shape", FILTERS)
def test_postgresql_stops_the_index_walk_at_the_limit(postgresql_planner: tuple[Engine, float], shape: str) -> None:
    engine, now = postgresql_planner
    args = planner_args(shape, now, namespace="web", context_type="span")
    plan = "\n".join(explain(engine, recent_traces("hot", **args)))
    assert f"Index Only Scan Backward using {SESSION_TIME_INDEX} on trace_sessions ts" in plan, plan
    if "limit" in args:  # without one every row of the window is returned anyway (tests/test_plans_postgresql.py)
        assert plan.startswith("Limit") and "Sort" not in plan, plan


@pytest.mark.parametrize("shape", PAGES)
def test_postgresql_starts_a_page_at_its_cursor_in_the_index(
    postgresql_planner: tuple[Engine, float], shape: str
) -> None:
    engine, now = postgresql_planner
    args = planner_args(shape, now, namespace="web", context_type="span")
    stmt = recent_traces_page("hot", cursor=PageCursor(now - 400, f"{int(now - 400 - T0):08d}"), **args)
    plan = "\n".join(explain(engine, stmt))
    assert plan.startswith("Limit") and "Sort" not in plan, plan
    keyset = r"Index Cond: \(\(session_uid = 'hot'::text\) AND .*\(ROW\(created_at, trace_id\) < ROW\("
    assert re.search(keyset, plan), plan  # the cursor starts the index range


# -- the examples of docs/orm.md run as written ----------------------------------------------------------------------
DOC = Path(__file__).resolve().parent.parent / "docs" / "orm.md"


def test_the_documented_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block in order, in an empty directory; what each print() shows is the comment beside it."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    expected = [line for block in blocks for line in re.findall(r"^\s*print\(.*\)\s+# (.*)$", block, re.MULTILINE)]
    assert blocks and expected
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as shown:
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)
    namespace["engine"].dispose()
    assert shown.getvalue().splitlines() == expected
