"""Whether a database still holds the schema's invariants (`tracestore verify`), and repairing the drift.

Read-only unless asked to fix: the checks run in one read transaction (one snapshot). With fix=True,
missing or drifted DDL (the session index, the triggers that keep the copy) is recreated in one short
write transaction, and link drift (wrong or NULL created_at, orphan links) is repaired by the
migrations' own batched backfill, each rowid range its own short write transaction. Schema revisions
are never changed here (that is `tracestore upgrade`) and integrity_check failures are never "fixed".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from tracestore import migrate
from tracestore.backfill import DEFAULT_BATCH_SIZE, PROGRESS_TABLE, backfill_sqlite
from tracestore.engine import create_engine, missing_sqlite_file, sync_url
from tracestore.errors import StorageError, TraceStoreError
from tracestore.models import SESSION_TIME_INDEX
from tracestore.schema import (
    BOUNDED_ANALYZE,
    REQUIRED_TRIGGERS,
    ROLLING_DEPLOY_TRIGGERS,
    create_copy_triggers,
    create_session_index,
    drop_session_index,
    freed_pages_not_zeroed,
    missing_copy_triggers,
    session_index_drift,
)

# How many offending rows a check lists in its details (the count is always exact).
SAMPLE_ROWS = 5

SCHEMA, CREATED_AT, ORPHANS, INDEX, TRIGGER, INTEGRITY, FOREIGN_KEYS = (
    "schema",
    "created_at",
    "orphans",
    "index",
    "trigger",
    "integrity",
    "foreign_keys",
)
# The checks that only make sense on a database at head (earlier revisions lack the column or index).
_NEEDS_HEAD = (CREATED_AT, ORPHANS, INDEX, TRIGGER)
# What fix=True repairs; orphan links are also what foreign_key_check reports.
REPAIRABLE = frozenset({CREATED_AT, ORPHANS, INDEX, TRIGGER, FOREIGN_KEYS})

_MISMATCHED = " FROM trace_sessions ts JOIN traces t ON t.id = ts.trace_id WHERE ts.created_at IS NOT t.created_at"
_ORPHANED = " FROM trace_sessions ts WHERE NOT EXISTS (SELECT 1 FROM traces t WHERE t.id = ts.trace_id)"


@dataclass(frozen=True)
class Check:
    """One check's outcome: `problem` says what is wrong (None when ok), `count` how many rows or objects."""

    name: str
    title: str
    ok: bool
    problem: str | None = None
    count: int = 0
    details: tuple[str, ...] = ()


@dataclass
class VerifyReport:
    """The final state of every check; with fix=True also the state found first and what was repaired."""

    checks: list[Check]
    found: list[Check]
    repairs: list[str] = field(default_factory=list)
    # Why fix=True changed nothing although checks failed (schema below head, damaged file).
    not_repaired: str | None = None

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def problems(self) -> list[Check]:
        return [check for check in self.checks if not check.ok]

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    @property
    def repairable(self) -> bool:
        """Whether fix=True would repair something that is wrong now."""
        return _refusal(self.checks) is None and any(check.name in REPAIRABLE for check in self.problems)


