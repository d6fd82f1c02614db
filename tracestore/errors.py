"""The library's exception hierarchy: every error a caller can see from tracestore."""

from __future__ import annotations


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
