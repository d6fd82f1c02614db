"""The benchmark script runs end to end at a tiny scale (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_query.py"


def test_bench_query_runs_and_prints_the_ratio_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(BENCH),
        "--scale", "5k",
        "--runs", "3",
        "--write-traces", "2000",
        "--workdir", str(tmp_path / "scratch"),
        "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 0, result.stderr
    for label in ("sync store / raw", "async store / raw", "legacy / new", "file size", "write rows/s", "keyset page"):
        assert label in result.stdout
    assert "EXPLAIN QUERY PLAN" in result.stdout
    assert "idx_trace_sessions_uid_time" in result.stdout
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert report["rows"] == {"window": report["data"]["burst_traces"], "latest": 100}
    assert {line["label"] for line in report["lines"] if line["target"]} >= {
        "sync store / raw, latest 100",
        "async store / raw, latest 100",
    }
    # Without --keep the scratch databases are removed.
    assert not list((tmp_path / "scratch").glob("*.db"))
