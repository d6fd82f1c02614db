"""SQLite's session index, built in key order beside trace_sessions and attached whole (migrate.index_build).

What is checked each time: PRAGMA integrity_check (it compares every index entry with its row), the
index's entry count against the links that have a created_at, and every session's newest-first answer
through the index against the same query with no index (the table read in full).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event

from tracestore.migrate import upgrade
from tracestore.migrate.index_build import BUILD_TABLE
from tracestore.models import SESSION_TIME_INDEX
from tracestore.testing.bulk import generate_legacy

NOW = 1_750_000_000.0


@pytest.fixture(scope="module")
def legacy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("index-build") / "legacy.db"
    generate_legacy(path, traces=3_000, orphans=9, now=NOW)
    return path


@pytest.fixture
def legacy(legacy_file: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "traces.db"
    shutil.copy(legacy_file, copy)
    return copy


@contextmanager
def after_statement(prefix: str, action: Callable[[int], None]) -> Iterator[None]:
    """Run `action(n)` after the n-th statement of the upgrade that starts with `prefix`."""
    seen = 0

    def listener(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal seen
        if statement.lstrip().startswith(prefix):
            seen += 1
            action(seen)

    event.listen(Engine, "after_cursor_execute", listener)
    try:
        yield
    finally:
        event.remove(Engine, "after_cursor_execute", listener)


def previous_release(path: Path) -> sqlite3.Connection:
    """A writer of the previous release: it knows nothing of trace_sessions.created_at, and runs with foreign
    keys off (it commits a trace's links before the trace)."""
    return sqlite3.connect(path, isolation_level=None, timeout=10)


def assert_index_is_right(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert connection.execute(f"SELECT name FROM sqlite_master WHERE name = '{BUILD_TABLE}'").fetchall() == []
        assert (
            connection.execute("SELECT name FROM sqlite_master WHERE name LIKE 'tracestore_session_index%'").fetchall()
            == []
        )
        entries = connection.execute(
            f"SELECT count(*) FROM trace_sessions INDEXED BY {SESSION_TIME_INDEX} WHERE created_at IS NOT NULL"
        ).fetchone()
        assert (
            entries
            == connection.execute(
                "SELECT count(*) FROM trace_sessions NOT INDEXED WHERE created_at IS NOT NULL"
            ).fetchone()
        )
        newest_first = (
            "SELECT trace_id, created_at FROM trace_sessions {how} WHERE session_uid = ? AND created_at IS NOT NULL"
            " ORDER BY created_at DESC, trace_id DESC"
        )
        sessions = [uid for (uid,) in connection.execute("SELECT DISTINCT session_uid FROM trace_sessions")]
        assert len(sessions) > 10
        for uid in sessions:
            through_index = connection.execute(
                newest_first.format(how=f"INDEXED BY {SESSION_TIME_INDEX}"), (uid,)
            ).fetchall()
            assert through_index == connection.execute(newest_first.format(how="NOT INDEXED"), (uid,)).fetchall(), uid
    connection.close()


def test_the_attached_index_reads_like_one_create_index_made(legacy: Path, tmp_path: Path) -> None:
    created = tmp_path / "created.db"
    shutil.copy(legacy, created)
    reports = upgrade(f"sqlite:///{legacy}", batch_size=100)
    assert reports["backfill"].index_attached is True
    assert_index_is_right(legacy)

    # The same file with the index made by CREATE INDEX before the backfill (an earlier release's 0002).
    upgrade(f"sqlite:///{created}", "0002")
    with sqlite3.connect(created) as connection:
        connection.execute(
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)"
            " WHERE created_at IS NOT NULL"
        )
    connection.close()
    assert upgrade(f"sqlite:///{created}", batch_size=100)["backfill"].index_attached is None  # filled by batches

    def shape(path: Path) -> tuple[Any, ...]:
        with sqlite3.connect(path) as connection:
            sql = connection.execute("SELECT sql FROM sqlite_master WHERE name = ?", (SESSION_TIME_INDEX,)).fetchone()
            columns = connection.execute(f"PRAGMA index_xinfo({SESSION_TIME_INDEX})").fetchall()
            entries = connection.execute(
                f"SELECT session_uid, created_at, trace_id FROM trace_sessions INDEXED BY {SESSION_TIME_INDEX}"
                " WHERE created_at IS NOT NULL ORDER BY session_uid, created_at, trace_id"
            ).fetchall()
        connection.close()
        return sql, columns, entries

    assert shape(legacy) == shape(created)


def test_writes_of_the_previous_release_during_the_build_reach_the_index(legacy: Path) -> None:
    writer = previous_release(legacy)
    old_links = writer.execute("SELECT trace_id, session_uid FROM trace_sessions ORDER BY rowid LIMIT 40").fetchall()
    done: list[str] = []

    def write(step: int) -> None:
        n = len(done)
        trace_id = f"new-{n}"
        # links first, then the trace (the previous release's order), then one more link of an old trace
        writer.execute("INSERT INTO trace_sessions (trace_id, session_uid) VALUES (?, 'sess-new')", (trace_id,))
        writer.execute(
            "INSERT INTO traces (id, context_type, namespace, data, metadata, created_at, updated_at)"
            " VALUES (?, 'x', 'ns', '{}', '{}', ?, ?)",
            (trace_id, NOW - n, NOW - n),
        )
        old_trace, old_session = old_links[n]
        writer.execute(
            "INSERT OR REPLACE INTO trace_sessions (trace_id, session_uid) VALUES (?, ?)", (old_trace, old_session)
        )
        writer.execute("UPDATE traces SET created_at = created_at - 3600 WHERE id = ?", (old_links[n + 10][0],))
        writer.execute("DELETE FROM trace_sessions WHERE trace_id = ? AND session_uid = ?", old_links[n + 20])
        writer.execute("DELETE FROM traces WHERE id = ?", (old_links[n + 30][0],))
        writer.execute("INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('still-coming', ?)", (f"s-{n}",))
        done.append(trace_id)

    # Before the snapshot of the keys, and between copy batches.
    with (
        after_statement("DROP TABLE IF EXISTS temp.", lambda n: write(n)),
        after_statement("SELECT count(j.created_at) FROM temp", lambda n: n % 3 == 0 and len(done) < 10 and write(n)),
    ):
        reports = upgrade(f"sqlite:///{legacy}", batch_size=100)
    writer.close()
    assert len(done) >= 5
    assert reports["backfill"].index_attached is True
    assert_index_is_right(legacy)
    with sqlite3.connect(legacy) as connection:
        newest = connection.execute(
            f"SELECT trace_id FROM trace_sessions INDEXED BY {SESSION_TIME_INDEX}"
            " WHERE session_uid = 'sess-new' AND created_at IS NOT NULL ORDER BY created_at DESC, trace_id DESC"
        ).fetchall()
    connection.close()
    assert newest == [(trace_id,) for trace_id in done]


def test_a_build_table_that_misses_a_change_is_caught_and_create_index_made_instead(
    legacy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def lose_an_entry(step: int) -> None:
        if step == 3:  # a change the triggers did not mirror: one entry gone from the build table
            writer = previous_release(legacy)
            writer.execute(f"DELETE FROM {BUILD_TABLE} WHERE rid = (SELECT min(rid) FROM {BUILD_TABLE})")
            writer.close()

    with (
        caplog.at_level(logging.WARNING, "tracestore.migrate"),
        after_statement("SELECT count(j.created_at) FROM temp", lose_an_entry),
    ):
        reports = upgrade(f"sqlite:///{legacy}", batch_size=100)
    assert reports["backfill"].index_attached is False
    assert "could not be attached" in caplog.text
    assert_index_is_right(legacy)


def test_a_vacuum_during_the_build_leaves_a_right_index(legacy: Path) -> None:
    def vacuum(step: int) -> None:
        if step == 3:
            writer = previous_release(legacy)
            writer.execute("DELETE FROM trace_sessions WHERE rowid IN (SELECT rowid FROM trace_sessions LIMIT 5)")
            writer.execute("VACUUM")
            writer.close()

    with after_statement("SELECT count(j.created_at) FROM temp", vacuum):
        upgrade(f"sqlite:///{legacy}", batch_size=100)
    assert_index_is_right(legacy)


def test_a_sqlite_that_refuses_to_rewrite_its_schema_gets_create_index(
    legacy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refused: list[int] = []

    def no_schema_writes(action: int, table: str | None, *args: Any) -> int:
        # What a defensive SQLite does with writable_schema: the hand-written UPDATE of sqlite_master is refused.
        if action == sqlite3.SQLITE_UPDATE and table == "sqlite_master" and not refused:
            refused.append(action)
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    def refuse(conn: Any, cursor: sqlite3.Cursor, statement: str, *args: Any) -> None:
        if statement.startswith("PRAGMA writable_schema=ON"):  # from here on (SQLite's own DDL writes it too)
            cursor.connection.set_authorizer(no_schema_writes)

    event.listen(Engine, "before_cursor_execute", refuse)
    try:
        with caplog.at_level(logging.WARNING, "tracestore.migrate"):
            reports = upgrade(f"sqlite:///{legacy}", batch_size=100)
    finally:
        event.remove(Engine, "before_cursor_execute", refuse)
    assert refused and reports["backfill"].index_attached is False
    assert "cannot be rewritten" in caplog.text
    assert_index_is_right(legacy)


def test_an_index_made_during_the_build_is_kept_and_the_build_table_dropped(legacy: Path) -> None:
    def create_index(step: int) -> None:
        if step == 2:
            with sqlite3.connect(legacy) as other:
                other.execute(
                    f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)"
                    " WHERE created_at IS NOT NULL"
                )
            other.close()

    with after_statement("SELECT count(j.created_at) FROM temp", create_index):
        reports = upgrade(f"sqlite:///{legacy}", batch_size=100)
    assert reports["backfill"].index_attached is True
    assert_index_is_right(legacy)


def test_a_link_whose_trace_is_gone_loses_its_copy_and_waits_for_finalize(legacy: Path) -> None:
    """A copy written while the trace existed, the trace deleted since (foreign keys off): the backfill sets it
    NULL, as its trace's time is now unknown, so the link is kept for finalize and stays out of the index."""
    upgrade(f"sqlite:///{legacy}", "0002")
    writer = previous_release(legacy)
    trace_id, session_uid = writer.execute("SELECT trace_id, session_uid FROM trace_sessions LIMIT 1").fetchone()
    (links,) = writer.execute("SELECT count(*) FROM trace_sessions WHERE trace_id = ?", (trace_id,)).fetchone()
    writer.execute("UPDATE trace_sessions SET created_at = 12345.0 WHERE trace_id = ?", (trace_id,))
    writer.execute("DELETE FROM traces WHERE id = ?", (trace_id,))
    writer.close()
    reports = upgrade(f"sqlite:///{legacy}", batch_size=100)
    assert reports["backfill"].orphans_kept == 9 + links
    with sqlite3.connect(legacy) as connection:
        assert connection.execute(
            "SELECT created_at FROM trace_sessions WHERE trace_id = ? AND session_uid = ?", (trace_id, session_uid)
        ).fetchone() == (None,)
        assert connection.execute(
            "SELECT count(*) FROM tracestore_orphan_links WHERE trace_id = ?", (trace_id,)
        ).fetchone() == (links,)
    connection.close()
    assert_index_is_right(legacy)
