"""Run `upgrade head` (or `finalize`) and SIGKILL this very process right after the Nth statement matching a pattern.

Usage: python tests/kill_during_upgrade.py URL REGEX N BATCH_SIZE [upgrade|finalize]

A real kill -9 (no cleanup, no rollback, no atexit) at a chosen point of the migration: the statement
has run, its transaction has not committed (unless the statement was the COMMIT).
"""

from __future__ import annotations

import os
import re
import signal
import sys

from sqlalchemy import Engine, event

from tracestore.migrate import finalize, upgrade


def main() -> None:
    url, pattern, occurrence, batch_size = sys.argv[1], re.compile(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    action = sys.argv[5] if len(sys.argv) > 5 else "upgrade"
    seen = 0

    @event.listens_for(Engine, "after_cursor_execute")
    def kill_after(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        nonlocal seen
        if pattern.search(statement.strip()):
            seen += 1
            if seen == occurrence:
                os.kill(os.getpid(), signal.SIGKILL)

    if action == "finalize":
        finalize(url, batch_size=batch_size)
    else:
        upgrade(url, batch_size=batch_size)
    sys.exit(3)  # the pattern never matched often enough: the test asked for a point that does not exist


if __name__ == "__main__":
    main()
