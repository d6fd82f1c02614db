"""The `tracestore` command group and what its commands share: options, URL handling, errors, output."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import click
from alembic.util import CommandError
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from tracestore.engine import printable, sqlite_url_for, sync_url
from tracestore.engine import shown as engine_shown
from tracestore.errors import InvalidQueryError, InvalidTraceError, RevisionError, TraceStoreError
from tracestore.store import DEFAULT_URL

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
    if command_url == "":  # said explicitly: never fall back to the default file
        raise click.BadParameter("the database URL is empty", param_hint="'--url'")
    url = command_url or settings.url
    try:
        converted = sync_url(url)
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        suggestion = sqlite_url_for(url)
        hint = f" looks like a file path: for a SQLite file use {printable(suggestion)}" if suggestion else ""
        raise click.BadParameter(f"not a database URL: {printable(repr(url))}{hint}", param_hint="'--url'") from exc
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
            f"no database at {printable(path)}: create one with `tracestore upgrade --url {shown(url)}` "
            "(or `tracestore demo`)"
        )


def shown(url: str) -> str:
    return engine_shown(url)


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
