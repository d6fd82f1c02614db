"""Benchmark of `upgrade head` on a legacy file while the previous release keeps writing to it.

One run, one data set:
  1. generate a legacy-schema file with tracestore.testing.bulk (the same file bench_query.py uses, so a
     file kept by either benchmark is reused by the other with --keep) and copy it to a work file;
  2. start a writer process playing the previous release during a rolling deploy: plain sqlite3 (WAL,
     busy_timeout 60 s, synchronous NORMAL), one trace per BEGIN IMMEDIATE ... COMMIT, junction rows
     inserted without created_at, each transaction's latency recorded;
  3. upgrade the work file step by step (0001, 0002, 0003, 0004), timing each step, while it writes;
  4. stop the writer, check the file (links whose created_at is not their trace's, orphans,
     integrity_check, free pages), and print the figures next to the issue's targets (JSON with --json);
  5. crash test: a second copy of the legacy file is upgraded by `tracestore upgrade` in a separate
     process, killed with SIGKILL at a random point of the backfill (seeded), upgraded again to head,
     and compared with the uninterrupted run: row counts and a SHA-256 of every (trace_id, session_uid,
     created_at) of the legacy traces' links (the writer's own traces exist only in the first file);
  6. with --downgrade, the migrated file is downgraded to 0001 step by step (timed, no writer) and its
     legacy links, columns and integrity_check compared with the legacy file.

Bytes written: the upgrade process's /proc/self/io (write_bytes, wchar, rchar) from the first step through a
final WAL checkpoint, and the writer's own write_bytes (its auto-checkpoints copy the upgrade's frames too);
and, unless --no-plain, `tracestore upgrade` of another copy in a process of its own with no writer (its
seconds and write_bytes from getrusage), then the cold 10-minute window (raw sqlite3 and the store) on that
migrated file and the session index's fill from dbstat (--one-sort: again after REINDEX, the index built in
one sort). --ids uuid4 runs it all on a copy of the legacy file with uuid4 trace ids (uuid4_ids.py).

    python benchmarks/bench_migration.py --scale 1m [--batch-size N] [--writer-rate 500] [--no-kill] [--keep]
                                         [--ids uuid4] [--no-plain] [--one-sort] [--json out.json]

Exit status: 0 when the migrated file is right (missed targets are reported, not fatal); 2 when it is not:
the upgrade failed, the writer lost a write, integrity_check failed, orphans are left, a link is wrong
(including links the old writer inserted without created_at), or the killed-and-rerun file differs.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import cold_cache
from common import (
    DEFAULT_WORKDIR,
    WINDOW_S,
    checkpoint,
    copy_db,
    data_options,
    finish,
    git_revision,
    parse_scale,
    remove_db,
)
from uuid4_ids import copy_with_uuid4_ids

from tracestore.errors import StorageError
from tracestore.migrate import current_revision, downgrade, head_revision, upgrade
from tracestore.migrate.backfill import PROGRESS_TABLE
from tracestore.testing.bulk import GenerateReport, generate_legacy

STEPS = {
    "0001": "0001 adopt the legacy schema",
    "0002": "0002 add column and triggers",
    "0003": "0003 backfill, then the session index built in key order",
    "0004": "0004 drop the legacy session indexes + ANALYZE",
}
LABELS = {
    **STEPS,
    "0003 sort": "0003 the session index: its keys sorted (no lock)",
    "0003 copy": "0003 the session index: copied in key order, checked, attached",
    "later": "the revisions after 0004",
}
# Log lines of the upgrade that start a part of 0003 worth its own row of writer figures.
SUBSTEPS = (
    ("session index: building it", "0003 sort"),
    ("session index: %d links to copy", "0003 copy"),
)


class _Marks(logging.Handler):
    """Appends (part, now) to the writer figures' marks when the upgrade logs the start of a part of 0003."""

    def __init__(self, marks: list[tuple[str, int]]) -> None:
        super().__init__(logging.INFO)
        self.marks = marks

    def emit(self, record: logging.LogRecord) -> None:
        for prefix, name in SUBSTEPS:
            if str(record.msg).startswith(prefix):
                self.marks.append((name, time.perf_counter_ns()))


STALL_TARGET_S = 1.0
BYTES_TARGET = 3.0  # bytes the upgrade writes / the legacy file's size
# At 10M traces: `tracestore upgrade` seconds, and the cold 10-minute window on the migrated file.
UPGRADE_TARGET_S_10M = 150.0
COLD_WINDOW_TARGET_MS_10M = 350.0
COLD_RUNS = 5
SIZE_TARGET = 1.05
WRITER_NAMESPACE = "rolling-deploy-writer"  # marks the writer's traces in the work file

