"""A fast generator of legacy-schema SQLite files with millions of traces, for benchmarks and migration tests.

Writes with plain `sqlite3` (no store, no factories): rows are built in Python from one seeded
`random.Random` and inserted with executemany in chunks, with the secondary indexes built after the
load (one sorted pass each instead of millions of random b-tree updates). The output is a function of
the arguments only: the same seed and `now` give byte-for-byte the same rows.

Shape (what the hot query cares about):
- one hot session holds `hot_session_share` of all traces; `recent_burst` of them were created in the
  last `recent_window_s` seconds before `now`, the rest before that window;
- every other trace belongs to one of many other sessions whose sizes follow a Zipf-like law;
- `two_session_share` of all traces also belong to a second (non-hot) session;
- all traces are spread over `span_days`, inserted in creation order with time-ordered
  (UUIDv7-shaped) ids, as a long-running legacy deployment would have written them.
"""

from __future__ import annotations

import os
import random
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import orjson

from tracestore.errors import storage_error

# The pre-Alembic schema, exactly as the legacy implementation created it (tests/legacy.py holds the
# same text; tests/test_bulk.py checks they agree). Tables first; indexes are built after the load.
LEGACY_TABLES_DDL = """
CREATE TABLE traces (
    id TEXT PRIMARY KEY,
    context_type TEXT NOT NULL,
    namespace TEXT NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE trace_sessions (
    trace_id TEXT NOT NULL,
    session_uid TEXT NOT NULL,
    PRIMARY KEY (trace_id, session_uid),
    FOREIGN KEY (trace_id) REFERENCES traces(id) ON DELETE CASCADE
);
"""
LEGACY_INDEXES_DDL = """
CREATE INDEX idx_trace_sessions_uid ON trace_sessions(session_uid);
CREATE INDEX idx_trace_sessions_trace ON trace_sessions(trace_id);
CREATE INDEX idx_traces_created_at ON traces(created_at);
CREATE INDEX idx_traces_type ON traces(context_type);
CREATE INDEX idx_traces_namespace ON traces(namespace);
"""
LEGACY_DDL = LEGACY_TABLES_DDL + LEGACY_INDEXES_DDL

# The same schema on PostgreSQL, as a port of the legacy implementation would have written it. One
# deliberate difference: epoch seconds are DOUBLE PRECISION. SQLite's REAL is an 8-byte float, but
# PostgreSQL's REAL is a 4-byte one (24-bit mantissa): at today's epoch it rounds to 128 seconds, so a
# deployment that had used it would hold no usable timestamps. TEXT keeps the JSON exactly as written.
LEGACY_TABLES_DDL_POSTGRESQL = LEGACY_TABLES_DDL.replace("REAL NOT NULL", "DOUBLE PRECISION NOT NULL")
LEGACY_DDL_POSTGRESQL = LEGACY_TABLES_DDL_POSTGRESQL + LEGACY_INDEXES_DDL

CHUNK_ROWS = 50_000
# Mean size of an "other" session; the Zipf offset keeps the largest one well below the hot session.
MEAN_SESSION_TRACES = 50
ZIPF_OFFSET = 10

CONTEXT_TYPES = ("llm_call", "tool_call", "retrieval", "agent_step", "error")
CONTEXT_WEIGHTS = (50, 25, 15, 8, 2)
NAMESPACES = ("prod", "staging", "eval", "batch", "playground", "ci", "canary", "shadow")
NAMESPACE_WEIGHTS = (60, 12, 10, 8, 4, 3, 2, 1)

_INSERT_TRACE = "INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?)"
_INSERT_LINK = "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)"
_INSERT_LINK_HEAD = "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES (?, ?, ?)"
SCHEMAS = ("legacy", "head")

# Speed over safety while the file is being built: a crash leaves only the temporary file behind.
_LOAD_PRAGMAS = (
    "journal_mode=OFF",
    "synchronous=OFF",
    "locking_mode=EXCLUSIVE",
    "temp_store=MEMORY",
    "cache_size=-262144",  # 256 MiB: the index builds sort in memory
    "threads=2",  # the index builds sort with a helper thread
)

Progress = Callable[[int, int], None]
"""Called after each chunk with (traces written, traces in total)."""


