"""Peak RSS and rate of `tracestore export` against the number of traces: memory must not grow with N.

    .venv/bin/python benchmarks/export_rss.py                         # 100K and 1M, both formats, --all and a session
    .venv/bin/python benchmarks/export_rss.py --scales 10k,100k --keep   # keep (and reuse) the generated files

Each export runs as its own `tracestore export` process (the console script next to this interpreter), writing to
a file in the scratch directory; its peak RSS is that process's own ru_maxrss (os.wait4: RUSAGE_CHILDREN would be
the largest of every child so far, `tracestore generate` included). The files come from `tracestore generate`
(seed 1, its default shape: a hot session with a tenth of the traces, 300-byte payloads, 30 days). The baseline
is an export of an empty range: the interpreter, the imports and the engine, what every export pays.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import DEFAULT_WORKDIR, HOT_UID, parse_scale, remove_db, scale_name

from tracestore import TraceStore

TRACESTORE = Path(sys.executable).parent / "tracestore"
FORMATS = ("jsonl", "otlp-json")
FUTURE = "4102444800"  # 2100-01-01: an empty range


@dataclass
class Run:
    traces_in_file: int
    scope: str
    format: str
    exported: int
    seconds: float
    traces_per_s: float
    peak_rss_mb: float
    output_mb: float


def make_file(workdir: Path, traces: int, keep: bool) -> Path:
    path = workdir / f"export-{scale_name(traces)}.db"
    if keep and path.exists():
        return path
    remove_db(path)
    subprocess.run(
        [str(TRACESTORE), "generate", str(path), "--traces", str(traces), "--seed", "1"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return path


def export(path: Path, scope: list[str], output_format: str, out: Path, *extra: str) -> tuple[int, float, float, int]:
    """(traces exported, seconds, peak RSS in bytes, output bytes) of one `tracestore export` process."""
    args = [str(TRACESTORE), "--url", f"sqlite:///{path}", "export", *scope, "--format", output_format, "-o", str(out)]
    process = subprocess.Popen([*args, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert process.stderr is not None
    message = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {message}")
    # The command's own figures: its time leaves out the interpreter's start and the imports (~1 s).
    match = re.search(r"([\d,]+) traces exported in ([\d.]+) s", message)
    assert match, message
    exported, seconds = int(match[1].replace(",", "")), float(match[2])
    size = out.stat().st_size
    out.unlink()
    return exported, seconds, usage.ru_maxrss * 1024, size  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scales", default="100k,1m", help="comma-separated trace counts (default 100k,1m)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch directory (gitignored)")
    parser.add_argument("--keep", action="store_true", help="keep the generated files, and reuse them next time")
    parser.add_argument("--json", type=Path, help="write the runs here too")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    header = ("traces", "scope", "format", "exported", "s", "traces/s", "peak RSS", "output")
    print("{:>8}  {:<12} {:<10} {:>9} {:>7} {:>9} {:>9} {:>9}".format(*header))
    for traces in [parse_scale(text) for text in args.scales.split(",")]:
        path = make_file(args.workdir, traces, args.keep)
        out = args.workdir / "export-out"
        with TraceStore(f"sqlite:///{path}", auto_upgrade=False) as store:
            for label, options in (("--all", {}), (HOT_UID, {"session_uid": HOT_UID})):
                started = time.perf_counter()
                store.count_traces(**options)
                elapsed_ms = (time.perf_counter() - started) * 1000
                print(f"{traces:>8,}  count {label}: {elapsed_ms:.1f} ms (the progress bar's total)")
        scopes = {"baseline": ["--all", "--since", FUTURE], "--all": ["--all"], f"session {HOT_UID}": [HOT_UID]}
        for scope, scope_args in scopes.items():
            for output_format in FORMATS if scope != "baseline" else FORMATS[:1]:
                exported, seconds, rss, size = export(path, scope_args, output_format, out)
                rate = exported / seconds if seconds else 0.0
                run = Run(traces, scope, output_format, exported, seconds, rate, rss / 1e6, size / 1e6)
                runs.append(run)
                print(
                    f"{traces:>8,}  {scope:<12} {output_format:<10} {exported:>9,} {seconds:>7.2f} "
                    f"{run.traces_per_s:>9,.0f} {run.peak_rss_mb:>6.1f} MB {run.output_mb:>6.0f} MB",
                    flush=True,
                )
        if not args.keep:
            remove_db(path)
    if args.json:
        args.json.write_text(json.dumps([asdict(run) for run in runs], indent=2))


if __name__ == "__main__":
    main()
