"""How connections are made and used: engines created from a URL (the store's own, set up at connect), how a
store uses an Engine an application passes in (views, per-operation settings; never a change to the
application's own connections), a connection set up for migrations on any Engine, and URLs shown safely in
messages. What the store's own SQLite connections get (pragmas, the transaction recipe, file diagnostics) is in
tracestore.dialects.sqlite_connect; what it sets on an application's, in .sqlite_borrow; the in-memory
database's shared connection in .sqlite_memory."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from tracestore.dialects import rules_for, sqlite_borrow, sqlite_connect
from tracestore.dialects.sqlite_connect import (  # re-exported: the stores and the CLI use them from here
    SINGLE_STATEMENT_READ as SINGLE_STATEMENT_READ,
)
from tracestore.dialects.sqlite_connect import WRITE as WRITE
from tracestore.dialects.sqlite_connect import database_path as database_path
from tracestore.dialects.sqlite_connect import printable as printable
from tracestore.dialects.sqlite_connect import why_not_a_database as why_not_a_database
from tracestore.dialects.sqlite_memory import AsyncSharedConnectionPool, SharedConnectionPool, in_memory
from tracestore.errors import StorageError

_CONFIGURED = "_tracestore_configured"
log = logging.getLogger("tracestore.engine")


def read_options(dialect_name: str) -> dict[str, Any]:
    """Execution options of the stores' read views: every read is one SELECT, one snapshot on its own.

    SQLite: skip BEGIN (see _on_begin). PostgreSQL: autocommit, so a read is one round trip instead of
    BEGIN, SELECT, and the pool's ROLLBACK on return; and psycopg drops its prepared statements on every
    ROLLBACK, so each read would also be planned again.
    """
    if dialect_name == "sqlite":
        return {SINGLE_STATEMENT_READ: True}
    return {"isolation_level": "AUTOCOMMIT"}


def configure_engine(engine: Engine) -> Engine:
    """Install tracestore's connection setup on an Engine it owns (idempotent): listeners on the Engine and its
    pool that set up every SQLite connection; non-SQLite engines are left alone. The stores never call it on
    an Engine an application passes in (see StoreEngine)."""
    _check_engine(engine, Engine)
    if engine.dialect.name != "sqlite" or getattr(engine, _CONFIGURED, False):
        return engine
    sqlite_connect.install(engine)
    setattr(engine, _CONFIGURED, True)
    # Connections pooled before the listeners existed lack the pragmas: start a fresh pool.
    engine.dispose(close=False)
    return engine


def configure_async_engine(engine: AsyncEngine) -> AsyncEngine:
    """configure_engine for an AsyncEngine the store owns; aiosqlite's cancelled statements closed properly too."""
    _check_engine(engine, AsyncEngine)
    configure_engine(engine.sync_engine)
    if engine.dialect.name == "sqlite":
        sqlite_connect.install_async(engine.sync_engine)
    return engine


def is_configured(engine: Engine) -> bool:
    """Whether an Engine has tracestore's own connection setup (configure_engine): its connections need nothing
    set per operation. A non-SQLite Engine needs none anyway."""
    return engine.dialect.name != "sqlite" or bool(getattr(engine, _CONFIGURED, False))


def _check_engine(engine: object, kind: type[Engine] | type[AsyncEngine]) -> None:
    if not isinstance(engine, kind):
        raise StorageError(f"expected a database URL (str) or an {kind.__name__}, got {type(engine).__name__}")


def check_connection(connection: object, kind: type[Connection] | type[AsyncConnection], dialect_name: str) -> None:
    """Refuse a `connection=` argument a store cannot write through: TypeError for another kind of object,
    StorageError for a closed connection or one to another kind of database."""
    if not isinstance(connection, kind):
        raise TypeError(
            f"connection= takes a SQLAlchemy {kind.__name__} (TraceStore: Connection, AsyncTraceStore: "
            f"AsyncConnection), got {type(connection).__name__}"
        )
    started = connection if isinstance(connection, Connection) else connection.sync_connection
    if started is None or started.closed:
        raise StorageError("connection= is closed (or an AsyncConnection not started)")
    if started.dialect.name != dialect_name:
        raise StorageError(
            f"connection= is a {started.dialect.name} connection, the store's database is {dialect_name}"
        )


