"""Live tail: the library's polls against an oracle, each poll's plan and cost, and the real `tracestore tail`
command following a database while the test stores traces (both engines)."""

from __future__ import annotations

import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
import sqlalchemy
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.dialects.sqlite import pysqlite as sqlite_dialect

from tests.backends import Backend
from tests.oracle import make_trace, oracle_query
from tracestore import AsyncTraceStore, InvalidQueryError, TraceContext, TraceStore
from tracestore.cli import main
from tracestore.queries import compiled, statements_for
from tracestore.tail import SessionTail, drive

CONSOLE_SCRIPT = Path(sys.executable).parent / "tracestore"
WAIT = 20.0  # seconds a test waits for output before failing (never an assertion on time)


def ids(traces: list[TraceContext]) -> list[str]:
    return [t.id for t in traces]


def oldest_first(traces: list[TraceContext], **filters: Any) -> list[str]:
    return ids(list(reversed(oracle_query(traces, **filters))))


def history(now: float) -> list[TraceContext]:
    """Ties (four traces per timestamp), unicode ids and sessions, traces in two sessions, other sessions."""
    traces = []
    for i in range(120):
        sessions = [["s"], ["s", "セッション"], ["other"], ["s", "other"]][i % 4]
        traces.append(make_trace(id=f"h{i:03d}-ü", created_at=now - 600 + (i // 4) * 20, session_uids=sessions))
    return traces


def drain(polls: Iterator[list[TraceContext]]) -> list[list[TraceContext]]:
    """Polls up to and including the first that found nothing."""
    found = []
    while batch := next(polls):
        found.append(batch)
    return found


# -- the library --------------------------------------------------------------------------------------------
def test_backlog_then_each_new_trace_once_in_order(store: TraceStore) -> None:
    now = time.time()
    old = history(now)
    store.store_batch(old)
    polls = store.tail("s", since=now - 300, poll_interval=0, limit_per_poll=4)
    backlog = drain(polls)
    assert [t.id for batch in backlog for t in batch] == oldest_first(old, session_uid="s", since=now - 300)
    assert len(backlog) > 5 and all(len(batch) == 4 for batch in backlog[:-1])  # polls of the limit
    stored = list(old)
    for round_ in range(3):
        at = time.time() + 1
        new = [
            make_trace(id=f"n{round_}-{k}-é", created_at=at, session_uids=uids)  # ties: one timestamp
            for k, uids in enumerate([["s"], ["other"], ["セッション", "s"], ["s"], ["x"]])
        ]
        store.store_batch(reversed(new))
        stored += new
        assert ids(next(polls)) == oldest_first(new, session_uid="s")
        assert next(polls) == []  # an idle poll: nothing repeated
    shown = [t for batch in backlog for t in batch]
    assert shown[0] == store.get(shown[0].id)  # whole traces, as get() returns them


async def test_async_tail_yields_what_the_sync_one_does(backend: Backend) -> None:
    now = time.time()
    old = history(now)
    with TraceStore(backend.url) as sync_store:
        sync_store.store_batch(old)
        expected = drain(sync_store.tail("s", since=now - 500, poll_interval=0, limit_per_poll=7))
    async with AsyncTraceStore(backend.async_url) as store:
        polls = store.tail("s", since=now - 500, poll_interval=0, limit_per_poll=7)
        got = []
        while batch := await anext(polls):
            got.append(batch)
        assert got == expected
        new = make_trace(id="async-new", created_at=time.time() + 1, session_uids=["s"])
        await store.store(new)
        assert await anext(polls) == [new]
        await polls.aclose()  # type: ignore[attr-defined]  # an async generator


def test_late_arrivals_within_the_lookback_are_shown_once(store: TraceStore) -> None:
    now = time.time()
    present = make_trace(id="present", created_at=now - 3, session_uids=["s"])  # in the window, but not new
    store.store(present)
    polls = store.tail("s", poll_interval=0, lookback=60)
    assert next(polls) == []
    newest = make_trace(id="newest", created_at=time.time() + 5, session_uids=["s"])
    store.store(newest)
    assert next(polls) == [newest]
    # Stored now, created before `newest`: below the cursor, found by the re-read of the window.
    late = [make_trace(id=f"late-{k}", created_at=now - 20 + k, session_uids=["s"]) for k in range(3)]
    tied = make_trace(id="newest-tie", created_at=newest.created_at, session_uids=["s"])  # same time, id below
    too_late = make_trace(id="too-late", created_at=now - 600, session_uids=["s"])  # beyond the lookback
    store.store_batch([*late, tied, too_late, make_trace(id="late-other", created_at=now - 5, session_uids=["x"])])
    assert ids(next(polls)) == ["late-0", "late-1", "late-2", "newest-tie"]
    assert next(polls) == [] and next(polls) == []  # each once; the one beyond the lookback never


def test_a_restored_trace_is_shown_again_only_when_its_created_at_moves(store: TraceStore) -> None:
    polls = store.tail("s", poll_interval=0)
    assert next(polls) == []
    trace = make_trace(id="r", created_at=time.time() + 1, session_uids=["s"])
    store.store(trace)
    assert ids(next(polls)) == ["r"]
    store.store(make_trace(id="r", created_at=trace.created_at, data={"edited": True}, session_uids=["s"]))
    assert next(polls) == []  # same key: an update in place is not a new trace
    moved = make_trace(id="r", created_at=trace.created_at + 1, session_uids=["s"])
    store.store(moved)
    assert next(polls) == [moved]


def test_remembered_keys_stay_inside_the_window(store: TraceStore) -> None:
    """Memory is bounded by the lookback window, not by how much the tail has shown."""
    now = time.time()
    store.store_batch(
        [make_trace(id=f"b{i:04d}", created_at=now - 900 + i * 0.1, session_uids=["s"]) for i in range(500)]
    )
    recent = [make_trace(id=f"r{i}", created_at=now - 1 + i * 0.01, session_uids=["s"]) for i in range(5)]
    store.store_batch(recent)
    follower = SessionTail(statements_for(store.engine.dialect.name), "s", since=now - 1000, lookback=10, limit=1000)
    polled = drive(follower.poll(time.time()), fetcher(store))
    assert len(polled.traces) == 505 and not polled.more
    assert follower.seen == 5  # only the keys of the last 10 seconds


def test_many_late_arrivals_are_shown_once_in_key_order(store: TraceStore) -> None:
    """Late arrivals are fetched by id, all ids as one parameter (unicode ids and ties included)."""
    now = time.time()
    polls = store.tail("s", poll_interval=0, lookback=600)
    assert next(polls) == []
    store.store(make_trace(id="newest", created_at=now + 5, session_uids=["s"]))
    assert ids(next(polls)) == ["newest"]
    late = [make_trace(id=f"late-{k:03d}-ü", created_at=now - 100 + k // 2, session_uids=["s"]) for k in range(130)]
    store.store_batch(late)
    assert ids(next(polls)) == oldest_first(late)
    assert next(polls) == []


@pytest.mark.parametrize("dialect_name", ["sqlite", "postgresql"])
def test_late_arrivals_are_one_statement_whatever_their_number(dialect_name: str) -> None:
    """Polls finding 1 .. 120 late arrivals read them with one statement, built and compiled once (never one
    per number of ids). The poll is driven without a database: the reads are answered here."""
    statements = statements_for(dialect_name)
    dialect = sqlite_dialect.dialect() if dialect_name == "sqlite" else psycopg_dialect.dialect()  # type: ignore[no-untyped-call]
    window = statements.session_after(keys_only=True, until=True, migrating=False)
    now = 1_750_000_000.0
    late_count = 0
    by_id: list[tuple[Any, dict[str, Any]]] = []

    def fetch(stmt: Any, params: dict[str, Any]) -> list[Any]:
        if stmt is window:  # keys below the cursor that the tail has not seen
            return [(now - 10 + i / 1000, f"late-{late_count}-{i}") for i in range(late_count)]
        if "ids" in params or "id_0" in params:
            by_id.append((stmt, params))
        return []

    follower = SessionTail(statements, "s", since=None, lookback=3600, limit=1000)
    drive(follower.poll(now), fetch)
    compiled_before = compiled.cache_info().misses
    for late_count in range(1, 121):
        drive(follower.poll(now + late_count), fetch)
        compiled(by_id[-1][0], dialect)
        assert len({id(stmt) for stmt, _ in by_id}) == 1, late_count
        assert compiled.cache_info().misses - compiled_before <= 1, late_count
    (last_ids,) = by_id[-1][1].values()
    assert len(json.loads(last_ids) if dialect_name == "sqlite" else last_ids) == 120


def test_bad_arguments_are_refused(store: TraceStore) -> None:
    for kwargs in (
        {"session_uid": ""},
        {"session_uid": "s", "since": float("nan")},
        {"session_uid": "s", "poll_interval": -1},
        {"session_uid": "s", "lookback": float("inf")},
        {"session_uid": "s", "limit_per_poll": 0},
    ):
        with pytest.raises(InvalidQueryError):
            next(store.tail(**kwargs))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rounds=st.lists(
        st.lists(st.tuples(st.sampled_from(["newer", "late", "tie", "other"]), st.integers(0, 3)), max_size=6),
        min_size=1,
        max_size=6,
    ),
    limit=st.integers(1, 5),
)
def test_every_arrival_once_against_an_oracle(backend: Backend, rounds: list[Any], limit: int) -> None:
    """Traces arriving between polls (newer than the cursor, below it inside the lookback, tied with it, of other
    sessions) are each shown exactly once, and those stored above the cursor in key order."""
    with TraceStore(backend.url) as store:
        with backend.raw() as connection:  # each example starts empty
            connection.exec_driver_sql("DELETE FROM trace_sessions")
            connection.exec_driver_sql("DELETE FROM traces")
        base = time.time()
        polls = store.tail("s", poll_interval=0, lookback=3600, limit_per_poll=limit)
        shown: list[TraceContext] = []
        stored: list[TraceContext] = []
        on_time: list[str] = []  # stored with a key above every key stored before it
        top = (base, "")
        n = 0
        for arrivals in [[], *rounds]:
            batch = []
            for kind, step in arrivals:
                n += 1
                created = {"newer": top[0] + 1 + step, "late": base - 60 + step, "tie": top[0], "other": base + step}[
                    kind
                ]
                uids = ["x"] if kind == "other" else ["s"] if step % 2 else ["s", "y"]
                batch.append(make_trace(id=f"a{n:03d}-ß", created_at=created, session_uids=uids))
            store.store_batch(batch)
            stored += batch
            for trace in sorted(batch, key=lambda t: (t.created_at, t.id)):
                if "s" in trace.session_uids and (trace.created_at, trace.id) > top:
                    on_time.append(trace.id)
                    top = (trace.created_at, trace.id)
            shown += [t for found in drain(polls) for t in found]
        assert sorted(ids(shown)) == sorted(oldest_first(stored, session_uid="s"))  # each once, none of others
        assert [i for i in ids(shown) if i in set(on_time)] == on_time


# -- plans and cost of a poll -----------------------------------------------------------------------------------
def test_each_poll_is_an_index_range_read_from_the_cursor(store: TraceStore, backend: Backend) -> None:
    now = time.time()
    store.store_batch(history(now))
    store.store_batch([make_trace(created_at=now - 1000 + i * 0.1, session_uids=["s"]) for i in range(2000)])
    # Other sessions' traces: on a table of a few thousand rows PostgreSQL rightly finds reading all of
    # `traces` (a hash join) cheaper than a dozen index probes; a poll's plan is about bigger tables.
    store.store_batch([make_trace(created_at=now - 2000 + i * 0.1, session_uids=[f"o{i % 50}"]) for i in range(20_000)])
    if backend.is_sqlite:
        backend.analyze()
    else:  # what autovacuum does to a table that stopped changing: statistics and the visibility map
        with backend.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")
    forward = statements_for(store.engine.dialect.name).session_after(keys_only=False, until=False)
    window = statements_for(store.engine.dialect.name).session_after(keys_only=True, until=True)
    # A poll that finds a dozen new traces.
    params = {"session_uid": "s", "limit": 1000, "after_created_at": now - 60, "after_trace_id": "h108-ü"}
    window_params = params | {"until_created_at": now, "until_trace_id": "h119-ü"}
    if backend.is_sqlite:
        for stmt, args, cond in (
            (forward, params, "(session_uid=? AND (created_at,trace_id)>(?,?))"),
            (window, window_params, "(session_uid=? AND (created_at,trace_id)>(?,?) AND (created_at,trace_id)<(?,?))"),
        ):
            plan = backend.plan(stmt, args)
            assert plan[0] == f"SEARCH ts USING COVERING INDEX idx_trace_sessions_uid_time {cond}", plan
            assert not any("SCAN" in line or "TEMP B-TREE" in line for line in plan), plan
        assert len(backend.plan(window, window_params)) == 1  # keys only: the traces table is not read
    else:
        for stmt, args in ((forward, params), (window, window_params)):
            text = "\n".join(backend.plan(stmt, args))
            assert text.startswith("Limit"), text
            assert "Index Only Scan using idx_trace_sessions_uid_time on trace_sessions ts" in text, text
            assert "Backward" not in text and "Sort" not in text, text
            assert "Index Cond: ((session_uid = " in text and "ROW(created_at, trace_id) > ROW(" in text, text
        assert "traces" not in "\n".join(backend.plan(window, window_params)).replace("trace_sessions", "")
        # An idle poll (nothing after the cursor) executed: the index finds no entry, no trace is read.
        with backend.raw() as connection:
            query = compiled(forward, connection.dialect)
            idle = params | {"after_created_at": now + 3600}
            lines = [
                row[0]
                for row in connection.exec_driver_sql("EXPLAIN (ANALYZE, COSTS OFF) " + query.sql, query.args(idle))
            ]
        text = "\n".join(lines)
        assert "Index Only Scan using idx_trace_sessions_uid_time" in text and "rows=0 loops=1" in text, text
        assert "Index Scan using pk_traces on traces (never executed)" in text, text


def _counting_store(backend: Backend) -> tuple[TraceStore, list[int]]:
    """A store whose SQLite connections count the virtual-machine instructions they execute."""
    steps = [0]
    engine = sqlalchemy.create_engine(backend.url)

    @event.listens_for(engine, "connect")
    def count(dbapi_connection: sqlite3.Connection, record: object) -> None:
        def tick() -> int:
            steps[0] += 1
            return 0

        dbapi_connection.set_progress_handler(tick, 1)

    return TraceStore(engine), steps


def test_a_poll_costs_the_same_whatever_the_history(db_path: Path, backend: Backend) -> None:
    """SQLite: the work of a poll (VM instructions) is the same before and after the session gains 5,000 older
    traces: an idle poll reads no trace, and a poll with new rows reads only those."""
    del db_path  # SQLite only: the progress handler is sqlite3's
    with TraceStore(backend.url) as writer:
        reader, steps = _counting_store(backend)
        with reader:
            polls = reader.tail("s", poll_interval=0, lookback=0)
            next(polls)  # the first poll (and the connection's pragmas)

            def costs() -> dict[str, int]:
                found = {}
                for name, arriving in (("idle", 0), ("five new", 5), ("idle again", 0)):
                    writer.store_batch([make_trace(session_uids=["s"]) for _ in range(arriving)])
                    steps[0] = 0
                    assert len(next(polls)) == arriving
                    found[name] = steps[0]
                return found

            costs()  # warm up: past the first trace a seek lands on an entry, not on an empty index (11 steps)
            before = costs()
            now = time.time()
            writer.store_batch([make_trace(created_at=now - 3600 + i * 0.5, session_uids=["s"]) for i in range(5000)])
            assert next(polls) == []  # older than the cursor, beyond the lookback: not new
            after = costs()
    assert before == after, (before, after)
    assert before["idle"] == before["idle again"] < before["five new"]


# -- the command ---------------------------------------------------------------------------------------------
def ctrl_c_reaches_it() -> None:
    """Run in the child before exec: a shell's background job passes SIGINT on ignored, and Python then leaves
    it ignored, so the tail would never see the Ctrl-C these tests send (pytest run with `&`)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Tail:
    """`tracestore tail` in a real process; its stdout and stderr lines read by threads."""

    def __init__(self, url: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(CONSOLE_SCRIPT), "--url", url, "tail", *args, "--interval", "0.05"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            preexec_fn=ctrl_c_reaches_it,
        )
        self.out: queue.Queue[str] = queue.Queue()
        self.err: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, self.out.put), daemon=True).start()
        started: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(self.process.stderr, started.put), daemon=True).start()
        line = started.get(timeout=WAIT)  # "now" is fixed before it: from here on, a stored trace is new
        assert line.startswith("following "), line
        self._err = started

    @staticmethod
    def _read(stream: IO[str] | None, put: Any) -> None:
        assert stream is not None
        for line in stream:
            put(line.rstrip("\n"))

    def lines(self, count: int) -> list[str]:
        return [self.out.get(timeout=WAIT) for _ in range(count)]

    def stop(self) -> tuple[int, list[str], str]:
        """Ctrl-C; the exit status, the lines printed after the ones already read, stderr."""
        self.process.send_signal(signal.SIGINT)
        status = self.process.wait(timeout=WAIT)
        time.sleep(0.1)  # let the reader threads hand over what the pipes still held
        rest = []
        while not self.out.empty():
            rest.append(self.out.get())
        errors = []
        while not self._err.empty():
            errors.append(self._err.get())
        return status, rest, "\n".join(errors)


def test_tail_prints_each_new_trace_once_in_order(store: TraceStore, backend: Backend) -> None:
    now = time.time()
    store.store_batch(history(now))  # before the tail: not printed without --since
    tail = Tail(backend.url, "s", "--json")
    try:
        printed = []
        for round_ in range(4):
            at = time.time() + 1
            batch = [
                make_trace(id=f"n{round_}-{k}-中", created_at=at, session_uids=uids, data={"k": k, "t": "é\n"})
                for k, uids in enumerate([["s"], ["other"], ["s", "セッション"], ["s"]])
            ]
            store.store_batch(batch)
            expected = oldest_first(batch, session_uid="s")
            got = [json.loads(line) for line in tail.lines(len(expected))]
            assert [g["id"] for g in got] == expected
            printed += got
            if round_ == 2:  # created before everything printed so far, stored now: inside the lookback (5s)
                store.store(make_trace(id="late", created_at=now - 1, session_uids=["s"]))
                assert json.loads(tail.lines(1)[0])["id"] == "late"
        status, rest, errors = tail.stop()
    finally:
        tail.process.kill()
    assert status == 0 and rest == [], (status, rest)
    assert "Traceback" not in errors
    first = store.get(printed[0]["id"])
    assert first is not None and printed[0]["data"] == first.data and printed[0]["session_uids"] == ["s"]


def test_tail_since_prints_the_recent_past_first(store: TraceStore, backend: Backend) -> None:
    now = time.time()
    old = history(now)
    store.store_batch(old)
    tail = Tail(backend.url, "セッション", "--since", "5m")
    try:
        # history() has a trace every 20 s, one exactly at now - 300: the command's clock started later.
        expected = oldest_first(old, session_uid="セッション", since=now - 290)
        lines = tail.lines(len(expected))
        assert [line.split("  ")[1] for line in lines] == expected
        trace = store.get(expected[0])
        assert trace is not None
        # Readable: UTC time, id, namespace, type, the start of the data.
        assert lines[0].startswith(time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(trace.created_at)))
        assert lines[0].endswith(
            f"{trace.namespace}  {trace.context_type}  {json.dumps(trace.data, separators=(',', ':'))}"
        )
        new = make_trace(id="after-start", created_at=time.time() + 1, session_uids=["セッション"])
        store.store(new)
        assert tail.lines(1)[0].split("  ")[1] == "after-start"
        status, rest, errors = tail.stop()
    finally:
        tail.process.kill()
    assert status == 0 and rest == [] and "Traceback" not in errors, (status, rest, errors)


def test_tail_prints_its_banner_before_a_backlog_of_several_polls(store: TraceStore, backend: Backend) -> None:
    now = time.time()
    backlog = [make_trace(id=f"b{i:04d}", created_at=now - 300 + i * 0.1, session_uids=["s"]) for i in range(1_500)]
    store.store_batch(backlog)
    # One pipe for both streams, in the order they were written (click.echo flushes each line).
    process = subprocess.Popen(
        [str(CONSOLE_SCRIPT), "--url", backend.url, "tail", "s", "--since", "10m", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ctrl_c_reaches_it,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline().rstrip("\n") for _ in range(1 + len(backlog))]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=WAIT) == 0
    finally:
        process.kill()
    assert lines[0] == "following s (Ctrl-C to stop)", lines[:3]
    assert [line.split("  ")[1] for line in lines[1:]] == ids(backlog)  # 1,500: two polls of at most 1,000


def test_tail_errors_are_one_line(tmp_path: Path, store: TraceStore, backend: Backend) -> None:
    runner = CliRunner()
    missing = runner.invoke(main, ["--url", f"sqlite:///{tmp_path}/missing.db", "tail", "s"])
    assert missing.exit_code == 1 and missing.stderr.strip().startswith("Error: no database at"), missing.output
    assert not (tmp_path / "missing.db").exists()
    for option in ("--since", "--interval", "--lookback"):
        bad = runner.invoke(main, ["--url", backend.url, "tail", "s", option, "10 minutes"])
        assert bad.exit_code == 2 and f"Invalid value for '{option}'" in bad.stderr, bad.output
        assert "Traceback" not in bad.output
    empty = runner.invoke(main, ["--url", backend.url, "tail", ""])
    assert empty.exit_code == 2 and "session_uid must not be empty" in empty.stderr, empty.output


def fetcher(store: TraceStore) -> Any:
    """A poll's reads answered on the store's engine with plain SQLAlchemy (no store in between)."""

    def fetch(stmt: Any, params: dict[str, Any]) -> list[Any]:
        query = compiled(stmt, store.engine.dialect)
        with store.engine.connect() as connection:
            return list(connection.exec_driver_sql(query.sql, query.args(params)).all())

    return fetch
