"""Commands that make databases: generate (a legacy or head file of synthetic traces) and demo."""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from tracestore import migrate
from tracestore.cli.app import (
    LibraryError,
    ProgressBar,
    Settings,
    database_url,
    main,
    shown,
    stdout,
    url_option,
)
from tracestore.engine import create_engine, why_not_a_database
from tracestore.store import TraceStore
from tracestore.testing.bulk import SCHEMAS
from tracestore.testing.bulk import generate as bulk_generate
from tracestore.testing.values import synthetic_traces


class Count(click.ParamType):  # type: ignore[type-arg,unused-ignore]  # generic from click 8.4
    """A count with an optional k/m suffix: 20000, 100k, 1.5m."""

    name = "count"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", str(value).strip().lower())
        if not match:
            self.fail(f"{value!r} is not a count like 20000, 100k or 10m", param, ctx)
        return int(float(match[1]) * {"": 1, "k": 1_000, "m": 1_000_000}[match[2]])


@main.command(short_help="Write a SQLite file of synthetic traces, fast.")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--traces", "n_traces", type=Count(), required=True, help="How many traces: 20000, 100k, 10m.")
@click.option(
    "--schema",
    type=click.Choice(SCHEMAS),
    default="head",
    show_default=True,
    help="head: a file tracestore uses as is; legacy: what the pre-Alembic implementation wrote, for "
    "trying `tracestore upgrade`.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same rows.")
@click.option("--payload-bytes", type=click.IntRange(min=0), default=300, show_default=True)
@click.option(
    "--hot-share",
    type=click.FloatRange(0, 1),
    default=0.1,
    show_default=True,
    help="Share of traces in the hot session.",
)
@click.option(
    "--recent-burst",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Hot-session traces in the last 10 minutes.",
)
@click.option("--orphans", type=click.IntRange(min=0), default=0, help="Legacy only: links whose trace does not exist.")
@click.option("--force", is_flag=True, help="Replace PATH if it exists.")
@click.pass_obj
def generate(
    settings: Settings,
    path: Path,
    n_traces: int,
    schema: str,
    seed: int,
    payload_bytes: int,
    hot_share: float,
    recent_burst: int,
    orphans: int,
    force: bool,
) -> None:
    """Write a SQLite file of synthetic traces at PATH, fast (millions of rows; not through the store).

    Realistic shape: Zipf-sized sessions, one hot session ("hot") with a burst in the last 10 minutes,
    20% of traces in two sessions, 30 days of history. Deterministic for a seed (and the same clock).
    """
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; pass --force to replace it")
    # Written beside PATH and moved over it at the end: a refused or failed run leaves PATH as it was.
    fresh = path.with_name(path.name + ".new")
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    try:
        with ProgressBar(f"generating {schema} traces", settings.err) as progress:
            report = bulk_generate(
                fresh,
                traces=n_traces,
                schema=schema,
                seed=seed,
                payload_bytes=payload_bytes,
                hot_session_share=hot_share,
                recent_burst=recent_burst,
                orphans=orphans,
                progress=progress,
            )
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    for suffix in ("-wal", "-shm", "-journal"):  # the old file's, which would not match the new one
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    fresh.replace(path)
    stdout().print(
        f"Wrote {report.traces:,} traces ({report.links:,} links, {report.sessions:,} sessions; hot session "
        f"{report.hot_session_uid!r}: {report.hot_traces:,} traces, {report.burst_traces:,} in the last "
        f"{report.recent_window_s:.0f} s) to {escape(str(path))} in {report.seconds:.1f} s "
        f"({report.file_bytes / 1e6:,.1f} MB, schema {schema})"
    )


# -- demo -------------------------------------------------------------------------------------------
DEMO_BATCH = 5_000
DEMO_HISTORY_SECONDS = 7 * 86400.0
DEMO_QUERY_RUNS = 5


