"""A process of the concurrency and crash tests: `python tests/load_worker.py MODE URL ...`, a JSON report on stdout.

writer URL NAME SECONDS BATCH [async]: store batches of BATCH traces sharing a marker (metadata) and a
    created_at, in session "hot", until SECONDS pass; report the markers acknowledged (store_batch returned).
reader URL SECONDS BATCH: read the session's latest 200 again and again; report latencies and any batch
    seen in part.
stall URL BATCH: store one batch and stop inside its transaction, between the trace and link inserts (says
    "inside" on stdout, then sleeps): the parent kills it there.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from typing import Any

from tracestore import AsyncTraceStore, TraceContext, TraceStore


def batch_of(marker: str, size: int) -> list[TraceContext]:
    now = time.time()
    return [
        TraceContext(
            context_type="span",
            namespace="load",
            data={"n": index, "pad": "x" * 200},
            metadata={"marker": marker, "size": size},
            created_at=now,
            session_uids=("hot",),
        )
        for index in range(size)
    ]


def writer(url: str, name: str, seconds: float, size: int, mode: str) -> dict[str, Any]:
    acknowledged: list[str] = []
    started = time.perf_counter()
    if mode == "async":

        async def run() -> None:
            async with AsyncTraceStore(url) as store:
                while time.perf_counter() - started < seconds:
                    marker = f"{name}-{len(acknowledged)}"
                    await store.store_batch(batch_of(marker, size))
                    acknowledged.append(marker)

        asyncio.run(run())
    else:
        with TraceStore(url) as store:
            while time.perf_counter() - started < seconds:
                marker = f"{name}-{len(acknowledged)}"
                store.store_batch(batch_of(marker, size))
                acknowledged.append(marker)
    return {"acknowledged": acknowledged, "seconds": time.perf_counter() - started}


def reader(url: str, seconds: float, size: int) -> dict[str, Any]:
    latencies: list[float] = []
    partial: list[tuple[str, int]] = []
    with TraceStore(url) as store:
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            before = time.perf_counter()
            traces = store.get_by_session_uid("hot", limit=200)
            latencies.append(time.perf_counter() - before)
            counts = Counter(str(trace.metadata["marker"]) for trace in traces)
            # Only the oldest created_at in the answer can be cut by the limit: every other batch is whole.
            oldest = min((trace.created_at for trace in traces), default=0.0)
            cut = {str(t.metadata["marker"]) for t in traces if t.created_at == oldest} if len(traces) == 200 else set()
            partial += [(marker, n) for marker, n in counts.items() if n != size and marker not in cut]
    return {"latencies": latencies, "partial": partial}


def stall(url: str, size: int) -> None:
    with TraceStore(url) as store:
        if store.engine.dialect.name == "sqlite":
            from sqlalchemy import event

            def on_connect(dbapi_connection: Any, record: Any) -> None:
                def trace(statement: str) -> None:
                    # The links come after every trace row of the batch: the transaction holds them all.
                    if statement.startswith("INSERT INTO trace_sessions"):
                        print("inside", flush=True)
                        time.sleep(60)

                dbapi_connection.set_trace_callback(trace)

            event.listen(store.engine, "connect", on_connect)
            store.engine.dispose()
        batch = batch_of("stalled", size)
        # On PostgreSQL the parent holds an uncommitted row with this id: the insert waits on it, inside
        # the transaction, with every other trace of the batch already inserted.
        batch[-1].id = "stall-blocker"
        store.store_batch(batch)


def main(argv: list[str]) -> None:
    mode, url = argv[0], argv[1]
    if mode == "writer":
        report = writer(url, argv[2], float(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else "sync")
    elif mode == "reader":
        report = reader(url, float(argv[2]), int(argv[3]))
    else:
        stall(url, int(argv[2]))
        return
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
