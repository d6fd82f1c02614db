"""Retention (`prune`): results against a plain-Python oracle, bounded batches, the plan, a kill -9 and a rerun,
a writer process during a prune, the space report, bad input, and the `tracestore prune` command."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import event

from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.cli import main
from tracestore.cli.retention import summary
from tracestore.errors import InvalidQueryError
from tracestore.retention.prune import MAX_BATCH_SIZE, PruneReport
from tracestore.retention.queries import retention_statements_for

from .backends import Backend
from .oracle import make_trace

NOW = time.time()
DAY = 86_400.0
CUTOFF = NOW - 30 * DAY


def dataset(n: int = 300) -> list[TraceContext]:
    """Old and new traces around CUTOFF: ties exactly at it, one to three sessions (some shared), unicode ids,
    a trace without sessions, one payload of 2 MB."""
    traces = []
    for i in range(n):
        age = (i % 60) * DAY  # 0..59 days: about half are older than 30 days
        created = NOW - age - (i % 7)
        if i % 25 == 0:
            created = CUTOFF  # exactly at the cutoff: kept
        if i % 25 == 1:
            created = math.nextafter(CUTOFF, 0)  # a hair before it: deleted
        sessions = [f"s{i % 5}", "セッション" if i % 3 == 0 else f"s{(i + 1) % 5}"][: 1 + i % 2]
        if i % 50 == 7:
            sessions = []
        data: Any = {"i": i, "text": "x" * (2_000_000 if i == 3 else 10)}
        traces.append(make_trace(id=f"t{i:04d}-ü'\"", created_at=created, session_uids=sessions, data=data))
    return traces


def expected_rows(traces: list[TraceContext], cutoff: float) -> tuple[set[str], set[tuple[str, str]]]:
    """The oracle: trace ids and links left after pruning with `cutoff` (a trace stays iff created_at >= cutoff)."""
    kept = [t for t in traces if not t.created_at < cutoff]
    return {t.id for t in kept}, {(t.id, uid) for t in kept for uid in t.session_uids}


def stored_rows(backend: Backend) -> tuple[set[str], set[tuple[str, str]]]:
    ids = {row[0] for row in backend.rows("SELECT id FROM traces")}
    links = {(row[0], row[1]) for row in backend.rows("SELECT trace_id, session_uid FROM trace_sessions")}
    return ids, links


def assert_consistent(backend: Backend) -> None:
    """No orphan link, every link's time is its trace's."""
    orphans = backend.rows(
        "SELECT count(*) FROM trace_sessions s WHERE NOT EXISTS (SELECT 1 FROM traces t WHERE t.id = s.trace_id)"
    )
    assert orphans == [(0,)]
    assert backend.junction_drift() == []
    if backend.is_sqlite:
        assert backend.rows("PRAGMA integrity_check") == [("ok",)]
        assert backend.rows("PRAGMA foreign_key_check") == []


# -- results against the oracle --------------------------------------------------------------------------------
# Each batch size on the epoch cutoff; the other ways to give a cutoff with the smallest batches that still
# span several (their cross product was 15 cases a engine, for the same checks).
PRUNE_CASES = {
    "epoch-1": (CUTOFF, 1),
    "epoch-7": (CUTOFF, 7),
    "epoch-10000": (CUTOFF, 10_000),
    "datetime-7": (datetime.fromtimestamp(CUTOFF, tz=UTC), 7),
    "timedelta-7": ("timedelta", 7),
    "nothing-to-prune-10000": (NOW - 100 * DAY, 10_000),
    "everything-before-now-1": (NOW, 1),
    "everything-before-now-10000": (NOW, 10_000),
}


@pytest.mark.parametrize(("older_than", "batch_size"), list(PRUNE_CASES.values()), ids=list(PRUNE_CASES))
def test_prune_leaves_what_the_oracle_keeps(backend: Backend, older_than: Any, batch_size: int) -> None:
    traces = dataset()
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
        if older_than == "timedelta":
            before = time.time()
            report = store.prune(timedelta(days=30), batch_size=batch_size)
            cutoff = report.cutoff
            assert before - 30 * DAY <= cutoff <= time.time() - 30 * DAY
        else:
            report = store.prune(older_than, batch_size=batch_size)
            cutoff = older_than.timestamp() if isinstance(older_than, datetime) else older_than
            assert report.cutoff == cutoff
        assert stored_rows(backend) == expected_rows(traces, cutoff)
        assert report.deleted == sum(t.created_at < cutoff for t in traces)
        big = store.get(traces[3].id)  # the 2 MB trace, 3 days old
        assert (big is not None and big.data == traces[3].data) == (traces[3].created_at >= cutoff)
    assert_consistent(backend)


async def test_async_prune_leaves_what_the_oracle_keeps(backend: Backend) -> None:
    traces = dataset()
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
    async with AsyncTraceStore(backend.async_url) as store:
        report = await store.prune(CUTOFF, batch_size=9)
        again = await store.prune(CUTOFF, batch_size=9)
    assert stored_rows(backend) == expected_rows(traces, CUTOFF)
    assert report.deleted == sum(t.created_at < CUTOFF for t in traces) and again.deleted == 0
    assert_consistent(backend)


def test_prune_of_an_empty_database_and_a_dry_run(store: TraceStore, backend: Backend) -> None:
    report = store.prune(CUTOFF)
    assert (report.deleted, report.batches) == (0, 1)
    traces = dataset()
    store.store_batch(traces)
    dry = store.prune(CUTOFF, dry_run=True)
    assert dry.dry_run and dry.batches == 0
    assert dry.deleted == sum(t.created_at < CUTOFF for t in traces)
    assert stored_rows(backend) == expected_rows(traces, -math.inf)  # nothing deleted


# -- bounded batches -------------------------------------------------------------------------------------------
def test_no_transaction_deletes_more_than_a_batch(store: TraceStore, backend: Backend) -> None:
    """Counted by the database, not by prune: traces at the start and at the commit of every transaction."""
    traces = dataset(400)
    store.store_batch(traces)
    deleted_per_transaction: list[int] = []
    at_begin: dict[int, int] = {}

    def count(connection: Any) -> int:
        return int(connection.exec_driver_sql("SELECT count(*) FROM traces").scalar())

    def on_begin(connection: Any) -> None:
        at_begin[id(connection)] = count(connection)

    def on_commit(connection: Any) -> None:
        deleted_per_transaction.append(at_begin.pop(id(connection)) - count(connection))

    event.listen(store.engine, "begin", on_begin)
    event.listen(store.engine, "commit", on_commit)
    progress: list[tuple[int, int]] = []
    try:
        report = store.prune(CUTOFF, batch_size=13, on_progress=lambda done, total: progress.append((done, total)))
    finally:
        event.remove(store.engine, "begin", on_begin)
        event.remove(store.engine, "commit", on_commit)
    expected = sum(t.created_at < CUTOFF for t in traces)
    deletions = [n for n in deleted_per_transaction if n]
    assert sum(deletions) == expected == report.deleted
    assert max(deletions) == 13 and len(deletions) == math.ceil(expected / 13)
    assert progress[0] == (0, expected) and progress[-1] == (expected, expected)
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


@pytest.mark.parametrize("resume", [False, True])
def test_each_batch_is_an_index_range_read_from_the_oldest_end(
    store: TraceStore, backend: Backend, resume: bool
) -> None:
    store.store_batch(
        make_trace(id=f"t{i}", created_at=NOW - i * 60, session_uids=[f"s{i % 50}"]) for i in range(5_000)
    )
    backend.analyze()
    stmt = retention_statements_for(backend.name).delete_batch(resume=resume)
    params = {"cutoff": CUTOFF, "batch_size": 100} | ({"low": CUTOFF - DAY} if resume else {})
    plan = backend.plan(stmt, params)
    text = "\n".join(plan)
    if backend.is_sqlite:
        bound = "(created_at>? AND created_at<?)" if resume else "(created_at<?)"
        assert f"SEARCH oldest USING COVERING INDEX idx_traces_created_at {bound}" in text, text
        assert "SEARCH traces USING INTEGER PRIMARY KEY (rowid=?)" in text, text
        assert "SCAN" not in text and "TEMP B-TREE" not in text, text
    else:
        assert "Index Scan using idx_traces_created_at on traces oldest" in text or (
            "Index Only Scan using idx_traces_created_at on traces oldest" in text
        ), text
        # The batch is a range of the index from its oldest end under a Limit, each row then found by its key.
        assert "Limit" in text and ("Index Cond: (created_at < " in text or "Index Cond: ((created_at < " in text), text
        assert "Index Scan using pk_traces on traces" in text, text
        assert "Seq Scan" not in text and "Sort" not in text, text


# -- kill -9 in the middle, then a rerun -----------------------------------------------------------------------
PRUNE_CHILD = """
import sys
from tracestore import TraceStore
with TraceStore(sys.argv[1]) as store:
    store.prune(float(sys.argv[2]), batch_size=int(sys.argv[3]))
