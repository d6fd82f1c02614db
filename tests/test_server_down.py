"""The PostgreSQL server going away under an open store: StorageError from every call, and back to work when it returns.

The server is a real one of the module's own (initdb once, about a second), listening on a Unix socket
and on 127.0.0.1, stopped and started with pg_ctl while a store stays open on it. It runs with the
binaries of the tests' server (scripts/with-postgres), as the user that one runs as.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import URL, NullPool, create_engine

from tests.oracle import make_trace
from tracestore import AsyncTraceStore, StorageError, TraceStore


class Server:
    """A throwaway PostgreSQL cluster that tests can stop and start."""

    def __init__(self, bindir: str, workdir: str, as_owner: list[str]) -> None:
        self.bindir, self.workdir, self.as_owner = bindir, workdir, as_owner
        self.data = os.path.join(workdir, "data")
        with socket.socket() as probe:  # a free TCP port (the socket file is named after it too)
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.running = False

    def _pg_ctl(self, *args: str) -> None:
        command = [*self.as_owner, f"{self.bindir}/pg_ctl", "-D", self.data, "-w", *args]
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)

    def initdb(self) -> None:
        command = [*self.as_owner, f"{self.bindir}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust"]
        subprocess.run([*command, "--no-sync"], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -k {self.workdir} -p {self.port} -c fsync=off"
        self._pg_ctl("-l", os.path.join(self.workdir, "server.log"), "-o", options, "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "stop")
        self.running = False

    def url(self, driver: str, via: str) -> str:
        if via == "tcp":
            return f"{driver}://postgres@127.0.0.1:{self.port}/postgres"
        return f"{driver}://postgres@/postgres?host={self.workdir}&port={self.port}"


@pytest.fixture(scope="module")
def server(pg_server_url: URL) -> Iterator[Server]:
    engine = create_engine(pg_server_url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            bindir = str(connection.exec_driver_sql("SELECT setting FROM pg_config WHERE name = 'BINDIR'").scalar())
    finally:
        engine.dispose()
    if not os.access(f"{bindir}/pg_ctl", os.X_OK):
        pytest.skip(f"a server of the tests' own needs PostgreSQL's server binaries here ({bindir} has no pg_ctl)")
    # The server refuses to run as root: then it runs as the user the tests' server runs as.
    owner, as_owner = os.getuid(), []
    if owner == 0:
        host = pg_server_url.query.get("host")
        owner = (
            os.stat(host).st_uid if isinstance(host, str) and os.path.isdir(host) else pwd.getpwnam("postgres").pw_uid
        )
        as_owner = ["runuser", "-u", pwd.getpwuid(owner).pw_name, "--"]
    workdir = tempfile.mkdtemp(prefix="tracestore-down.")
    os.chown(workdir, owner, -1)
    cluster = Server(bindir, workdir, as_owner)
    try:
        cluster.initdb()
        cluster.start()
        with TraceStore(cluster.url("postgresql+psycopg", "socket")):  # migrate once: every test's store starts at head
            pass
        yield cluster
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"cannot run a PostgreSQL server of the tests' own: {exc.cmd}: {exc.stderr}")
    finally:
        subprocess.run(
            [*as_owner, f"{bindir}/pg_ctl", "-D", cluster.data, "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def running(server: Server) -> Server:
    """The module's server, started again if a test before left it stopped."""
    if not server.running:
        server.start()
    return server


# Every async call that touches a connection, with arguments that reach the database.
ASYNC_CALLS: dict[str, Callable[[AsyncTraceStore], Awaitable[Any]]] = {
    "store": lambda s: s.store(make_trace(session_uids=["down"])),
    "store_batch": lambda s: s.store_batch([make_trace(session_uids=["down"]), make_trace()]),
    "delete": lambda s: s.delete("no-such-trace"),
    "get": lambda s: s.get("no-such-trace"),
    "query": lambda s: s.query(namespace="web", limit=5),
    "get_by_session_uid": lambda s: s.get_by_session_uid("down", limit=5),
    "get_by_session_uids": lambda s: s.get_by_session_uids(["down", "other"], limit=5),
    "page_by_session_uid": lambda s: s.page_by_session_uid("down", limit=5),
    "iter_session": lambda s: _consume(s.iter_session("down", page_size=5)),
    "tail": lambda s: _first(s.tail("down", poll_interval=0.01)),
    "explain": lambda s: s.explain("down", limit=5),
    "prune": lambda s: s.prune(timedelta(days=365), batch_size=10),
    # Reads re-check the revision while an upgrade is unfinished; called directly, as no upgrade is.
    "still_migrating": lambda s: s._still_migrating(),
}


async def _consume(traces: Any) -> list[Any]:
    return [trace async for trace in traces]


