"""Shared fixtures: temporary databases, upgraded stores (sync and async), PostgreSQL databases."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine, make_url

from tracestore import AsyncTraceStore, TraceStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "traces.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def store(db_url: str) -> Iterator[TraceStore]:
    with TraceStore(db_url) as trace_store:
        yield trace_store


@pytest.fixture
async def async_store(db_path: Path) -> AsyncIterator[AsyncTraceStore]:
    async with AsyncTraceStore(f"sqlite+aiosqlite:///{db_path}") as trace_store:
        yield trace_store


# -- PostgreSQL --------------------------------------------------------------------------------------------
PG_URL_VARIABLE = "TRACESTORE_PG_URL"


@pytest.fixture(scope="session")
def pg_server_url() -> URL:
    """The PostgreSQL server the tests may use (`make test` starts a throwaway one: scripts/with-postgres)."""
    value = os.environ.get(PG_URL_VARIABLE)
    if not value:
        pytest.skip(
            f"PostgreSQL tests need {PG_URL_VARIABLE} (run `make test`, which starts a throwaway cluster when "
            "PostgreSQL's server binaries are installed: apt-get install postgresql)"
        )
    return make_url(value)


@pytest.fixture
def pg_url(pg_server_url: URL) -> Iterator[URL]:
    """A fresh, empty database on that server (psycopg driver), dropped after the test."""
    name = f"tracestore_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        yield pg_server_url.set(drivername="postgresql+psycopg", database=name)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def pg_async_url(pg_url: URL) -> URL:
    """The same database through asyncpg."""
    return pg_url.set(drivername="postgresql+asyncpg")
