"""`tracestore verify`: check a database (and repair it with --fix)."""

from __future__ import annotations

import click
from rich.markup import escape

from tracestore.cli.app import (
    ProgressBar,
    Settings,
    database_url,
    main,
    require_database,
    stdout,
    url_option,
)
from tracestore.migrate.backfill import DEFAULT_BATCH_SIZE
from tracestore.migrate.verify import verify


@main.command("verify", short_help="Check the schema and its invariants; --fix repairs drift.")
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

    One line per check; exit code 1 if any fails. Below head the checks that need the head schema are
    shown as not checked ("skip"), not as failures. Nothing is written unless --fix is given: it
    recreates the index idx_trace_sessions_uid_time (session_uid, created_at, trace_id, ascending,
    WHERE created_at IS NOT NULL) when it is missing or differs, and a missing trigger, and repairs links
    in batches, each its own short transaction. It never runs migrations (`tracestore upgrade` does) and
    never repairs a damaged file (integrity_check).
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
        if not check.checked:
            out.print(f"[dim]skip[/dim]  {escape(check.title)}: not checked, {escape('; '.join(check.details))}")
            continue
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
    checked = len(report.checks) - len(report.not_checked)
    skipped = f", {len(report.not_checked)} not checked" if report.not_checked else ""
    hint = "; `tracestore verify --fix` repairs them" if report.repairable and not fix else ""
    out.print(f"{len(report.problems)} of {checked} checks failed{skipped}{hint}")
    ctx.exit(1)
