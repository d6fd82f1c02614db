"""How migration steps share SQLite's one write lock with the application's live writers.

SQLite has one write lock and no queue: a writer that finds it taken sleeps in its busy handler and
polls. The default handler (PRAGMA busy_timeout, Python's `sqlite3.connect(timeout=)`, tracestore's
engine) polls after 1, 2, 5, 10, 15, 20, 25, 25, 25, 50 and 50 ms, then every 100 ms. A migration that
commits and begins its next transaction at once wins the lock again while the writer sleeps: measured
at 10M traces, a writer waited 1.3 s across two back-to-back steps of 0.4 s and 0.9 s. So after each
transaction the lock is left free for one poll interval of a writer that has waited as long as the
transaction held it: every writer that queued during the transaction polls once while it is free.

Steps that walk a big b-tree under the lock (DROP INDEX, the scan that creates an index) first read it
without the lock, so the pages come from the OS cache instead of the disk: measured at 10M traces,
dropping idx_trace_sessions_uid took 0.54 s in one run and 2.62 s in another, with a cold cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from tracestore.errors import MigrationError

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
LOCK_NOT_AVAILABLE = "55P03"


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
    sqlite = connection.dialect.name == "sqlite"
    run("BEGIN IMMEDIATE" if sqlite else "BEGIN")
    locked = time.monotonic()
    try:
        yield
        run("COMMIT")
    except BaseException:
        run("ROLLBACK")
        raise
    if not sqlite:
        return
    held = time.monotonic() - locked
    if checkpoint:
        restart_wal(connection)
    time.sleep(pause_for_waiting_writers(held))


def restart_wal(connection: Connection) -> None:
    """Checkpoint the WAL and let the next writer start it over, so it stays about one transaction long.

    A backfill batch writes about one 4 KB page per row (each row's index entry lands in a different
    page): ~40 MB of WAL per 10,000 rows on a 10M-trace file. SQLite restarts the WAL only when a write
    transaction begins with every frame checkpointed; with another process committing between batches
    that never happened, and the WAL passed 17 GB in a minute. RESTART waits for the other
    connections, but at most CHECKPOINT_WAIT_MS (the next batch tries again).
    """
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
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


def read_into_cache(connection: Connection, table: str, index: str | None = None) -> None:
    """Read every page of a table (or of one of its indexes) without holding the write lock.

    `table` and `index` are schema names from the migrations, never user input. On PostgreSQL it does
    nothing: there is no database-wide write lock to keep short, and a cold read under a lock only
    slows the writers that touch the same rows.
    """
    if connection.dialect.name != "sqlite":
        return
    source = f"{table} INDEXED BY {index}" if index else f"{table} NOT INDEXED"
    connection.exec_driver_sql(f"SELECT count(*) FROM {source}").scalar()


def ddl_step(connection: Connection, step: Callable[[], T], *, what: str) -> T:
    """Run `step` (schema changes) in one write transaction; on PostgreSQL, without stalling the table.

    ALTER TABLE and CREATE TRIGGER need a table lock that conflicts with every reader. Queued behind
    one long transaction, the lock request would in turn make every new query of the table queue
    behind it: an outage for as long as that transaction runs. So each try waits at most
    LOCK_TIMEOUT_MS for the lock, rolls back and steps aside on timeout, and tries again until
    LOCK_WAIT_SECONDS have passed; then MigrationError, with nothing of the step applied.
    SQLite: one write transaction (its writers queue on the database lock, see write_transaction).
    """
    if connection.dialect.name == "sqlite":
        with write_transaction(connection):
            return step()
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    tries = 0
    while True:
        tries += 1
        try:
            with write_transaction(connection):
                connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(LOCK_TIMEOUT_MS)}")
                return step()
        except DBAPIError as exc:
            code = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
            if code != LOCK_NOT_AVAILABLE:
                raise
            if time.monotonic() >= deadline:
                raise MigrationError(
                    f"{what}: could not take its table lock in {tries} tries over {LOCK_WAIT_SECONDS:.0f}s; a"
                    " long transaction holds a conflicting lock (see pg_locks / pg_stat_activity). Nothing"
                    " of this step was applied; run the upgrade again when it has ended."
                ) from exc
            log.info("%s: table lock busy (try %d), stepping aside and trying again", what, tries)
            time.sleep(min(0.05 * tries, 1.0))
