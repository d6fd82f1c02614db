"""get_by_session_uids against the number of sessions: first-call latency, warm latency, memory held.

    .venv/bin/python benchmarks/sessions_query.py                        # SQLite, 100,000 traces
    scripts/with-postgres .venv/bin/python benchmarks/sessions_query.py  # and PostgreSQL
    .venv/bin/python benchmarks/sessions_query.py --traces 20000 --runs 11 --json out.json

One data set (`tracestore.testing.bulk.generate`, head schema; kept in benchmarks/scratch/ and reused),
copied into a PostgreSQL database when TRACESTORE_PG_URL names a server. The sessions of a query of n
sessions are the n largest (the hot one first); every read asks for the latest 100 (`--limit`).

1. First call: in a new process, after single-session reads of the same n sessions have warmed the
   connection and the page cache, the first get_by_session_uids of n sessions (what a statement shape
   costs the first time it is seen: building, compiling, planning, reading) and the second (the same,
   cached). Median of `--first-runs` processes.
2. Warm: the same calls in one process, the counts taking turns round by round, medians.
3. Memory: in a new process, the 200 sessions read one at a time first (SQLite's page cache is the
   process's memory), then RSS before and after one call with each count 1 .. 200 (1 .. 120 noted on
   the way), and after clearing the statement caches: what a long-running service keeps.
4. The statement against the previous design's (one UNION arm per session, rebuilt here as it was),
   both run raw on the driver with the same decoding, interleaved, at 10 sessions x latest 100 and a
   few other shapes; results compared row for row. Then a query of MAX_SESSIONS sessions (every
   session of the data set, padded with ids that match nothing). Skipped on a checkout without the
   new statement, so the same script measures the code before the change.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from common import DEFAULT_WORKDIR, NOW, interleaved
from sqlalchemy import create_engine, make_url

from tracestore import TraceStore
from tracestore.migrate import finalize, upgrade
from tracestore.queries import Statements, compiled, statements_for
from tracestore.rows import decode_rows
from tracestore.testing.bulk import generate

COUNTS = (1, 10, 100, 500)
MEMORY_COUNTS = 200
MEMORY_NOTE = 120
PG_DATABASE = f"tracestore_bench_sessions_{os.getpid()}"


# -- helpers shared with the child processes -------------------------------------------------------------------
def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def clear_statement_caches() -> None:
    """Every cache of built or compiled statements the store's read path fills."""
    compiled.cache_clear()
    Statements.sessions_traces.cache_clear()
    statements_for.cache_clear()


def child(mode: str, url: str, sessions_file: str, limit: int, count: int) -> None:
    """Run in a new process: print one JSON object with what `mode` measured."""
    sessions = json.loads(Path(sessions_file).read_text())
    with TraceStore(url, auto_upgrade=False) as store:
        # The connection, and the pages of every session the calls read (one session at a time, through
        # another statement): what is left to a first call is its statement's own cost.
        for uid in sessions[:count]:
            store.get_by_session_uid(uid, limit=limit)
        if mode == "first":
            timings = []
            for _ in range(2):
                started = time.perf_counter()
                store.get_by_session_uids(sessions[:count], limit=limit)
                timings.append((time.perf_counter() - started) * 1000)
            print(json.dumps({"first_ms": timings[0], "second_ms": timings[1]}))
            return
        store.get_by_session_uids(sessions[:1], limit=limit)
        gc.collect()
        before = rss_mb()
        out: dict[str, float] = {"before_mb": before}
        started = time.perf_counter()
        for n in range(1, count + 1):
            store.get_by_session_uids(sessions[:n], limit=limit)
            if n == MEMORY_NOTE:
                gc.collect()
                out[f"after_1_{n}_mb"] = rss_mb()
        out["seconds"] = time.perf_counter() - started
        gc.collect()
        out[f"after_1_{count}_mb"] = rss_mb()
        clear_statement_caches()
        gc.collect()
        out["after_clearing_caches_mb"] = rss_mb()
        print(json.dumps(out))