def write_options(engine: Engine) -> dict[str, Any]:
    """Execution options of the stores' write views: the WRITE mark (BEGIN IMMEDIATE on SQLite) and, on an
    Engine set to autocommit, a transactional isolation level, else a batch would not be all or nothing."""
    options: dict[str, Any] = {WRITE: True}
    # create_engine(isolation_level=...) is kept on the dialect; Engine.execution_options(...) in its options.
    level = engine.get_execution_options().get(
        "isolation_level", getattr(engine.dialect, "_on_connect_isolation_level", None)
    )
    if level == "AUTOCOMMIT":
        options["isolation_level"] = rules_for(engine.dialect.name).write_isolation_level
    return options


# -- how a store uses an Engine --------------------------------------------------------------------------------
class StoreEngine:
    """How a store uses one Engine: a view for its writes and one for its reads, which share the Engine's pool
    and its listeners (an application's instrumentation sees the store's statements), and what a write sets on
    a connection for its length.

    An Engine tracestore set up (configure_engine) has its own hooks; on an application's SQLite Engine the
    store registers nothing anywhere: each write transaction sets busy_timeout (and, for `foreign_keys`,
    foreign key enforcement) before it begins, sends BEGIN IMMEDIATE unless an application's begin hook has
    begun already, and puts the settings back after COMMIT or ROLLBACK (sqlite_borrow).
    """

    def __init__(self, engine: Engine) -> None:
        _check_engine(engine, Engine)
        self.engine = engine
        self.borrowed = not is_configured(engine)
        # Writers queue on the lock (BEGIN IMMEDIATE); reads are single statements (see read_options).
        self.write = engine.execution_options(**write_options(engine))
        self.read = engine.execution_options(**read_options(engine.dialect.name))

    @contextmanager
    def transaction(self, *, foreign_keys: bool = False) -> Iterator[Connection]:
        """A connection inside one write transaction, committed when the block ends (rolled back on an error)."""
        if not self.borrowed:
            with self.write.begin() as connection:
                yield connection
            return
        with self.write.connect() as connection:
            try:
                changed = _borrow(connection, foreign_keys)
            except BaseException:
                connection.invalidate()  # its settings are unknown: never pooled as they may be
                raise
            try:
                with connection.begin():
                    _begin_immediate(connection)
                    yield connection
            finally:
                _give_back(connection, changed)


class AsyncStoreEngine:
    """StoreEngine for an AsyncEngine."""

    def __init__(self, engine: AsyncEngine) -> None:
        _check_engine(engine, AsyncEngine)
        self.engine = engine
        self.borrowed = not is_configured(engine.sync_engine)
        if self.borrowed:
            # The one hook added to an application's engine, on its dialect (SQLAlchemy has it nowhere else): a
            # statement cancelled in aiosqlite's thread has its cursor closed, else SQLite keeps the connection's
            # write lock until the cursor is garbage collected. It changes no setting and ignores other errors.
            sqlite_connect.install_async(engine.sync_engine)
        self.write = engine.execution_options(**write_options(engine.sync_engine))
        self.read = engine.execution_options(**read_options(engine.dialect.name))

    @asynccontextmanager
    async def transaction(self, *, foreign_keys: bool = False) -> AsyncIterator[AsyncConnection]:
        """A connection inside one write transaction, committed when the block ends (rolled back on an error)."""
        if not self.borrowed:
            async with self.write.begin() as connection:
                yield connection
            return
        async with self.write.connect() as connection:
            try:
                changed = await connection.run_sync(_borrow, foreign_keys)
            except BaseException:  # a cancel too: aiosqlite's thread may still be setting a pragma
                await connection.invalidate()
                raise
            try:
                async with connection.begin():
                    await connection.run_sync(_begin_immediate)
                    yield connection
            finally:
                await connection.run_sync(_give_back, changed)


def _dbapi(connection: Connection) -> Any:
    return connection.connection.dbapi_connection


