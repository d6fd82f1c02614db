"""tracestore.otel.otlp: OTLP request bodies to traces and traces back to OTLP/JSON, without a database."""

from __future__ import annotations

import base64
import dataclasses
import math
from typing import Any

import orjson
import pytest
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from tracestore import TraceContext
from tracestore.otel import otlp
from tracestore.otel.mapping import span_to_trace

TRACE_ID = "5b8efff798038103d269b633813fc60c"
SPAN_ID = "eee19b7ec3c1b174"


def finished_spans(make: Any, resource: dict[str, Any] | None = None) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource or {"service.name": "svc"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    make(provider.get_tracer("lib", "1.2", schema_url="https://opentelemetry.io/schemas/1.26.0"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def some_spans(tracer: Any) -> None:
    attributes = {"i": 7, "f": 1.5, "nan": math.nan, "inf": -math.inf, "b": True, "s": ["x", "y"], "session.id": "s1"}
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER, attributes=attributes) as parent:
        parent.add_event("event", {"k": "v"})
        with tracer.start_as_current_span("child", links=[Link(parent.get_span_context(), {"l": 2})]) as child:
            child.set_attribute("gen_ai.operation.name", "execute_tool")
            child.set_status(Status(StatusCode.ERROR, "bad"))


def without_trace_flags(trace: TraceContext) -> TraceContext:
    """The SDK's own OTLP encoder sends only the is-remote bits of a span's flags, not its W3C trace flags."""
    data = orjson.loads(orjson.dumps(trace.data))
    for item in (data["scopeSpans"][0]["spans"][0], *data["scopeSpans"][0]["spans"][0]["links"]):
        item["flags"] &= ~0xFF
    return dataclasses.replace(trace, data=data)


def json_request(*spans: dict[str, Any], resource: list[dict[str, Any]] | None = None) -> bytes:
    resource = resource if resource is not None else [{"key": "service.name", "value": {"stringValue": "svc"}}]
    return orjson.dumps(
        {"resourceSpans": [{"resource": {"attributes": resource}, "scopeSpans": [{"spans": list(spans)}]}]}
    )


def json_span(**fields: Any) -> dict[str, Any]:
    span = {"traceId": TRACE_ID, "spanId": SPAN_ID, "name": "op", "kind": 2, "startTimeUnixNano": "1700000000000000000"}
    span.update(fields)
    return {key: value for key, value in span.items() if value is not None}


# -- the same span by every road ----------------------------------------------------------------------------
def test_the_sdks_protobuf_request_decodes_to_the_exporters_traces() -> None:
    spans = finished_spans(some_spans)
    decoded = otlp.decode_request(encode_spans(spans).SerializeToString(), otlp.PROTOBUF)
    assert decoded.rejected == []
    assert decoded.traces == [without_trace_flags(span_to_trace(span)) for span in spans]
    child, parent = decoded.traces
    assert (child.context_type, parent.context_type) == ("tool", "server")
    assert list(parent.session_uids) == ["s1"] and parent.namespace == "svc"
    assert parent.created_at == spans[1].start_time / 10**9


def test_a_stored_span_exports_as_json_the_receiver_decodes_to_the_same_trace() -> None:
    traces = [span_to_trace(span) for span in finished_spans(some_spans)]
    body = orjson.dumps(otlp.export_request(otlp.resource_spans_of(trace) for trace in traces))
    assert otlp.decode_request(body, otlp.JSON) == otlp.Decoded(traces, [])


attribute_values = st.one_of(
    st.text(alphabet=st.characters(exclude_categories=["Cs"])),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(st.text(max_size=5), max_size=3),
)
attributes = st.dictionaries(st.text(min_size=1, max_size=20), attribute_values, max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.text(max_size=30),
    kind=st.sampled_from(list(SpanKind)),
    span_attributes=attributes,
    resource_attributes=attributes,
    event_attributes=attributes,
    session=st.text(min_size=1, max_size=10, alphabet=st.characters(exclude_categories=["Cs"])),
)
def test_round_trip_span_to_trace_to_otlp_json_to_trace(
    name: str,
    kind: SpanKind,
    span_attributes: dict[str, Any],
    resource_attributes: dict[str, Any],
    event_attributes: dict[str, Any],
    session: str,
) -> None:
    def make(tracer: Any) -> None:
        with tracer.start_as_current_span(name, kind=kind, attributes=span_attributes) as span:
            span.add_event("e", event_attributes)
            span.set_attribute("session.id", session)

    spans = finished_spans(make, {**resource_attributes, "service.name": "svc"})
    trace = span_to_trace(spans[0])
    line = orjson.dumps(otlp.export_request([otlp.resource_spans_of(trace)]))
    assert otlp.decode_request(line, otlp.JSON) == otlp.Decoded([trace], [])
    # and through protobuf, as an OTLP exporter would send it
    assert otlp.decode_request(encode_spans(spans).SerializeToString(), otlp.PROTOBUF).traces == [
        without_trace_flags(trace)
    ]


# -- OTLP/JSON as people write it ----------------------------------------------------------------------------
def test_hand_written_json_is_read_as_proto3_json_allows() -> None:
    body = json_request(
        json_span(
            traceId=TRACE_ID.upper(),
            kind="SPAN_KIND_CLIENT",
            startTimeUnixNano=1700000000000000000,  # a number, not a string
            endTimeUnixNano="1700000000500000000",
            attributes=[
                {"key": "session.id", "value": {"stringValue": "chat-1"}},
                {"key": "n", "value": {"intValue": 5}},
                {"key": "d", "value": {"doubleValue": "Infinity"}},
                {"key": "raw", "value": {"bytesValue": base64.urlsafe_b64encode(b"\xfb\xff").decode().rstrip("=")}},
            ],
            status={"code": "STATUS_CODE_OK"},
            unknownField={"ignored": True},
        )
    )
    (trace,) = otlp.decode_request(body, otlp.JSON).traces
    span = trace.data["scopeSpans"][0]["spans"][0]
    assert trace.id == f"{TRACE_ID}-{SPAN_ID}" and list(trace.session_uids) == ["chat-1"]
    assert (trace.context_type, trace.namespace, trace.created_at) == ("client", "svc", 1700000000.0)
    assert span["kind"] == 3 and span["status"] == {"code": 1} and "unknownField" not in span
    assert span["attributes"][1:] == [
        {"key": "n", "value": {"intValue": "5"}},
        {"key": "d", "value": {"doubleValue": "Infinity"}},
        {"key": "raw", "value": {"bytesValue": base64.b64encode(b"\xfb\xff").decode()}},
    ]


def test_sessions_come_from_the_span_then_its_resource_and_are_configurable() -> None:
    resource = [
        {"key": "service.name", "value": {"stringValue": "svc"}},
        {"key": "session.id", "value": {"stringValue": "from-resource"}},
    ]
    span = json_span(attributes=[{"key": "langfuse.session.id", "value": {"stringValue": "lf"}}])
    (trace,) = otlp.decode_request(json_request(span, resource=resource), otlp.JSON).traces
    assert list(trace.session_uids) == ["from-resource", "lf"]
    (trace,) = otlp.decode_request(json_request(span, resource=resource), otlp.JSON, session_attributes=["x"]).traces
    assert list(trace.session_uids) == []


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"traceId": "00" * 16}, "malformed trace id"),
        ({"traceId": "abc"}, "malformed trace id"),
        ({"spanId": "zz" * 8}, "malformed span id"),
        ({"startTimeUnixNano": None}, "no start time"),
        ({"startTimeUnixNano": "-5"}, "absurd timestamp"),
        ({"startTimeUnixNano": str(2**64)}, "absurd timestamp"),
        ({"endTimeUnixNano": "1600000000000000000"}, "ends before it starts"),
        ({"links": [{"traceId": TRACE_ID, "spanId": "1"}]}, "malformed link span id"),
    ],
)
def test_a_span_refused_on_its_own_is_left_out_with_a_message(fields: dict[str, Any], message: str) -> None:
    good = json_span(spanId="0000000000000001")
    decoded = otlp.decode_request(json_request(json_span(**fields), good), otlp.JSON)
    assert [trace.id for trace in decoded.traces] == [f"{TRACE_ID}-0000000000000001"]
    assert len(decoded.rejected) == 1 and message in decoded.rejected[0]


