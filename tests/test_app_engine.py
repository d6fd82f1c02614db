"""An application's own Engine passed to a store stays the application's: its pooled connections keep their
settings, its pool is not disposed, its own transactions carry nothing of the store's; and the store works on it,
writers queueing on SQLite's lock, writes inside the application's transaction with `connection=`.

Every test runs on SQLite and PostgreSQL; those taking `either` on TraceStore and on AsyncTraceStore. The
application's engine is plain SQLAlchemy with settings of its own (SQLite: pysqlite's transaction control, foreign
keys off, a 100 ms busy timeout, its own cache size).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from sqlalchemy import Connection, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from tests.backends import Backend
from tests.oracle import make_trace
from tests.test_async_cancel import (
    CUTOFF,
    PRUNE_BATCH,
    PRUNED,
    Landing,
    assert_usable,
    batch_of,
    busy_timeouts,
    check_batch,
    sweep_statements,
)
from tests.test_parity import Blocking
from tracestore import AsyncTraceStore, StorageError, TraceStore
from tracestore.engine import WRITE, tracestore_connection

T0 = 1_700_000_000.0
SQLITE_SETTINGS = ("foreign_keys", "busy_timeout", "synchronous", "cache_size", "analysis_limit", "secure_delete")


def app_table(backend: Backend) -> str:
    key = "INTEGER PRIMARY KEY" if backend.is_sqlite else "SERIAL PRIMARY KEY"
    return f"CREATE TABLE app_notes (id {key}, body TEXT NOT NULL)"


class App:
    """An application with its own engine (sync or async) and a store opened on it, driven from synchronous test
    code: `wait` runs what an async engine returns to completion on the app's one event loop."""

    def __init__(self, backend: Backend, kind: str, **engine_args: Any) -> None:
        self.backend, self.kind = backend, kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        args: dict[str, Any] = {"pool_size": 3, **engine_args}
        if backend.is_sqlite:
            args.setdefault("connect_args", {"timeout": 0.1})
        if self.loop is None:
            self.engine: Any = sqlalchemy.create_engine(backend.url, **args)
            self.sync_engine = self.engine
        else:
            self.engine = create_async_engine(backend.async_url, **args)
            self.sync_engine = self.engine.sync_engine
        self.created: list[Any] = []  # the DBAPI connections the application's pool made
        self.closed = 0
        event.listen(self.sync_engine, "connect", lambda dbapi, record: self.created.append(dbapi))
        event.listen(self.sync_engine, "close", lambda dbapi, record: setattr(self, "closed", self.closed + 1))
        if backend.is_sqlite:
            event.listen(self.sync_engine, "connect", _apps_own_pragmas)
        self.store: Any = None

    def open_store(self, **options: Any) -> Any:
        if self.loop is None:
            self.store = TraceStore(self.engine, **options)
        else:
            self.store = Blocking(AsyncTraceStore(self.engine, **options), self.loop)
            self.store._open()
        return self.store

    def wait(self, value: Any) -> Any:
        return self.loop.run_until_complete(value) if self.loop is not None and inspect.isawaitable(value) else value

    @contextmanager
    def connection(self) -> Iterator[Any]:
        """One of the application's own pooled connections: a Connection, or an AsyncConnection."""
        conn = self.wait(self.engine.connect())  # an AsyncConnection is started by awaiting it
        try:
            yield conn
        finally:
            self.wait(conn.close())

    def on(self, conn: Any, function: Callable[[Connection], Any]) -> Any:
        """function(sync Connection) on `conn`."""
        return function(conn) if isinstance(conn, Connection) else self.wait(conn.run_sync(function))

    def sql(self, conn: Any, statement: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        result = self.wait(conn.execute(text(statement), params or {}))
        return [tuple(row) for row in result.all()] if result.returns_rows else []

    def settings(self) -> dict[str, Any]:
        """What the application's pooled connections are set to, read on one of them."""
        with self.connection() as conn:
            return dict(self.on(conn, self._settings))

    def _settings(self, conn: Connection) -> dict[str, Any]:
        if self.backend.is_sqlite:
            found = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in SQLITE_SETTINGS}
            found["driver transaction control"] = conn.connection.dbapi_connection.isolation_level  # type: ignore[union-attr]
        else:
            found = {"enable_seqscan": conn.exec_driver_sql("SHOW enable_seqscan").scalar()}
            found["isolation level"] = conn.get_isolation_level()
        conn.rollback()
        return found

    def close(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        finally:
            self.wait(self.engine.dispose())
            if self.loop is not None:
                self.loop.close()


def _apps_own_pragmas(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA cache_size=-4000")
    cursor.close()


@pytest.fixture(params=["sync", "async"])
def either(request: pytest.FixtureRequest, backend: Backend) -> Iterator[App]:
    """An application's engine on `backend` (no store open yet), with a table of the application's own."""
    app = App(backend, request.param)
    try:
        with app.connection() as conn:
            app.sql(conn, app_table(backend))
            app.wait(conn.commit())
        yield app
    finally:
        app.close()


def warm(app: App, connections: int = 3) -> None:
    """Fill the application's pool: `connections` connections made, all idle in the pool."""
    opened = [app.wait(app.engine.connect()) for _ in range(connections)]
    for conn in opened:
        app.on(conn, lambda sync: sync.exec_driver_sql("SELECT 1").all())
    for conn in opened:
        app.wait(conn.close())


def exercise(store: Any, backend: Backend) -> None:
    """Every kind of store call once: writes, reads, a tail poll, a delete, a prune (whose deletes take the links
    with them: the store turns foreign keys on for it)."""
    traces = [make_trace(session_uids=["s", "t"], created_at=T0 + i) for i in range(5)]
    store.store(traces[0])
    store.store_batch(traces[1:])
    assert store.get(traces[0].id) == traces[0]
    assert [t.id for t in store.get_by_session_uid("s", since=T0, limit=3)] == [t.id for t in traces[::-1][:3]]
    assert len(store.query(session_uid="t", namespace="web")) == 5
    assert len(store.page_by_session_uid("s", limit=2).items) == 2
    assert len(store.get_by_session_uids(["s", "t"], limit=10)) == 5
    assert len(next(store.tail("s", since=T0, poll_interval=0))) == 5
    assert store.delete(traces[0].id)
    assert store.prune(T0 + 3).deleted == 2
    assert backend.rows("SELECT count(*) FROM trace_sessions") == [(4,)]


def app_statements(app: App) -> Callable[[], list[str]]:
    """Record the statements the application's own connections send (not the store's, which come from views)."""
    seen: list[str] = []

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if conn.engine is app.sync_engine:
            seen.append(" ".join(statement.split()))

    event.listen(app.sync_engine, "before_cursor_execute", record)
    return lambda: list(seen)


def apps_own_transaction(app: App, body: str) -> None:
    with app.connection() as conn:
        app.sql(conn, "INSERT INTO app_notes (body) VALUES (:body)", {"body": body})
        app.wait(conn.commit())


# -- the application's Engine stays the application's -----------------------------------------------------------
def test_the_apps_connections_keep_their_settings_and_the_pool_its_connections(either: App) -> None:
    app = either
    warm(app)
    before, pool, made = app.settings(), app.sync_engine.pool, list(app.created)
    store = app.open_store()
    exercise(store, app.backend)
    store.close()
    assert app.settings() == before
    # Not disposed: the same pool, and the same three connections serve everything (none made, none closed).
    assert app.sync_engine.pool is pool
    assert app.created == made and len(made) == 3 and app.closed == 0
    if app.backend.is_sqlite:
        assert before["foreign_keys"] == 0 and before["busy_timeout"] == 100 and before["cache_size"] == -4000


def test_the_apps_own_transactions_carry_nothing_of_the_stores(either: App) -> None:
    app = either
    recorded = app_statements(app)
    apps_own_transaction(app, "before")
    reference = recorded()
    exercise(app.open_store(), app.backend)
    after_store = len(recorded())
    apps_own_transaction(app, "after")
    assert recorded()[after_store:] == reference
    assert len(reference) == 1 and reference[0].startswith("INSERT INTO app_notes"), reference


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_the_store_switches_an_apps_sqlite_file_to_wal(backend: Backend, db_path: Path, kind: str) -> None:
    """WAL is a property of the file, which the store's concurrency rests on: it is switched when the store opens
    it (docs/using.md says so), and stays."""
    app = App(backend, kind)
    try:
        with app.connection() as conn:
            assert app.sql(conn, "PRAGMA journal_mode") == [("delete",)]
        app.open_store()
        with app.connection() as conn:
            assert app.sql(conn, "PRAGMA journal_mode") == [("wal",)]
    finally:
        app.close()


def test_writers_queue_on_the_lock_of_an_apps_engine(backend: Backend) -> None:
    """Threads writing through a store on an application's engine whose busy timeout is 100 ms: each write waits
    for the lock (the store's busy_timeout for its length, BEGIN IMMEDIATE), none needs a retry (the deadline is
    0: one busy error would fail), and every batch is stored whole."""
    app = App(backend, "sync", pool_size=4)
    try:
        store = app.open_store(retry_deadline=0)
        errors: list[BaseException] = []

        def writer(k: int) -> None:
            try:
                for i in range(15):
                    store.store_batch(make_trace(id=f"{k}-{i}-{j}", session_uids=[f"w{k}"]) for j in range(20))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert [len(store.get_by_session_uid(f"w{k}")) for k in range(4)] == [300] * 4
        if backend.is_sqlite:
            assert app.settings()["busy_timeout"] == 100
    finally:
        app.close()


async def test_async_writers_queue_on_the_lock_of_an_apps_engine(backend: Backend) -> None:
    engine = create_async_engine(backend.async_url, **({"connect_args": {"timeout": 0.1}} if backend.is_sqlite else {}))
    try:
        async with AsyncTraceStore(engine, retry_deadline=0) as store:

            async def writer(k: int) -> None:
                for i in range(10):
                    await store.store_batch(make_trace(id=f"{k}-{i}-{j}", session_uids=[f"w{k}"]) for j in range(20))

            await asyncio.gather(*(writer(k) for k in range(4)))
            assert [len(await store.get_by_session_uid(f"w{k}")) for k in range(4)] == [200] * 4
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_writes_on_an_apps_autocommit_engine_are_one_transaction(backend: Backend, kind: str) -> None:
    """An Engine set to autocommit would make each statement of a batch its own transaction: the store's
    writes run in one transaction all the same (the application's connections stay in autocommit)."""
    app = App(backend, kind, isolation_level="AUTOCOMMIT")
    inside: list[tuple[str, bool]] = []

    @event.listens_for(app.sync_engine, "before_cursor_execute")
    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT"):
            inside.append((statement.split()[2], _in_transaction(conn)))

    try:
        store = app.open_store()
        inside.clear()  # the migrations' statements
        store.store_batch([make_trace(session_uids=["s"], created_at=T0)])
        assert inside == [("traces", True), ("trace_sessions", True)]
        with app.connection() as conn:  # the driver's autocommit is back (SQLAlchemy's reset on return)
            assert app.on(conn, lambda sync: _autocommits(sync))
    finally:
        app.close()


def _autocommits(conn: Connection) -> bool:
    dbapi: Any = conn.connection.dbapi_connection
    return dbapi.isolation_level is None if conn.dialect.name == "sqlite" else bool(dbapi.autocommit)


def _in_transaction(conn: Connection) -> bool:
    if conn.dialect.name == "sqlite":
        return bool(conn.connection.driver_connection.in_transaction)  # type: ignore[union-attr]
    return not conn.connection.dbapi_connection.autocommit  # type: ignore[union-attr]


# -- writes inside the application's transaction (`connection=`) -------------------------------------------------
def test_writes_in_the_apps_transaction_commit_and_roll_back_with_it(either: App) -> None:
    app = either
    store = app.open_store()
    kept, gone = make_trace(session_uids=["s"], created_at=T0), make_trace(session_uids=["s"], created_at=T0 + 1)
    for trace, end in ((gone, "rollback"), (kept, "commit")):
        with app.connection() as conn:
            app.sql(conn, "INSERT INTO app_notes (body) VALUES (:body)", {"body": trace.id})
            assert store.store(trace, connection=conn) == trace.id
            assert app.sql(conn, "SELECT count(*) FROM trace_sessions WHERE trace_id = :id", {"id": trace.id}) == [(1,)]
            app.wait(getattr(conn, end)())
    assert store.get_by_session_uid("s") == [kept]
    with app.connection() as conn:
        assert app.sql(conn, "SELECT body FROM app_notes") == [(kept.id,)]
        store.store_batch([make_trace(id=kept.id, session_uids=["s2"], created_at=T0)], connection=conn)
        assert store.delete(gone.id, connection=conn) is False
        app.wait(conn.commit())
    assert [t.session_uids for t in store.get_by_session_uid("s")] == [("s", "s2")]


def test_delete_in_the_apps_transaction_takes_the_links_with_foreign_keys_off(either: App) -> None:
    """The application's SQLite connections run with foreign keys off, so ON DELETE CASCADE would not happen:
    delete removes the links itself."""
    app = either
    store = app.open_store()
    trace = make_trace(session_uids=["s", "t"], created_at=T0)
    store.store(trace)
    with app.connection() as conn:
        if app.backend.is_sqlite:
            assert app.sql(conn, "PRAGMA foreign_keys") == [(0,)]
        assert store.delete(trace.id, connection=conn) is True
        app.wait(conn.commit())
    assert app.backend.rows("SELECT count(*) FROM trace_sessions") == [(0,)]


def test_a_write_in_the_apps_transaction_leaves_its_settings_to_it(either: App) -> None:
    """PostgreSQL: the store's write sets enable_seqscan=off for its transaction (SET LOCAL); inside the
    application's transaction, which goes on, the application's value is put back. SQLite: nothing to put back."""
    app = either
    store = app.open_store()
    with app.connection() as conn:
        app.sql(conn, "SELECT 1")  # the application's transaction has begun
        before = app.on(conn, functools.partial(_peek, app))
        store.store_batch([make_trace(session_uids=["s"], created_at=T0)], connection=conn)
        after = app.on(conn, functools.partial(_peek, app))
        app.wait(conn.commit())
    assert after == before
    assert len(store.get_by_session_uid("s")) == 1


def _peek(app: App, conn: Connection) -> dict[str, Any]:
    """The settings as seen inside the current transaction (not ending it)."""
    if app.backend.is_sqlite:
        return {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar() for name in ("foreign_keys", "busy_timeout")}
    return {"enable_seqscan": conn.exec_driver_sql("SHOW enable_seqscan").scalar()}


def test_the_connection_argument_is_checked(either: App) -> None:
    app = either
    store = app.open_store()
    trace = make_trace(session_uids=["s"])
    with pytest.raises(TypeError, match="connection= takes a SQLAlchemy"):
        store.store(trace, connection=app.engine)
    with app.connection() as conn:
        wrong = conn.sync_connection if isinstance(conn, AsyncConnection) else None
    with pytest.raises(StorageError, match="closed"):
        store.store_batch([trace], connection=conn)
    if wrong is not None:  # the async store takes an AsyncConnection, not its sync twin
        with pytest.raises(TypeError, match="AsyncConnection"):
            store.delete(trace.id, connection=wrong)
    if not app.backend.is_sqlite:  # a connection to another kind of database (SQLite in memory is at hand)
        foreign_engine = (
            sqlalchemy.create_engine("sqlite://") if app.kind == "sync" else create_async_engine("sqlite+aiosqlite://")
        )
        foreign = app.wait(foreign_engine.connect())
        with pytest.raises(StorageError, match="a sqlite connection, the store's database is postgresql"):
            store.store(trace, connection=foreign)
        app.wait(foreign.close())
        app.wait(foreign_engine.dispose())
    assert store.get(trace.id) is None


# -- the connection migrations run on --------------------------------------------------------------------------
def test_tracestore_connection_makes_ddl_transactional_and_hands_the_connection_back(backend: Backend) -> None:
    """On an application's SQLite engine, pysqlite would run DDL outside any transaction (it begins only before
    DML); tracestore_connection BEGINs every transaction itself, so a failed step leaves nothing behind, and puts
    the connection back as it was."""
    app = App(backend, "sync", pool_size=1)
    try:
        before = app.settings()
        with tracestore_connection(app.engine) as conn:
            with pytest.raises(RuntimeError), conn.begin():
                conn.exec_driver_sql("CREATE TABLE half_done (a INTEGER)")
                raise RuntimeError("a migration step failed")
            conn.execution_options(**{WRITE: True})
            with conn.begin():
                conn.exec_driver_sql("CREATE TABLE done (a INTEGER)")
        tables = {name for (name,) in _tables(backend)}
        assert "half_done" not in tables and "done" in tables
        assert app.settings() == before
    finally:
        app.close()


def _tables(backend: Backend) -> list[tuple[str]]:
    if backend.is_sqlite:
        return [tuple(row) for row in backend.rows("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return [tuple(row) for row in backend.rows("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]


def test_an_app_on_sqlalchemys_pysqlite_recipe_keeps_its_begin_and_the_store_works(
    backend: Backend, db_path: Path
) -> None:
    """SQLAlchemy's recipe for pysqlite: transaction control taken from the driver at connect, BEGIN sent by the
    application's own begin hook. The store's migrations (transactional) and writes work with it, and the
    application's BEGIN stays its own (the migration's BEGIN IMMEDIATE replaces it only on tracestore's views)."""
    app = App(backend, "sync")
    begun: list[str] = []

    @event.listens_for(app.engine, "connect")
    def no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(app.engine, "begin")
    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    @event.listens_for(app.engine, "before_cursor_execute")
    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("BEGIN"):
            begun.append(statement if conn.engine is app.engine else f"store: {statement}")

    try:
        with app.engine.begin() as conn:
            conn.exec_driver_sql(app_table(backend))
        exercise(app.open_store(), app.backend)
        apps_own_transaction(app, "mine")
        assert begun[-1] == "BEGIN"  # the application's own transaction: its own BEGIN
        assert "store: BEGIN IMMEDIATE" in begun  # the migrations' transactions
        assert backend.rows("SELECT body FROM app_notes") == [("mine",)]
        assert app.settings()["driver transaction control"] is None
    finally:
        app.close()


def test_an_app_table_is_created_before_the_store_opens(either: App) -> None:
    """The application's tables and the store's live side by side in one database (the usual PostgreSQL case)."""
    app = either
    app.open_store().store(make_trace(session_uids=["s"], created_at=T0))
    tables = {name for (name,) in _tables(app.backend)}
    assert {"app_notes", "traces", "trace_sessions"} <= tables


def test_a_store_on_an_apps_engine_of_the_wrong_kind_is_refused(backend: Backend) -> None:
    engine = create_async_engine(backend.async_url)
    with pytest.raises(StorageError, match="expected a database URL \\(str\\) or an Engine, got AsyncEngine"):
        TraceStore(engine)  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="or an AsyncEngine, got Engine"):
        AsyncTraceStore(sqlalchemy.create_engine(backend.url))  # type: ignore[arg-type]
    asyncio.run(engine.dispose())


# -- cancelled writes on an application's AsyncEngine ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["statement", "commit"])
async def test_a_write_cancelled_on_an_apps_engine_is_whole_and_puts_the_settings_back(
    backend: Backend, kind: str
) -> None:
    """Cancelled as each statement (or COMMIT) of a store_batch and of a prune is sent, the pragmas set on the
    application's connections included: whole batches only, nothing left open, and every pooled connection has the
    application's settings back (aiosqlite runs a statement to its end even when the task stopped waiting)."""
    engine = create_async_engine(backend.async_url, **({"connect_args": {"timeout": 0.1}} if backend.is_sqlite else {}))
    try:
        async with AsyncTraceStore(engine) as store:

            async def nothing(i: int) -> None:
                pass

            async def old_traces(i: int) -> None:
                await store.prune(CUTOFF, batch_size=PRUNE_BATCH)
                await store.store_batch(batch_of(f"p{i}", size=PRUNED, created_at=T0))

            async def check_settings(i: int, landing: Landing) -> None:
                if backend.is_sqlite:
                    assert await busy_timeouts(store) == {100}, f"a pooled connection kept the store's ({landing})"
                    assert await foreign_keys(store) == {0}, f"a pooled connection kept the prune's ({landing})"

            async def check_batch_and_settings(i: int, landing: Landing) -> None:
                await check_batch(backend, f"s{i}", landing)
                await check_settings(i, landing)

            store_batch = lambda i: store.store_batch(batch_of(f"s{i}"))  # noqa: E731
            await sweep_statements(store, nothing, store_batch, check_batch_and_settings, kind)
            prune = lambda i: store.prune(CUTOFF, batch_size=PRUNE_BATCH)  # noqa: E731
            await sweep_statements(store, old_traces, prune, check_settings, kind)
            await assert_usable(store)
    finally:
        await engine.dispose()


async def foreign_keys(store: AsyncTraceStore) -> set[int]:
    """PRAGMA foreign_keys of every connection in the pool."""
    pool: Any = store.engine.sync_engine.pool
    connections = [await store.engine.connect() for _ in range(pool.checkedin())]
    try:
        return {(await c.exec_driver_sql("PRAGMA foreign_keys")).scalar_one() for c in connections}
    finally:
        for connection in connections:
            await connection.close()
