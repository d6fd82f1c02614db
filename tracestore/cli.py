"""What the command line offers: migrations, schema status and checks, the recent-traces query and a demo.

Thin on purpose: each command parses its arguments, calls the public API (TraceStore,
tracestore.migrate) and prints. Library errors become a one-line message and exit code 1
(2 for invalid arguments), never a traceback.
"""

from __future__ import annotations

import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import click
import orjson
from alembic.util import CommandError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from tracestore import migrate
from tracestore.backfill import DEFAULT_BATCH_SIZE
from tracestore.engine import create_engine, sync_url
from tracestore.errors import InvalidQueryError, InvalidTraceError, RevisionError, TraceStoreError
from tracestore.store import DEFAULT_URL, TraceStore
from tracestore.testing.bulk import SCHEMAS
from tracestore.testing.bulk import generate as bulk_generate
from tracestore.types import TraceContext
from tracestore.verify import verify

F = TypeVar("F", bound=Callable[..., Any])

# -- durations --------------------------------------------------------------------------------------
_UNIT_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[smhd])+|[0-9]+(?:\.[0-9]+)?")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")


def parse_duration(text: str) -> float:
    """Seconds in `text`: plain seconds (90, 2.5) or numbers with units s, m, h, d (30s, 10m, 1h30m)."""
    value = text.strip().lower()
    if not _DURATION.fullmatch(value):
        raise click.BadParameter(
            f"{text!r} is not a duration: use seconds (600) or a number with a unit s, m, h or d "
            "(30s, 10m, 2h, 1d, 1h30m)"
        )
    seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(value))
    if not math.isfinite(seconds):
        raise click.BadParameter(f"{text!r} is too long a duration")
    return seconds


class Duration(click.ParamType):  # type: ignore[type-arg,unused-ignore]  # generic from click 8.4
    name = "duration"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return parse_duration(str(value))
        except click.BadParameter as exc:
            self.fail(exc.message, param, ctx)


# -- errors -----------------------------------------------------------------------------------------
class LibraryError(click.ClickException):
    """A tracestore (or Alembic) error, shown as one line on stderr; exit code 1."""

    def __init__(self, error: BaseException | str) -> None:
        super().__init__(" ".join(line.strip() for line in str(error).splitlines() if line.strip()))


class LibraryUsageError(LibraryError):
    """Invalid arguments caught by the library (a bad revision, an empty session uid): exit code 2."""

    exit_code = 2


class TraceStoreGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (InvalidQueryError, InvalidTraceError, RevisionError) as exc:
            raise LibraryUsageError(exc) from exc
        except TraceStoreError as exc:
            raise LibraryError(exc) from exc
        except CommandError as exc:  # Alembic: unknown revision, not a valid upgrade target...
            raise LibraryUsageError(exc) from exc


# -- shared options ---------------------------------------------------------------------------------
@dataclass
class Settings:
    url: str
    # One stderr console per run, shared by the progress bars and the log handler so they do not interleave.
    err: Console


def url_option(func: F) -> F:
    """--url on a subcommand too, so `tracestore upgrade --url ...` (as error messages suggest) works."""
    return click.option(
        "--url",
        "command_url",
        metavar="URL",
        default=None,
        help="Database URL; overrides the one given before the command.",
    )(func)


def query_options(func: F) -> F:
    func = click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=100,
        show_default=True,
        help="At most this many traces, newest first.",
    )(func)
    return click.option(
        "--since",
        "since_seconds",
        type=Duration(),
        default="10m",
        show_default=True,
        help="Only traces created within this long before now: 30s, 10m, 2h, 1d or seconds.",
    )(func)


def database_url(settings: Settings, command_url: str | None) -> str:
    """The sync-driver URL to use (async URLs such as sqlite+aiosqlite:// or postgresql+asyncpg:// are
    accepted and converted)."""
    url = command_url or settings.url
    try:
        converted = sync_url(url)
    except ArgumentError as exc:
        raise click.BadParameter(f"not a database URL: {url!r}", param_hint="'--url'") from exc
    try:
        make_url(converted).get_dialect()
    except NoSuchModuleError as exc:  # checked here so that the message never shows the password
        raise click.BadParameter(
            f"no such database driver in {shown(url)}: use sqlite:///PATH or postgresql+psycopg://...",
            param_hint="'--url'",
        ) from exc
    return converted


