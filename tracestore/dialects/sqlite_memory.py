"""An in-memory SQLite database shared by every thread and task: its one connection, lent to one user at a
time (the database lives only as long as that connection)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool
from sqlalchemy.util import await_only

from tracestore.dialects.sqlite_connect import uri_parameters

# How long a thread or task waits for the in-memory database's connection before the pool gives up.
LEND_TIMEOUT = 30.0


def in_memory(url: URL) -> bool:
    """Whether `url` is an in-memory SQLite database, which lives only as long as its connection."""
    if url.get_backend_name() != "sqlite":
        return False
    return url.database in (None, "", ":memory:") or "memory" in (
        url.query.get("mode"),
        uri_parameters(url).get("mode"),
    )


class _Lender:
    """Lends one thing to one owner (a thread or a task) at a time; the owner may borrow it again while it holds
    it, so a nested checkout never waits for itself."""

    def __init__(self) -> None:
        self._state = threading.Lock()
        self._owner: object = None
        self._depth = 0
        self._wakers: list[Callable[[], None]] = []

    def _take(self, owner: object, waker: Callable[[], None]) -> bool:
        with self._state:
            if self._owner is None or self._owner == owner:
                self._owner, self._depth = owner, self._depth + 1
                return True
            self._wakers.append(waker)  # under the lock: a give_back after this line wakes it
            return False

    def give_back(self) -> None:
        with self._state:
            self._depth -= 1
            if self._depth > 0:
                return
            self._owner, self._depth = None, 0
            wakers, self._wakers = self._wakers, []
        for wake in wakers:  # every waiter tries again; one of them gets it
            wake()

    def borrow(self, timeout: float) -> None:
        """Block this thread until it holds the connection."""
        owner, deadline = threading.get_ident(), time.monotonic() + timeout
        while True:
            woken = threading.Event()
            if self._take(owner, woken.set):
                return
            if not woken.wait(deadline - time.monotonic()):
                raise _lend_timeout(timeout)

    def borrow_async(self, timeout: float) -> None:
        """Suspend this task (inside SQLAlchemy's greenlet) until it holds the connection; other tasks run."""
        loop = asyncio.get_running_loop()
        owner, deadline = asyncio.current_task() or threading.get_ident(), time.monotonic() + timeout
        while True:
            woken: asyncio.Future[None] = loop.create_future()

            def wake(future: asyncio.Future[None] = woken) -> None:
                with contextlib.suppress(RuntimeError):  # the waiter's loop is closed: nobody to wake
                    loop.call_soon_threadsafe(_resolve, future)

            if self._take(owner, wake):
                return
            try:
                await_only(asyncio.wait_for(woken, max(deadline - time.monotonic(), 0)))
            except TimeoutError:
                raise _lend_timeout(timeout) from None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a waiter that timed out or was cancelled has its future done already
        future.set_result(None)


def _lend_timeout(timeout: float) -> sa_exc.TimeoutError:
    # The pool's own error, so that every caller already turns it into a StorageError.
    return sa_exc.TimeoutError(
        f"the in-memory SQLite database's only connection was in use for {timeout:g} s by another thread or task"
    )


class SharedConnectionPool(StaticPool):
    """The pool of an in-memory SQLite database: its one connection, lent to one thread at a time.

    An in-memory database lives and dies with its connection, so every thread must use the same one
    (SQLAlchemy's default gives each thread its own, empty, database); and a transaction belongs to the
    connection, not to the thread, so two threads must not use it at once.
    """

    def __init__(self, creator: Any, **kwargs: Any) -> None:
        super().__init__(creator, **kwargs)
        self._lender = _Lender()

    def _borrow(self) -> None:
        self._lender.borrow(LEND_TIMEOUT)

    def _do_get(self) -> ConnectionPoolEntry:
        self._borrow()
        try:
            return super()._do_get()
        except BaseException:
            self._lender.give_back()
            raise

    def _do_return_conn(self, record: ConnectionPoolEntry) -> None:
        try:
            super()._do_return_conn(record)
        finally:
            self._lender.give_back()


class AsyncSharedConnectionPool(SharedConnectionPool):
    """SharedConnectionPool for aiosqlite: lent to one task at a time, a waiting task leaves its loop free."""

    def _borrow(self) -> None:
        self._lender.borrow_async(LEND_TIMEOUT)