@main.command(short_help="Build a demo database, time the recent query, show its plan.")
@url_option
@click.option(
    "--traces",
    "n_traces",
    type=click.IntRange(min=1),
    default=20_000,
    show_default=True,
    help="How many traces to generate.",
)
@click.option(
    "--sessions",
    "n_sessions",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="How many sessions the traces are spread over.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Replace the SQLite file if it already exists; on PostgreSQL, drop the trace tables (and their traces) first.",
)
@click.pass_obj
def demo(settings: Settings, command_url: str | None, n_traces: int, n_sessions: int, force: bool) -> None:
    """Build a database of synthetic traces and time the recent-traces query on it.

    A SQLite file, or the trace tables in an empty PostgreSQL database, created through the real
    migrations and filled with --traces traces over --sessions sessions across the last 7 days; one
    of them, the hot session, also has traces in the last 10 minutes. Then `recent` runs for the hot
    session (since 10m): prints the row count, the median time of a few runs and the query plan.
    """
    url = database_url(settings, command_url)
    where = demo_database(url, force=force)
    out = stdout()
    sessions = [f"demo-session-{i:04d}" for i in range(n_sessions)]
    hot = sessions[0]
    n_recent = min(n_traces, max(1, n_traces // 100))
    n_history = n_traces - n_recent
    started = time.perf_counter()
    with TraceStore(url) as store:
        out.print(f"Created {escape(where)} at revision {migrate.head_revision()} (head)")
        now = time.time()
        with ProgressBar("storing traces", settings.err) as progress:
            for done in range(0, n_history, DEMO_BATCH):
                size = min(DEMO_BATCH, n_history - done)
                store.store_batch(
                    synthetic_traces(size, session_uids=sessions, since=now - DEMO_HISTORY_SECONDS, until=now - 3600)
                )
                progress(done + size, n_traces)
            # Generated last, so that they are still within 10 minutes when the query runs.
            recent = time.time()
            store.store_batch(synthetic_traces(n_recent, session_uids=[hot], since=recent - 300, until=recent))
            progress(n_traces, n_traces)
        out.print(
            f"Stored {n_traces} traces in {n_sessions} sessions in {time.perf_counter() - started:.1f} s; "
            f"hot session {hot} has {n_recent} of them in the last 10 minutes"
        )
        since = time.time() - 600
        timings = []
        for _ in range(DEMO_QUERY_RUNS):
            query_started = time.perf_counter()
            rows = store.get_by_session_uid(hot, since=since)
            timings.append((time.perf_counter() - query_started) * 1000)
        plan = store.explain(hot, since=since)
    out.print(
        f"recent {hot} --since 10m: {len(rows)} rows, median {statistics.median(timings):.2f} ms "
        f"over {DEMO_QUERY_RUNS} runs"
    )
    out.print("EXPLAIN QUERY PLAN:" if make_url(url).get_backend_name() == "sqlite" else "EXPLAIN:")
    for line in plan:
        out.print(f"  {escape(line)}")
    out.print(f"Try: tracestore --url {escape(shown(url))} recent {hot}")


def demo_database(url: str, *, force: bool) -> str:
    """Where the demo writes, said for humans; an existing database is never reused silently.

    SQLite: the file, removed first with --force. PostgreSQL: the database must hold no trace tables;
    with --force the ones at a tracestore revision are dropped first (downgrade to base).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return str(demo_file(url, force=force))
    revision = migrate.current_revision(url)
    if revision is None and not _has_traces_table(url):
        return f"the trace tables in {shown(url)}"
    if not force:
        raise click.ClickException(
            f"{shown(url)} already has trace tables: pass --force to drop them and their traces, or use another --url"
        )
    if revision is None:
        raise click.ClickException(
            f"{shown(url)} has a legacy traces table (no tracestore revision): the demo does not drop it"
        )
    migrate.downgrade(url, "base", drop_data=True)
    return f"the trace tables in {shown(url)} (replaced)"


def _has_traces_table(url: str) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            return inspect(connection).has_table("traces")
    except SQLAlchemyError as exc:
        raise LibraryError(f"cannot read {shown(url)}: {exc}") from exc
    finally:
        engine.dispose()


def demo_file(url: str, *, force: bool) -> Path:
    """The demo's SQLite file, removed first with --force; an existing file is never reused silently."""
    parsed = make_url(url)
    if not parsed.database or parsed.database == ":memory:":
        raise click.BadParameter(
            "demo builds a SQLite file (or fills a PostgreSQL database): use a URL like sqlite:///demo.db",
            param_hint="'--url'",
        )
    path = Path(parsed.database)
    if path.exists():
        reason = why_not_a_database(str(path))
        if reason is not None:  # --force replaces a database, never a directory or another kind of file
            raise click.ClickException(f"{reason}: use another --url")
        if not force:
            raise click.ClickException(f"{path} already exists: pass --force to replace it, or use another --url")
        for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            stale.unlink(missing_ok=True)
    return path
