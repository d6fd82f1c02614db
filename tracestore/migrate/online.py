"""How migration steps share SQLite's one write lock with the application's live writers.

SQLite has one write lock and no queue: a writer that finds it taken sleeps in its busy handler and
polls. The default handler (PRAGMA busy_timeout, Python's `sqlite3.connect(timeout=)`, tracestore's
engine) polls after 1, 2, 5, 10, 15, 20, 25, 25, 25, 50 and 50 ms, then every 100 ms. A migration that
commits and begins its next transaction at once wins the lock again while the writer sleeps, so a
writer would wait for the sum of back-to-back steps. So after each transaction the lock is left free
for one poll interval of a writer that has waited as long as the transaction held it: every writer
that queued during the transaction polls once while it is free.

Steps that walk a big b-tree under the lock (DROP INDEX, the scan that creates an index) first read it
without the lock, so the pages come from the OS cache instead of the disk while writers wait.
(docs/performance.md has the figures behind both.)
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from tracestore.busy import BUSY_DEADLINE, BusyRetry, is_busy
from tracestore.dialects import rules_for
from tracestore.errors import MigrationError, StorageError, driver_reason, is_disk_full

log = logging.getLogger("tracestore.migrate")
T = TypeVar("T")

# sqliteDefaultBusyCallback's sleeps, in milliseconds; after the last one it keeps polling at that rate.
BUSY_HANDLER_DELAYS_MS = (1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100)
# How long RESTART may wait for other connections' transactions; it holds the write lock meanwhile.
CHECKPOINT_WAIT_MS = 100
# PostgreSQL: how long one try of a DDL step may queue for its table lock, and for how long it is
# tried again before the migration gives up (see ddl_step).
LOCK_TIMEOUT_MS = 2_000
LOCK_WAIT_SECONDS = 600.0


def pause_for_waiting_writers(held_seconds: float) -> float:
    """Seconds to leave the lock free after holding it for `held_seconds`.

    A writer that queued during the transaction has waited at most `held_seconds`; its next poll comes
    at most one of its current sleeps later, and its sleeps only grow, so that sleep (plus a margin for
    scheduling) is enough for every such writer.
    """
    waited_ms = 0.0
    for delay_ms in BUSY_HANDLER_DELAYS_MS:
        waited_ms += delay_ms
        if waited_ms > held_seconds * 1000:
            return (delay_ms + 2) / 1000
    return (BUSY_HANDLER_DELAYS_MS[-1] + 2) / 1000


@contextmanager
def write_transaction(connection: Connection, *, checkpoint: bool = False) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error), then leave the lock free for waiting writers.

    The connection must be in autocommit mode (Alembic's autocommit_block). `checkpoint`: after the
    commit, checkpoint the WAL and let the next writer start it over (see restart_wal).
    On PostgreSQL it is a plain BEGIN … COMMIT: row locks, no database-wide write lock to leave free,
    and waiting writers are queued by the server.
    """
    run = connection.exec_driver_sql
    rules = rules_for(connection.dialect.name)
    run(rules.begin_write)
    locked = time.monotonic()
    try:
        yield
        run("COMMIT")
    except BaseException:
        _roll_back(connection)
        raise
    if not rules.one_write_lock:
        return
    held = time.monotonic() - locked
    if checkpoint:
        restart_wal(connection)
    time.sleep(pause_for_waiting_writers(held))


def _roll_back(connection: Connection) -> None:
    """ROLLBACK after a failed step, keeping the step's own error as the one raised.

    SQLite rolls a transaction back by itself on some errors (a full disk, an I/O error), and the
    explicit ROLLBACK then fails with "no transaction is active", which would hide the real cause.
    """
    try:
        connection.exec_driver_sql("ROLLBACK")
    except Exception as exc:  # the step's error is the one that matters; a broken connection is discarded by the pool
        log.debug("ROLLBACK after a failed step failed too: %s", driver_reason(exc))


def write_step(
    connection: Connection,
    step: Callable[[], T],
    *,
    what: str,
    checkpoint: bool = False,
    deadline: float = BUSY_DEADLINE,
) -> T:
    """Run `step` in one write transaction (write_transaction), again while the database is busy.

    Busy means SQLite's lock stayed taken past busy_timeout, or PostgreSQL aborted the transaction as
    a deadlock victim, a serialization failure or a lock timeout: the transaction was rolled back
    whole, so a step written to be run again (every migration batch is) can simply be retried. Pauses
    are jittered and growing, as the store's writes do (tracestore.busy); past `deadline` the last
    error is raised as StorageBusyError.
    """
    policy = BusyRetry(what, deadline)
    while True:
        policy.attempt()
        try:
            with write_transaction(connection, checkpoint=checkpoint):
                return step()
        except DBAPIError as exc:
            if not is_busy(exc):
                raise
            pause = policy.pause_for(exc)
            log.info("%s: %s (try %d), trying again", what, driver_reason(exc), policy.attempts)
            time.sleep(pause)


