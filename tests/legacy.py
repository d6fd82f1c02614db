"""Build databases the way the pre-Alembic implementation did: plain sqlite3, legacy DDL, foreign keys off."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

LEGACY_DDL = """
CREATE TABLE traces (
    id TEXT PRIMARY KEY,
    context_type TEXT NOT NULL,
    namespace TEXT NOT NULL,
    data TEXT NOT NULL,
    metadata TEXT DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE trace_sessions (
    trace_id TEXT NOT NULL,
    session_uid TEXT NOT NULL,
    PRIMARY KEY (trace_id, session_uid),
    FOREIGN KEY (trace_id) REFERENCES traces(id) ON DELETE CASCADE
);
CREATE INDEX idx_trace_sessions_uid ON trace_sessions(session_uid);
CREATE INDEX idx_trace_sessions_trace ON trace_sessions(trace_id);
CREATE INDEX idx_traces_created_at ON traces(created_at);
CREATE INDEX idx_traces_type ON traces(context_type);
CREATE INDEX idx_traces_namespace ON traces(namespace);
"""

LegacyRow = tuple[str, str, str, object, dict[str, object], float, float, tuple[str, ...]]
"""(id, context_type, namespace, data, metadata, created_at, updated_at, session_uids)"""


def create_legacy_db(path: Path, rows: Iterable[LegacyRow] = (), orphan_links: Iterable[tuple[str, str]] = ()) -> None:
    """A legacy-schema file holding `rows`, plus junction rows pointing at traces that do not exist."""
    connection = sqlite3.connect(path)
    try:
        connection.executescript(LEGACY_DDL)
        with connection:
            for trace_id, context_type, namespace, data, metadata, created, updated, sessions in rows:
                connection.execute(
                    "INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (trace_id, context_type, namespace, json.dumps(data), json.dumps(metadata), created, updated),
                )
                connection.executemany(
                    "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)",
                    [(trace_id, uid) for uid in sessions],
                )
            connection.executemany(
                "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)", list(orphan_links)
            )
    finally:
        connection.close()
