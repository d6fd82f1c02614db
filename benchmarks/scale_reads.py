"""Read latency as the file grows: the same questions on two head files of one shape (say 10M and 100M traces),
interleaved in one process, so the ratio large / small is not the machine's drift between two runs.

Asked of each file: the hot session's 10-minute window and latest 100, keyset page 1000 (100 per page, the
cursor found once beforehand), and the cold window (the file evicted from the OS page cache, a new store per
query). Then `store_batch` of the same new traces into each file, in place (the files grow), batch by batch
in alternating order. The files come from the bulk generator with the benchmarks' data options
(common.data_options), at head; make them with small payloads when the disk is short:

    python -c "from common import data_options; from tracestore.testing.bulk import generate; \\
        generate('h100m.db', schema='head', payload_bytes=0, two_session_share=0.0, **data_options(100_000_000, 42))"
    python benchmarks/scale_reads.py --small h10m.db --large h100m.db --json scale.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cold_cache
from common import HOT_UID, LATEST, NOW, WINDOW_S, interleaved
from write_path import interleave
from writers import fresh_traces

from tracestore import TraceStore

PAGE = 100
DEEP = 1000


def questions(store: TraceStore, deep: int) -> dict[str, Callable[[], Any]]:
    cursor = None
    for _ in range(deep - 1):
        _, cursor = store.page_by_session_uid(HOT_UID, limit=PAGE, cursor=cursor)
    return {
        "window": functools.partial(store.get_by_session_uid, HOT_UID, since=NOW - WINDOW_S),
        "latest": functools.partial(store.get_by_session_uid, HOT_UID, limit=LATEST),
        "deep page": functools.partial(store.page_by_session_uid, HOT_UID, limit=PAGE, cursor=cursor),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=Path, required=True)
    parser.add_argument("--large", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=61)
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--write-traces", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    files = {"small": args.small, "large": args.large}
    out: dict[str, Any] = {"files": {name: str(path) for name, path in files.items()}}

    stores = {name: TraceStore(f"sqlite:///{path}", auto_upgrade=False) for name, path in files.items()}
    try:
        # Page 1000, or the smaller file's last full page of the hot session.
        deep = max(1, min(DEEP, stores["small"].count_traces(session_uid=HOT_UID) // PAGE))
        out["deep_page"] = deep
        asked = {name: questions(store, deep) for name, store in stores.items()}
        answers = {name: {q: len(run()) if q != "deep page" else len(run().items) for q, run in a.items()}
                   for name, a in asked.items()}  # fmt: skip
        out["rows"] = answers
        variants = {f"{name} {q}": run for name, a in asked.items() for q, run in a.items()}
        timings = interleaved(variants, runs=args.runs, warmup=5)
        out["warm"] = {name: asdict(t) for name, t in timings.items()}
        for q in asked["small"]:
            small, large = timings[f"small {q}"], timings[f"large {q}"]
            print(f"{q:10s} small {small.median_ms:8.2f} ms  large {large.median_ms:8.2f} ms"
                  f"  large / small {large.median_ms / small.median_ms:.2f}x (rows {answers['large'][q]})")  # fmt: skip
    finally:
        for store in stores.values():
            store.close()

    cold = {name: cold_cache.measure(path, since=NOW - WINDOW_S, runs=args.cold_runs) for name, path in files.items()}
    out["cold"] = {name: {k: asdict(v) for k, v in c["timings"].items()} for name, c in cold.items()}
    for variant in ("store window", "raw window"):
        small, large = cold["small"]["timings"][variant], cold["large"]["timings"][variant]
        print(f"cold {variant}: small {small.median_ms:.1f} ms, large {large.median_ms:.1f} ms,"
              f" large / small {large.median_ms / small.median_ms:.2f}x")  # fmt: skip

    # Into sessions of their own: the hot session's window and latest 100 stay what they were for a next run.
    traces = fresh_traces(args.write_traces, start=NOW + 10, seed=7, hot_uid="scale-writes")
    batches = [traces[i : i + args.batch_size] for i in range(0, len(traces), args.batch_size)]
    with TraceStore(f"sqlite:///{files['small']}") as small, TraceStore(f"sqlite:///{files['large']}") as large:
        written = interleave({"small": small.store_batch, "large": large.store_batch}, batches)
    rates = {name: result["traces_per_s"] for name, result in written.items()}
    out["store_batch_traces_per_s"] = rates
    print(f"store_batch: small {rates['small']:,.0f}/s, large {rates['large']:,.0f}/s,"
          f" large / small {rates['large'] / rates['small']:.2f}x")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
