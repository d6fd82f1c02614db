"""Commands that delete old data: prune."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import click

from tracestore.cli.app import Duration, ProgressBar, Settings, database_url, main, stdout, url_option
from tracestore.cli.reads import open_store
from tracestore.retention.prune import DEFAULT_BATCH_SIZE, MAX_BATCH_SIZE, PruneReport


@main.command()
@url_option
@click.option(
    "--older-than",
    "older_than",
    type=Duration(),
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
    help="SQLite: give the freed pages back to the filesystem (auto_vacuum=INCREMENTAL files), or say how to.",
)
@click.option("--dry-run", is_flag=True, help="Count what would be deleted; delete nothing.")
@click.pass_obj
def prune(
    settings: Settings, command_url: str | None, older_than: float, batch_size: int, vacuum: bool, dry_run: bool
) -> None:
    """Delete traces older than --older-than, and their session links, oldest first in short batches.

    Each batch is its own transaction, so writers keep working, and an interrupted prune is finished
    by running it again. A progress bar goes to stderr, a one-line summary to stdout. SQLite keeps
    the freed pages for new traces (--vacuum to return them); on PostgreSQL autovacuum makes the
    space reusable. The database must be at head (`tracestore upgrade`).
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


def summary(report: PruneReport) -> str:
    before = datetime.fromtimestamp(report.cutoff, tz=UTC).isoformat(timespec="seconds")
    if report.dry_run:
        return f"Would prune {report.deleted:,} traces created before {before} (dry run: nothing deleted)"
    done = f"Pruned {report.deleted:,} traces created before {before} in {report.batches:,} batches"
    return f"{done} ({report.seconds:.1f} s, {report.rate:,.0f} traces/s); {report.space.advice}"