async def _first(polls: Any) -> Any:
    try:
        return await anext(polls)
    finally:
        await polls.aclose()


async def call_all(store: AsyncTraceStore) -> dict[str, BaseException | None]:
    """Each call's error (None: it worked), in ASYNC_CALLS order; a call never hangs past 30 s."""
    outcomes: dict[str, BaseException | None] = {}
    for name, call in ASYNC_CALLS.items():
        try:
            await asyncio.wait_for(call(store), 30)
            outcomes[name] = None
        except Exception as exc:
            outcomes[name] = exc
    return outcomes


def not_storage_errors(outcomes: dict[str, BaseException | None]) -> dict[str, str]:
    return {
        name: f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
        for name, exc in outcomes.items()
        if exc is not None and not (isinstance(exc, StorageError) and exc.__cause__ is not None)
    }


async def fill_the_pool(store: AsyncTraceStore) -> None:
    """Connections in the pool, as a busy application leaves them: several, all alive until the server goes."""
    await store.store_batch([make_trace(session_uids=["down"]) for _ in range(3)])
    await asyncio.gather(*(store.query(limit=1) for _ in range(4)))
    assert store.engine.sync_engine.pool.checkedin() > 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(("via", "mode"), [("socket", "fast"), ("tcp", "immediate")])
async def test_every_async_call_raises_storage_error_while_the_server_is_down(
    running: Server, via: str, mode: str
) -> None:
    url = running.url("postgresql+asyncpg", via)
    store = AsyncTraceStore(url)
    try:
        await fill_the_pool(store)
        running.stop(mode)
        # Twice: the first calls meet the pool's dead connections, the later ones a refused connect.
        for _ in range(2):
            outcomes = await call_all(store)
            assert not_storage_errors(outcomes) == {}
            assert [name for name, exc in outcomes.items() if exc is None] == []
        failed = outcomes["query"]
        assert "query failed" in str(failed)  # what failed, and why
        assert type(failed.__cause__).__name__ in str(failed)
        with pytest.raises(StorageError, match="cannot open"):
            async with AsyncTraceStore(url):
                pass
        running.start()
        # Back: the same store, not reopened, works again (the failures above discarded the dead connections).
        outcomes = await call_all(store)
        assert {name: str(exc) for name, exc in outcomes.items() if exc is not None} == {}
    finally:
        if not running.running:
            running.start()
        await store.close()


async def test_closing_a_store_while_the_server_is_down_does_not_raise(running: Server) -> None:
    store = AsyncTraceStore(running.url("postgresql+asyncpg", "socket"))
    await fill_the_pool(store)
    running.stop("immediate")
    await store.close()


async def test_the_store_works_again_after_a_restart_it_did_not_see(running: Server) -> None:
    async with AsyncTraceStore(running.url("postgresql+asyncpg", "socket")) as store:
        await fill_the_pool(store)
        running.stop("fast")
        running.start()
        # The pooled connections are dead. The first call to meet one fails (the server may have ended
        # its transaction), and SQLAlchemy then discards every connection of the pool, not just that one.
        outcomes = await call_all(store)
        failures = [name for name, exc in outcomes.items() if exc is not None]
        assert not_storage_errors(outcomes) == {}
        assert failures in ([], [next(iter(ASYNC_CALLS))]), failures
        outcomes = await call_all(store)
        assert {name: str(exc) for name, exc in outcomes.items() if exc is not None} == {}


SYNC_CALLS: dict[str, Callable[[TraceStore], Any]] = {
    "store_batch": lambda s: s.store_batch([make_trace(session_uids=["down"])]),
    "delete": lambda s: s.delete("no-such-trace"),
    "get": lambda s: s.get("no-such-trace"),
    "query": lambda s: s.query(limit=5),
    "page_by_session_uid": lambda s: s.page_by_session_uid("down", limit=5),
    "iter_session": lambda s: list(s.iter_session("down", page_size=5)),
    "tail": lambda s: next(iter(s.tail("down", poll_interval=0.01))),
    "explain": lambda s: s.explain("down", limit=5),
    "prune": lambda s: s.prune(timedelta(days=365), batch_size=10),
}


def test_every_sync_call_raises_storage_error_while_the_server_is_down(running: Server) -> None:
    # The sync store's driver (psycopg) raises its own OperationalError, which SQLAlchemy wraps.
    with TraceStore(running.url("postgresql+psycopg", "socket")) as store:
        store.store_batch([make_trace(session_uids=["down"])])
        running.stop("fast")
        try:
            for name, call in SYNC_CALLS.items():
                with pytest.raises(StorageError) as raised:
                    call(store)
                assert raised.value.__cause__ is not None, name
        finally:
            running.start()
        for call in SYNC_CALLS.values():
            call(store)
