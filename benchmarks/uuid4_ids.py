"""A copy of a legacy file with every trace id replaced by a random-looking (uuid4) id, rows in the same order.

The bulk generator writes time-ordered (UUIDv7-shaped) ids, so the traces' primary key is filled in
time order; deployments that used uuid4 ids have that index in random order instead, which changes
where every lookup of a trace by its id lands. The copy keeps everything else: the rows, their rowid
order (creation order), the sessions, and the legacy schema with its indexes built after the load.

    python benchmarks/uuid4_ids.py legacy.db legacy-uuid4.db
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import uuid
from pathlib import Path

from tracestore.testing.bulk import LEGACY_INDEXES_DDL, LEGACY_TABLES_DDL


def uuid4_of(trace_id: str) -> str:
    """A uuid4-shaped id that is a function of the old id: the same file gives the same copy."""
    return str(uuid.UUID(bytes=hashlib.blake2b(trace_id.encode(), digest_size=16).digest(), version=4))


def copy_with_uuid4_ids(source: Path, target: Path) -> None:
    """Write `target` (which must not exist): `source`'s legacy rows, in rowid order, with uuid4 trace ids."""
    if target.exists():
        raise FileExistsError(target)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    connection = sqlite3.connect(partial, isolation_level=None)
    try:
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-262144", "temp_store=MEMORY"):
            connection.execute(f"PRAGMA {pragma}")
        connection.create_function("uuid4_of", 1, uuid4_of, deterministic=True)
        connection.executescript(LEGACY_TABLES_DDL)
        connection.execute("ATTACH DATABASE ? AS source", (f"file:{source}?mode=ro",))
        connection.execute("BEGIN")
        connection.execute(
            "INSERT INTO traces SELECT uuid4_of(id), context_type, namespace, data, metadata, created_at, updated_at"
            " FROM source.traces ORDER BY rowid"
        )
        connection.execute(
            "INSERT INTO trace_sessions (trace_id, session_uid)"
            " SELECT uuid4_of(trace_id), session_uid FROM source.trace_sessions ORDER BY rowid"
        )
        connection.execute("COMMIT")
        connection.execute("DETACH DATABASE source")
        connection.executescript(LEGACY_INDEXES_DDL)
    finally:
        connection.close()
    partial.replace(target)


if __name__ == "__main__":
    copy_with_uuid4_ids(Path(sys.argv[1]), Path(sys.argv[2]))
