"""One migration at a time per database: an flock beside an SQLite file, an advisory lock on PostgreSQL.

Deploy jobs and stores opened with auto_upgrade can start `upgrade` on the same file at once. SQLite
serializes each write transaction, but not a whole online migration (the backfill commits batch by
batch), so two runs would interleave and the second would fail stamping a revision the first one
already stamped. The lock file `<database>-migration.lock` is created next to the database and left
there (removing it would let a waiter and a newcomer lock two different files). It is empty and
holds no state: keep it out of version control and backups like the database's -wal and -shm files
(a `*-migration.lock` line in .gitignore). The kernel releases the lock when its holder exits,
killed or not, so a crashed migration never blocks the next one.

The database file itself is never opened for this: closing any descriptor of it would drop the
POSIX locks SQLite holds on it in this process.

On PostgreSQL the backfill commits batch by batch too, so the same holds; there the lock is a
session-level advisory lock (scoped to the database) held by a connection of its own for the whole
migration. The server releases it when that session ends, so a killed migration never blocks the
next one either.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import URL, Connection, create_engine
from sqlalchemy.pool import NullPool

log = logging.getLogger("tracestore.migrate")


def lock_path(url: URL) -> str | None:
    """The lock file of an SQLite file database; None for other engines and in-memory databases."""
    if url.get_backend_name() != "sqlite":
        return None  # PostgreSQL: an advisory lock (advisory_lock below)
    database = url.database or ""
    if database in ("", ":memory:") or "mode=memory" in database:
        return None
    if database.startswith("file:"):
        database = database[len("file:") :].split("?", 1)[0]
    return os.path.abspath(database) + "-migration.lock"


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        # A read-only directory: SQLite cannot write its journal there either, so the migration
        # itself fails with the real reason; the lock only ever guarded writers.
        log.warning("cannot create the migration lock %s (%s); running without it", path, exc)
        return None


# Lock files this thread holds: flock conflicts between two descriptors even in one process, so a
# nested migration (upgrade called while holding the lock) must not lock again.
_held = threading.local()


# Any fixed 64-bit key works: advisory locks are scoped to the current database.
ADVISORY_LOCK_KEY = 0x7472_6163_6573_746F  # "tracesto"


@contextmanager
def migration_lock(url: URL) -> Iterator[None]:
    """Hold the database's migration lock for the block, waiting for another migration to finish."""
    if url.get_backend_name() == "postgresql":
        with _advisory_lock(url):
            yield
        return
    path = lock_path(url)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    descriptor = _open(path) if path and path not in held else None
    if descriptor is None or path is None:
        yield
        return
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another migration of %s is running; waiting for it to finish", url.database)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        held.add(path)
        try:
            yield
        finally:
            held.discard(path)
    finally:
        os.close(descriptor)  # releases the lock


def _lock_connection(url: URL) -> Connection:
    # A connection of its own, outside any pool: the lock lives exactly as long as this session.
    return create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT").connect()


@contextmanager
def _advisory_lock(url: URL) -> Iterator[None]:
    key = _advisory_key(url)
    held: set[str] = _held.__dict__.setdefault("paths", set())
    if key in held:  # a nested migration in this thread
        yield
        return
    connection = _lock_connection(url)
    try:
        if not connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({ADVISORY_LOCK_KEY})").scalar():
            log.info("another migration of %s is running; waiting for it to finish", url.database)
            connection.exec_driver_sql(f"SELECT pg_advisory_lock({ADVISORY_LOCK_KEY})")
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        connection.close()  # ends the session, which releases the lock
        connection.engine.dispose()


def _advisory_key(url: URL) -> str:
    return f"postgresql://{url.host}:{url.port}/{url.database}?{url.query.get('host', '')}"


def migration_running(url: URL) -> bool:
    """True while another process (or thread) holds the database's migration lock."""
    if url.get_backend_name() == "postgresql":
        if _advisory_key(url) in _held.__dict__.get("paths", ()):
            return False  # this thread is the migration
        connection = _lock_connection(url)
        try:
            run = connection.exec_driver_sql
            if run(f"SELECT pg_try_advisory_lock({ADVISORY_LOCK_KEY})").scalar():
                run(f"SELECT pg_advisory_unlock({ADVISORY_LOCK_KEY})")
                return False
            return True
        finally:
            connection.close()
            connection.engine.dispose()
    path = lock_path(url)
    if path in _held.__dict__.get("paths", ()):
        return False  # this thread is the migration
    descriptor = _open(path) if path else None
    if descriptor is None:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False
