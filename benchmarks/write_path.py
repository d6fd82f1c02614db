"""The write path: `store_batch` against the legacy implementation's plain INSERTs, on the same batches.

SQLite (the acceptance comparison):
  - legacy: raw sqlite3 with the store's pragmas (common.connect: foreign keys on), one transaction per batch
    of plain INSERTs into both tables of a legacy-schema file, payloads encoded with orjson: what the
    pre-Alembic implementation did;
  - store: `TraceStore.store_batch` on a finalized file at head.
Both write copies of two files holding the same rows (the generator's legacy and head files of one seed, the
head one finalized), so each keeps its own page cache and checkpoints; they alternate batch by batch, the
order flipping every batch. Throughput is traces written / the writer's total wall time (its checkpoints
included: they are part of writing); the median batch and the CPU seconds are reported too. `--runs` repeats
the whole run on fresh copies; the verdict goes by the median ratio. The batches are new traces in the
generator's shape (writers.fresh_traces): the store's own time-ordered ids, or with `--uuid4-ids` random
ids brought by the caller.

PostgreSQL (`--postgresql`, the server of $TRACESTORE_PG_URL): `store_batch` against two raw floors in psycopg
on the same batches, each writer into its own fresh database at head: COPY of both tables, and the store's
own unnest statements (insert, then links) run raw. All three write the same rows in one transaction per batch.

    python benchmarks/write_path.py --traces 1m --write-traces 100000 --runs 3
    python benchmarks/write_path.py --legacy L.db --head H.db ...   # files you made (H at head, finalized)
    python benchmarks/write_path.py --traces 10m --in-place ...     # 10M: no copies, the files grow each run
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg
from common import DEFAULT_WORKDIR, HOT_UID, NOW, connect, copy_db, data_options, parse_scale, remove_db, scale_name
from postgres import PSYCOPG, conninfo, server_url
from sqlalchemy import URL
from writers import encoded, fresh_traces, plain_writer

from tracestore import TraceContext, TraceStore
from tracestore.migrate import finalize, upgrade
from tracestore.queries import LINK_COLUMNS, TRACE_COLUMNS, compiled, statements_for
from tracestore.testing.bulk import generate

Writer = Callable[[list[TraceContext]], Any]


def btrees(path: Path) -> dict[str, int]:
    """The b-trees a stored trace and each of its links go into: the table and each of its indexes."""
    with closing(connect(path, read_only=True)) as connection:
        rows = connection.execute(
            "SELECT tbl_name, count(*) FROM sqlite_master WHERE type IN ('table', 'index')"
            " AND tbl_name IN ('traces', 'trace_sessions') GROUP BY tbl_name"
        ).fetchall()
    return dict(rows)


def files(args: argparse.Namespace) -> tuple[Path, Path]:
    """The legacy file and the finalized head file, given or generated (same seed: the same rows)."""
    if args.legacy and args.head:
        return Path(args.legacy), Path(args.head)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = scale_name(args.traces)
    made = []
    for schema in ("legacy", "head"):
        path = workdir / f"write-{schema}-{name}.db"
        if not path.exists():
            print(f"generating {path} ({args.traces:,} traces, {schema} schema)", file=sys.stderr, flush=True)
            partial = path.with_suffix(".partial")
            remove_db(partial)
            generate(partial, schema=schema, payload_bytes=args.payload_bytes, **data_options(args.traces, args.seed))
            if schema == "head":
                finalize(f"sqlite:///{partial}")
            partial.rename(path)
        made.append(path)
    return made[0], made[1]


def interleave(writers: dict[str, Writer], batches: Sequence[list[TraceContext]]) -> dict[str, dict[str, float]]:
    """Each writer stores every batch; the order alternates batch by batch. Wall and CPU seconds per writer."""
    wall = {name: 0.0 for name in writers}
    cpu = {name: 0.0 for name in writers}
    per_batch: dict[str, list[float]] = {name: [] for name in writers}
    names = list(writers)
    gc.collect()
    for index, batch in enumerate(batches):
        for name in names if index % 2 == 0 else reversed(names):
            started, started_cpu = time.perf_counter(), time.thread_time()
            writers[name](batch)
            took = time.perf_counter() - started
            cpu[name] += time.thread_time() - started_cpu
            wall[name] += took
            per_batch[name].append(took)
    count = sum(len(batch) for batch in batches)
    return {
        name: {
            "traces_per_s": count / wall[name],
            "median_batch_ms": statistics.median(per_batch[name]) * 1e3,
            "cpu_us_per_trace": cpu[name] / count * 1e6,
        }
        for name in writers
    }


def sqlite_run(
    legacy: Path, head: Path, batches: list[list[TraceContext]], workdir: Path, *, in_place: bool
) -> dict[str, Any]:
    """One run on fresh copies of the two files, or (in_place, for files too big to copy) into the files."""
    if not in_place:
        legacy = copy_db(legacy, workdir / "write-run-legacy.db")
        head = copy_db(head, workdir / "write-run-store.db")
    os.sync()  # the copies' dirty pages would otherwise be written back inside some writer's first fsync
    try:
        with closing(connect(legacy)) as connection, TraceStore(f"sqlite:///{head}") as store:
            writers = {"legacy": plain_writer(connection, junction_time=False), "store": store.store_batch}
            return interleave(writers, batches)
    finally:
        if not in_place:
            remove_db(legacy)
            remove_db(head)


@contextmanager
def databases(names: Sequence[str]) -> Iterator[dict[str, URL]]:
    """Fresh databases at head on the server of $TRACESTORE_PG_URL, dropped afterwards."""
    server, why = server_url()
    if server is None:
        raise SystemExit(why)
    made = {name: server.set(database=f"tracestore_write_{name}") for name in names}
    with closing(psycopg.connect(**conninfo(server), autocommit=True)) as admin:
        for url in made.values():
            admin.execute(f"DROP DATABASE IF EXISTS {url.database}")
            admin.execute(f"CREATE DATABASE {url.database}")
        try:
            for url in made.values():
                upgrade(url.render_as_string(hide_password=False))
                finalize(url.render_as_string(hide_password=False))
            yield made
        finally:
            for url in made.values():
                admin.execute(f"DROP DATABASE IF EXISTS {url.database} WITH (FORCE)")


def copy_writer(connection: psycopg.Connection[Any]) -> Writer:
    """The raw floor: COPY of both tables, one transaction per batch (no conflict handling: new rows only)."""

    def write(batch: list[TraceContext]) -> None:
        with connection.transaction(), connection.cursor() as cursor:
            with cursor.copy(f"COPY traces ({', '.join(TRACE_COLUMNS)}) FROM STDIN") as copy:
                for trace in batch:
                    copy.write_row(tuple(encoded(trace).values()))
            with cursor.copy(f"COPY trace_sessions ({', '.join(LINK_COLUMNS)}) FROM STDIN") as copy:
                for trace in batch:
                    for uid in trace.session_uids:
                        copy.write_row((trace.id, uid, trace.created_at))

    return write


def unnest_writer(connection: psycopg.Connection[Any]) -> Writer:
    """The store's own statements (one array per column, unnest on the server) run raw in psycopg."""
    insert, _, link = (compiled(stmt, PSYCOPG) for stmt in statements_for("postgresql").write_statements)

    def write(batch: list[TraceContext]) -> None:
        traces = [tuple(encoded(trace).values()) for trace in batch]
        links = [(trace.id, uid, trace.created_at) for trace in batch for uid in trace.session_uids]
        with connection.transaction(), connection.cursor() as cursor:
            for args in insert.args_arrays(TRACE_COLUMNS, traces):
                cursor.execute(insert.sql, args)
            for args in link.args_arrays(LINK_COLUMNS, links):
                cursor.execute(link.sql, args)

    return write


