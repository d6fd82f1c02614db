"""A real `kill -9` in the middle of the backfill, then a rerun: the same final state as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tracestore.migrate import current_revision, downgrade, finalize, head_revision, upgrade
from tracestore.migrate.backfill import PROGRESS_TABLE
from tracestore.testing.bulk import generate_legacy

TRACESTORE = Path(sys.executable).parent / "tracestore"


def checksum(path: Path) -> tuple[int, str]:
    """Row count and a digest of every (trace_id, session_uid, created_at), in key order."""
    digest = hashlib.sha256()
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT trace_id, session_uid, created_at FROM trace_sessions ORDER BY trace_id, session_uid"
        ).fetchall()
    for row in rows:
        digest.update(repr(row).encode())
    return len(rows), digest.hexdigest()


def saved_position(path: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.1) as connection:
            row = connection.execute(f"SELECT last_rowid FROM {PROGRESS_TABLE}").fetchone()
    except sqlite3.OperationalError:  # no progress table yet, or a writer holds a lock for a moment
        return None
    return row[0] if row else None


def test_kill_during_backfill_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.db"
    generate_legacy(legacy, traces=60_000, orphans=25, now=1_750_000_000.0)
    killed, clean = tmp_path / "killed.db", tmp_path / "clean.db"
    shutil.copy(legacy, killed)
    shutil.copy(legacy, clean)
    upgrade(f"sqlite:///{clean}")

    # Small batches so the backfill takes many transactions; kill once a few of them have committed.
    process = subprocess.Popen(
        [str(TRACESTORE), "--url", f"sqlite:///{killed}", "upgrade", "--batch-size", "100"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    position = None
    while time.monotonic() < deadline and process.poll() is None:
        position = saved_position(killed)
        if position is not None and position >= 2_000:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the upgrade finished before it could be killed; use a bigger file"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert position is not None and position >= 2_000
    assert current_revision(f"sqlite:///{killed}") == "0002"  # died inside the backfill revision

    reports = upgrade(f"sqlite:///{killed}", batch_size=100)
    # Resumed: the batches committed before the kill are not read again.
    assert reports["backfill"].rows_scanned < checksum(clean)[0] + 25 - 2_000 + 100
    assert current_revision(f"sqlite:///{killed}") == head_revision()
    assert checksum(killed) == checksum(clean)
    assert_clean_after_finalize(killed, orphans=25)


def test_a_killed_upgrade_taken_back_to_the_legacy_schema_upgrades_again_in_full(
    small_legacy: tuple[Path, Path], tmp_path: Path
) -> None:
    """Killed inside the backfill, downgraded to 0001 (the column goes), upgraded again: the saved position
    must not survive the column it described, or the new backfill would skip the rows it had reached."""
    legacy, clean = small_legacy
    killed = tmp_path / "killed.db"
    shutil.copy(legacy, killed)
    url = f"sqlite:///{killed}"
    pattern = r"^INSERT OR REPLACE INTO tracestore_backfill"
    script = str(Path(__file__).parent / "kill_during_upgrade.py")
    result = subprocess.run([sys.executable, script, url, pattern, "8", "250"], capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert (saved_position(killed) or 0) > 1_000
    downgrade(url, "0001")
    upgrade(url, batch_size=250)
    assert checksum(killed) == checksum(clean)
    assert_clean_after_finalize(killed, orphans=7)


def assert_clean_after_finalize(path: Path, *, orphans: int) -> None:
    """The upgrade kept the legacy file's orphan links (NULL created_at) for finalize, which removes them."""
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert len(connection.execute("PRAGMA foreign_key_check").fetchall()) == orphans
        assert connection.execute("SELECT count(*) FROM trace_sessions WHERE created_at IS NULL").fetchone() == (
            orphans,
        )
    connection.close()
    assert finalize(f"sqlite:///{path}").orphans_removed == orphans
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA foreign_key_check").fetchall() == []
        assert connection.execute("SELECT count(*) FROM trace_sessions WHERE created_at IS NULL").fetchone() == (0,)
    connection.close()


