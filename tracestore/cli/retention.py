"""Commands that delete old data: prune."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import click

from tracestore.cli.app import Duration, ProgressBar, Settings, database_url, main, stdout, url_option
from tracestore.cli.reads import open_store
from tracestore.retention.prune import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, PruneReport
from tracestore.types import END_OF_YEAR_9999

# 0001-01-01T00:00:00Z: a cutoff before it names no date, and no age that long is meant.
START_OF_YEAR_1 = datetime(1, 1, 1, tzinfo=UTC).timestamp()
# Below this a deletion rate mostly measures the fixed costs (the count, the checkpoint), not the deletes.
MIN_SECONDS_FOR_A_RATE = 1.0


class Age(Duration):
    """A duration that, counted back from now, still lands on a date: prune's --older-than."""

    name = "age"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        seconds = super().convert(value, param, ctx)
        if time.time() - seconds < START_OF_YEAR_1:
            # An epoch time typed where an age belongs: in milliseconds it always lands before the year 1.
            timestamp = 1e9 <= seconds / 1000 < END_OF_YEAR_9999
            hint = f"; {value} looks like an epoch time in milliseconds" if timestamp else ""
            message = f"{value!r} reaches back before the year 1: give an age such as 30d, 12h or 90m{hint}"
            self.fail(message, param, ctx)
        return seconds


@main.command(short_help="Delete traces older than --older-than, in short batches.")
@url_option
@click.option(
    "--older-than",
    "older_than",
    type=Age(),
    required=True,
    help="Delete the traces created more than this long ago (by their created_at): 30d, 12h, 90m or seconds.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH_SIZE),
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    help="Traces per transaction; writers wait at most one batch for the lock.",
)
@click.option(
    "--vacuum",
    is_flag=True,
    help="SQLite: give the freed pages back to the filesystem where the file's auto_vacuum is INCREMENTAL; "
    "on a file with NONE (what tracestore creates) say how to shrink it instead.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.pass_obj
def prune(
    settings: Settings, command_url: str | None, older_than: float, batch_size: int, vacuum: bool, dry_run: bool
) -> None:
    """Delete traces older than --older-than, and their session links, oldest first in short batches.

    Each batch is its own transaction, so writers keep working, and an interrupted prune is finished
    by running it again. A progress bar and what became of the space go to stderr, a one-line summary
    to stdout. SQLite keeps the freed pages in the file for new traces; --vacuum returns them to the
    filesystem only from a file in auto_vacuum=INCREMENTAL mode (tracestore creates files with NONE;
    on one, --vacuum says how to convert it, offline). On PostgreSQL autovacuum makes the space
    reusable. The database must be at head (`tracestore upgrade`).
    """
    url = database_url(settings, command_url)
    cutoff = time.time() - older_than
    with open_store(url) as store:
        if dry_run:
            report = store.prune(cutoff, batch_size=batch_size, dry_run=True)
        else:
            with ProgressBar("pruning traces", settings.err) as progress:
                report = store.prune(cutoff, batch_size=batch_size, on_progress=progress, vacuum=vacuum)
    stdout().print(summary(report))
    if report.space.advice and (report.deleted or vacuum) and not dry_run:
        settings.err.print(report.space.advice)  # for the human at the terminal: stdout stays the one-line summary


def summary(report: PruneReport) -> str:
    """What the prune did, in one line that fits a terminal."""
    cutoff = instant(report.cutoff)
    if report.dry_run:
        return f"Would delete {report.deleted:,} traces older than {cutoff} (dry run)"
    if not report.deleted:
        return f"Deleted 0 traces: none is older than {cutoff}"
    batches = f"{report.batches:,} batch{'' if report.batches == 1 else 'es'}"
    done = f"Deleted {report.deleted:,} traces older than {cutoff}: {batches}, {report.seconds:.1f} s"
    return f"{done}, {report.rate:,.0f}/s" if report.seconds >= MIN_SECONDS_FOR_A_RATE else done


def instant(epoch: float) -> str:
    """An epoch time as ISO 8601 UTC to the minute (a cutoff is "now" minus an age: seconds would be noise);
    outside the years 1-9999 as epoch seconds."""
    try:
        return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%MZ")
    except (OverflowError, OSError, ValueError):
        return f"{epoch:g} (epoch seconds)"