@dataclass(frozen=True)
class GenerateReport:
    """What generate_legacy wrote. `links` counts junction rows, orphans included; `sessions` counts
    distinct session uids; `burst_traces` of the hot session's `hot_traces` have created_at in
    [now - recent_window_s, now)."""

    path: str
    traces: int
    links: int
    orphans: int
    hot_session_uid: str
    hot_traces: int
    burst_traces: int
    two_session_traces: int
    sessions: int
    now: float
    recent_window_s: float
    seconds: float
    file_bytes: int


def generate(
    path: str | os.PathLike[str],
    *,
    traces: int,
    schema: str = "legacy",
    seed: int = 0,
    hot_session_share: float = 0.1,
    hot_session_uid: str = "hot",
    recent_burst: int = 1000,
    recent_window_s: float = 600.0,
    two_session_share: float = 0.2,
    payload_bytes: int = 300,
    span_days: float = 30.0,
    now: float | None = None,
    orphans: int = 0,
    progress: Progress | None = None,
) -> GenerateReport:
    """Write a database of `traces` synthetic traces to `path` (which must not exist).

    `schema`: "legacy" (what the pre-Alembic implementation wrote: the file `alembic upgrade head` is
    meant for) or "head" (what tracestore writes: stamped at the head revision, links with their
    created_at, ready for the store).

    `recent_burst` is capped at the hot session's size. `orphans` adds junction rows whose trace
    does not exist (the legacy implementation ran with foreign keys off). With `now=None` the clock
    is read once; pass it to get the same file twice.
    """
    span = span_days * 86_400.0
    window = float(recent_window_s)
    if traces < 0 or orphans < 0 or recent_burst < 0:
        raise ValueError("traces, orphans and recent_burst must be >= 0")
    if schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    if orphans and schema == "head":
        raise ValueError("orphan links exist only in legacy files (tracestore writes with foreign keys on)")
    for name, share in (("hot_session_share", hot_session_share), ("two_session_share", two_session_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {share}")
    if not 0.0 < window < span:
        raise ValueError("need 0 < recent_window_s < span_days * 86400")
    if not hot_session_uid:
        raise ValueError("hot_session_uid must be a non-empty str")
    if traces + orphans >= 1 << 32:
        raise ValueError("at most 2**32 - 1 traces and orphans: the id's sequence field has 32 bits")
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target} exists; the generator never overwrites a database")

    started = time.perf_counter()
    now = time.time() if now is None else float(now)
    rng = random.Random(seed)
    timeline = _Timeline(
        rng, traces=traces, hot_share=hot_session_share, burst=recent_burst, window=window, span=span, now=now
    )
    rows = _Rows(rng, timeline, hot_uid=hot_session_uid, two_share=two_session_share, payload_bytes=payload_bytes)

    # Built under a temporary name and renamed at the end, so a killed or failed run never leaves a
    # half-written file that a later run would mistake for a finished one.
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        if schema == "head":
            _create_head_schema(partial)
        links, orphan_links, sessions = _load(
            partial, rows, traces=traces, orphans=orphans, progress=progress, head=schema == "head"
        )
    except sqlite3.Error as exc:  # a full disk, an unwritable directory: the library's error, no file left
        partial.unlink(missing_ok=True)
        raise storage_error(f"cannot generate {target}", exc) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)

    return GenerateReport(
        path=str(target),
        traces=traces,
        links=links + orphan_links,
        orphans=orphan_links,
        hot_session_uid=hot_session_uid,
        hot_traces=timeline.hot_count,
        burst_traces=timeline.burst_count,
        two_session_traces=rows.two_session_count,
        sessions=sessions,
        now=now,
        recent_window_s=window,
        seconds=time.perf_counter() - started,
        file_bytes=target.stat().st_size,
    )


def generate_legacy(path: str | os.PathLike[str], **options: Any) -> GenerateReport:
    """generate(path, schema="legacy", ...): the file the migrations are for."""
    return generate(path, schema="legacy", **options)


def _create_head_schema(path: Path) -> None:
    """An empty database at head, made by the real migrations (tables, indexes, triggers, revision)."""
    from tracestore.migrate import upgrade  # the migrations import SQLAlchemy; the legacy path does not need it

    upgrade(f"sqlite:///{path}")
    Path(f"{path}-migration.lock").unlink(missing_ok=True)  # nobody else knows this file yet