def test_a_protobuf_span_with_a_short_id_is_refused_on_its_own() -> None:
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    spans.add(trace_id=bytes.fromhex(TRACE_ID), span_id=b"\x01" * 4, name="bad", start_time_unix_nano=1)
    spans.add(trace_id=bytes.fromhex(TRACE_ID), span_id=b"\x01" * 8, name="good", start_time_unix_nano=1)
    decoded = otlp.decode_request(request.SerializeToString(), otlp.PROTOBUF)
    assert [trace.data["scopeSpans"][0]["spans"][0]["name"] for trace in decoded.traces] == ["good"]
    assert decoded.traces[0].namespace == otlp.UNKNOWN_SERVICE
    assert "malformed span id" in decoded.rejected[0]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xfe garbage", otlp.PROTOBUF),
        (b"not json", otlp.JSON),
        (b'{"resourceSpans": [{"resource": "x"}]}', otlp.JSON),
        (b'{"resourceSpans": {}}', otlp.JSON),
        (b"[]", otlp.JSON),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5}]}]}]}', otlp.JSON),
        (json_request(json_span(attributes=[{"key": "k", "value": {"boolValue": 1}}])), otlp.JSON),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"kind": "SPAN_KIND_NOPE"}]}]}]}', otlp.JSON),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "caf\xe9"}]}]}]}', otlp.JSON),  # not UTF-8
        (b"{}", "text/plain"),
    ],
)
def test_a_body_that_does_not_decode_is_refused_whole(body: bytes, content_type: str) -> None:
    with pytest.raises(otlp.OtlpDecodeError):
        otlp.decode_request(body, content_type)


