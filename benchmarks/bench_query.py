"""Benchmark of the hot query ("what did session S do recently?") on a legacy file and its migrated copy.

One run, one data set (benchmarks/README.md says what each section measures and how it de-noises):
  1. generate a legacy-schema file with tracestore.testing.bulk (hot session: 10 % of all traces);
  2. copy it and upgrade the copy to head (timed), then `finalize` it (the deployed state);
  3. measure, variants interleaved round by round, medians on a warm cache unless said otherwise:
     a. the sync store vs a raw sqlite3 floor running the store's own compiled SQL;
     b. the async store vs the same floor;
     c. the spec's legacy query on the legacy file vs the store on the migrated file;
     d. keyset page 1000 vs page 1, and several sessions at once;
     e. latency against the window's length and against the limit (store, floor, legacy);
     f. the first query after the file was evicted from the OS page cache;
     g. file sizes;
     h. write throughput of store_batch vs the legacy implementation's INSERTs, same batches;
     i. readers (threads, asyncio tasks) while a writer process ingests;
     j. a-c on PostgreSQL, when a server is at hand (postgres.py: TRACESTORE_PG_URL, scripts/with-postgres);
  4. print the ratios next to the read targets (and write them as JSON with --json).

    python benchmarks/bench_query.py --scale 1m [--runs 61] [--keep] [--json out.json] [--sections queries]

`--sections queries` runs only 1-3a and 3c (the latency-against-size points benchmarks/suite.py collects);
`--sections postgresql` only 1 and 3j (with --keep, to repeat the PostgreSQL part on the same file).
Exit status: 0 when every variant returned the same rows (missed targets are reported, not fatal),
2 when a variant returned different data: such a timing would be worthless.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cold_cache
import concurrency
import curves
import postgres
from common import (
    DEFAULT_WORKDIR,
    HOT_UID,
    LATEST,
    WINDOW_S,
    Line,
    Timing,
    checkpoint,
    connect,
    copy_db,
    data_options,
    finish,
    git_revision,
    interleaved,
    interleaved_async,
    mb,
    ms,
    object_sizes,
    parse_scale,
    ratio_line,
    remove_db,
    rounds,
    text_table,
)
from floor import LEGACY_LATEST_SQL, LEGACY_WINDOW_SQL, as_rows, fetch_only, legacy_query, plan, raw_query, store_sql
from writers import fresh_traces, plain_writer, raw_store_writer

from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.migrate import finalize, upgrade
from tracestore.testing.bulk import GenerateReport, generate_legacy

DROPPED_INDEXES = ("idx_trace_sessions_uid", "idx_trace_sessions_trace")
COPY_WRITES_UP_TO = 2_000_000  # traces; above it the write section runs without copies
HOT_FOR_TARGETS = 1_000_000  # the legacy / store targets are set for a hot session of ~1M traces
# Above it --postgresql auto skips PostgreSQL: two more copies of the data (legacy and migrated databases,
# ~2.2 GB per 1M traces) on top of the SQLite files, and ~1 minute per 1M traces of COPY and upgrade.
POSTGRESQL_UP_TO = 2_000_000


# -- the run ---------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir: Path = args.workdir
        self.started = time.perf_counter()
        self.lines: list[Line] = []
        self.pg_lines: list[Line] = []
        self.problems: list[str] = []
        config = {
            "scale": args.scale,
            "runs": args.runs,
            "seed": args.seed,
            "sections": args.sections,
            "revision": git_revision(),
        }
        self.out: dict[str, Any] = {"config": config, "reused_data": False}

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def same(self, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.problems.append(f"{what}: results differ ({len(got)} vs {len(want)} rows)")

    # 1. data
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
        shown = [0]

        def progress(done: int, total: int) -> None:
            if done * 4 // total > shown[0]:
                shown[0] = done * 4 // total
                self.log(f"  {done:,} / {total:,} traces")

        report = generate_legacy(path, progress=progress, **options)
        sidecar.write_text(json.dumps({"options": options, "report": asdict(report)}))
        return report

    # 2. migration
    def migrated_copy(self, legacy: Path) -> Path:
        migrated = copy_db(legacy, self.workdir / "migrated.db")
        self.log("upgrading a copy to head")
        started = time.perf_counter()
        reports = upgrade(f"sqlite:///{migrated}")
        seconds = time.perf_counter() - started
        # The deployed state: the rolling deploy is over, its triggers are gone (tracestore finalize).
        finalize(f"sqlite:///{migrated}")
        checkpoint(migrated)
        # Write back the copy's and the upgrade's dirty pages now: at 10M the kernel was still flushing
        # gigabytes during the first timings, which made the floor itself 1.5x slower than later on.
        os.sync()
        backfill = reports.get("backfill")
        index = reports.get("index") or {}
        detail = {
            "backfill_seconds": getattr(backfill, "seconds", None),
            "index_seconds": index.get("index_seconds"),
            "analyze_seconds": index.get("analyze_seconds"),
        }
        self.out["upgrade"] = {"seconds": seconds, **detail}
        return migrated

    # 3a + 3c. sync store vs raw floor vs legacy (and the plans)
    def sync_queries(self, legacy: Path, migrated: Path, data: GenerateReport) -> None:
        since = data.now - WINDOW_S
        runs, legacy_runs = self.args.runs, self.args.legacy_runs or max(3, self.args.runs // 3)
        self.out["legacy_runs"] = legacy_runs
        raw, old = connect(migrated), connect(legacy, read_only=True)
        # (name, store arguments, the legacy query and its parameters)
        queries = (
            ("window", {"since": since}, LEGACY_WINDOW_SQL, (HOT_UID, since)),
            ("latest", {"limit": LATEST}, LEGACY_LATEST_SQL, (HOT_UID, LATEST)),
        )
        timings: dict[str, dict[str, Timing]] = {}
        plans: dict[str, list[str]] = {}
        with TraceStore(f"sqlite:///{migrated}", auto_upgrade=False) as store:
            for name, store_args, legacy_sql, legacy_params in queries:
                sql, params = store_sql(session_uid=HOT_UID, **store_args)
                new: dict[str, Callable[[], Any]] = {
                    "store": functools.partial(store.get_by_session_uid, HOT_UID, **store_args),
                    "raw": raw_query(raw, sql, params),
                    "raw-sql": fetch_only(raw, sql, params),
                }
                before: dict[str, Callable[[], Any]] = {
                    "legacy": legacy_query(old, legacy_sql, legacy_params),
                    "legacy-sql": fetch_only(old, legacy_sql, legacy_params),
                    "store": new["store"],
                    "raw-sql": new["raw-sql"],
                }
                rows = as_rows(new["store"]())
                self.same(f"store vs raw, {name}", rows, new["raw"]())
                self.same(f"store vs legacy, {name}", [r[0] for r in rows], [r[0] for r in before["legacy"]()])
                self.out.setdefault("rows", {})[name] = len(rows)

                self.log(f"{name}: sync store vs raw floor, {runs} interleaved rounds")
                timings[f"sync {name}"] = interleaved(new, runs=runs, warmup=5)
                self.log(f"{name}: legacy query on the legacy file vs the store, {legacy_runs} interleaved rounds")
                timings[f"legacy {name}"] = interleaved(before, runs=legacy_runs, warmup=2)
                plans[f"store {name}"] = store.explain(HOT_UID, **store_args)
                plans[f"legacy {name}"] = plan(old, legacy_sql, legacy_params)
        raw.close()
        old.close()
        if self.out["rows"]["window"] != data.burst_traces:
            self.problems.append(f"window returned {self.out['rows']['window']} rows, expected {data.burst_traces}")
        self.out["timings"] = timings
        self.out["plans"] = plans

        window, latest = timings["sync window"], timings["sync latest"]
        old_window, old_latest = timings["legacy window"], timings["legacy latest"]
        speedup = ratio_line(f"legacy / new, 10-min window (hot session {data.hot_traces:,})", old_window["legacy"],
                         old_window["store"], 100.0, at_least=True)  # fmt: skip
        self.lines += [
            ratio_line(f"sync store / raw, 10-min window ({self.out['rows']['window']} rows)", window["store"],
                   window["raw"], 1.2),
            ratio_line("  raw: SQL only (fetchall) / with decode", window["raw-sql"], window["raw"]),
            ratio_line(f"sync store / raw, latest {LATEST}", latest["store"], latest["raw"], 1.5),
            ratio_line("  raw: SQL only (fetchall) / with decode", latest["raw-sql"], latest["raw"]),
            speedup,
            ratio_line("  legacy / new, SQL only (fetchall)", old_window["legacy-sql"], old_window["raw-sql"]),
            ratio_line(f"legacy / new, latest {LATEST}", old_latest["legacy"], old_latest["store"], 500.0,
                       at_least=True),
            ratio_line("  legacy / new, SQL only (fetchall)", old_latest["legacy-sql"], old_latest["raw-sql"]),
        ]  # fmt: skip
        if data.hot_traces < HOT_FOR_TARGETS:  # the legacy targets are set for a hot session of ~1M traces
            for line in (speedup, self.lines[-2]):
                line.target, line.ok = f"{line.target} (n/a: hot < 1M)", None

    # 3b. async store vs raw floor
    def async_queries(self, migrated: Path, data: GenerateReport) -> None:
        since = data.now - WINDOW_S
        runs = self.args.runs
        raw = connect(migrated)
        raw_window = raw_query(raw, *store_sql(session_uid=HOT_UID, since=since))
        raw_latest = raw_query(raw, *store_sql(session_uid=HOT_UID, limit=LATEST))

        async def measure() -> tuple[dict[str, Timing], dict[str, Timing]]:
            async with AsyncTraceStore(f"sqlite+aiosqlite:///{migrated}", auto_upgrade=False) as store:
                window = functools.partial(store.get_by_session_uid, HOT_UID, since=since)
                latest = functools.partial(store.get_by_session_uid, HOT_UID, limit=LATEST)
                self.same("async vs raw, window", as_rows(await window()), raw_window())
                self.same("async vs raw, latest", as_rows(await latest()), raw_latest())
                return (
                    await interleaved_async({"async": window, "raw": raw_window}, runs=runs, warmup=5),
                    await interleaved_async({"async": latest, "raw": raw_latest}, runs=runs, warmup=5),
                )

        self.log(f"async store vs raw floor, {runs} interleaved rounds per query")
        window, latest = asyncio.run(measure())
        raw.close()
        self.out["timings"].update({"async window": window, "async latest": latest})
        self.lines += [
            ratio_line("async store / raw, 10-min window", window["async"], window["raw"], 1.3),
            ratio_line(f"async store / raw, latest {LATEST}", latest["async"], latest["raw"], 2.0),
        ]

    # 3d. keyset pages deep in the hot session, and several sessions at once
    def pages(self, migrated: Path, data: GenerateReport) -> None:
        runs, size = self.args.runs, LATEST
        with TraceStore(f"sqlite:///{migrated}", auto_upgrade=False) as store:
            deep = min(1000, max(2, data.hot_traces // size))  # page 1000, or the last full page of a small file
            cursor = None
            for _ in range(deep - 1):
                _, cursor = store.page_by_session_uid(HOT_UID, limit=size, cursor=cursor)
            first = functools.partial(store.page_by_session_uid, HOT_UID, limit=size)
            later = functools.partial(store.page_by_session_uid, HOT_UID, limit=size, cursor=cursor)
            expected = store.get_by_session_uid(HOT_UID, limit=deep * size)[(deep - 1) * size :]
            self.same(f"page {deep} vs the same rows by limit", later().items, expected)
            with store.engine.connect() as connection:
                others = list(
                    connection.exec_driver_sql(
                        "SELECT DISTINCT session_uid FROM trace_sessions WHERE session_uid != ? LIMIT 9", (HOT_UID,)
                    ).scalars()
                )
            several = functools.partial(store.get_by_session_uids, [HOT_UID, *others], limit=size)
            self.log(f"keyset page 1 vs page {deep}, and {len(others) + 1} sessions at once, {runs} rounds")
            timings = interleaved(
                {"first": first, "later": later, "several": several, "one": first}, runs=runs, warmup=5
            )
        self.out["timings"]["pages"] = timings
        self.lines += [
            ratio_line(
                f"keyset page {deep} / page 1 (hot session, {size} per page)", timings["later"], timings["first"], 1.2
            ),
            ratio_line(
                f"{len(others) + 1} sessions at once / the hot one alone, latest {size}",
                timings["several"],
                timings["one"],
            ),
        ]

    # 3g. sizes
    def sizes(self, legacy: Path, migrated: Path) -> None:
        self.log("file sizes (dbstat, VACUUM INTO)")
        legacy_bytes, migrated_bytes = legacy.stat().st_size, migrated.stat().st_size
        vacuumed = self.workdir / "vacuumed.db"
        remove_db(vacuumed)
        with sqlite3.connect(migrated) as connection:
            free_pages = connection.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            connection.execute("VACUUM INTO ?", (str(vacuumed),))
        vacuumed_bytes = vacuumed.stat().st_size
        remove_db(vacuumed)
        legacy_objects, migrated_objects = object_sizes(legacy), object_sizes(migrated)
        dropped = sum(legacy_objects.get(name, 0) for name in DROPPED_INDEXES)
        self.out["sizes"] = {
            "legacy_bytes": legacy_bytes,
            "migrated_bytes": migrated_bytes,
            "migrated_free_bytes": free_pages * page_size,
            "vacuumed_bytes": vacuumed_bytes,
            "dropped_indexes_bytes": dropped,
            "legacy_objects": legacy_objects,
            "migrated_objects": migrated_objects,
        }
        ratio = migrated_bytes / legacy_bytes
        self.lines += [
            Line("file size migrated / legacy", mb(migrated_bytes), mb(legacy_bytes), ratio, "<= 1.05x", ratio <= 1.05),
            Line(
                "  migrated after VACUUM / legacy",
                mb(vacuumed_bytes),
                mb(legacy_bytes),
                vacuumed_bytes / legacy_bytes,
            ),
            Line("  free pages in the migrated file", mb(free_pages * page_size), "(reused by later writes)"),
            Line("  the 2 dropped junction indexes", mb(dropped), f"{100 * dropped / legacy_bytes:.1f}% of legacy"),
        ]

    # 3e. latency against window and limit
    def curves(self, legacy: Path, migrated: Path, data: GenerateReport) -> None:
        legacy_runs = max(3, min(7, self.args.runs // 9))
        self.log(f"latency against window length and limit ({legacy_runs} rounds of the legacy query per point)")
        self.out["curves"] = curves.measure(migrated, legacy, data, runs=self.args.runs, legacy_runs=legacy_runs)

    # 3f. cold cache
    def cold(self, migrated: Path, data: GenerateReport) -> None:
        runs = max(3, self.args.runs // 6)
        self.log(f"cold cache: the file evicted from the OS page cache before each query, {runs} rounds")
        result = cold_cache.measure(migrated, since=data.now - WINDOW_S, runs=runs)
        self.out["cold"] = result
        timings = result["timings"]
        resident = result["resident_after_eviction_bytes"]
        left = "unknown (no fincore)" if resident < 0 else f"{mb(resident)} of {mb(result['file_bytes'])} cached"
        window = timings["store window"]
        self.lines += [
            Line("cold cache: store, 10-min window", ms(window), f"after eviction: {left}", None,
                 "<= 100 ms", window.median_ms <= 100),
            ratio_line("  cold store / cold raw floor, 10-min window", window, timings["raw window"]),
            ratio_line(f"  cold store / cold raw floor, latest {LATEST}", timings["store latest"],
                       timings["raw latest"]),
        ]  # fmt: skip

    # 3i. readers and a writer at the same time
    def load(self, migrated: Path, data: GenerateReport) -> None:
        seconds, readers = self.args.load_seconds, (1, 4)
        self.log(f"readers with and without a writer process, {seconds:g} s per configuration")
        result = concurrency.measure(
            migrated, since=data.now - WINDOW_S, until=data.now + 0.5, seconds=seconds, readers=readers,
            seed=self.args.seed + 7,
        )  # fmt: skip
        if result["rows"] != data.burst_traces:
            self.problems.append(f"load readers got {result['rows']} rows, expected {data.burst_traces}")
        self.out["concurrency"] = result
        alone = result["writer_alone"]["rows_per_s"]
        for run in result["runs"]:
            name = f"{run['readers']} reader {run['kind'] if run['readers'] > 1 else run['kind'][:-1]}"
            solo, loaded, writer = run["alone"], run["with_writer"], run["writer"]["rows_per_s"]
            self.lines += [
                Line(f"{name} + 1 writer: reads/s with / without writer", f"{loaded['reads_per_s']:,.0f}/s",
                     f"{solo['reads_per_s']:,.0f}/s", loaded["reads_per_s"] / solo["reads_per_s"]),
                Line("  read p99 with the writer", ms(loaded["p99_ms"]), f"without: {ms(solo['p99_ms'])}"),
                Line("  writer rows/s with / without these readers", f"{writer:,.0f}/s", f"{alone:,.0f}/s",
                     writer / alone),
            ]  # fmt: skip

    # 3h. writes
    def writes(self, legacy: Path, migrated: Path, data: GenerateReport) -> None:
        """Every writer stores the same batches into its own file, so each keeps its own SQLite cache warm
        (writers sharing a file invalidate each other's cache on every commit). Above COPY_WRITES_UP_TO
        traces, copying is too costly in disk and time: only the store (into the migrated file) and the
        legacy INSERTs (into the legacy file) run, without the two diagnostic writers."""
        count, size = self.args.write_traces, self.args.batch_size
        traces = fresh_traces(count, start=data.now + 1, seed=self.args.seed + 1, hot_uid=HOT_UID)
        batches = [traces[i : i + size] for i in range(0, count, size)]
        warm = fresh_traces(size, start=data.now + 1e6, seed=self.args.seed + 2, hot_uid=HOT_UID)
        copies = data.traces <= COPY_WRITES_UP_TO
        sources = {"store": migrated, "raw": migrated, "new-plain": migrated, "legacy": legacy}
        if not copies:
            sources = {"store": migrated, "legacy": legacy}
        # Without copies the store writes into the migrated file (never kept) and legacy into the legacy
        # file, unless --keep asks for that one to stay as generated.
        keep_legacy = self.args.keep and not copies
        paths = {
            name: copy_db(source, self.workdir / f"write-{name}.db")
            if copies or (keep_legacy and name == "legacy")
            else source
            for name, source in sources.items()
        }
        # The copies' pages are still dirty in the kernel: without this, each file's first checkpoint
        # (an fsync) would pay for writing back its whole copy, inside some writer's timing.
        os.sync()
        self.log(f"writes: {count:,} traces in batches of {size}, {len(paths)} writers interleaved batch by batch")
        connections = {name: connect(path) for name, path in paths.items() if name != "store"}
        with TraceStore(f"sqlite:///{paths['store']}", auto_upgrade=False) as store:
            makers: dict[str, Callable[[], Callable[[list[TraceContext]], None]]] = {
                "store": lambda: store.store_batch,
                "raw": lambda: raw_store_writer(connections["raw"]),
                "new-plain": lambda: plain_writer(connections["new-plain"], junction_time=True),
                "legacy": lambda: plain_writer(connections["legacy"], junction_time=False),
            }
            writers = {name: makers[name]() for name in paths}
            for write in writers.values():
                write(warm)
            samples: dict[str, list[int]] = {name: [] for name in writers}
            gc.collect()
            for batch, order in zip(batches, rounds(list(writers), len(batches)), strict=True):
                for name in order:
                    started = time.perf_counter_ns()
                    writers[name](batch)
                    samples[name].append(time.perf_counter_ns() - started)
        for connection in connections.values():
            connection.close()
        with sqlite3.connect(paths["store"]) as check:
            window = (data.now + 0.5, data.now + 1e5)
            stored = check.execute("SELECT count(*) FROM traces WHERE created_at BETWEEN ? AND ?", window).fetchone()[0]
        if stored != count:
            self.problems.append(f"store_batch wrote {stored} of {count} traces")
        for path in paths.values():
            if path not in (migrated, legacy):
                remove_db(path)

        timings = {name: Timing.of(values) for name, values in samples.items()}
        # Traces over the writer's whole time, not its median batch: checkpoints are part of writing.
        rate = {name: count / (sum(values) / 1e9) for name, values in samples.items()}
        self.out["writes"] = {"traces": count, "batch_size": size, "rows_per_s": rate, "own_files": copies}
        self.out["timings"]["writes"] = timings

        def line(label: str, measured: str, base: str, target: float | None = None) -> Line:
            ratio = rate[measured] / rate[base]
            verdict = None if target is None else ratio >= target
            target_text = "" if target is None else f">= {target:g}x"
            return Line(label, f"{rate[measured]:,.0f}/s", f"{rate[base]:,.0f}/s", ratio, target_text, verdict)

        self.lines.append(line(f"write traces/s, store_batch / legacy INSERTs (batch {size})", "store", "legacy", 1.0))
        if copies:
            self.lines += [
                line("  plain INSERTs, migrated / legacy schema", "new-plain", "legacy"),
                line("  store's SQL (raw) / plain INSERTs, migrated", "raw", "new-plain"),
                line("  store / store's SQL run raw", "store", "raw"),
            ]

    # 3j. a-c on PostgreSQL
    def postgresql(self, legacy: Path, data: GenerateReport) -> None:
        server, reason = postgres.server_url()
        if server is not None and self.args.postgresql == "auto" and data.traces > POSTGRESQL_UP_TO:
            server, reason = None, f"over {POSTGRESQL_UP_TO:,} traces: two more data copies (--postgresql always)"
        if server is None:
            print(f"PostgreSQL part skipped: {reason}", file=sys.stderr, flush=True)
            self.out["postgresql"] = {"skipped": reason}
            return
        legacy_runs = self.args.legacy_runs or max(3, self.args.runs // 3)
        bench = postgres.PostgresBench(server, runs=self.args.runs, legacy_runs=legacy_runs, log=self.log)
        bench.run(legacy, data)
        self.pg_lines = bench.lines
        self.problems += bench.problems
        self.out["postgresql"] = {**bench.out, "lines": [asdict(line) for line in bench.lines]}


def render(bench: Bench, data: GenerateReport) -> str:
    generated = f"{'reused, ' if bench.out['reused_data'] else ''}generated in {data.seconds:.1f} s"
    header = (
        f"tracestore bench @ {bench.out['config']['revision']}: {data.traces:,} traces, {data.links:,} links; "
        f"hot session {data.hot_traces:,} traces, {data.burst_traces:,} in the last {WINDOW_S:g} s ({generated})"
    )
    parts = [header]
    if "upgrade" in bench.out:  # the SQLite sections ran
        upgrade_info = bench.out["upgrade"]
        steps = ", ".join(
            f"{name.removesuffix('_seconds')} {value:.1f} s"
            for name, value in upgrade_info.items()
            if name != "seconds" and value is not None
        )
        plans = [
            f"{name}:\n" + "\n".join(f"    {step}" for step in steps) for name, steps in bench.out["plans"].items()
        ]
        parts += [
            f"medians of {bench.args.runs} interleaved rounds (legacy query: {bench.out['legacy_runs']})",
            f"upgrade legacy -> head on a copy: {upgrade_info['seconds']:.1f} s ({steps})",
            "",
            text_table(bench.lines),
            "",
            "EXPLAIN QUERY PLAN",
            *plans,
        ]
    pg = bench.out.get("postgresql", {})
    if pg and "skipped" not in pg:
        server, upgrade_info = pg["server"], pg["upgrade"]
        plans = [f"{name}:\n" + "\n".join(f"    {step}" for step in steps) for name, steps in pg["plans"].items()]
        parts += [
            "",
            f"PostgreSQL {server['server_version']} (shared_buffers {server['shared_buffers']},"
            f" fsync {server['fsync']}, jit {server['jit']}): medians of {pg['runs']} interleaved rounds"
            f" (legacy query: {pg['legacy_runs']})",
            f"legacy database loaded by COPY in {pg['load']['copy_seconds']:.1f} s, indexes"
            f" {pg['load']['index_seconds']:.1f} s, VACUUM (ANALYZE) {pg['load']['vacuum_seconds']:.1f} s;"
            f" copied by TEMPLATE in {upgrade_info['template_copy_seconds']:.1f} s,"
            f" the copy upgraded in {upgrade_info['seconds']:.1f} s",
            "",
            text_table(bench.pg_lines),
            "",
            "EXPLAIN (ANALYZE, BUFFERS), PostgreSQL",
            *plans,
        ]
    return "\n".join([*parts, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=parse_scale, default="1m", help="traces to generate: 10k, 100k, 1m, 2m...")
    parser.add_argument("--runs", type=int, default=61, help="interleaved rounds per query (default 61)")
    parser.add_argument("--legacy-runs", type=int, default=0, help="rounds for the slow legacy query (default runs/3)")
    parser.add_argument(
        "--sections", choices=("all", "queries", "postgresql"), default="all", help="queries: 1-3a and 3c only"
    )
    parser.add_argument(
        "--postgresql",
        choices=("auto", "always", "never"),
        default="auto",
        help=f"the PostgreSQL part (3j); auto: when a server is at hand, up to {POSTGRESQL_UP_TO:,} traces",
    )
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (gitignored)")
    parser.add_argument("--keep", action="store_true", help="keep the files, and reuse a matching legacy file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-traces", type=int, default=20_000, help="traces written per writer (default 20000)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--load-seconds", type=float, default=5.0, help="seconds per reader/writer configuration")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.write_traces < args.batch_size or args.batch_size < 1 or args.load_seconds <= 0:
        parser.error("need --runs >= 1, --write-traces >= --batch-size >= 1 and --load-seconds > 0")
    args.workdir.mkdir(parents=True, exist_ok=True)

    bench = Bench(args)
    data = bench.legacy_file()
    legacy = Path(data.path)
    bench.out["data"] = asdict(data)
    postgresql = args.sections != "queries" and args.postgresql != "never"
    if args.sections == "postgresql":
        bench.postgresql(legacy, data)
    else:
        migrated = bench.migrated_copy(legacy)
        bench.sync_queries(legacy, migrated, data)
        if args.sections == "all":
            bench.async_queries(migrated, data)
            bench.pages(migrated, data)
            bench.curves(legacy, migrated, data)
            bench.cold(migrated, data)
            bench.sizes(legacy, migrated)
            if postgresql:
                bench.postgresql(legacy, data)  # before writes(): above 2M traces they write into the legacy file
            bench.writes(legacy, migrated, data)  # before load(): both files must hold the same rows
            bench.load(migrated, data)
        remove_db(migrated)
    if not args.keep:
        remove_db(legacy)
        legacy.with_suffix(".json").unlink(missing_ok=True)

    return finish(bench, render(bench, data), args.json, wrong="WRONG RESULTS, timings are void")


if __name__ == "__main__":
    sys.exit(main())
