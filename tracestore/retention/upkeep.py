"""SQLite upkeep done by the store's writer: WAL checkpoints that readers cannot starve, fresh statistics."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger("tracestore.maintenance")

Job = Literal["checkpoint", "statistics"]

# The WAL size past which the writer checkpoints with TRUNCATE after its commit. SQLite's own
# autocheckpoint (PASSIVE, every 1000 pages) copies pages back but only restarts the WAL from its
# start when no reader is using it: readers that always overlap keep it growing (tests/test_maintenance.py).
WAL_CHECKPOINT_BYTES = 64 * 1024 * 1024
# How long that checkpoint waits for the readers of older snapshots (it blocks writers meanwhile).
CHECKPOINT_WAIT_MS = 1000
# After a checkpoint that readers kept from finishing, wait this long (doubling up to a minute) before the next.
CHECKPOINT_BACKOFF = 1.0
# Check the statistics every this many write transactions of one store, and when the store closes.
STATISTICS_EVERY = 1000
# Rows ANALYZE reads per index at most: the cost stays bounded however big the file (SQLite's advice: 100-1000).
ANALYSIS_LIMIT = 400
# Re-analyze a table once its size is this many times what its statistics say (SQLite 3.46's PRAGMA optimize rule).
STALE_FACTOR = 10
TABLES = ("traces", "trace_sessions")


@dataclass
class Upkeep:
    """One store's upkeep of one SQLite file: what is due after a write, and running it."""

    wal_path: str
    wal_limit: int = WAL_CHECKPOINT_BYTES
    statistics_every: int = STATISTICS_EVERY
    writes: int = 0
    checkpoints: int = 0
    _not_before: float = 0.0
    _backoff: float = CHECKPOINT_BACKOFF

    @classmethod
    def for_engine(
        cls, engine: Engine, *, wal_limit: int = WAL_CHECKPOINT_BYTES, statistics_every: int = STATISTICS_EVERY
    ) -> Upkeep | None:
        """The upkeep of the engine's SQLite file; None for PostgreSQL (autovacuum does both jobs) or :memory:."""
        for name, value in (("wal_checkpoint_bytes", wal_limit), ("analyze_every", statistics_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0 (0 turns it off), got {value!r}")
        database = engine.url.database
        if engine.dialect.name != "sqlite" or database in (None, "", ":memory:") or database.startswith("file:"):
            return None
        return cls(wal_path=f"{database}-wal", wal_limit=wal_limit, statistics_every=statistics_every)

    def due(self) -> Job | None:
        """Called after each committed write: one stat() of the WAL, nothing else unless something is due."""
        self.writes += 1
        if self.wal_limit and time.monotonic() >= self._not_before and _size(self.wal_path) > self.wal_limit:
            return "checkpoint"
        if self.statistics_every and self.writes % self.statistics_every == 0:
            return "statistics"
        return None

    def run(self, conn: Connection, job: Job) -> None:
        """Run `job` on a connection outside any transaction; a failure is logged, not raised (the write committed)."""
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        try:
            if job == "checkpoint":
                self._checkpoint(cursor)
            else:
                started = time.perf_counter()
                analyzed = refresh_statistics(cursor)
                if analyzed:
                    log.info("ANALYZE %s took %.1f ms", ", ".join(analyzed), (time.perf_counter() - started) * 1000)
        except (SQLAlchemyError, conn.dialect.loaded_dbapi.Error) as exc:
            log.warning("SQLite %s failed (the write itself committed): %s", job, exc)
        finally:
            cursor.close()

    def _checkpoint(self, cursor: Any) -> None:
        cursor.execute("PRAGMA busy_timeout")
        busy_timeout = cursor.fetchone()[0]
        cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
        try:
            # TRUNCATE: copy every frame back, wait (busy_timeout) for readers of older snapshots to move on,
            # then restart the WAL and cut the file to zero. Readers starting meanwhile read the database file.
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            busy, wal_frames, copied = cursor.fetchone()
        finally:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout)}")
        self.checkpoints += 1
        if busy:
            self._not_before = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, 60.0)
            log.info(
                "WAL checkpoint incomplete (%s of %s frames copied), readers still on old snapshots", copied, wal_frames
            )
        else:
            self._backoff = CHECKPOINT_BACKOFF


# How often the checkpointer thread copies the WAL back at most: each checkpoint then covers several
# commits, and a page they all touched is copied (and fsynced) once.
CHECKPOINT_INTERVAL = 0.25