def _load(
    path: Path, rows: _Rows, *, traces: int, orphans: int, progress: Progress | None, head: bool = False
) -> tuple[int, int, int]:
    """Create the tables, insert every row in one transaction, then build the indexes.

    At head the tables exist already (the migrations made them): their indexes and triggers are
    set aside during the load and created again from their own SQL after it, so every index is one
    sorted build and no trigger fires per row.

    Returns (junction rows of real traces, orphan junction rows, distinct session uids).
    """
    links = 0
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        if head:
            connection.execute("PRAGMA journal_mode=DELETE")  # out of WAL, so journal_mode=OFF applies
        for pragma in _LOAD_PRAGMAS:
            connection.execute(f"PRAGMA {pragma}")
        if head:
            deferred = connection.execute(
                "SELECT type, name, sql FROM sqlite_master WHERE type IN ('index', 'trigger') AND sql IS NOT NULL"
                " AND tbl_name IN ('traces', 'trace_sessions') ORDER BY type, name"
            ).fetchall()
            for kind, name, _ in deferred:
                connection.execute(f'DROP {kind.upper()} "{name}"')
            insert_link = _INSERT_LINK_HEAD
        else:
            connection.executescript(LEGACY_TABLES_DDL)
            insert_link = _INSERT_LINK
        connection.execute("BEGIN")
        for start in range(0, traces, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, traces)
            trace_rows, link_rows = rows.chunk(start, stop)
            connection.executemany(_INSERT_TRACE, trace_rows)
            if head:
                created = {row[0]: row[5] for row in trace_rows}
                connection.executemany(insert_link, [(trace_id, uid, created[trace_id]) for trace_id, uid in link_rows])
            else:
                connection.executemany(insert_link, link_rows)
            links += len(link_rows)
            if progress is not None:
                progress(stop, traces)
        orphan_rows = rows.orphan_links(orphans)
        connection.executemany(_INSERT_LINK, orphan_rows)
        connection.execute("COMMIT")
        if head:
            for _, _, sql in deferred:
                connection.execute(sql)
            for statement in ("PRAGMA analysis_limit=1000", "ANALYZE", "PRAGMA journal_mode=WAL"):
                connection.execute(statement)
        else:
            connection.executescript(LEGACY_INDEXES_DDL)
        (sessions,) = connection.execute("SELECT count(DISTINCT session_uid) FROM trace_sessions").fetchone()
    finally:
        connection.close()
    return links, len(orphan_rows), sessions


class _Timeline:
    """Every trace's creation time, in insertion (= creation) order, and whether it is the hot session's."""

    def __init__(
        self,
        rng: random.Random,
        *,
        traces: int,
        hot_share: float,
        burst: int,
        window: float,
        span: float,
        now: float,
    ) -> None:
        self.hot_count = round(traces * hot_share)
        self.burst_count = min(burst, self.hot_count)
        background = traces - self.burst_count
        start, cutoff, rand = now - span, now - window, rng.random
        times = [start + rand() * span for _ in range(background)]
        times += [cutoff + rand() * window for _ in range(self.burst_count)]
        hot = bytearray(traces)
        hot[background:] = b"\x01" * self.burst_count
        # The rest of the hot session lies before the window, so exactly burst_count are recent.
        eligible = [i for i in range(background) if times[i] < cutoff]
        older = self.hot_count - self.burst_count
        if older > len(eligible):
            raise ValueError("the hot session is too large for the traces created before the recent window")
        for i in rng.sample(eligible, older):
            hot[i] = 1
        order = sorted(range(traces), key=times.__getitem__)
        self.times = [times[i] for i in order]
        self.hot = bytes(hot[i] for i in order)
        self.start = start
        self.span = span