def _borrow(connection: Connection, foreign_keys: bool) -> dict[str, int]:
    return sqlite_borrow.borrow(_dbapi(connection), foreign_keys=foreign_keys)


def _begin_immediate(connection: Connection) -> None:
    # pysqlite would begin a deferred transaction by itself at the first INSERT; an application's begin hook
    # may have sent BEGIN already, and then the write's first statement takes the lock the same way.
    if not sqlite_borrow.in_transaction(connection):
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _give_back(connection: Connection, changed: dict[str, int]) -> None:
    """Put back what a write changed on a borrowed connection; if that fails, the connection is discarded
    instead of going back to the application's pool with the store's settings."""
    if not changed or connection.invalidated or connection.closed:
        return
    try:
        if sqlite_borrow.in_transaction(connection):
            raise StorageError("the connection is still inside a transaction")
        sqlite_borrow.give_back(_dbapi(connection), changed)
    except Exception as exc:  # the write's own outcome stands; the connection must not be pooled as it is
        log.warning("discarding a connection whose settings could not be restored (%s): %s", changed, exc)
        connection.invalidate()
    except BaseException:  # cancelled while restoring: as unknown
        connection.invalidate()
        raise


# -- a connection set up for migrations, on any Engine ----------------------------------------------------------
@contextmanager
def tracestore_connection(engine: Engine) -> Iterator[Connection]:
    """A connection of `engine` set up the way tracestore's own connections are, for as long as the block runs.

    For migrations on an application's SQLite Engine: transaction control taken from the driver, every
    transaction begun explicitly (BEGIN IMMEDIATE with the WRITE execution option) so that DDL is
    transactional, busy_timeout, foreign keys on, and the file switched to WAL. Everything but WAL (a property
    of the file) is put back before the connection returns to the pool, or the connection is discarded. An
    Engine tracestore created, or a PostgreSQL one, gives a plain connection.
    """
    _check_engine(engine, Engine)
    if is_configured(engine):
        with engine.connect() as connection:
            yield connection
        return
    view = engine.execution_options()
    sqlite_borrow.install_recipe(view)
    with view.connect() as connection:
        taken = sqlite_borrow.take_over(_dbapi(connection), engine.url)
        try:
            yield connection
        finally:
            _hand_back(connection, taken)


@asynccontextmanager
async def async_tracestore_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """tracestore_connection for an AsyncEngine (run the migration through `connection.run_sync`)."""
    _check_engine(engine, AsyncEngine)
    if is_configured(engine.sync_engine):
        async with engine.connect() as connection:
            yield connection
        return
    view = engine.execution_options()
    sqlite_borrow.install_recipe(view.sync_engine)
    async with view.connect() as connection:
        taken = await connection.run_sync(lambda sync: sqlite_borrow.take_over(_dbapi(sync), engine.url))
        try:
            yield connection
        finally:
            await connection.run_sync(_hand_back, taken)


def _hand_back(connection: Connection, taken: sqlite_borrow.Taken) -> None:
    if connection.invalidated or connection.closed:
        return
    try:
        if connection.in_transaction():
            connection.rollback()
        if sqlite_borrow.in_transaction(connection):
            _dbapi(connection).rollback()
        sqlite_borrow.hand_back(_dbapi(connection), taken)
        if not sqlite_borrow.keeps_driver_control(connection, taken):
            # The pool would hand it back to the application with another transaction control: a fresh
            # connection, made by the application's own connect hooks, replaces it.
            connection.invalidate()
    except Exception as exc:  # as _give_back: never pooled with tracestore's settings
        log.warning("discarding a connection whose settings could not be restored: %s", exc)
        connection.invalidate()
    except BaseException:
        connection.invalidate()
        raise


def shown(url: str | URL) -> str:
    """A URL as error messages show it: the password masked (a malformed URL is shown as text)."""
    try:
        parsed = make_url(url)
    except Exception:  # not parseable: nothing to mask reliably, so say less
        return printable("<malformed URL>" if "@" in str(url) else str(url))
    database = parsed.database
    if database and printable(database) != database:
        # Rendering percent-encodes the path as UTF-8, which lone surrogates are not: show it as printable().
        rendered = parsed.set(database=_PLACEHOLDER).render_as_string(hide_password=True)
        return printable(rendered.replace(_PLACEHOLDER, printable(database), 1))
    return printable(parsed.render_as_string(hide_password=True))


