"""Readers (threads, then asyncio tasks) querying while one writer process ingests: reads/s, p99 and writer rows/s.

Each configuration runs for the same number of seconds; readers and writer are also measured alone in
the same run, so the table shows what each costs the other. The writer is another process (another
application server, as in production) calling store_batch as fast as it can; its traces are
timestamped before the data set, and the readers ask for the data set's last 10 minutes
(`query(session_uid, since, until)`), so every read returns the same rows (the write benchmark's
traces, stored after the data set's end, stay out too) and the read rate does not drift with the
file's growth.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from common import HOT_UID
from writers import fresh_traces

from tracestore import AsyncTraceStore, TraceStore

WRITER_BATCH = 100


def _ingest(url: str, start_at: float, seconds: float, created_at: float, seed: int, out: Any) -> None:
    """Writer process: store_batch until the deadline; reports rows and the seconds spent inside store_batch."""
    rows, busy, batch_no = 0, 0.0, 0
    with TraceStore(url, auto_upgrade=False) as store:
        time.sleep(max(0.0, start_at - time.time()))
        deadline = start_at + seconds
        while time.time() < deadline:
            batch = fresh_traces(
                WRITER_BATCH, start=created_at + batch_no * WRITER_BATCH * 0.001, seed=seed + batch_no, hot_uid=HOT_UID
            )
            began = time.perf_counter()
            store.store_batch(batch)
            busy += time.perf_counter() - began
            rows, batch_no = rows + len(batch), batch_no + 1
    out.put({"rows": rows, "busy_s": busy, "rows_per_s": rows / busy if busy else 0.0})


class Writer:
    """A writer process started to begin at a given wall time (so readers and writer start together)."""

    def __init__(self, url: str, *, start_at: float, seconds: float, created_at: float, seed: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.process = context.Process(
            target=_ingest, args=(url, start_at, seconds, created_at, seed, self.queue), daemon=True
        )
        self.process.start()

    def result(self) -> dict[str, Any]:
        report = self.queue.get(timeout=120)
        self.process.join(timeout=30)
        return dict(report)


def _summary(latencies: list[float], seconds: float) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "reads": len(ordered),
        "reads_per_s": len(ordered) / seconds,
        "p50_ms": statistics.median(ordered) * 1e3 if ordered else None,
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3 if ordered else None,
    }


def _thread_readers(
    url: str, readers: int, *, since: float, until: float, start_at: float, seconds: float
) -> dict[str, Any]:
    latencies: list[float] = []
    lock = threading.Lock()
    with TraceStore(url, auto_upgrade=False) as store:
        store.query(session_uid=HOT_UID, since=since, until=until)  # warm the pool and the statement cache

        def loop() -> None:
            mine = []
            time.sleep(max(0.0, start_at - time.time()))
            deadline = start_at + seconds
            while (began := time.perf_counter()) and time.time() < deadline:
                store.query(session_uid=HOT_UID, since=since, until=until)
                mine.append(time.perf_counter() - began)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=loop) for _ in range(readers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return _summary(latencies, seconds)


def _task_readers(
    url: str, readers: int, *, since: float, until: float, start_at: float, seconds: float
) -> dict[str, Any]:
    async def run() -> list[float]:
        latencies: list[float] = []
        async with AsyncTraceStore(url, auto_upgrade=False) as store:
            await store.query(session_uid=HOT_UID, since=since, until=until)

            async def loop() -> None:
                await asyncio.sleep(max(0.0, start_at - time.time()))
                deadline = start_at + seconds
                while time.time() < deadline:
                    began = time.perf_counter()
                    await store.query(session_uid=HOT_UID, since=since, until=until)
                    latencies.append(time.perf_counter() - began)

            await asyncio.gather(*(loop() for _ in range(readers)))
        return latencies

    return _summary(asyncio.run(run()), seconds)


def measure(
    migrated: Path, *, since: float, until: float, seconds: float, readers: tuple[int, ...], seed: int
) -> dict[str, Any]:
    """Every configuration for `seconds`: writer alone, each reader setup alone and with the writer."""
    url = f"sqlite:///{migrated}"
    with TraceStore(url, auto_upgrade=False) as store:
        rows = len(store.query(session_uid=HOT_UID, since=since, until=until))
    async_url = f"sqlite+aiosqlite:///{migrated}"
    created_at = since - 90 * 86400.0  # before the data set: see the module docstring
    seed_step = [seed]
    results: dict[str, Any] = {"seconds": seconds, "writer_batch": WRITER_BATCH, "rows": rows, "runs": []}

    def writer(start_at: float) -> Writer:
        seed_step[0] += 1000
        return Writer(url, start_at=start_at, seconds=seconds, created_at=created_at, seed=seed_step[0])

    lead = 3.0  # time for the writer process to start and open its store
    alone = writer(time.time() + lead)
    results["writer_alone"] = alone.result()
    for kind, run_readers, reader_url in (("threads", _thread_readers, url), ("tasks", _task_readers, async_url)):
        for count in readers:
            window = {"since": since, "until": until, "seconds": seconds}
            solo = run_readers(reader_url, count, start_at=time.time() + 0.2, **window)
            start_at = time.time() + lead
            pair = writer(start_at)
            loaded = run_readers(reader_url, count, start_at=start_at, **window)
            results["runs"].append(
                {"kind": kind, "readers": count, "alone": solo, "with_writer": loaded, "writer": pair.result()}
            )
    return results