def test_invalid_utf8_in_a_protobuf_string_does_not_decode() -> None:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add(name="xx")
    span.trace_id = bytes.fromhex(TRACE_ID)
    body = request.SerializeToString().replace(b"xx", b"\xff\xfe")
    with pytest.raises(otlp.OtlpDecodeError):
        otlp.decode_request(body, otlp.PROTOBUF)


def test_an_empty_request_has_no_traces() -> None:
    assert otlp.decode_request(b"", otlp.PROTOBUF) == otlp.Decoded()
    assert otlp.decode_request(b"{}", otlp.JSON) == otlp.Decoded()


# -- answers ----------------------------------------------------------------------------------------------
def test_responses_are_what_an_otlp_client_decodes() -> None:
    response = ExportTraceServiceResponse.FromString(otlp.response_body(otlp.PROTOBUF, rejected=2, message="why"))
    assert (response.partial_success.rejected_spans, response.partial_success.error_message) == (2, "why")
    assert not ExportTraceServiceResponse.FromString(otlp.response_body(otlp.PROTOBUF)).HasField("partial_success")
    assert orjson.loads(otlp.response_body(otlp.JSON, rejected=2, message="why")) == {
        "partialSuccess": {"rejectedSpans": "2", "errorMessage": "why"}
    }
    assert orjson.loads(otlp.response_body(otlp.JSON)) == {}
    status = status_pb2.Status.FromString(otlp.status_body(otlp.PROTOBUF, "bad body, é" * 20, 400))
    assert (status.code, status.message) == (3, "bad body, é" * 20)
    assert orjson.loads(otlp.status_body("text/plain", "busy", 503)) == {"code": 14, "message": "busy"}


# -- traces that did not come through OpenTelemetry --------------------------------------------------------
def test_other_traces_export_as_spans_built_from_their_fields() -> None:
    trace = TraceContext(
        context_type="chat",
        namespace="app",
        data={"messages": ["héllo"]},
        metadata={"user": 1},
        session_uids=["a", "b"],
        created_at=1700000000.25,
        id="my-trace",
    )
    resource_spans = otlp.resource_spans_of(trace)
    span = resource_spans["scopeSpans"][0]["spans"][0]
    assert span["name"] == "chat" and span["startTimeUnixNano"] == "1700000000250000000"
    assert resource_spans["scopeSpans"][0]["scope"] == {"name": "tracestore"}
    values = otlp.attribute_values(span["attributes"])
    assert values == {
        "tracestore.id": "my-trace",
        "session.id": ["a", "b"],
        "tracestore.data": '{"messages":["héllo"]}',
        "tracestore.metadata": '{"user":1}',
    }
    (again,) = otlp.decode_request(orjson.dumps(otlp.export_request([resource_spans])), otlp.JSON).traces
    assert (again.namespace, again.session_uids, again.created_at) == ("app", ("a", "b"), 1700000000.25)
    assert again.id == f"{span['traceId']}-{span['spanId']}" and again.data == resource_spans
    # exported again, it is now a span that came through OpenTelemetry: the same span, not a new one
    assert otlp.resource_spans_of(again) == resource_spans


def test_recent_shows_a_spans_name_and_status_instead_of_its_resource() -> None:
    from tracestore.cli.reads import trace_line

    (trace,) = [span_to_trace(span) for span in finished_spans(lambda tracer: tracer.start_span("lookup").end())]
    assert otlp.span_of(trace) == trace.data["scopeSpans"][0]["spans"][0]
    assert trace_line(trace).endswith('  svc  internal  {"span":"lookup","status":0}')
    other = TraceContext(context_type="chat", namespace="app", data={"resource": 1}, id="x")
    assert otlp.span_of(other) is None and trace_line(other).endswith('{"resource":1}')
