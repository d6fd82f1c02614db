"""AsyncTraceStore: the same API and the same answers as TraceStore, on aiosqlite and asyncpg."""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import random
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import URL, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from tests.backends import Backend
from tests.oracle import make_trace, merge_restore, oracle_query
from tests.test_store import crowd_sessions, fail_links_to_session, reads_the_session_index
from tracestore import (
    AsyncTraceStore,
    InvalidQueryError,
    InvalidTraceError,
    SchemaOutOfDateError,
    StorageError,
    TraceContext,
    TraceStore,
)

T0 = 1_700_000_000.0


def public_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def comparable(signature: inspect.Signature, *, skip_default: str | None = None) -> list[tuple[Any, ...]]:
    return [
        (p.name, p.kind, "<differs by driver>" if p.name == skip_default else p.default)
        for p in signature.parameters.values()
    ]


# -- parity ------------------------------------------------------------------------------------------------
def test_same_public_names() -> None:
    assert public_names(AsyncTraceStore) == public_names(TraceStore)


@pytest.mark.parametrize("name", sorted(public_names(TraceStore) - {"engine", "read_engine"}))
def test_same_signature_and_awaitable(name: str) -> None:
    sync_method = getattr(TraceStore, name)
    async_method = getattr(AsyncTraceStore, name, None)
    assert async_method is not None, f"AsyncTraceStore.{name} is missing"
    assert comparable(inspect.signature(async_method)) == comparable(inspect.signature(sync_method))
    returns = inspect.signature(sync_method).return_annotation
    if name == "refusal":  # asks the store's rules, not the database: a plain method on both
        assert not inspect.iscoroutinefunction(async_method)
    elif str(returns).startswith("Iterator["):  # an iterator on one side, an async iterator on the other
        assert str(inspect.signature(async_method).return_annotation).startswith("AsyncIterator[")
        assert not inspect.iscoroutinefunction(async_method)
    else:
        assert inspect.iscoroutinefunction(async_method)


def test_same_constructor() -> None:
    # Only the default URL differs: it names the async driver.
    sync_signature = inspect.signature(TraceStore.__init__)
    async_signature = inspect.signature(AsyncTraceStore.__init__)
    assert comparable(async_signature, skip_default="url_or_engine") == comparable(
        sync_signature, skip_default="url_or_engine"
    )
    for name in ("engine", "read_engine"):
        assert isinstance(inspect.getattr_static(AsyncTraceStore, name), property)
        assert isinstance(inspect.getattr_static(TraceStore, name), property)


def parity_traces() -> list[TraceContext]:
    rng = random.Random(5)
    return [
        make_trace(
            id=f"{rng.choice('abc')}{index:03d}",
            namespace=rng.choice(["web", "worker"]),
            context_type=rng.choice(["span", "log"]),
            data={"index": index, "text": "中文 😀 e\u0301"},
            metadata={"m": index % 3},
            session_uids=rng.sample(["s1", "s2", "s3"], rng.randrange(3)),
            created_at=T0 + rng.choice([0, 0, 1, 2.5, 7]),
        )
        for index in range(60)
    ]


PARITY_QUERIES = [
    dict(zip(("session_uid", "namespace", "context_type", "since", "until", "limit"), values, strict=True))
    for values in itertools.product(
        [None, "s1", "s3", "none"], [None, "web"], [None, "log"], [None, T0 + 1], [None, T0 + 7], [None, 3]
    )
]


async def test_same_answers_as_the_sync_store(backend: Backend) -> None:
    traces = parity_traces()
    with TraceStore(backend.url) as sync_store:
        sync_store.store_batch(traces)
        async with AsyncTraceStore(backend.async_url) as async_store:
            for args in PARITY_QUERIES:
                expected = oracle_query(traces, **args)
                assert sync_store.query(**args) == expected
                assert await async_store.query(**args) == expected
            for uid, since, limit in itertools.product(["s1", "s2"], [None, T0 + 1], [None, 2]):
                assert await async_store.get_by_session_uid(
                    uid, since=since, limit=limit
                ) == sync_store.get_by_session_uid(uid, since=since, limit=limit)
                assert await async_store.explain(uid, since=since, limit=limit) == sync_store.explain(
                    uid, since=since, limit=limit
                )
            for trace in [*traces, make_trace(id="missing")]:
                assert await async_store.get(trace.id) == sync_store.get(trace.id)


