"""Benchmark of the hot query ("what did session S do recently?") on a legacy file and its migrated copy.

One run, one data set:
  1. generate a legacy-schema file with tracestore.testing.bulk (hot session: 10 % of all traces);
  2. copy it and upgrade the copy to head (timed);
  3. time, with variants interleaved round by round, medians of --runs rounds on a warm cache:
     a. the sync store vs a raw sqlite3 floor running the store's own compiled SQL;
     b. the async store vs the same floor;
     c. the spec's legacy query on the legacy file vs the store on the migrated file;
     d. file sizes; e. write throughput, and the price of the two junction indexes the migration drops;
     f. the query plans;
  4. print the ratios next to the issue's targets (and write them as JSON with --json).

    python benchmarks/bench_query.py --scale 1m [--runs 61] [--keep] [--json out.json]

Exit status: 0 when every variant returned the same rows (missed targets are reported, not fatal),
2 when a variant returned different data: such a timing would be worthless.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import inspect
import json
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy.dialects import sqlite as sqlite_dialect

from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.engine import SQLITE_PRAGMAS
from tracestore.migrate import finalize, upgrade
from tracestore.queries import compiled, query_statement, statements_for
from tracestore.testing.bulk import GenerateReport, generate_legacy

SQLITE = sqlite_dialect.dialect()
NOW = 1_750_000_000.0  # fixed, so a kept file and a fresh one hold the same rows
WINDOW_S = 600.0
LATEST = 100
HOT_UID = "hot"
DEFAULT_WORKDIR = Path(__file__).resolve().parent / "scratch"

# The pre-migration implementation's query (the spec's "current query"), and its latest-N variant.
LEGACY_WINDOW_SQL = (
    "SELECT t.* FROM traces t INNER JOIN trace_sessions ts ON t.id = ts.trace_id"
    " WHERE ts.session_uid = ? AND t.created_at >= ? ORDER BY t.created_at DESC"
)
LEGACY_LATEST_SQL = (
    "SELECT t.* FROM traces t INNER JOIN trace_sessions ts ON t.id = ts.trace_id"
    " WHERE ts.session_uid = ? ORDER BY t.created_at DESC LIMIT ?"
)
DROPPED_INDEXES = ("idx_trace_sessions_uid", "idx_trace_sessions_trace")

Row = tuple[Any, ...]


# -- timing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Timing:
        return cls(statistics.median(samples_ns) / 1e6, min(samples_ns) / 1e6, len(samples_ns))


def _rounds(names: list[str], runs: int) -> list[list[str]]:
    # Rotate the order every round, so no variant always runs first or right after the same other one.
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(runs)]


def interleaved(variants: dict[str, Callable[[], Any]], *, runs: int, warmup: int) -> dict[str, Timing]:
    """Median wall time of each variant, all variants timed once per round."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[int]] = {name: [] for name in variants}
    gc.collect()
    for order in _rounds(list(variants), runs):
        for name in order:
            started = time.perf_counter_ns()
            variants[name]()
            samples[name].append(time.perf_counter_ns() - started)
    return {name: Timing.of(values) for name, values in samples.items()}


async def interleaved_async(variants: dict[str, Callable[[], Any]], *, runs: int, warmup: int) -> dict[str, Timing]:
    """interleaved() inside an event loop: a variant may return an awaitable, which is awaited in the timing."""

    async def call(run: Callable[[], Any]) -> None:
        result = run()
        if inspect.isawaitable(result):
            await result

    for _ in range(warmup):
        for run in variants.values():
            await call(run)
    samples: dict[str, list[int]] = {name: [] for name in variants}
    gc.collect()
    for order in _rounds(list(variants), runs):
        for name in order:
            started = time.perf_counter_ns()
            await call(variants[name])
            samples[name].append(time.perf_counter_ns() - started)
    return {name: Timing.of(values) for name, values in samples.items()}


# -- the raw floor and the legacy baseline ---------------------------------------------------------
def store_sql(*, session_uid: str, since: float | None = None, limit: int | None = None) -> tuple[str, Row]:
    """The exact SQL and positional parameters the store runs for get_by_session_uid()."""
    stmt, params = query_statement(
        statements_for("sqlite"),
        session_uid=session_uid,
        namespace=None,
        context_type=None,
        since=since,
        until=None,
        limit=limit,
    )
    query = compiled(stmt, SQLITE)
    args = query.args(params)
    assert isinstance(args, tuple)
    return query.sql, args


