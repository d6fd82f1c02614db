"""Retention: deleting old traces in short batches (`TraceStore.prune`), and what it says about space.

What is deleted: every trace whose own `created_at` is strictly before the cutoff, with its session
links (ON DELETE CASCADE, in the same statement; on an application's SQLite Engine the store turns foreign
key enforcement on for each batch and back off after it). A trace created exactly at the cutoff stays.

How: oldest first along idx_traces_created_at, at most `batch_size` traces per transaction, each its
own short write transaction (SQLite: BEGIN IMMEDIATE, then the write lock is left free for the
writers that queued meanwhile, as the migrations do, tracestore.online). There is no saved position:
the database itself is the state, so a prune killed at any point leaves whole batches deleted or not,
and running it again finishes the job. A trace written during the prune with a created_at the prune
has already walked past is taken by a last pass from the oldest end, or by the next run.

Space: SQLite keeps the freed pages in the file for new traces (PRAGMA freelist_count); with
`vacuum=True` a file in auto_vacuum=INCREMENTAL mode returns them to the filesystem in short
steps, and any other file gets the VACUUM advice. PostgreSQL: plain DELETEs; autovacuum makes the
space reusable.

The stores (TraceStore.prune, AsyncTraceStore.prune) validate with `prune_request` and run `Pruner`
steps, each in a write transaction of theirs (tracestore.engine.StoreEngine); the statements are in
tracestore.retention.queries.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from tracestore.busy import BUSY_DEADLINE, Attempt, retry_busy, retry_busy_async
from tracestore.engine import AsyncStoreEngine, StoreEngine
from tracestore.errors import InvalidQueryError, StorageError, is_disk_full, storage_error
from tracestore.migrate.online import CheckpointError, pause_for_waiting_writers, restart_wal
from tracestore.queries import compiled
from tracestore.retention.queries import retention_statements_for
from tracestore.types import END_OF_YEAR_9999, unit_mistake

T = TypeVar("T")

DEFAULT_BATCH_SIZE = 10_000
# A batch is one transaction: bounded, so that a prune never becomes the multi-million-row DELETE
# that holds the write lock for minutes and the whole batch's undo in memory.
MAX_BATCH_SIZE = 1_000_000
# Pages PRAGMA incremental_vacuum returns per write transaction (40 MB of 4 KB pages).
VACUUM_STEP_PAGES = 10_000
# SQLite's PRAGMA auto_vacuum values.
AUTO_VACUUM_MODES = {0: "NONE", 1: "FULL", 2: "INCREMENTAL"}

OnProgress = Callable[[int, int], None]


@dataclass(frozen=True)
class PruneRequest:
    """Validated prune arguments; `cutoff` in epoch seconds (traces with created_at < cutoff go)."""

    cutoff: float
    batch_size: int
    vacuum: bool
    dry_run: bool


def prune_request(
    older_than: float | datetime | timedelta,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    vacuum: bool = False,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneRequest:
    """Check prune's arguments (InvalidQueryError naming the problem) and resolve the cutoff.

    `older_than`: the cutoff as epoch seconds (like every time in the API) or a timezone-aware
    datetime; or a timedelta, an age: now - older_than. A cutoff after now is refused (a unit slip,
    milliseconds for seconds, would otherwise delete everything).
    """
    now = time.time() if now is None else now
    cutoff = _cutoff(older_than, now)
    if cutoff >= END_OF_YEAR_9999:
        raise InvalidQueryError(f"older_than {older_than!r} is past the year 9999: {unit_mistake(cutoff)}")
    if cutoff > now:
        raise InvalidQueryError(
            f"older_than is in the future ({_iso(cutoff)}, now is {_iso(now)}): give epoch seconds (not "
            "milliseconds), a datetime, or an age as a timedelta"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 0 < batch_size <= MAX_BATCH_SIZE:
        raise InvalidQueryError(f"batch_size must be an int between 1 and {MAX_BATCH_SIZE:,}, got {batch_size!r}")
    for name, flag in (("vacuum", vacuum), ("dry_run", dry_run)):
        if not isinstance(flag, bool):
            raise InvalidQueryError(f"{name} must be True or False, got {flag!r}")
    return PruneRequest(cutoff, batch_size, vacuum, dry_run)


def _cutoff(older_than: object, now: float) -> float:
    if isinstance(older_than, datetime):
        if older_than.utcoffset() is None:
            raise InvalidQueryError(
                f"older_than {older_than!r} has no timezone, so it names no single instant: use an aware "
                "datetime, e.g. datetime.now(UTC) - timedelta(days=30)"
            )
        return older_than.timestamp()
    if isinstance(older_than, timedelta):
        if older_than < timedelta(0):
            raise InvalidQueryError(f"older_than as an age must not be negative, got {older_than!r}")
        return now - older_than.total_seconds()
    if not isinstance(older_than, bool) and isinstance(older_than, int | float):
        try:
            cutoff = float(older_than)
        except OverflowError:  # an int beyond float range
            cutoff = math.nan
        if math.isfinite(cutoff):
            return cutoff
    raise InvalidQueryError(
        f"older_than must be finite epoch seconds, an aware datetime or a timedelta, got {older_than!r}"
    )


def _iso(epoch: float) -> str:
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:g} s"


@dataclass(frozen=True)
class Space:
    """What the database says about its space after a prune (SQLite; None fields on PostgreSQL)."""

    free_pages: int | None = None  # PRAGMA freelist_count: pages kept in the file for reuse
    page_size: int | None = None
    returned_pages: int | None = None  # pages incremental_vacuum gave back to the filesystem
    advice: str = ""

    @property
    def free_bytes(self) -> int | None:
        return None if self.free_pages is None or self.page_size is None else self.free_pages * self.page_size


@dataclass(frozen=True)
class PruneReport:
    """What a prune did: traces deleted (would be deleted, with dry_run), in how many transactions."""

    cutoff: float
    deleted: int
    batches: int
    seconds: float
    dry_run: bool
    space: Space = field(default_factory=Space)

    @property
    def rate(self) -> float:
        """Traces deleted per second (0 when nothing was)."""
        return self.deleted / self.seconds if self.deleted and self.seconds > 0 else 0.0


class Pruner:
    """One prune's statements and position. Each method takes a sync Connection; the store owns the
    transactions (the batch methods run inside one of its write engine, the others outside any)."""

    def __init__(self, dialect_name: str, request: PruneRequest) -> None:
        self.request = request
        self.sqlite = dialect_name == "sqlite"
        self._sql = retention_statements_for(dialect_name)
        self.total = 0
        self.deleted = 0
        self.batches = 0
        # The newest created_at deleted so far: the next batch's range starts there (created_at >=
        # low, ties included). None: start at the oldest end.
        self._low: float | None = None
        self._started = time.monotonic()

    def count(self, connection: Connection) -> int:
        """The traces the prune is about to delete; read without any lock, before the first batch."""
        query = compiled(self._sql.count_older, connection.dialect)
        args = query.args({"cutoff": self.request.cutoff})
        self.total = int(connection.exec_driver_sql(query.sql, args).scalar_one())
        return self.total

    def delete_batch(self, connection: Connection) -> list[float]:
        """Delete the next batch in the connection's (write) transaction; the created_at of each deleted trace."""
        if self.sqlite and not connection.exec_driver_sql("PRAGMA foreign_keys").scalar():
            raise StorageError(
                "foreign keys are off on this SQLite connection, so deleting traces would leave their session "
                "links behind; run it in a store's write transaction (tracestore.engine.StoreEngine), which "
                "turns them on"
            )
        for setup in self._sql.write_setup:
            connection.exec_driver_sql(compiled(setup, connection.dialect).sql)
        resume = self._low is not None
        params: dict[str, Any] = {"cutoff": self.request.cutoff, "batch_size": self.request.batch_size}
        if resume:
            params["low"] = self._low
        query = compiled(self._sql.delete_batch(resume=resume), connection.dialect)
        return [row[0] for row in connection.exec_driver_sql(query.sql, query.args(params))]

    def advance(self, deleted: list[float]) -> bool:
        """Account for a committed batch; True when the prune is finished."""
        self.batches += 1
        self.deleted += len(deleted)
        self.total = max(self.total, self.deleted)
        if len(deleted) == self.request.batch_size:
            self._low = max(deleted)
            return False
        if self._low is None:  # a short batch from the oldest end: nothing older than the cutoff is left
            return True
        # A short batch at the end of the walk: one more pass from the oldest end, for traces written
        # meanwhile with a created_at the walk had passed (usually one empty batch).
        self._low = None
        return False

    def space_facts(self, connection: Connection) -> tuple[int, int, int]:
        """SQLite's (freelist_count, page_size, auto_vacuum)."""
        pragma = connection.exec_driver_sql
        return (
            int(pragma("PRAGMA freelist_count").scalar_one()),
            int(pragma("PRAGMA page_size").scalar_one()),
            int(pragma("PRAGMA auto_vacuum").scalar_one()),
        )

    @staticmethod
    def vacuum_step(connection: Connection) -> None:
        """Return up to VACUUM_STEP_PAGES free pages to the filesystem (auto_vacuum=INCREMENTAL), in the
        connection's write transaction."""
        free = int(connection.exec_driver_sql("PRAGMA freelist_count").scalar_one())
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            # Each step of the pragma frees one page, and the drivers step a statement without result
            # columns once: PRAGMA incremental_vacuum(N) would free one page, not N.
            for _ in range(min(free, VACUUM_STEP_PAGES)):
                cursor.execute("PRAGMA incremental_vacuum")
        finally:
            cursor.close()

    def space(self, facts: tuple[int, int, int] | None, returned: int | None) -> Space:
        """The report's Space: freed pages and what to do about them, or PostgreSQL's note."""
        if facts is None:
            return Space(
                advice="PostgreSQL: plain DELETEs; autovacuum makes the rows' space reusable for new traces "
                "(the files do not shrink; VACUUM FULL or pg_repack would, under an exclusive lock)"
            )
        free, page_size, mode = facts
        size = f"{free:,} free pages ({free * page_size / 1e6:,.1f} MB)"
        if returned is not None:
            returned_mb = returned * page_size / 1e6
            advice = f"incremental vacuum returned {returned:,} pages ({returned_mb:,.1f} MB); {size} left"
        elif mode == 1:
            advice = f"auto_vacuum=FULL returned the freed pages at each commit; {size}"
        elif mode == 2:
            advice = f"{size} stay in the file for new traces (--vacuum / vacuum=True returns them to the filesystem)"
        elif self.request.vacuum:
            # Only an INCREMENTAL file can give pages back in steps; say so instead of silently doing nothing.
            advice = (
                f"{size} stay in the file for new traces; auto_vacuum is NONE, so --vacuum cannot return them and "
                "only VACUUM shrinks it: run it offline (it holds the write lock for a rewrite of the whole file and "
                "needs free disk about the file's size), or once `PRAGMA auto_vacuum=INCREMENTAL; VACUUM;`, after "
                "which prune --vacuum returns pages in short steps"
            )
        else:
            advice = f"{size} stay in the file for new traces; auto_vacuum is NONE, so only VACUUM shrinks it (offline)"
        return Space(free, page_size, returned, advice)

    def report(self, space: Space) -> PruneReport:
        deleted = self.total if self.request.dry_run else self.deleted
        seconds = time.monotonic() - self._started
        return PruneReport(self.request.cutoff, deleted, self.batches, seconds, self.request.dry_run, space)


