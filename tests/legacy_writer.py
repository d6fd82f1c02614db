"""The previous release writing during a rolling deploy, links first: `python tests/legacy_writer.py URL STOP SEED`.

Each trace is written the way the legacy implementation wrote it: plain driver, autocommit, foreign
keys off, the session links committed first, then (after a pause of 5-50 ms) the trace. It writes
until the file STOP exists, finishing the trace it is on, and prints one JSON line per trace it
completed: {"id", "created_at", "sessions"}.
"""

from __future__ import annotations

import json
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

SESSIONS = ("lw-a", "lw-b", "lw-c")


def connect(url: str) -> tuple[Any, str]:
    """An autocommit connection of the plain driver, and its parameter placeholder."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        # Foreign keys are off by default in sqlite3, as the legacy implementation ran.
        return sqlite3.connect(parsed.database or "", timeout=60, isolation_level=None), "?"
    import psycopg

    return psycopg.connect(
        parsed.set(drivername="postgresql").render_as_string(hide_password=False), autocommit=True
    ), "%s"


def main() -> None:
    url, stop, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    connection, mark = connect(url)
    insert_link = f"INSERT INTO trace_sessions (trace_id, session_uid) VALUES ({mark}, {mark})"
    insert_trace = f"INSERT INTO traces VALUES ({mark}, {mark}, {mark}, {mark}, {mark}, {mark}, {mark})"
    n = 0
    while not stop.exists():
        # Random ids, so on PostgreSQL the links land all over the key ranges the backfill walks.
        trace_id = f"lw-{rng.getrandbits(64):016x}-{n}"
        sessions = sorted(rng.sample(SESSIONS, rng.choice((1, 1, 2))))
        created = time.time()
        for uid in sessions:
            connection.execute(insert_link, (trace_id, uid))
        time.sleep(rng.uniform(0.005, 0.05))
        connection.execute(
            insert_trace, (trace_id, "legacy", "old-release", json.dumps({"n": n}), "{}", created, created)
        )
        print(json.dumps({"id": trace_id, "created_at": created, "sessions": sessions}), flush=True)
        n += 1
    connection.close()


if __name__ == "__main__":
    main()