def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A plain sqlite3 connection with the store's own pragmas (read-only ones keep the file untouched)."""
    if read_only:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        connection.execute("PRAGMA cache_size=-65536")
        return connection
    connection = sqlite3.connect(path, isolation_level=None)
    for name, value in SQLITE_PRAGMAS:
        connection.execute(f"PRAGMA {name}={value}")
    return connection


def raw_query(connection: sqlite3.Connection, sql: str, params: Row) -> Callable[[], list[Row]]:
    """The floor: the store's SQL, decoded column for column as the store does, into plain tuples."""
    loads = orjson.loads

    def run() -> list[Row]:
        return [
            (
                i,
                ct,
                ns,
                loads(data),
                loads(meta) if meta is not None else {},
                c,
                u,
                tuple(sorted(loads(uids))) if uids is not None else (),
            )
            for i, ct, ns, data, meta, c, u, uids in connection.execute(sql, params).fetchall()
        ]

    return run


def fetch_only(connection: sqlite3.Connection, sql: str, params: Row) -> Callable[[], list[Row]]:
    """Only SQLite's share of a query: execute and fetch, no decoding."""
    return lambda: connection.execute(sql, params).fetchall()


def legacy_query(connection: sqlite3.Connection, sql: str, params: Row) -> Callable[[], list[Row]]:
    """The legacy query with the same decoding; generous to legacy: it never fetched the session list."""
    loads = orjson.loads

    def run() -> list[Row]:
        return [
            (i, ct, ns, loads(data), loads(meta) if meta is not None else {}, c, u)
            for i, ct, ns, data, meta, c, u in connection.execute(sql, params).fetchall()
        ]

    return run


def as_rows(traces: list[TraceContext]) -> list[Row]:
    return [
        (t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at, t.session_uids)
        for t in traces
    ]


# -- writes ----------------------------------------------------------------------------------------
def fresh_traces(count: int, *, start: float, seed: int) -> list[TraceContext]:
    """New traces in the generator's shape: 10 % hot session, 20 % in two sessions, ~300-byte payloads."""
    rng = random.Random(seed)
    others = [f"writer-{k:04d}" for k in range(500)]
    filler = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=4096))
    traces = []
    for seq in range(count):
        sessions = [HOT_UID if rng.random() < 0.1 else rng.choice(others)]
        if rng.random() < 0.2:
            sessions.append(rng.choice(others))
        offset = rng.randrange(len(filler) - 250)
        traces.append(
            TraceContext(
                context_type="llm_call",
                namespace="prod",
                data={"seq": seq, "step": 1, "tokens": rng.randrange(8192), "text": filler[offset : offset + 250]},
                metadata={"host": "worker-01", "sdk": "1.4.0", "attempt": 1},
                session_uids=tuple(sessions),
                created_at=start + seq * 0.001,
            )
        )
    return traces


def _encoded(trace: TraceContext) -> dict[str, Any]:
    return {
        "id": trace.id,
        "context_type": trace.context_type,
        "namespace": trace.namespace,
        "data": orjson.dumps(trace.data).decode(),
        "metadata": orjson.dumps(trace.metadata).decode(),
        "created_at": trace.created_at,
        "updated_at": trace.updated_at,
    }


def raw_store_writer(connection: sqlite3.Connection) -> Callable[[list[TraceContext]], None]:
    """The store's two write statements, compiled and run with plain sqlite3: the write floor."""
    sql = statements_for("sqlite")
    upsert, link = compiled(sql.upsert_trace, SQLITE), compiled(sql.insert_link, SQLITE)

    def write(batch: list[TraceContext]) -> None:
        traces, links = [], []
        for trace in batch:
            traces.append(upsert.args(_encoded(trace)))
            for uid in trace.session_uids:
                links.append(link.args({"trace_id": trace.id, "session_uid": uid, "created_at": trace.created_at}))
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(upsert.sql, traces)
        connection.executemany(link.sql, links)
        connection.execute("COMMIT")

    return write


