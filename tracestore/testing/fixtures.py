"""pytest plugin: temporary, upgraded trace databases for the tests of applications that use tracestore.

Enable it in a conftest.py (or a test module) with `pytest_plugins = ["tracestore.testing.fixtures"]`.
Every fixture is function-scoped and works on its own SQLite file under `tmp_path`:

- `tracestore_url`: the file's URL (sqlite:///...); override it to test against another database.
- `trace_store`: a TraceStore on it, upgraded to head, closed after the test.
- `async_trace_store`: the same as an AsyncTraceStore (sqlite+aiosqlite); an async fixture for
  pytest-asyncio, in auto or strict mode.
- `trace_db_session`: an ORM Session on the upgraded database, inside a transaction that is rolled
  back after the test; the model factories (TraceFactory, TraceSessionFactory) are bound to it.
  It holds SQLite's write lock once it has written, so write through either it or `trace_store`
  in one test, not both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from tracestore.async_store import AsyncTraceStore
from tracestore.store import TraceStore


@pytest.fixture
def tracestore_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tracestore.db'}"


@pytest.fixture
def trace_store(tracestore_url: str) -> Iterator[TraceStore]:
    with TraceStore(tracestore_url) as store:
        yield store


@pytest_asyncio.fixture
async def async_trace_store(tracestore_url: str) -> AsyncIterator[AsyncTraceStore]:
    async with AsyncTraceStore(_async_url(tracestore_url)) as store:
        yield store


@pytest.fixture
def trace_db_session(trace_store: TraceStore) -> Iterator[Session]:
    connection = trace_store.engine.connect()
    transaction = connection.begin()
    # session.commit() in the test releases a SAVEPOINT only; the outer transaction is rolled back below.
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    restore = _bind_factories(session)
    try:
        yield session
    finally:
        restore()
        session.close()
        transaction.rollback()
        connection.close()


def _async_url(url: str) -> str:
    parsed = make_url(url)
    if parsed.drivername == "sqlite":
        return parsed.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    return url


def _bind_factories(session: Session) -> Callable[[], None]:
    """Bind the model factories to `session` if factory-boy is installed; returns the undo."""
    try:
        from tracestore.testing.factories import bind_session
    except ImportError:
        return lambda: None
    previous = bind_session(session)

    def restore() -> None:
        bind_session(previous)

    return restore