"""


def test_kill_during_prune_leaves_whole_batches_and_a_rerun_finishes(db_path: Path, backend: Backend) -> None:
    traces = [
        make_trace(id=f"t{i:05d}", created_at=NOW - (i % 20_000) * 200, session_uids=[f"s{i % 40}", f"s{i % 7}"])
        for i in range(20_000)
    ]
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
    old = sum(t.created_at < CUTOFF for t in traces)
    child = subprocess.Popen([sys.executable, "-c", PRUNE_CHILD, backend.url, repr(CUTOFF), "50"])
    remaining = len(traces)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as connection:
            remaining = connection.execute("SELECT count(*) FROM traces").fetchone()[0]
        if remaining <= len(traces) - 2_000:
            break
        time.sleep(0.01)
    assert child.poll() is None, "the prune finished before it could be killed; use more traces"
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    assert_consistent(backend)
    ids, links = stored_rows(backend)
    gone = [t for t in traces if t.id not in ids]
    assert 2_000 <= len(gone) < old
    # Oldest first and whole traces: nothing deleted is newer than anything old that is left, and every
    # trace that is left has all of its links.
    assert max(t.created_at for t in gone) <= min(t.created_at for t in traces if t.id in ids)
    assert links == {(t.id, uid) for t in traces if t.id in ids for uid in t.session_uids}

    with TraceStore(backend.url) as store:
        report = store.prune(CUTOFF, batch_size=50)
    assert report.deleted == old - len(gone)
    assert stored_rows(backend) == expected_rows(traces, CUTOFF)
    assert_consistent(backend)


# -- a writer process during the prune -------------------------------------------------------------------------
WRITER_CHILD = """
import sys, time
from tracestore import TraceContext, TraceStore
with TraceStore(sys.argv[1]) as store:
    for batch in range(int(sys.argv[2])):
        traces = [TraceContext(id=f"new-{batch}-{i}", context_type="span", namespace="w", data={}, session_uids=["s1"])
                  for i in range(20)]
        store.store_batch(traces)
        print(batch, flush=True)
