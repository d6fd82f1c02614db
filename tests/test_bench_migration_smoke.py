"""The migration benchmark runs end to end at a tiny scale (a smoke test: nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_migration.py"


def test_bench_migration_runs_under_a_writer_and_prints_the_stall_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(BENCH),
        "--scale", "20k",
        "--settle", "0.3",
        "--batch-size", "200",
        "--downgrade",
        "--workdir", str(tmp_path / "scratch"),
        "--json", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode == 0, result.stderr
    labels = (
        "longest writer stall",
        "backfill rows/s",
        "file size migrated / legacy",
        "integrity_check",
        "bytes written",
    )
    for label in labels:
        assert label in result.stdout
    report = json.loads(out.read_text())
    assert report["problems"] == []
    assert {"0001", "0002", "0003", "0004"} <= set(report["upgrade"]["steps"])  # later revisions as one more step
    # Bytes written by the upgrade (through its last checkpoint), under the writer and alone, and the cold window.
    assert report["upgrade_io"]["write_bytes"] > 0 and report["writer"]["write_bytes"]["during_upgrade"] > 0
    plain = report["plain_upgrade"]
    assert plain["exit"] == 0 and plain["write_bytes"] > 0 and plain["cold"]["raw window"] > 0
    assert 0 < plain["index"]["leaf_fill"] <= 1
    checks = report["checks"]
    assert checks["integrity_check"] == ["ok"]
    assert checks["orphans"] == checks["wrong_links"] == 0
    # The crash test killed a real upgrade mid-backfill, and the rerun converged to the same links.
    crash = report["kill_and_rerun"]
    assert crash["killed"] and crash["revision_after_kill"] == "0002"
    assert crash["same"] and crash["killed_file"]["links"] > 20_000
    # ...and the migrated file went back to the legacy schema with the legacy file's links.
    assert report["downgrade"]["same"] and set(report["downgrade"]["steps"]) == {"0003", "0002", "0001"}
    # The writer kept writing through the upgrade, and every insert it committed is in the file.
    assert report["writer"]["commits"] == checks["writer_traces"] > 0
    assert report["writer"]["longest_stall"]["ms"] > 0
    # Without --keep the scratch databases are removed.
    assert not list((tmp_path / "scratch").glob("*.db*"))