class Checkpointer:
    """Copies the WAL back into the database file from a thread of its own, after the store's writes.

    A checkpoint run by the committing connection (SQLite's autocheckpoint) makes that write wait for the
    copy and its two fsyncs; from this thread the writer goes on meanwhile (SQLite lets a PASSIVE checkpoint
    run beside a writer and readers). The autocheckpoint stays on, at a higher threshold, for a thread
    that falls behind. Started by the first write; `close` stops it.
    """

    def __init__(self, database: str, *, interval: float = CHECKPOINT_INTERVAL) -> None:
        self.database = database
        self.interval = interval
        self.checkpoints = 0
        # Held while this thread checkpoints: the writer's own TRUNCATE checkpoint (Upkeep) takes it first,
        # since two checkpoints at once make the second one return busy.
        self.running = threading.Lock()
        self._state = threading.Condition()
        self._pending = False  # a write committed since the last checkpoint began
        self._busy = False  # a checkpoint is under way
        self._stopping = False
        self._thread: threading.Thread | None = None

    @classmethod
    def for_store(cls, store: object, upkeep: Upkeep | None, *, owned: bool) -> Checkpointer | None:
        """The checkpointer of a store's file, stopped when the store is garbage collected unclosed (the thread
        would otherwise wait for writes for ever, holding the file open). None on an engine the application
        passed in (its database keeps its own checkpoints) and where the Upkeep does no checkpoints
        (PostgreSQL, :memory:, wal_checkpoint_bytes=0)."""
        if not owned or upkeep is None or not upkeep.wal_limit:
            return None
        # Absolute now: the thread opens the file at the first write, maybe after the process changed directory.
        checkpointer = cls(os.path.abspath(upkeep.wal_path.removesuffix("-wal")))
        weakref.finalize(store, checkpointer.stop)
        return checkpointer

    def wrote(self) -> None:
        """Called after each committed write: the next checkpoint is due (the thread starts the first time)."""
        with self._state:
            if self._stopping:
                return
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tracestore-checkpointer", daemon=True)
                self._thread.start()
            self._state.notify_all()

    def idle(self) -> None:
        """Wait until every write so far is checkpointed (or the thread has stopped): the file then stays as
        it is until the next write."""
        with self._state:
            self._state.wait_for(lambda: not (self._pending or self._busy) or self._thread is None)

    @property
    def thread(self) -> threading.Thread | None:
        """The thread while it runs (None before the first write and once stopped)."""
        return self._thread

    def stop(self) -> threading.Thread | None:
        """Tell the thread to end after the checkpoint it may be running, without waiting; the thread."""
        with self._state:
            self._stopping = True
            self._state.notify_all()
            return self._thread

    def close(self) -> None:
        """Stop the thread and wait for it."""
        thread = self.stop()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(self.database, isolation_level=None, check_same_thread=False)
            # Checkpoints fsync as the store's connections do (sqlite_connect.SQLITE_PRAGMAS).
            connection.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as exc:
            log.warning(
                "the checkpointer cannot open %s, SQLite's autocheckpoint does its work: %s", self.database, exc
            )
            self._stopped()
            return
        try:
            while self._next():
                try:
                    with self.running:
                        connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.checkpoints += 1
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed (SQLite's autocheckpoint does it instead): %s", exc)
                with self._state:
                    self._busy = False
                    self._state.notify_all()
                    # At most one checkpoint per interval: the next one covers the writes of several commits.
                    self._state.wait_for(lambda: self._stopping, timeout=self.interval)
        finally:
            connection.close()
            self._stopped()

    def _next(self) -> bool:
        """Wait for a write to checkpoint; False once stopping."""
        with self._state:
            self._state.wait_for(lambda: self._pending or self._stopping)
            if self._stopping:
                return False
            self._pending, self._busy = False, True
            return True

    def _stopped(self) -> None:
        with self._state:
            self._stopping = True  # for good: after a failed open, SQLite's autocheckpoint does the work
            self._thread = None
            self._busy = False
            self._state.notify_all()


def exclusive(checkpointer: Checkpointer | None, job: Job) -> AbstractContextManager[Any]:
    """What to hold while running `job`: a checkpoint waits for the checkpointer thread's to end."""
    return checkpointer.running if checkpointer is not None and job == "checkpoint" else nullcontext()


def refresh_statistics(cursor: Any) -> list[str]:
    """A bounded ANALYZE of each table whose size moved STALE_FACTOR times from what sqlite_stat1 says; the tables.

    What PRAGMA optimize does since SQLite 3.46, done by hand: before that (Debian 12 ships 3.40) it only
    considers the tables the same connection has queried, so on a pooled or fresh connection it did nothing.
    The size is max(rowid), one index probe: it overcounts after deletes, which only makes ANALYZE come later.
    """
    cursor.execute("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'")
    have_stats = cursor.fetchone() is not None
    stale = []
    for table in TABLES:
        cursor.execute(f"SELECT max(rowid) FROM {table}")  # a constant of this module, not user input
        rows = cursor.fetchone()[0] or 0
        known = None
        if have_stats:
            cursor.execute("SELECT max(CAST(stat AS INTEGER)) FROM sqlite_stat1 WHERE tbl = ?", (table,))
            known = cursor.fetchone()[0]
        if rows and (not known or rows >= known * STALE_FACTOR or rows * STALE_FACTOR <= known):
            stale.append(table)
    if stale:
        # A setting of the connection, which may be an application's: put back after.
        cursor.execute("PRAGMA analysis_limit")
        previous = int(cursor.fetchone()[0])
        cursor.execute(f"PRAGMA analysis_limit={ANALYSIS_LIMIT}")
        try:
            for table in stale:
                cursor.execute(f"ANALYZE {table}")
        finally:
            cursor.execute(f"PRAGMA analysis_limit={previous}")
    return stale


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
