"""Streaming export (tracestore.export, `tracestore export`) and the keyset scan under it, on both engines:
both formats against an oracle over the stored values, pages, bounds, atomic files, the plans, and the round
trip of OpenTelemetry spans through OTLP/JSON."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from tests.backends import Backend
from tests.oracle import make_trace
from tests.test_store import crowd_sessions
from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.cli import export as export_cli
from tracestore.cli import main
from tracestore.cli.export import parse_time
from tracestore.cli.reads import trace_json
from tracestore.core import prepare_scan
from tracestore.errors import InvalidQueryError, StorageError
from tracestore.export import export_traces, trace_record
from tracestore.models import SESSION_TIME_INDEX
from tracestore.otel import TraceStoreSpanExporter, otlp
from tracestore.queries import statements_for

T0 = 1_700_000_000.0
HUGE = 2_000_000  # characters of one payload: more than one page's usual size on its own


def sample() -> list[TraceContext]:
    """Traces with what an export must keep apart: ties on created_at (ids decide), traces in two sessions and
    in none, unicode everywhere, a huge payload, and a time bound falling on a tie (T0 + 5, T0 + 20)."""
    traces = [
        make_trace(id=f"t{i:03d}", created_at=T0 + i, session_uids=["a"] if i % 2 else ["b"], data={"i": i})
        for i in range(30)
    ]
    traces += [make_trace(id=f"tie-{c}", created_at=T0 + 5, session_uids=["a", "b"]) for c in "zyx"]
    traces += [make_trace(id=f"edge-{c}", created_at=T0 + 20, session_uids=["a"]) for c in "ba"]
    traces += [
        make_trace(id="no-session", created_at=T0 + 7),
        make_trace(
            id="ünï-✓",
            created_at=T0 + 11,
            namespace="sérvice",
            context_type="𝄞",
            data={"text": "héllo\u2028wörld 日本 \x01", "emoji": "🙂"},
            metadata={"clé": "välue"},
            session_uids=["a", "séssion-ü"],
        ),
        make_trace(id="huge", created_at=T0 + 12.5, data={"blob": "x" * HUGE}, session_uids=["a"]),
    ]
    return traces


def oracle(
    traces: list[TraceContext],
    *,
    session_uid: str | None = None,
    since: float | None = None,
    until: float | None = None,
) -> list[TraceContext]:
    """What an export holds: the traces in [since, until) of the session (or all), oldest first, ties by id."""
    chosen = [
        t
        for t in traces
        if (session_uid is None or session_uid in t.session_uids)
        and (since is None or t.created_at >= since)
        and (until is None or t.created_at < until)
    ]
    return sorted(chosen, key=lambda t: (t.created_at, t.id))


def records(traces: list[TraceContext]) -> list[Any]:
    return [orjson.loads(orjson.dumps(trace_record(t))) for t in traces]


@pytest.fixture
def stored(store: TraceStore) -> list[TraceContext]:
    traces = sample()
    store.store_batch(traces)
    return traces


def exported(store: TraceStore, **options: Any) -> bytes:
    out = io.BytesIO()
    count = export_traces(store, out, **options)
    assert count == len(out.getvalue().splitlines()) or options.get("format") == "otlp-json"
    return out.getvalue()


BOUNDS = {
    "everything": (None, None),
    "ties-on-both-bounds": (T0 + 5, T0 + 20),  # since inclusive (the three ties in), until exclusive (edges out)
    "since-only": (T0 + 12.5, None),
    "until-only": (None, T0 + 5),
}


# -- the keyset scan ------------------------------------------------------------------------------------------
def test_jsonl_matches_the_oracle(store: TraceStore, stored: list[TraceContext]) -> None:
    # Every scope, bounds and page size asked of one stored data set (storing it is most of the cost).
    for session_uid in (None, "a", "b"):
        for bounds, (since, until) in BOUNDS.items():
            for page_size in (3, 1000):
                text = exported(store, session_uid=session_uid, since=since, until=until, page_size=page_size)
                expected = oracle(stored, session_uid=session_uid, since=since, until=until)
                assert expected, bounds  # every combination exports something: the empty case is its own test
                lines = [orjson.loads(line) for line in text.splitlines()]
                assert lines == records(expected), (session_uid, bounds, page_size)


def test_jsonl_lines_are_what_recent_json_prints(store: TraceStore, stored: list[TraceContext]) -> None:
    lines = exported(store).decode().split("\n")[:-1]  # not splitlines(): U+2028 in a JSON string is no line end
    assert lines == [trace_json(t) for t in store.iter_traces()]
    assert len(lines) == len(stored)


def test_small_pages_write_the_same_bytes_as_one_page(store: TraceStore, stored: list[TraceContext]) -> None:
    for session_uid in (None, "a"):
        whole = exported(store, session_uid=session_uid, page_size=len(stored) + 1)
        assert exported(store, session_uid=session_uid, page_size=3) == whole
        assert exported(store, session_uid=session_uid, page_size=1) == whole


@pytest.mark.parametrize("output_format", ["jsonl", "otlp-json"])
def test_an_empty_range_writes_nothing(store: TraceStore, stored: list[TraceContext], output_format: str) -> None:
    for options in ({"since": T0 + 100}, {"until": T0}, {"since": T0 + 6, "until": T0 + 6}, {"session_uid": "nobody"}):
        out = io.BytesIO()
        assert export_traces(store, out, format=output_format, **options) == 0
        assert out.getvalue() == b""


def test_counts_match_the_scan(store: TraceStore, stored: list[TraceContext]) -> None:
    for session_uid in (None, "a", "nobody"):
        for since, until in BOUNDS.values():
            expected = oracle(stored, session_uid=session_uid, since=since, until=until)
            assert store.count_traces(session_uid=session_uid, since=since, until=until) == len(expected)


async def test_the_async_store_scans_the_same(backend: Backend) -> None:
    traces = sample()
    async with AsyncTraceStore(backend.async_url) as store:
        await store.store_batch(traces)
        for session_uid in (None, "a"):
            got = [t async for t in store.iter_traces(session_uid=session_uid, since=T0 + 5, page_size=3)]
            assert records(got) == records(oracle(traces, session_uid=session_uid, since=T0 + 5))
            assert await store.count_traces(session_uid=session_uid, since=T0 + 5) == len(got)


def test_a_trace_stored_during_the_export_after_its_position_is_included(store: TraceStore) -> None:
    store.store_batch([make_trace(id=f"t{i}", created_at=T0 + i) for i in range(6)])
    scan = store.iter_traces(page_size=2)
    first = [next(scan), next(scan)]
    store.store(make_trace(id="late", created_at=T0 + 100))
    store.store(make_trace(id="behind", created_at=T0 - 1))  # before the cursor: not read again
    assert [t.id for t in [*first, *scan]] == ["t0", "t1", "t2", "t3", "t4", "t5", "late"]


@pytest.mark.parametrize(
    "options",
    [
        {"format": "csv"},
        {"page_size": 0},
        {"page_size": True},
        {"since": math.nan},
        {"until": "yesterday"},
        {"session_uid": ""},
    ],
)
def test_bad_arguments_are_refused_before_reading(store: TraceStore, options: dict[str, Any]) -> None:
    out = io.BytesIO()
    with pytest.raises(InvalidQueryError):
        export_traces(store, out, **options)
    assert out.getvalue() == b""


def test_a_nul_session_uid_is_bad_input_on_postgresql(store: TraceStore, backend: Backend) -> None:
    store.store(make_trace(session_uids=["a"]))
    if backend.is_sqlite:  # SQLite stores and matches NUL: simply no such session
        assert exported(store, session_uid="a\x00") == b""
    else:
        with pytest.raises(InvalidQueryError, match="NUL"):
            exported(store, session_uid="a\x00")


# -- OTLP/JSON --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("session_uid", [None, "a"])
def test_otlp_json_is_one_request_per_page(
    store: TraceStore, stored: list[TraceContext], session_uid: str | None
) -> None:
    text = exported(store, session_uid=session_uid, since=T0 + 5, format="otlp-json", page_size=4)
    expected = oracle(stored, session_uid=session_uid, since=T0 + 5)
    lines = text.splitlines()
    assert len(lines) == math.ceil(len(expected) / 4)
    requests = [orjson.loads(line) for line in lines]
    assert all(set(request) == {"resourceSpans"} and len(request["resourceSpans"]) <= 4 for request in requests)
    spans = [resource_spans for request in requests for resource_spans in request["resourceSpans"]]
    assert spans == [orjson.loads(orjson.dumps(otlp.resource_spans_of(t))) for t in expected]
    for line in lines:  # what a receiver does with each line
        decoded = otlp.decode_request(line, otlp.JSON)
        assert decoded.rejected == []


def test_spans_round_trip_through_otlp_json(store: TraceStore) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "chat-ü", "deployment": "prod"}))
    provider.add_span_processor(SimpleSpanProcessor(TraceStoreSpanExporter(store)))
    tracer = provider.get_tracer("app", "2.0")
    with tracer.start_as_current_span("turn", attributes={"session.id": "s1", "n": 3, "ratio": 0.5}):
        with tracer.start_as_current_span(
            "llm", kind=SpanKind.CLIENT, attributes={"gen_ai.system": "x", "gen_ai.conversation.id": "s2"}
        ) as span:
            span.add_event("token", {"text": "héllo"})
        with tracer.start_as_current_span("tool", attributes={"gen_ai.operation.name": "execute_tool"}):
            pass
    provider.shutdown()
    originals = list(store.iter_traces())
    assert len(originals) == 3
    text = exported(store, format="otlp-json", page_size=2)
    decoded = [trace for line in text.splitlines() for trace in otlp.decode_request(line, otlp.JSON).traces]

    def fields(t: TraceContext) -> tuple[Any, ...]:
        return (t.id, t.created_at, t.namespace, t.context_type, t.session_uids, t.data)

    assert [fields(t) for t in decoded] == [fields(t) for t in originals]


# -- plans ------------------------------------------------------------------------------------------------------
SCANS = {
    "first-page": {},
    "bounded": {"since": T0 + 100, "until": T0 + 5000},
    "next-page": {"cursor_at": T0 + 3000},
    "next-page-bounded": {"cursor_at": T0 + 3000, "until": T0 + 5000},
}


def scan_plan(backend: Backend, session_uid: str | None, shape: str) -> list[str]:
    from tracestore.types import PageCursor

    options = dict(SCANS[shape])
    cursor_at = options.pop("cursor_at", None)
    cursor = PageCursor(cursor_at, "00006000") if cursor_at is not None else None
    dialect = "sqlite" if backend.is_sqlite else "postgresql"
    # 100 a page: on 20,000 rows a page of half a session would rightly be a hash join on PostgreSQL.
    stmt, params = prepare_scan(statements_for(dialect), session_uid=session_uid, cursor=cursor, limit=100, **options)
    return backend.plan(stmt, params)


@pytest.mark.parametrize("shape", SCANS)
def test_the_scan_of_all_traces_walks_the_time_index(store: TraceStore, backend: Backend, shape: str) -> None:
    """The created_at index gives the order; only a tie group (one created_at) is put in id order, under the
    LIMIT: the index has no id column (a migration adding one would remove even that sort)."""
    crowd_sessions(backend, per_second=2)  # ties on created_at: two traces a second
    plan = scan_plan(backend, None, shape)
    if backend.is_sqlite:
        assert any(line.startswith("SEARCH traces USING INDEX idx_traces_created_at (created_at>") for line in plan)
        assert [line for line in plan if "TEMP B-TREE" in line] == ["USE TEMP B-TREE FOR RIGHT PART OF ORDER BY"]
    else:
        text = "\n".join(plan)
        assert plan[0].startswith("Limit"), text
        assert "Index Scan using idx_traces_created_at on traces" in text, text
        assert "Presorted Key: traces.created_at" in text, text
        assert [line for line in plan if "Sort" in line and "Incremental Sort" not in line and "Key" not in line] == []


@pytest.mark.parametrize("shape", SCANS)
def test_the_scan_of_a_session_walks_its_index_forward(store: TraceStore, backend: Backend, shape: str) -> None:
    crowd_sessions(backend, per_second=2)  # ties on created_at: two traces a second
    plan = scan_plan(backend, "a", shape)
    text = "\n".join(plan)
    if backend.is_sqlite:
        assert any(line.startswith(f"SEARCH ts USING COVERING INDEX {SESSION_TIME_INDEX}") for line in plan), text
        assert "TEMP B-TREE" not in text, text
    else:
        assert plan[0].startswith("Limit") and "Sort" not in text, text
        assert f"Index Only Scan using {SESSION_TIME_INDEX} on trace_sessions ts" in text, text


# -- the command line ---------------------------------------------------------------------------------------------
def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("output_format", ["jsonl", "otlp-json"])
def test_the_command_writes_what_the_function_writes(
    store: TraceStore, stored: list[TraceContext], backend: Backend, output_format: str
) -> None:
    for scope, options in ((["a"], {"session_uid": "a"}), (["--all"], {})):
        result = run("--url", backend.url, "export", *scope, "--format", output_format, "--since", str(T0 + 5))
        assert result.exit_code == 0, result.output
        assert result.stdout_bytes == exported(store, format=output_format, since=T0 + 5, **options)
        count = len(oracle(stored, since=T0 + 5, **options))
        assert f"{count:,} traces exported" in result.stderr


def test_the_command_writes_a_file_atomically(
    store: TraceStore, stored: list[TraceContext], backend: Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.jsonl"
    result = run("--url", backend.url, "export", "--all", "-o", str(target), "--page-size", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout_bytes == b""
    assert target.read_bytes() == exported(store)
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == ["out.jsonl"]

    def half_then_fail(store: TraceStore, out: Any, **options: Any) -> int:
        out.write(b'{"half": ')
        raise StorageError("the database went away")

    monkeypatch.setattr(export_cli, "export_traces", half_then_fail)
    for path in (target, tmp_path / "new.jsonl"):
        before = path.read_bytes() if path.exists() else None
        result = run("--url", backend.url, "export", "--all", "-o", str(path))
        assert result.exit_code == 1 and "the database went away" in result.stderr
        assert (path.read_bytes() if path.exists() else None) == before
        assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_the_time_options(store: TraceStore, stored: list[TraceContext], backend: Backend) -> None:
    iso = datetime.fromtimestamp(T0 + 5, tz=UTC).isoformat()
    naive = datetime.fromtimestamp(T0 + 5, tz=UTC).replace(tzinfo=None).isoformat()
    expected = exported(store, since=T0 + 5, until=T0 + 20)
    for since in (str(T0 + 5), iso, naive, iso.replace("+00:00", "Z")):
        result = run("--url", backend.url, "export", "--all", "--since", since, "--until", str(T0 + 20), "-q")
        assert result.exit_code == 0, result.output
        assert result.stdout_bytes == expected
        assert result.stderr == ""
    assert parse_time("10m", now=T0) == T0 - 600
    assert parse_time("1h30m", now=T0) == T0 - 5400
    assert parse_time("2d", now=T0) == T0 - 2 * 86400
    result = run("--url", backend.url, "export", "--all", "--since", "100000d")  # before anything stored
    assert result.exit_code == 0 and result.stdout_bytes.count(b"\n") == len(stored)


@pytest.mark.parametrize(
    "args",
    [
        ["export"],
        ["export", "a", "--all"],
        ["export", "--all", "--since", "yesterday"],
        ["export", "--all", "--since", "nan"],
        ["export", "--all", "--format", "csv"],
        ["export", "--all", "--page-size", "0"],
        ["export", ""],
    ],
)
def test_bad_command_lines_exit_2(backend: Backend, store: TraceStore, args: list[str]) -> None:
    result = run("--url", backend.url, *args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "Error" in result.stderr


def test_a_missing_database_or_directory_exits_1(store: TraceStore, backend: Backend, tmp_path: Path) -> None:
    result = run("--url", f"sqlite:///{tmp_path / 'none.db'}", "export", "--all")
    assert result.exit_code == 1 and "no database at" in result.stderr
    result = run("--url", backend.url, "export", "--all", "-o", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert result.exit_code == 1 and "cannot write" in result.stderr, result.output


def test_otlp_json_needs_neither_the_sdk_nor_protobuf(store: TraceStore, backend: Backend) -> None:
    """`--format otlp-json` works without the otel extra: the export side of tracestore.otel.otlp is plain JSON."""
    store.store(make_trace(id="plain", created_at=T0, session_uids=["a"]))
    script = (
        "import sys\n"
        "for name in ('opentelemetry', 'google', 'google.protobuf'):\n"
        "    sys.modules[name] = None  # an import of either fails, as when the extra is not installed\n"
        "from tracestore.cli import main\n"
        f"main(['--url', {backend.url!r}, 'export', '--all', '--format', 'otlp-json', '-q'])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert orjson.loads(done.stdout) == orjson.loads(
        orjson.dumps(otlp.export_request([otlp.resource_spans_of(store.get("plain"))]))
    )
