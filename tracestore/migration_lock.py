"""One migration at a time per SQLite database file: an exclusive flock on a file beside it.

Deploy jobs and stores opened with auto_upgrade can start `upgrade` on the same file at once. SQLite
serializes each write transaction, but not a whole online migration (the backfill commits batch by
batch), so two runs would interleave and the second would fail stamping a revision the first one
already stamped. The lock file `<database>-migration.lock` is created next to the database and left
there (removing it would let a waiter and a newcomer lock two different files). The kernel releases
the lock when its holder exits, killed or not, so a crashed migration never blocks the next one.

The database file itself is never opened for this: closing any descriptor of it would drop the
POSIX locks SQLite holds on it in this process.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import URL

log = logging.getLogger("tracestore.migrate")


def lock_path(url: URL) -> str | None:
    """The lock file of an SQLite file database; None for other engines and in-memory databases."""
    if url.get_backend_name() != "sqlite":
        return None  # a server engine serializes migrations with its own locks
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


@contextmanager
def migration_lock(url: URL) -> Iterator[None]:
    """Hold the database's migration lock for the block, waiting for another migration to finish."""
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


def migration_running(url: URL) -> bool:
    """True while another process (or thread) holds the database's migration lock."""
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