async def test_async_writes_read_back_by_sync_store(backend: Backend) -> None:
    traces = parity_traces()
    async with AsyncTraceStore(backend.async_url) as async_store:
        await async_store.store_batch(traces[:30])
        for trace in traces[30:]:
            await async_store.store(trace)
        assert await async_store.delete(traces[0].id) is True
        assert await async_store.delete(traces[0].id) is False
    kept = traces[1:]
    with TraceStore(backend.url) as sync_store:
        for args in PARITY_QUERIES[::7]:
            assert sync_store.query(**args) == oracle_query(kept, **args)
    assert backend.junction_drift() == []


async def test_restore_adds_sessions_and_moves_links(async_store: AsyncTraceStore, backend: Backend) -> None:
    first = make_trace(id="x", session_uids=["a"], created_at=T0)
    second = make_trace(id="x", data="new", session_uids=["b"], created_at=T0 + 10)
    await async_store.store(first)
    await async_store.store(second)
    expected = merge_restore(first, second)
    assert await async_store.get("x") == expected
    assert await async_store.get_by_session_uid("a", since=T0 + 10) == [expected]
    assert await async_store.query(session_uid="a", until=T0 + 1) == []
    assert backend.junction_drift() == []


async def test_failing_batch_keeps_nothing(async_store: AsyncTraceStore, backend: Backend) -> None:
    await async_store.store(make_trace(id="keep", session_uids=["a"], created_at=T0))
    before = backend.dump()
    batch = [make_trace(), make_trace(id="keep", data="changed"), make_trace(data=object()), make_trace()]
    with pytest.raises(InvalidTraceError):
        await async_store.store_batch(batch)
    with pytest.raises(InvalidTraceError):
        await async_store.store_batch([make_trace(), "not a trace"])  # type: ignore[list-item]
    assert backend.dump() == before


async def test_batch_of_new_and_restored_traces(async_store: AsyncTraceStore, backend: Backend) -> None:
    # Inserted first, upserted only when the insert skipped an id: both kinds in one batch, as in the sync store.
    old = make_trace(id="old", data=1, session_uids=["a"], created_at=T0)
    await async_store.store(old)
    fresh = [make_trace(id=f"new{i}", session_uids=["a"], created_at=T0 + i) for i in range(3)]
    again = make_trace(id="old", data=2, session_uids=["b"], created_at=T0 + 10)
    await async_store.store_batch([fresh[0], again, *fresh[1:]])
    assert await async_store.get("old") == merge_restore(old, again)
    for trace in fresh:
        assert await async_store.get(trace.id) == trace
    assert [t.id for t in await async_store.get_by_session_uid("a")] == ["old", "new2", "new1", "new0"]
    assert backend.junction_drift() == []


async def test_database_failure_mid_batch_rolls_everything_back(async_store: AsyncTraceStore, backend: Backend) -> None:
    existing = make_trace(id="keep", session_uids=["a"], created_at=T0)
    await async_store.store(existing)
    fail_links_to_session(backend, "boom")
    before = backend.dump()
    batch = [make_trace(session_uids=["a"]), make_trace(id="keep", data="changed"), make_trace(session_uids=["boom"])]
    with pytest.raises(StorageError, match="boom"):
        await async_store.store_batch(batch)
    assert backend.dump() == before
    assert await async_store.get("keep") == existing


# -- bad input ------------------------------------------------------------------------------------------------
ASYNC_BAD_CALLS: list[tuple[str, Callable[[AsyncTraceStore], Awaitable[Any]], type[Exception]]] = [
    ("data-set", lambda s: s.store(make_trace(data={1})), InvalidTraceError),
    ("store-not-a-trace", lambda s: s.store("trace"), InvalidTraceError),  # type: ignore[arg-type]
    ("limit-zero", lambda s: s.query(limit=0), InvalidQueryError),
    ("limit-bool", lambda s: s.get_by_session_uid("a", limit=True), InvalidQueryError),
    ("since-nan", lambda s: s.query(session_uid="a", since=math.nan), InvalidQueryError),
    ("until-inf", lambda s: s.query(until=math.inf), InvalidQueryError),
    ("session-empty", lambda s: s.get_by_session_uid(""), InvalidQueryError),
    ("session-int", lambda s: s.query(session_uid=3), InvalidQueryError),  # type: ignore[arg-type]
    ("get-empty", lambda s: s.get(""), InvalidQueryError),
    ("delete-none", lambda s: s.delete(None), InvalidQueryError),  # type: ignore[arg-type]
    ("explain-limit-zero", lambda s: s.explain("a", limit=0), InvalidQueryError),
]


