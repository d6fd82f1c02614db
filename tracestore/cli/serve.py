"""The serve command: an OTLP/HTTP receiver storing OpenTelemetry spans as traces (tracestore.otel.server)."""

from __future__ import annotations

import logging
import sys

import click

from tracestore.cli.app import Duration, Settings, database_url, main, shown, url_option

OTEL_EXTRA = "pip install 'tracestore[otel]'"


@main.command(short_help="Store spans sent over OTLP/HTTP, until Ctrl-C or SIGTERM.")
@url_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every one).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=4318, show_default=True, help="Port to listen on (0: any free)."
)
@click.option(
    "--session-attribute",
    "session_attributes",
    multiple=True,
    metavar="KEY",
    help="An attribute key whose value names a span's session (repeat for several). Default: session.id and the "
    "GenAI, Langfuse and MLflow session keys.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1),
    default=None,
    help="Largest request body, as sent and once gunzipped; larger ones get 413. Default: 16 MiB.",
)
@click.option(
    "--lock-wait",
    type=Duration(),
    default=None,
    help="How long a write waits for a database locked by someone else before the request gets 503 with "
    "Retry-After. Default: 3s (inside the exporters' 10 s timeout).",
)
@click.pass_obj
def serve(
    settings: Settings,
    command_url: str | None,
    host: str,
    port: int,
    session_attributes: tuple[str, ...],
    max_body_bytes: int | None,
    lock_wait: float | None,
) -> None:
    """Receive OpenTelemetry spans over OTLP/HTTP (POST /v1/traces, protobuf or JSON, gzip or not) and store
    each span as a trace, the spans of a request in one transaction; GET /healthz answers 200 while the
    database does.

    Listens on localhost by default. The database is upgraded to head first (a new SQLite file is created).
    SIGTERM or Ctrl-C lets the requests in flight finish, closes the database and exits 0.
    """
    url = database_url(settings, command_url)
    try:
        from tracestore.otel import server
    except ImportError as exc:
        raise click.ClickException(
            f"`tracestore serve` needs the otel extra ({exc.name} is missing): {OTEL_EXTRA}"
        ) from exc
    _log_to_stderr()

    def listening(bound_host: str, bound_port: int) -> None:
        address = f"[{bound_host}]" if ":" in bound_host else bound_host
        click.echo(
            f"receiving OTLP/HTTP on http://{address}:{bound_port}/v1/traces into {shown(url)} "
            "(Ctrl-C or SIGTERM to stop)"
        )

    server.serve(
        url,
        host=host,
        port=port,
        session_attributes=session_attributes or server.DEFAULT_SESSION_ATTRIBUTES,
        max_body_bytes=max_body_bytes or server.DEFAULT_MAX_BODY_BYTES,
        lock_wait=server.DEFAULT_LOCK_WAIT if lock_wait is None else lock_wait,
        on_listening=listening,
    )
    click.echo("stopped", err=True)


def _log_to_stderr() -> None:
    """The receiver's warnings and errors (refused spans, database failures) go to stderr, one line each."""
    logger = logging.getLogger("tracestore.otel")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if logger.level == logging.NOTSET else logger.level)
