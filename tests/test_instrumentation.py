"""Instrumentation sees the store: with a listener on an Engine's cursor events (OpenTelemetry's SQLAlchemy
instrumentation, a plain `before_cursor_execute` hook, one on the Engine class) or echo on, every statement the
stores run goes through SQLAlchemy's execution, whenever the listener was registered; without one, the store's
statements go straight to the driver (tracestore.drive; the cost of each path: benchmarks/instrumented.py).

Every test runs on SQLite and PostgreSQL; those taking `either` on TraceStore and on AsyncTraceStore.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import Connection, Engine, event

from tests.backends import Backend
from tests.oracle import make_trace
from tests.test_app_engine import App
from tests.test_parity import Blocking
from tracestore import AsyncTraceStore, TraceStore

T0 = 1_700_000_000.0


def is_session_query(statement: str) -> bool:
    """The store's read of one session: the composite index's table, newest first."""
    flat = " ".join(statement.split())
    return flat.startswith("SELECT") and "FROM trace_sessions AS ts" in flat and "ORDER BY ts.created_at DESC" in flat


@pytest.fixture(params=["sync", "async"])
def either(request: pytest.FixtureRequest, backend: Backend) -> Iterator[App]:
    """An application's engine on `backend` (sync or async), with no store open yet."""
    app = App(backend, request.param)
    try:
        yield app
    finally:
        app.close()


@pytest.fixture
def spans() -> Iterator[tuple[SQLAlchemyInstrumentor, TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = SQLAlchemyInstrumentor()
    try:
        yield instrumentor, provider, exporter
    finally:
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()


def test_opentelemetry_spans_name_the_stores_queries(
    either: App, spans: tuple[SQLAlchemyInstrumentor, TracerProvider, InMemorySpanExporter]
) -> None:
    instrumentor, provider, exporter = spans
    app = either
    store = app.open_store()
    # After the store opened. The package declares SQLAlchemy < 2.1 and would refuse 2.1 without a word but a
    # logged error; its event hooks are the same.
    instrumentor.instrument(engine=app.sync_engine, tracer_provider=provider, skip_dep_check=True)
    trace = make_trace(session_uids=["s"], created_at=T0)
    store.store(trace)
    assert store.get_by_session_uid("s", since=T0 - 1, limit=10) == [trace]
    statements = [(span.name, str(span.attributes.get("db.statement", ""))) for span in exporter.get_finished_spans()]
    assert any(name.startswith("SELECT") and is_session_query(sql) for name, sql in statements), statements
    assert any(name.startswith("INSERT") and "INTO traces" in sql for name, sql in statements), statements


def test_a_listener_registered_after_the_store_opened_sees_every_statement(either: App) -> None:
    """On an application's engine and on the store's own (created from a URL), for every kind of call."""
    app = either
    for store in (app.open_store(), _store_on_url(app)):
        engine = store.engine if isinstance(store.engine, Engine) else store.engine.sync_engine
        seen: list[str] = []

        def record(conn: Connection, cursor: Any, statement: str, *args: Any, seen: list[str] = seen) -> None:
            seen.append(" ".join(statement.split()))

        event.listen(engine, "before_cursor_execute", record)
        try:
            for name, call in every_call(store):
                before = len(seen)
                call()
                assert len(seen) > before, f"{name}: no statement seen"
            assert any(is_session_query(statement) for statement in seen)
        finally:
            event.remove(engine, "before_cursor_execute", record)
        store.close()


def every_call(store: Any) -> list[tuple[str, Callable[[], Any]]]:
    traces = [make_trace(session_uids=["s", "t"], created_at=T0 + i) for i in range(3)]
    return [
        ("store_batch", lambda: store.store_batch(traces)),
        ("get", lambda: store.get(traces[0].id)),
        ("get_by_session_uid", lambda: store.get_by_session_uid("s", since=T0, limit=2)),
        ("query", lambda: store.query(namespace="web", limit=2)),
        ("page_by_session_uid", lambda: store.page_by_session_uid("s", limit=2)),
        ("get_by_session_uids", lambda: store.get_by_session_uids(["s", "t"], limit=2)),
        ("tail", lambda: next(store.tail("s", since=T0, poll_interval=0))),
        ("delete", lambda: store.delete(traces[0].id)),
        ("prune", lambda: store.prune(T0 + 1)),
    ]


def _store_on_url(app: App) -> Any:
    """A store of the same kind that creates (and owns) its engine from the URL."""
    if app.loop is None:
        return TraceStore(app.backend.url)
    return Blocking(AsyncTraceStore(app.backend.async_url), app.loop)


def test_a_listener_on_the_engine_class_sees_the_session_query(backend: Backend) -> None:
    seen: list[str] = []

    def record(conn: Connection, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    with TraceStore(backend.url) as store:
        store.store(make_trace(session_uids=["s"], created_at=T0))
        event.listen(Engine, "before_cursor_execute", record)
        try:
            assert len(store.get_by_session_uid("s")) == 1
        finally:
            event.remove(Engine, "before_cursor_execute", record)
        assert any(is_session_query(statement) for statement in seen)
        seen.clear()
        store.get_by_session_uid("s")  # removed: the fast path again
        assert seen == []


def test_echo_shows_the_session_query(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    engine = sqlalchemy.create_engine(backend.url, echo=True)
    try:
        with TraceStore(engine) as store, caplog.at_level(logging.INFO, logger="sqlalchemy.engine"):
            store.store(make_trace(session_uids=["s"], created_at=T0))
            caplog.clear()
            store.get_by_session_uid("s")
        assert any(is_session_query(record.getMessage()) for record in caplog.records)
    finally:
        engine.dispose()


def test_without_a_listener_the_store_bypasses_sqlalchemys_execution(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path: no listener, no echo, and the store's reads and writes never reach exec_driver_sql (the
    BEGIN of a write transaction on a store's own SQLite engine does: it is a begin hook)."""
    calls: list[str] = []
    real = Connection.exec_driver_sql

    def counted(self: Connection, statement: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(statement)
        return real(self, statement, *args, **kwargs)

    with TraceStore(backend.url) as store:
        monkeypatch.setattr(Connection, "exec_driver_sql", counted)
        store.store_batch([make_trace(session_uids=["s"], created_at=T0)])
        store.get_by_session_uid("s")
        assert [statement for statement in calls if not statement.startswith("BEGIN")] == []
        event.listen(store.engine, "after_cursor_execute", lambda *args: None)
        store.get_by_session_uid("s")
        assert any(is_session_query(statement) for statement in calls)