class _Rows:
    """Turns a timeline into legacy rows, chunk by chunk, drawing every random choice from one rng."""

    def __init__(
        self, rng: random.Random, timeline: _Timeline, *, hot_uid: str, two_share: float, payload_bytes: int
    ) -> None:
        self.rng = rng
        self.timeline = timeline
        self.hot_uid = hot_uid
        traces = len(timeline.times)
        others = traces - timeline.hot_count
        # At least two other sessions, so a trace's second session can always differ from its first.
        count = max(2, others // MEAN_SESSION_TRACES)
        self.other_uids = [_uuid_shaped(rng.getrandbits(128)) for _ in range(count)]
        self.zipf = list(accumulate(1.0 / (rank + ZIPF_OFFSET) for rank in range(count)))
        self.two_session_count = round(traces * two_share)
        two = bytearray(traces)
        for i in rng.sample(range(traces), self.two_session_count):
            two[i] = 1
        self.two = bytes(two)
        skeleton = orjson.dumps({"seq": traces, "step": 99, "tokens": 9999, "text": ""})
        self.text_len = max(0, payload_bytes - len(skeleton))
        alphabet = "abcdefghijklmnopqrstuvwxyz      0123456789"
        self.pool = "".join(rng.choices(alphabet, k=max(8192, 2 * self.text_len)))
        # Exactly 64 variants: a row picks one with 6 random bits.
        self.metadata = [
            orjson.dumps({"host": f"worker-{host:02d}", "sdk": f"1.{minor}.0", "attempt": attempt}).decode()
            for host in range(16)
            for minor in range(2)
            for attempt in (1, 2)
        ]

    def chunk(self, start: int, stop: int) -> tuple[list[tuple[object, ...]], list[tuple[str, str]]]:
        rng, times, hot, two = self.rng, self.timeline.times, self.timeline.hot, self.two
        size = stop - start
        types = rng.choices(CONTEXT_TYPES, weights=CONTEXT_WEIGHTS, k=size)
        namespaces = rng.choices(NAMESPACES, weights=NAMESPACE_WEIGHTS, k=size)
        ranks = range(len(self.other_uids))
        firsts = rng.choices(ranks, cum_weights=self.zipf, k=size)
        seconds = rng.choices(ranks, cum_weights=self.zipf, k=size)
        bits, rand, dumps = rng.getrandbits, rng.random, orjson.dumps
        pool, text_len, pool_room = self.pool, self.text_len, len(self.pool) - self.text_len
        metadata, hot_uid, uids = self.metadata, self.hot_uid, self.other_uids
        trace_rows: list[tuple[object, ...]] = []
        link_rows: list[tuple[str, str]] = []
        for k in range(size):
            seq = start + k
            created = times[seq]
            trace_id = _trace_id(created, bits(42), seq)
            offset = int(rand() * pool_room)
            text = pool[offset : offset + text_len]
            data = dumps({"seq": seq, "step": bits(6), "tokens": bits(13), "text": text})
            trace_rows.append((trace_id, types[k], namespaces[k], data.decode(), metadata[bits(6)], created, created))
            first = -1 if hot[seq] else firsts[k]
            link_rows.append((trace_id, hot_uid if first < 0 else uids[first]))
            if two[seq]:
                second = seconds[k] if seconds[k] != first else (first + 1) % len(uids)
                link_rows.append((trace_id, uids[second]))
        return trace_rows, link_rows

    def orphan_links(self, count: int) -> list[tuple[str, str]]:
        """Junction rows whose trace id no real trace has (their sequence numbers are past the end)."""
        rng, timeline = self.rng, self.timeline
        base = len(timeline.times)
        hot_share = timeline.hot_count / base if base else 0.0
        rows = []
        for j in range(count):
            created = timeline.start + rng.random() * timeline.span
            hot = rng.random() < hot_share
            uid = self.hot_uid if hot else rng.choices(self.other_uids, cum_weights=self.zipf)[0]
            rows.append((_trace_id(created, rng.getrandbits(42), base + j), uid))
        return rows


def _trace_id(created_at: float, random_bits: int, seq: int) -> str:
    """The layout of tracestore.types.new_trace_id (48-bit ms time, version 7, variant 10), made
    deterministic: 42 seeded random bits, then the 32-bit sequence number that makes it unique."""
    ms = int(created_at * 1000) & ((1 << 48) - 1)
    rand_a, rand_b = random_bits >> 30, (random_bits & ((1 << 30) - 1)) << 32 | seq
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid_shaped(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
