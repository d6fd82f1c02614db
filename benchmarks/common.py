"""What every benchmark shares: the data set's constants, interleaved timing, scratch files, and the results table."""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tracestore.dialects.sqlite_connect import SQLITE_PRAGMAS

NOW = 1_750_000_000.0  # fixed, so a kept file and a fresh one hold the same rows
WINDOW_S = 600.0
LATEST = 100
HOT_UID = "hot"
DEFAULT_WORKDIR = Path(__file__).resolve().parent / "scratch"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- timing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    runs: int
    p99_ms: float | None = None

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Timing:
        ordered = sorted(samples_ns)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e6
        return cls(statistics.median(ordered) / 1e6, ordered[0] / 1e6, len(ordered), p99)


def data_options(traces: int, seed: int) -> dict[str, Any]:
    """The generator options of the benchmarks' data set: a hot session with a tenth of the traces and a burst in
    its last WINDOW_S seconds, at a fixed NOW (the scripts share a kept file when these match)."""
    return {
        "traces": traces,
        "seed": seed,
        "hot_session_share": 0.1,
        "hot_session_uid": HOT_UID,
        "recent_burst": min(1000, max(1, round(traces * 0.1) // 10)),
        "recent_window_s": WINDOW_S,
        "now": NOW,
    }


def rounds(names: list[str], runs: int) -> list[list[str]]:
    # Rotate the order every round, so no variant always runs first or right after the same other one.
    return [names[r % len(names) :] + names[: r % len(names)] for r in range(runs)]


def interleaved(variants: dict[str, Callable[[], Any]], *, runs: int, warmup: int) -> dict[str, Timing]:
    """Median wall time of each variant, all variants timed once per round."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[int]] = {name: [] for name in variants}
    gc.collect()
    for order in rounds(list(variants), runs):
        for name in order:
            started = time.perf_counter_ns()
            variants[name]()
            samples[name].append(time.perf_counter_ns() - started)
    return {name: Timing.of(values) for name, values in samples.items()}


async def interleaved_async(variants: dict[str, Callable[[], Any]], *, runs: int, warmup: int) -> dict[str, Timing]:
    """interleaved() inside an event loop: a variant may return an awaitable, which is awaited in the timing."""

    async def call(run: Callable[[], Any]) -> None:
        result = run()
        if inspect.isawaitable(result):
            await result

    for _ in range(warmup):
        for run in variants.values():
            await call(run)
    samples: dict[str, list[int]] = {name: [] for name in variants}
    gc.collect()
    for order in rounds(list(variants), runs):
        for name in order:
            started = time.perf_counter_ns()
            await call(variants[name])
            samples[name].append(time.perf_counter_ns() - started)
    return {name: Timing.of(values) for name, values in samples.items()}


# -- files -----------------------------------------------------------------------------------------
def connect(path: Path, *, read_only: bool = False) -> sqlite3.Connection:
    """A plain sqlite3 connection with the store's own pragmas (read-only ones keep the file untouched)."""
    if read_only:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        connection.execute("PRAGMA cache_size=-65536")
        return connection
    connection = sqlite3.connect(path, isolation_level=None)
    for name, value in SQLITE_PRAGMAS:
        connection.execute(f"PRAGMA {name}={value}")
    return connection


def object_sizes(path: Path) -> dict[str, int]:
    """Bytes of every table and index, from SQLite's dbstat virtual table."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
        return dict(connection.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"))


def checkpoint(path: Path) -> None:
    """Fold the WAL into the main file, so its size is the database's size."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def remove_db(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal", "-migration.lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def copy_db(source: Path, target: Path) -> Path:
    """A copy of the database, WAL folded in first (copying the main file alone could miss committed pages)."""
    remove_db(target)
    checkpoint(source)
    shutil.copyfile(source, target)
    return target


def evict_from_page_cache(path: Path) -> int:
    """Ask the kernel to drop the file's cached pages (no root needed); returns the bytes still cached.

    posix_fadvise(DONTNEED) drops clean pages only, so the file is checkpointed and closed first by
    the caller. The residue is read with util-linux's fincore when it is installed (-1 otherwise).
    """
    for name in (str(path), f"{path}-wal"):
        if not os.path.exists(name):
            continue
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if not shutil.which("fincore"):
        return -1
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return int(done.stdout.split()[0]) if done.returncode == 0 and done.stdout.strip() else -1


def git_revision() -> str:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files), to label results."""
    try:
        done = subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return done.stdout.strip() or "unknown"


def parse_scale(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([km]?)", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"scale must look like 10k, 100k, 1m or 2m, not {text!r}")
    return int(float(match[1]) * {"": 1, "k": 1_000, "m": 1_000_000}[match[2]])


def scale_name(traces: int) -> str:
    """10000000 -> '10m', 100000 -> '100k': the inverse of parse_scale for round numbers."""
    for unit, size in (("m", 1_000_000), ("k", 1_000)):
        if traces >= size and traces % size == 0:
            return f"{traces // size}{unit}"
    return str(traces)


# -- the results table -----------------------------------------------------------------------------
@dataclass
class Line:
    """One row of the results table: a ratio (or a plain value) and the issue's target for it."""

    label: str
    measured: str
    reference: str = ""
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None

    def verdict(self) -> str:
        return "" if self.ok is None else ("ok" if self.ok else "MISSED")

    def cells(self) -> tuple[str, ...]:
        ratio = f"{self.ratio:.2f}x" if self.ratio is not None else ""
        return (self.label, self.measured, self.reference, ratio, self.target, self.verdict())


COLUMNS = ("measure", "measured", "floor / base", "ratio", "target", "verdict")


def ratio_line(
    label: str, measured: Timing, base: Timing, limit: float | None = None, *, at_least: bool = False
) -> Line:
    """A Line for measured / base; with a limit, the target is ratio <= limit (>= limit with at_least)."""
    ratio = measured.median_ms / base.median_ms
    line = Line(label, ms(measured), ms(base), ratio)
    if limit is not None:
        line.target = f"{'>=' if at_least else '<='} {limit:g}x"
        line.ok = ratio >= limit if at_least else ratio <= limit
    return line


def ms(timing: Timing | float) -> str:
    value = timing.median_ms if isinstance(timing, Timing) else timing
    return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"


def mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def text_table(lines: Sequence[Line]) -> str:
    rows = [COLUMNS, *(line.cells() for line in lines)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    table = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    table.insert(1, "-" * len(table[0]))
    return "\n".join(table)


def markdown_table(lines: Sequence[Line]) -> str:
    """The same rows as text_table, for the README and results.md (indented rows stay indented)."""

    def cell(text: str) -> str:
        indent = len(text) - len(text.lstrip(" "))
        return "&nbsp;" * (2 * indent) + text.strip().replace("|", "\\|")

    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) - 1)) + "|"]
    for line in lines:
        cells = list(line.cells())
        if cells[-1] == "MISSED":
            cells[-1] = "**MISSED**"
        out.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return "\n".join(out)


def finish(bench: Any, table: str, json_path: Path | None, *, wrong: str) -> int:
    """Print the table, write the JSON (lines, problems and all), and say whether the results are void.

    Shared by the benchmarks: `bench` has `out`, `lines` and `problems`.
    """
    print(table)
    bench.out["lines"] = [asdict(line) for line in bench.lines]
    bench.out["problems"] = bench.problems
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(bench.out, indent=2, default=jsonable))
    if bench.problems:
        print(f"\n{wrong}:\n  " + "\n  ".join(bench.problems), file=sys.stderr)
        return 2
    return 0


def jsonable(value: Any) -> Any:
    if isinstance(value, Timing):
        return asdict(value)
    return str(value)
