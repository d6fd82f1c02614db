"""Bounded retries of a write that found the database busy (SQLite's lock, PostgreSQL's deadlocks)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tracestore.errors import StorageBusyError, StorageError

T = TypeVar("T")

# How long a write keeps trying when other writers hold the lock. Each SQLite attempt already waits
# busy_timeout (5 s, tracestore.engine) for the lock, so this is about six attempts.
BUSY_DEADLINE = 30.0

_SQLITE_BUSY = 5  # the primary result code; extended codes (BUSY_RECOVERY, BUSY_SNAPSHOT...) share its low byte
# PostgreSQL aborts the whole transaction for these, so running it again is safe.
_PG_RETRYABLE = {"40P01": "deadlock detected", "40001": "serialization failure", "55P03": "lock not available"}


class Attempt:
    """One try of a write transaction; the write calls committing() right before leaving its `begin()` block."""

    __slots__ = ("at_commit",)

    def __init__(self) -> None:
        self.at_commit = False

    def committing(self) -> None:
        # Past this point the COMMIT may have reached the database: a PostgreSQL connection lost during
        # COMMIT leaves the outcome unknown, so such a failure is reported and never retried.
        self.at_commit = True


def is_busy(exc: BaseException | None) -> bool:
    """Whether a driver error (or SQLAlchemy's wrapper of one) says "locked by someone else, try again"."""
    orig = getattr(exc, "orig", None) or exc
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return int(code) & 0xFF == _SQLITE_BUSY
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state is not None:
        return state in _PG_RETRYABLE
    # aiosqlite errors reach us re-raised by SQLAlchemy's adapter, without the error code.
    return "database is locked" in str(orig)


class BusyRetry:
    """The retry policy of one write call: what may be retried, how long to pause, when to give up."""

    def __init__(self, what: str, deadline: float = BUSY_DEADLINE) -> None:
        self.what = what
        self.deadline = deadline
        self.attempts = 0
        self._give_up = time.monotonic() + deadline
        self._pause = 0.005

    def attempt(self) -> Attempt:
        self.attempts += 1
        return Attempt()

    def pause_after(self, exc: StorageError, attempt: Attempt) -> float:
        """Seconds to wait before the next try; re-raises `exc` when it must not be retried."""
        cause = exc.__cause__
        if attempt.at_commit or not is_busy(cause):
            raise exc
        return self.pause_for(cause)

    def pause_for(self, cause: BaseException | None) -> float:
        """Seconds to wait before trying a busy write again; StorageBusyError once the deadline has passed."""
        left = self._give_up - time.monotonic()
        if left <= 0:
            raise StorageBusyError(
                f"{self.what} failed: the database stayed locked by other writers for {self.deadline:g} s "
                f"({self.attempts} attempts), nothing was written; retry later or spread the writes out "
                f"(last error: {getattr(cause, 'orig', None) or cause})"
            ) from cause
        # Jittered exponential pauses, so writers that collided do not collide again in step.
        pause = min(self._pause * random.uniform(0.5, 1.5), left)
        self._pause = min(self._pause * 2, 0.25)
        return pause


def retry_busy(write: Callable[[Attempt], T], *, what: str, deadline: float = BUSY_DEADLINE) -> T:
    """Run `write` (one whole transaction) until it succeeds, fails for another reason, or `deadline` passes."""
    policy = BusyRetry(what, deadline)
    while True:
        attempt = policy.attempt()
        try:
            return write(attempt)
        except StorageError as exc:
            time.sleep(policy.pause_after(exc, attempt))


async def retry_busy_async(
    write: Callable[[Attempt], Awaitable[T]], *, what: str, deadline: float = BUSY_DEADLINE
) -> T:
    """retry_busy for the async store."""
    policy = BusyRetry(what, deadline)
    while True:
        attempt = policy.attempt()
        try:
            return await write(attempt)
        except StorageError as exc:
            await asyncio.sleep(policy.pause_after(exc, attempt))
