"""`tracestore verify [--fix]`: each kind of drift planted with plain sqlite3 is found, and repaired by --fix."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tracestore import TraceStore
from tracestore.cli import main
from tracestore.engine import create_engine
from tracestore.migrate import current_revision, downgrade, head_revision, upgrade
from tracestore.models import SESSION_TIME_INDEX
from tracestore.schema import FOLLOW_TRIGGER
from tracestore.testing import make_traces
from tracestore.verify import Check, verify

Dump = tuple[list[tuple[object, ...]], ...]


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def full_dump(path: Path) -> Dump:
    """sqlite_master and every row of every table, rowids included: anything a write could change."""
    with sqlite3.connect(path) as connection:
        master = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY 1, 2").fetchall()
        tables = [row[1] for row in master if row[0] == "table"]  # sqlite_stat1 too
        rows = [connection.execute(f"SELECT rowid, * FROM {table} ORDER BY rowid").fetchall() for table in tables]
    connection.close()
    return (master, *rows)


def traces_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute("SELECT * FROM traces ORDER BY id").fetchall()
    connection.close()
    return rows


def links(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT trace_id, session_uid, created_at FROM trace_sessions ORDER BY 1, 2"
        ).fetchall()
    connection.close()
    return rows


def plant(path: Path, *statements: str) -> None:
    """Corrupt the file the way another program could: plain sqlite3, foreign keys off (its default)."""
    connection = sqlite3.connect(path)
    try:
        with connection:
            for statement in statements:
                connection.execute(statement)
    finally:
        connection.close()


@pytest.fixture
def db(db_path: Path, db_url: str) -> Path:
    """A database at head with 40 traces in three sessions, some of them in two."""
    traces = make_traces(40, session_uids=["s1", "s2", "s3"], since=time.time() - 3600, seed=5, sessions_per_trace=2)
    with TraceStore(db_url) as store:
        store.store_batch(traces)
    return db_path


def failing(checks: list[Check]) -> set[str]:
    return {check.name for check in checks if not check.ok}


def test_a_clean_database_verifies_ok_and_is_not_changed(db: Path, db_url: str) -> None:
    before = full_dump(db)
    report = verify(db_url)
    assert report.ok and not report.problems and report.repairs == []
    assert [check.name for check in report.checks] == [
        "schema",
        "created_at",
        "orphans",
        "index",
        "trigger",
        "integrity",
        "foreign_keys",
    ]
    result = run("verify", "--url", db_url)
    assert result.exit_code == 0, result.output
    assert "all 7 checks ok" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("ok ")]) == 7
    assert full_dump(db) == before


def test_a_clean_database_with_fix_repairs_nothing(db: Path, db_url: str) -> None:
    before = full_dump(db)
    result = run("verify", "--fix", "--url", db_url)
    assert result.exit_code == 0, result.output
    assert "repaired" not in result.stdout
    assert full_dump(db) == before


def _first_trace(path: Path) -> str:
    with sqlite3.connect(path) as connection:
        trace_id: str = connection.execute("SELECT trace_id FROM trace_sessions ORDER BY rowid LIMIT 1").fetchone()[0]
    connection.close()
    return trace_id


# (corruption planted, the checks that must fail) for every kind of drift verify --fix repairs.
CORRUPTIONS: dict[str, tuple[Callable[[Path], list[str]], set[str]]] = {
    "wrong created_at": (
        lambda path: [f"UPDATE trace_sessions SET created_at = created_at + 1 WHERE trace_id = '{_first_trace(path)}'"],
        {"created_at"},
    ),
    "NULL created_at": (
        lambda path: [
            "UPDATE trace_sessions SET created_at = NULL WHERE rowid IN (SELECT rowid FROM trace_sessions"
            " ORDER BY rowid DESC LIMIT 3)"
        ],
        {"created_at"},
    ),
    "orphan link": (
        lambda path: ["INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES ('gone', 's1', 1.0)"],
        {"orphans", "foreign_keys"},
    ),
    "index dropped": (lambda path: [f"DROP INDEX {SESSION_TIME_INDEX}"], {"index"}),
    "index descending, other columns": (
        lambda path: [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at DESC)"
            " WHERE created_at IS NOT NULL",
        ],
        {"index"},
    ),
    "index not partial": (
        lambda path: [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)",
        ],
        {"index"},
    ),
    "index predicate narrower (hides links)": (
        lambda path: [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)"
            " WHERE created_at > 1800000000",
        ],
        {"index"},
    ),
    "trigger dropped": (lambda path: [f"DROP TRIGGER {FOLLOW_TRIGGER}"], {"trigger"}),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_finds_the_drift_and_fix_repairs_it(db: Path, db_url: str, kind: str) -> None:
    make_statements, expected = CORRUPTIONS[kind]
    good_links = links(db)
    traces = traces_rows(db)
    plant(db, *make_statements(db))
    corrupted = full_dump(db)

    report = verify(db_url)
    assert failing(report.checks) == expected
    assert report.repairable
    result = run("verify", "--url", db_url)
    assert result.exit_code == 1, result.output
    assert "verify --fix" in result.stdout
    assert full_dump(db) == corrupted  # without --fix nothing is written

    fixed = run("verify", "--fix", "--batch-size", "7", "--url", db_url)
    assert fixed.exit_code == 0, fixed.output
    assert "repaired: " in fixed.stdout and "all 7 checks ok" in fixed.stdout
    assert verify(db_url).ok
    assert traces_rows(db) == traces  # traces untouched
    assert links(db) == good_links  # the links are what the store wrote, the orphan gone


def test_fix_report_lists_found_and_final_state(db: Path, db_url: str) -> None:
    plant(
        db,
        "UPDATE trace_sessions SET created_at = NULL WHERE rowid = 1",
        "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES ('gone', 's1', 1.0)",
        f"DROP INDEX {SESSION_TIME_INDEX}",
        f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at DESC, trace_id)",
        f"DROP TRIGGER {FOLLOW_TRIGGER}",
    )
    engine = create_engine(db_url)  # an application's engine: verify leaves it usable
    report = verify(engine, fix=True, batch_size=5)
    assert failing(report.found) == {"created_at", "orphans", "index", "trigger", "foreign_keys"}
    assert report.ok, report.problems
    assert len(report.repairs) == 3
    assert "removed 1 orphan" in report.repairs[-1] and "set created_at of 1 links" in report.repairs[-1]
    assert report.check("created_at").count == 0
    with engine.connect() as connection:  # the pooled connections still take part in the recipe
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert connection.connection.dbapi_connection.isolation_level is None  # type: ignore[union-attr]
    engine.dispose()
    # The trigger is back: a re-stored trace's links follow its new created_at.
    with TraceStore(db_url, auto_upgrade=False) as store:
        trace = store.get(_first_trace(db))
        assert trace is not None
        trace.created_at += 10
        store.store(trace)
    assert verify(db_url).ok


def test_problem_details_name_the_rows(db: Path, db_url: str) -> None:
    plant(db, "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES ('gone', 's1', 1.0)")
    report = verify(db_url)
    orphans = report.check("orphans")
    assert (orphans.ok, orphans.count) == (False, 1)
    assert orphans.problem == "1 links to traces that do not exist"
    assert "'gone'" in orphans.details[0]
    assert report.check("foreign_keys").count == 1


def test_schema_below_head_is_reported_and_not_migrated_by_fix(db: Path, db_url: str) -> None:
    downgrade(db_url, "0003")
    before = full_dump(db)
    report = verify(db_url)
    assert not report.ok and not report.repairable
    schema = report.check("schema")
    assert not schema.ok and "tracestore upgrade" in (schema.problem or "")

    result = run("verify", "--url", db_url)
    assert result.exit_code == 1
    assert "tracestore upgrade" in result.stdout
    fixed = run("verify", "--fix", "--url", db_url)
    assert fixed.exit_code == 1
    assert "repaired nothing" in fixed.stdout and "tracestore upgrade" in fixed.stdout
    assert current_revision(db_url) == "0003"
    assert full_dump(db) == before

    upgrade(db_url)
    assert current_revision(db_url) == head_revision()
    assert run("verify", "--url", db_url).exit_code == 0


def test_verify_without_fix_leaves_the_file_byte_identical(db: Path, db_url: str) -> None:
    plant(db, "UPDATE trace_sessions SET created_at = NULL WHERE rowid = 2")
    before = db.read_bytes()
    assert run("verify", "--url", db_url).exit_code == 1
    assert db.read_bytes() == before
    assert not db.with_name(db.name + "-wal").exists()


def test_verify_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    result = run("verify", "--url", f"sqlite:///{path}")
    assert result.exit_code == 1 and "no database at" in result.stderr
    assert not path.exists()


def test_verify_has_help() -> None:
    result = run("verify", "--help")
    assert result.exit_code == 0
    assert "--fix" in result.output and "--batch-size" in result.output
