"""OTLP in and out without the SDK: request bodies (protobuf or JSON) to traces, traces back to OTLP/JSON spans.

Every span, whichever way it arrives (an OTLP/HTTP request in either encoding, or the SDK through
TraceStoreSpanExporter), is first put in one canonical OTLP/JSON form, a ResourceSpans holding that span alone; the
trace is then built from that form by one function (`trace_of`), so the same span makes the same trace by any road.
The canonical form is proto3 JSON as the OTLP specification writes it (ids in lowercase hex, enums as integers,
64-bit integers as strings, NaN and infinities as strings, bytes in base64), with a fixed choice of which empty
fields appear: a span always has its name, kind, start time, attributes, events, links and status; zero counts,
empty strings and an unset end time are left out.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import functools
import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from tracestore.errors import InvalidTraceError, TraceStoreError
from tracestore.types import TraceContext

PROTOBUF = "application/x-protobuf"
JSON = "application/json"

# Attribute keys naming a span's session in the conventions of OpenTelemetry, Langfuse and MLflow.
DEFAULT_SESSION_ATTRIBUTES: tuple[str, ...] = (
    "session.id",
    "gen_ai.conversation.id",
    "langfuse.session.id",
    "mlflow.trace.session",
)
UNKNOWN_SERVICE = "unknown_service"
SERVICE_NAME = "service.name"
# The span attributes classify() reads.
_CLASSIFYING = ("gen_ai.operation.name", "gen_ai.system")
# The scope name of the spans built from traces that did not come through OpenTelemetry.
SCOPE_NAME = "tracestore"

# OTLP's SpanKind, by its enum number (the context_type of a span that is not a GenAI one).
SPAN_KINDS = ("unspecified", "internal", "server", "client", "producer", "consumer")
_KIND_NUMBERS = {f"SPAN_KIND_{name.upper()}": number for number, name in enumerate(SPAN_KINDS)}
_STATUS_NUMBERS = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_AGENT_OPERATIONS = frozenset({"invoke_agent", "create_agent"})
# Integers on both sides: Python divides them exactly rounded, so epoch seconds survive a trip through nanoseconds.
NANOSECONDS = 1_000_000_000
_UINT64 = (1 << 64) - 1
_INT64 = (-(1 << 63), (1 << 63) - 1)
_UINT32 = (1 << 32) - 1
_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}
# google.rpc.Code of an error answer, by HTTP status (OTLP/HTTP puts a google.rpc.Status in the body).
_RPC_CODES = {400: 3, 413: 8, 415: 3, 429: 8, 500: 13, 503: 14}


class OtlpDecodeError(TraceStoreError):
    """The body is not an ExportTraceServiceRequest in the encoding it claims (HTTP 400; nothing is stored)."""


class SpanRefused(ValueError):
    """One span that cannot be stored on its own (a malformed id, an absurd timestamp): the others can."""


@dataclass(frozen=True)
class Decoded:
    """The traces of one request, in its order, and a message for each span left out."""

    traces: list[TraceContext] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)


# -- requests in -------------------------------------------------------------------------------------
def decode_request(
    body: bytes, content_type: str, *, session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES
) -> Decoded:
    """The traces of an ExportTraceServiceRequest `body` (already decompressed) in `content_type`, PROTOBUF or JSON.

    OtlpDecodeError for a body that does not decode as one; a span that decodes but cannot be stored is left out
    with a message in `rejected`.
    """
    if content_type == PROTOBUF:
        items = _protobuf_resource_spans(body)
    elif content_type == JSON:
        items = _json_resource_spans(body)
    else:
        raise OtlpDecodeError(f"unsupported content type {content_type!r}: send {PROTOBUF} or {JSON}")
    decoded = Decoded()
    keys = _keys(tuple(session_attributes))
    resource_values: dict[int, dict[str, Any]] = {}  # by resource: the spans of one ResourceSpans share it
    for item in items:
        if isinstance(item, SpanRefused):
            decoded.rejected.append(str(item))
            continue
        try:
            resource_spans = item
            resource = resource_spans["resource"]
            values = resource_values.get(id(resource))
            if values is None:
                values = resource_values[id(resource)] = attribute_values(resource["attributes"], keys.resource)
            decoded.traces.append(_trace(resource_spans, values, keys))
        except InvalidTraceError as exc:
            decoded.rejected.append(str(exc))
    return decoded


class _Keys:
    """The attribute keys a trace is built from: only their values are decoded."""

    def __init__(self, session_attributes: Sequence[str]) -> None:
        self.sessions = tuple(session_attributes)
        self.span = frozenset((*self.sessions, *_CLASSIFYING))
        self.resource = frozenset((SERVICE_NAME, *self.sessions))


@functools.lru_cache(maxsize=16)
def _keys(session_attributes: tuple[str, ...]) -> _Keys:
    # The exporter maps span by span: the key sets are made once per configuration, not once per span.
    return _Keys(session_attributes)


def trace_of(
    resource_spans: Mapping[str, Any], *, session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES
) -> TraceContext:
    """The trace holding the one span of a canonical ResourceSpans; SpanRefused if it cannot be stored."""
    keys = _keys(tuple(session_attributes))
    return _trace(resource_spans, attribute_values(resource_spans["resource"]["attributes"], keys.resource), keys)


def _trace(resource_spans: Mapping[str, Any], resource_values: Mapping[str, Any], keys: _Keys) -> TraceContext:
    span = resource_spans["scopeSpans"][0]["spans"][0]
    span_values = attribute_values(span["attributes"], keys.span)
    return TraceContext(
        id=f"{span['traceId']}-{span['spanId']}",
        created_at=int(span["startTimeUnixNano"]) / NANOSECONDS,
        context_type=classify(span["kind"], span_values),
        namespace=_text(resource_values.get(SERVICE_NAME)) or UNKNOWN_SERVICE,
        data=resource_spans,
        session_uids=session_uids(span_values, resource_values, keys.sessions),
    )


def classify(kind: int, attributes: Mapping[str, Any]) -> str:
    """The context_type: "tool", "agent" or "llm" for a GenAI span (gen_ai.* attributes), else the span kind
    ("internal", "server", "client", "producer", "consumer", or "unspecified")."""
    operation = attributes.get("gen_ai.operation.name")
    if operation == "execute_tool":
        return "tool"
    if operation in _AGENT_OPERATIONS:
        return "agent"
    if operation is not None or attributes.get("gen_ai.system") is not None:
        return "llm"
    return SPAN_KINDS[kind] if 0 <= kind < len(SPAN_KINDS) else SPAN_KINDS[0]


def session_uids(
    span_attributes: Mapping[str, Any], resource_attributes: Mapping[str, Any], keys: Iterable[str]
) -> list[str]:
    """The sessions named by `keys`, each taken from the span or else its resource; an array names several."""
    uids: list[str] = []
    for key in keys:
        value = span_attributes.get(key)
        if value is None:
            value = resource_attributes.get(key)
        if value is None:
            continue
        if isinstance(value, str):  # the usual case, without the generic path's allocations
            if value:
                uids.append(value)
            continue
        values = value if isinstance(value, list) else (value,)
        uids.extend(text for text in (_text(item) for item in values) if text)
    return uids


def _text(value: object) -> str:
    if value is None or isinstance(value, bytes | dict):
        return ""
    return value if isinstance(value, str) else str(value)


def attribute_values(key_values: Sequence[Mapping[str, Any]], keys: Collection[str] | None = None) -> dict[str, Any]:
    """Canonical KeyValues as a dict of plain values (the first of a repeated key), only `keys` if given."""
    values: dict[str, Any] = {}
    for item in key_values:
        key = item["key"]
        if (keys is None or key in keys) and key not in values:
            values[key] = plain_value(item["value"])
    return values


def plain_value(any_value: Mapping[str, Any]) -> Any:
    """A canonical AnyValue as the Python value it holds (lists for arrays, dicts for kvlists, None if empty)."""
    for kind, value in any_value.items():
        if kind == "stringValue" or kind == "boolValue":
            return value
        if kind == "intValue":
            return int(value)
        if kind == "doubleValue":
            return _NON_FINITE[value] if isinstance(value, str) else value
        if kind == "bytesValue":
            return base64.b64decode(value)
        if kind == "arrayValue":
            return [plain_value(item) for item in value.get("values", ())]
        if kind == "kvlistValue":
            return attribute_values(value.get("values", ()))
    return None


# -- protobuf ---------------------------------------------------------------------------------------------
# What a request body decodes to: per span, its canonical ResourceSpans or why it is refused on its own.
_Items = list[dict[str, Any] | SpanRefused]


def _protobuf_resource_spans(body: bytes) -> _Items:
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RuntimeError) as exc:  # upb raises DecodeError; invalid UTF-8 too
        raise OtlpDecodeError(f"the body is not a protobuf ExportTraceServiceRequest: {exc}") from exc
    items: _Items = []
    for resource_spans in request.resource_spans:
        resource = {"attributes": _pb_key_values(resource_spans.resource.attributes)}
        _put_count(resource, "droppedAttributesCount", resource_spans.resource.dropped_attributes_count)
        resource_schema = resource_spans.schema_url
        for scope_spans in resource_spans.scope_spans:
            scope = _pb_scope(scope_spans.scope)
            scope_schema = scope_spans.schema_url
            for span in scope_spans.spans:
                try:
                    items.append(resource_spans_json(resource, resource_schema, scope, scope_schema, _pb_span(span)))
                except SpanRefused as refused:
                    items.append(refused)
    return items


def resource_spans_json(
    resource: dict[str, Any], resource_schema: str, scope: dict[str, Any], scope_schema: str, span: dict[str, Any]
) -> dict[str, Any]:
    scope_spans: dict[str, Any] = {"scope": scope}
    if scope_schema:
        scope_spans["schemaUrl"] = scope_schema
    scope_spans["spans"] = [span]
    out: dict[str, Any] = {"resource": resource}
    if resource_schema:
        out["schemaUrl"] = resource_schema
    out["scopeSpans"] = [scope_spans]
    return out


def _pb_scope(scope: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if scope.name:
        out["name"] = scope.name
    if scope.version:
        out["version"] = scope.version
    if len(scope.attributes):
        out["attributes"] = _pb_key_values(scope.attributes)
    _put_count(out, "droppedAttributesCount", scope.dropped_attributes_count)
    return out


def _pb_span(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"traceId": _hex_id(span.trace_id, 16, "trace"), "spanId": _hex_id(span.span_id, 8, "span")}
    if span.trace_state:
        out["traceState"] = span.trace_state
    if span.parent_span_id:
        out["parentSpanId"] = _hex_id(span.parent_span_id, 8, "parent span")
    _put_count(out, "flags", span.flags)
    out["name"] = span.name
    out["kind"] = span.kind
    _put_times(out, span.start_time_unix_nano, span.end_time_unix_nano)
    out["attributes"] = _pb_key_values(span.attributes)
    _put_count(out, "droppedAttributesCount", span.dropped_attributes_count)
    out["events"] = [_pb_event(event) for event in span.events]
    _put_count(out, "droppedEventsCount", span.dropped_events_count)
    out["links"] = [_pb_link(link) for link in span.links]
    _put_count(out, "droppedLinksCount", span.dropped_links_count)
    status: dict[str, Any] = {"code": span.status.code}
    if span.status.message:
        status["message"] = span.status.message
    out["status"] = status
    return out


def _pb_event(event: Any) -> dict[str, Any]:
    out = {
        "timeUnixNano": str(event.time_unix_nano),
        "name": event.name,
        "attributes": _pb_key_values(event.attributes),
    }
    _put_count(out, "droppedAttributesCount", event.dropped_attributes_count)
    return out


def _pb_link(link: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": _hex_id(link.trace_id, 16, "link trace"),
        "spanId": _hex_id(link.span_id, 8, "link span"),
    }
    if link.trace_state:
        out["traceState"] = link.trace_state
    out["attributes"] = _pb_key_values(link.attributes)
    _put_count(out, "droppedAttributesCount", link.dropped_attributes_count)
    _put_count(out, "flags", link.flags)
    return out


def _pb_key_values(key_values: Any) -> list[dict[str, Any]]:
    out = []
    for item in key_values:
        value = item.value
        # Most attributes are strings: read them without the call of the general case (a third of decoding).
        if value.WhichOneof("value") == "string_value":
            out.append({"key": item.key, "value": {"stringValue": value.string_value}})
        else:
            out.append({"key": item.key, "value": _pb_any_value(value)})
    return out


def _pb_any_value(value: Any) -> dict[str, Any]:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return {"stringValue": value.string_value}
    if kind == "int_value":
        return {"intValue": str(value.int_value)}
    if kind == "bool_value":
        return {"boolValue": value.bool_value}
    if kind == "double_value":
        return {"doubleValue": finite_or_text(value.double_value)}
    if kind == "array_value":
        return {"arrayValue": {"values": [_pb_any_value(item) for item in value.array_value.values]}}
    if kind == "kvlist_value":
        return {"kvlistValue": {"values": _pb_key_values(value.kvlist_value.values)}}
    if kind == "bytes_value":
        return {"bytesValue": base64.b64encode(value.bytes_value).decode("ascii")}
    return {}


def _hex_id(raw: bytes, size: int, what: str) -> str:
    if len(raw) != size or not any(raw):
        raise SpanRefused(f"malformed {what} id {raw.hex()!r}: it must be {size} bytes, not all zero")
    return raw.hex()


# -- JSON -------------------------------------------------------------------------------------------------
class _Shape(Exception):
    """The JSON body is not an ExportTraceServiceRequest (a field of the wrong type)."""


def _json_resource_spans(body: bytes) -> _Items:
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:  # invalid JSON or invalid UTF-8
        raise OtlpDecodeError(f"the body is not JSON: {exc}") from exc
    try:
        items: _Items = []
        for resource_spans in _list(_object(request, "request"), "resourceSpans"):
            resource_spans = _object(resource_spans, "resourceSpans")
            resource_json = _object(resource_spans.get("resource", {}), "resource")
            resource = {"attributes": _json_key_values(resource_json)}
            _put_count(resource, "droppedAttributesCount", _uint(resource_json, "droppedAttributesCount", _UINT32))
            resource_schema = _string(resource_spans, "schemaUrl")
            for scope_spans in _list(resource_spans, "scopeSpans"):
                scope_spans = _object(scope_spans, "scopeSpans")
                scope = _json_scope(_object(scope_spans.get("scope", {}), "scope"))
                scope_schema = _string(scope_spans, "schemaUrl")
                for span in _list(scope_spans, "spans"):
                    items.append(_json_item(resource, resource_schema, scope, scope_schema, _object(span, "span")))
    except _Shape as exc:
        raise OtlpDecodeError(f"the body is not an OTLP/JSON ExportTraceServiceRequest: {exc}") from exc
    return items


def _json_item(
    resource: dict[str, Any], resource_schema: str, scope: dict[str, Any], scope_schema: str, span: dict[str, Any]
) -> dict[str, Any] | SpanRefused:
    # A span of the wrong shape makes the whole request undecodable (_Shape); a span refused on its own does not.
    refused: list[str] = []
    shaped = _json_span(span, refused)
    if refused:
        return SpanRefused(refused[0])
    return resource_spans_json(resource, resource_schema, scope, scope_schema, shaped)


def _json_scope(scope: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("name", "version"):
        value = _string(scope, key)
        if value:
            out[key] = value
    attributes = _json_key_values(scope)
    if attributes:
        out["attributes"] = attributes
    _put_count(out, "droppedAttributesCount", _uint(scope, "droppedAttributesCount", _UINT32))
    return out


def _json_span(span: dict[str, Any], refused: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": _json_id(span, "traceId", 16, refused),
        "spanId": _json_id(span, "spanId", 8, refused),
    }
    trace_state = _string(span, "traceState")
    if trace_state:
        out["traceState"] = trace_state
    if span.get("parentSpanId"):
        out["parentSpanId"] = _json_id(span, "parentSpanId", 8, refused)
    _put_count(out, "flags", _uint(span, "flags", _UINT32))
    out["name"] = _string(span, "name")
    out["kind"] = _enum(span, "kind", _KIND_NUMBERS)
    try:
        _put_times(out, _time(span, "startTimeUnixNano"), _time(span, "endTimeUnixNano"))
    except SpanRefused as exc:
        refused.append(str(exc))
    out["attributes"] = _json_key_values(span)
    _put_count(out, "droppedAttributesCount", _uint(span, "droppedAttributesCount", _UINT32))
    out["events"] = [_json_event(_object(event, "event"), refused) for event in _list(span, "events")]
    _put_count(out, "droppedEventsCount", _uint(span, "droppedEventsCount", _UINT32))
    out["links"] = [_json_link(_object(link, "link"), refused) for link in _list(span, "links")]
    _put_count(out, "droppedLinksCount", _uint(span, "droppedLinksCount", _UINT32))
    status_json = _object(span.get("status", {}), "status")
    status: dict[str, Any] = {"code": _enum(status_json, "code", _STATUS_NUMBERS)}
    message = _string(status_json, "message")
    if message:
        status["message"] = message
    out["status"] = status
    return out


def _json_event(event: dict[str, Any], refused: list[str]) -> dict[str, Any]:
    try:
        time = str(_time(event, "timeUnixNano"))
    except SpanRefused as exc:
        refused.append(str(exc))
        time = "0"
    out = {"timeUnixNano": time, "name": _string(event, "name"), "attributes": _json_key_values(event)}
    _put_count(out, "droppedAttributesCount", _uint(event, "droppedAttributesCount", _UINT32))
    return out


def _json_link(link: dict[str, Any], refused: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "traceId": _json_id(link, "traceId", 16, refused, "link trace"),
        "spanId": _json_id(link, "spanId", 8, refused, "link span"),
    }
    trace_state = _string(link, "traceState")
    if trace_state:
        out["traceState"] = trace_state
    out["attributes"] = _json_key_values(link)
    _put_count(out, "droppedAttributesCount", _uint(link, "droppedAttributesCount", _UINT32))
    _put_count(out, "flags", _uint(link, "flags", _UINT32))
    return out


def _json_key_values(owner: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for item in _list(owner, "attributes" if "attributes" in owner else "values"):
        item = _object(item, "attribute")
        out.append({"key": _string(item, "key"), "value": _json_any_value(_object(item.get("value", {}), "value"))})
    return out


def _json_any_value(value: dict[str, Any]) -> dict[str, Any]:
    if "stringValue" in value:
        return {"stringValue": _string(value, "stringValue")}
    if "boolValue" in value:
        flag = value["boolValue"]
        if not isinstance(flag, bool):
            raise _Shape(f"boolValue {flag!r} is not true or false")
        return {"boolValue": flag}
    if "intValue" in value:
        return {"intValue": str(_integer(value["intValue"], "intValue", _INT64))}
    if "doubleValue" in value:
        return {"doubleValue": _double(value["doubleValue"])}
    if "arrayValue" in value:
        array = _object(value["arrayValue"], "arrayValue")
        return {"arrayValue": {"values": [_json_any_value(_object(item, "value")) for item in _list(array, "values")]}}
    if "kvlistValue" in value:
        return {"kvlistValue": {"values": _json_key_values(_object(value["kvlistValue"], "kvlistValue"))}}
    if "bytesValue" in value:
        text = _string(value, "bytesValue")
        try:
            raw = base64.b64decode(text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True)
        except binascii.Error as exc:
            raise _Shape(f"bytesValue {text[:40]!r} is not base64") from exc
        return {"bytesValue": base64.b64encode(raw).decode("ascii")}
    return {}


def _json_id(owner: dict[str, Any], key: str, size: int, refused: list[str], what: str | None = None) -> str:
    text = _string(owner, key)
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != size or not any(raw) or len(text) != 2 * size:
        refused.append(f"malformed {what or key[:-2]} id {text[:64]!r}: it must be {2 * size} hex digits, not all zero")
        return text
    return raw.hex()


def _time(owner: dict[str, Any], key: str) -> int:
    value = owner.get(key, 0)
    try:
        return _integer(value, key, (0, _UINT64))
    except _Shape as exc:
        if isinstance(value, int | str) and not isinstance(value, bool):
            raise SpanRefused(f"absurd timestamp {key} {value!r}: {exc}") from None
        raise


def _put_times(out: dict[str, Any], start: int, end: int) -> None:
    if start == 0:
        raise SpanRefused("the span has no start time (startTimeUnixNano is 0 or missing)")
    if end and end < start:
        raise SpanRefused(f"the span ends before it starts (endTimeUnixNano {end} < startTimeUnixNano {start})")
    out["startTimeUnixNano"] = str(start)
    if end:
        out["endTimeUnixNano"] = str(end)


def _enum(owner: dict[str, Any], key: str, names: Mapping[str, int]) -> int:
    value = owner.get(key, 0)
    if isinstance(value, str) and value in names:
        return names[value]
    return _integer(value, key, (-(1 << 31), (1 << 31) - 1))


def _uint(owner: dict[str, Any], key: str, top: int) -> int:
    return _integer(owner.get(key, 0), key, (0, top))


def _integer(value: object, key: str, bounds: tuple[int, int]) -> int:
    # proto3 JSON takes 64-bit integers as strings or numbers.
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            number = None
    if number is None:
        raise _Shape(f"{key} {value!r} is not an integer")
    if not bounds[0] <= number <= bounds[1]:
        raise _Shape(f"{key} {value!r} is out of range")
    return number


def _double(value: object) -> float | str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return finite_or_text(float(value))
    if isinstance(value, str):
        if value in _NON_FINITE:
            return value
        try:
            return finite_or_text(float(value))
        except ValueError:
            pass
    raise _Shape(f"doubleValue {value!r} is not a number")


def _object(value: object, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Shape(f"{what} is {type(value).__name__}, not an object")
    return value


def _list(owner: dict[str, Any], key: str) -> list[Any]:
    value = owner.get(key, [])
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Shape(f"{key} is {type(value).__name__}, not an array")
    return value


def _string(owner: dict[str, Any], key: str) -> str:
    value = owner.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _Shape(f"{key} {value!r} is not a string")
    return value


# -- shared ---------------------------------------------------------------------------------------------
def finite_or_text(value: float) -> float | str:
    """A double as OTLP/JSON writes it: NaN and infinities as "NaN", "Infinity", "-Infinity"."""
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def _put_count(out: dict[str, Any], key: str, count: int) -> None:
    if count:  # proto3 JSON leaves zero values out
        out[key] = count


# -- responses --------------------------------------------------------------------------------------------
def response_body(content_type: str, *, rejected: int = 0, message: str = "") -> bytes:
    """An ExportTraceServiceResponse (partial_success when `rejected` > 0) in the request's encoding."""
    if content_type == PROTOBUF:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        response = ExportTraceServiceResponse()
        if rejected or message:
            response.partial_success.rejected_spans = rejected
            response.partial_success.error_message = message
        return bytes(response.SerializeToString())
    if not (rejected or message):
        return b"{}"
    return orjson.dumps({"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}})


def status_body(content_type: str, message: str, code: int) -> bytes:
    """A google.rpc.Status for an error answer with HTTP status `code`, in the request's encoding (JSON unless
    the request was protobuf)."""
    rpc_code = _RPC_CODES.get(code, 2)  # 2: UNKNOWN
    if content_type != PROTOBUF:
        return orjson.dumps({"code": rpc_code, "message": message})
    # Status { int32 code = 1; string message = 2; }: two fields, written by hand to need no googleapis package.
    text = message.encode("utf-8")
    return b"\x08" + _varint(rpc_code) + b"\x12" + _varint(len(text)) + text


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte = number & 0x7F
        number >>= 7
        if number:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# -- traces out -------------------------------------------------------------------------------------------
def resource_spans_of(trace: TraceContext) -> dict[str, Any]:
    """The OTLP/JSON ResourceSpans (holding one span) `trace` exports as.

    A trace that came through OpenTelemetry exports its span as it came in (its `data`, recognised by its id
    being the span's). Any other trace becomes a span built from its fields: trace and span ids from a SHA-256 of
    the trace id, name = context_type, kind INTERNAL, start = end = created_at, service.name = namespace, and the
    attributes `tracestore.id`, `session.id` (a string, or an array for several sessions), `tracestore.data` and
    `tracestore.metadata` (JSON text).
    """
    if span_of(trace) is not None:
        return dict(trace.data)
    digest = hashlib.sha256(trace.id.encode("utf-8", "surrogatepass")).hexdigest()
    start = str(max(1, round(decimal.Decimal(repr(trace.created_at)) * NANOSECONDS)))
    attributes = [{"key": "tracestore.id", "value": {"stringValue": trace.id}}]
    uids = list(trace.session_uids)
    if len(uids) == 1:
        attributes.append({"key": "session.id", "value": {"stringValue": uids[0]}})
    elif uids:
        values = [{"stringValue": uid} for uid in uids]
        attributes.append({"key": "session.id", "value": {"arrayValue": {"values": values}}})
    # Plain orjson: a trace read from the store holds JSON values already (encode_json checked them on the way in).
    attributes.append({"key": "tracestore.data", "value": {"stringValue": orjson.dumps(trace.data).decode()}})
    if trace.metadata:
        metadata = orjson.dumps(trace.metadata).decode()
        attributes.append({"key": "tracestore.metadata", "value": {"stringValue": metadata}})
    span = {
        "traceId": digest[:32],
        "spanId": digest[32:48],
        "name": trace.context_type,
        "kind": 1,
        "startTimeUnixNano": start,
        "endTimeUnixNano": start,
        "attributes": attributes,
        "events": [],
        "links": [],
        "status": {"code": 0},
    }
    resource = {"attributes": [{"key": SERVICE_NAME, "value": {"stringValue": trace.namespace}}]}
    return resource_spans_json(resource, "", {"name": SCOPE_NAME}, "", span)


def span_of(trace: TraceContext) -> dict[str, Any] | None:
    """The OTLP/JSON span a trace that came through OpenTelemetry holds (its id is the span's), else None."""
    data = trace.data
    try:
        span = data["scopeSpans"][0]["spans"][0]
        if f"{span['traceId']}-{span['spanId']}" == trace.id and "resource" in data:
            return dict(span)
    except (TypeError, KeyError, IndexError):
        pass
    return None


def export_request(resource_spans: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """{"resourceSpans": [...]}: an OTLP/JSON ExportTraceServiceRequest that an OTLP/HTTP receiver takes as is."""
    return {"resourceSpans": list(resource_spans)}
