"""store_batch throughput on PostgreSQL (sync psycopg, async asyncpg) and SQLite: fresh traces and re-stores.

    scripts/with-postgres .venv/bin/python benchmarks/pg_write_probe.py               # 3 runs of 30,000 traces
    scripts/with-postgres .venv/bin/python benchmarks/pg_write_probe.py --runs 5 --traces 10000 --finalize

Each run of each backend starts from a new, empty database upgraded to head by the store itself (as an
application's first start leaves it: with the rolling-deploy triggers, unless --finalize drops them),
stores --traces new traces in batches of --batch ("fresh"), then stores every one of them again with
new fields and, for one in five, an extra session ("re-store": every id exists, so the upsert runs).
The figure is traces / seconds spent inside store_batch; the table shows the median of --runs runs and
each run's figure. Backends run in a rotated order each round, so the machine's noise is shared out.
To measure another checkout of the library, put its directory first: PYTHONPATH=/path/to/checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import URL, create_engine, make_url

import tracestore
from tracestore import AsyncTraceStore, TraceContext, TraceStore
from tracestore.migrate import finalize

START = 1_750_000_000.0
BACKENDS = ("psycopg", "asyncpg", "sqlite")
Work = list[list[TraceContext]]  # the batches of one pass


def make_traces(count: int, *, seed: int) -> list[TraceContext]:
    """New traces: ~300 bytes of data and metadata as JSON, one session each or (one in five) two of 200."""
    rng = random.Random(seed)
    filler = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=4096))
    sessions = [f"session-{k:03d}" for k in range(200)]
    traces = []
    for seq in range(count):
        uids = rng.sample(sessions, 2 if rng.random() < 0.2 else 1)
        offset = rng.randrange(len(filler) - 200)
        traces.append(
            TraceContext(
                context_type="llm_call",
                namespace="prod",
                data={"seq": seq, "step": 1, "tokens": rng.randrange(8192), "text": filler[offset : offset + 200]},
                metadata={"host": "worker-01", "sdk": "1.4.0", "attempt": 1},
                session_uids=tuple(uids),
                created_at=START + seq * 0.001,
                updated_at=START + seq * 0.001,
            )
        )
    return traces


def restored(traces: list[TraceContext]) -> list[TraceContext]:
    """The same ids stored again: new data and updated_at, and one in five joins one more session."""
    return [
        TraceContext(
            id=t.id,
            context_type=t.context_type,
            namespace=t.namespace,
            data={**t.data, "step": 2},
            metadata=t.metadata,
            session_uids=(*t.session_uids, "session-late") if i % 5 == 0 else t.session_uids,
            created_at=t.created_at,
            updated_at=t.updated_at + 1.0,
        )
        for i, t in enumerate(traces)
    ]


def batches(traces: list[TraceContext], size: int) -> Work:
    return [traces[i : i + size] for i in range(0, len(traces), size)]


@contextmanager
def pg_database(server: URL, driver: str) -> Iterator[str]:
    name = f"tracestore_probe_{uuid.uuid4().hex[:10]}"
    admin = create_engine(server.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(drivername=f"postgresql+{driver}", database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        admin.dispose()


def sync_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def timed_sync(store: TraceStore, work: Work) -> float:
    spent = 0.0
    for batch in work:
        started = time.perf_counter()
        store.store_batch(batch)
        spent += time.perf_counter() - started
    return spent


async def timed_async(store: AsyncTraceStore, work: Work) -> float:
    spent = 0.0
    for batch in work:
        started = time.perf_counter()
        await store.store_batch(batch)
        spent += time.perf_counter() - started
    return spent


def run_sync(url: str, fresh: Work, again: Work, *, final: bool) -> tuple[float, float]:
    with TraceStore(url) as store:
        if final:
            finalize(url)
        return timed_sync(store, fresh), timed_sync(store, again)


def run_async(url: str, fresh: Work, again: Work, *, final: bool) -> tuple[float, float]:
    async def main() -> tuple[float, float]:
        async with AsyncTraceStore(url) as store:
            if final:
                finalize(sync_url(url))
            return await timed_async(store, fresh), await timed_async(store, again)

    return asyncio.run(main())


def one_run(
    backend: str, server: URL | None, workdir: Path, traces: list[TraceContext], args: argparse.Namespace
) -> tuple[float, float]:
    """(fresh traces/s, re-store traces/s) of one backend on a new database."""
    fresh, again = batches(traces, args.batch), batches(restored(traces), args.batch)
    runner: Callable[..., tuple[float, float]]
    if backend == "sqlite":
        path = workdir / f"probe-{uuid.uuid4().hex[:8]}.db"
        try:
            seconds = run_sync(f"sqlite:///{path}", fresh, again, final=args.finalize)
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        assert server is not None
        runner = run_sync if backend == "psycopg" else run_async
        with pg_database(server, backend) as url:
            seconds = runner(url, fresh, again, final=args.finalize)
    return len(traces) / seconds[0], len(traces) / seconds[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traces", type=int, default=30_000, help="traces per run (default 30,000)")
    parser.add_argument("--batch", type=int, default=500, help="traces per store_batch call (default 500)")
    parser.add_argument("--runs", type=int, default=3, help="runs per backend; the table shows the median (default 3)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--finalize", action="store_true", help="drop the rolling-deploy triggers before writing")
    parser.add_argument("--pg-url", default=os.environ.get("TRACESTORE_PG_URL"), help="default: $TRACESTORE_PG_URL")
    args = parser.parse_args()
    backends = [name.strip() for name in args.backends.split(",") if name.strip()]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    server = make_url(args.pg_url) if args.pg_url else None
    if server is None and set(backends) - {"sqlite"}:
        parser.error("PostgreSQL backends need --pg-url or TRACESTORE_PG_URL (run under scripts/with-postgres)")

    traces = make_traces(args.traces, seed=7)
    print(f"tracestore from {Path(tracestore.__file__).parent}")
    print(
        f"{args.traces:,} traces per run in batches of {args.batch}, {args.runs} runs,"
        f" {'finalized' if args.finalize else 'rolling-deploy triggers present (as upgraded)'}"
    )
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in backends}
    with tempfile.TemporaryDirectory(prefix="pg-write-probe-") as tmp:
        for round_no in range(args.runs):
            order = backends[round_no % len(backends) :] + backends[: round_no % len(backends)]
            for backend in order:
                fresh, again = one_run(backend, server, Path(tmp), traces, args)
                results[backend].append((fresh, again))
                print(f"  run {round_no + 1} {backend:8} fresh {fresh:9,.0f}/s  re-store {again:9,.0f}/s", flush=True)

    print()
    print(f"{'backend':10} {'case':9} {'median traces/s':>16}   runs")
    for backend in backends:
        for index, case in enumerate(("fresh", "re-store")):
            values = [run[index] for run in results[backend]]
            each = ", ".join(f"{value:,.0f}" for value in values)
            print(f"{backend:10} {case:9} {statistics.median(values):16,.0f}   {each}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
