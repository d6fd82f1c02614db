"""The library's exception hierarchy: every error a caller can see from tracestore."""

from __future__ import annotations

import errno


class TraceStoreError(Exception):
    """Base class of every error raised by tracestore."""


class InvalidTraceError(TraceStoreError, ValueError):
    """A trace (or one of a batch) cannot be stored as given; nothing was written."""


class InvalidQueryError(TraceStoreError, ValueError):
    """Query arguments are out of range or of the wrong type; nothing was read."""


class SchemaOutOfDateError(TraceStoreError):
    """The database is not at the head revision, so the fast query could miss rows."""


class MigrationError(TraceStoreError):
    """A migration was refused (it would destroy data) or failed; the reason names what to do."""


class RevisionError(MigrationError, ValueError):
    """Alembic could not resolve the requested revision (unknown id, not a valid target)."""


class StorageError(TraceStoreError):
    """The database failed (not a database, locked, read-only, disk full...); the transaction was rolled back."""


class StorageBusyError(StorageError):
    """Other writers kept the database locked past the store's retry deadline; nothing was written."""


# SQLite's primary result code for "database or disk is full"; PostgreSQL's SQLSTATE for disk_full.
_SQLITE_FULL = 13
_PG_DISK_FULL = "53100"


def driver_reason(exc: BaseException) -> BaseException:
    """The driver's own error behind a SQLAlchemy wrapper (or the error itself)."""
    return getattr(exc, "orig", None) or exc


def storage_error(action: str, exc: BaseException) -> StorageError:
    """A StorageError naming what failed and the driver's own reason (chain it with `from exc`)."""
    return StorageError(f"{action}: {driver_reason(exc)}")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether a driver error (or its wrapper, or its cause) says the disk or a file size limit is full."""
    while exc is not None:
        orig = driver_reason(exc)
        code = getattr(orig, "sqlite_errorcode", None)
        if code is not None and int(code) & 0xFF == _SQLITE_FULL:
            return True
        if (getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)) == _PG_DISK_FULL:
            return True
        if isinstance(orig, OSError) and orig.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        if "database or disk is full" in str(orig):  # aiosqlite's re-raised errors lose the code
            return True
        exc = exc.__cause__
    return False
