"""The previous release keeps writing during a rolling deploy, links before traces: no link it writes is lost.

The legacy implementation committed a trace's session links before the trace, each in its own
transaction (SQLite with foreign keys off; a PostgreSQL schema without the foreign key). A link caught
between the two commits has no trace *yet*: the backfill (upgrade, verify --fix) keeps and records
such links, and only `finalize`, once no previous release writes, removes those whose trace never came.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.migrate import finalize, upgrade
from tracestore.migrate.backfill import ORPHANS_TABLE
from tracestore.migrate.verify import verify
from tracestore.testing.bulk import generate_legacy

WRITER = Path(__file__).parent / "legacy_writer.py"
KILLER = Path(__file__).parent / "kill_during_upgrade.py"
LINKS = "SELECT trace_id, session_uid, created_at FROM trace_sessions WHERE trace_id = :id ORDER BY session_uid"


def legacy_without_foreign_key(backend: Backend, traces: int = 0) -> None:
    """A legacy database that accepts a link before its trace: SQLite's legacy writer had foreign keys off,
    and on PostgreSQL a legacy schema without the constraint."""
    if backend.is_sqlite and traces >= 10_000:
        assert backend.path is not None
        generate_legacy(backend.path, traces=traces, now=time.time())
        return
    rows = [
        (f"t{i:06d}", "llm", "ns", {"i": i}, {}, 1_000.0 + i, 1_000.0 + i, ("s", f"s{i % 9}")) for i in range(traces)
    ]
    backend.create_legacy(rows)
    if not backend.is_sqlite:
        with backend.raw() as connection:
            connection.exec_driver_sql("ALTER TABLE trace_sessions DROP CONSTRAINT trace_sessions_trace_id_fkey")


def old_release(backend: Backend, *statements: str) -> None:
    with backend.raw() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement)


def kept(backend: Backend) -> list[tuple[object, ...]]:
    return sorted(backend.rows(f"SELECT trace_id, session_uid FROM {ORPHANS_TABLE}"))


def test_a_link_waiting_for_its_trace_survives_the_upgrade_and_finalize_removes_real_orphans(backend: Backend) -> None:
    legacy_without_foreign_key(backend, traces=30)
    old_release(backend, "INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('gone', 's')")  # a real orphan
    upgrade(backend.url, "0002")
    # The previous release has committed the links of 'late', not yet the trace, when the backfill runs.
    old_release(backend, "INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('late', 's'), ('late', 'x')")
    report = upgrade(backend.url, batch_size=7)["backfill"]
    assert (report.orphans_kept, report.orphans_removed) == (3, 0)
    assert backend.rows(LINKS, {"id": "late"}) == [("late", "s", None), ("late", "x", None)]
    assert kept(backend) == [("gone", "s"), ("late", "s"), ("late", "x")]
    # Before finalize verify says the links are kept, and is green.
    before = verify(backend.url)
    assert before.ok and before.check("orphans").count == 3
    assert "kept" in before.check("orphans").details[0]

    old_release(backend, "INSERT INTO traces VALUES ('late', 'llm', 'ns', '{}', '{}', 5000.0, 5000.0)")
    assert backend.rows(LINKS, {"id": "late"}) == [("late", "s", 5000.0), ("late", "x", 5000.0)]
    with TraceStore(backend.url, auto_upgrade=False) as store:
        assert [t.id for t in store.get_by_session_uid("x")] == ["late"]
        assert store.get_by_session_uid("s", limit=1)[0].id == "late"

    report_finalize = finalize(backend.url)
    assert report_finalize.orphans_removed == 1  # 'gone'; 'late' has its trace now
    assert backend.rows("SELECT count(*) FROM trace_sessions WHERE trace_id = 'gone'") == [(0,)]
    assert len(backend.rows(LINKS, {"id": "late"})) == 2
    with backend.raw() as connection:
        assert not connection.dialect.has_table(connection, ORPHANS_TABLE)
    assert verify(backend.url).ok
    assert finalize(backend.url).orphans_removed == 0  # idempotent


def test_verify_fix_keeps_links_waiting_for_their_trace_until_finalize_then_removes_orphans(backend: Backend) -> None:
    legacy_without_foreign_key(backend, traces=30)
    upgrade(backend.url)
    old_release(
        backend,
        "INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('late', 's')",  # waiting for its trace
        "UPDATE trace_sessions SET created_at = NULL WHERE trace_id = 't000003'",  # drift for --fix to repair
    )
    fixed = verify(backend.url, fix=True, batch_size=4)
    assert fixed.ok and "kept 1 links without a trace" in fixed.repairs[-1]
    assert backend.rows(LINKS, {"id": "late"}) == [("late", "s", None)]
    assert kept(backend) == [("late", "s")]

    finalize(backend.url)  # the previous release never wrote 'late': an orphan for good, removed
    assert backend.rows(LINKS, {"id": "late"}) == []
    # After finalize a link without its trace is a problem verify reports and --fix removes.
    # (On PostgreSQL finalize has added the foreign key, which refuses such a link: put it in as a restore would.)
    orphan = "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES ('gone', 's', 1.0)"
    old_release(backend, *(() if backend.is_sqlite else ("SET LOCAL session_replication_role = replica",)), orphan)
    found = verify(backend.url)
    assert not found.ok and found.check("orphans").problem == "1 links to traces that do not exist"
    fixed = verify(backend.url, fix=True)
    assert fixed.ok and "removed 1 orphan links" in fixed.repairs[-1]
    assert backend.rows("SELECT count(*) FROM trace_sessions WHERE trace_id = 'gone'") == [(0,)]


def test_a_killed_finalize_is_finished_by_the_next(backend: Backend) -> None:
    legacy_without_foreign_key(backend, traces=10)
    old_release(
        backend, *(f"INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('gone-{i}', 's')" for i in range(9))
    )
    upgrade(backend.url)
    assert len(kept(backend)) == 9
    killed = subprocess.run(
        [sys.executable, str(KILLER), backend.url, r"^DELETE FROM tracestore_orphan_links", "2", "4", "finalize"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr
    assert backend.rows("SELECT count(*) FROM trace_sessions WHERE trace_id LIKE 'gone-%'") == [(5,)]  # one batch
    assert len(kept(backend)) == 5
    assert finalize(backend.url, batch_size=4).orphans_removed == 5
    assert backend.rows("SELECT count(*) FROM trace_sessions WHERE trace_id LIKE 'gone-%'") == [(0,)]
    assert verify(backend.url).ok


def test_a_links_first_writer_loses_no_link_during_upgrade_and_verify_fix(backend: Backend, tmp_path: Path) -> None:
    """A real previous-release process writes links first all through `upgrade` and `verify --fix`."""
    legacy_without_foreign_key(backend, traces=20_000)
    stop = tmp_path / "stop"
    writer = subprocess.Popen(
        [sys.executable, str(WRITER), backend.url, str(stop), "1"], stdout=subprocess.PIPE, text=True
    )
    first: list[str] = []
    try:
        assert writer.stdout is not None
        while len(first) < 3:  # it is writing
            first.append(writer.stdout.readline())
            assert first[-1]
        upgrade(backend.url, batch_size=500)
        old_release(backend, "UPDATE trace_sessions SET created_at = NULL WHERE session_uid = 's3'")
        assert verify(backend.url, fix=True, batch_size=500).ok
    finally:
        stop.touch()
        out, _ = writer.communicate(timeout=60)
    assert writer.returncode == 0
    written = [json.loads(line) for line in [*first, *out.splitlines()]]
    assert len(written) >= 20  # the writer was busy through both runs
    for trace in written:
        stored = backend.rows(LINKS, {"id": trace["id"]})
        assert stored == [(trace["id"], uid, trace["created_at"]) for uid in trace["sessions"]], trace
    with TraceStore(backend.url) as store:
        for session in ("lw-a", "lw-b", "lw-c"):
            expected = sorted(
                (t for t in written if session in t["sessions"]), key=lambda t: (t["created_at"], t["id"])
            )
            got = [trace.id for trace in store.get_by_session_uid(session)]
            assert got == [t["id"] for t in reversed(expected)], session
    assert finalize(backend.url).orphans_removed == 0  # every link the writer committed has its trace
    assert verify(backend.url).ok
