"""Whether a database still holds the schema's invariants (`tracestore verify`), and repairing the drift.

Read-only unless asked to fix: the checks run in one read transaction (one snapshot). With fix=True,
missing or drifted DDL (the session index, the triggers that keep the copy) is recreated, and link
drift (wrong or NULL created_at, orphan links) is repaired by the migrations' own batched backfill,
each key range its own short write transaction. Schema revisions are never changed here (that is
`tracestore upgrade`) and a damaged SQLite file (integrity_check) is never "fixed".

SQLite and PostgreSQL run the same seven checks; where the engines differ the check asks each its
own question: the index's shape comes from PRAGMA index_xinfo or from pg_index (which also knows an
INVALID index and its access method); "integrity" is PRAGMA integrity_check on SQLite and, on
PostgreSQL, whether the tables' other indexes are valid; "foreign_keys" is PRAGMA foreign_key_check
or a count of the rows each foreign key of the two tables should have refused (rows written with
triggers off, e.g. session_replication_role = replica).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from tracestore import migrate
from tracestore.engine import create_engine, missing_sqlite_file, shown, sync_url, tracestore_connection
from tracestore.errors import StorageError, storage_error
from tracestore.migrate.backfill import DEFAULT_BATCH_SIZE, PROGRESS_TABLE, backfill
from tracestore.migrate.index_build import create_session_index
from tracestore.migrate.online import ddl_step
from tracestore.migrate.schema import (
    BOUNDED_ANALYZE,
    FOREIGN_KEY_MISSING,
    FOREIGN_KEY_VALID,
    REQUIRED_TRIGGERS,
    create_copy_triggers,
    drop_session_index,
    freed_pages_not_zeroed,
    links_foreign_key,
    missing_copy_triggers,
    restore_links_foreign_key,
    rolling_deploy_triggers,
    session_index_drift,
)
from tracestore.models import SESSION_TIME_INDEX, SESSION_TIME_INDEX_COLUMNS, SESSION_TIME_INDEX_WHERE

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
# Why one of them did not run.
NOT_AT_HEAD = "needs the schema at head"
# What fix=True repairs; orphan links are also what foreign_key_check reports.
REPAIRABLE = frozenset({CREATED_AT, ORPHANS, INDEX, TRIGGER, FOREIGN_KEYS})

# "IS NOT" is SQLite's null-safe inequality; PostgreSQL spells it IS DISTINCT FROM.
_MISMATCHED = " FROM trace_sessions ts JOIN traces t ON t.id = ts.trace_id WHERE ts.created_at {is_not} t.created_at"
_ORPHANED = " FROM trace_sessions ts WHERE NOT EXISTS (SELECT 1 FROM traces t WHERE t.id = ts.trace_id)"


@dataclass(frozen=True)
class Check:
    """One check's outcome: `problem` says what is wrong (None when ok), `count` how many rows or objects.

    `checked` is False for a check that could not run (below head the column and index it reads may not
    exist): then `ok` is False too, since nothing was shown to hold, but it is no problem of its own.
    """

    name: str
    title: str
    ok: bool
    problem: str | None = None
    count: int = 0
    details: tuple[str, ...] = ()
    checked: bool = True


@dataclass
class VerifyReport:
    """The final state of every check; with fix=True also the state found first and what was repaired."""

    checks: list[Check]
    found: list[Check]
    repairs: list[str] = field(default_factory=list)
    # Why fix=True changed nothing although checks failed (schema below head, damaged file).
    not_repaired: str | None = None
    dialect: str = "sqlite"

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def problems(self) -> list[Check]:
        """The checks that ran and failed."""
        return [check for check in self.checks if check.checked and not check.ok]

    @property
    def not_checked(self) -> list[Check]:
        """The checks that could not run (the schema is below head)."""
        return [check for check in self.checks if not check.checked]

    def check(self, name: str) -> Check:
        return next(check for check in self.checks if check.name == name)

    @property
    def repairable(self) -> bool:
        """Whether fix=True would repair something that is wrong now."""
        return _refusal(self.checks, self.dialect) is None and any(check.name in REPAIRABLE for check in self.problems)


def verify(
    target: str | Engine,
    *,
    fix: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check a SQLite or PostgreSQL database's schema and invariants; with fix=True repair what can be
    repaired, then check again.

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
        with engine.connect() as connection:
            found = run_checks(connection)
        report = VerifyReport(checks=found, found=found, dialect=engine.dialect.name)
        if fix and not report.ok:
            report.not_repaired = _refusal(found, report.dialect)
            if report.not_repaired is not None:
                return report
            # Repairs write in explicit transactions: on an application's Engine, set up as migrations are.
            with tracestore_connection(engine) as connection, freed_pages_not_zeroed(connection):
                report.repairs = _repair(connection, found, batch_size=batch_size, on_progress=on_progress)
            with engine.connect() as connection:
                report.checks = run_checks(connection)
        return report
    except SQLAlchemyError as exc:
        raise storage_error("cannot verify the database", exc) from exc
    finally:
        if owned:
            engine.dispose()


def run_checks(connection: Connection) -> list[Check]:
    """Every check, read in one transaction so they describe one snapshot; writes nothing."""
    revision = migrate.current_revision(connection)  # leaves the connection idle
    head = migrate.head_revision()
    at_head = revision == head
    titles = _titles(connection.dialect.name)
    with connection.begin():
        # Before finalize a previous release may still be writing a trace whose links it committed
        # first: links without their trace are expected then, and kept (tracestore.backfill).
        finalized = at_head and not rolling_deploy_triggers(connection)
        checks = [_schema_check(connection, revision, head)]
        if at_head:
            checks += [_created_at_check(connection), _orphans_check(connection, finalized=finalized)]
            checks += [_index_check(connection), _trigger_check(connection)]
        else:
            checks += [
                Check(name, titles[name], ok=False, details=(NOT_AT_HEAD,), checked=False) for name in _NEEDS_HEAD
            ]
        if connection.dialect.name == "postgresql":
            checks += [_pg_invalid_index_check(connection), _pg_foreign_key_check(connection, finalized=finalized)]
        else:
            checks += [_integrity_check(connection), _foreign_key_check(connection, finalized=finalized)]
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
_PG_TITLES = {
    **_TITLES,
    INDEX: f"index {SESSION_TIME_INDEX} btree (session_uid, created_at, trace_id) WHERE created_at IS NOT NULL, valid",
    TRIGGER: f"trigger {', '.join(REQUIRED_TRIGGERS)} (enabled)",
    INTEGRITY: "every other index of traces and trace_sessions is valid (pg_index.indisvalid)",
    FOREIGN_KEYS: "no row breaks a foreign key of traces or trace_sessions",
}


def _titles(dialect: str) -> dict[str, str]:
    return _PG_TITLES if dialect == "postgresql" else _TITLES


def _title(connection: Connection, name: str) -> str:
    return _titles(connection.dialect.name)[name]


def _schema_check(connection: Connection, revision: str | None, head: str) -> Check:
    if revision == head:
        return Check(SCHEMA, _title(connection, SCHEMA), ok=True, details=(f"at {head} (head)",))
    url = shown(connection.engine.url)
    return Check(
        SCHEMA,
        _title(connection, SCHEMA),
        ok=False,
        problem=f"at revision {revision or 'none (legacy or empty)'}, head is {head}: "
        f"run `tracestore upgrade --url {url}` (verify --fix does not run migrations)",
        count=1,
    )


def _rows_check(connection: Connection, name: str, from_where: str, problem: str) -> Check:
    count = connection.execute(text("SELECT count(*)" + from_where)).scalar_one()
    if not count:
        return Check(name, _title(connection, name), ok=True)
    sample = connection.execute(
        text("SELECT ts.trace_id, ts.session_uid, ts.created_at" + from_where + " LIMIT :n"), {"n": SAMPLE_ROWS}
    ).all()
    details = tuple(f"trace {trace_id!r}, session {uid!r}, created_at {created}" for trace_id, uid, created in sample)
    return Check(
        name, _title(connection, name), ok=False, problem=problem.format(count=count), count=count, details=details
    )


def _created_at_check(connection: Connection) -> Check:
    is_not = "IS DISTINCT FROM" if connection.dialect.name == "postgresql" else "IS NOT"
    return _rows_check(
        connection,
        CREATED_AT,
        _MISMATCHED.format(is_not=is_not),
        "{count} links whose created_at is not their trace's (or is NULL)",
    )


# Said of links without a trace before `tracestore finalize`, where they are expected and kept.
KEPT_ORPHANS = (
    "{count} links whose trace does not exist (yet) are kept: a previous release may still be writing their"
    " traces; after `tracestore finalize`, links still without a trace are removed (finalize, verify --fix)"
)


def _orphans_check(connection: Connection, *, finalized: bool) -> Check:
    check = _rows_check(connection, ORPHANS, _ORPHANED, "{count} links to traces that do not exist")
    return check if finalized else _kept(check)


def _kept(check: Check) -> Check:
    """A check failed only by links without a trace, before finalize: ok, with the links named in the details."""
    if check.ok:
        return check
    return Check(
        check.name,
        check.title,
        ok=True,
        count=check.count,
        details=(KEPT_ORPHANS.format(count=check.count), *check.details),
    )


def _index_check(connection: Connection) -> Check:
    drift = _pg_index_drift(connection) if connection.dialect.name == "postgresql" else session_index_drift(connection)
    if drift is None:
        return Check(INDEX, _title(connection, INDEX), ok=True)
    return Check(INDEX, _title(connection, INDEX), ok=False, problem=drift, count=1)


# PostgreSQL's catalog knows what reflection smooths over: the access method, INVALID (a failed or
# cancelled CREATE INDEX CONCURRENTLY: maintained by every write, used by no query), the predicate.
_PG_INDEX = text(
    "SELECT i.indrelid::regclass::text, am.amname, i.indisvalid, pg_get_expr(i.indpred, i.indrelid),"
    " i.indexrelid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam"
    " WHERE i.indexrelid = to_regclass(:name)"
)
# Key columns only (not INCLUDE); indoption bit 0 is DESC.
_PG_INDEX_KEYS = text(
    "SELECT pg_get_indexdef(i.indexrelid, k, false), (i.indoption[k - 1] & 1) = 1"
    " FROM pg_index i, generate_series(1, i.indnkeyatts) AS k WHERE i.indexrelid = :oid ORDER BY k"
)


def _pg_index_drift(connection: Connection) -> str | None:
    """Why idx_trace_sessions_uid_time differs from the model on PostgreSQL, or None."""
    row = connection.execute(_PG_INDEX, {"name": SESSION_TIME_INDEX}).first()
    if row is None:
        return f"index {SESSION_TIME_INDEX} is missing"
    table, method, valid, predicate, oid = row
    if table != "trace_sessions":
        return f"index {SESSION_TIME_INDEX} is on {table}, expected trace_sessions"
    if method != "btree":
        return f"index {SESSION_TIME_INDEX} is a {method} index, expected btree"
    shape = tuple((str(column), bool(desc)) for column, desc in connection.execute(_PG_INDEX_KEYS, {"oid": oid}))
    if shape != SESSION_TIME_INDEX_COLUMNS:
        return f"index {SESSION_TIME_INDEX} is {shape}, expected {SESSION_TIME_INDEX_COLUMNS}"
    where = _pg_predicate(predicate)
    if where != _normalized(SESSION_TIME_INDEX_WHERE):
        found = f"WHERE {where}" if where else "not partial"
        return f"index {SESSION_TIME_INDEX} is {found}, expected WHERE {SESSION_TIME_INDEX_WHERE}"
    if not valid:
        return f"index {SESSION_TIME_INDEX} is INVALID (a failed or interrupted CREATE INDEX CONCURRENTLY)"
    return None


def _pg_predicate(predicate: str | None) -> str | None:
    """pg_get_expr's predicate, normalized like SQLite's: "(created_at IS NOT NULL)" -> "CREATED_AT IS NOT NULL"."""
    if predicate is None:
        return None
    where = predicate.strip()
    while where.startswith("(") and where.endswith(")") and _balanced(where[1:-1]):
        where = where[1:-1].strip()
    return _normalized(where)


def _balanced(sql: str) -> bool:
    depth = 0
    for char in sql:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


def _normalized(sql: str) -> str:
    return " ".join(sql.split()).upper()


def _trigger_check(connection: Connection) -> Check:
    missing = missing_copy_triggers(connection, REQUIRED_TRIGGERS)
    missing += [name for name in _disabled_triggers(connection) if name in REQUIRED_TRIGGERS]
    rolling = rolling_deploy_triggers(connection)
    details = (
        (
            f"rolling-deploy triggers present ({', '.join(rolling)}): `tracestore finalize` drops them once no "
            "instance of the previous release writes",
        )
        if rolling
        else ("finalized: no rolling-deploy triggers",)
    )
    title = _title(connection, TRIGGER)
    if not missing:
        return Check(TRIGGER, title, ok=True, details=details)
    disabled = [name for name in missing if name in _disabled_triggers(connection)]
    problems = (
        [f"missing trigger: {', '.join(name for name in missing if name not in disabled)}"]
        if (len(disabled) < len(missing))
        else []
    )
    if disabled:
        problems.append(f"disabled trigger: {', '.join(disabled)}")
    return Check(TRIGGER, title, ok=False, problem="; ".join(problems), count=len(missing), details=details)


def _disabled_triggers(connection: Connection) -> list[str]:
    """PostgreSQL triggers that exist but do not fire in ordinary sessions (ALTER TABLE … DISABLE TRIGGER,
    or ENABLE REPLICA TRIGGER); SQLite triggers cannot be disabled."""
    if connection.dialect.name != "postgresql":
        return []
    return list(
        connection.exec_driver_sql(
            "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgenabled IN ('D', 'R') ORDER BY tgname"
        ).scalars()
    )


def _integrity_check(connection: Connection) -> Check:
    messages = [row[0] for row in connection.exec_driver_sql("PRAGMA integrity_check").all()]
    if messages == ["ok"]:
        return Check(INTEGRITY, _title(connection, INTEGRITY), ok=True)
    return Check(
        INTEGRITY,
        _title(connection, INTEGRITY),
        ok=False,
        problem=f"{len(messages)} problems: the file is damaged; restore a backup (never repaired by verify)",
        count=len(messages),
        details=tuple(messages[:SAMPLE_ROWS]),
    )


def _pg_invalid_index_check(connection: Connection) -> Check:
    """PostgreSQL keeps its own pages consistent; what can be broken and go unnoticed is an INVALID index
    (the session index has its own check, which --fix repairs; these are left to the operator)."""
    invalid = list(
        connection.execute(
            text(
                "SELECT i.indexrelid::regclass::text FROM pg_index i"
                " WHERE i.indrelid IN (to_regclass('traces'), to_regclass('trace_sessions'))"
                " AND NOT i.indisvalid AND i.indexrelid IS DISTINCT FROM to_regclass(:session_index) ORDER BY 1"
            ),
            {"session_index": SESSION_TIME_INDEX},
        ).scalars()
    )
    title = _title(connection, INTEGRITY)
    if not invalid:
        return Check(INTEGRITY, title, ok=True)
    return Check(
        INTEGRITY,
        title,
        ok=False,
        problem=f"{len(invalid)} INVALID indexes: rebuild them with REINDEX INDEX CONCURRENTLY (never repaired by "
        "verify)",
        count=len(invalid),
        details=tuple(invalid[:SAMPLE_ROWS]),
    )


def _foreign_key_check(connection: Connection, *, finalized: bool = True) -> Check:
    rows = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    details = [f"{table} rowid {rowid} -> {parent}" for table, rowid, parent, _ in rows[:SAMPLE_ROWS]]
    only_links = all((table, parent) == ("trace_sessions", "traces") for table, _, parent, _ in rows)
    return _foreign_key_result(connection, len(rows), details, only_links=only_links, finalized=finalized)


def _pg_foreign_key_check(connection: Connection, *, finalized: bool = True) -> Check:
    """PRAGMA foreign_key_check's answer on PostgreSQL: the rows each foreign key should have refused.

    The server enforces the constraints, but rows written with triggers off (session_replication_role =
    replica, ALTER TABLE … DISABLE TRIGGER ALL) or before a NOT VALID constraint was added slip past it.
    """
    inspector = inspect(connection)
    quote = connection.dialect.identifier_preparer.quote
    tables = [table for table in ("traces", "trace_sessions") if inspector.has_table(table)]
    count, details, only_links = 0, [], True
    for table in tables:
        for key in inspector.get_foreign_keys(table):
            pairs = " AND ".join(
                f"p.{quote(parent)} = c.{quote(child)}"
                for child, parent in zip(key["constrained_columns"], key["referred_columns"], strict=True)
            )
            not_null = " AND ".join(f"c.{quote(child)} IS NOT NULL" for child in key["constrained_columns"])
            from_where = (
                f" FROM {quote(table)} c WHERE {not_null}"
                f" AND NOT EXISTS (SELECT 1 FROM {quote(key['referred_table'])} p WHERE {pairs})"
            )
            found = connection.exec_driver_sql("SELECT count(*)" + from_where).scalar_one()
            if not found:
                continue
            count += found
            only_links = only_links and (table, key["referred_table"]) == ("trace_sessions", "traces")
            columns = ", ".join(quote(child) for child in key["constrained_columns"])
            for values in connection.exec_driver_sql(f"SELECT {columns}{from_where} LIMIT {SAMPLE_ROWS}"):
                details.append(f"{table} {tuple(values)!r} -> {key['referred_table']} ({key['name']})")
    missing_key = None
    if "trace_sessions" in tables:
        state, name = links_foreign_key(connection)
        if state != FOREIGN_KEY_VALID:
            # A legacy schema without the key: the links it would refuse are counted here all the same.
            missing_key = (
                "the foreign key trace_sessions -> traces is missing"
                if state == FOREIGN_KEY_MISSING
                else f"the foreign key {name} is NOT VALID"
            )
            found = connection.execute(text("SELECT count(*)" + _ORPHANED)).scalar_one()
            count += found
            sample = connection.execute(
                text("SELECT ts.trace_id, ts.session_uid" + _ORPHANED + " LIMIT :n"), {"n": SAMPLE_ROWS}
            )
            details += [f"trace_sessions {tuple(values)!r} -> traces (no foreign key)" for values in sample]
    return _foreign_key_result(
        connection, count, details, only_links=only_links, finalized=finalized, missing_key=missing_key
    )


def _foreign_key_result(
    connection: Connection,
    count: int,
    details: list[str],
    *,
    only_links: bool,
    finalized: bool,
    missing_key: str | None = None,
) -> Check:
    """The foreign-key check's outcome. Before finalize, links without their trace and a legacy schema's
    missing junction key are kept (ok): a previous release may still write links before their trace."""
    title = _title(connection, FOREIGN_KEYS)
    if not count and missing_key is None:
        return Check(FOREIGN_KEYS, title, ok=True)
    if only_links and not finalized:
        kept = [KEPT_ORPHANS.format(count=count)] if count else []
        if missing_key is not None:
            kept.insert(0, f"{missing_key}: kept, `tracestore finalize` adds it once no previous release writes")
        return Check(FOREIGN_KEYS, title, ok=True, count=count, details=(*kept, *details[:SAMPLE_ROWS]))
    problems = [f"{missing_key} (`tracestore verify --fix` adds it)"] if missing_key is not None else []
    if count:
        problems.append(f"{count} rows reference a missing parent")
    return Check(
        FOREIGN_KEYS,
        title,
        ok=False,
        problem="; ".join(problems),
        count=max(count, 1),
        details=tuple(details[:SAMPLE_ROWS]),
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
    # The connection manages its own transactions (BEGIN IMMEDIATE per step on SQLite); engine._on_begin
    # stays out. Back in the pool, engine._on_checkout hands transaction control back to the engine recipe.
    autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
    run = autocommit.exec_driver_sql
    postgresql = autocommit.dialect.name == "postgresql"
    if INDEX in failing and postgresql:
        # Outside any transaction, CONCURRENTLY: writers carry on while the index is dropped and built.
        _rebuild_session_index_concurrently(autocommit)
    if failing & {INDEX, TRIGGER}:

        def recreate() -> None:
            if INDEX in failing and not postgresql:
                autocommit.execute(drop_session_index())
                autocommit.execute(create_session_index())
            if TRIGGER in failing:
                # CREATE OR REPLACE on PostgreSQL also brings back a disabled trigger enabled.
                for trigger in create_copy_triggers(REQUIRED_TRIGGERS, dialect=autocommit.dialect.name):
                    autocommit.execute(trigger)

        ddl_step(autocommit, recreate, what="verify --fix", locks=(("traces", "SHARE ROW EXCLUSIVE"),))
        if INDEX in failing:
            for statement in ("ANALYZE trace_sessions",) if postgresql else BOUNDED_ANALYZE:
                run(statement)
            repairs.append(f"recreated index {SESSION_TIME_INDEX} (it was: {_problem(found, INDEX)})")
        if TRIGGER in failing:
            repairs.append(f"recreated {_problem(found, TRIGGER)}")
    if failing & {CREATED_AT, ORPHANS, FOREIGN_KEYS}:
        # A leftover position (an interrupted earlier fix) would skip the rows before it: start over.
        run(f"DROP TABLE IF EXISTS {PROGRESS_TABLE}")
        started = time.monotonic()
        finalized = not rolling_deploy_triggers(autocommit)
        report = backfill(autocommit, batch_size=batch_size, on_progress=on_progress, remove_orphans=finalized)
        orphans = (
            f"removed {report.orphans_removed} orphan links"
            if finalized
            else f"kept {report.orphans_kept} links without a trace for `tracestore finalize`"
        )
        repairs.append(
            f"set created_at of {report.rows_updated} links and {orphans} ({report.rows_scanned} links scanned in "
            f"batches of {batch_size}, {time.monotonic() - started:.2f} s)"
        )
        if FOREIGN_KEYS in failing and finalized:
            key, removed = restore_links_foreign_key(autocommit, batch_size=batch_size)
            if key is not None:
                repairs.append(
                    f"added foreign key {key} (NOT VALID, {removed} links without a trace removed, VALIDATE)"
                )
    return repairs


def _rebuild_session_index_concurrently(connection: Connection) -> None:
    """PostgreSQL: DROP INDEX CONCURRENTLY, then CREATE INDEX CONCURRENTLY from the model (autocommit)."""
    quoted = connection.dialect.identifier_preparer.quote(SESSION_TIME_INDEX)
    connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {quoted}")
    sql = str(create_session_index().compile(dialect=connection.dialect))
    connection.exec_driver_sql(sql.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1))


def _refusal(checks: list[Check], dialect: str) -> str | None:
    failing = {check.name for check in checks if not check.ok}
    if SCHEMA in failing:  # the other repairs assume head; `tracestore upgrade` is the repair
        return "the schema is not at head: run `tracestore upgrade` first"
    # Writing to a damaged SQLite file can make it worse. An INVALID PostgreSQL index is not damage:
    # the repairs go ahead and the check stays failed until the operator rebuilds it.
    if INTEGRITY in failing and dialect == "sqlite":
        return "integrity_check failed: the file is damaged, restore a backup"
    return None


def _problem(checks: list[Check], name: str) -> str | None:
    return next(check.problem for check in checks if check.name == name)