def verify(
    target: str | Engine,
    *,
    fix: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check a SQLite database's schema and invariants; with fix=True repair what can be repaired, check again.

    Without fix the database is only read. on_progress(done, total) follows the batched link repair.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if isinstance(target, Engine):
        engine, owned = target, False
    else:
        url = sync_url(target)
        missing = missing_sqlite_file(make_url(url))
        if missing is not None:  # connecting would create an empty file
            raise StorageError(f"no database at {missing}")
        engine, owned = create_engine(url), True
    try:
        if engine.dialect.name != "sqlite":
            raise TraceStoreError(f"verify checks SQLite databases only, not {engine.dialect.name}")
        with engine.connect() as connection:
            found = run_checks(connection)
        report = VerifyReport(checks=found, found=found)
        if fix and not report.ok:
            report.not_repaired = _refusal(found)
            if report.not_repaired is not None:
                return report
            with engine.connect() as connection, freed_pages_not_zeroed(connection):
                report.repairs = _repair(connection, found, batch_size=batch_size, on_progress=on_progress)
            with engine.connect() as connection:
                report.checks = run_checks(connection)
        return report
    except SQLAlchemyError as exc:
        raise StorageError(f"cannot verify the database: {exc}") from exc
    finally:
        if owned:
            engine.dispose()


def run_checks(connection: Connection) -> list[Check]:
    """Every check, read in one transaction so they describe one snapshot; writes nothing."""
    revision = migrate.current_revision(connection)  # leaves the connection idle
    head = migrate.head_revision()
    at_head = revision == head
    with connection.begin():
        checks = [_schema_check(connection, revision, head)]
        if at_head:
            checks += [_created_at_check(connection), _orphans_check(connection)]
            checks += [_index_check(connection), _trigger_check(connection)]
        else:
            checks += [
                Check(name, _TITLES[name], ok=False, problem="not checked: the schema is not at head")
                for name in _NEEDS_HEAD
            ]
        checks += [_integrity_check(connection), _foreign_key_check(connection)]
    return checks


_TITLES = {
    SCHEMA: "schema at the head revision",
    CREATED_AT: "every link's created_at equals its trace's",
    ORPHANS: "every link's trace exists",
    INDEX: f"index {SESSION_TIME_INDEX} (session_uid, created_at, trace_id) WHERE created_at IS NOT NULL",
    TRIGGER: f"trigger {', '.join(REQUIRED_TRIGGERS)}",
    INTEGRITY: "PRAGMA integrity_check",
    FOREIGN_KEYS: "PRAGMA foreign_key_check",
}


def _schema_check(connection: Connection, revision: str | None, head: str) -> Check:
    if revision == head:
        return Check(SCHEMA, _TITLES[SCHEMA], ok=True, details=(f"at {head} (head)",))
    url = connection.engine.url.render_as_string(hide_password=True)
    return Check(
        SCHEMA,
        _TITLES[SCHEMA],
        ok=False,
        problem=f"at revision {revision or 'none (legacy or empty)'}, head is {head}: "
        f"run `tracestore upgrade --url {url}` (verify --fix does not run migrations)",
        count=1,
    )


def _rows_check(connection: Connection, name: str, from_where: str, problem: str) -> Check:
    count = connection.execute(text("SELECT count(*)" + from_where)).scalar_one()
    if not count:
        return Check(name, _TITLES[name], ok=True)
    sample = connection.execute(
        text("SELECT ts.trace_id, ts.session_uid, ts.created_at" + from_where + " LIMIT :n"), {"n": SAMPLE_ROWS}
    ).all()
    details = tuple(f"trace {trace_id!r}, session {uid!r}, created_at {created}" for trace_id, uid, created in sample)
    return Check(name, _TITLES[name], ok=False, problem=problem.format(count=count), count=count, details=details)


def _created_at_check(connection: Connection) -> Check:
    return _rows_check(
        connection, CREATED_AT, _MISMATCHED, "{count} links whose created_at is not their trace's (or is NULL)"
    )


def _orphans_check(connection: Connection) -> Check:
    return _rows_check(connection, ORPHANS, _ORPHANED, "{count} links to traces that do not exist")


def _index_check(connection: Connection) -> Check:
    drift = session_index_drift(connection)
    if drift is None:
        return Check(INDEX, _TITLES[INDEX], ok=True)
    return Check(INDEX, _TITLES[INDEX], ok=False, problem=drift, count=1)


def _trigger_check(connection: Connection) -> Check:
    missing = missing_copy_triggers(connection, REQUIRED_TRIGGERS)
    rolling = [name for name in ROLLING_DEPLOY_TRIGGERS if name not in missing_copy_triggers(connection)]
    details = (
        (
            f"rolling-deploy triggers present ({', '.join(rolling)}): `tracestore finalize` drops them once no "
            "instance of the previous release writes",
        )
        if rolling
        else ("finalized: no rolling-deploy triggers",)
    )
    if not missing:
        return Check(TRIGGER, _TITLES[TRIGGER], ok=True, details=details)
    return Check(
        TRIGGER,
        _TITLES[TRIGGER],
        ok=False,
        problem=f"missing trigger: {', '.join(missing)}",
        count=len(missing),
        details=details,
    )


def _integrity_check(connection: Connection) -> Check:
    messages = [row[0] for row in connection.exec_driver_sql("PRAGMA integrity_check").all()]
    if messages == ["ok"]:
        return Check(INTEGRITY, _TITLES[INTEGRITY], ok=True)
    return Check(
        INTEGRITY,
        _TITLES[INTEGRITY],
        ok=False,
        problem=f"{len(messages)} problems: the file is damaged; restore a backup (never repaired by verify)",
        count=len(messages),
        details=tuple(messages[:SAMPLE_ROWS]),
    )


def _foreign_key_check(connection: Connection) -> Check:
    rows = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if not rows:
        return Check(FOREIGN_KEYS, _TITLES[FOREIGN_KEYS], ok=True)
    return Check(
        FOREIGN_KEYS,
        _TITLES[FOREIGN_KEYS],
        ok=False,
        problem=f"{len(rows)} rows reference a missing parent",
        count=len(rows),
        details=tuple(f"{table} rowid {rowid} -> {parent}" for table, rowid, parent, _ in rows[:SAMPLE_ROWS]),
    )


def _repair(
    connection: Connection,
    found: list[Check],
    *,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None,
) -> list[str]:
    failing = {check.name for check in found if not check.ok}
    repairs: list[str] = []
    # The connection manages its own transactions (BEGIN IMMEDIATE per step); engine._on_begin stays out.
    autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
    # Back in the pool, engine._on_checkout hands transaction control back to the engine recipe.
    run = autocommit.exec_driver_sql
    if failing & {INDEX, TRIGGER}:
        run("BEGIN IMMEDIATE")
        try:
            if INDEX in failing:
                autocommit.execute(drop_session_index())
                autocommit.execute(create_session_index())
            if TRIGGER in failing:
                for trigger in create_copy_triggers(REQUIRED_TRIGGERS, dialect=autocommit.dialect.name):
                    autocommit.execute(trigger)
            run("COMMIT")
        except BaseException:
            run("ROLLBACK")
            raise
        if INDEX in failing:
            for statement in BOUNDED_ANALYZE:
                run(statement)
            repairs.append(f"recreated index {SESSION_TIME_INDEX} (it was: {_problem(found, INDEX)})")
        if TRIGGER in failing:
            repairs.append(f"recreated {_problem(found, TRIGGER)}")
    if failing & {CREATED_AT, ORPHANS, FOREIGN_KEYS}:
        # A leftover position (an interrupted earlier fix) would skip the rows before it: start over.
        run(f"DROP TABLE IF EXISTS {PROGRESS_TABLE}")
        started = time.monotonic()
        backfill = backfill_sqlite(autocommit, batch_size=batch_size, on_progress=on_progress)
        repairs.append(
            f"set created_at of {backfill.rows_updated} links and removed {backfill.orphans_removed} orphan "
            f"links ({backfill.rows_scanned} links scanned in batches of {batch_size}, "
            f"{time.monotonic() - started:.2f} s)"
        )
    return repairs


def _refusal(checks: list[Check]) -> str | None:
    failing = {check.name for check in checks if not check.ok}
    if SCHEMA in failing:  # the other repairs assume head; `tracestore upgrade` is the repair
        return "the schema is not at head: run `tracestore upgrade` first"
    if INTEGRITY in failing:  # writing to a damaged file can make it worse
        return "integrity_check failed: the file is damaged, restore a backup"
    return None


def _problem(checks: list[Check], name: str) -> str | None:
    return next(check.problem for check in checks if check.name == name)
