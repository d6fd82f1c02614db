"""TraceStoreSpanExporter with the real OpenTelemetry SDK, and the span-to-trace mapping, on both engines."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest
import sqlalchemy
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from sqlalchemy.orm import Session

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.orm import recent_traces
from tracestore.otel import TraceStoreSpanExporter, span_to_trace, span_trace_id


def _provider(exporter: object, *, batch: bool = False, **resource: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "svc", **resource}))
    processor = BatchSpanProcessor if batch else SimpleSpanProcessor
    provider.add_span_processor(processor(exporter))  # type: ignore[arg-type]
    return provider


@pytest.fixture
def store(backend: Backend) -> Iterator[TraceStore]:
    with TraceStore(backend.url) as trace_store:
        yield trace_store


@pytest.mark.parametrize("batch", [False, True], ids=["simple", "batch"])
def test_spans_land_in_their_session_newest_first(store: TraceStore, batch: bool) -> None:
    exporter = TraceStoreSpanExporter(store)
    provider = _provider(exporter, batch=batch)
    tracer = provider.get_tracer("app", "1.2")
    for i in range(3):
        with tracer.start_as_current_span(f"step-{i}", attributes={"session.id": "s1"}):
            pass
    with tracer.start_as_current_span("elsewhere", attributes={"session.id": "s2"}):
        pass
    assert provider.force_flush()
    traces = store.get_by_session_uid("s1")
    assert [t.data["scopeSpans"][0]["spans"][0]["name"] for t in traces] == ["step-2", "step-1", "step-0"]
    assert {t.namespace for t in traces} == {"svc"}
    assert {t.context_type for t in traces} == {"internal"}
    assert traces[0].data["scopeSpans"][0]["scope"] == {"name": "app", "version": "1.2"}
    assert exporter.failures == 0
    provider.shutdown()


def test_the_same_span_exported_twice_is_one_trace(store: TraceStore) -> None:
    memory = InMemorySpanExporter()
    tracer = _provider(memory).get_tracer("app")
    with tracer.start_as_current_span("once", attributes={"session.id": "s"}) as span:
        context = span.get_span_context()
    exporter = TraceStoreSpanExporter(store)
    spans = memory.get_finished_spans()
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    assert exporter.export(spans) == SpanExportResult.SUCCESS
    traces = store.get_by_session_uid("s")
    assert [t.id for t in traces] == [span_trace_id(context.trace_id, context.span_id)]


def test_sessions_from_the_resource_and_several_keys(store: TraceStore) -> None:
    exporter = TraceStoreSpanExporter(store)
    provider = _provider(exporter, **{"session.id": "from-resource"})
    tracer = provider.get_tracer("app")
    with tracer.start_as_current_span("a"):
        pass
    with tracer.start_as_current_span("b", attributes={"session.id": "own", "gen_ai.conversation.id": 7}):
        pass
    [a] = store.get_by_session_uid("from-resource")  # the span's own session.id wins over its resource's
    assert a.data["scopeSpans"][0]["spans"][0]["name"] == "a"
    [b] = store.get_by_session_uid("own")
    assert b.session_uids == ("7", "own")


def test_configured_session_attributes(store: TraceStore) -> None:
    exporter = TraceStoreSpanExporter(store, session_attributes=("user.id",))
    tracer = _provider(exporter).get_tracer("app")
    with tracer.start_as_current_span("a", attributes={"user.id": "u", "session.id": "ignored"}):
        pass
    assert len(store.get_by_session_uid("u")) == 1
    assert store.get_by_session_uid("ignored") == []


def test_non_finite_and_int_attributes_are_stored_as_json_strings(store: TraceStore, backend: Backend) -> None:
    exporter = TraceStoreSpanExporter(store)
    tracer = _provider(exporter).get_tracer("app")
    attributes = {"session.id": "s", "nan": float("nan"), "inf": float("inf"), "ninf": -float("inf"), "big": 2**63 - 1}
    with tracer.start_as_current_span("odd", attributes=attributes):
        pass
    [trace] = store.get_by_session_uid("s")
    values = {kv["key"]: kv["value"] for kv in trace.data["scopeSpans"][0]["spans"][0]["attributes"]}
    assert values["nan"] == {"doubleValue": "NaN"}
    assert values["inf"] == {"doubleValue": "Infinity"}
    assert values["ninf"] == {"doubleValue": "-Infinity"}
    assert values["big"] == {"intValue": str(2**63 - 1)}
    [(text,)] = backend.rows("SELECT data FROM traces")
    assert orjson.loads(text) == trace.data  # valid JSON text in the database, not NaN tokens


def test_events_links_status_and_parent(store: TraceStore) -> None:
    exporter = TraceStoreSpanExporter(store)
    tracer = _provider(exporter).get_tracer("app")
    with tracer.start_as_current_span("other") as other:
        pass
    with (
        tracer.start_as_current_span("parent", attributes={"session.id": "s"}) as parent,
        tracer.start_as_current_span(
            "child",
            kind=SpanKind.CLIENT,
            links=[Link(other.get_span_context(), {"why": "retry"})],
            attributes={"session.id": "s", "gen_ai.operation.name": "chat"},
        ) as child,
    ):
        child.add_event("token", {"n": 3})
        child.set_status(Status(StatusCode.ERROR, "boom"))
    newest_first = store.get_by_session_uid("s")
    child_trace = next(t for t in newest_first if t.data["scopeSpans"][0]["spans"][0]["name"] == "child")
    span = child_trace.data["scopeSpans"][0]["spans"][0]
    assert child_trace.context_type == "llm"
    assert span["kind"] == 3  # OTLP SPAN_KIND_CLIENT
    assert span["parentSpanId"] == f"{parent.get_span_context().span_id:016x}"
    assert span["events"] == [
        {
            "timeUnixNano": span["events"][0]["timeUnixNano"],
            "name": "token",
            "attributes": [{"key": "n", "value": {"intValue": "3"}}],
        }
    ]
    assert span["links"][0]["spanId"] == f"{other.get_span_context().span_id:016x}"
    assert span["links"][0]["attributes"] == [{"key": "why", "value": {"stringValue": "retry"}}]
    assert span["status"] == {"code": 2, "message": "boom"}


def test_a_broken_store_fails_the_export_without_raising(
    store: TraceStore, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    memory = InMemorySpanExporter()
    with _provider(memory).get_tracer("app").start_as_current_span("lost", attributes={"session.id": "s"}):
        pass
    exporter = TraceStoreSpanExporter(store)
    with backend.raw() as connection:
        connection.exec_driver_sql("DROP TABLE trace_sessions")
    with caplog.at_level(logging.ERROR, logger="tracestore.otel"):
        assert exporter.export(memory.get_finished_spans()) == SpanExportResult.FAILURE
    assert exporter.failures == 1
    assert "cannot store 1 span(s)" in caplog.text


def test_a_span_that_cannot_be_stored_alone_is_dropped(store: TraceStore) -> None:
    memory = InMemorySpanExporter()
    tracer = _provider(memory).get_tracer("app")
    with tracer.start_as_current_span("kept", attributes={"session.id": "s"}):
        pass
    with tracer.start_as_current_span("absurd", start_time=10**30, attributes={"session.id": "s"}):
        pass
    with tracer.start_as_current_span("nul", attributes={"session.id": "bad\x00id"}):
        pass
    exporter = TraceStoreSpanExporter(store)
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.SUCCESS
    assert [t.data["scopeSpans"][0]["spans"][0]["name"] for t in store.get_by_session_uid("s")] == ["kept"]
    dropped_nul = 0 if store.engine.dialect.name == "sqlite" else 1  # SQLite text stores NUL
    assert exporter.dropped == 1 + dropped_nul
    assert exporter.failures == 0


def test_shutdown_closes_an_owned_store_and_refuses_later_exports(backend: Backend) -> None:
    memory = InMemorySpanExporter()
    with _provider(memory).get_tracer("app").start_as_current_span("late", attributes={"session.id": "s"}):
        pass
    exporter = TraceStoreSpanExporter(backend.url)
    closed = []
    close = exporter.store.close
    exporter.store.close = lambda: (closed.append(True), close())  # type: ignore[method-assign]
    assert exporter.force_flush() is True
    exporter.shutdown()
    exporter.shutdown()
    assert closed == [True]
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.FAILURE
    assert backend.rows("SELECT count(*) FROM traces") == [(0,)]


def test_shutdown_leaves_a_callers_store_open(store: TraceStore) -> None:
    exporter = TraceStoreSpanExporter(store)
    exporter.shutdown()
    assert exporter.export([]) == SpanExportResult.FAILURE
    assert store.get_by_session_uid("s") == []  # still usable


def _one_span(**kwargs: object) -> ReadableSpan:
    memory = InMemorySpanExporter()
    tracer = _provider(memory, **{"deployment.environment": "test"}).get_tracer("lib", "0.1", schema_url="https://x")
    with tracer.start_as_current_span("work", **kwargs):  # type: ignore[arg-type]
        pass
    [span] = memory.get_finished_spans()
    return span


def test_mapping_of_every_attribute_type() -> None:
    attributes = {
        "s": "text",
        "b": True,
        "i": -5,
        "d": 1.5,
        "strs": ["a", "b"],
        "bools": [True, False],
        "ints": [1, 2],
        "doubles": [0.5, float("nan")],
        "gen_ai.operation.name": "execute_tool",
        "langfuse.session.id": "lf",
        "mlflow.trace.session": "ml",
    }
    span = _one_span(attributes=attributes, kind=SpanKind.SERVER)
    trace = span_to_trace(span)
    context = span.get_span_context()
    assert trace.id == f"{context.trace_id:032x}-{context.span_id:016x}"
    assert trace.created_at == span.start_time / 10**9
    assert (trace.namespace, trace.context_type, trace.session_uids) == ("svc", "tool", ("lf", "ml"))
    resource_spans = trace.data
    assert orjson.loads(orjson.dumps(resource_spans)) == resource_spans
    assert "schemaUrl" not in resource_spans  # the resource has none: proto3 JSON leaves it out
    assert {"key": "service.name", "value": {"stringValue": "svc"}} in resource_spans["resource"]["attributes"]
    scope_spans = resource_spans["scopeSpans"][0]
    assert scope_spans["scope"] == {"name": "lib", "version": "0.1"}
    assert scope_spans["schemaUrl"] == "https://x"
    [out] = scope_spans["spans"]
    assert out["traceId"] == f"{context.trace_id:032x}" and out["spanId"] == f"{context.span_id:016x}"
    assert "parentSpanId" not in out
    assert out["kind"] == 2  # OTLP SPAN_KIND_SERVER
    assert out["flags"] == int(context.trace_flags) | 0x100  # W3C flags; whether the parent is remote is known
    assert out["startTimeUnixNano"] == str(span.start_time) and out["endTimeUnixNano"] == str(span.end_time)
    assert out["status"] == {"code": 0}
    assert out["events"] == [] and out["links"] == []
    assert out["attributes"][:8] == [
        {"key": "s", "value": {"stringValue": "text"}},
        {"key": "b", "value": {"boolValue": True}},
        {"key": "i", "value": {"intValue": "-5"}},
        {"key": "d", "value": {"doubleValue": 1.5}},
        {"key": "strs", "value": {"arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}}},
        {"key": "bools", "value": {"arrayValue": {"values": [{"boolValue": True}, {"boolValue": False}]}}},
        {"key": "ints", "value": {"arrayValue": {"values": [{"intValue": "1"}, {"intValue": "2"}]}}},
        {"key": "doubles", "value": {"arrayValue": {"values": [{"doubleValue": 0.5}, {"doubleValue": "NaN"}]}}},
    ]


@pytest.mark.parametrize(
    ("attributes", "kind", "expected"),
    [
        ({}, SpanKind.INTERNAL, "internal"),
        ({}, SpanKind.CONSUMER, "consumer"),
        ({"gen_ai.system": "openai"}, SpanKind.CLIENT, "llm"),
        ({"gen_ai.operation.name": "chat"}, SpanKind.CLIENT, "llm"),
        ({"gen_ai.operation.name": "invoke_agent"}, SpanKind.INTERNAL, "agent"),
        ({"gen_ai.operation.name": "execute_tool"}, SpanKind.INTERNAL, "tool"),
    ],
)
def test_context_type_classification(attributes: dict[str, str], kind: SpanKind, expected: str) -> None:
    assert span_to_trace(_one_span(attributes=attributes, kind=kind)).context_type == expected


def test_a_span_without_service_name_or_sessions() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    with provider.get_tracer("app").start_as_current_span("bare", attributes={"session.id": ""}):
        pass
    trace = span_to_trace(memory.get_finished_spans()[0])
    assert (trace.namespace, trace.session_uids) == ("unknown_service", ())


def test_an_application_exports_through_its_own_engine_and_reads_with_its_own_session(backend: Backend) -> None:
    # An app already on SQLAlchemy: its Engine (not one tracestore made), the exporter on a store over it, and
    # the spans read back as Trace entities from the app's own Session.
    app_engine = sqlalchemy.create_engine(backend.url)
    try:
        with TraceStore(app_engine) as store:
            provider = _provider(TraceStoreSpanExporter(store), batch=True, **{"session.id": "app-session"})
            tracer = provider.get_tracer("app")
            for name in ("load", "answer"):
                with tracer.start_as_current_span(name, attributes={"gen_ai.operation.name": "chat"}):
                    pass
            provider.shutdown()
        with Session(app_engine) as session:
            traces = list(session.scalars(recent_traces("app-session", context_type="llm")))
        assert [t.data["scopeSpans"][0]["spans"][0]["name"] for t in traces] == ["answer", "load"]
        assert {t.namespace for t in traces} == {"svc"}
    finally:
        app_engine.dispose()
