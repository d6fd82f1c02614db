"""The first query after the kernel's page cache lost the file: a store process that just started on a cold disk."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import HOT_UID, LATEST, Timing, checkpoint, connect, evict_from_page_cache
from floor import raw_query, store_sql

from tracestore import TraceStore


def measure(migrated: Path, *, since: float, runs: int) -> dict[str, Any]:
    """Median of `runs` cold queries per variant, variants rotated; every query starts from an evicted file.

    Each query gets a new connection (SQLite keeps its own page cache per connection) opened after the
    eviction; only the query is timed, not opening the store. Opening reads the schema, so the first
    pages of the file are warm again: the query pays for the index, table and JSON pages it reads.
    """
    checkpoint(migrated)
    url = f"sqlite:///{migrated}"
    window_sql, window_params = store_sql(session_uid=HOT_UID, since=since)
    latest_sql, latest_params = store_sql(session_uid=HOT_UID, limit=LATEST)

    def store_query(**question: Any) -> Callable[[], float]:
        def run() -> float:
            with TraceStore(url, auto_upgrade=False) as store:
                query = functools.partial(store.get_by_session_uid, HOT_UID, **question)
                return _timed(query)

        return run

    def raw(sql: str, params: tuple[Any, ...]) -> Callable[[], float]:
        def run() -> float:
            connection = connect(migrated)
            try:
                return _timed(raw_query(connection, sql, params))
            finally:
                connection.close()

        return run

    variants = {
        "store window": store_query(since=since),
        "raw window": raw(window_sql, window_params),
        "store latest": store_query(limit=LATEST),
        "raw latest": raw(latest_sql, latest_params),
    }
    samples: dict[str, list[int]] = {name: [] for name in variants}
    resident: list[int] = []
    names = list(variants)
    for r in range(runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            resident.append(evict_from_page_cache(migrated))
            samples[name].append(int(variants[name]() * 1e9))
    return {
        "timings": {name: Timing.of(values) for name, values in samples.items()},
        "resident_after_eviction_bytes": max(resident) if resident else -1,
        "file_bytes": migrated.stat().st_size,
    }


def _timed(query: Callable[[], Any]) -> float:
    started = time.perf_counter()
    query()
    return time.perf_counter() - started