# The previous release, as a separate process: its own connection, SQL naming explicit columns, so it
# keeps working after 0002 adds trace_sessions.created_at (its links get NULL there).
WRITER_SCRIPT = r"""
import json, random, sqlite3, sys, threading, time, uuid

path, rate, seed, namespace = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
connection = sqlite3.connect(path, isolation_level=None)
connection.execute("PRAGMA busy_timeout=60000")
connection.execute("PRAGMA journal_mode=WAL")
connection.execute("PRAGMA synchronous=NORMAL")
insert_trace = ("INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)")
insert_link = "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)"
rng = random.Random(seed)
others = [f"rolling-{k:04d}" for k in range(500)]
filler = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=4096))
metadata = json.dumps({"host": "worker-01", "sdk": "0.9.0", "attempt": 1})
interval = 1.0 / rate if rate > 0 else 0.0
starts, latencies, waits, commits, failures, written = [], [], [], [], [], []


def write_bytes():
    with open("/proc/self/io") as io:
        return next(int(line.split()[1]) for line in io if line.startswith("write_bytes"))



due = time.perf_counter()
while not stop.is_set():
    if interval:
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        due = max(due + interval, time.perf_counter())  # after a stall, carry on at the rate; no burst
    trace_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    sessions = {"hot" if rng.random() < 0.1 else rng.choice(others)}
    if rng.random() < 0.2:
        sessions.add(rng.choice(others))
    offset = rng.randrange(len(filler) - 250)
    data = json.dumps({"seq": len(starts), "text": filler[offset:offset + 250]})
    now = time.time()
    started = time.perf_counter_ns()
    try:
        connection.execute("BEGIN IMMEDIATE")
        locked = time.perf_counter_ns()
        connection.execute(insert_trace, (trace_id, "llm_call", namespace, data, metadata, now, now))
        for uid in sorted(sessions):
            connection.execute(insert_link, (trace_id, uid))
        committing = time.perf_counter_ns()
        connection.execute("COMMIT")
    except sqlite3.Error as exc:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        failures.append(f"{type(exc).__name__}: {exc}")
        continue
    latencies.append(time.perf_counter_ns() - started)
    starts.append(started)
    waits.append(locked - started)  # BEGIN IMMEDIATE: waiting for the write lock
    commits.append(time.perf_counter_ns() - committing)  # COMMIT, with any WAL auto-checkpoint it runs
    written.append(write_bytes())  # its own WAL frames, and the frames its auto-checkpoints copy
    if len(starts) == 1:
        print("ready", flush=True)
connection.close()
result = {"starts_ns": starts, "latencies_ns": latencies, "waits_ns": waits, "commits_ns": commits,
          "write_bytes": written, "failures": failures}
print(json.dumps(result), flush=True)
"""


@dataclass
class Line:
    """One row of the results table."""

    label: str
    measured: str
    target: str = ""
    ok: bool | None = None

    def verdict(self) -> str:
        return "" if self.ok is None else ("ok" if self.ok else "MISSED")


