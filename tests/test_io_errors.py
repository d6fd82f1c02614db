"""A full disk or a file size limit in the middle of `prune` and `upgrade` (SQLite): one clear error that names
the real cause and what will work, an intact file, and a rerun that finishes the job.

The checkpoint case needs a WAL whose pages are not in the database file yet, so that copying them back
grows the file past the limit: another connection stays open (closing the last one would checkpoint),
and the limit (RLIMIT_FSIZE, in the child process only) sits just above the database file's size.
"""

from __future__ import annotations

import resource
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from tests.filesystems import fill_leaving, tmpfs
from tracestore import TraceStore
from tracestore.migrate import current_revision, finalize, head_revision, upgrade
from tracestore.testing import make_traces
from tracestore.testing.bulk import generate_legacy

TRACESTORE = Path(sys.executable).parent / "tracestore"
NOW = time.time()
DAY = 86_400.0


def limited(limit: int) -> Callable[[], None]:
    """A child's preexec: writes past `limit` bytes of any file fail with EFBIG (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def tracestore(*args: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TRACESTORE), *args],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limited(limit) if limit else None,
    )


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        (result,) = connection.execute("PRAGMA integrity_check").fetchone()
    connection.close()
    return str(result)


def count(path: Path, sql: str) -> int:
    with sqlite3.connect(path) as connection:
        (value,) = connection.execute(sql).fetchone()
    connection.close()
    return int(value)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


def with_pages_only_in_the_wal(path: Path, add: Callable[[], None]) -> sqlite3.Connection:
    """Run `add` (writes that grow the file) while another connection is open, so its pages stay in the WAL."""
    holder = sqlite3.connect(path)
    holder.execute("SELECT count(*) FROM sqlite_master").fetchone()
    add()
    return holder


def test_a_failed_checkpoint_during_prune_is_one_error_line_and_leaves_an_intact_file(tmp_path: Path) -> None:
    path = tmp_path / "traces.db"
    url = f"sqlite:///{path}"
    old = make_traces(8_000, session_uids=["a", "b"], since=NOW - 60 * DAY, until=NOW - 40 * DAY, seed=1)
    with TraceStore(url) as store:
        store.store_batch(old)
    size = path.stat().st_size

    def add_recent() -> None:
        with TraceStore(url) as store:
            store.store_batch(make_traces(300, session_uids=["a"], since=NOW - 3600, seed=2))

    holder = with_pages_only_in_the_wal(path, add_recent)
    assert path.stat().st_size == size and (tmp_path / "traces.db-wal").stat().st_size > 0
    try:
        result = tracestore("--url", url, "prune", "--older-than", "30d", "--batch-size", "100", limit=size + 8192)
        assert result.returncode == 1
        (line,) = error_lines(result)
        assert "prune stopped after 100 traces were deleted" in line and "WAL checkpoint" in line, line
        assert "run it again to finish" in line
        assert integrity(path) == "ok"
        assert count(path, "SELECT count(*) FROM traces") == 8_300 - 100  # the committed batch stays deleted

        # The library says the same as a StorageError.
        child = subprocess.run(
            [sys.executable, "-c", PRUNE_IN_THE_LIBRARY, url],
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=limited(size + 8192),
        )
        assert child.stdout.strip().startswith("StorageError: prune stopped after 100 traces"), child.stderr
    finally:
        holder.close()
    again = tracestore("--url", url, "prune", "--older-than", "30d")
    assert again.returncode == 0, again.stderr
    assert count(path, "SELECT count(*) FROM traces") == 300
    assert integrity(path) == "ok"


PRUNE_IN_THE_LIBRARY = textwrap.dedent(
    """
    import sys, time
    from tracestore import StorageError, TraceStore
    with TraceStore(sys.argv[1]) as store:
        try:
            store.prune(time.time() - 30 * 86400, batch_size=100)
        except StorageError as exc:
            print(f"{type(exc).__name__}: {exc}")
    """
)


def test_a_failed_checkpoint_during_the_backfill_is_one_error_line_and_a_rerun_resumes(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.db"
    generate_legacy(legacy, traces=20_000, now=NOW)
    clean, path = tmp_path / "clean.db", tmp_path / "traces.db"
    shutil.copy(legacy, clean)
    shutil.copy(legacy, path)
    upgrade(f"sqlite:///{clean}")
    url = f"sqlite:///{path}"
    upgrade(url, "0002")
    holder = with_pages_only_in_the_wal(path, lambda: None)
    try:
        result = tracestore("--url", url, "upgrade", "--batch-size", "2000", limit=path.stat().st_size + 4096)
    finally:
        holder.close()
    assert result.returncode == 1
    (line,) = error_lines(result)
    assert "backfill stopped: the WAL checkpoint after a committed batch failed" in line, line
    assert "the position is saved" in line and "it resumes there" in line
    assert integrity(path) == "ok" and current_revision(url) == "0002"
    upgrade(url)
    assert current_revision(url) == head_revision()
    links = "SELECT trace_id, session_uid, created_at FROM trace_sessions ORDER BY 1, 2"
    with sqlite3.connect(path) as resumed, sqlite3.connect(clean) as uninterrupted:
        assert resumed.execute(links).fetchall() == uninterrupted.execute(links).fetchall()


def test_a_full_disk_during_the_upgrade_says_so_and_a_rerun_with_space_finishes(tmp_path: Path) -> None:
    """SQLite rolls the batch back by itself on a full disk: the error is the disk, not the ROLLBACK after it."""
    with tmpfs(tmp_path / "fs", "24m") as where:
        path = where / "traces.db"
        generate_legacy(path, traces=16_000, now=NOW)
        filler = fill_leaving(where, 1 << 20)
        result = tracestore("--url", f"sqlite:///{path}", "upgrade", "--batch-size", "2000")
        assert result.returncode == 1
        (line,) = error_lines(result)
        assert "database or disk is full" in line and "no transaction is active" not in line, line
        assert "free disk space, then run the command again" in line
        assert integrity(path) == "ok"
        filler.unlink()
        again = tracestore("--url", f"sqlite:///{path}", "upgrade")
        assert again.returncode == 0, again.stderr
        assert current_revision(f"sqlite:///{path}") == head_revision()
        assert finalize(f"sqlite:///{path}").dropped


def test_a_full_disk_during_prune_says_a_smaller_batch_works_and_it_does(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "24m") as where:
        path = where / "traces.db"
        url = f"sqlite:///{path}"
        with TraceStore(url) as store:
            for seed in range(2):
                store.store_batch(
                    make_traces(2_000, session_uids=["a", "b"], since=NOW - 60 * DAY, until=NOW - 40 * DAY, seed=seed)
                )
            store.store_batch(make_traces(500, session_uids=["a"], since=NOW - 3600, seed=9))
        fill_leaving(where, 512 * 1024)
        refused = tracestore("--url", url, "prune", "--older-than", "30d")
        assert refused.returncode == 1
        (line,) = error_lines(refused)
        assert "database or disk is full" in line and "smaller batch size" in line, line
        assert integrity(path) == "ok" and count(path, "SELECT count(*) FROM traces") == 4_500
        done = tracestore("--url", url, "prune", "--older-than", "30d", "--batch-size", "10")
        assert done.returncode == 0, done.stderr
        assert count(path, "SELECT count(*) FROM traces") == 500
        assert integrity(path) == "ok"


def test_generate_on_a_full_disk_is_one_error_line_and_leaves_no_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "8m") as where:
        fill_leaving(where, 2 << 20)
        result = tracestore("generate", str(where / "big.db"), "--traces", "50k")
        assert result.returncode == 1
        (line,) = error_lines(result)
        assert "database or disk is full" in line, line
        assert sorted(path.name for path in where.iterdir()) == ["filler"]
