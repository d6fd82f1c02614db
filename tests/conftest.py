"""Shared fixtures: a database on each engine (`backend`), stores on it (sync and async), PostgreSQL databases.

A test that takes `backend`, `store` or `async_store` runs twice, on SQLite and on PostgreSQL
(`[sqlite]` / `[postgresql]` in its id); one that takes `db_path` is about SQLite files and runs
once. The summary line counts the results per engine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import URL, create_engine, make_url

from tests.backends import NAMES, Backend
from tests.wheel import Installed, build_and_install
from tracestore import AsyncTraceStore, TraceStore
from tracestore.migrate import upgrade

SQLITE_ONLY_FIXTURES = {"db_path", "db_url"}
STORE_FIXTURES = {"store", "async_store", "either"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and not SQLITE_ONLY_FIXTURES & set(metafunc.fixturenames):
        metafunc.parametrize("backend", NAMES, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """An empty database: a SQLite file, or a PostgreSQL database of its own (see `pg_url`), copied from
    one already at head when the test opens a store on it (the store would migrate it first anyway)."""
    name = getattr(request, "param", "sqlite")
    if name == "sqlite":
        path = tmp_path / "traces.db"
        chosen = Backend(name, make_url(f"sqlite:///{path}"), path)
        yield from _yield_disposed(chosen)
    elif STORE_FIXTURES & set(request.fixturenames):  # the store would migrate it first: start from head
        template = request.getfixturevalue("pg_head_template")
        with _pg_database(request.getfixturevalue("pg_server_url"), template) as url:
            yield from _yield_disposed(Backend(name, url))
    else:
        yield from _yield_disposed(Backend(name, request.getfixturevalue("pg_url")))


def _yield_disposed(backend: Backend) -> Iterator[Backend]:
    try:
        yield backend
    finally:
        backend.dispose()


@pytest.fixture
def db_path(backend: Backend) -> Path:
    assert backend.path is not None
    return backend.path


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def store(backend: Backend) -> Iterator[TraceStore]:
    with TraceStore(backend.url) as trace_store:
        yield trace_store


@pytest.fixture
async def async_store(backend: Backend) -> AsyncIterator[AsyncTraceStore]:
    async with AsyncTraceStore(backend.async_url) as trace_store:
        yield trace_store


def _engine_of(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "backend" in callspec.params:
        return str(callspec.params["backend"])
    return (
        "postgresql"
        if "pg_url" in getattr(item, "fixturenames", ()) or "pg_server_url" in getattr(item, "fixturenames", ())
        else "sqlite"
    )


_outcomes: dict[str, dict[str, int]] = {name: {} for name in NAMES}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        engine = (report.user_properties and dict(report.user_properties).get("engine")) or "sqlite"
        counts = _outcomes[str(engine)]
        counts[report.outcome] = counts.get(report.outcome, 0) + 1


def pytest_runtest_setup(item: pytest.Item) -> None:
    item.user_properties.append(("engine", _engine_of(item)))


_not_run: dict[str, int] = {}
ENABLE_POSTGRESQL = (
    "set TRACESTORE_PG_URL to a server, or run `make test`, which starts a throwaway cluster when PostgreSQL's"
    " server binaries are installed (apt-get install postgresql)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without a PostgreSQL server, leave its tests out and say so once (not one SKIPPED line per test)."""
    if os.environ.get(PG_URL_VARIABLE):
        return
    postgresql = [item for item in items if _engine_of(item) == "postgresql"]
    if postgresql:
        left_out = set(postgresql)
        items[:] = [item for item in items if item not in left_out]
        config.hook.pytest_deselected(items=postgresql)
        _not_run["postgresql"] = len(postgresql)


def pytest_terminal_summary(terminalreporter: object) -> None:
    write_line = terminalreporter.write_line  # type: ignore[attr-defined]
    for name in NAMES:
        counts = _outcomes[name]
        summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items())) or "no tests"
        if name in _not_run:
            summary = f"{_not_run[name]} tests not run: {ENABLE_POSTGRESQL}"
        write_line(f"tracestore on {name}: {summary}")


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


@contextmanager
def _pg_database(server_url: URL, template: str | None = None) -> Iterator[URL]:
    """A database of its own on the server (psycopg driver), dropped afterwards; a copy of `template` if given."""
    name = f"tracestore_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            # Byte-order collation whatever the server's default, so ties on ids sort as on SQLite
            # (README: PostgreSQL > collation); the "C" locale exists on every server. A copy keeps it.
            source = f'"{template}"' if template else "template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
            connection.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE {source}')
        yield server_url.set(drivername="postgresql+psycopg", database=name)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@pytest.fixture
def pg_url(pg_server_url: URL) -> Iterator[URL]:
    """A fresh, empty database on that server (psycopg driver), dropped after the test."""
    with _pg_database(pg_server_url) as url:
        yield url


@pytest.fixture(scope="session")
def pg_head_template(pg_server_url: URL) -> Iterator[str]:
    """A database the migrations brought to head, copied for each test that opens a store on PostgreSQL:
    CREATE DATABASE … TEMPLATE copies files (~0.1 s), where running the chain takes ~1 s per test."""
    with _pg_database(pg_server_url) as url:
        upgrade(url.render_as_string(hide_password=False))
        assert url.database is not None
        yield url.database


@pytest.fixture
def pg(pg_url: URL) -> Iterator[Backend]:
    """A fresh, empty PostgreSQL database as a Backend, for the tests that are about PostgreSQL alone."""
    backend = Backend("postgresql", pg_url)
    try:
        yield backend
    finally:
        backend.dispose()


@pytest.fixture
def pg_async_url(pg_url: URL) -> URL:
    """The same database through asyncpg."""
    return pg_url.set(drivername="postgresql+asyncpg")


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel, built as a user's `pip install` builds it, installed without extras in a fresh virtualenv;
    built once per test session (building takes ~15 s)."""
    return build_and_install(tmp_path_factory.mktemp("packaging"))