def run_child(mode: str, url: str, sessions_file: Path, limit: int, count: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", mode, url, str(sessions_file), str(limit), str(count)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# -- the data ------------------------------------------------------------------------------------------------------
def sqlite_file(workdir: Path, traces: int) -> Path:
    path = workdir / f"sessions-{traces}.db"
    if not path.exists():
        print(f"generating {traces:,} traces into {path}", flush=True)
        generate(path, traces=traces, schema="head", seed=1, now=NOW)
    return path


def largest_sessions(path: Path, count: int) -> list[str]:
    import sqlite3

    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as connection:
        rows = connection.execute(
            "SELECT session_uid FROM trace_sessions GROUP BY session_uid ORDER BY count(*) DESC, session_uid LIMIT ?",
            (count,),
        )
        return [uid for (uid,) in rows]


def postgresql_copy(server: str, path: Path) -> str:
    """A PostgreSQL database at head holding the SQLite file's rows; its URL."""
    import sqlite3

    import psycopg

    admin = create_engine(make_url(server).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"CREATE DATABASE {PG_DATABASE} TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'")
    admin.dispose()
    url = make_url(server).set(drivername="postgresql+psycopg", database=PG_DATABASE)
    rendered = url.render_as_string(hide_password=False)
    upgrade(rendered)
    finalize(rendered)
    print(f"postgresql: copying {path.name}", flush=True)
    conninfo = {"host": url.host or url.query.get("host"), "port": url.port or url.query.get("port")}
    conninfo |= {"user": url.username, "password": url.password, "dbname": PG_DATABASE}
    connect: dict[str, Any] = {name: value for name, value in conninfo.items() if value is not None}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as source, psycopg.connect(**connect) as target:
        cursor = target.cursor()
        for table, columns in (
            ("traces", "id, context_type, namespace, data, metadata, created_at, updated_at"),
            ("trace_sessions", "trace_id, session_uid, created_at"),
        ):
            with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                for row in source.execute(f"SELECT {columns} FROM {table} ORDER BY rowid"):
                    copy.write_row(row)
    with psycopg.connect(**connect, autocommit=True) as target:
        target.execute("VACUUM ANALYZE")  # statistics and the visibility map, as autovacuum would leave them
    return rendered


def drop_postgresql(server: str) -> None:
    admin = create_engine(make_url(server).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {PG_DATABASE} WITH (FORCE)")
    admin.dispose()


# -- the previous design, rebuilt for the comparison --------------------------------------------------------------
def union_statement(statements: Statements, *, sessions: int, since: bool, limit: bool) -> Any:
    """The statement as it was before one list parameter replaced it: one UNION arm per session."""
    from sqlalchemy import bindparam, select, union
    from sqlalchemy.orm import aliased

    from tracestore.models import Trace, TraceSession
    from tracestore.queries import _trace_columns

    arms = []
    for i in range(sessions):
        link = aliased(TraceSession, name="ts")
        arm = select(link.created_at, link.trace_id).where(
            link.session_uid == bindparam(f"session_uid_{i}"), link.created_at.is_not(None)
        )
        if since:
            arm = arm.where(link.created_at >= bindparam("since"))
        if limit:
            arm = arm.order_by(link.created_at.desc(), link.trace_id.desc()).limit(bindparam("limit"))
        ranked = arm.subquery()
        arms.append(select(ranked.c.created_at, ranked.c.trace_id))
    candidates = union(*arms).subquery("c") if len(arms) > 1 else arms[0].subquery("c")
    keys: Any = candidates
    if limit:
        keys = (
            select(candidates.c.created_at, candidates.c.trace_id)
            .order_by(candidates.c.created_at.desc(), candidates.c.trace_id.desc())
            .limit(bindparam("limit"))
            .subquery("k")
        )
    return (
        select(*_trace_columns(statements.dialect_name))
        .select_from(keys)
        .join(Trace, Trace.id == keys.c.trace_id)
        .order_by(keys.c.created_at.desc(), keys.c.trace_id.desc())
    )


def compare_statements(store: TraceStore, sessions: list[str], *, runs: int) -> list[dict[str, Any]]:
    """Warm latency of the statement against the UNION design's, run raw on the store's own driver."""
    statements = statements_for(store.engine.dialect.name)
    shapes = [
        (10, None, 100),
        (1, None, 100),
        (100, None, 100),
        (10, None, 1000),
        (500, None, 10),
        (10, NOW - 86400, None),
    ]
    out = []
    raw = store.engine.raw_connection()
    if store.engine.dialect.name == "postgresql":
        raw.autocommit = True  # type: ignore[attr-defined]
    try:
        for count, since, limit in shapes:
            uids = sessions[:count]
            flags = {"since": since is not None, "limit": limit is not None}
            common = {name: value for name, value in (("since", since), ("limit", limit)) if value is not None}
            new_query = compiled(statements.sessions_traces(**flags), store.engine.dialect)
            new_args = new_query.args({"session_uids": statements.list_argument(uids), **common})
            old_query = compiled(union_statement(statements, sessions=len(uids), **flags), store.engine.dialect)
            old_args = old_query.args({**{f"session_uid_{i}": uid for i, uid in enumerate(uids)}, **common})

            def fetch(sql: str, args: Any) -> Callable[[], Any]:
                def run() -> Any:
                    cursor = raw.cursor()
                    try:
                        cursor.execute(sql, args)
                        return decode_rows(cursor.fetchall())
                    finally:
                        cursor.close()

                return run

            variants = {"new": fetch(new_query.sql, new_args), "union": fetch(old_query.sql, old_args)}
            if variants["new"]() != variants["union"]():
                raise SystemExit(f"{count} sessions, since {since}, limit {limit}: the two statements disagree")
            timing = interleaved(variants, runs=runs, warmup=3)
            out.append(
                {
                    "sessions": count,
                    "since": since,
                    "limit": limit,
                    "new_ms": timing["new"].median_ms,
                    "union_ms": timing["union"].median_ms,
                    "ratio": timing["new"].median_ms / timing["union"].median_ms,
                }
            )
    finally:
        raw.close()
    return out


def at_the_cap(store: TraceStore, path: Path, *, runs: int) -> dict[str, float]:
    """Warm latency of a query of MAX_SESSIONS sessions: every session of the data set, then ids that match
    nothing (one index probe each), with the latest 100 and with no limit."""
    from tracestore.core import MAX_SESSIONS

    uids = largest_sessions(path, MAX_SESSIONS)
    uids += [f"no-such-session-{i}" for i in range(MAX_SESSIONS - len(uids))]
    variants = {
        f"{MAX_SESSIONS} sessions, latest 100": lambda: store.get_by_session_uids(uids, limit=100),
        f"{MAX_SESSIONS} sessions, no limit": lambda: store.get_by_session_uids(uids),
    }
    return {name: timing.median_ms for name, timing in interleaved(variants, runs=runs, warmup=1).items()}


# -- one engine ------------------------------------------------------------------------------------------------------
def measure(name: str, url: str, sessions: list[str], sessions_file: Path, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"engine": name}
    print(f"{name}: first calls ({args.first_runs} processes per count)", flush=True)
    first: dict[int, dict[str, float]] = {}
    for count in COUNTS:
        samples = [run_child("first", url, sessions_file, args.limit, count) for _ in range(args.first_runs)]
        first[count] = {key: statistics.median(s[key] for s in samples) for key in samples[0]}
    result["first_call"] = first
    print(f"{name}: warm calls ({args.runs} rounds)", flush=True)
    with TraceStore(url, auto_upgrade=False) as store:
        variants = {
            str(count): (lambda count=count: store.get_by_session_uids(sessions[:count], limit=args.limit))  # type: ignore[misc]
            for count in COUNTS
        }
        result["warm_ms"] = {
            count: timing.median_ms for count, timing in interleaved(variants, runs=args.runs, warmup=2).items()
        }
        if hasattr(Statements, "list_argument"):
            print(f"{name}: statement against the UNION design", flush=True)
            result["against_union"] = compare_statements(store, sessions, runs=args.runs)
            result["at_the_cap"] = at_the_cap(store, args.sqlite_file, runs=max(3, args.runs // 4))
    print(f"{name}: memory over counts 1..{MEMORY_COUNTS}", flush=True)
    result["memory"] = run_child("memory", url, sessions_file, args.limit, MEMORY_COUNTS)
    return result


def report(results: list[dict[str, Any]], limit: int) -> None:
    for result in results:
        print(f"\n== {result['engine']} (latest {limit})")
        print(f"{'sessions':>9} {'first call ms':>14} {'second call ms':>15} {'warm median ms':>15}")
        for count in COUNTS:
            first = result["first_call"][count]
            warm = result["warm_ms"][str(count)]
            print(f"{count:>9} {first['first_ms']:>14.2f} {first['second_ms']:>15.2f} {warm:>15.2f}")
        memory = result["memory"]
        before = memory["before_mb"]
        growth = {key: value - before for key, value in memory.items() if key.endswith("_mb")}
        print(
            f"RSS {before:.1f} MB; +{growth[f'after_1_{MEMORY_NOTE}_mb']:.1f} MB after counts 1..{MEMORY_NOTE}, "
            f"+{growth[f'after_1_{MEMORY_COUNTS}_mb']:.1f} MB after 1..{MEMORY_COUNTS} ({memory['seconds']:.2f} s), "
            f"+{growth['after_clearing_caches_mb']:.1f} MB after clearing the caches"
        )
        for row in result.get("against_union", []):
            since = "-" if row["since"] is None else "1 day"
            shape = f"{row['sessions']} sessions, since {since}, limit {row['limit']}"
            timings = f"new {row['new_ms']:8.2f} ms  union {row['union_ms']:8.2f} ms"
            print(f"  {shape:<40} {timings}  new/union {row['ratio']:.2f}")
        for shape, median_ms in result.get("at_the_cap", {}).items():
            print(f"  {shape:<40} {median_ms:8.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=int, default=100_000)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--runs", type=int, default=21, help="rounds of the warm timings (medians)")
    parser.add_argument("--first-runs", type=int, default=3, help="processes per count for the first call")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, url, sessions_file, limit, count = args.child
        child(mode, url, sessions_file, int(limit), int(count))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    path = sqlite_file(args.workdir, args.traces)
    sessions = largest_sessions(path, max(max(COUNTS), MEMORY_COUNTS))
    sessions_file = args.workdir / f"sessions-{args.traces}.json"
    sessions_file.write_text(json.dumps(sessions))
    args.sqlite_file = path
    results = [measure("sqlite", f"sqlite:///{path}", sessions, sessions_file, args)]
    server = os.environ.get("TRACESTORE_PG_URL")
    if server:
        try:
            url = postgresql_copy(server, path)
            results.append(measure("postgresql", url, sessions, sessions_file, args))
        finally:
            drop_postgresql(server)
    else:
        print("postgresql: TRACESTORE_PG_URL is not set (run under scripts/with-postgres); skipped", flush=True)
    report(results, args.limit)
    if args.json:
        args.json.write_text(json.dumps({"traces": args.traces, "limit": args.limit, "results": results}, indent=1))


if __name__ == "__main__":
    main()
