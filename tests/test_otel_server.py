"""`tracestore serve`, the OTLP/HTTP receiver, as a real process fed by the real SDK exporter, on both engines."""

from __future__ import annotations

import gzip
import http.client
import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import create_engine, make_url
from starlette.testclient import TestClient

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.otel.server import create_app, receiver_store

TRACESTORE = Path(sys.executable).with_name("tracestore")
ROOT = Path(__file__).resolve().parent.parent
# The module's servers take small bodies, so the 413 tests send little.
MAX_BODY = 200_000
START_TIMEOUT = 30.0
JSON = "application/json"
PROTOBUF = "application/x-protobuf"


# -- a database and a server process per engine, shared by the module ---------------------------------------------
@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backend]:
    """This module's database, at head (conftest parametrizes `backend` over the engines)."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("serve") / "traces.db"
        chosen = Backend("sqlite", make_url(f"sqlite:///{path}"), path)
        TraceStore(chosen.url).close()
        yield chosen
        chosen.dispose()
        return
    server_url = request.getfixturevalue("pg_server_url")
    template = request.getfixturevalue("pg_head_template")
    name = f"tracestore_serve_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        chosen = Backend("postgresql", server_url.set(drivername="postgresql+psycopg", database=name))
        yield chosen
        chosen.dispose()
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


@dataclass
class Server:
    process: subprocess.Popen[str]
    base: str

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)


@contextmanager
def running(url: str, *options: str) -> Iterator[Server]:
    """`tracestore --url URL serve --port 0` in its own process, once it serves; killed if still running after."""
    command = [str(TRACESTORE), "--url", url, "serve", "--host", "127.0.0.1", "--port", "0", *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once requests are served
        assert "receiving OTLP/HTTP on http://127.0.0.1:" in line, (line, process.stderr and process.stderr.read())
        base = line.split("on ", 1)[1].split("/v1/traces", 1)[0]
        yield Server(process, base)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(backend: Backend) -> Iterator[Server]:
    with running(backend.url, "--max-body-bytes", str(MAX_BODY)) as started:
        yield started
        assert started.stop() == 0


@pytest.fixture
def reader(backend: Backend) -> Iterator[TraceStore]:
    with TraceStore(backend.url, auto_upgrade=False) as store:
        yield store


# -- helpers -------------------------------------------------------------------------------------------------------
def post(base: str, body: bytes, content_type: str | None = JSON, **headers: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{base}/v1/traces", data=body, method="POST")
    if content_type is not None:
        request.add_header("Content-Type", content_type)
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def healthy(base: str) -> bool:
    with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
        return bool(response.status == 200)


def count(backend: Backend) -> int:
    return int(backend.rows("SELECT count(*) FROM traces")[0][0])


def span_json(name: str, session: str, *, service: str = "svc", start: str | None = None, **fields: Any) -> dict:
    trace_id = uuid.uuid4().hex
    return {
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
        "scopeSpans": [
            {
                "scope": {"name": "hand"},
                "spans": [
                    {
                        "traceId": trace_id,
                        "spanId": trace_id[:16],
                        "name": name,
                        "kind": 2,
                        "startTimeUnixNano": start or str(time.time_ns()),
                        "attributes": [{"key": "session.id", "value": {"stringValue": session}}],
                        **fields,
                    }
                ],
            }
        ],
    }


def request_json(*resource_spans: dict) -> bytes:
    return json.dumps({"resourceSpans": list(resource_spans)}).encode()


def session() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


# -- the real SDK exporter and a hand-written request land in their session ------------------------------------------
@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip], ids=["plain", "gzip"])
def test_the_sdk_protobuf_exporter_lands_spans_in_their_session(
    server: Server, reader: TraceStore, compression: Compression
) -> None:
    uid = session()
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "checkout"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("app")
    for i in range(3):
        with tracer.start_as_current_span(f"step-{i}", attributes={"session.id": uid}):
            pass
    exporter = OTLPSpanExporter(endpoint=f"{server.base}/v1/traces", compression=compression, timeout=10)
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    traces = reader.get_by_session_uid(uid)
    assert [t.data["scopeSpans"][0]["spans"][0]["name"] for t in traces] == ["step-2", "step-1", "step-0"]
    assert {t.namespace for t in traces} == {"checkout"}


def test_a_hand_written_otlp_json_request_lands_in_its_session(server: Server, reader: TraceStore) -> None:
    uid = session()
    body = request_json(span_json("first", uid, start="1700000000000000000"), span_json("second", uid))
    status, headers, answer = post(server.base, body, "application/json; charset=utf-8")
    assert (status, headers["content-type"], json.loads(answer)) == (200, JSON, {})
    traces = reader.get_by_session_uid(uid)
    assert [t.data["scopeSpans"][0]["spans"][0]["name"] for t in traces] == ["second", "first"]
    assert [t.context_type for t in traces] == ["server", "server"]


def test_a_huge_attribute_under_the_limit_is_stored_whole(server: Server, reader: TraceStore) -> None:
    uid = session()
    huge = "x" * (MAX_BODY - 2000)
    span = span_json("big", uid)
    span["scopeSpans"][0]["spans"][0]["attributes"].append({"key": "prompt", "value": {"stringValue": huge}})
    status, _, _ = post(server.base, request_json(span))
    assert status == 200
    [trace] = reader.get_by_session_uid(uid)
    attributes = trace.data["scopeSpans"][0]["spans"][0]["attributes"]
    assert {"key": "prompt", "value": {"stringValue": huge}} in attributes


# -- bad input: a 4xx, nothing stored, the server still serving --------------------------------------------------------
def _invalid_utf8_protobuf() -> bytes:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name, span.start_time_unix_nano = b"\x01" * 16, b"\x02" * 8, "NAME", 1
    return request.SerializeToString().replace(b"NAME", b"\xff\xfe\xfd\xfc")


_VALID = request_json(span_json("never-stored", "bad-input"))
_BAD_INPUT = {
    "garbage-protobuf": (PROTOBUF, b"\xff\xff\xff garbage", {}, 400),
    "garbage-json": (JSON, b"{not json", {}, 400),
    "json-but-not-otlp": (JSON, b'{"resourceSpans": 5}', {}, 400),
    "json-array": (JSON, b"[1, 2]", {}, 400),
    "span-of-the-wrong-shape": (JSON, b'{"resourceSpans": [{"scopeSpans": [{"spans": ["x"]}]}]}', {}, 400),
    "invalid-utf8-in-protobuf": (PROTOBUF, _invalid_utf8_protobuf(), {}, 400),
    "wrong-content-type": ("text/plain", _VALID, {}, 415),
    "no-content-type": (None, _VALID, {}, 415),
    "unknown-encoding": (JSON, _VALID, {"Content_Encoding": "br"}, 415),
    "truncated-gzip": (JSON, gzip.compress(_VALID)[:-12], {"Content_Encoding": "gzip"}, 400),
    "not-gzip": (JSON, _VALID, {"Content_Encoding": "gzip"}, 400),
    "oversize": (JSON, _VALID + b" " * MAX_BODY, {}, 413),
    "gzip-bomb": (JSON, gzip.compress(_VALID + b" " * (50 * MAX_BODY)), {"Content_Encoding": "gzip"}, 413),
}


@pytest.mark.parametrize("case", _BAD_INPUT)
def test_bad_input_gets_a_4xx_and_nothing_is_stored(server: Server, backend: Backend, case: str) -> None:
    content_type, body, headers, expected = _BAD_INPUT[case]
    before = count(backend)
    status, answer_headers, answer = post(server.base, body, content_type, **headers)
    assert status == expected
    answer_type = content_type if content_type in (JSON, PROTOBUF) else JSON
    assert answer_headers["content-type"] == answer_type
    if answer_type == JSON:
        assert set(json.loads(answer)) == {"code", "message"}  # a google.rpc.Status
    assert count(backend) == before
    assert healthy(server.base)


def test_spans_refused_on_their_own_are_counted_in_partial_success(server: Server, backend: Backend) -> None:
    uid = session()
    bad = [
        span_json("no-start", uid, start="0"),
        span_json("ends-before-it-starts", uid, start="1700000000000000000", endTimeUnixNano="1600000000000000000"),
        span_json("start-past-uint64", uid, start="99999999999999999999999"),
        span_json("short-id", uid),
    ]
    bad[3]["scopeSpans"][0]["spans"][0]["traceId"] = "abc"
    before = count(backend)
    status, _, answer = post(server.base, request_json(span_json("fine", uid), *bad))
    assert status == 200
    partial = json.loads(answer)["partialSuccess"]
    assert partial["rejectedSpans"] == "4"
    assert "4 span(s) rejected" in partial["errorMessage"]
    assert count(backend) == before + 1
    assert healthy(server.base)


def test_nul_in_a_service_name_or_session_id(server: Server, backend: Backend, reader: TraceStore) -> None:
    uid = session()
    spans = [span_json("fine", uid), span_json("nul-service", uid, service="s\x00vc"), span_json("x", f"{uid}\x00")]
    before = count(backend)
    status, _, answer = post(server.base, request_json(*spans))
    assert status == 200
    if backend.is_sqlite:  # SQLite's text holds NUL: all stored
        assert json.loads(answer) == {}
        assert count(backend) == before + 3
    else:  # PostgreSQL's cannot: those two spans are counted out, the other one stored
        partial = json.loads(answer)["partialSuccess"]
        assert partial["rejectedSpans"] == "2"
        assert "NUL" in partial["errorMessage"]
        assert [t.namespace for t in reader.get_by_session_uid(uid)] == ["svc"]
        assert count(backend) == before + 1


def test_a_protobuf_request_gets_a_protobuf_answer(server: Server) -> None:
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name, span.start_time_unix_nano = b"\x01" * 16, b"\x00" * 8, "zero-id", 1
    status, headers, answer = post(server.base, request.SerializeToString(), PROTOBUF)
    assert (status, headers["content-type"]) == (200, PROTOBUF)
    response = ExportTraceServiceResponse.FromString(answer)
    assert response.partial_success.rejected_spans == 1
    assert "malformed span id" in response.partial_success.error_message


# -- a locked database: 503 with Retry-After, in time ----------------------------------------------------------------
@contextmanager
def write_lock(backend: Backend, *, at_most: float = 5.0) -> Iterator[None]:
    """Another connection holds the lock every write of the store needs until the block ends, or `at_most`
    seconds have passed (so that a receiver that waits for it without bound fails the test instead of hanging)."""
    if backend.is_sqlite:
        assert backend.path is not None
        connection = sqlite3.connect(backend.path, isolation_level=None, check_same_thread=False)
        connection.execute("BEGIN IMMEDIATE")

        def release() -> None:
            connection.execute("ROLLBACK")
            connection.close()

    else:
        pg = backend.engine.connect()
        pg.exec_driver_sql("LOCK TABLE traces IN EXCLUSIVE MODE")  # blocks writes, not reads

        def release() -> None:
            pg.rollback()
            pg.close()

    once = threading.Lock()

    def release_once() -> None:
        if once.acquire(blocking=False):
            release()

    timer = threading.Timer(at_most, release_once)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        release_once()


def test_a_database_locked_longer_than_lock_wait_answers_503_with_retry_after(backend: Backend) -> None:
    uid = session()
    with receiver_store(backend.url, lock_wait=0.3) as store, TestClient(create_app(store, retry_after=2)) as client:
        body = request_json(span_json("later", uid))
        with write_lock(backend):
            started = time.monotonic()
            refused = client.post("/v1/traces", content=body, headers={"Content-Type": JSON})
            waited = time.monotonic() - started
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "2"
        assert "locked" in refused.json()["message"]
        assert 0.3 <= waited < 2.5
        assert store.get_by_session_uid(uid) == []
        accepted = client.post("/v1/traces", content=body, headers={"Content-Type": JSON})
        assert accepted.status_code == 200
        assert len(store.get_by_session_uid(uid)) == 1


def test_a_lost_database_connection_answers_503_then_the_next_request_reconnects(pg: Backend) -> None:
    # PostgreSQL alone: a SQLite file has no server connection to lose.
    backend = pg
    uid = session()
    with receiver_store(backend.url) as store, TestClient(create_app(store)) as client:
        headers = {"Content-Type": JSON}
        assert client.post("/v1/traces", content=request_json(span_json("a", uid)), headers=headers).status_code == 200
        with store.engine.connect() as connection:  # the pool's one connection: the requests came one at a time
            pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        backend.rows("SELECT pg_terminate_backend(:pid)", {"pid": pid})
        lost = client.post("/v1/traces", content=request_json(span_json("b", uid)), headers=headers)
        assert (lost.status_code, lost.headers["retry-after"]) == (503, "3")
        again = client.post("/v1/traces", content=request_json(span_json("c", uid)), headers=headers)
        assert again.status_code == 200
        assert [t.data["scopeSpans"][0]["spans"][0]["name"] for t in store.get_by_session_uid(uid)] == ["c", "a"]


# -- shutting down --------------------------------------------------------------------------------------------------
def _refused_connections(base: str) -> bool:
    """Whether a new connection goes unserved: refused, or reset when the kernel had queued it just as the
    server closed its listening socket (a CI run met that race once)."""
    try:
        healthy(base)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


# Lock requests waiting in this test's database (PostgreSQL).
_WAITING = (
    "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
    "WHERE NOT l.granted AND d.datname = current_database()"
)


def _wait_until_blocked(backend: Backend) -> None:
    """Until the receiver's write waits for the test's lock: seen in pg_locks on PostgreSQL; on SQLite, whose
    waiters leave no trace, a pause long enough for a request already sent on an open connection."""
    if backend.is_sqlite:
        time.sleep(0.3)
        return
    deadline = time.monotonic() + 10
    while not backend.rows(_WAITING)[0][0]:
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(backend: Backend, reader: TraceStore) -> None:
    uid = session()
    with running(backend.url) as process:
        address = urllib.parse.urlsplit(process.base)
        connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=20)
        connection.request("GET", "/healthz")  # the connection is the server's before the request is sent
        assert connection.getresponse().read() == b"ok\n"
        answers: list[int] = []

        def send() -> None:
            connection.request("POST", "/v1/traces", request_json(span_json("in-flight", uid)), {"Content-Type": JSON})
            answers.append(connection.getresponse().status)

        with write_lock(backend):  # holds the request inside its write (the server waits up to 3 s)
            sender = threading.Thread(target=send)
            sender.start()
            _wait_until_blocked(backend)
            process.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while not _refused_connections(process.base):  # the shutdown has begun: no new connections
                assert time.monotonic() < deadline
                time.sleep(0.02)
        sender.join(timeout=20)
        connection.close()
        assert answers == [200]
        assert process.process.wait(timeout=30) == 0
    assert len(reader.get_by_session_uid(uid)) == 1


def test_sigint_exits_0(backend: Backend) -> None:
    with running(backend.url) as process:
        assert healthy(process.base)
        assert process.stop(signal.SIGINT) == 0
        assert process.process.stderr is not None
        assert "Traceback" not in process.process.stderr.read()


# -- the command's own errors ---------------------------------------------------------------------------------------
def test_a_port_in_use_is_a_one_line_error(server: Server, backend: Backend) -> None:
    port = server.base.rsplit(":", 1)[1]
    command = [str(TRACESTORE), "--url", backend.url, "serve", "--port", port]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_without_the_otel_extra_the_command_says_what_to_install(tmp_path: Path) -> None:
    code = "import sys; sys.modules['uvicorn'] = None; from tracestore.cli import main; main()"
    command = [sys.executable, "-c", code, "--url", f"sqlite:///{tmp_path / 't.db'}", "serve"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "pip install 'tracestore[otel]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the benchmark --------------------------------------------------------------------------------------------------
def test_the_ingest_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    """A smoke test of benchmarks/otlp_ingest.py at a tiny size (nothing here is timed)."""
    out = tmp_path / "otlp-ingest.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "otlp_ingest.py"), "--spans", "300", "--batch", "64"]
    command += ["--repeat", "1", "--senders", "2", "--workdir", str(tmp_path), "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "receiver / store_batch" in result.stdout
    report = json.loads(out.read_text())
    assert report["problems"] == []
    [run] = report["runs"]
    assert run["receiver"]["stored"] == run["store_batch"]["stored"] == run["receiver_alone"]["stored"] == 300
    assert run["receiver"]["requests"] >= 2 * (150 // 64)


def test_exported_otlp_json_posted_back_gives_the_same_traces(
    server: Server, backend: Backend, reader: TraceStore, tmp_path: Path
) -> None:
    # The round trip: spans in through the SDK's exporter, out with `tracestore export`, deleted, and posted back
    # line by line to the receiver: the same traces, fields and data.
    uid = session()
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "round-trip", "session.id": uid}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracer = provider.get_tracer("app", "2.0")
    for i in range(5):
        with tracer.start_as_current_span(f"call-{i}", attributes={"gen_ai.system": "x", "n": i, "f": float("nan")}):
            pass
    exporter = OTLPSpanExporter(endpoint=f"{server.base}/v1/traces", timeout=10)
    assert exporter.export(memory.get_finished_spans()) == SpanExportResult.SUCCESS
    exporter.shutdown()
    before = reader.get_by_session_uid(uid)
    assert len(before) == 5

    out = tmp_path / "spans.jsonl"
    command = [str(TRACESTORE), "--url", backend.url, "export", uid, "--format", "otlp-json", "--page-size", "2"]
    subprocess.run([*command, "-o", str(out), "-q"], check=True, cwd=ROOT, timeout=60)
    for trace in before:
        reader.delete(trace.id)
    assert reader.get_by_session_uid(uid) == []
    lines = out.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 3  # pages of 2
    for line in lines:
        status, _, answer = post(server.base, line)
        assert (status, json.loads(answer)) == (200, {})
    assert reader.get_by_session_uid(uid) == before