# -- running a prune on a store's engine (sync and async: the same steps, each in its own transaction) --
Step = tuple[bool, Callable[[Connection], Any]]
"""A prune's request to its driver: (write?, a step taking a Connection); sent back: the step's result."""


def steps(pruner: Pruner, on_progress: OnProgress | None) -> Generator[Step, Any, PruneReport]:
    """What a prune does, in order, with no I/O: count, delete batch after batch, then look at the space
    (and give it back, with vacuum on an INCREMENTAL file). `run` and `run_async` drive it."""
    request = pruner.request
    yield False, pruner.count
    if on_progress is not None:
        on_progress(0, pruner.total)
    finished = request.dry_run
    while not finished:
        finished = pruner.advance((yield True, pruner.delete_batch))
        if on_progress is not None:
            on_progress(pruner.deleted, pruner.total)
    facts, returned = None, None
    if pruner.sqlite:
        facts = yield False, pruner.space_facts
        if request.vacuum and not request.dry_run and facts[2] == 2:
            returned = 0
            while facts[0] > 0:
                yield True, pruner.vacuum_step
                before, facts = facts[0], (yield False, pruner.space_facts)
                if facts[0] >= before:  # nothing returned (another connection reads the pages): stop
                    break
                returned += before - facts[0]
    return pruner.report(pruner.space(facts, returned))


