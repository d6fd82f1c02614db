"""The live tail command: print a session's traces as they are stored."""

from __future__ import annotations

import os
import sys
import time

import click

from tracestore.cli.app import Duration, Settings, database_url, main, url_option
from tracestore.cli.reads import open_store, trace_json, trace_line
from tracestore.tail import DEFAULT_POLL_LIMIT


@main.command(short_help="Print a session's traces as they are stored, until Ctrl-C.")
@click.argument("session_uid")
@url_option
@click.option(
    "--since",
    "since_seconds",
    type=Duration(),
    default=None,
    help="First print the traces created within this long before now (30s, 10m, 2h, 1d), oldest first. "
    "Default: only traces stored from now on.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object per trace (the fields of `recent --json`).",
)
@click.option(
    "--interval", type=Duration(), default="1s", show_default=True, help="Time between two polls of the database."
)
@click.option(
    "--limit-per-poll",
    type=click.IntRange(min=1),
    default=DEFAULT_POLL_LIMIT,
    show_default=True,
    help="At most this many new traces per poll; a backlog is read in polls of this size, back to back.",
)
@click.option(
    "--lookback",
    type=Duration(),
    default="5s",
    show_default=True,
    help="Also print traces stored up to this long after their creation time, when newer ones were "
    "already printed (a writer that batches, or whose clock lags).",
)
@click.pass_obj
def tail(
    settings: Settings,
    session_uid: str,
    command_url: str | None,
    since_seconds: float | None,
    as_json: bool,
    interval: float,
    limit_per_poll: int,
    lookback: float,
) -> None:
    """Print SESSION_UID's traces as they are stored, until Ctrl-C.

    One line per trace, as `recent` prints them (creation time in UTC, id, namespace, context type, the
    start of its JSON data), oldest first. Each poll reads the composite index from the last trace
    printed on, so it costs the new traces only. The database must be at head (`tracestore upgrade`).
    """
    url = database_url(settings, command_url)
    try:
        with open_store(url) as store:
            # "From now on" is fixed before the banner: a trace stored once it shows is new, and the backlog
            # (--since) is printed under it, however many polls it takes.
            since = time.time() - (since_seconds or 0.0)
            polls = store.tail(
                session_uid, since=since, poll_interval=interval, lookback=lookback, limit_per_poll=limit_per_poll
            )
            click.echo(f"following {session_uid} (Ctrl-C to stop)", err=True)
            for traces in polls:
                if traces:
                    click.echo("\n".join(trace_json(t) if as_json else trace_line(t) for t in traces))
    except KeyboardInterrupt:
        return  # Ctrl-C is how a tail ends: exit 0, no traceback
    except BrokenPipeError:  # `tracestore tail S | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