def postgresql_run(batches: list[list[TraceContext]]) -> dict[str, Any]:
    """store_batch against raw COPY and against the store's statements run raw, each into its own database."""
    with databases(["store", "copy", "unnest"]) as urls:
        raw = {name: psycopg.connect(**conninfo(urls[name])) for name in ("copy", "unnest")}
        store = TraceStore(urls["store"].render_as_string(hide_password=False))
        try:
            return interleave(
                {"store": store.store_batch, "copy": copy_writer(raw["copy"]), "unnest": unnest_writer(raw["unnest"])},
                batches,
            )
        finally:
            store.close()
            for connection in raw.values():
                connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--traces", type=parse_scale, default=parse_scale("1m"), help="size of the files (1m, 10m)")
    parser.add_argument("--legacy", help="a legacy-schema file to copy instead of generating one")
    parser.add_argument("--head", help="a finalized file at head holding the same rows as --legacy")
    parser.add_argument("--write-traces", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3, help="whole runs on fresh copies (median ratio)")
    parser.add_argument("--uuid4-ids", action="store_true", help="random trace ids instead of the store's own")
    parser.add_argument("--sessions", type=int, default=500, help="other sessions the new traces go into")
    parser.add_argument("--payload-bytes", type=int, default=300)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    parser.add_argument("--in-place", action="store_true", help="write into the files instead of fresh copies")
    parser.add_argument("--postgresql", action="store_true", help="the PostgreSQL comparison instead")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    runs = []
    for run in range(args.runs):
        traces = fresh_traces(
            args.write_traces,
            start=NOW + 10 + run * 1e6,
            seed=args.seed + 1 + run,
            hot_uid=HOT_UID,
            sessions=args.sessions,
            uuid4_ids=args.uuid4_ids,
        )
        batches = [traces[i : i + args.batch_size] for i in range(0, len(traces), args.batch_size)]
        if args.postgresql:
            result = postgresql_run(batches)
            base = result["copy"]["traces_per_s"]
            line = ", ".join(
                f"{name} {r['traces_per_s']:,.0f}/s ({r['traces_per_s'] / base:.2f}x COPY)"
                for name, r in result.items()
            )
        else:
            legacy, head = files(args)
            result = sqlite_run(legacy, head, batches, Path(args.workdir), in_place=args.in_place)
            ratio = result["store"]["traces_per_s"] / result["legacy"]["traces_per_s"]
            result["ratio"] = ratio
            line = (
                f"store {result['store']['traces_per_s']:,.0f}/s, legacy {result['legacy']['traces_per_s']:,.0f}/s:"
                f" {ratio:.3f}x (cpu {result['store']['cpu_us_per_trace']:.1f} vs"
                f" {result['legacy']['cpu_us_per_trace']:.1f} us/trace)"
            )
        runs.append(result)
        print(f"run {run + 1}: {line}", flush=True)
    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    if not args.postgresql:
        legacy, head = files(args)
        report["btrees"] = {"legacy": btrees(legacy), "store": btrees(head)}
        report["median_ratio"] = statistics.median(r["ratio"] for r in runs)
        trees = report["btrees"]
        print(f"b-trees written per trace (table + indexes): legacy {trees['legacy']}, store {trees['store']}")
        ratio = report["median_ratio"]
        print(f"store_batch / legacy INSERTs, median of {len(runs)} runs: {ratio:.3f}x (target >= 1.0x)")
    if args.json:
        import json

        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
