"""The export command: a session's traces, or all of them, streamed to JSON Lines or OTLP/JSON."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import click

from tracestore.cli.app import (
    LibraryError,
    ProgressBar,
    Settings,
    database_url,
    main,
    parse_duration,
    url_option,
)
from tracestore.cli.reads import open_store
from tracestore.export import DEFAULT_PAGE_SIZE, FORMATS, export_traces


class TimeBound(click.ParamType):  # type: ignore[type-arg,unused-ignore]  # generic from click 8.4
    """A point in time as epoch seconds: an ISO 8601 time (UTC unless it has an offset), epoch seconds, or a
    duration with a unit (30s, 10m, 2d), meaning that long before now."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        try:
            return parse_time(str(value), now=time.time())
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def parse_time(text: str, *, now: float) -> float:
    """Epoch seconds for `text` (see TimeBound); ValueError saying what is accepted."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
    if value[-1:].lower() in ("s", "m", "h", "d") and value[:1].isdigit():
        try:
            return now - parse_duration(value)
        except click.BadParameter as exc:
            raise ValueError(exc.message) from None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use an ISO 8601 time (2026-01-31T12:00:00Z), epoch seconds (1767225600) "
            "or a duration before now (30s, 10m, 2h, 1d)"
        ) from None
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)).timestamp()


@main.command(short_help="Stream traces to JSON Lines or OTLP/JSON, oldest first.")
@click.argument("session_uid", required=False)
@click.option("--all", "all_traces", is_flag=True, help="Export every trace instead of one session's.")
@url_option
@click.option(
    "--since",
    type=TimeBound(),
    default=None,
    help="Only traces created at or after this time: ISO 8601 (UTC unless an offset is given), epoch seconds, "
    "or a duration before now (30s, 10m, 2h, 1d).",
)
@click.option("--until", type=TimeBound(), default=None, help="Only traces created before this time (as --since).")
@click.option(
    "--format",
    "output_format",
    type=click.Choice(FORMATS),
    default="jsonl",
    show_default=True,
    help="jsonl: one JSON object per trace (as `recent --json`); otlp-json: OTLP/JSON requests, one per line "
    "(the OpenTelemetry File Exporter format, which `serve` and any OTLP/HTTP receiver take back).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write to this file (replaced when the export is complete; a failed one leaves it as it was) "
    "instead of stdout.",
)
@click.option(
    "--page-size",
    type=click.IntRange(min=1),
    default=DEFAULT_PAGE_SIZE,
    show_default=True,
    help="Traces read per query (and per OTLP request line).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary on stderr.")
@click.pass_obj
def export(
    settings: Settings,
    session_uid: str | None,
    all_traces: bool,
    command_url: str | None,
    since: float | None,
    until: float | None,
    output_format: str,
    output: Path | None,
    page_size: int,
    quiet: bool,
) -> None:
    """Stream SESSION_UID's traces (or every trace, with --all) created in [--since, --until), oldest first.

    Memory stays bounded whatever the number of traces: they are read a page at a time through an index
    and written as they come. Each page is its own read, so traces stored during the export are included
    when they sort after the page being read. A progress bar goes to stderr when it is a terminal.
    """
    if (session_uid is None) == (not all_traces):
        raise click.UsageError("give a SESSION_UID or --all (not both)")
    url = database_url(settings, command_url)
    show = not quiet and settings.err.is_terminal
    started = time.perf_counter()
    with open_store(url) as store, _destination(output) as out:
        total = store.count_traces(session_uid=session_uid, since=since, until=until) if show else 0
        with ProgressBar("exporting", settings.err) as progress:
            written = export_traces(
                store,
                out,
                session_uid=session_uid,
                since=since,
                until=until,
                format=output_format,
                page_size=page_size,
                on_progress=(lambda done: progress(done, max(done, total))) if show else None,
            )
    if not quiet:
        seconds = time.perf_counter() - started
        rate = f" ({written / seconds:,.0f} traces/s)" if written and seconds > 0 else ""
        click.echo(f"{written:,} traces exported in {seconds:.2f} s{rate}", err=True)


@contextmanager
def _destination(output: Path | None) -> Iterator[IO[bytes]]:
    """stdout, or a file written beside `output` and renamed over it once complete (removed on failure)."""
    if output is None:
        stdout = sys.stdout.buffer
        yield stdout
        stdout.flush()
        return
    partial = output.with_name(f".{output.name}.{os.getpid()}.partial")
    try:
        with partial.open("wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        partial.replace(output)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise LibraryError(f"cannot write {output}: {exc.strerror or exc}") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
