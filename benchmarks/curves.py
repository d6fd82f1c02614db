"""Latency against the window's length and against the limit: store, raw floor and legacy query on one file."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from common import HOT_UID, connect, interleaved
from floor import fetch_only, legacy_query, legacy_sql, raw_query, store_sql

from tracestore import TraceStore
from tracestore.testing.bulk import GenerateReport

WINDOWS_S = (60.0, 600.0, 3600.0, 6 * 3600.0, 86400.0)
LIMITS = (1, 10, 100, 1000, 10000)


def measure(
    migrated: Path, legacy: Path, data: GenerateReport, *, runs: int, legacy_runs: int
) -> dict[str, list[dict[str, Any]]]:
    """One point per window and per limit: median ms of the store, the raw floor, and the legacy query.

    The legacy query gets fewer rounds: it reads the whole hot session whatever the window, so its
    time hardly moves along either axis (that is the point of the plot).
    """
    raw, old = connect(migrated), connect(legacy, read_only=True)
    points: dict[str, list[dict[str, Any]]] = {"window": [], "limit": []}
    questions = [("window", seconds, {"since": data.now - seconds}) for seconds in WINDOWS_S]
    questions += [("limit", limit, {"limit": limit}) for limit in LIMITS]
    with TraceStore(f"sqlite:///{migrated}", auto_upgrade=False) as store:
        for axis, x, question in questions:
            sql, params = store_sql(session_uid=HOT_UID, **question)
            variants = {
                "store": functools.partial(store.get_by_session_uid, HOT_UID, **question),
                "raw": raw_query(raw, sql, params),
                "raw-sql": fetch_only(raw, sql, params),
            }
            rows = len(variants["store"]())
            rounds = max(3, runs // max(1, rows // 1000 + 1))  # fewer rounds for the 100K-row windows
            timings = interleaved(variants, runs=rounds, warmup=2)
            legacy_timing = interleaved(
                {"legacy": legacy_query(old, *legacy_sql(session_uid=HOT_UID, **question))}, runs=legacy_runs, warmup=1
            )["legacy"]
            points[axis].append(
                {
                    "x": x,
                    "rows": rows,
                    "rounds": rounds,
                    **{f"{name}_ms": timing.median_ms for name, timing in timings.items()},
                    "legacy_ms": legacy_timing.median_ms,
                    "legacy_rounds": legacy_runs,
                }
            )
    raw.close()
    old.close()
    return points
