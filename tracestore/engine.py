"""How connections are made: engine creation, SQLite pragmas and the transaction recipe."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

from tracestore.errors import StorageError

# Pragmas run on every new SQLite connection, each with the reason it is there.
SQLITE_PRAGMAS: tuple[tuple[str, str], ...] = (
    # Wait for a competing writer instead of failing at once with "database is locked".
    ("busy_timeout", "5000"),
    # The legacy ON DELETE CASCADE never ran because this was off; deletes must take their links along.
    ("foreign_keys", "ON"),
    # Readers never block the writer and vice versa; persistent in the file once set.
    ("journal_mode", "WAL"),
    # In WAL mode NORMAL is durable against application crashes and much cheaper than FULL.
    ("synchronous", "NORMAL"),
    # 64 MiB of page cache keeps the hot part of idx_trace_sessions_uid_time and the traces PK in memory.
    ("cache_size", "-65536"),
)

_CONFIGURED = "_tracestore_configured"

# Execution options the store sets on its engine views (see _on_begin).
WRITE = "tracestore_write"
SINGLE_STATEMENT_READ = "tracestore_single_statement_read"


def read_options(dialect_name: str) -> dict[str, Any]:
    """Execution options of the stores' read views: every read is one SELECT, one snapshot on its own.

    SQLite: skip BEGIN (see _on_begin). PostgreSQL: autocommit, so a read is one round trip instead of
    BEGIN, SELECT, and the pool's ROLLBACK on return; and psycopg drops its prepared statements on every
    ROLLBACK, so each read was also planned again (latest-100 at 1M traces: 2.4x raw psycopg before).
    """
    if dialect_name == "sqlite":
        return {SINGLE_STATEMENT_READ: True}
    return {"isolation_level": "AUTOCOMMIT"}


def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Take transaction control away from the driver: pysqlite/aiosqlite never BEGIN before a SELECT,
    # so without this a multi-statement read sees several snapshots (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for name, value in SQLITE_PRAGMAS:
            cursor.execute(f"PRAGMA {name}={value}")
    finally:
        cursor.close()


def _on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    # SQLAlchemy resets a connection's isolation level when it comes back from an AUTOCOMMIT block
    # (Alembic's autocommit_block in the backfill, verify --fix), and pysqlite's reset hands
    # transaction control back to the driver: take it again before anyone uses the connection.
    if dbapi_connection.isolation_level is not None:
        dbapi_connection.isolation_level = None


def _on_begin(conn: Any) -> None:
    options = conn.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return  # e.g. Alembic's autocommit_block: the caller manages transactions itself
    if options.get(SINGLE_STATEMENT_READ):
        # One SELECT is one snapshot in SQLite already (its implicit read transaction lasts until the
        # statement is reset), so the store's single-statement reads skip BEGIN: on aiosqlite every
        # statement costs thread round trips, and this saves a third of a latest-100 read.
        return
    # Writers take the write lock up front: a deferred transaction that later upgrades to a write
    # fails with SQLITE_BUSY at once in WAL mode instead of waiting for busy_timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN")


def configure_engine(engine: Engine) -> Engine:
    """Install tracestore's connection setup on an Engine (idempotent); non-SQLite engines are left alone."""
    if not isinstance(engine, Engine):
        raise StorageError(f"expected a database URL (str) or an Engine, got {type(engine).__name__}")
    if engine.dialect.name != "sqlite" or getattr(engine, _CONFIGURED, False):
        return engine
    event.listen(engine, "connect", _on_connect)
    event.listen(engine, "checkout", _on_checkout)
    event.listen(engine, "begin", _on_begin)
    setattr(engine, _CONFIGURED, True)
    # Connections pooled before the listeners existed lack the pragmas: start a fresh pool.
    engine.dispose(close=False)
    return engine


def configure_async_engine(engine: AsyncEngine) -> AsyncEngine:
    if not isinstance(engine, AsyncEngine):
        raise StorageError(f"expected a database URL (str) or an AsyncEngine, got {type(engine).__name__}")
    configure_engine(engine.sync_engine)
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


def printable(text: str) -> str:
    """`text` without lone surrogates, which stdout cannot encode: a path or argument from undecodable bytes
    (Python maps them to surrogates) shows its bytes as \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_url(url: str, *, want_async: bool) -> None:
    if "\x00" in url:  # no driver or file system takes it; sqlite3 would raise a bare ValueError
        raise StorageError(f"not a usable database URL: {shown(url)!r} contains NUL")
    try:
        parsed = make_url(url)
        is_async = parsed.get_dialect().is_async
    except Exception as exc:  # ArgumentError for malformed URLs, NoSuchModuleError for unknown dialects
        raise StorageError(f"not a usable database URL: {shown(url)!r} ({exc})") from exc
    if is_async != want_async:
        kind = "an async driver (e.g. sqlite+aiosqlite://)" if want_async else "a sync driver (e.g. sqlite://)"
        raise StorageError(f"{shown(url)!r} needs {kind} here")


def create_engine(url: str, **kwargs: Any) -> Engine:
    """A sync Engine for `url` with tracestore's connection setup."""
    _check_url(url, want_async=False)
    try:
        return configure_engine(sa_create_engine(url, **kwargs))
    except ImportError as exc:
        raise StorageError(f"the driver for {shown(url)!r} is not installed: {exc}") from exc


def create_async_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for `url` (e.g. sqlite+aiosqlite:///traces.db) with tracestore's connection setup."""
    _check_url(url, want_async=True)
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