@pytest.mark.parametrize(
    ("call", "error"), [(call, error) for _, call, error in ASYNC_BAD_CALLS], ids=[c[0] for c in ASYNC_BAD_CALLS]
)
async def test_bad_input_raises_library_error_and_changes_nothing(
    async_store: AsyncTraceStore,
    backend: Backend,
    call: Callable[[AsyncTraceStore], Awaitable[Any]],
    error: type[Exception],
) -> None:
    await async_store.store(make_trace(id="one", session_uids=["a"]))
    before = backend.dump()
    with pytest.raises(error):
        await call(async_store)
    assert backend.dump() == before


async def test_not_a_sqlite_file(tmp_path: Path) -> None:
    junk = random.Random(4).randbytes(8192)
    path = tmp_path / "junk.db"
    path.write_bytes(junk)
    with pytest.raises(StorageError):
        async with AsyncTraceStore(f"sqlite+aiosqlite:///{path}"):
            pass
    store = AsyncTraceStore(f"sqlite+aiosqlite:///{path}")
    try:
        with pytest.raises(StorageError):
            await store.query()
    finally:
        await store.close()
    assert path.read_bytes() == junk


@pytest.mark.parametrize(
    "url", ["", "not a url", "sqlite:///sync-driver.db", "postgresql+psycopg:///sync-driver", "nosuchdialect://host/db"]
)
def test_bad_url(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError):
        AsyncTraceStore(url)


async def test_unusable_postgresql_url(pg_server_url: URL, tmp_path: Path) -> None:
    # PostgreSQL's counterparts of a bad file: no such database, no server; refused on open and on use.
    async_server = pg_server_url.set(drivername="postgresql+asyncpg")
    urls = [
        async_server.set(database=f"tracestore_missing_{uuid.uuid4().hex[:12]}"),
        async_server.update_query_dict({"host": str(tmp_path / "no-server-here")}),
        make_url("postgresql+asyncpg://postgres@127.0.0.1:1/postgres"),  # nothing listens on port 1
    ]
    for url in urls:
        rendered = url.render_as_string(hide_password=False)
        with pytest.raises(StorageError):
            async with AsyncTraceStore(rendered):
                pass
        store = AsyncTraceStore(rendered)
        try:
            with pytest.raises(StorageError):
                await store.query()
        finally:
            await store.close()


# -- engines, revisions, logging ----------------------------------------------------------------------------------
async def test_store_on_an_engine_passed_in(backend: Backend) -> None:
    engine = create_async_engine(backend.async_url)
    try:
        async with AsyncTraceStore(engine) as store:
            assert store.engine is engine
            trace = make_trace(session_uids=["a"], created_at=T0)
            await store.store(trace)
            assert await store.get_by_session_uid("a") == [trace]
        # Closing the store leaves a caller's engine usable.
        async with engine.connect() as conn:
            assert (await conn.exec_driver_sql("SELECT count(*) FROM traces")).scalar() == 1
    finally:
        await engine.dispose()


# These two take `db_path` to run on SQLite only: tracestore.engine sets pragmas on the SQLite connections of the
# engines it creates, leaves an application's as they are (but for WAL, the file's), and PostgreSQL's as the
# driver makes them.
async def test_pragmas_on_an_engine_passed_in(db_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{db_path}")
    try:
        async with AsyncTraceStore(engine) as store:
            await store.store(make_trace(session_uids=["a"], created_at=T0))
            async with engine.connect() as conn:
                assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 0
                assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
                assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 2
    finally:
        await engine.dispose()


async def test_pragmas_on_owned_engine(async_store: AsyncTraceStore, db_path: Path) -> None:
    async with async_store.engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar() > 0


async def test_old_revision(backend: Backend) -> None:
    rows = [("l1", "span", "web", {"a": 1}, {}, T0, T0, ("s1",)), ("l2", "log", "web", [1], {}, T0 + 1, T0 + 1, ())]
    backend.create_legacy(rows)
    url = backend.async_url
    before = backend.dump()
    with pytest.raises(SchemaOutOfDateError, match="tracestore upgrade"):
        async with AsyncTraceStore(url, auto_upgrade=False):
            pass
    assert backend.dump() == before
    async with AsyncTraceStore(url) as store:
        assert [trace.id for trace in await store.query()] == ["l2", "l1"]
        assert [trace.id for trace in await store.get_by_session_uid("s1", since=T0)] == ["l1"]


async def test_plan_is_logged_at_debug(
    async_store: AsyncTraceStore, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    crowd_sessions(backend)
    caplog.set_level(logging.DEBUG, logger="tracestore.plan")
    assert len(await async_store.get_by_session_uid("a", limit=5)) == 5
    messages = [r.getMessage() for r in caplog.records if r.name == "tracestore.plan"]
    assert len(messages) == 1
    assert reads_the_session_index(backend, messages[0].splitlines()), messages[0]