class Writer:
    """The writer process; started before the upgrade, stopped after it. perf_counter_ns is
    CLOCK_MONOTONIC on Linux, the same clock in both processes, so its samples line up with the steps."""

    def __init__(self, path: Path, *, rate: float, seed: int) -> None:
        command = [sys.executable, "-c", WRITER_SCRIPT, str(path), str(rate), str(seed), WRITER_NAMESPACE]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != "ready":  # its first insert is committed
            self.process.kill()
            raise RuntimeError("the writer process did not start writing")

    def stop(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write("stop\n")
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        output = self.process.stdout.read()
        if self.process.wait(timeout=120) != 0 or not output:
            raise RuntimeError(f"the writer process failed (exit {self.process.returncode})")
        result: dict[str, Any] = json.loads(output)
        return result


def percentile(sorted_values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile of an ascending sequence."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def latency_stats(samples_ns: Sequence[int]) -> dict[str, Any]:
    values = sorted(samples_ns)
    if not values:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": len(values),
        "p50_ms": percentile(values, 0.50) / 1e6,
        "p99_ms": percentile(values, 0.99) / 1e6,
        "max_ms": values[-1] / 1e6,
    }


def process_io(pid: int | str = "self") -> dict[str, int]:
    """/proc/PID/io: bytes a process read and wrote through system calls (rchar, wchar) and caused to be
    written to the storage layer (write_bytes, counted when a page of the page cache is first dirtied)."""
    fields = (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {name: int(value) for name, value in fields}


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in ("rchar", "wchar", "read_bytes", "write_bytes")}


def wal_checkpoint(path: Path, *, tries: int = 50) -> list[int]:
    """PRAGMA wal_checkpoint(TRUNCATE) from this process, again while the writer keeps it busy:
    (busy, WAL frames, frames checkpointed) of the last try."""
    connection = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        for _ in range(tries):
            result = list(connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            if result[0] == 0:
                break
            time.sleep(0.01)
        return result
    finally:
        connection.close()


def writer_bytes(written: dict[str, Any], start_ns: int, end_ns: int) -> dict[str, int]:
    """What the writer process wrote during the upgrade, and of it what exceeds its typical commit (the
    median before and after): the upgrade's WAL frames its auto-checkpoints copied into the file."""
    inside, outside = [], []
    previous = None
    for started, total in zip(written["starts_ns"], written["write_bytes"], strict=True):
        if previous is not None:
            (inside if start_ns <= started < end_ns else outside).append(total - previous)
        previous = total
    typical = sorted(outside)[len(outside) // 2] if outside else 0
    return {
        "during_upgrade": sum(inside),
        "typical_commit": typical,
        "above_typical": sum(max(0, delta - typical) for delta in inside),
    }


class Bench:
    def __init__(self, args: argparse.Namespace, batch_size: int | None) -> None:
        self.args = args
        self.workdir: Path = args.workdir
        self.batch_size = batch_size
        self.started = time.perf_counter()
        self.lines: list[Line] = []
        self.problems: list[str] = []
        config = {
            "scale": args.scale,
            "seed": args.seed,
            "batch_size": batch_size,
            "writer_rate": args.writer_rate,
            "ids": args.ids,
            "settle_s": args.settle,
            "revision": git_revision(),
            "sqlite": sqlite3.sqlite_version,
        }
        self.out: dict[str, Any] = {"config": config, "reused_data": False}

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    # 1. data: the options and file name of bench_query.py's legacy_file, so a kept file is shared
    def legacy_file(self) -> GenerateReport:
        traces = self.args.scale
        options = data_options(traces, self.args.seed)
        path = self.workdir / f"legacy-{traces}-seed{self.args.seed}.db"
        sidecar = path.with_suffix(".json")
        if self.args.keep and path.exists() and sidecar.exists():
            saved = json.loads(sidecar.read_text())
            if saved["options"] == options:
                self.log(f"reusing {path}")
                self.out["reused_data"] = True
                return GenerateReport(**saved["report"])
        remove_db(path)
        self.log(f"generating {traces:,} legacy traces into {path}")
        report = generate_legacy(path, **options)
        sidecar.write_text(json.dumps({"options": options, "report": asdict(report)}))
        return report

    def uuid4_file(self, time_ordered: GenerateReport) -> GenerateReport:
        """The legacy file with uuid4 trace ids instead of time-ordered ones (uuid4_ids.py), kept with --keep."""
        source = Path(time_ordered.path)
        path = source.with_name(source.stem + "-uuid4.db")
        if not (self.args.keep and path.exists()):
            remove_db(path)
            self.log(f"copying {source.name} with uuid4 trace ids into {path.name}")
            started = time.perf_counter()
            copy_with_uuid4_ids(source, path)
            self.log(f"  copied in {time.perf_counter() - started:.1f} s")
        if not self.args.keep:
            remove_db(source)
            source.with_suffix(".json").unlink(missing_ok=True)
        return replace(time_ordered, path=str(path), file_bytes=path.stat().st_size)

    # 2 + 3. the upgrade, step by step, under the writer
    def upgrade_under_writer(self, work: Path) -> dict[str, Any]:
        url = f"sqlite:///{work}"
        self.log(f"starting the legacy writer ({self.args.writer_rate:g} inserts/s; 0 = unpaced)")
        writer = Writer(work, rate=self.args.writer_rate, seed=self.args.seed + 1)
        marks: list[tuple[str, int]] = [("before", time.perf_counter_ns())]
        steps: dict[str, float] = {}
        reports: dict[str, Any] = {}
        retried: dict[str, list[str]] = {revision: [] for revision in STEPS}
        substeps, logger = _Marks(marks), logging.getLogger("tracestore.migrate")
        logger.addHandler(substeps)
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)  # the marks come from INFO records
        try:
            time.sleep(self.args.settle)
            io_before, upgrade_started = process_io(), time.perf_counter()
            for revision in STEPS:
                self.log(f"upgrade to {STEPS[revision]}")
                marks.append((revision, time.perf_counter_ns()))
                started = time.perf_counter()
                for name, report in self.upgrade_step(url, revision, retried).items():
                    # Several revisions add to the same report ("index"): merge, do not replace.
                    if isinstance(report, dict):
                        reports.setdefault(name, {}).update(report)
                    else:
                        reports[name] = report
                steps[revision] = time.perf_counter() - started
            if current_revision(url) != head_revision():  # revisions after 0004, as one step
                self.log("upgrade to head (later revisions)")
                marks.append(("later", time.perf_counter_ns()))
                started = time.perf_counter()
                retried.setdefault("later", [])
                self.upgrade_step(url, "head", retried)
                steps["later"] = time.perf_counter() - started
            checkpoint_started = time.perf_counter()
            final_checkpoint = wal_checkpoint(work)
            upgrade_io = io_delta(io_before, process_io())
            self.out["upgrade_io"] = {
                **upgrade_io,
                "final_checkpoint": final_checkpoint,
                "final_checkpoint_s": time.perf_counter() - checkpoint_started,
                "seconds_through_checkpoint": time.perf_counter() - upgrade_started,
            }
            marks.append(("after", time.perf_counter_ns()))
            time.sleep(self.args.settle)
        finally:
            logger.removeHandler(substeps)
            end = time.perf_counter_ns()
            self.log("stopping the writer")
            written = writer.stop()
        if current_revision(url) != head_revision():
            self.problems.append(f"the work file is at {current_revision(url)}, not head")
        self.out["upgrade"] = {"seconds": sum(steps.values()), "steps": steps, "retried": retried}
        backfill = reports.get("backfill")
        self.out["backfill"] = asdict(backfill) if backfill is not None else None
        self.out["index"] = reports.get("index")
        return self.writer_figures(written, marks, end)

    def upgrade_step(self, url: str, revision: str, retried: dict[str, list[str]]) -> dict[str, Any]:
        """One revision; a step that fails with "database is locked" is run again, as an operator would
        rerun the command (each revision is one transaction, the backfill resumes), and counted."""
        while True:
            try:
                return upgrade(url, revision, batch_size=self.batch_size)
            except StorageError as exc:
                if "database is locked" not in str(exc) or len(retried[revision]) >= self.args.retries:
                    raise
                statement = str(exc).partition("[SQL:")[2].strip().split("\n")[0].rstrip("]")
                retried[revision].append(statement)
                self.log(f"  {revision} failed with 'database is locked' at {statement!r}; running it again")

    def writer_figures(self, written: dict[str, Any], marks: list[tuple[str, int]], end: int) -> dict[str, Any]:
        starts, latencies = written["starts_ns"], written["latencies_ns"]
        names = [name for name, _ in marks]
        bounds = [at for _, at in marks]
        phases: dict[str, dict[str, list[int]]] = {name: {"all": [], "wait": [], "commit": []} for name in names}
        upgrading: list[int] = []
        samples = zip(starts, latencies, written["waits_ns"], written["commits_ns"], strict=True)
        for started, latency, wait, commit in samples:
            if started < bounds[0] or started >= end:
                continue  # the warm-up insert that said "ready"
            phase = names[bisect.bisect_right(bounds, started) - 1]
            for key, value in (("all", latency), ("wait", wait), ("commit", commit)):
                phases[phase][key].append(value)
            if phase not in ("before", "after"):
                upgrading.append(latency)

        def phase_at(at: int) -> str:
            return names[max(0, bisect.bisect_right(bounds, at) - 1)]

        # The longest stalls, with where they started and ended: a wait that starts at the end of one
        # step and lasts through the next belongs to the next.
        timed = sorted(
            ((latency, started) for started, latency in zip(starts, latencies, strict=True) if started >= bounds[0]),
            reverse=True,
        )
        stalls = [
            {
                "ms": latency / 1e6,
                "started_at_s": (started - bounds[0]) / 1e9,
                "started_in": phase_at(started),
                "ended_in": phase_at(started + latency),
            }
            for latency, started in timed[:10]
        ]
        figures = {
            "write_bytes": writer_bytes(written, bounds[1], bounds[-1]),
            "commits": len(latencies),
            "failures": written["failures"],
            "during_upgrade": latency_stats(upgrading),
            "phases": {
                name: {
                    **latency_stats(values["all"]),
                    "lock_wait_max_ms": max(values["wait"], default=0) / 1e6,
                    "commit_max_ms": max(values["commit"], default=0) / 1e6,
                }
                for name, values in phases.items()
            },
            "longest_stall": stalls[0] if stalls else None,
            "longest_stalls": stalls,
            "step_starts_s": {name: (at - bounds[0]) / 1e9 for name, at in marks},
        }
        self.out["writer"] = figures
        if written["failures"]:
            self.problems.append(f"the writer saw {len(written['failures'])} failed inserts: {written['failures'][0]}")
        return figures

    # 4. the file after the run
    def check(self, legacy: Path, work: Path, data: GenerateReport, writer: dict[str, Any]) -> None:
        self.log("checking the migrated file (links, orphans, integrity_check)")
        checkpoint(work)
        connection = sqlite3.connect(work, isolation_level=None)
        try:

            def one(sql: str, *params: Any) -> Any:
                return connection.execute(sql, params).fetchone()[0]

            join = "FROM trace_sessions ts JOIN traces t ON t.id = ts.trace_id"
            checks = {
                "wrong_links": one(f"SELECT count(*) {join} WHERE ts.created_at IS NOT t.created_at"),
                "writer_traces": one("SELECT count(*) FROM traces WHERE namespace = ?", WRITER_NAMESPACE),
                "writer_links": one(f"SELECT count(*) {join} WHERE t.namespace = ?", WRITER_NAMESPACE),
                "writer_links_null": one(
                    f"SELECT count(*) {join} WHERE t.namespace = ? AND ts.created_at IS NULL", WRITER_NAMESPACE
                ),
                "orphans": one(
                    "SELECT count(*) FROM trace_sessions ts"
                    " WHERE NOT EXISTS (SELECT 1 FROM traces t WHERE t.id = ts.trace_id)"
                ),
                "integrity_check": [row[0] for row in connection.execute("PRAGMA integrity_check")],
                "free_bytes": one("PRAGMA freelist_count") * one("PRAGMA page_size"),
            }
        finally:
            connection.close()
        checks["legacy_bytes"], checks["migrated_bytes"] = legacy.stat().st_size, work.stat().st_size
        self.out["checks"] = checks
        if checks["wrong_links"]:
            self.problems.append(
                f"{checks['wrong_links']} links are wrong ({checks['writer_links_null']} NULL links of the old writer)"
            )
        if checks["orphans"]:
            self.problems.append(f"{checks['orphans']} orphan links are left")
        if checks["integrity_check"] != ["ok"]:
            self.problems.append(f"integrity_check: {checks['integrity_check'][:5]}")
        if checks["writer_traces"] != writer["commits"]:
            self.problems.append(
                f"the writer committed {writer['commits']} traces, the file holds {checks['writer_traces']}"
            )
        self.lines_for(data, writer, checks)

    def io_lines(self, data: GenerateReport, writer: dict[str, Any]) -> list[Line]:
        io, by_writer = self.out["upgrade_io"], writer["write_bytes"]
        ratio = io["write_bytes"] / data.file_bytes
        return [
            Line(
                "upgrade under the writer: bytes written by the upgrade, through the final checkpoint / legacy file",
                f"{ratio:.2f}x ({_gb(io['write_bytes'])} write_bytes, {_gb(io['wchar'])} wchar, {_gb(io['rchar'])}"
                f" rchar; {_s(io['seconds_through_checkpoint'])} with the checkpoint)",
                f"<= {BYTES_TARGET:g}x",
                ratio <= BYTES_TARGET,
            ),
            Line(
                "  the writer process during the upgrade: write_bytes, of them above its typical commit",
                f"{_gb(by_writer['during_upgrade'])}, {_gb(by_writer['above_typical'])}"
                f" (typical commit {by_writer['typical_commit']:,} B)",
            ),
        ]

    def lines_for(self, data: GenerateReport, writer: dict[str, Any], checks: dict[str, Any]) -> None:
        up, backfill, index = self.out["upgrade"], self.out["backfill"] or {}, self.out["index"] or {}
        steps = up["steps"]
        rate = backfill["rows_scanned"] / backfill["seconds"] if backfill.get("seconds") else 0.0
        during, stall, phases = writer["during_upgrade"], writer["longest_stall"], writer["phases"]
        stall_ms = stall["ms"] if stall else 0.0
        size_ratio = checks["migrated_bytes"] / checks["legacy_bytes"]
        retried = up["retried"]
        retries = sum(len(failed) for failed in retried.values())
        self.lines += [
            Line(f"upgrade legacy -> head, total ({data.traces:,} traces, {data.links:,} links)", _s(up["seconds"])),
            Line(f"  {STEPS['0001']}", _s(steps["0001"])),
            Line(
                f"  {STEPS['0002']}",
                f"{_s(steps['0002'])} (3 transactions: column + triggers {_s(index.get('add_column_seconds'))},"
                f" drop idx_trace_sessions_trace {_s(index.get('drop_trace_index_seconds'))},"
                f" index {_s(index.get('index_seconds'))})",
            ),
            Line(f"  {STEPS['0003']} (batch {_batch(self.batch_size)})", _s(steps["0003"])),
            Line(
                f"  {STEPS['0004']}",
                f"{_s(steps['0004'])} (drop {_s(index.get('drop_seconds'))},"
                f" ANALYZE {_s(index.get('analyze_seconds'))})",
            ),
            Line(
                "upgrade steps failed with 'database is locked', rerun",
                f"{retries} ({', '.join(f'{rev}: {len(failed)}' for rev, failed in retried.items() if failed) or '-'})",
                "0",
                retries == 0,
            ),
            Line(
                "backfill rows/s",
                f"{rate:,.0f}/s ({backfill.get('rows_scanned', 0):,} rows, {backfill.get('rows_updated', 0):,}"
                f" filled, {backfill.get('orphans_removed', 0):,} orphans removed)",
            ),
            *self.io_lines(data, writer),
            Line(
                "writer inserts during the upgrade: count, p50 / p99 / max",
                f"{during['count']:,}, {_ms(during['p50_ms'])} / {_ms(during['p99_ms'])} / {_ms(during['max_ms'])}",
            ),
            Line(
                "longest writer stall (max insert latency)",
                f"{stall_ms:,.0f} ms ({_span(stall)})",
                f"<= {STALL_TARGET_S:g} s",
                stall_ms <= STALL_TARGET_S * 1e3,
            ),
            *(
                Line(
                    f"  inserts started {'in ' + LABELS[name] if name in LABELS else name + ' the upgrade'}: max",
                    f"{_ms(stats['max_ms'])} (lock wait {_ms(stats['lock_wait_max_ms'])},"
                    f" COMMIT {_ms(stats['commit_max_ms'])}; {stats['count']:,} inserts, p50 {_ms(stats['p50_ms'])})",
                )
                for name, stats in phases.items()
            ),
            Line(
                "file size migrated / legacy (with the writer's traces)",
                f"{size_ratio:.3f}x ({_mb(checks['migrated_bytes'])} vs {_mb(checks['legacy_bytes'])})",
                f"<= {SIZE_TARGET:g}x",
                size_ratio <= SIZE_TARGET,
            ),
            Line(
                "  of the migrated file: free pages (reused by later inserts)",
                f"{_mb(checks['free_bytes'])} ({100 * checks['free_bytes'] / checks['migrated_bytes']:.1f}%)",
            ),
            Line(
                "  traces the writer added to the migrated file",
                f"{checks['writer_traces']:,} ({100 * checks['writer_traces'] / max(1, data.traces):.2f}% of legacy)",
            ),
            Line(
                "links whose created_at IS NOT their trace's",
                f"{checks['wrong_links']:,} (of them NULL, written by the old writer:"
                f" {checks['writer_links_null']:,} of its {checks['writer_links']:,})",
                "0",
                checks["wrong_links"] == 0,
            ),
            Line("orphan links after the upgrade", f"{checks['orphans']:,}", "0", checks["orphans"] == 0),
            Line(
                "PRAGMA integrity_check",
                ", ".join(checks["integrity_check"][:3]),
                "ok",
                checks["integrity_check"] == ["ok"],
            ),
            Line(
                "writer inserts failed",
                f"{len(writer['failures']):,} of {writer['commits'] + len(writer['failures']):,}",
                "0",
                not writer["failures"],
            ),
        ]


LEGACY_LINKS = (
    "SELECT ts.trace_id, ts.session_uid{created_at} FROM trace_sessions ts"
    " WHERE NOT EXISTS (SELECT 1 FROM traces t WHERE t.id = ts.trace_id AND t.namespace = ?)"
    " ORDER BY ts.trace_id, ts.session_uid"
)


def link_checksum(path: Path, *, with_created_at: bool = True) -> dict[str, Any]:
    """Count and SHA-256 of the legacy traces' links, (trace_id, session_uid[, created_at]) in key order."""
    digest = hashlib.sha256()
    count = 0
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    sql = LEGACY_LINKS.format(created_at=", ts.created_at" if with_created_at else "")
    try:
        for row in connection.execute(sql, (WRITER_NAMESPACE,)):
            digest.update(repr(row).encode())
            count += 1
    finally:
        connection.close()
    return {"links": count, "sha256": digest.hexdigest()}


def saved_position(path: Path) -> int | None:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
        try:
            row = connection.execute(f"SELECT last_rowid FROM {PROGRESS_TABLE}").fetchone()
        finally:
            connection.close()
    except sqlite3.OperationalError:  # no progress table yet, or a lock for a moment
        return None
    return row[0] if row else None


INDEX_LEAVES = (
    "SELECT count(*), sum(pgsize), sum(unused) FROM dbstat"
    " WHERE name = 'idx_trace_sessions_uid_time' AND pagetype = 'leaf'"
)


def index_leaves(path: Path) -> dict[str, Any]:
    """The session index's leaf pages and how full they are (dbstat)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        pages, size, unused = connection.execute(INDEX_LEAVES).fetchone()
    finally:
        connection.close()
    return {"leaf_pages": pages, "leaf_fill": 1 - unused / size if size else None}


class PlainUpgrade:
    """`tracestore upgrade` of a copy in a process of its own, no writer: its seconds and the bytes it wrote
    (getrusage of the child, through its last checkpoint), then the cold 10-minute window on the migrated
    file, raw sqlite3 and the store, and the session index's fill; with --one-sort, the same after the index
    is rebuilt in one sort (REINDEX), the reference a batched fill is held to."""

    def __init__(self, bench: Bench, legacy: Path) -> None:
        self.bench, self.legacy = bench, legacy
        self.work = bench.workdir / "migration-plain.db"

    def run(self, data: GenerateReport) -> None:
        bench = self.bench
        copy_db(self.legacy, self.work)
        url = f"sqlite:///{self.work}"
        tracestore = Path(sys.executable).parent / "tracestore"
        command = [str(tracestore), "--url", url, "upgrade", *_batch_option(bench.batch_size)]
        bench.log("plain upgrade: `tracestore upgrade` of a copy, no writer")
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        assert process.stderr is not None
        errors = process.stderr.read()
        process.stderr.close()
        result: dict[str, Any] = {
            "seconds": seconds,
            "exit": process.returncode,
            # ru_oublock counts 512-byte blocks: the child's write_bytes less what was cancelled by truncation.
            "write_bytes": usage.ru_oublock * 512,
            "read_bytes": usage.ru_inblock * 512,
            "revision": current_revision(url),
        }
        if process.returncode != 0 or result["revision"] != head_revision():
            bench.problems.append(f"plain upgrade failed: {result}, {errors[-2000:]}")
            bench.out["plain_upgrade"] = result
            return
        result["index"] = index_leaves(self.work)
        bench.log("plain upgrade: cold 10-minute window on the migrated file")
        result["cold"] = self.cold()
        if bench.args.one_sort:
            bench.log("plain upgrade: REINDEX the session index (one sort), cold window again")
            connection = sqlite3.connect(self.work, isolation_level=None)
            try:
                connection.execute("REINDEX idx_trace_sessions_uid_time")
            finally:
                connection.close()
            result["one_sort"] = {"index": index_leaves(self.work), "cold": self.cold()}
        bench.out["plain_upgrade"] = result
        bench.lines += self.lines(data, result)

    def cold(self) -> dict[str, float]:
        measured = cold_cache.measure(self.work, since=self.bench.out["data"]["now"] - WINDOW_S, runs=COLD_RUNS)
        return {name: timing.median_ms for name, timing in measured["timings"].items()}

    def lines(self, data: GenerateReport, result: dict[str, Any]) -> list[Line]:
        at_10m = data.traces >= 10_000_000
        ratio = result["write_bytes"] / data.file_bytes
        cold, index = result["cold"], result["index"]
        window_ms = max(cold["raw window"], cold["store window"])
        lines = [
            Line(
                "`tracestore upgrade` alone (no writer): seconds",
                _s(result["seconds"]),
                f"<= {UPGRADE_TARGET_S_10M:g} s at 10M" if at_10m else "",
                result["seconds"] <= UPGRADE_TARGET_S_10M if at_10m else None,
            ),
            Line(
                "  bytes written (getrusage, through its last checkpoint) / legacy file",
                f"{ratio:.2f}x ({_gb(result['write_bytes'])} of {_gb(data.file_bytes)};"
                f" read {_gb(result['read_bytes'])})",
                f"<= {BYTES_TARGET:g}x",
                ratio <= BYTES_TARGET,
            ),
            Line(
                "  cold 10-minute window on the migrated file: raw sqlite3 / store (median)",
                f"{_ms(cold['raw window'])} / {_ms(cold['store window'])}"
                f" (latest-100: {_ms(cold['raw latest'])} / {_ms(cold['store latest'])})",
                f"<= {COLD_WINDOW_TARGET_MS_10M:g} ms at 10M" if at_10m else "",
                window_ms <= COLD_WINDOW_TARGET_MS_10M if at_10m else None,
            ),
            Line(
                "  session index leaves: pages, fill (dbstat)",
                f"{index['leaf_pages']:,}, {100 * index['leaf_fill']:.1f}%",
            ),
        ]
        if "one_sort" in result:
            sort = result["one_sort"]
            lines.append(
                Line(
                    "  after REINDEX (one sort): cold window raw / store, leaves, fill",
                    f"{_ms(sort['cold']['raw window'])} / {_ms(sort['cold']['store window'])},"
                    f" {sort['index']['leaf_pages']:,}, {100 * sort['index']['leaf_fill']:.1f}%",
                )
            )
        return lines

    def cleanup(self) -> None:
        remove_db(self.work)


class KillAndRerun:
    """5. SIGKILL a real `tracestore upgrade` at a random point of its backfill, rerun, compare."""

    def __init__(self, bench: Bench, legacy: Path, migrated: Path) -> None:
        self.bench, self.legacy, self.migrated = bench, legacy, migrated
        self.work = bench.workdir / "migration-killed.db"

    def run(self, data: GenerateReport) -> None:
        bench = self.bench
        fraction = random.Random(bench.args.seed).uniform(0.1, 0.9)
        target = round(fraction * data.links)  # rowids of the generated links run 1..links
        copy_db(self.legacy, self.work)
        url = f"sqlite:///{self.work}"
        tracestore = Path(sys.executable).parent / "tracestore"
        command = [str(tracestore), "--url", url, "upgrade", *_batch_option(bench.batch_size)]
        bench.log(f"crash test: upgrading a copy, SIGKILL once the backfill passes rowid {target:,} ({fraction:.0%})")
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        position = None
        while process.poll() is None:
            position = saved_position(self.work)
            if position is not None and position >= target:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        killed_after = time.perf_counter() - started
        process.wait()
        result: dict[str, Any] = {
            "kill_at_fraction": fraction,
            "killed": process.returncode == -signal.SIGKILL,
            "killed_after_s": killed_after,
            "position_at_kill": position,
            "revision_after_kill": current_revision(url),
        }
        if not result["killed"]:
            bench.problems.append(f"crash test: the upgrade ended (exit {process.returncode}) before the kill")
        bench.log(f"crash test: killed after {killed_after:.1f} s at rowid {position}; rerunning upgrade head")
        rerun_started = time.perf_counter()
        reports = upgrade(url, batch_size=bench.batch_size)
        result["rerun_s"] = time.perf_counter() - rerun_started
        backfill = reports.get("backfill")
        result["rerun_rows_scanned"] = backfill.rows_scanned if backfill is not None else None
        result["revision_after_rerun"] = current_revision(url)
        bench.log("crash test: checksums of the killed-and-rerun and the uninterrupted files")
        result["killed_file"] = link_checksum(self.work)
        result["uninterrupted_file"] = link_checksum(self.migrated)
        result["same"] = result["killed_file"] == result["uninterrupted_file"]
        connection = sqlite3.connect(self.work)
        try:
            result["integrity_check"] = [row[0] for row in connection.execute("PRAGMA integrity_check")]
        finally:
            connection.close()
        bench.out["kill_and_rerun"] = result
        if not result["same"]:
            bench.problems.append(f"crash test: the killed-and-rerun file differs: {result}")
        if result["revision_after_rerun"] != head_revision() or result["integrity_check"] != ["ok"]:
            bench.problems.append(f"crash test: the rerun file is not right: {result}")
        scanned = result["rerun_rows_scanned"]
        left = None if position is None else data.links - position + (bench.batch_size or 0)
        resumed = scanned is not None and left is not None and scanned <= left
        bench.lines += [
            Line(
                "kill -9 during the backfill, then rerun: links and checksum equal the uninterrupted run's",
                f"{'equal' if result['same'] else 'DIFFERENT'} ({result['killed_file']['links']:,} links,"
                f" sha256 {result['killed_file']['sha256'][:12]}; killed at {fraction:.0%}, rowid {position:,})"
                if position is not None
                else "not killed",
                "equal",
                result["same"],
            ),
            Line(
                "  rerun: time, rows the resumed backfill scanned",
                f"{_s(result['rerun_s'])}, {scanned if scanned is not None else '-':,} of {data.links:,}",
                "only the unfinished ones",
                resumed,
            ),
        ]

    def cleanup(self) -> None:
        remove_db(self.work)


def downgrade_to_legacy(bench: Bench, legacy: Path, migrated: Path) -> None:
    """6. Downgrade the migrated file to 0001 step by step (timed), and compare its links with the legacy file's."""
    url = f"sqlite:///{migrated}"
    steps: dict[str, float] = {}
    for revision in ("0003", "0002", "0001"):
        bench.log(f"downgrade to {revision}")
        started = time.perf_counter()
        downgrade(url, revision)
        steps[revision] = time.perf_counter() - started
    bench.log("downgrade: checksums of the downgraded and the legacy files")
    downgraded, original = link_checksum(migrated, with_created_at=False), link_checksum(legacy, with_created_at=False)
    connection = sqlite3.connect(migrated)
    try:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(trace_sessions)")]
        integrity = [row[0] for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()
    same = downgraded == original and columns == ["trace_id", "session_uid"] and integrity == ["ok"]
    bench.out["downgrade"] = {"steps": steps, "links": downgraded, "legacy_links": original, "same": same}
    if not same:
        bench.problems.append(f"downgrade: the file differs from the legacy one: {bench.out['downgrade']}")
    bench.lines += [
        Line(
            "downgrade head -> 0001 (writers stopped): total, per step",
            f"{_s(sum(steps.values()))} (to 0003 {_s(steps['0003'])}: CREATE INDEX idx_trace_sessions_uid;"
            f" to 0002 {_s(steps['0002'])}; to 0001 {_s(steps['0001'])}: CREATE INDEX idx_trace_sessions_trace,"
            " DROP COLUMN)",
        ),
        Line(
            "  downgraded links equal the legacy file's (count, sha256), legacy columns, integrity_check",
            f"{'equal' if same else 'DIFFERENT'} ({downgraded['links']:,} links, sha256 {downgraded['sha256'][:12]})",
            "equal",
            same,
        ),
    ]


def _span(stall: dict[str, Any] | None) -> str:
    if stall is None:
        return "no inserts"
    started, ended = (LABELS.get(stall[key], f"{stall[key]} the upgrade") for key in ("started_in", "ended_in"))
    return f"in {started}" if started == ended else f"from {started} to {ended}"


def _batch(size: int | None) -> str:
    return f"{size:,}" if size else "the engine's default"


def _batch_option(size: int | None) -> list[str]:
    return ["--batch-size", str(size)] if size else []


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _ms(ms: float | None) -> str:
    if ms is None:
        return "-"
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:,.0f} ms"


def _gb(size: int) -> str:
    return f"{size / 1e9:,.2f} GB"


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def render(bench: Bench, data: GenerateReport) -> str:
    generated = f"{'reused, ' if bench.out['reused_data'] else ''}generated in {data.seconds:.1f} s"
    rate = bench.args.writer_rate
    header = (
        f"tracestore migration bench @ {bench.out['config']['revision']} (SQLite {sqlite3.sqlite_version}): "
        f"{data.traces:,} legacy traces, {data.links:,} links ({generated})\n"
        f"upgrade step by step with batch size {_batch(bench.batch_size)}, while a legacy writer process inserts "
        f"{'as fast as it can' if rate <= 0 else f'{rate:g} traces/s'}, one trace per transaction"
    )
    columns = ("measure", "measured", "target", "verdict")
    rows = [columns] + [(line.label, line.measured, line.target, line.verdict()) for line in bench.lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    table = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    table.insert(1, "-" * len(table[0]))
    return "\n".join([header, "", *table, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=parse_scale, default="1m", help="traces to generate: 10k, 100k, 1m, 2m...")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="backfill rows per transaction (default: the upgrade's own, see tracestore.migrate.backfill)",
    )
    parser.add_argument("--writer-rate", type=float, default=500.0, help="writer inserts/s, 0 = unpaced (default 500)")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of writing before and after the upgrade")
    parser.add_argument(
        "--retries", type=int, default=100, help="reruns of a step that fails with 'database is locked' (default 100)"
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (gitignored)")
    parser.add_argument("--keep", action="store_true", help="keep the files, and reuse a matching legacy file")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill -9 / rerun crash test")
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the writer-less `tracestore upgrade` (bytes, cold window)"
    )
    parser.add_argument(
        "--one-sort", action="store_true", help="also time the cold window after REINDEX of the session index"
    )
    parser.add_argument("--downgrade", action="store_true", help="finally downgrade the migrated file to 0001, timed")
    parser.add_argument(
        "--ids",
        choices=("time-ordered", "uuid4"),
        default="time-ordered",
        help="trace ids of the legacy file: the generator's time-ordered ones, or uuid4 (random order)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    # The revision reads $TRACESTORE_BATCH_SIZE before the batch size passed from code.
    configured = os.environ.get("TRACESTORE_BATCH_SIZE")
    if configured and args.batch_size is not None and int(configured) != args.batch_size:
        parser.error(f"TRACESTORE_BATCH_SIZE={configured} would override --batch-size; unset it")
    batch_size = args.batch_size or (int(configured) if configured else None)  # None: the engine's default
    args.workdir.mkdir(parents=True, exist_ok=True)

    bench = Bench(args, batch_size)
    data = bench.legacy_file()
    if args.ids == "uuid4":
        data = bench.uuid4_file(data)
    legacy = Path(data.path)
    bench.out["data"] = asdict(data)
    work = copy_db(legacy, args.workdir / "migration-work.db")
    crash = KillAndRerun(bench, legacy, work)
    plain = PlainUpgrade(bench, legacy)
    try:
        writer = bench.upgrade_under_writer(work)
        bench.check(legacy, work, data, writer)
        if not args.no_plain:
            try:
                plain.run(data)
            finally:
                plain.cleanup()
        if not args.no_kill:
            crash.run(data)
        if args.downgrade:
            downgrade_to_legacy(bench, legacy, work)
    finally:
        crash.cleanup()
        if not args.keep:
            remove_db(work)
            remove_db(legacy)
            legacy.with_suffix(".json").unlink(missing_ok=True)

    return finish(bench, render(bench, data), args.json, wrong="THE MIGRATED FILE IS WRONG")


if __name__ == "__main__":
    sys.exit(main())