def require_database(url: str) -> None:
    """Refuse to read a SQLite file that does not exist (connecting would silently create it)."""
    parsed = make_url(url)
    path = parsed.database
    if parsed.get_backend_name() != "sqlite" or not path or path == ":memory:" or parsed.query.get("uri"):
        return
    if not Path(path).exists():
        raise click.ClickException(
            f"no database at {path}: create one with `tracestore upgrade --url {shown(url)}` (or `tracestore demo`)"
        )


def shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def revision_name(revision: str | None) -> str:
    return revision or "none (legacy or empty database)"


def stdout() -> Console:
    return Console(highlight=False, soft_wrap=True)


def stderr() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class ProgressBar:
    """A rich progress bar fed by on_progress(done, total) callbacks; shown from the first call on."""

    def __init__(self, description: str, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._description = description
        self._task: TaskID | None = None

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self._description, total=total)
        self._progress.update(self._task, completed=done, total=total)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._progress.stop()


def configure_logging(verbose: bool, console: Console) -> None:
    for name in ("tracestore", "alembic"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "tracestore_cli", False)]:
            logger.removeHandler(handler)
        if verbose:
            handler = RichHandler(console=console, show_path=False)
            handler.tracestore_cli = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)


# -- commands ---------------------------------------------------------------------------------------
@click.group(cls=TraceStoreGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="TRACESTORE_DATABASE_URL",
    show_envvar=True,
    default=DEFAULT_URL,
    show_default=True,
    help="Database URL, e.g. sqlite:///traces.db or postgresql+psycopg://user@host/db (async URLs such as "
    "sqlite+aiosqlite:///... or postgresql+asyncpg://... work too).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log migration steps and backfill progress to stderr.")
@click.version_option(package_name="tracestore")
@click.pass_context
def main(ctx: click.Context, url: str, verbose: bool) -> None:
    """tracestore: application traces in SQL, with fast time-bounded session queries.

    Migrate a database with `upgrade`, check it with `current` and `verify`, read a session's recent
    traces with `recent` (and its query plan with `explain`), or try it all on synthetic data with `demo`.
    """
    err = stderr()
    configure_logging(verbose, err)
    ctx.obj = Settings(url=url, err=err)


@main.command()
@url_option
@click.option("--revision", default="head", show_default=True, help="Target revision: an id such as 0004, or head.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    envvar="TRACESTORE_BATCH_SIZE",
    show_envvar=True,
    default=None,
    help=f"Junction rows per backfill transaction (default {DEFAULT_BATCH_SIZE}); smaller batches hold the write "
    "lock for less time.",
)
@click.pass_obj
def upgrade(settings: Settings, command_url: str | None, revision: str, batch_size: int | None) -> None:
    """Upgrade the database schema to REVISION (default: head), creating a new SQLite file if needed.

    The backfill of trace_sessions.created_at runs in batches, each its own short transaction, with a
    progress bar; an interrupted run resumes where it stopped when started again. Prints what each
    step did and the total time.
    """
    url = database_url(settings, command_url)
    before = migrate.current_revision(url)
    started = time.perf_counter()
    with ProgressBar("backfill trace_sessions.created_at", settings.err) as progress:
        reports = migrate.upgrade(url, revision, batch_size=batch_size, on_progress=progress)
    elapsed = time.perf_counter() - started
    after = migrate.current_revision(url)
    out = stdout()
    head = migrate.head_revision()
    target = f"{after} (head)" if after == head else revision_name(after)
    if before == after:
        out.print(f"{escape(shown(url))} is already at {target}: nothing to do ({elapsed:.2f} s)")
        return
    out.print(f"Upgraded {escape(shown(url))}: {revision_name(before)} -> {target} in {elapsed:.2f} s")
    backfill = reports.get("backfill")
    if backfill is not None:
        out.print(
            f"  backfill: {backfill.rows_scanned} junction rows scanned, {backfill.rows_updated} filled, "
            f"{backfill.orphans_removed} orphan links removed in {backfill.seconds:.2f} s"
        )
    index = reports.get("index", {})
    steps = (
        ("add_column_seconds", "column and triggers added in"),
        ("drop_trace_index_seconds", "legacy index idx_trace_sessions_trace dropped in"),
        ("index_seconds", "index idx_trace_sessions_uid_time created (empty, filled by the backfill) in"),
        ("drop_seconds", "legacy index idx_trace_sessions_uid dropped in"),
        ("analyze_seconds", "ANALYZE in"),
    )
    for key, what in steps:
        if key in index:
            out.print(f"  {what} {index[key]:.2f} s")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("revision")
