"""OpenTelemetry in: a SpanExporter for the SDK and the span-to-trace mapping it uses."""

from tracestore.otel.exporter import TraceStoreSpanExporter
from tracestore.otel.mapping import DEFAULT_SESSION_ATTRIBUTES, span_to_trace, span_trace_id

__all__ = ["DEFAULT_SESSION_ATTRIBUTES", "TraceStoreSpanExporter", "span_to_trace", "span_trace_id"]