def run(
    store_engine: StoreEngine,
    request: PruneRequest,
    on_progress: OnProgress | None = None,
    *,
    retry_deadline: float = BUSY_DEADLINE,
) -> PruneReport:
    """Prune on a store's engine: each step of `steps` in its own transaction, blocking."""
    engine = store_engine.engine
    pruner = Pruner(engine.dialect.name, request)
    plan = steps(pruner, on_progress)
    try:
        write, step = next(plan)
        while True:
            result = _write(store_engine, step, pruner, retry_deadline) if write else _read(engine, step)
            write, step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    except SQLAlchemyError as exc:
        raise _failed(pruner, exc) from exc


def _read(engine: Engine, step: Callable[[Connection], T]) -> T:
    with engine.connect() as connection:
        try:
            return step(connection)
        finally:
            connection.rollback()


def _write(store_engine: StoreEngine, step: Callable[[Connection], T], pruner: Pruner, retry_deadline: float) -> T:
    """Run `step` in one write transaction (retried while other writers hold the lock), then, on SQLite,
    keep the WAL about one batch long and leave the lock free for the writers that queued meanwhile."""
    engine = store_engine.engine
    held = 0.0

    def attempt_once(attempt: Attempt) -> T:
        nonlocal held
        try:
            with store_engine.transaction(foreign_keys=True) as connection:
                locked = time.monotonic()
                result = step(connection)
                attempt.committing()
            held = time.monotonic() - locked
            return result
        except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:  # vacuum_step uses a raw cursor
            raise _failed(pruner, exc) from exc

    result = retry_busy(attempt_once, what="prune", deadline=retry_deadline)
    if pruner.sqlite:
        try:
            with engine.connect() as connection:
                restart_wal(connection)
        except CheckpointError as exc:
            raise _stopped(pruner, exc, result) from exc
        time.sleep(pause_for_waiting_writers(held))
    return result


