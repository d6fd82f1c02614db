"""How an OpenTelemetry SDK span becomes a TraceContext: its id, time, service, kind, sessions and OTLP/JSON data."""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Link, SpanContext
from opentelemetry.util.types import Attributes

from tracestore.types import TraceContext

# Attribute keys naming a span's session in the conventions of OpenTelemetry, Langfuse and MLflow.
DEFAULT_SESSION_ATTRIBUTES: tuple[str, ...] = (
    "session.id",
    "gen_ai.conversation.id",
    "langfuse.session.id",
    "mlflow.trace.session",
)
UNKNOWN_SERVICE = "unknown_service"

# OTLP's SpanFlags: bit 8 says whether bit 9 (the parent or linked context is remote) is known.
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200
_AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent"})


def span_trace_id(trace_id: int, span_id: int) -> str:
    """The tracestore id of a span: its OTel trace id and span id in hex, so a span exported again updates it."""
    return f"{trace_id:032x}-{span_id:016x}"


def span_to_trace(
    span: ReadableSpan, *, session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES
) -> TraceContext:
    """One trace holding `span`; InvalidTraceError (or ValueError for a span without context) if it cannot be stored."""
    context = span.context
    if context is None or span.start_time is None:
        raise ValueError(f"span {span.name!r} has no context or no start time")
    resource_attributes = _attributes_of(span.resource)
    span_attributes = span.attributes or {}
    return TraceContext(
        id=span_trace_id(context.trace_id, context.span_id),
        created_at=span.start_time / 1e9,
        context_type=classify(span),
        namespace=str(resource_attributes.get("service.name") or "") or UNKNOWN_SERVICE,
        data=resource_spans(span),
        session_uids=session_uids(span_attributes, resource_attributes, session_attributes),
    )


def classify(span: ReadableSpan) -> str:
    """The context_type: "tool", "agent" or "llm" for a GenAI span (gen_ai.* attributes), else the span kind
    ("internal", "server", "client", "producer", "consumer")."""
    attributes = span.attributes or {}
    operation = attributes.get("gen_ai.operation.name")
    if operation == "execute_tool":
        return "tool"
    if operation in _AGENT_OPERATIONS:
        return "agent"
    if operation is not None or attributes.get("gen_ai.system") is not None:
        return "llm"
    return span.kind.name.lower()


def session_uids(
    span_attributes: Mapping[str, Any], resource_attributes: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """The sessions named by `keys`, each taken from the span or else its resource; a sequence names several."""
    uids: list[str] = []
    for key in keys:
        value = span_attributes.get(key)
        if value is None:
            value = resource_attributes.get(key)
        values = value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else (value,)
        uids.extend(text for text in (_text(item) for item in values) if text)
    return uids


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def resource_spans(span: ReadableSpan) -> dict[str, Any]:
    """`span` with its resource and scope as one OTLP/JSON ResourceSpans: wrapped in {"resourceSpans": [...]},
    a list of them is an ExportTraceServiceRequest body an OTLP/HTTP receiver takes as is."""
    scope = span.instrumentation_scope
    scope_json: dict[str, Any] = {}
    scope_spans: dict[str, Any] = {"scope": scope_json, "spans": [span_json(span)]}
    if scope is not None:
        scope_json["name"] = scope.name
        if scope.version:
            scope_json["version"] = scope.version
        if scope.attributes:
            scope_json["attributes"] = key_values(scope.attributes)
        if scope.schema_url:
            scope_spans["schemaUrl"] = scope.schema_url
    resource = span.resource
    out: dict[str, Any] = {"resource": {"attributes": key_values(_attributes_of(resource))}}
    if resource is not None and resource.schema_url:
        out["schemaUrl"] = resource.schema_url
    out["scopeSpans"] = [scope_spans]
    return out


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
    if span.end_time is not None:
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


def _attributes_of(resource: Resource | None) -> Mapping[str, Any]:
    return {} if resource is None else resource.attributes


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
        return {"doubleValue": value if math.isfinite(value) else _non_finite(value)}
    if isinstance(value, bytes | bytearray):
        return {"bytesValue": base64.b64encode(value).decode("ascii")}
    if isinstance(value, Mapping):
        return {"kvlistValue": {"values": key_values(value)}}
    if isinstance(value, Sequence):
        return {"arrayValue": {"values": [any_value(item) for item in value]}}
    if value is None:
        return {}  # an AnyValue with no value set: the SDK keeps None inside sequences
    return {"stringValue": str(value)}


def _non_finite(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"
