"""tracestore: application traces in SQL, with fast time-bounded session queries."""

from tracestore.async_store import AsyncTraceStore
from tracestore.errors import (
    InvalidQueryError,
    InvalidTraceError,
    MigrationError,
    SchemaOutOfDateError,
    StorageBusyError,
    StorageError,
    TraceStoreError,
)
from tracestore.store import TraceStore
from tracestore.types import Page, PageCursor, TraceContext, new_trace_id

__all__ = [
    "AsyncTraceStore",
    "InvalidQueryError",
    "InvalidTraceError",
    "MigrationError",
    "Page",
    "PageCursor",
    "SchemaOutOfDateError",
    "StorageBusyError",
    "StorageError",
    "TraceContext",
    "TraceStore",
    "TraceStoreError",
    "new_trace_id",
]
