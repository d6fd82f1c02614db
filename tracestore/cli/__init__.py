"""What the command line offers: migrations, schema status and checks, the recent-traces query and a demo.

Thin on purpose: each command parses its arguments, calls the public API (TraceStore,
tracestore.migrate) and prints. Library errors become a one-line message and exit code 1
(2 for invalid arguments), never a traceback.
"""

from tracestore.cli import check, data, export, migrations, reads, retention, serve, tail  # noqa: F401  (each registers its commands on main)
from tracestore.cli.app import main, parse_duration

__all__ = ["main", "parse_duration"]