async def run_async(
    store_engine: AsyncStoreEngine,
    request: PruneRequest,
    on_progress: OnProgress | None = None,
    *,
    retry_deadline: float = BUSY_DEADLINE,
) -> PruneReport:
    """`run` for the async store: the same steps, each through run_sync in its own transaction."""
    engine = store_engine.engine
    pruner = Pruner(engine.dialect.name, request)
    plan = steps(pruner, on_progress)
    try:
        write, step = next(plan)
        while True:
            if write:
                result = await _write_async(store_engine, step, pruner, retry_deadline)
            else:
                result = await _read_async(engine, step)
            write, step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    # OSError: asyncpg's own socket errors (server down, connection reset), which SQLAlchemy does not wrap.
    except (SQLAlchemyError, OSError, engine.dialect.loaded_dbapi.Error) as exc:
        raise _failed(pruner, exc) from exc


async def _read_async(engine: AsyncEngine, step: Callable[[Connection], T]) -> T:
    async with engine.connect() as connection:
        try:
            return await connection.run_sync(step)
        finally:
            await connection.rollback()


async def _write_async(
    store_engine: AsyncStoreEngine, step: Callable[[Connection], T], pruner: Pruner, retry_deadline: float
) -> T:
    engine = store_engine.engine
    held = 0.0

    async def attempt_once(attempt: Attempt) -> T:
        nonlocal held
        try:
            async with store_engine.transaction(foreign_keys=True) as connection:
                locked = time.monotonic()
                result = await connection.run_sync(step)
                attempt.committing()
            held = time.monotonic() - locked
            return result
        except (SQLAlchemyError, OSError, engine.dialect.loaded_dbapi.Error) as exc:  # as in run_async
            raise _failed(pruner, exc) from exc

    result = await retry_busy_async(attempt_once, what="prune", deadline=retry_deadline)
    if pruner.sqlite:
        try:
            async with engine.connect() as connection:
                try:
                    await connection.run_sync(restart_wal)
                except asyncio.CancelledError:
                    # aiosqlite finishes the statement in flight in its thread all the same, so a checkpoint
                    # cut off there leaves its short busy_timeout behind: close the connection, do not pool it.
                    await connection.invalidate()
                    raise
        except CheckpointError as exc:
            raise _stopped(pruner, exc, result) from exc
        await asyncio.sleep(pause_for_waiting_writers(held))
    return result


def _failed(pruner: Pruner, exc: BaseException) -> StorageError:
    """The error of a batch that failed: rolled back, with what committed before and what to do now."""
    done = f"{pruner.deleted:,} traces deleted by the {pruner.batches:,} batches committed before"
    if is_disk_full(exc) and pruner.sqlite:
        # Each batch needs free space for the pages it changes (in the WAL, reused batch after batch),
        # so the same batch size fails again while a smaller one can still go through.
        advice = (
            f"the disk is full: run it again with a smaller batch size (this one was {pruner.request.batch_size:,};"
            " try 100, then 10), which needs less free space, or free some space first"
        )
    elif is_disk_full(exc):
        advice = "the server's disk is full: free some space there, then run it again to finish"
    else:
        advice = "run it again to finish"
    return storage_error(f"prune failed, its last batch rolled back ({done}; {advice})", exc)


def _stopped(pruner: Pruner, exc: CheckpointError, committed: object) -> StorageError:
    """The error of a checkpoint that failed after a step committed (`committed`: its result): what is done stays
    done."""
    deleted = pruner.deleted + (len(committed) if isinstance(committed, list) else 0)
    return StorageError(
        f"prune stopped after {deleted:,} traces were deleted by committed batches: {exc}; {exc.advice}, then run it"
        " again to finish"
    )