@url_option
@click.option("-y", "--yes", is_flag=True, help="Downgrade to base without asking for confirmation.")
@click.option("--drop-data", is_flag=True, help="Allow `base` to drop a traces table that still holds traces.")
@click.pass_obj
def downgrade(settings: Settings, revision: str, command_url: str | None, yes: bool, drop_data: bool) -> None:
    """Downgrade the database schema to REVISION: an id such as 0003, -1 for one step, or base.

    `base` drops the trace tables, so it asks for confirmation first (skip it with --yes), and it is
    refused before any step runs while traces exist, unless --drop-data is given. 0001 is the legacy
    schema: downgrade there to hand the file back to the pre-Alembic implementation.
    """
    url = database_url(settings, command_url)
    require_database(url)
    if revision == "base" and not yes:
        click.confirm(f"Downgrade {shown(url)} to base, dropping the trace tables?", abort=True)
    before = migrate.current_revision(url)
    migrate.downgrade(url, revision, drop_data=drop_data)
    after = migrate.current_revision(url)
    stdout().print(f"Downgraded {escape(shown(url))}: {revision_name(before)} -> {revision_name(after)}")


@main.command()
@url_option
@click.pass_obj
@click.pass_context
def current(ctx: click.Context, settings: Settings, command_url: str | None) -> None:
    """Show the database's schema revision and the head revision; exit code 1 if they differ."""
    url = database_url(settings, command_url)
    require_database(url)
    revision = migrate.current_revision(url)
    head = migrate.head_revision()
    out = stdout()
    out.print(f"database: {escape(shown(url))}")
    out.print(f"current revision: {revision_name(revision)}")
    out.print(f"head revision: {head}")
    if revision == head:
        out.print("up to date")
        return
    out.print(f"not up to date: run `tracestore upgrade --url {escape(shown(url))}`")
    ctx.exit(1)


@main.command()
@url_option
@click.pass_obj
def finalize(settings: Settings, command_url: str | None) -> None:
    """End a rolling deploy: drop the triggers that fill created_at for the previous release's writes.

    Run it once every instance runs this release. The triggers make each insert slower (plain inserts
    0.71x as fast with them at 1M traces); the store itself never needs them. Safe to run twice.
    """
    url = database_url(settings, command_url)
    require_database(url)
    dropped = migrate.finalize(url)
    out = stdout()
    if dropped:
        out.print(f"Finalized {escape(shown(url))}: dropped {', '.join(dropped)}")
    else:
        out.print(f"{escape(shown(url))} is already finalized: no rolling-deploy triggers")


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


@main.command()
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


@main.command("verify")
@url_option
@click.option("--fix", is_flag=True, help="Repair what can be repaired (links, index, trigger), then check again.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    envvar="TRACESTORE_BATCH_SIZE",
    show_envvar=True,
    default=None,
    help=f"Junction rows per repair transaction with --fix (default {DEFAULT_BATCH_SIZE}).",
)
@click.pass_obj
@click.pass_context
def verify_command(
    ctx: click.Context, settings: Settings, command_url: str | None, fix: bool, batch_size: int | None
) -> None:
    """Check the schema revision, the links' created_at, orphan links, the index, the trigger and the file.

    One line per check; exit code 1 if any fails. Nothing is written unless --fix is given: it
    recreates a missing or ascending index and a missing trigger, and repairs links in batches, each
    its own short transaction. It never runs migrations (`tracestore upgrade` does) and never repairs
    a damaged file (integrity_check).
    """
    url = database_url(settings, command_url)
    require_database(url)
    with ProgressBar("repair trace_sessions", settings.err) as progress:
        report = verify(url, fix=fix, batch_size=batch_size or DEFAULT_BATCH_SIZE, on_progress=progress)
    out = stdout()
    for repair in report.repairs:
        out.print(f"repaired: {escape(repair)}")
    if report.not_repaired:
        out.print(f"repaired nothing: {escape(report.not_repaired)}")
    for check in report.checks:
        status = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
        line = f"{status}  {escape(check.title)}"
        if check.problem:
            line += f": {escape(check.problem)}"
        if check.details:
            details = escape("; ".join(check.details))
            line += f": {details}" if check.ok else f" (e.g. {details})"
        out.print(line)
    if report.ok:
        out.print(f"all {len(report.checks)} checks ok")
        return
    hint = "; `tracestore verify --fix` repairs them" if report.repairable and not fix else ""
    out.print(f"{len(report.problems)} of {len(report.checks)} checks failed{hint}")
    ctx.exit(1)


