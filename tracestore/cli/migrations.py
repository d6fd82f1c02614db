"""Commands that move a database along the Alembic chain: upgrade, downgrade, current, finalize."""

from __future__ import annotations

import time

import click
from rich.markup import escape

from tracestore import migrate
from tracestore.cli.app import (
    ProgressBar,
    Settings,
    database_url,
    main,
    require_database,
    revision_name,
    shown,
    stdout,
    url_option,
)
from tracestore.migrate.backfill import DEFAULT_BATCH_SIZE
from tracestore.migrate.versions import VERSION_TABLE


@main.command(short_help="Upgrade the schema to head (or --revision); creates a new file.")
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
            f"  backfill: {backfill.rows_scanned} junction rows scanned, {backfill.rows_updated} filled "
            f"in {backfill.seconds:.2f} s"
        )
        if backfill.index_attached is not None:
            how = "built in key order and attached" if backfill.index_attached else "made by CREATE INDEX"
            out.print(f"  index idx_trace_sessions_uid_time {how} in {backfill.index_seconds:.2f} s")
        if backfill.orphans_kept:
            out.print(
                f"  {backfill.orphans_kept} orphan links (no trace yet) kept: the previous release may still be "
                "writing their traces; `tracestore finalize` removes those whose trace never comes"
            )
    index = reports.get("index", {})
    steps = (
        ("add_column_seconds", "column and triggers added in"),
        ("drop_trace_index_seconds", "legacy index idx_trace_sessions_trace dropped in"),
        ("index_seconds", "index idx_trace_sessions_uid_time created (empty, filled by the backfill) in"),
        ("drop_seconds", "legacy session indexes dropped in"),
        ("analyze_seconds", "ANALYZE in"),
    )
    for key, what in steps:
        if key in index:
            out.print(f"  {what} {index[key]:.2f} s")


@main.command(
    short_help="Downgrade the schema to REVISION (an id, -1 or base).",
    context_settings={"ignore_unknown_options": True},
)
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


@main.command(short_help="Show the schema revision; exit code 1 if it is not head.")
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


@main.command(short_help="End a rolling deploy: drop its triggers and orphan links.")
@url_option
@click.pass_obj
def finalize(settings: Settings, command_url: str | None) -> None:
    """End a rolling deploy: drop the triggers that fill created_at for the previous release's writes, and
    remove the orphan links the upgrade kept whose trace never came.

    On PostgreSQL a legacy schema without the foreign key trace_sessions -> traces gets it (NOT VALID,
    links without a trace removed, then VALIDATE: writers are not blocked). Last, tracestore's revision
    leaves alembic_version, where the previous release read it (the table goes if nothing else is in it).

    Run it once every instance runs this release. The triggers make each insert slower; the store
    itself never needs them. Safe to run twice, and an interrupted run is finished by the next.
    """
    url = database_url(settings, command_url)
    require_database(url)
    report = migrate.finalize(url)
    out = stdout()
    done = []
    if report.dropped:
        done.append(f"dropped {', '.join(report.dropped)}")
    if report.orphans_removed:
        done.append(f"removed {report.orphans_removed} orphan links whose trace never came")
    if report.foreign_key:
        done.append(f"added the foreign key {report.foreign_key} (trace_sessions -> traces)")
    if report.left_alembic_version:
        done.append(f"tracestore's revision left alembic_version (now in {VERSION_TABLE} only)")
    if done:
        out.print(f"Finalized {escape(shown(url))}: {escape('; '.join(done))}")
    else:
        out.print(f"{escape(shown(url))} is already finalized: no rolling-deploy triggers")