def plain_writer(connection: sqlite3.Connection, *, junction_time: bool) -> Callable[[list[TraceContext]], None]:
    """Plain INSERTs into both tables, one transaction per batch: what the legacy implementation did
    (junction_time=False), or the same on the migrated schema, whose junction rows carry created_at."""
    link_sql = (
        "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES (?, ?, ?)"
        if junction_time
        else "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)"
    )

    def write(batch: list[TraceContext]) -> None:
        traces = [tuple(_encoded(trace).values()) for trace in batch]
        links = [
            (trace.id, uid, trace.created_at) if junction_time else (trace.id, uid)
            for trace in batch
            for uid in trace.session_uids
        ]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?)", traces)
        connection.executemany(link_sql, links)
        connection.execute("COMMIT")

    return write


# -- files -----------------------------------------------------------------------------------------
def object_sizes(path: Path) -> dict[str, int]:
    """Bytes of every table and index, from SQLite's dbstat virtual table."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return dict(connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"))


def checkpoint(path: Path) -> None:
    """Fold the WAL into the main file, so its size is the database's size."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", "-migration.lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def copy_db(source: Path, target: Path) -> Path:
    remove_db(target)
    shutil.copyfile(source, target)
    return target


def git_revision() -> str:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files), to label results."""
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def parse_scale(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"scale must look like 10k, 100k, 1m or 2m, not {text!r}")
    return int(float(match[1]) * {"": 1, "k": 1_000, "m": 1_000_000}[match[2]])


# -- the run ---------------------------------------------------------------------------------------
@dataclass
class Line:
    """One row of the results table: a ratio (or a plain value) and the issue's target for it."""

    label: str
    measured: str
    reference: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None

    def verdict(self) -> str:
        return "" if self.ok is None else ("ok" if self.ok else "MISSED")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir: Path = args.workdir
        self.started = time.perf_counter()
        self.lines: list[Line] = []
        self.problems: list[str] = []
        config = {"scale": args.scale, "runs": args.runs, "seed": args.seed, "revision": git_revision()}
        self.out: dict[str, Any] = {"config": config, "reused_data": False}

    def log(self, message: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f}s] {message}", file=sys.stderr, flush=True)

    def same(self, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.problems.append(f"{what}: results differ ({len(got)} vs {len(want)} rows)")

    # 1. data
    def legacy_file(self) -> GenerateReport:
        traces = self.args.scale
        hot = round(traces * 0.1)
        options: dict[str, Any] = {
            "traces": traces,
            "seed": self.args.seed,
            "hot_session_share": 0.1,
            "hot_session_uid": HOT_UID,
            "recent_burst": min(1000, max(1, hot // 10)),
            "recent_window_s": WINDOW_S,
            "now": NOW,
        }
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
        backfill = reports.get("backfill")
        index = reports.get("index") or {}
        detail = {
            "backfill_seconds": getattr(backfill, "seconds", None),
            "index_seconds": index.get("index_seconds"),
            "analyze_seconds": index.get("analyze_seconds"),
        }
        self.out["upgrade"] = {"seconds": seconds, **detail}
        return migrated

    # 3a + 3c + 3f. sync store vs raw floor vs legacy
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
                plans[f"legacy {name}"] = _plan(old, legacy_sql, legacy_params)
        raw.close()
        old.close()
        if self.out["rows"]["window"] != data.burst_traces:
            self.problems.append(f"window returned {self.out['rows']['window']} rows, expected {data.burst_traces}")
        self.out["timings"] = timings
        self.out["plans"] = plans

        window, latest = timings["sync window"], timings["sync latest"]
        old_window, old_latest = timings["legacy window"], timings["legacy latest"]
        speedup = _ratio(f"legacy / new, 10-min window (hot session {data.hot_traces:,})", old_window["legacy"],
                         old_window["store"], 50.0, at_least=True)  # fmt: skip
        if data.hot_traces < 100_000:  # the target is set for a hot session of >= 100K traces
            speedup.target, speedup.ok = f"{speedup.target} (n/a: hot < 100K)", None
        self.lines += [
            _ratio(f"sync store / raw, 10-min window ({self.out['rows']['window']} rows)", window["store"],
                   window["raw"], 1.3),
            _ratio("  raw: SQL only (fetchall) / with decode", window["raw-sql"], window["raw"]),
            _ratio(f"sync store / raw, latest {LATEST}", latest["store"], latest["raw"], 2.0),
            _ratio("  raw: SQL only (fetchall) / with decode", latest["raw-sql"], latest["raw"]),
            speedup,
            _ratio("  legacy / new, SQL only (fetchall)", old_window["legacy-sql"], old_window["raw-sql"]),
            _ratio(f"legacy / new, latest {LATEST}", old_latest["legacy"], old_latest["store"]),
            _ratio("  legacy / new, SQL only (fetchall)", old_latest["legacy-sql"], old_latest["raw-sql"]),
        ]  # fmt: skip

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
            _ratio("async store / raw, 10-min window", window["async"], window["raw"], 1.6),
            _ratio(f"async store / raw, latest {LATEST}", latest["async"], latest["raw"], 3.0),
        ]

    # 3g. keyset pages deep in the hot session, and several sessions at once
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
            _ratio(
                f"keyset page {deep} / page 1 (hot session, {size} per page)", timings["later"], timings["first"], 1.2
            ),
            _ratio(
                f"{len(others) + 1} sessions at once / the hot one alone, latest {size}",
                timings["several"],
                timings["one"],
            ),
        ]

    # 3d. sizes
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
            Line(
                "file size migrated / legacy", _mb(migrated_bytes), _mb(legacy_bytes), ratio, "<= 1.05x", ratio <= 1.05
            ),
            Line(
                "  migrated after VACUUM / legacy",
                _mb(vacuumed_bytes),
                _mb(legacy_bytes),
                vacuumed_bytes / legacy_bytes,
            ),
            Line("  free pages in the migrated file", _mb(free_pages * page_size), "(reused by later writes)"),
            Line("  the 2 dropped junction indexes", _mb(dropped), f"{100 * dropped / legacy_bytes:.1f}% of legacy"),
        ]

    # 3e. writes
    def writes(self, legacy: Path, migrated: Path, data: GenerateReport) -> None:
        count, size = self.args.write_traces, self.args.batch_size
        traces = fresh_traces(count, start=data.now + 1, seed=self.args.seed + 1)
        batches = [traces[i : i + size] for i in range(0, count, size)]
        warm = fresh_traces(size, start=data.now + 1e6, seed=self.args.seed + 2)
        # writer -> the file it starts from; each writes the same batches into its own copy
        sources = {"store": migrated, "raw": migrated, "new-plain": migrated, "legacy": legacy, "legacy-2idx": legacy}
        paths = {name: copy_db(source, self.workdir / f"write-{name}.db") for name, source in sources.items()}
        self.log(f"writes: {count:,} traces in batches of {size}, {len(paths)} writers interleaved batch by batch")
        connections = {name: connect(path) for name, path in paths.items() if name != "store"}
        for index in DROPPED_INDEXES:
            connections["legacy-2idx"].execute(f"DROP INDEX {index}")
        with TraceStore(f"sqlite:///{paths['store']}", auto_upgrade=False) as store:
            writers: dict[str, Callable[[list[TraceContext]], None]] = {
                "store": store.store_batch,
                "raw": raw_store_writer(connections["raw"]),
                "new-plain": plain_writer(connections["new-plain"], junction_time=True),
                "legacy": plain_writer(connections["legacy"], junction_time=False),
                "legacy-2idx": plain_writer(connections["legacy-2idx"], junction_time=False),
            }
            for write in writers.values():
                write(warm)
            samples: dict[str, list[int]] = {name: [] for name in writers}
            gc.collect()
            for batch, order in zip(batches, _rounds(list(writers), len(batches)), strict=True):
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
        if not self.args.keep:
            for path in paths.values():
                remove_db(path)

        timings = {name: Timing.of(values) for name, values in samples.items()}
        rate = {name: size / (t.median_ms / 1e3) for name, t in timings.items()}
        self.out["writes"] = {"traces": count, "batch_size": size, "rows_per_s": rate}
        self.out["timings"]["writes"] = timings

        def line(label: str, measured: str, base: str, target: float | None = None) -> Line:
            ratio = rate[measured] / rate[base]
            verdict = None if target is None else ratio >= target
            target_text = "" if target is None else f">= {target:g}x"
            return Line(label, f"{rate[measured]:,.0f}/s", f"{rate[base]:,.0f}/s", ratio, target_text, verdict)

        self.lines += [
            line(f"write rows/s, store / legacy INSERTs (batch {size})", "store", "legacy", 0.95),
            line("  plain INSERTs, migrated / legacy schema", "new-plain", "legacy"),
            line("  store's SQL (raw) / plain INSERTs, migrated", "raw", "new-plain"),
            line("  store / store's SQL run raw", "store", "raw"),
            line("  legacy: keep / drop the 2 junction indexes", "legacy", "legacy-2idx"),
        ]