"""


def test_a_writer_keeps_storing_during_a_prune_and_none_of_its_traces_is_deleted(backend: Backend) -> None:
    traces = [make_trace(id=f"old-{i}", created_at=NOW - 40 * DAY - i, session_uids=["s1"]) for i in range(6_000)]
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, backend.url, "150"], stdout=subprocess.PIPE, text=True
    )
    acknowledged: list[int] = []
    reader = threading.Thread(target=lambda: acknowledged.extend(int(line) for line in writer_lines(writer)))
    reader.start()
    deadline = time.monotonic() + 60
    while not acknowledged and time.monotonic() < deadline:  # the writer is up and writing
        time.sleep(0.01)
    with TraceStore(backend.url) as store:
        before = len(acknowledged)
        report = store.prune(CUTOFF, batch_size=20)
        during = len(acknowledged) - before
    reader.join(timeout=120)
    assert writer.wait(timeout=120) == 0
    assert report.deleted == len(traces)
    assert during > 0, "the writer stored nothing while the prune ran"
    ids, _ = stored_rows(backend)
    assert ids == {f"new-{batch}-{i}" for batch in range(150) for i in range(20)}
    assert_consistent(backend)


def writer_lines(process: subprocess.Popen[str]) -> Iterator[str]:
    assert process.stdout is not None
    yield from process.stdout


# -- space -----------------------------------------------------------------------------------------------------
def test_space_report_and_incremental_vacuum(tmp_path: Path) -> None:
    plain, incremental = tmp_path / "plain.db", tmp_path / "incremental.db"
    sqlite3.connect(incremental).execute("PRAGMA auto_vacuum=INCREMENTAL").connection.close()  # before any table
    traces = [make_trace(id=f"t{i}", created_at=NOW - 40 * DAY - i, data="x" * 2_000) for i in range(2_000)]
    reports = {}
    for path in (plain, incremental):
        with TraceStore(f"sqlite:///{path}") as store:
            store.store_batch(traces)
            size = path.stat().st_size + Path(f"{path}-wal").stat().st_size
            reports[path] = store.prune(CUTOFF, batch_size=500, vacuum=True)
        assert reports[path].deleted == 2_000
    kept = reports[plain].space
    assert kept.free_pages is not None and kept.free_pages > 900 and kept.returned_pages is None
    assert "only VACUUM shrinks it" in kept.advice and "offline" in kept.advice
    returned = reports[incremental].space
    assert returned.free_pages == 0 and returned.returned_pages is not None and returned.returned_pages > 900
    with sqlite3.connect(incremental) as connection:
        assert connection.execute("PRAGMA freelist_count").fetchone() == (0,)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert incremental.stat().st_size < size / 4


def test_the_advice_offers_vacuum_only_where_it_returns_pages(tmp_path: Path) -> None:
    """A file tracestore creates has auto_vacuum=NONE (a write-throughput choice): its advice never sends the
    reader to --vacuum, which cannot shrink it; an INCREMENTAL file's does."""
    plain, incremental = tmp_path / "plain.db", tmp_path / "incremental.db"
    sqlite3.connect(incremental).execute("PRAGMA auto_vacuum=INCREMENTAL").connection.close()  # before any table
    traces = [make_trace(id=f"t{i}", created_at=NOW - 40 * DAY - i, data="x" * 2_000) for i in range(200)]
    advice = {}
    for path in (plain, incremental):
        with TraceStore(f"sqlite:///{path}") as store:
            store.store_batch(traces)
            advice[path] = store.prune(CUTOFF).space.advice
    with contextlib.closing(sqlite3.connect(plain)) as connection:
        assert connection.execute("PRAGMA auto_vacuum").fetchone() == (0,)
    assert "only VACUUM shrinks it" in advice[plain] and "--vacuum" not in advice[plain], advice[plain]
    assert "--vacuum" in advice[incremental] and "VACUUM shrinks" not in advice[incremental], advice[incremental]