def restart_wal(connection: Connection) -> None:
    """Checkpoint the WAL and let the next writer start it over, so it stays about one transaction long.

    A backfill batch writes about one page per row (each row's index entry lands in a different
    page). SQLite restarts the WAL only when a write transaction begins with every frame
    checkpointed, which a writer committing between batches prevents, so without this the WAL grows
    without bound. RESTART holds the write lock while it copies and syncs, so a PASSIVE checkpoint copies
    the batch's pages first with writers free, and RESTART is left with what they committed meanwhile.
    RESTART waits for the other connections, but at most CHECKPOINT_WAIT_MS (the next batch tries
    again). The transaction before it has committed: a failure here (a full disk) is a StorageError
    saying so.
    """
    dbapi = connection.connection.dbapi_connection
    assert dbapi is not None
    try:
        cursor = dbapi.cursor()
        try:
            cursor.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cursor.fetchall()
            cursor.execute("PRAGMA busy_timeout")
            (previous,) = cursor.fetchone() or (0,)
            cursor.execute(f"PRAGMA busy_timeout={CHECKPOINT_WAIT_MS}")
            try:
                cursor.execute("PRAGMA wal_checkpoint(RESTART)")
                cursor.fetchall()
            finally:
                cursor.execute(f"PRAGMA busy_timeout={int(previous)}")
        finally:
            cursor.close()
    except connection.dialect.loaded_dbapi.Error as exc:
        raise CheckpointError(exc) from exc


class CheckpointError(StorageError):
    """The WAL checkpoint after a committed transaction failed; what that transaction wrote is safe in the WAL.

    `advice`: what to do before running the command again.
    """

    def __init__(self, exc: BaseException) -> None:
        self.advice = (
            "free some disk space"
            if is_disk_full(exc)
            else "make sure the database file can be written (free space, quotas, file size limits)"
        )
        super().__init__(f"the WAL checkpoint after a committed batch failed: {driver_reason(exc)}")


def read_into_cache(connection: Connection, table: str, index: str | None = None) -> None:
    """Read every page of a table (or of one of its indexes) without holding the write lock.

    `table` and `index` are schema names from the migrations, never user input. On PostgreSQL it does
    nothing: there is no database-wide write lock to keep short, and a cold read under a lock only
    slows the writers that touch the same rows.
    """
    if not rules_for(connection.dialect.name).one_write_lock:
        return
    source = f"{table} INDEXED BY {index}" if index else f"{table} NOT INDEXED"
    connection.exec_driver_sql(f"SELECT count(*) FROM {source}").scalar()


# The order the application locks the tables in: it writes a trace before its links, and deleting a
# trace cascades to its links. A schema step that locks them in the other order can deadlock with it.
APPLICATION_LOCK_ORDER = ("traces", "trace_sessions")


def ddl_step(connection: Connection, step: Callable[[], T], *, what: str, locks: tuple[tuple[str, str], ...] = ()) -> T:
    """Run `step` (schema changes) in one write transaction; on PostgreSQL, without stalling the table.

    ALTER TABLE and CREATE TRIGGER need a table lock that conflicts with every reader. Queued behind
    one long transaction, the lock request would in turn make every new query of the table queue
    behind it: an outage for as long as that transaction runs. So each try waits at most
    LOCK_TIMEOUT_MS for the lock, rolls back and steps aside on timeout, and tries again until
    LOCK_WAIT_SECONDS have passed; then MigrationError, with nothing of the step applied. A try
    chosen as a deadlock victim (or a serialization failure) is rolled back whole and tried again
    the same way. `locks`: (table, lock mode) taken first, in APPLICATION_LOCK_ORDER, so that the
    step's own statements lock nothing the application could be holding the other way round.
    SQLite: one write transaction (its writers queue on the database lock, see write_transaction),
    retried while the database stays busy (write_step).
    """
    if rules_for(connection.dialect.name).one_write_lock:
        return write_step(connection, step, what=what)
    ordered = sorted(locks, key=lambda lock: APPLICATION_LOCK_ORDER.index(lock[0]))
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    tries = 0
    while True:
        tries += 1
        try:
            with write_transaction(connection):
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}")
                for table, mode in ordered:  # schema names and modes from the migrations, never user input
                    connection.exec_driver_sql(f"LOCK TABLE {table} IN {mode} MODE")
                return step()
        except DBAPIError as exc:
            if not is_busy(exc):
                raise
            if time.monotonic() >= deadline:
                raise MigrationError(
                    f"{what}: could not take its table lock in {tries} tries over {LOCK_WAIT_SECONDS:.0f}s;"
                    " a long transaction holds a conflicting lock (see pg_locks / pg_stat_activity). Nothing"
                    " of this step was applied; run the upgrade again when it has ended."
                ) from exc
            reason = str(driver_reason(exc)).strip()
            log.info("%s: table lock busy (%s; try %d), stepping aside and trying again", what, reason, tries)
            # Jittered, so two steps that deadlocked with each other do not meet again in step.
            time.sleep(min(0.05 * tries, 1.0) * random.uniform(0.5, 1.5))