def _plan(connection: sqlite3.Connection, sql: str, params: Row) -> list[str]:
    return [str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def _ratio(label: str, measured: Timing, base: Timing, limit: float | None = None, *, at_least: bool = False) -> Line:
    """A Line for measured / base; with a limit, the target is ratio <= limit (>= limit with at_least)."""
    ratio = measured.median_ms / base.median_ms
    line = Line(label, _ms(measured), _ms(base), ratio)
    if limit is not None:
        line.target = f"{'>=' if at_least else '<='} {limit:g}x"
        line.ok = ratio >= limit if at_least else ratio <= limit
    return line


def _ms(timing: Timing) -> str:
    return f"{timing.median_ms:.3f} ms" if timing.median_ms < 10 else f"{timing.median_ms:.1f} ms"


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def render(bench: Bench, data: GenerateReport) -> str:
    generated = f"{'reused, ' if bench.out['reused_data'] else ''}generated in {data.seconds:.1f} s"
    header = (
        f"tracestore bench @ {bench.out['config']['revision']}: {data.traces:,} traces, {data.links:,} links; "
        f"hot session {data.hot_traces:,} traces, {data.burst_traces:,} in the last {WINDOW_S:g} s ({generated})\n"
        f"medians of {bench.args.runs} interleaved rounds (legacy query: {bench.out['legacy_runs']})"
    )
    upgrade_info = bench.out["upgrade"]
    steps = ", ".join(
        f"{name.removesuffix('_seconds')} {value:.1f} s"
        for name, value in upgrade_info.items()
        if name != "seconds" and value is not None
    )
    header += f"\nupgrade legacy -> head on a copy: {upgrade_info['seconds']:.1f} s ({steps})"
    columns = ("measure", "measured", "floor / base", "ratio", "target", "verdict")
    rows = [columns] + [
        (
            line.label,
            line.measured,
            line.reference,
            f"{line.ratio:.2f}x" if line.ratio is not None else "",
            line.target,
            line.verdict(),
        )
        for line in bench.lines
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    table = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    table.insert(1, "-" * len(table[0]))
    plans = [f"{name}:\n" + "\n".join(f"    {step}" for step in steps) for name, steps in bench.out["plans"].items()]
    return "\n".join([header, "", *table, "", "EXPLAIN QUERY PLAN", *plans, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=parse_scale, default="1m", help="traces to generate: 10k, 100k, 1m, 2m...")
    parser.add_argument("--runs", type=int, default=61, help="interleaved rounds per query (default 61)")
    parser.add_argument("--legacy-runs", type=int, default=0, help="rounds for the slow legacy query (default runs/3)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (gitignored)")
    parser.add_argument("--keep", action="store_true", help="keep the files, and reuse a matching legacy file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-traces", type=int, default=20_000, help="traces written per writer (default 20000)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.write_traces < args.batch_size or args.batch_size < 1:
        parser.error("need --runs >= 1 and --write-traces >= --batch-size >= 1")
    args.workdir.mkdir(parents=True, exist_ok=True)

    bench = Bench(args)
    data = bench.legacy_file()
    legacy = Path(data.path)
    bench.out["data"] = asdict(data)
    migrated = bench.migrated_copy(legacy)
    bench.sync_queries(legacy, migrated, data)
    bench.async_queries(migrated, data)
    bench.pages(migrated, data)
    bench.sizes(legacy, migrated)
    bench.writes(legacy, migrated, data)
    if not args.keep:
        remove_db(migrated)
        remove_db(legacy)
        legacy.with_suffix(".json").unlink(missing_ok=True)

    return finish(bench, render(bench, data), args.json, wrong="WRONG RESULTS, timings are void")


def finish(bench: Any, table: str, json_path: Path | None, *, wrong: str) -> int:
    """Print the table, write the JSON (lines, problems and all), and say whether the results are void.

    Shared by both benchmarks: `bench` has `out`, `lines` and `problems`.
    """
    print(table)
    bench.out["lines"] = [asdict(line) for line in bench.lines]
    bench.out["problems"] = bench.problems
    if json_path:
        json_path.write_text(json.dumps(bench.out, indent=2, default=_jsonable))
    if bench.problems:
        print(f"\n{wrong}:\n  " + "\n  ".join(bench.problems), file=sys.stderr)
        return 2
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return asdict(value)
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
