"""What instrumentation costs: the store's latest-100 and window reads and a 100-trace write batch, on an engine
with a no-op `before_cursor_execute` listener (the store's statements then go through SQLAlchemy's execution, so
the listener sees them) against the same engine kind without one (straight to the DBAPI cursor), sync and async,
medians of interleaved runs on a warm cache.

    .venv/bin/python benchmarks/instrumented.py                       # SQLite, 20,000 traces
    scripts/with-postgres .venv/bin/python benchmarks/instrumented.py --postgresql   # and PostgreSQL

The data: `--traces` traces, `hot` holding 1,000 of them in the last 10 minutes (the window read returns them
all), the rest spread over 200 other sessions. docs/using.md (Instrumentation) quotes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from common import NOW, WINDOW_S, Timing, git_revision, interleaved, interleaved_async
from sqlalchemy import event, make_url

from tracestore import AsyncTraceStore, TraceContext, TraceStore

HOT = "hot"
HOT_TRACES = 1_000
BATCH = 100


def noop(*args: Any) -> None:
    """The cheapest listener there is: what is measured is the path it forces, not its own work."""


def traces(total: int) -> list[TraceContext]:
    hot = [
        TraceContext("span", "bench", {"i": i}, session_uids=[HOT], created_at=NOW - WINDOW_S * i / HOT_TRACES)
        for i in range(HOT_TRACES)
    ]
    cold = [
        TraceContext("span", "bench", {"i": i}, session_uids=[f"s{i % 200}"], created_at=NOW - 86_400 - i)
        for i in range(max(total - HOT_TRACES, 0))
    ]
    return hot + cold


def batch() -> list[TraceContext]:
    """A fresh batch of new traces outside the hot session, so the reads keep returning the same rows."""
    key = uuid.uuid4().hex[:8]
    return [
        TraceContext("span", "bench", {"i": i}, session_uids=[f"w-{key}"], created_at=NOW - 7 * 86_400 + i)
        for i in range(BATCH)
    ]


def operations(store: Any) -> dict[str, Callable[[], Any]]:
    return {
        "latest-100": lambda: store.get_by_session_uid(HOT, limit=100),
        "window": lambda: store.get_by_session_uid(HOT, since=NOW - WINDOW_S),
        f"write {BATCH}": lambda: store.store_batch(batch()),
    }


def measure_sync(url: str, runs: int) -> dict[str, dict[str, Timing]]:
    with TraceStore(url) as plain, TraceStore(url) as listened:
        event.listen(listened.engine, "before_cursor_execute", noop)
        assert len(plain.get_by_session_uid(HOT, since=NOW - WINDOW_S)) == HOT_TRACES
        results = {}
        for name, run in operations(plain).items():
            variants = {"none": run, "listener": operations(listened)[name]}
            results[name] = interleaved(variants, runs=runs if "write" not in name else runs // 3, warmup=20)
        return results


async def measure_async(url: str, runs: int) -> dict[str, dict[str, Timing]]:
    async with AsyncTraceStore(url) as plain, AsyncTraceStore(url) as listened:
        event.listen(listened.engine.sync_engine, "before_cursor_execute", noop)
        results = {}
        for name, run in operations(plain).items():
            variants = {"none": run, "listener": operations(listened)[name]}
            results[name] = await interleaved_async(
                variants, runs=runs if "write" not in name else runs // 3, warmup=20
            )
        return results


@contextmanager
def sqlite_database(total: int) -> Iterator[tuple[str, str]]:
    with tempfile.TemporaryDirectory() as scratch:
        url = f"sqlite:///{Path(scratch) / 'instrumented.db'}"
        with TraceStore(url) as store:
            store.store_batch(traces(total))
        yield url, url.replace("sqlite://", "sqlite+aiosqlite://", 1)


@contextmanager
def postgresql_database(total: int) -> Iterator[tuple[str, str]]:
    server = make_url(os.environ["TRACESTORE_PG_URL"])
    name = f"bench_instrumented_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {name} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        url = server.set(drivername="postgresql+psycopg", database=name)
        with TraceStore(url.render_as_string(hide_password=False)) as store:
            store.store_batch(traces(total))
            with store.engine.connect() as connection:
                connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
        yield (
            url.render_as_string(hide_password=False),
            url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False),
        )
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
        admin.dispose()


def report(engine: str, kind: str, results: dict[str, dict[str, Timing]]) -> list[dict[str, Any]]:
    rows = []
    for name, timings in results.items():
        none, listener = timings["none"].median_ms, timings["listener"].median_ms
        print(f"{engine:<10} {kind:<5} {name:<12} {none:9.3f} ms {listener:9.3f} ms {listener / none:7.2f}x")
        rows.append({"engine": engine, "store": kind, "operation": name, "none_ms": none, "listener_ms": listener})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=300, help="timed runs per read variant (a third for writes)")
    parser.add_argument("--postgresql", action="store_true", help="also on $TRACESTORE_PG_URL's server")
    parser.add_argument("--json", type=Path, help="write the medians there")
    args = parser.parse_args()
    databases: list[tuple[str, Callable[[int], Any]]] = [("sqlite", sqlite_database)]
    if args.postgresql:
        databases.append(("postgresql", postgresql_database))
    print(f"{'engine':<10} {'store':<5} {'operation':<12} {'no listener':>12} {'no-op listener':>14} {'ratio':>7}")
    rows = []
    for engine, database in databases:
        with database(args.traces) as (sync_url, async_url):
            rows += report(engine, "sync", measure_sync(sync_url, args.runs))
            rows += report(engine, "async", asyncio.run(measure_async(async_url, args.runs)))
    if args.json:
        args.json.write_text(json.dumps({"revision": git_revision(), "traces": args.traces, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
