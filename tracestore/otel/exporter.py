"""TraceStoreSpanExporter: an OpenTelemetry SDK SpanExporter writing each span as a trace through store_batch."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from tracestore.errors import InvalidTraceError
from tracestore.otel.mapping import span_to_trace
from tracestore.otel.otlp import DEFAULT_SESSION_ATTRIBUTES
from tracestore.store import TraceStore
from tracestore.types import TraceContext

logger = logging.getLogger("tracestore.otel")


class TraceStoreSpanExporter(SpanExporter):
    """Stores each exported span as one trace (tracestore.otel.mapping), a batch in one transaction.

    `store_or_url`: a TraceStore, which stays the caller's, or a URL, for a store the exporter owns and closes on
    shutdown(). `session_attributes`: the attribute keys whose values name a span's sessions.

    export() never raises into the instrumented application: a failure is logged on the "tracestore.otel"
    logger, counted in `failures` and answered with SpanExportResult.FAILURE. A span that cannot be mapped, or
    that the store refuses on its own, is left out and counted in `dropped`; the others are stored.
    """

    def __init__(
        self, store_or_url: TraceStore | str, *, session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES
    ) -> None:
        self._owned = isinstance(store_or_url, str)
        self.store = TraceStore(store_or_url) if isinstance(store_or_url, str) else store_or_url
        self.session_attributes = tuple(session_attributes)
        self.failures = 0
        self.dropped = 0
        self._shut_down = False
        # BatchSpanProcessor exports from its worker thread while shutdown() may come from another one.
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._shut_down:
                logger.warning("export of %d span(s) after shutdown: dropped", len(spans))
                self.failures += 1
                return SpanExportResult.FAILURE
            try:
                self._store(self._map(spans))
            except Exception:
                logger.exception("cannot store %d span(s)", len(spans))
                self.failures += 1
                return SpanExportResult.FAILURE
            return SpanExportResult.SUCCESS

    def _map(self, spans: Sequence[ReadableSpan]) -> list[TraceContext]:
        traces = []
        for span in spans:
            try:
                traces.append(span_to_trace(span, session_attributes=self.session_attributes))
            except Exception:
                logger.exception("cannot map span %r: dropped", getattr(span, "name", span))
                self.dropped += 1
        return traces

    def _store(self, traces: list[TraceContext]) -> None:
        if not traces:
            return
        try:
            self.store.store_batch(traces)
        except InvalidTraceError:
            # Refused before anything is written (e.g. NUL in a service name on PostgreSQL): find the culprits.
            for trace in traces:
                try:
                    self.store.store(trace)
                except InvalidTraceError:
                    logger.exception("store refused span trace %r: dropped", trace.id)
                    self.dropped += 1

    def shutdown(self) -> None:
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            if self._owned:
                self.store.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """True: every export() has written its spans before returning, so there is nothing buffered."""
        return True