@contextmanager
def open_store(url: str) -> Iterator[TraceStore]:
    # Never upgrade from a read command: a database below head gets SchemaOutOfDateError, which
    # names the upgrade command to run.
    require_database(url)
    with TraceStore(url, auto_upgrade=False) as store:
        yield store


@main.command()
@click.argument("session_uid")
@url_option
@query_options
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per trace (id, context_type, namespace, data, metadata, session_uids, "
    "created_at, updated_at).",
)
@click.pass_obj
def recent(
    settings: Settings,
    session_uid: str,
    command_url: str | None,
    since_seconds: float,
    limit: int,
    as_json: bool,
) -> None:
    """Print SESSION_UID's traces created within --since, newest first.

    One line per trace: creation time (UTC, ISO 8601), id, namespace, context type and the start of
    its JSON data. The query time goes to stderr. The database must be at head (`tracestore upgrade`).
    """
    url = database_url(settings, command_url)
    with open_store(url) as store:
        started = time.perf_counter()
        traces = store.get_by_session_uid(session_uid, since=time.time() - since_seconds, limit=limit)
        elapsed_ms = (time.perf_counter() - started) * 1000
    for trace in traces:
        click.echo(trace_json(trace) if as_json else trace_line(trace))
    click.echo(f"{len(traces)} traces in {elapsed_ms:.2f} ms", err=True)


def trace_json(trace: TraceContext) -> str:
    return orjson.dumps(
        {
            "id": trace.id,
            "context_type": trace.context_type,
            "namespace": trace.namespace,
            "data": trace.data,
            "metadata": trace.metadata,
            "session_uids": trace.session_uids,
            "created_at": trace.created_at,
            "updated_at": trace.updated_at,
        }
    ).decode()


def trace_line(trace: TraceContext, preview_chars: int = 60) -> str:
    created = datetime.fromtimestamp(trace.created_at, tz=UTC).isoformat(timespec="milliseconds")
    data = orjson.dumps(trace.data).decode()
    if len(data) > preview_chars:
        data = data[: preview_chars - 3] + "..."
    return f"{created}  {trace.id}  {trace.namespace}  {trace.context_type}  {data}"


@main.command()
@click.argument("session_uid")
@url_option
@query_options
@click.pass_obj
def explain(settings: Settings, session_uid: str, command_url: str | None, since_seconds: float, limit: int) -> None:
    """Print the query plan of `recent SESSION_UID` with the same options.

    On SQLite (EXPLAIN QUERY PLAN) a healthy plan searches idx_trace_sessions_uid_time and has no
    "USE TEMP B-TREE" step; on PostgreSQL (EXPLAIN) a latest-N query walks that index backwards under a
    Limit, with no Sort.
    """
    url = database_url(settings, command_url)
    with open_store(url) as store:
        plan = store.explain(session_uid, since=time.time() - since_seconds, limit=limit)
    for line in plan:
        click.echo(line)


# -- demo -------------------------------------------------------------------------------------------
DEMO_BATCH = 5_000
DEMO_HISTORY_SECONDS = 7 * 86400.0
DEMO_QUERY_RUNS = 5


@main.command()
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
    Needs factory-boy (`pip install "tracestore[testing]"`).
    """
    try:
        from tracestore.testing.factories import make_traces
    except ImportError as exc:
        raise click.ClickException(f'demo needs factory-boy: pip install "tracestore[testing]" ({exc})') from exc
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
                    make_traces(size, session_uids=sessions, since=now - DEMO_HISTORY_SECONDS, until=now - 3600)
                )
                progress(done + size, n_traces)
            # Generated last, so that they are still within 10 minutes when the query runs.
            store.store_batch(make_traces(n_recent, session_uids=[hot], since=time.time() - 300))
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
        if not force:
            raise click.ClickException(f"{path} already exists: pass --force to replace it, or use another --url")
        for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
            stale.unlink(missing_ok=True)
    return path