_PLACEHOLDER = "tracestore-database-placeholder"


def _check_url(url: str, *, want_async: bool) -> None:
    if "\x00" in url:  # no driver or file system takes it; sqlite3 would raise a bare ValueError
        raise StorageError(f"not a usable database URL: {shown(url)!r} contains NUL")
    try:
        parsed = make_url(url)
        is_async = parsed.get_dialect().is_async
    except Exception as exc:  # ArgumentError for malformed URLs, NoSuchModuleError for unknown dialects
        suggestion = sqlite_url_for(url, driver="sqlite+aiosqlite" if want_async else "sqlite")
        if suggestion is not None:
            raise StorageError(
                f"not a database URL: {shown(url)!r} looks like a file path: for a SQLite file use "
                f"{printable(suggestion)}"
            ) from exc
        raise StorageError(f"not a usable database URL: {shown(url)!r} ({exc})") from exc
    if is_async != want_async:
        kind = "an async driver (e.g. sqlite+aiosqlite://)" if want_async else "a sync driver (e.g. sqlite://)"
        raise StorageError(f"{shown(url)!r} needs {kind} here")


# File name endings of SQLite databases: such a name given where a URL is expected is a path.
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3", ".db3")


def sqlite_url_for(text: str, *, driver: str = "sqlite") -> str | None:
    """The SQLite URL of `text` when it is a file path given where a URL is expected (traces.db ->
    sqlite:///traces.db, /data/t.db -> sqlite:////data/t.db); None when it does not look like one."""
    if not text or "://" in text or text != text.strip():
        return None
    if not (text.lower().endswith(SQLITE_SUFFIXES) or os.sep in text or os.path.isfile(text)):
        return None
    return f"{driver}:///{text}"


def create_engine(url: str, **kwargs: Any) -> Engine:
    """A sync Engine for `url` with tracestore's connection setup.

    An in-memory SQLite database (sqlite://) gets one connection that every thread shares, one thread at a
    time (see SharedConnectionPool), unless `poolclass` or `pool` says otherwise.
    """
    _check_url(url, want_async=False)
    if in_memory(make_url(url)) and not {"poolclass", "pool"} & kwargs.keys():
        # sqlite3 refuses a connection made in another thread unless told; the pool lends it to one at a time.
        connect_args = {"check_same_thread": False, **kwargs.pop("connect_args", {})}
        kwargs |= {"poolclass": SharedConnectionPool, "connect_args": connect_args}
    try:
        return configure_engine(sa_create_engine(url, **kwargs))
    except ImportError as exc:
        raise StorageError(f"the driver for {shown(url)!r} is not installed: {exc}") from exc


def create_async_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for `url` (e.g. sqlite+aiosqlite:///traces.db) with tracestore's connection setup.

    An in-memory SQLite database gets one connection shared by every task and thread, one at a time
    (AsyncSharedConnectionPool), unless `poolclass` or `pool` says otherwise.
    """
    _check_url(url, want_async=True)
    if in_memory(make_url(url)) and not {"poolclass", "pool"} & kwargs.keys():
        kwargs["poolclass"] = AsyncSharedConnectionPool
    try:
        return configure_async_engine(sa_create_async_engine(url, **kwargs))
    except ImportError as exc:
        raise StorageError(f"the driver for {shown(url)!r} is not installed: {exc}") from exc


def sync_url(url: str) -> str:
    """The sync-driver twin of a URL (migrations and checks run sync even for async stores)."""
    parsed = make_url(url)
    driver = {"sqlite+aiosqlite": "sqlite", "postgresql+asyncpg": "postgresql+psycopg"}.get(parsed.drivername)
    return parsed.set(drivername=driver).render_as_string(hide_password=False) if driver else url


def missing_sqlite_file(url: URL) -> str | None:
    """The path of a SQLite file URL whose file does not exist yet (connecting would create it), else None."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:") or url.database.startswith("file:"):
        return None
    return None if os.path.exists(url.database) else url.database
