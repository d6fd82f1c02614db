"""`tracestore verify [--fix]`: each kind of drift planted by another program (plain SQL, foreign keys off)
is found and repaired by --fix, on SQLite and on PostgreSQL."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import URL

from tests.backends import Backend
from tracestore import TraceStore
from tracestore.cli import main
from tracestore.engine import create_engine
from tracestore.migrate import current_revision, downgrade, finalize, head_revision, upgrade
from tracestore.migrate.schema import FOLLOW_TRIGGER
from tracestore.migrate.verify import Check, verify
from tracestore.models import SESSION_TIME_INDEX
from tracestore.testing import make_traces


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def snapshot(backend: Backend) -> object:
    """Anything a write could change: every row and the schema, plus where each row lives and which
    transaction wrote it (rowid on SQLite with sqlite_stat1; ctid and xmin, and the trigger functions'
    source, on PostgreSQL), so even an UPDATE to the same value shows."""
    if backend.is_sqlite:
        assert backend.path is not None
        with sqlite3.connect(backend.path) as connection:
            master = connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY 1, 2").fetchall()
            tables = [row[1] for row in master if row[0] == "table"]  # sqlite_stat1 too
            rows = [connection.execute(f"SELECT rowid, * FROM {table} ORDER BY rowid").fetchall() for table in tables]
        connection.close()
        return (master, *rows)
    dump: dict[str, object] = dict(backend.dump())
    for table in ("traces", "trace_sessions", "tracestore_alembic_version"):
        dump[f"{table} ctid, xmin"] = backend.rows(f"SELECT ctid::text, xmin::text FROM {table} ORDER BY ctid")
    dump["functions"] = backend.rows(
        "SELECT proname, prosrc FROM pg_proc WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
    )
    return dump


def traces_rows(backend: Backend) -> list[tuple[object, ...]]:
    return backend.rows("SELECT * FROM traces ORDER BY id")


def links(backend: Backend) -> list[tuple[object, ...]]:
    return backend.rows("SELECT trace_id, session_uid, created_at FROM trace_sessions ORDER BY 1, 2")


def plant(backend: Backend, *statements: str) -> None:
    """Corrupt the database the way another program could: plain SQL with foreign keys off (SQLite's
    default; on PostgreSQL, session_replication_role = replica, as pg_restore and logical replication run)."""
    if backend.is_sqlite:
        assert backend.path is not None
        connection = sqlite3.connect(backend.path)
        try:
            with connection:
                for statement in statements:
                    connection.execute(statement)
        finally:
            connection.close()
        return
    with backend.raw() as connection:
        connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
        for statement in statements:
            connection.exec_driver_sql(statement)


def fill(url: str, *, finalized: bool = True) -> None:
    """A database at head with 40 traces in three sessions, some of them in two; finalized (after the rolling
    deploy: a link without its trace is an orphan for good) unless asked otherwise."""
    traces = make_traces(40, session_uids=["s1", "s2", "s3"], since=time.time() - 3600, seed=5, sessions_per_trace=2)
    with TraceStore(url) as store:
        store.store_batch(traces)
    if finalized:
        finalize(url)


@pytest.fixture
def db(backend: Backend) -> Backend:
    fill(backend.url)
    return backend


@pytest.fixture
def pg_db(pg_url: URL) -> Iterator[Backend]:
    """`db` on PostgreSQL only, for drift that exists only there (disabled triggers, INVALID indexes)."""
    backend = Backend("postgresql", pg_url)
    fill(backend.url)
    try:
        yield backend
    finally:
        backend.dispose()


def failing(checks: list[Check]) -> set[str]:
    return {check.name for check in checks if not check.ok}


def drop_trigger(backend: Backend) -> str:
    return f"DROP TRIGGER {FOLLOW_TRIGGER}" + ("" if backend.is_sqlite else " ON traces")


# A statement's first link, chosen the same way on both engines (SQLite has rowids, PostgreSQL has not).
FIRST_TRACE = "(SELECT min(trace_id) FROM trace_sessions)"
ORPHAN = "INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES ('gone', 's1', 1.0)"


def test_a_clean_database_verifies_ok_and_is_not_changed(db: Backend) -> None:
    before = snapshot(db)
    report = verify(db.url)
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
    result = run("verify", "--url", db.url)
    assert result.exit_code == 0, result.output
    assert "all 7 checks ok" in result.stdout
    assert len([line for line in result.stdout.splitlines() if line.startswith("ok ")]) == 7
    assert ("PRAGMA integrity_check" in result.stdout) is db.is_sqlite
    assert ("pg_index.indisvalid" in result.stdout) is not db.is_sqlite
    assert snapshot(db) == before


def test_a_clean_database_with_fix_repairs_nothing(db: Backend) -> None:
    before = snapshot(db)
    result = run("verify", "--fix", "--url", db.url)
    assert result.exit_code == 0, result.output
    assert "repaired" not in result.stdout
    assert snapshot(db) == before


# (corruption planted, the checks that must fail) for every kind of drift verify --fix repairs.
CORRUPTIONS: dict[str, tuple[Callable[[Backend], list[str]], set[str]]] = {
    "wrong created_at": (
        lambda backend: [f"UPDATE trace_sessions SET created_at = created_at + 1 WHERE trace_id = {FIRST_TRACE}"],
        {"created_at"},
    ),
    "NULL created_at": (
        lambda backend: [
            "UPDATE trace_sessions SET created_at = NULL WHERE (trace_id, session_uid) IN (SELECT trace_id,"
            " session_uid FROM trace_sessions ORDER BY trace_id DESC, session_uid DESC LIMIT 3)"
        ],
        {"created_at"},
    ),
    "orphan link": (lambda backend: [ORPHAN], {"orphans", "foreign_keys"}),
    "index dropped": (lambda backend: [f"DROP INDEX {SESSION_TIME_INDEX}"], {"index"}),
    "index descending, other columns": (
        lambda backend: [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at DESC)"
            " WHERE created_at IS NOT NULL",
        ],
        {"index"},
    ),
    "index not partial": (
        lambda backend: [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)",
        ],
        {"index"},
    ),
    "index predicate narrower (hides links)": (
        lambda backend: [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)"
            " WHERE created_at > 1800000000",
        ],
        {"index"},
    ),
    "trigger dropped": (lambda backend: [drop_trigger(backend)], {"trigger"}),
}
# Drift only PostgreSQL can have.
PG_CORRUPTIONS: dict[str, tuple[list[str], set[str], str]] = {
    "trigger disabled": (
        [f"ALTER TABLE traces DISABLE TRIGGER {FOLLOW_TRIGGER}"],
        {"trigger"},
        f"disabled trigger: {FOLLOW_TRIGGER}",
    ),
    "trigger fires only on replicas": (
        [f"ALTER TABLE traces ENABLE REPLICA TRIGGER {FOLLOW_TRIGGER}"],
        {"trigger"},
        f"disabled trigger: {FOLLOW_TRIGGER}",
    ),
    "trigger function dropped with its trigger": (
        [f"DROP FUNCTION {FOLLOW_TRIGGER}() CASCADE"],
        {"trigger"},
        f"missing trigger: {FOLLOW_TRIGGER}",
    ),
    "index INVALID (a failed CREATE INDEX CONCURRENTLY)": (
        [f"UPDATE pg_index SET indisvalid = false WHERE indexrelid = '{SESSION_TIME_INDEX}'::regclass"],
        {"index"},
        "is INVALID",
    ),
    "index of another access method": (
        [
            f"DROP INDEX {SESSION_TIME_INDEX}",
            f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions USING brin (session_uid, created_at, trace_id)"
            " WHERE created_at IS NOT NULL",
        ],
        {"index"},
        "is a brin index, expected btree",
    ),
    "orphan written with the table's triggers off": (
        ["ALTER TABLE trace_sessions DISABLE TRIGGER ALL", ORPHAN, "ALTER TABLE trace_sessions ENABLE TRIGGER ALL"],
        {"orphans", "foreign_keys"},
        "1 rows reference a missing parent",
    ),
}


def assert_found_and_repaired(db: Backend, statements: list[str], expected: set[str]) -> Result:
    good_links = links(db)
    traces = traces_rows(db)
    plant(db, *statements)
    corrupted = snapshot(db)

    report = verify(db.url)
    assert failing(report.checks) == expected
    assert report.repairable
    result = run("verify", "--url", db.url)
    assert result.exit_code == 1, result.output
    assert "verify --fix" in result.stdout
    assert snapshot(db) == corrupted  # without --fix nothing is written

    fixed = run("verify", "--fix", "--batch-size", "7", "--url", db.url)
    assert fixed.exit_code == 0, fixed.output
    assert "repaired: " in fixed.stdout and "all 7 checks ok" in fixed.stdout
    assert verify(db.url).ok
    assert traces_rows(db) == traces  # traces untouched
    assert links(db) == good_links  # the links are what the store wrote, the orphan gone
    return result


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_verify_finds_the_drift_and_fix_repairs_it(db: Backend, kind: str) -> None:
    make_statements, expected = CORRUPTIONS[kind]
    assert_found_and_repaired(db, make_statements(db), expected)


@pytest.mark.parametrize("kind", list(PG_CORRUPTIONS))
def test_postgresql_drift_is_found_and_repaired(pg_db: Backend, kind: str) -> None:
    statements, expected, problem = PG_CORRUPTIONS[kind]
    result = assert_found_and_repaired(pg_db, statements, expected)
    assert problem in result.stdout
    # What the repair left behind is what the migrations build: no disabled trigger, a valid btree.
    assert pg_db.rows("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgenabled <> 'O'") == []
    assert pg_db.rows(
        "SELECT am.amname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
        " JOIN pg_am am ON am.oid = c.relam WHERE i.indexrelid = to_regclass(:name)",
        {"name": SESSION_TIME_INDEX},
    ) == [("btree", True)]


def test_fix_report_lists_found_and_final_state(db: Backend) -> None:
    plant(
        db,
        f"UPDATE trace_sessions SET created_at = NULL WHERE trace_id = {FIRST_TRACE} AND session_uid ="
        f" (SELECT min(session_uid) FROM trace_sessions WHERE trace_id = {FIRST_TRACE})",
        ORPHAN,
        f"DROP INDEX {SESSION_TIME_INDEX}",
        f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at DESC, trace_id)",
        drop_trigger(db),
    )
    engine = create_engine(db.url)  # an application's engine: verify leaves it usable
    report = verify(engine, fix=True, batch_size=5)
    assert failing(report.found) == {"created_at", "orphans", "index", "trigger", "foreign_keys"}
    assert report.ok, report.problems
    assert len(report.repairs) == 3
    assert "removed 1 orphan" in report.repairs[-1] and "set created_at of 1 links" in report.repairs[-1]
    assert report.check("created_at").count == 0
    with engine.connect() as connection:  # the pooled connections still take part in the recipe
        dbapi_connection = connection.connection.dbapi_connection
        if db.is_sqlite:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert dbapi_connection.isolation_level is None  # type: ignore[union-attr]
        else:  # the AUTOCOMMIT of the repair did not stay behind on the pooled connection
            assert dbapi_connection.autocommit is False  # type: ignore[union-attr]
            assert connection.get_isolation_level() == "READ COMMITTED"
    engine.dispose()
    # The trigger is back: a re-stored trace's links follow its new created_at.
    first = db.rows(f"SELECT {FIRST_TRACE}")[0][0]
    with TraceStore(db.url, auto_upgrade=False) as store:
        trace = store.get(first)
        assert trace is not None
        trace.created_at += 10
        store.store(trace)
    assert verify(db.url).ok
    assert {created for _, created in db.links(first)} == {trace.created_at}


def test_problem_details_name_the_rows(db: Backend) -> None:
    plant(db, ORPHAN)
    report = verify(db.url)
    orphans = report.check("orphans")
    assert (orphans.ok, orphans.count) == (False, 1)
    assert orphans.problem == "1 links to traces that do not exist"
    assert "'gone'" in orphans.details[0]
    foreign_keys = report.check("foreign_keys")
    assert foreign_keys.count == 1
    assert ("trace_sessions" in foreign_keys.details[0]) and ("traces" in foreign_keys.details[0])
    if not db.is_sqlite:  # PostgreSQL names the row by its key columns (there is no rowid)
        assert "'gone'" in foreign_keys.details[0]


def test_schema_below_head_is_reported_and_not_migrated_by_fix(db: Backend) -> None:
    downgrade(db.url, "0003")
    before = snapshot(db)
    report = verify(db.url)
    assert not report.ok and not report.repairable
    schema = report.check("schema")
    assert not schema.ok and "tracestore upgrade" in (schema.problem or "")

    result = run("verify", "--url", db.url)
    assert result.exit_code == 1
    assert "tracestore upgrade" in result.stdout
    fixed = run("verify", "--fix", "--url", db.url)
    assert fixed.exit_code == 1
    assert "repaired nothing" in fixed.stdout and "tracestore upgrade" in fixed.stdout
    assert current_revision(db.url) == "0003"
    assert snapshot(db) == before

    upgrade(db.url)
    assert current_revision(db.url) == head_revision()
    assert run("verify", "--url", db.url).exit_code == 0


def test_below_head_the_head_only_checks_are_not_checked_rather_than_failed(db: Backend) -> None:
    downgrade(db.url, "0003")
    report = verify(db.url)
    assert [check.name for check in report.problems] == ["schema"]
    assert [check.name for check in report.not_checked] == ["created_at", "orphans", "index", "trigger"]
    assert not report.ok and all(not check.ok and check.problem is None for check in report.not_checked)

    result = run("verify", "--url", db.url)
    assert result.exit_code == 1  # the schema check fails
    lines = result.stdout.splitlines()
    assert sum(line.startswith("FAIL") for line in lines) == 1 and lines[0].startswith("FAIL  schema")
    skipped = [line for line in lines if line.startswith("skip")]
    assert len(skipped) == 4 and all("not checked, needs the schema at head" in line for line in skipped), lines
    assert lines[-1] == "1 of 3 checks failed, 4 not checked"


def test_verify_help_describes_the_index_as_it_is() -> None:
    """(session_uid, created_at, trace_id) ascending, partial: no "ascending index" to repair."""
    text = " ".join(run("verify", "--help").output.split())
    assert "(session_uid, created_at, trace_id, ascending, WHERE created_at IS NOT NULL)" in text
    assert "ascending index" not in text and "descending" not in text


def test_an_invalid_index_elsewhere_is_reported_not_repaired_and_does_not_block_fix(pg_db: Backend) -> None:
    """PostgreSQL's "integrity": an INVALID index other than the session index (a failed REINDEX or
    CREATE INDEX CONCURRENTLY) is the operator's to rebuild; --fix still repairs the links."""
    plant(pg_db, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'idx_traces_created_at'::regclass", ORPHAN)
    report = verify(pg_db.url)
    assert failing(report.checks) == {"integrity", "orphans", "foreign_keys"}
    assert report.check("integrity").details == ("idx_traces_created_at",)
    assert report.repairable
    fixed = run("verify", "--fix", "--url", pg_db.url)
    assert fixed.exit_code == 1, fixed.output
    assert "removed 1 orphan" in fixed.stdout
    assert "REINDEX INDEX CONCURRENTLY" in fixed.stdout
    assert failing(verify(pg_db.url).checks) == {"integrity"}
    plant(pg_db, "REINDEX INDEX idx_traces_created_at")
    assert verify(pg_db.url).ok


def test_verify_without_fix_leaves_the_file_byte_identical(backend: Backend, db_path: Path, db_url: str) -> None:
    fill(db_url)
    plant(backend, f"UPDATE trace_sessions SET created_at = NULL WHERE trace_id = {FIRST_TRACE}")
    before = db_path.read_bytes()
    assert run("verify", "--url", db_url).exit_code == 1
    assert db_path.read_bytes() == before
    assert not db_path.with_name(db_path.name + "-wal").exists()


def test_verify_without_fix_runs_in_a_read_only_session(pg_db: Backend) -> None:
    """PostgreSQL's byte-identical file: verify works where every write is refused; --fix is refused cleanly."""
    plant(pg_db, ORPHAN)
    read_only = pg_db.sync_url.update_query_dict({"options": "-c default_transaction_read_only=on"})
    url = read_only.render_as_string(hide_password=False)
    result = run("verify", "--url", url)
    assert result.exit_code == 1, result.output
    assert "1 links to traces that do not exist" in result.stdout
    refused = run("verify", "--fix", "--url", url)
    assert refused.exit_code == 1
    assert "read-only transaction" in refused.stderr and "Traceback" not in refused.output
    assert ("gone", "s1", 1.0) in links(pg_db)  # still there: nothing was repaired


def test_verify_refuses_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.db"
    result = run("verify", "--url", f"sqlite:///{path}")
    assert result.exit_code == 1 and "no database at" in result.stderr
    assert not path.exists()


def test_verify_refuses_a_missing_postgresql_database(pg_url: URL) -> None:
    """The PostgreSQL twin: a database that does not exist is a one-line error (password hidden), not created."""
    missing = pg_url.set(database=f"{pg_url.database}_missing", password="s3cret")
    result = run("verify", "--url", missing.render_as_string(hide_password=False))
    assert result.exit_code == 1
    assert f'database "{missing.database}" does not exist' in result.stderr
    assert "s3cret" not in result.output and "Traceback" not in result.output
    server = Backend("postgresql", pg_url)
    try:
        assert server.rows("SELECT count(*) FROM pg_database WHERE datname = :name", {"name": missing.database}) == [
            (0,)
        ]
    finally:
        server.dispose()


def test_verify_has_help() -> None:
    result = run("verify", "--help")
    assert result.exit_code == 0
    assert "--fix" in result.output and "--batch-size" in result.output
