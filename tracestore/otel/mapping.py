"""How an OpenTelemetry SDK span becomes a TraceContext: its id, time, service, kind, sessions and OTLP/JSON data."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, SpanContext
from opentelemetry.util.types import Attributes

from tracestore.otel.otlp import DEFAULT_SESSION_ATTRIBUTES, finite_or_text, resource_spans_json, trace_of
from tracestore.types import TraceContext

# OTLP's SpanFlags: bit 8 says whether bit 9 (the parent or linked context is remote) is known.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200


def span_trace_id(trace_id: int, span_id: int) -> str:
    """The tracestore id of a span: its OTel trace id and span id in hex, so a span exported again updates it."""
    return f"{trace_id:032x}-{span_id:016x}"


def span_to_trace(
    span: ReadableSpan, *, session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES
) -> TraceContext:
    """One trace holding `span`, built as a span received over OTLP is (otlp.trace_of); InvalidTraceError (or
    ValueError for a span without context or start time) if it cannot be stored."""
    if span.context is None or span.start_time is None:
        raise ValueError(f"span {span.name!r} has no context or no start time")
    return trace_of(resource_spans(span), session_attributes=session_attributes)


def resource_spans(span: ReadableSpan) -> dict[str, Any]:
    """`span` with its resource and scope as one canonical OTLP/JSON ResourceSpans (tracestore.otel.otlp)."""
    scope = span.instrumentation_scope
    scope_json: dict[str, Any] = {}
    if scope is not None:
        if scope.name:
            scope_json["name"] = scope.name
        if scope.version:
            scope_json["version"] = scope.version
        if scope.attributes:
            scope_json["attributes"] = key_values(scope.attributes)
    resource = span.resource
    return resource_spans_json(
        {"attributes": key_values({} if resource is None else resource.attributes)},
        "" if resource is None else resource.schema_url,
        scope_json,
        "" if scope is None else scope.schema_url or "",
        span_json(span),
    )


def span_json(span: ReadableSpan) -> dict[str, Any]:
    """The OTLP/JSON Span (proto3 JSON: ids in hex, 64-bit integers as strings, enums as integers)."""
    context = span.context
    assert context is not None  # span_to_trace refuses a span without one
    out: dict[str, Any] = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    _put_trace_state(out, context)
    parent = span.parent
    if parent is not None:
        out["parentSpanId"] = f"{parent.span_id:016x}"
    out["flags"] = _flags(context, parent)
    out["name"] = span.name
    out["kind"] = span.kind.value + 1  # the SDK counts from INTERNAL = 0, OTLP from UNSPECIFIED = 0
    out["startTimeUnixNano"] = str(span.start_time)
    if span.end_time:
        out["endTimeUnixNano"] = str(span.end_time)
    out["attributes"] = key_values(span.attributes)
    _put_count(out, "droppedAttributesCount", span.dropped_attributes)
    out["events"] = [
        _with_count(
            {"timeUnixNano": str(event.timestamp), "name": event.name, "attributes": key_values(event.attributes)},
            "droppedAttributesCount",
            getattr(event, "dropped_attributes", 0),
        )
        for event in span.events
    ]
    _put_count(out, "droppedEventsCount", span.dropped_events)
    out["links"] = [_link_json(link) for link in span.links]
    _put_count(out, "droppedLinksCount", span.dropped_links)
    status: dict[str, Any] = {"code": span.status.status_code.value}  # UNSET, OK, ERROR: 0, 1, 2 in both
    if span.status.description:
        status["message"] = span.status.description
    out["status"] = status
    return out


def _link_json(link: Link) -> dict[str, Any]:
    context = link.context
    out: dict[str, Any] = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}"}
    _put_trace_state(out, context)
    out["attributes"] = key_values(link.attributes)
    _put_count(out, "droppedAttributesCount", link.dropped_attributes)
    out["flags"] = _flags(context, context)
    return out


def _flags(context: SpanContext, remote_of: SpanContext | None) -> int:
    flags = int(context.trace_flags) | _HAS_IS_REMOTE
    return flags | _IS_REMOTE if remote_of is not None and remote_of.is_remote else flags


def _put_trace_state(out: dict[str, Any], context: SpanContext) -> None:
    if context.trace_state:
        out["traceState"] = context.trace_state.to_header()


def _put_count(out: dict[str, Any], key: str, count: int) -> None:
    if count:  # proto3 JSON leaves zero values out
        out[key] = count


def _with_count(out: dict[str, Any], key: str, count: int) -> dict[str, Any]:
    _put_count(out, key, count)
    return out


def key_values(attributes: Attributes | Mapping[str, Any]) -> list[dict[str, Any]]:
    """OTLP/JSON KeyValue list of `attributes`, in their order."""
    return [{"key": key, "value": any_value(value)} for key, value in (attributes or {}).items()]


def any_value(value: object) -> dict[str, Any]:
    """OTLP/JSON AnyValue: ints as strings, NaN and infinities as "NaN"/"Infinity"/"-Infinity", bytes in base64,
    so the result is plain JSON that decodes back to an equal value."""
    if isinstance(value, str):
        return {"stringValue": value}
    if isinstance(value, bool):  # before int: a bool is an int
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": finite_or_text(value)}
    if isinstance(value, bytes | bytearray):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": key_values(value)}}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [any_value(item) for item in value]}}
    if value is None:
        return {}  # an AnyValue with no value set: the SDK keeps None inside sequences
    return {"stringValue": str(value)}
