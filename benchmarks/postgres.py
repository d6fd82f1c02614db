"""The PostgreSQL column: the legacy file's rows in a legacy PostgreSQL database, a copy upgraded by the
migrations, and the store measured there against raw psycopg / asyncpg and against the legacy query.

The server is TRACESTORE_PG_URL's (scripts/with-postgres starts a throwaway cluster and sets it). Two
databases are created on it for one run and dropped at the end:
  1. legacy: LEGACY_TABLES_DDL_POSTGRESQL, the SQLite legacy file's rows in its rowid (= creation) order by
     COPY, then LEGACY_INDEXES_DDL and VACUUM (ANALYZE);
  2. migrated: CREATE DATABASE ... TEMPLATE legacy (a file copy), upgraded by tracestore.migrate.upgrade
     (timed), finalized, then VACUUM (ANALYZE): the backfill updated every link, and until (auto)vacuum
     runs each index entry costs a heap visit (the plan before VACUUM is kept to show it).
Then, variants interleaved round by round (common.interleaved), medians on a warm cache:
  a. the sync store (psycopg) against raw psycopg running the same SQL text the store compiles, decoded the
     same way (autocommit: one round trip; the store's pool adds BEGIN and a ROLLBACK on return, shown by a
     third variant);
  b. the async store (asyncpg) against the same floor, and against raw asyncpg on the asyncpg-compiled text;
  c. the legacy query on the legacy database against the store on the migrated one, also with each trace's
     session list added (the store's answer, which the legacy query never returned);
and EXPLAIN (ANALYZE, BUFFERS) of each query, plus what psycopg's prepared statements ran (custom or
generic plans) in the timed loops.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
from common import HOT_UID, LATEST, WINDOW_S, Line, Timing, interleaved, interleaved_async, mb, ratio_line
from floor import LEGACY_LATEST_SQL, LEGACY_WINDOW_SQL, Row, as_rows, compiled_sql, decode, decode_legacy
from sqlalchemy import URL, make_url
from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect

from tracestore import AsyncTraceStore, TraceStore
from tracestore.migrate import finalize, upgrade
from tracestore.testing.bulk import LEGACY_INDEXES_DDL, LEGACY_TABLES_DDL_POSTGRESQL, GenerateReport

PG_URL_VARIABLE = "TRACESTORE_PG_URL"
PSYCOPG = psycopg_dialect.dialect()
ASYNCPG = asyncpg_dialect.dialect()
# The legacy implementation's query (floor.py) with psycopg's placeholders.
LEGACY_WINDOW_PG = LEGACY_WINDOW_SQL.replace("?", "%s")
LEGACY_LATEST_PG = LEGACY_LATEST_SQL.replace("?", "%s")
# The legacy query returning what the store returns: each trace's session list, read as the store reads it
# (one probe of the junction's primary key per trace), so the two differ only in how they find the traces.
SESSION_LIST_PG = "(SELECT CAST(json_agg(s.session_uid) AS TEXT) FROM trace_sessions AS s WHERE s.trace_id = t.id)"
LEGACY_WINDOW_LISTS_PG = LEGACY_WINDOW_PG.replace("SELECT t.*", f"SELECT t.*, {SESSION_LIST_PG}", 1)
LEGACY_LATEST_LISTS_PG = LEGACY_LATEST_PG.replace("SELECT t.*", f"SELECT t.*, {SESSION_LIST_PG}", 1)
TRACE_COLUMNS = "id, context_type, namespace, data, metadata, created_at, updated_at"
# What the figures depend on, saved with them.
SETTINGS = (
    "server_version",
    "shared_buffers",
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "jit",
    "plan_cache_mode",
    "random_page_cost",
    "max_parallel_workers_per_gather",
    "lc_collate",
)
HOT_FOR_TARGETS = 1_000_000  # the legacy / store targets are set for a hot session of ~1M traces

Log = Callable[[str], None]


def server_url() -> tuple[URL | None, str]:
    """The server to use, or None and one line saying why there is none."""
    value = os.environ.get(PG_URL_VARIABLE)
    if not value:
        return None, f"{PG_URL_VARIABLE} is not set (run under scripts/with-postgres, as make bench does)"
    url = make_url(value)
    try:
        with closing(psycopg.connect(**conninfo(url), connect_timeout=10)):
            pass
    except psycopg.Error as exc:
        return None, f"cannot connect to {url.render_as_string(hide_password=True)}: {exc}".splitlines()[0]
    return url, ""


def conninfo(url: URL, database: str | None = None) -> dict[str, Any]:
    """psycopg.connect() keywords for a SQLAlchemy URL (host and port may sit in the query: Unix sockets)."""
    query = dict(url.query)
    params = {
        "host": url.host or query.get("host"),
        "port": url.port or query.get("port"),
        "user": url.username,
        "password": url.password,
        "dbname": database or url.database,
    }
    return {name: value for name, value in params.items() if value is not None}


class PostgresBench:
    """One run of the PostgreSQL part; `out`, `lines` and `problems` are merged into the bench's results."""

    def __init__(self, server: URL, *, runs: int, legacy_runs: int, log: Log) -> None:
        self.server = server
        self.now = 0.0
        self.sqlite_ids: dict[str, list[str]] = {}
        self.runs, self.legacy_runs = runs, legacy_runs
        self.log = log
        self.lines: list[Line] = []
        self.problems: list[str] = []
        self.out: dict[str, Any] = {"runs": runs, "legacy_runs": legacy_runs, "timings": {}, "plans": {}}
        prefix = f"tracestore_bench_{os.getpid()}"
        self.legacy_db, self.migrated_db = f"{prefix}_legacy", f"{prefix}_migrated"

    def same(self, what: str, got: Any, want: Any) -> None:
        if got != want:
            self.problems.append(f"postgresql, {what}: results differ ({len(got)} vs {len(want)} rows)")

    def url(self, database: str, driver: str = "psycopg") -> str:
        return self.server.set(drivername=f"postgresql+{driver}", database=database).render_as_string(
            hide_password=False
        )

    def connect(self, database: str, *, autocommit: bool = True) -> psycopg.Connection[Any]:
        return psycopg.connect(**conninfo(self.server, database), autocommit=autocommit)

    @contextmanager
    def admin(self) -> Iterator[psycopg.Connection[Any]]:
        with closing(psycopg.connect(**conninfo(self.server), autocommit=True)) as connection:
            yield connection

    def run(self, legacy_file: Path, data: GenerateReport) -> None:
        """Build both databases, measure, and drop them (also when something fails)."""
        self.now = data.now
        try:
            self.settings()
            self.load_legacy(legacy_file, data)
            self.migrate()
            self.sync_queries(data)
            self.async_queries(data)
            self.sizes()
        finally:
            self.drop()

    def settings(self) -> None:
        with self.admin() as connection:
            self.out["server"] = {name: connection.execute(f"SHOW {name}").fetchone()[0] for name in SETTINGS}  # type: ignore[index]
        self.log(f"postgresql: server {self.out['server']['server_version']}, shared_buffers "
                 f"{self.out['server']['shared_buffers']}, fsync {self.out['server']['fsync']}")  # fmt: skip

    # 1. the legacy database, with the SQLite legacy file's rows
    def load_legacy(self, legacy_file: Path, data: GenerateReport) -> None:
        self.drop()
        with self.admin() as admin:
            admin.execute(f'CREATE DATABASE "{self.legacy_db}"')
        self.log(f"postgresql: COPY {data.traces:,} traces and {data.links:,} links from {legacy_file.name}")
        timings: dict[str, float] = {}
        source = sqlite3.connect(f"file:{legacy_file}?mode=ro", uri=True)
        with closing(source), self.connect(self.legacy_db) as connection:
            # The load's own sort memory, as the SQLite generator gives its index builds a big cache.
            connection.execute("SET maintenance_work_mem = '512MB'")
            started = time.perf_counter()
            connection.execute(LEGACY_TABLES_DDL_POSTGRESQL)
            with connection.transaction(), connection.cursor() as cursor:
                for table, columns in (("traces", TRACE_COLUMNS), ("trace_sessions", "trace_id, session_uid")):
                    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                        for row in source.execute(f"SELECT {columns} FROM {table} ORDER BY rowid"):
                            copy.write_row(row)
            timings["copy_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            connection.execute(LEGACY_INDEXES_DDL)
            timings["index_seconds"] = time.perf_counter() - started
            started = time.perf_counter()
            # Visibility map and hint bits set, statistics taken: a long-running database's steady state.
            connection.execute("VACUUM (ANALYZE)")
            timings["vacuum_seconds"] = time.perf_counter() - started
            counts = connection.execute(
                "SELECT (SELECT count(*) FROM traces), (SELECT count(*) FROM trace_sessions)"
            ).fetchone()
            # The answers the PostgreSQL databases must give: the legacy query's on the SQLite file itself.
            since = data.now - WINDOW_S
            self.sqlite_ids = {
                name: [row[0] for row in source.execute(sql, params)]
                for name, sql, params in (
                    ("window", LEGACY_WINDOW_SQL, (HOT_UID, since)),
                    ("latest", LEGACY_LATEST_SQL, (HOT_UID, LATEST)),
                )
            }
        if counts != (data.traces, data.links):
            self.problems.append(f"postgresql: loaded {counts}, the SQLite file holds {(data.traces, data.links)}")
        self.out["load"] = timings

    # 2. the migrated copy
    def migrate(self) -> None:
        with self.admin() as admin:
            version = admin.info.server_version
            strategy = " STRATEGY = FILE_COPY" if version >= 150000 else ""  # 15's default logs every page
            started = time.perf_counter()
            admin.execute(f'CREATE DATABASE "{self.migrated_db}" TEMPLATE "{self.legacy_db}"{strategy}')
            template_seconds = time.perf_counter() - started
        url = self.url(self.migrated_db)
        self.log("postgresql: upgrading the copy to head")
        started = time.perf_counter()
        reports = upgrade(url)
        seconds = time.perf_counter() - started
        started = time.perf_counter()
        finalize(url)
        finalize_seconds = time.perf_counter() - started
        backfill = reports.get("backfill")
        index = reports.get("index") or {}
        # Before VACUUM: the backfill's new link versions are not yet all-visible.
        with self.connect(self.migrated_db) as connection:
            for name, args in self.store_queries().items():
                sql, params = compiled_sql(PSYCOPG, session_uid=HOT_UID, **args)
                self.out["plans"][f"store {name}, right after the upgrade (before VACUUM)"] = explain(
                    connection, sql, params
                )
            started = time.perf_counter()
            connection.execute("VACUUM (ANALYZE)")
            vacuum_seconds = time.perf_counter() - started
        self.out["upgrade"] = {
            "template_copy_seconds": template_seconds,
            "seconds": seconds,
            "backfill_seconds": getattr(backfill, "seconds", None),
            "backfill_rows": getattr(backfill, "rows_updated", None),
            "index_seconds": index.get("index_seconds"),
            "analyze_seconds": index.get("analyze_seconds"),
            "finalize_seconds": finalize_seconds,
            "vacuum_seconds": vacuum_seconds,
        }
        self.log(f"postgresql: upgrade {seconds:.1f} s, VACUUM (ANALYZE) {vacuum_seconds:.1f} s")

    def store_queries(self) -> dict[str, dict[str, Any]]:
        since = self.now - WINDOW_S
        return {"window": {"since": since}, "latest": {"limit": LATEST}}

    # 3a + 3c. sync store vs raw psycopg vs the legacy query
    def sync_queries(self, data: GenerateReport) -> None:
        runs, legacy_runs = self.runs, self.legacy_runs
        since = data.now - WINDOW_S
        legacy_sql = {"window": (LEGACY_WINDOW_PG, (HOT_UID, since)), "latest": (LEGACY_LATEST_PG, (HOT_UID, LATEST))}
        legacy_lists = {"window": LEGACY_WINDOW_LISTS_PG, "latest": LEGACY_LATEST_LISTS_PG}
        timings: dict[str, dict[str, Timing]] = {}
        with (
            self.connect(self.migrated_db) as raw,
            self.connect(self.migrated_db, autocommit=False) as raw_tx,
            self.connect(self.legacy_db) as old,
            TraceStore(self.url(self.migrated_db), auto_upgrade=False) as store,
        ):
            for name, args in self.store_queries().items():
                sql, params = compiled_sql(PSYCOPG, session_uid=HOT_UID, **args)
                old_sql, old_params = legacy_sql[name]
                new: dict[str, Callable[[], Any]] = {
                    "store": functools.partial(store.get_by_session_uid, HOT_UID, **args),
                    "raw": raw_psycopg(raw, sql, params),
                    "raw-sql": fetch_only(raw, sql, params),
                    "raw-tx": raw_psycopg(raw_tx, sql, params, rollback=True),
                }
                before: dict[str, Callable[[], Any]] = {
                    "legacy": legacy_psycopg(old, old_sql, old_params),
                    "legacy-sql": fetch_only(old, old_sql, old_params),
                    "legacy-lists": raw_psycopg(old, legacy_lists[name], old_params),
                    "store": new["store"],
                    "raw-sql": new["raw-sql"],
                }
                rows = as_rows(new["store"]())
                self.same(f"store vs raw, {name}", rows, new["raw"]())
                self.same(f"store vs legacy, {name}", [r[0] for r in rows], [r[0] for r in before["legacy"]()])
                self.same(f"store vs legacy with session lists, {name}", rows, before["legacy-lists"]())
                self.same(f"store vs the SQLite legacy file, {name}", [r[0] for r in rows], self.sqlite_ids[name])
                self.out.setdefault("rows", {})[name] = len(rows)

                self.log(f"postgresql {name}: sync store vs raw psycopg, {runs} interleaved rounds")
                timings[f"sync {name}"] = interleaved(new, runs=runs, warmup=5)
                self.log(f"postgresql {name}: legacy query vs the store, {legacy_runs} interleaved rounds")
                timings[f"legacy {name}"] = interleaved(before, runs=legacy_runs, warmup=2)
                self.out["plans"][f"store {name}"] = explain(raw, sql, params)
                self.out["plans"][f"legacy {name}"] = explain(old, old_sql, old_params)
                self.out["plans"][f"legacy {name}, with session lists"] = explain(old, legacy_lists[name], old_params)
            timings["legacy other"] = self.other_session(store, raw, old)
            # psycopg prepares a statement after 5 executions; say which plans the timed loops ran.
            with store.engine.connect() as pooled:  # the connection the store's reads used
                store_prepared = prepared_plans(pooled.connection.dbapi_connection)  # type: ignore[arg-type]
            self.out["prepared"] = {"store": store_prepared, "raw": prepared_plans(raw), "legacy": prepared_plans(old)}
        if self.out["rows"]["window"] != data.burst_traces:
            self.problems.append(f"postgresql window returned {self.out['rows']['window']} rows")
        self.out["timings"].update(timings)

        window, latest = timings["sync window"], timings["sync latest"]
        old_window, old_latest = timings["legacy window"], timings["legacy latest"]
        window_line = ratio_line(
            f"legacy / new, 10-min window (hot session {data.hot_traces:,})",
            old_window["legacy"],
            old_window["store"],
            100.0,
            at_least=True,
        )
        latest_line = ratio_line(
            f"legacy / new, latest {LATEST}", old_latest["legacy"], old_latest["store"], 500.0, at_least=True
        )
        other = self.out["other_session"]
        legacy_lines = [
            window_line,
            ratio_line("  legacy / new, SQL only (fetchall)", old_window["legacy-sql"], old_window["raw-sql"]),
            ratio_line("  legacy returning session lists too / new", old_window["legacy-lists"], old_window["store"]),
            latest_line,
            ratio_line("  legacy / new, SQL only (fetchall)", old_latest["legacy-sql"], old_latest["raw-sql"]),
            ratio_line("  legacy returning session lists too / new", old_latest["legacy-lists"], old_latest["store"]),
            ratio_line(f"legacy / new, latest {LATEST} of the next largest session ({other['traces']:,} traces)",
                       timings["legacy other"]["legacy"], timings["legacy other"]["store"]),
        ]  # fmt: skip
        if data.hot_traces < HOT_FOR_TARGETS:
            for line in (window_line, latest_line):
                line.target, line.ok = f"{line.target} (n/a: hot < 1M)", None
        self.lines += [
            ratio_line(f"sync store / raw psycopg, 10-min window ({self.out['rows']['window']} rows)", window["store"],
                       window["raw"], 1.2),
            ratio_line("  raw: SQL only (fetchall) / with decode", window["raw-sql"], window["raw"]),
            ratio_line("  raw in a transaction (BEGIN, ROLLBACK) / autocommit", window["raw-tx"], window["raw"]),
            ratio_line(f"sync store / raw psycopg, latest {LATEST}", latest["store"], latest["raw"], 1.5),
            ratio_line("  raw: SQL only (fetchall) / with decode", latest["raw-sql"], latest["raw"]),
            ratio_line("  raw in a transaction (BEGIN, ROLLBACK) / autocommit", latest["raw-tx"], latest["raw"]),
            *legacy_lines,
        ]  # fmt: skip

    def other_session(
        self, store: TraceStore, raw: psycopg.Connection[Any], old: psycopg.Connection[Any]
    ) -> dict[str, Timing]:
        """Latest 100 of the largest session after the hot one: legacy query vs store.

        The hot session's newest traces are the newest of the whole table (its burst), which suits the plan
        PostgreSQL picks for the legacy query: walk idx_traces_created_at backwards, probe the junction's
        primary key for each trace. This session's traces are spread over the whole month.
        """
        uid, traces = old.execute(
            "SELECT session_uid, count(*) FROM trace_sessions WHERE session_uid <> %s"
            " GROUP BY session_uid ORDER BY count(*) DESC, session_uid LIMIT 1",
            (HOT_UID,),
        ).fetchone()  # type: ignore[misc]
        self.out["other_session"] = {"uid": uid, "traces": traces}
        old_sql, old_params = LEGACY_LATEST_PG, (uid, LATEST)
        variants: dict[str, Callable[[], Any]] = {
            "legacy": legacy_psycopg(old, old_sql, old_params),
            "store": functools.partial(store.get_by_session_uid, uid, limit=LATEST),
        }
        rows = variants["store"]()
        self.same(
            "store vs legacy, the next largest session", [t.id for t in rows], [r[0] for r in variants["legacy"]()]
        )
        self.log(f"postgresql: latest {LATEST} of session {uid} ({traces:,} traces), legacy query vs the store")
        timings = interleaved(variants, runs=self.legacy_runs, warmup=2)
        self.out["plans"]["store latest, next largest session"] = explain(
            raw, *compiled_sql(PSYCOPG, session_uid=uid, limit=LATEST)
        )
        self.out["plans"]["legacy latest, next largest session"] = explain(old, old_sql, old_params)
        return timings

    # 3b. async store vs the same floor, and vs raw asyncpg
    def async_queries(self, data: GenerateReport) -> None:
        runs = self.runs

        async def measure(raw: psycopg.Connection[Any]) -> dict[str, dict[str, Timing]]:
            timings = {}
            native = await asyncpg.connect(**asyncpg_args(self.server, self.migrated_db))
            try:
                async with AsyncTraceStore(self.url(self.migrated_db, "asyncpg"), auto_upgrade=False) as store:
                    for name, args in self.store_queries().items():
                        sql, params = compiled_sql(PSYCOPG, session_uid=HOT_UID, **args)
                        native_sql, native_params = compiled_sql(ASYNCPG, session_uid=HOT_UID, **args)
                        assert isinstance(native_params, tuple)
                        variants: dict[str, Callable[[], Any]] = {
                            "async": functools.partial(store.get_by_session_uid, HOT_UID, **args),
                            "raw": raw_psycopg(raw, sql, params),
                            "raw-asyncpg": functools.partial(raw_asyncpg, native, native_sql, native_params),
                        }
                        floor = variants["raw"]()
                        self.same(f"async store vs raw, {name}", as_rows(await variants["async"]()), floor)
                        self.same(f"raw asyncpg vs raw psycopg, {name}", await variants["raw-asyncpg"](), floor)
                        self.log(f"postgresql {name}: async store vs raw psycopg and raw asyncpg, {runs} rounds")
                        timings[f"async {name}"] = await interleaved_async(variants, runs=runs, warmup=5)
            finally:
                await native.close()
            return timings

        with self.connect(self.migrated_db) as raw:
            timings = asyncio.run(measure(raw))
        self.out["timings"].update(timings)
        window, latest = timings["async window"], timings["async latest"]
        self.lines += [
            ratio_line("async store / raw psycopg, 10-min window", window["async"], window["raw"], 1.4),
            ratio_line("  async store / raw asyncpg (same SQL)", window["async"], window["raw-asyncpg"]),
            ratio_line(f"async store / raw psycopg, latest {LATEST}", latest["async"], latest["raw"], 2.5),
            ratio_line("  async store / raw asyncpg (same SQL)", latest["async"], latest["raw-asyncpg"]),
        ]

    def sizes(self) -> None:
        with self.admin() as admin:
            legacy, migrated = (
                admin.execute("SELECT pg_database_size(%s)", (name,)).fetchone()[0]  # type: ignore[index]
                for name in (self.legacy_db, self.migrated_db)
            )
        self.out["sizes"] = {"legacy_bytes": legacy, "migrated_bytes": migrated}
        upgrade_info = self.out["upgrade"]
        self.lines += [
            Line("upgrade legacy -> head (alembic)", f"{upgrade_info['seconds']:.1f} s",
                 f"backfill {upgrade_info['backfill_seconds'] or 0:.1f} s"),
            Line("  then VACUUM (ANALYZE)", f"{upgrade_info['vacuum_seconds']:.1f} s"),
            Line("database size migrated / legacy (after VACUUM)", mb(migrated), mb(legacy), migrated / legacy),
        ]  # fmt: skip

    def drop(self) -> None:
        with suppress(psycopg.Error), self.admin() as admin:
            for name in (self.migrated_db, self.legacy_db):
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- the floors ------------------------------------------------------------------------------------
def raw_psycopg(
    connection: psycopg.Connection[Any], sql: str, params: Any, *, rollback: bool = False
) -> Callable[[], list[Row]]:
    """The floor: the store's SQL on a plain psycopg connection, a cursor per read (as the store does),
    decoded as the store decodes. `rollback`: end each read's transaction as SQLAlchemy's pool does."""

    def run() -> list[Row]:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            rows = decode(cursor.fetchall())
        if rollback:
            connection.rollback()
        return rows

    return run


def legacy_psycopg(connection: psycopg.Connection[Any], sql: str, params: Any) -> Callable[[], list[Row]]:
    """The legacy query, decoded like the store's rows (generous to legacy: no session list)."""
    return lambda: decode_legacy(connection.execute(sql, params).fetchall())


def fetch_only(connection: psycopg.Connection[Any], sql: str, params: Any) -> Callable[[], list[Any]]:
    """Only the server's and the driver's share: execute and fetch, no decoding."""
    return lambda: connection.execute(sql, params).fetchall()


async def raw_asyncpg(connection: asyncpg.Connection, sql: str, params: Row) -> list[Row]:
    return decode(await connection.fetch(sql, *params))


def asyncpg_args(url: URL, database: str) -> dict[str, Any]:
    args = conninfo(url, database)
    args["database"] = args.pop("dbname")
    if "port" in args:
        args["port"] = int(args["port"])
    return args


def explain(connection: psycopg.Connection[Any], sql: str, params: Any) -> list[str]:
    """EXPLAIN (ANALYZE, BUFFERS) with the query's own values (a custom plan), one line per plan line."""
    return [row[0] for row in connection.execute(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", params)]


def prepared_plans(connection: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """The connection's prepared statements and how many generic and custom plans each ran (PostgreSQL 14+)."""
    rows = connection.execute(
        "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements ORDER BY prepare_time"
    ).fetchall()
    return [
        {"statement": " ".join(statement.split()), "generic_plans": generic, "custom_plans": custom}
        for statement, generic, custom in rows
    ]
