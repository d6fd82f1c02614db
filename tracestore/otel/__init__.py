"""OpenTelemetry in and out: a SpanExporter for the SDK (TraceStoreSpanExporter), and the OTLP mapping it shares
with `tracestore serve` (tracestore.otel.server) and `tracestore export` (tracestore.otel.otlp)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tracestore.otel.otlp import DEFAULT_SESSION_ATTRIBUTES

if TYPE_CHECKING:
    from tracestore.otel.exporter import TraceStoreSpanExporter
    from tracestore.otel.mapping import span_to_trace, span_trace_id

__all__ = ["DEFAULT_SESSION_ATTRIBUTES", "TraceStoreSpanExporter", "span_to_trace", "span_trace_id"]


def __getattr__(name: str) -> Any:
    # The SDK is imported only by what needs it: tracestore.otel.otlp (export, serve) works without it.
    if name == "TraceStoreSpanExporter":
        from tracestore.otel.exporter import TraceStoreSpanExporter

        return TraceStoreSpanExporter
    if name in ("span_to_trace", "span_trace_id"):
        from tracestore.otel import mapping

        return getattr(mapping, name)
    raise AttributeError(f"module 'tracestore.otel' has no attribute {name!r}")
