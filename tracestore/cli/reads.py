"""Commands that read traces: recent and explain."""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import click
import orjson

from tracestore.cli.app import (
    Settings,
    database_url,
    main,
    query_options,
    require_database,
    url_option,
)
from tracestore.export import trace_record
from tracestore.otel.otlp import span_of
from tracestore.store import TraceStore
from tracestore.types import TraceContext


@contextmanager
def open_store(url: str) -> Iterator[TraceStore]:
    # Never upgrade from a read command: a database below head gets SchemaOutOfDateError, which
    # names the upgrade command to run.
    require_database(url)
    with TraceStore(url, auto_upgrade=False) as store:
        yield store


@main.command(short_help="Print a session's traces created within --since, newest first.")
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
    return orjson.dumps(trace_record(trace)).decode()


def trace_line(trace: TraceContext, preview_chars: int = 60) -> str:
    try:
        created = datetime.fromtimestamp(trace.created_at, tz=UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):  # outside the years 1-9999 a datetime holds
        created = f"{trace.created_at!r} (epoch seconds)"
    span = span_of(trace)
    # A span's data starts with its resource: its name and status say more.
    data = orjson.dumps(trace.data if span is None else _span_summary(span)).decode()
    if len(data) > preview_chars:
        data = data[: preview_chars - 3] + "..."
    fields = (visible(trace.id), visible(trace.namespace), visible(trace.context_type))
    return "  ".join((created, *fields, data))


def _span_summary(span: dict[str, Any]) -> dict[str, Any]:
    return {"span": span.get("name"), "status": span.get("status", {}).get("code", 0)}


def visible(text: str) -> str:
    """`text` with control characters and line separators escaped (\\n, \\x1b...): an id must not move the
    cursor, clear the screen or break the one-line-per-trace format on a terminal."""
    if text.isprintable():
        return text
    return "".join(
        char.encode("unicode_escape").decode("ascii") if unicodedata.category(char) in _HIDDEN else char
        for char in text
    )


_HIDDEN = {"Cc", "Cs", "Zl", "Zp"}  # controls, lone surrogates, line and paragraph separators


@main.command(short_help="Print the query plan of `recent` with the same options.")
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