def test_the_space_report_says_where_the_space_went(store: TraceStore, backend: Backend) -> None:
    store.store_batch(dataset(100))
    space = store.prune(CUTOFF).space
    if backend.is_sqlite:  # a file tracestore creates has auto_vacuum=NONE, which --vacuum cannot shrink
        assert space.free_pages is not None and space.free_pages > 0 and space.page_size
        assert space.advice.startswith(f"{space.free_pages:,} free pages") and "only VACUUM shrinks it" in space.advice
        assert "--vacuum" not in space.advice
    else:
        assert space.free_pages is None and "autovacuum" in space.advice


# -- bad input -------------------------------------------------------------------------------------------------
BAD_CUTOFFS = [math.nan, math.inf, -math.inf, 10**400, NOW + 3600, NOW * 1000, True, "30d", None,
               datetime(2020, 1, 1), timedelta(days=-1), datetime.now(UTC) + timedelta(days=1)]  # fmt: skip
BAD_BATCHES = [0, -1, 1.5, True, "10", None, MAX_BATCH_SIZE + 1]


async def test_bad_arguments_are_refused_before_anything_is_deleted(backend: Backend) -> None:
    traces = dataset(60)
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
        for cutoff in BAD_CUTOFFS:
            with pytest.raises(InvalidQueryError, match="older_than"):
                store.prune(cutoff)  # type: ignore[arg-type]
        for batch_size in BAD_BATCHES:
            with pytest.raises(InvalidQueryError, match="batch_size"):
                store.prune(CUTOFF, batch_size=batch_size)  # type: ignore[arg-type]
        with pytest.raises(InvalidQueryError, match="dry_run"):
            store.prune(CUTOFF, dry_run=1)  # type: ignore[arg-type]
    async with AsyncTraceStore(backend.async_url) as async_store:
        for cutoff in BAD_CUTOFFS[:6]:
            with pytest.raises(InvalidQueryError, match="older_than"):
                await async_store.prune(cutoff)  # type: ignore[arg-type]
        with pytest.raises(InvalidQueryError, match="batch_size"):
            await async_store.prune(CUTOFF, batch_size=0)
    assert stored_rows(backend) == expected_rows(traces, -math.inf)


def test_a_cutoff_in_milliseconds_names_the_unit(store: TraceStore) -> None:
    with pytest.raises(InvalidQueryError, match=r"older_than .* is past the year 9999: it looks like milliseconds"):
        store.prune(NOW * 1000, dry_run=True)
    with pytest.raises(InvalidQueryError, match="microseconds: divide by 1000000"):
        store.prune(int(NOW * 1e6))