def schema_of(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()


@pytest.fixture(scope="module")
def small_legacy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A legacy file (with orphans) and the same file upgraded without interruption."""
    directory = tmp_path_factory.mktemp("kill-each-step")
    legacy, clean = directory / "legacy.db", directory / "clean.db"
    generate_legacy(legacy, traces=3_000, orphans=7, now=1_750_000_000.0)
    shutil.copy(legacy, clean)
    upgrade(f"sqlite:///{clean}", batch_size=250)
    return legacy, clean


# (where the kill lands, statement pattern, occurrence): every step of every revision, before its commit.
KILL_POINTS = [
    ("0001 stamping the adopted schema", r"^INSERT INTO tracestore_alembic_version", 1),
    ("0002 after ADD COLUMN", r"^ALTER TABLE trace_sessions ADD COLUMN", 1),
    ("0002 after the triggers", r"^CREATE TRIGGER", 3),
    ("0002 column and triggers committed, revision not stamped", r"^COMMIT", 1),
    ("0003 first backfill batch, before commit", r"^UPDATE trace_sessions SET created_at", 1),
    ("0003 fifth backfill batch, saved but not committed", r"^INSERT OR REPLACE INTO tracestore_backfill", 5),
    ("0003 right after a batch committed", r"^COMMIT", 6),
    (
        "0003 index build table and triggers, not committed",
        r"^CREATE TRIGGER IF NOT EXISTS tracestore_session_index_b",
        3,
    ),
    ("0003 index keys sorted", r"^CREATE TEMP TABLE tracestore_session_index_keys", 1),
    ("0003 second index batch, before commit", r"^INSERT OR IGNORE INTO tracestore_session_index_build", 2),
    ("0003 third index batch committed", r"^SELECT count\(j.created_at\) FROM temp", 4),
    ("0003 index schema row rewritten, not committed", r"^UPDATE sqlite_master SET type = 'index'", 1),
    ("0003 index schema version bumped, not committed", r"^PRAGMA schema_version=", 1),
    ("0003 after dropping the progress table", r"^DROP TABLE IF EXISTS tracestore_backfill", 1),
    ("0004 after dropping idx_trace_sessions_trace", r"^DROP INDEX .*idx_trace_sessions_trace", 1),
    ("0004 after dropping idx_trace_sessions_uid", r"^DROP INDEX .*idx_trace_sessions_uid\b(?!_)", 1),
    ("0004 during ANALYZE", r"^ANALYZE", 1),
    ("0004 stamped", r"^UPDATE tracestore_alembic_version SET version_num='0004'", 1),
    ("0005 after dropping idx_traces_type", r"^DROP INDEX .*idx_traces_type", 1),
    ("0005 stamping head", r"^UPDATE tracestore_alembic_version SET version_num='0005'", 1),
]


@pytest.mark.parametrize(("where", "pattern", "occurrence"), KILL_POINTS, ids=[p[0] for p in KILL_POINTS])
def test_kill_at_each_step_then_rerun_converges(
    small_legacy: tuple[Path, Path], tmp_path: Path, where: str, pattern: str, occurrence: int
) -> None:
    legacy, clean = small_legacy
    killed = tmp_path / "killed.db"
    shutil.copy(legacy, killed)
    url = f"sqlite:///{killed}"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "kill_during_upgrade.py"), url, pattern, str(occurrence), "250"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == -signal.SIGKILL, f"not killed at {where}: rc {result.returncode}\n{result.stderr}"
    assert current_revision(url) != head_revision()

    upgrade(url, batch_size=250)
    assert current_revision(url) == head_revision()
    assert checksum(killed) == checksum(clean)
    assert schema_of(killed) == schema_of(clean)
    assert_clean_after_finalize(killed, orphans=7)
