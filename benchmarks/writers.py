"""The writers compared in the write benchmarks: the store, its SQL run raw, and the legacy implementation's INSERTs."""

from __future__ import annotations

import random
import sqlite3
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from floor import SQLITE

from tracestore import TraceContext
from tracestore.queries import compiled, statements_for

HOT_SHARE = 0.1


def fresh_traces(
    count: int, *, start: float, seed: int, hot_uid: str, sessions: int = 500, uuid4_ids: bool = False
) -> list[TraceContext]:
    """New traces in the generator's shape: 10 % hot session, 20 % in two sessions, ~300-byte payloads.

    The other `sessions` have uuid-shaped ids, as the generator's do. Trace ids are the store's own
    (time-ordered) unless `uuid4_ids`: random ids, as an application that brings its own would write.
    """
    rng = random.Random(seed)
    others = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(sessions)]
    filler = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz ", k=4096))
    traces = []
    for seq in range(count):
        own_id = {"id": str(uuid.UUID(int=rng.getrandbits(128), version=4))} if uuid4_ids else {}
        sessions = [hot_uid if rng.random() < HOT_SHARE else rng.choice(others)]
        if rng.random() < 0.2:
            sessions.append(rng.choice(others))
        offset = rng.randrange(len(filler) - 250)
        traces.append(
            TraceContext(
                context_type="llm_call",
                namespace="prod",
                data={"seq": seq, "step": 1, "tokens": rng.randrange(8192), "text": filler[offset : offset + 250]},
                metadata={"host": "worker-01", "sdk": "1.4.0", "attempt": 1},
                session_uids=tuple(sessions),
                created_at=start + seq * 0.001,
                **own_id,
            )
        )
    return traces


def encoded(trace: TraceContext) -> dict[str, Any]:
    return {
        "id": trace.id,
        "context_type": trace.context_type,
        "namespace": trace.namespace,
        "data": orjson.dumps(trace.data).decode(),
        "metadata": orjson.dumps(trace.metadata).decode(),
        "created_at": trace.created_at,
        "updated_at": trace.updated_at,
    }


def raw_store_writer(connection: sqlite3.Connection) -> Callable[[list[TraceContext]], None]:
    """The store's write statements, compiled and run with plain sqlite3 as the store runs them: the write floor.

    insert_trace (ON CONFLICT DO NOTHING), upsert_trace only when the insert skipped an existing id,
    then insert_link; one BEGIN IMMEDIATE transaction per batch.
    """
    insert, upsert, link = (compiled(stmt, SQLITE) for stmt in statements_for("sqlite").write_statements)

    def write(batch: list[TraceContext]) -> None:
        traces, links = [], []
        for trace in batch:
            traces.append(insert.args(encoded(trace)))
            for uid in trace.session_uids:
                links.append(link.args({"trace_id": trace.id, "session_uid": uid, "created_at": trace.created_at}))
        connection.execute("BEGIN IMMEDIATE")
        cursor = connection.executemany(insert.sql, traces)
        if cursor.rowcount != len(traces):
            connection.executemany(upsert.sql, traces)
        connection.executemany(link.sql, links)
        connection.execute("COMMIT")

    return write


def plain_writer(connection: sqlite3.Connection, *, junction_time: bool) -> Callable[[list[TraceContext]], None]:
    """Plain INSERTs into both tables, one transaction per batch: what the legacy implementation did
    (junction_time=False), or the same on the migrated schema, whose junction rows carry created_at."""
    link_sql = (
        "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES (?, ?, ?)"
        if junction_time
        else "INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)"
    )

    def write(batch: list[TraceContext]) -> None:
        traces = [tuple(encoded(trace).values()) for trace in batch]
        links = [
            (trace.id, uid, trace.created_at) if junction_time else (trace.id, uid)
            for trace in batch
            for uid in trace.session_uids
        ]
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany("INSERT INTO traces VALUES (?, ?, ?, ?, ?, ?, ?)", traces)
        connection.executemany(link_sql, links)
        connection.execute("COMMIT")

    return write