# -- the command -----------------------------------------------------------------------------------------------
def test_cli_prune(backend: Backend) -> None:
    # Half a day away from any whole number of days: which traces `--older-than 30d` takes is not a coin toss.
    now = time.time()
    traces = [
        make_trace(id=f"c{i}-ü", created_at=now - (i % 60 + 0.5) * DAY, session_uids=[f"s{i % 3}", f"s{i % 4}"])
        for i in range(200)
    ]
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
    runner = CliRunner()
    dry = runner.invoke(main, ["--url", backend.url, "prune", "--older-than", "30d", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    cutoff = now - 30 * DAY
    old = sum(t.created_at < cutoff for t in traces)
    assert dry.stdout.startswith(f"Would delete {old:,} traces older than ")
    assert stored_rows(backend) == expected_rows(traces, -math.inf)
    args = ["--url", backend.url, "prune", "--older-than", "30d", "--batch-size", "11", "--vacuum"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Deleted {old:,} traces older than "), lines
    # The full batches, the short one that ends the walk, and the last pass from the oldest end (empty here).
    assert f": {old // 11 + 1 + (old >= 11)} batches, " in lines[0], lines
    assert ("VACUUM" if backend.is_sqlite else "autovacuum") in result.stderr  # the space advice
    assert "pruning traces" in result.stderr
    assert stored_rows(backend) == expected_rows(traces, cutoff)

    for args, code in ((["--older-than", "soon"], 2), (["--older-than", "1d", "--batch-size", "0"], 2), ([], 2)):
        bad = runner.invoke(main, ["--url", backend.url, "prune", *args])
        assert bad.exit_code == code and "Error" in bad.stderr and "Traceback" not in bad.output, bad.output


@pytest.mark.parametrize(
    ("older_than", "named"),
    [("1796415240000", "looks like an epoch time in milliseconds"), ("800000d", "before the year 1")],
)
def test_cli_prune_refuses_an_age_before_the_year_1_in_one_line(tmp_path: Path, older_than: str, named: str) -> None:
    url = f"sqlite:///{tmp_path / 'traces.db'}"
    with TraceStore(url) as store:
        store.store(make_trace(created_at=CUTOFF - DAY))
    for dry_run in (["--dry-run"], []):
        result = CliRunner().invoke(main, ["--url", url, "prune", "--older-than", older_than, *dry_run])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
        assert errors == [line for line in result.stderr.splitlines() if "Error" in line] and len(errors) == 1
        assert "'--older-than'" in errors[0] and named in errors[0], errors
        assert "Traceback" not in result.output and result.stdout == ""
    with TraceStore(url) as store:
        assert len(store.query()) == 1


def test_cli_prune_summary_is_one_short_line(tmp_path: Path) -> None:
    """stdout: one line that fits a terminal, "would delete N" on a dry run, no rate when nothing was deleted
    or the run was too short for one; the space advice goes to stderr."""
    url = f"sqlite:///{tmp_path / 'traces.db'}"
    with TraceStore(url) as store:
        store.store_batch([make_trace(created_at=CUTOFF - DAY - i) for i in range(120)])
    runner = CliRunner()
    dry = runner.invoke(main, ["--url", url, "prune", "--older-than", "30d", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    (line,) = dry.stdout.splitlines()
    assert line.startswith("Would delete 120 traces older than ") and line.endswith("(dry run)"), line
    assert "deleted" not in line.lower() and "=" not in line and len(line) <= 80, line
    pruned = runner.invoke(main, ["--url", url, "prune", "--older-than", "30d", "--batch-size", "50"])
    assert pruned.exit_code == 0, pruned.output
    (line,) = pruned.stdout.splitlines()
    assert line.startswith("Deleted 120 traces older than ") and ": 4 batches, " in line, line
    assert "/s" not in line and len(line) <= 80, line  # well under a second: no rate
    assert "free pages" in pruned.stderr and "only VACUUM shrinks it" in pruned.stderr
    nothing = runner.invoke(main, ["--url", url, "prune", "--older-than", "30d"])
    assert nothing.exit_code == 0, nothing.output
    (line,) = nothing.stdout.splitlines()
    assert line.startswith("Deleted 0 traces: none is older than ") and "/s" not in line, line
    assert "free pages" not in nothing.stderr  # nothing deleted, nothing to say about space


def test_prune_summary_shows_a_rate_only_when_it_means_something() -> None:
    def report(deleted: int, seconds: float, *, dry_run: bool = False) -> PruneReport:
        return PruneReport(cutoff=CUTOFF, deleted=deleted, batches=3, seconds=seconds, dry_run=dry_run)

    assert summary(report(30_000, 12.0)).endswith(": 3 batches, 12.0 s, 2,500/s")
    assert summary(report(30_000, 0.4)).endswith(": 3 batches, 0.4 s")
    assert summary(report(0, 12.0)).startswith("Deleted 0 traces: none is older than ")
    assert summary(report(30_000, 0.4, dry_run=True)).startswith("Would delete 30,000 traces older than ")
    assert summary(report(1_234_567, 3_600.0)).startswith("Deleted 1,234,567 traces older than 20")
    assert len(summary(report(30_000, 12.0))) <= 80


def test_cli_prune_of_a_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--url", f"sqlite:///{tmp_path / 'none.db'}", "prune", "--older-than", "1d"])
    assert result.exit_code == 1 and "no database at" in result.stderr
    assert not (tmp_path / "none.db").exists()
