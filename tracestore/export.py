"""Streaming export of stored traces to a byte stream: JSON Lines of their fields, or OTLP/JSON requests.

Both formats are written a page at a time as the store reads them (TraceStore.iter_traces: keyset pages, oldest
first), so an export holds one page in memory whatever the number of traces:

* `jsonl`: one JSON object per trace per line, the object `tracestore recent --json` prints (`trace_record`);
* `otlp-json`: the OpenTelemetry File Exporter format, JSON Lines of OTLP/JSON ExportTraceServiceRequests, one
  request per page holding one ResourceSpans per trace (tracestore.otel.otlp.resource_spans_of): every line can
  be POSTed as is to an OTLP/HTTP receiver (`tracestore serve`), and a Collector's `otlpjsonfile` receiver reads
  the file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import islice
from typing import IO, Any

import orjson

from tracestore.errors import InvalidQueryError
from tracestore.store import TraceStore
from tracestore.types import TraceContext

FORMATS = ("jsonl", "otlp-json")
DEFAULT_PAGE_SIZE = 1000

OnProgress = Callable[[int], None]


def trace_record(trace: TraceContext) -> dict[str, Any]:
    """A trace as the JSON object the command line prints and `jsonl` exports, one key per field."""
    return {
        "id": trace.id,
        "context_type": trace.context_type,
        "namespace": trace.namespace,
        "data": trace.data,
        "metadata": trace.metadata,
        "session_uids": trace.session_uids,
        "created_at": trace.created_at,
        "updated_at": trace.updated_at,
    }


def export_traces(
    store: TraceStore,
    out: IO[bytes],
    *,
    session_uid: str | None = None,
    since: float | None = None,
    until: float | None = None,
    format: str = "jsonl",
    page_size: int = DEFAULT_PAGE_SIZE,
    on_progress: OnProgress | None = None,
) -> int:
    """Write the traces with since <= created_at < until (of `session_uid`, or all) to `out`, oldest first (ties:
    id ascending), a page of `page_size` at a time; the number of traces written.

    `on_progress(done)` after each page. Nothing is written for an empty range. InvalidQueryError for an
    unknown format or bad bounds, before anything is read.
    """
    if format not in FORMATS:
        raise InvalidQueryError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    # Checked here: islice would read nothing, and so check nothing, for a size of 0.
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise InvalidQueryError(f"page_size must be a positive int, got {page_size!r}")
    write_page = _otlp_page if format == "otlp-json" else _jsonl_page
    traces = store.iter_traces(session_uid=session_uid, since=since, until=until, page_size=page_size)
    done = 0
    for page in _pages(traces, page_size):
        out.write(write_page(page))
        done += len(page)
        if on_progress is not None:
            on_progress(done)
    return done


def _pages(traces: Iterator[TraceContext], size: int) -> Iterator[list[TraceContext]]:
    """The traces again in lists of `size` (the store's pages, which it reads `size` at a time)."""
    while page := list(islice(traces, size)):
        yield page


def _jsonl_page(page: list[TraceContext]) -> bytes:
    return b"".join([orjson.dumps(trace_record(trace)) + b"\n" for trace in page])


def _otlp_page(page: list[TraceContext]) -> bytes:
    # Imported here: the export side of otlp needs neither the SDK nor protobuf, and jsonl needs neither.
    from tracestore.otel import otlp

    return orjson.dumps(otlp.export_request([otlp.resource_spans_of(trace) for trace in page])) + b"\n"
