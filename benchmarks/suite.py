"""The benchmark suite behind `make bench`: every section at one scale, plus the latency-against-size points.

    python benchmarks/suite.py --scale 10m [--out benchmarks/results/10m] [--runs 61] [--keep]

Runs bench_query.py once per smaller size of the ladder 100K / 1M / 10M (`--sections queries`) and once
in full at `--scale` (with the PostgreSQL part when TRACESTORE_PG_URL names a server: `make bench` runs
under scripts/with-postgres), then orm_path.py at `--scale`, each in its own process, then writes into
`--out` (default benchmarks/results/<scale>/): results.json (every measurement, the machine, the sizes),
results.txt (the full printed table and query plans), orm-path.json and orm-path.txt (the ORM path) and,
through report.py, results.md and the PNG plots. Exit status: the worst of the runs' (2 = some variant
returned different rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import report
from common import DEFAULT_WORKDIR, RESULTS_DIR, git_revision, parse_scale, scale_name

BENCH = Path(__file__).resolve().parent / "bench_query.py"
ORM_PATH = Path(__file__).resolve().parent / "orm_path.py"
LADDER = (100_000, 1_000_000, 10_000_000)


def sizes_below(scale: int) -> list[int]:
    """The ladder's sizes under `scale`; a small scale gets one point a tenth of its size, so a curve exists."""
    below = [size for size in LADDER if size < scale]
    return below or [max(2_000, scale // 10)]


def machine() -> dict[str, Any]:
    """What the figures were measured on: they mean little without it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(memory / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "revision": git_revision(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def run_bench(arguments: list[str], *, log: Path | None = None, script: Path = BENCH) -> int:
    """One bench_query.py (or `script`) process; its table goes to the terminal and, for a full run, to `log`."""
    command = [sys.executable, str(script), *arguments]
    print(f"$ {' '.join(command[1:])}", file=sys.stderr, flush=True)
    if log is None:
        return subprocess.run(command, check=False).returncode
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    sys.stdout.write(done.stdout)
    log.write_text(done.stdout)
    return done.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=parse_scale, default="1m", help="the full run's traces: 100k, 1m, 10m...")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results/<scale>)")
    parser.add_argument("--runs", type=int, default=61, help="interleaved rounds per query (default 61)")
    parser.add_argument("--legacy-runs", type=int, default=0, help="rounds of the legacy query (default: by scale)")
    parser.add_argument("--write-traces", type=int, default=20_000)
    parser.add_argument("--load-seconds", type=float, default=5.0)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--keep", action="store_true", help="keep the legacy files and reuse them next time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--postgresql",
        choices=("auto", "always", "never"),
        default="auto",
        help="the PostgreSQL part of the full run (TRACESTORE_PG_URL); auto: up to 2M traces when a server is set",
    )
    args = parser.parse_args(argv)
    out: Path = args.out or RESULTS_DIR / scale_name(args.scale)
    out.mkdir(parents=True, exist_ok=True)

    common = ["--runs", str(args.runs), "--workdir", str(args.workdir), "--seed", str(args.seed)]
    common += ["--keep"] if args.keep else []
    # The legacy query reads the whole hot session: seconds per run at 10M, so fewer rounds there.
    legacy_runs = args.legacy_runs or (7 if args.scale >= 5_000_000 else 0)
    full = [*common, "--write-traces", str(args.write_traces), "--load-seconds", str(args.load_seconds)]
    full += ["--legacy-runs", str(legacy_runs)] if legacy_runs else []
    full += ["--postgresql", args.postgresql]

    statuses, size_files = [], []
    for size in sizes_below(args.scale):
        path = out / f"size-{scale_name(size)}.json"
        path.unlink(missing_ok=True)
        statuses.append(run_bench(["--scale", str(size), "--sections", "queries", "--json", str(path), *common]))
        size_files.append(path.name)
    results = out / "results.json"
    results.unlink(missing_ok=True)
    statuses.append(run_bench(["--scale", str(args.scale), "--json", str(results), *full], log=out / "results.txt"))
    if not results.exists():
        print(f"the full run wrote no {results}", file=sys.stderr)
        return max(statuses) or 1

    # The ORM path (tracestore.orm through an application's Session) on a file of its own at the same scale.
    orm_path = out / "orm-path.json"
    orm_path.unlink(missing_ok=True)
    orm_arguments = ["--scale", str(args.scale), "--json", str(orm_path), *common]
    statuses.append(run_bench(orm_arguments, log=out / "orm-path.txt", script=ORM_PATH))

    data = json.loads(results.read_text())
    data["machine"] = machine()
    data["size_files"] = size_files
    if orm_path.exists():
        data["orm_path_file"] = orm_path.name
    results.write_text(json.dumps(data, indent=2))
    written = report.build(out)
    print(f"\nwrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
