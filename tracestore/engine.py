"""How connections are made: engine creation from a URL, tracestore's setup on an Engine, and URLs shown
safely in messages. What SQLite connections get (pragmas, the transaction recipe, file diagnostics) is in
tracestore.dialects.sqlite_connect; the in-memory database's shared connection in .sqlite_memory."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from tracestore.dialects import sqlite_connect
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
    """Install tracestore's connection setup on an Engine (idempotent); non-SQLite engines are left alone."""
    if not isinstance(engine, Engine):
        raise StorageError(f"expected a database URL (str) or an Engine, got {type(engine).__name__}")
    if engine.dialect.name != "sqlite" or getattr(engine, _CONFIGURED, False):
        return engine
    sqlite_connect.install(engine)
    setattr(engine, _CONFIGURED, True)
    # Connections pooled before the listeners existed lack the pragmas: start a fresh pool.
    engine.dispose(close=False)
    return engine


def configure_async_engine(engine: AsyncEngine) -> AsyncEngine:
    if not isinstance(engine, AsyncEngine):
        raise StorageError(f"expected a database URL (str) or an AsyncEngine, got {type(engine).__name__}")
    configure_engine(engine.sync_engine)
    if engine.dialect.name == "sqlite":
        sqlite_connect.install_async(engine.sync_engine)
    return engine


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
