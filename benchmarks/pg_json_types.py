"""TEXT vs JSON vs JSONB for traces.data / traces.metadata on PostgreSQL: speed, size, fidelity, conversion cost.

    scripts/with-postgres .venv/bin/python benchmarks/pg_json_types.py                 # 200,000 traces
    scripts/with-postgres .venv/bin/python benchmarks/pg_json_types.py --traces 50000 --reads 101

Three databases on the same server, each upgraded to head by tracestore's migrations; in two of them
data and metadata are then altered (while empty) to JSON and to JSONB. The schema of the product is
not changed: this only measures what each type would cost.

1. Insert: the same traces in batches of 500, as the store writes them (one INSERT ... SELECT FROM
   unnest(arrays) per table per batch, in one transaction, the orjson text cast to the column type),
   the three databases taking turns batch by batch (rotated order) so the machine's noise is shared.
2. Read: latest-100 of the hot session and of a small one through the store's own compiled SELECT,
   rows fetched with psycopg and decoded as the store decodes them (orjson); json and jsonb values
   reach the client as text, exactly as TEXT does, so only the server's side differs. Interleaved
   rounds, medians.
3. Size: pg_total_relation_size('traces') (heap, TOAST and indexes) and the heap alone, after VACUUM.
4. Fidelity: payloads the store promises to round-trip, written as text, cast to each type, read back
   as text and decoded; "exact" means the decoded value equals the original and has the same key order.
5. Conversion: ALTER TABLE traces ALTER COLUMN data/metadata TYPE jsonb (and json) on a copy of the
   TEXT table, timed, and the rate extrapolated to 100 GB.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import psycopg
from psycopg.types.string import TextLoader
from sqlalchemy import URL, create_engine, make_url
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect

from tracestore.migrate import finalize, upgrade
from tracestore.queries import compiled, query_statement, statements_for
from tracestore.rows import decode_rows

TYPES = ("TEXT", "JSON", "JSONB")
START = 1_750_000_000.0
HOT = "hot"
SMALL = "session-0007"
LATEST = 100
BATCH = 500

# The store's write SQL with the payload columns cast to the column's type (a plain INSERT of text into
# json/jsonb needs the cast: there is no assignment cast from text).
INSERT_TRACES = (
    "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
    " SELECT v.id, v.context_type, v.namespace, v.data::{type}, v.metadata::{type}, v.created_at, v.updated_at"
    " FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::float8[], %s::float8[])"
    " AS v(id, context_type, namespace, data, metadata, created_at, updated_at) ON CONFLICT (id) DO NOTHING"
)
INSERT_LINKS = (
    "INSERT INTO trace_sessions (trace_id, session_uid, created_at)"
    " SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[]) ON CONFLICT DO NOTHING"
)


# -- data -----------------------------------------------------------------------------------------------------
def make_rows(count: int, *, seed: int) -> Iterator[tuple[tuple[Any, ...], list[tuple[str, str, float]]]]:
    """(trace row, its links) in the store's column order: ~300-byte JSON payloads, realistic shapes.

    10 % of traces in the hot session, the rest spread over 2,000 sessions, one in five in two sessions.
    """
    rng = random.Random(seed)
    words = ["user", "assistant", "the", "order", "shipped", "refund", "latency", "token", "model", "retry"]
    sessions = [f"session-{k:04d}" for k in range(2000)]
    for seq in range(count):
        created = START + seq * 0.01
        trace_id = f"{int(created * 1000):013x}-{seq:08d}"
        data = {
            "model": rng.choice(["gpt-4o", "claude-3-5-sonnet", "llama-3-70b"]),
            "prompt": " ".join(rng.choices(words, k=18)),
            "completion": " ".join(rng.choices(words, k=14)),
            "usage": {"prompt_tokens": rng.randrange(4000), "completion_tokens": rng.randrange(800)},
            "latency_ms": round(rng.uniform(50, 4000), 3),
            "tags": rng.sample(words, 3),
            "ok": rng.random() > 0.05,
        }
        metadata = {"host": f"worker-{rng.randrange(16):02d}", "sdk": "1.4.0", "attempt": 1}
        uids = [HOT if rng.random() < 0.1 else rng.choice(sessions)]
        if rng.random() < 0.2:
            uids.append(rng.choice(sessions))
        row = (trace_id, "llm_call", "prod", orjson.dumps(data).decode(), orjson.dumps(metadata).decode())
        yield (*row, created, created), [(trace_id, uid, created) for uid in sorted(set(uids))]


def arrays(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


# -- databases ------------------------------------------------------------------------------------------------
@contextmanager
def databases(server: URL, names: list[str]) -> Iterator[dict[str, str]]:
    admin = create_engine(server.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    created = []
    try:
        urls = {}
        for name in names:
            db = f"tracestore_json_{name.lower()}_{uuid.uuid4().hex[:8]}"
            with admin.connect() as connection:
                connection.exec_driver_sql(
                    f"CREATE DATABASE \"{db}\" TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'"
                )
            created.append(db)
            urls[name] = server.set(drivername="postgresql+psycopg", database=db).render_as_string(hide_password=False)
        yield urls
    finally:
        for db in created:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.dispose()


def libpq(url: str) -> str:
    parsed = make_url(url)
    parts = {"dbname": parsed.database, "user": parsed.username or "postgres", **parsed.query}
    if parsed.host:
        parts["host"] = parsed.host
    if parsed.port:
        parts["port"] = str(parsed.port)
    return " ".join(f"{key}={value}" for key, value in parts.items())


def connect(url: str) -> psycopg.Connection[Any]:
    connection = psycopg.connect(libpq(url))
    # json/jsonb to the client as text, decoded by the same orjson call as TEXT's (the store's decode_rows).
    for type_name in ("json", "jsonb"):
        connection.adapters.register_loader(type_name, TextLoader)
    return connection


def prepare(url: str, column_type: str) -> None:
    """Head schema (finalized: the deployed state); data and metadata altered to the type while empty."""
    upgrade(url)
    finalize(url)
    if column_type == "TEXT":
        return
    with connect(url) as connection:
        connection.execute(
            f"ALTER TABLE traces ALTER COLUMN metadata DROP DEFAULT,"
            f" ALTER COLUMN data TYPE {column_type} USING data::{column_type},"
            f" ALTER COLUMN metadata TYPE {column_type} USING metadata::{column_type},"
            f" ALTER COLUMN metadata SET DEFAULT '{{}}'::{column_type}"
        )


# -- measurements ---------------------------------------------------------------------------------------------
def insert_all(urls: dict[str, str], count: int) -> dict[str, dict[str, float]]:
    """Every batch into every database, the order rotated batch by batch; seconds spent per database."""
    connections = {name: connect(url) for name, url in urls.items()}
    spent = {name: {"traces_s": 0.0, "batch_s": 0.0} for name in urls}
    names = list(urls)
    rows = make_rows(count, seed=42)
    try:
        for number in range(0, count, BATCH):
            chunk = [next(rows) for _ in range(min(BATCH, count - number))]
            trace_args = arrays([trace for trace, _ in chunk])
            link_args = arrays([link for _, links in chunk for link in links])
            shift = (number // BATCH) % len(names)
            for name in names[shift:] + names[:shift]:
                connection = connections[name]
                started = time.perf_counter()
                with connection.transaction():
                    cursor = connection.execute(INSERT_TRACES.format(type=name), trace_args)
                    assert cursor.rowcount == len(chunk)
                    traces_done = time.perf_counter()
                    connection.execute(INSERT_LINKS, link_args)
                finished = time.perf_counter()
                spent[name]["traces_s"] += traces_done - started
                spent[name]["batch_s"] += finished - started
        for connection in connections.values():
            connection.autocommit = True
            connection.execute("VACUUM ANALYZE")
    finally:
        for connection in connections.values():
            connection.close()
    return spent


def read_latencies(urls: dict[str, str], *, runs: int) -> dict[str, dict[str, float]]:
    """Median ms of latest-100 through the store's SELECT, fetched and decoded; the same answer everywhere
    (compared with keys sorted: JSONB reorders them, see fidelity)."""
    statements = statements_for("postgresql")
    dialect = psycopg_dialect()  # type: ignore[no-untyped-call]
    queries = {}
    for uid in (HOT, SMALL):
        stmt, params = query_statement(
            statements, session_uid=uid, namespace=None, context_type=None, since=None, until=None, limit=LATEST
        )
        query = compiled(stmt, dialect)
        queries[uid] = (query.sql, query.args(params))
    connections = {name: connect(url) for name, url in urls.items()}
    for connection in connections.values():
        connection.autocommit = True  # one SELECT, one snapshot: as the store's reads
    samples: dict[str, dict[str, list[float]]] = {name: {uid: [] for uid in queries} for name in urls}
    answers: dict[str, set[str]] = {uid: set() for uid in queries}
    names = list(urls)
    try:
        for round_no in range(runs + 5):  # 5 warm-up rounds
            shift = round_no % len(names)
            for name in names[shift:] + names[:shift]:
                for uid, (sql, args) in queries.items():
                    started = time.perf_counter()
                    traces = decode_rows(connections[name].execute(sql, args).fetchall())
                    elapsed = time.perf_counter() - started
                    if round_no >= 5:
                        samples[name][uid].append(elapsed * 1000)
                    answers[uid].add(
                        orjson.dumps([(t.id, t.data, t.metadata) for t in traces], option=orjson.OPT_SORT_KEYS).decode()
                    )
    finally:
        for connection in connections.values():
            connection.close()
    for uid, seen in answers.items():
        if len(seen) != 1:
            raise SystemExit(f"the types returned different answers for {uid}: no timing is worth printing")
    return {name: {uid: statistics.median(values) for uid, values in per.items()} for name, per in samples.items()}


def sizes(urls: dict[str, str]) -> dict[str, dict[str, int]]:
    result = {}
    for name, url in urls.items():
        with connect(url) as connection:
            total, heap, toast = connection.execute(
                "SELECT pg_total_relation_size('traces'), pg_relation_size('traces'),"
                " coalesce(pg_total_relation_size(reltoastrelid), 0) FROM pg_class WHERE relname = 'traces'"
            ).fetchone()  # type: ignore[misc]
            result[name] = {"total": total, "heap": heap, "toast": toast}
    return result


# -- fidelity -------------------------------------------------------------------------------------------------
def deep(levels: int) -> Any:
    value: Any = "bottom"
    for level in range(levels):
        value = {"k": level, "v": value} if level % 2 else [value]  # keys in JSONB's own order: nesting only
    return value


# (case, JSON text as written, the value the store promises to return). Texts come from orjson, as the
# store writes them, except the duplicate-key one: a legacy or foreign writer's text.
FIDELITY: list[tuple[str, str, Any]] = [
    (name, orjson.dumps(value).decode(), value)
    for name, value in [
        ("key order", {"zeta": 1, "alpha": 2, "mid": {"b": 1, "a": 2}}),
        ("-0.0", {"x": -0.0}),
        ("1e308", {"x": 1e308}),
        ("1e16 (a float)", {"x": 1e16}),
        ("5e-324", {"x": 5e-324}),
        ("2**64-1", {"x": 2**64 - 1}),
        ("0.1 and 1.0", {"x": 0.1, "y": 1.0}),
        ("unicode", {"t": 'naïve 日本語 🚀 \u2028 "q" \\ é'}),
        ('escaped NUL "a\\u0000b"', {"t": "a\u0000b"}),
        ("nesting 250 deep", deep(250)),
    ]
] + [("duplicate keys (foreign text)", '{"a": 1, "a": 2}', None)]


def same(decoded: Any, original: Any) -> bool:
    """Equal, of the same types (1e308 must not come back as an int), with the same key order."""
    return orjson.dumps(decoded, option=0) == orjson.dumps(original) and type_tree(decoded) == type_tree(original)


def type_tree(value: Any) -> Any:
    if isinstance(value, dict):
        return [(key, type_tree(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [type_tree(item) for item in value]
    return type(value).__name__


def fidelity(url: str) -> dict[str, dict[str, str]]:
    """For each case and type: what a write then a read gives back."""
    result: dict[str, dict[str, str]] = {}
    with connect(url) as connection:
        connection.autocommit = True
        for case, encoded, value in FIDELITY:
            result[case] = {}
            for column_type in TYPES:
                try:
                    (text,) = connection.execute(f"SELECT (%s::{column_type})::text", (encoded,)).fetchone()  # type: ignore[misc]
                except psycopg.Error as exc:
                    result[case][column_type] = f"refused: {exc.diag.message_primary}"
                    continue
                if value is None:  # the duplicate-key text: compared as text
                    verdict = "kept" if text == encoded else f"changed to {text}"
                else:
                    decoded = orjson.loads(text)
                    if same(decoded, value):
                        verdict = "exact"
                    else:
                        shown = text if len(text) < 60 else text[:57] + "..."
                        verdict = f"changed: {shown}"
                result[case][column_type] = verdict
    return result


# -- conversion -----------------------------------------------------------------------------------------------
def conversion(url: str) -> dict[str, dict[str, float]]:
    """ALTER COLUMN ... TYPE on a copy of the TEXT table (the whole statement holds ACCESS EXCLUSIVE)."""
    result = {}
    with connect(url) as connection:
        connection.autocommit = True
        for column_type in ("JSON", "JSONB"):
            connection.execute("DROP TABLE IF EXISTS traces_copy")
            connection.execute("CREATE TABLE traces_copy (LIKE traces INCLUDING ALL)")
            connection.execute("INSERT INTO traces_copy SELECT * FROM traces")
            connection.execute("VACUUM ANALYZE traces_copy")
            (before,) = connection.execute("SELECT pg_total_relation_size('traces_copy')").fetchone()  # type: ignore[misc]
            started = time.perf_counter()
            connection.execute(
                f"ALTER TABLE traces_copy ALTER COLUMN metadata DROP DEFAULT,"
                f" ALTER COLUMN data TYPE {column_type} USING data::{column_type},"
                f" ALTER COLUMN metadata TYPE {column_type} USING metadata::{column_type},"
                f" ALTER COLUMN metadata SET DEFAULT '{{}}'::{column_type}"
            )
            seconds = time.perf_counter() - started
            (after,) = connection.execute("SELECT pg_total_relation_size('traces_copy')").fetchone()  # type: ignore[misc]
            result[column_type] = {"seconds": seconds, "bytes_before": before, "bytes_after": after}
        connection.execute("DROP TABLE traces_copy")
    return result


# -- report ---------------------------------------------------------------------------------------------------
def mb(size: float) -> str:
    return f"{size / 1e6:,.1f} MB"


def report(
    count: int,
    inserted: dict[str, dict[str, float]],
    reads: dict[str, dict[str, float]],
    size: dict[str, dict[str, int]],
    faithful: dict[str, dict[str, str]],
    converted: dict[str, dict[str, float]],
    *,
    runs: int,
    server_version: str,
) -> str:
    lines = [f"PostgreSQL {server_version}; {count:,} traces, batches of {BATCH}; reads: median of {runs} rounds", ""]
    lines.append("| | " + " | ".join(TYPES) + " |")
    lines.append("|---|" + "---:|" * len(TYPES))

    def row(label: str, cell: Callable[[str], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(name) for name in TYPES) + " |")

    row("insert, whole batch (traces/s)", lambda n: f"{count / inserted[n]['batch_s']:,.0f}")
    row("insert, traces statement only (rows/s)", lambda n: f"{count / inserted[n]['traces_s']:,.0f}")
    row("insert vs TEXT (whole batch)", lambda n: f"{inserted['TEXT']['batch_s'] / inserted[n]['batch_s']:.2f}x")
    row(f"latest {LATEST}, hot session (ms)", lambda n: f"{reads[n][HOT]:.2f}")
    row(f"latest {LATEST}, hot session vs TEXT", lambda n: f"{reads['TEXT'][HOT] / reads[n][HOT]:.2f}x")
    row(f"latest {LATEST} of a small session (ms)", lambda n: f"{reads[n][SMALL]:.2f}")
    row("traces, total size", lambda n: mb(size[n]["total"]))
    row("traces, heap only", lambda n: mb(size[n]["heap"]))
    row("traces, TOAST", lambda n: mb(size[n]["toast"]))
    row("size vs TEXT", lambda n: f"{size[n]['total'] / size['TEXT']['total']:.2f}x")
    lines += ["", "Fidelity (write the text, read it back, decode with orjson):", ""]
    lines.append("| payload | " + " | ".join(TYPES) + " |")
    lines.append("|---|" + "---|" * len(TYPES))
    for case, verdicts in faithful.items():
        lines.append(f"| {case} | " + " | ".join(verdicts[name].replace("|", "\\|") for name in TYPES) + " |")
    lines += [
        "",
        "Converting the TEXT table (ALTER COLUMN data, metadata TYPE ...; one ACCESS EXCLUSIVE statement):",
        "",
    ]
    lines.append("| to | seconds | table before | after | MB/s of table | 100 GB at that rate |")
    lines.append("|---|---:|---:|---:|---:|---:|")
    for column_type, figures in converted.items():
        rate = figures["bytes_before"] / figures["seconds"]
        hours = 100e9 / rate / 3600
        lines.append(
            f"| {column_type} | {figures['seconds']:.2f} | {mb(figures['bytes_before'])} | {mb(figures['bytes_after'])}"
            f" | {rate / 1e6:,.1f} | {hours:.1f} h |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=200_000, help="traces per database (default 200,000)")
    parser.add_argument("--reads", type=int, default=301, help="read rounds; the table shows medians (default 301)")
    parser.add_argument("--pg-url", default=os.environ.get("TRACESTORE_PG_URL"), help="default: $TRACESTORE_PG_URL")
    args = parser.parse_args()
    if not args.pg_url:
        parser.error("needs --pg-url or TRACESTORE_PG_URL (run under scripts/with-postgres)")
    server = make_url(args.pg_url)
    with databases(server, list(TYPES)) as urls:
        for name, url in urls.items():
            prepare(url, name)
        with connect(urls["TEXT"]) as connection:
            (version,) = connection.execute("SHOW server_version").fetchone()  # type: ignore[misc]
        print(f"inserting {args.traces:,} traces into each of {', '.join(TYPES)} ...", flush=True)
        inserted = insert_all(urls, args.traces)
        print("reading ...", flush=True)
        reads = read_latencies(urls, runs=args.reads)
        size = sizes(urls)
        faithful = fidelity(urls["TEXT"])
        print("converting a copy of the TEXT table ...", flush=True)
        converted = conversion(urls["TEXT"])
    print()
    print(report(args.traces, inserted, reads, size, faithful, converted, runs=args.reads, server_version=version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
