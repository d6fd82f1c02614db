"""Schema introspection and migration-time guards, the dialect-specific parts kept in one place."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager

from sqlalchemy import Connection, ForeignKeyConstraint, TextClause, inspect, text
from sqlalchemy.schema import AddConstraint, DropIndex

from tracestore.dialects import rules_for
from tracestore.dialects.base import FOLLOW_TRIGGER, STAMP_LINK_TRIGGER, STAMP_TRACE_TRIGGER
from tracestore.dialects.postgresql import index_is_valid
from tracestore.migrate.backfill import remove_orphan_links_postgresql
from tracestore.migrate.index_build import create_session_index, session_index
from tracestore.migrate.online import ddl_step
from tracestore.migrate.versions import OWN_TABLES
from tracestore.models import SESSION_TIME_INDEX, Base

log = logging.getLogger("tracestore.migrate")

# Bounded ANALYZE: statistics from a sample of each index, seconds even at 100 GB.
BOUNDED_ANALYZE = ("PRAGMA analysis_limit=1000", "ANALYZE", "PRAGMA analysis_limit=0")


def foreign_keys_off(connection: Connection) -> AbstractContextManager[None]:
    """Run a block with foreign keys off (SQLite; elsewhere nothing changes), restoring them after.

    Migrations need this: a batch-mode rebuild of `traces` with foreign keys on deletes every
    `trace_sessions` row through ON DELETE CASCADE, without any error.
    """
    return rules_for(connection.dialect.name).foreign_keys_off(connection)


def freed_pages_not_zeroed(connection: Connection) -> AbstractContextManager[None]:
    """Run a block whose dropped pages are not overwritten with zeros (SQLite's secure_delete=FAST)."""
    return rules_for(connection.dialect.name).freed_pages_not_zeroed(connection)


def table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def column_names(connection: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns(table)}


def index_names(connection: Connection, table: str) -> set[str]:
    return {index["name"] for index in inspect(connection).get_indexes(table) if index["name"]}


def session_index_drift(connection: Connection) -> str | None:
    """Why idx_trace_sessions_uid_time differs from the model in a way Alembic cannot see, or None."""
    return rules_for(connection.dialect.name).session_index_drift(connection)


# -- DDL shared by the migrations and `tracestore verify --fix` ----------------------------------------
# The triggers that keep trace_sessions.created_at equal to its trace's at every moment after revision
# 0002, whoever writes: this release, or the previous one during a rolling deploy (it knows nothing of
# the column). A NULL copy would hide the link from the partial session index, so every way a link can
# be born or a time can change is covered; each engine's rules (tracestore.dialects) write them.
COPY_TRIGGERS = (FOLLOW_TRIGGER, STAMP_LINK_TRIGGER, STAMP_TRACE_TRIGGER)

# The store itself relies on FOLLOW_TRIGGER (a re-stored trace's links follow it). The two stamp
# triggers exist for writers of the previous release only, and cost every insert, so `tracestore
# finalize` drops them once the rolling deploy is over; verify then no longer expects them.
REQUIRED_TRIGGERS = (FOLLOW_TRIGGER,)
ROLLING_DEPLOY_TRIGGERS = (STAMP_LINK_TRIGGER, STAMP_TRACE_TRIGGER)


def create_copy_triggers(names: tuple[str, ...] = COPY_TRIGGERS, *, dialect: str = "sqlite") -> tuple[TextClause, ...]:
    return rules_for(dialect).create_triggers(names)


def drop_copy_triggers(names: tuple[str, ...] = COPY_TRIGGERS, *, dialect: str = "sqlite") -> tuple[TextClause, ...]:
    return rules_for(dialect).drop_triggers(names)


def missing_copy_triggers(connection: Connection, names: tuple[str, ...] = COPY_TRIGGERS) -> list[str]:
    present = {name for (name,) in connection.exec_driver_sql(rules_for(connection.dialect.name).trigger_names_sql)}
    return [name for name in names if name not in present]


def rolling_deploy_triggers(connection: Connection) -> list[str]:
    """The rolling-deploy triggers still present: none once `tracestore finalize` has run."""
    missing = missing_copy_triggers(connection, ROLLING_DEPLOY_TRIGGERS)
    return [name for name in ROLLING_DEPLOY_TRIGGERS if name not in missing]


def drop_session_index() -> DropIndex:
    return DropIndex(session_index(), if_exists=True)


def drop_index_concurrently(connection: Connection, index: str) -> None:
    """PostgreSQL: DROP INDEX CONCURRENTLY IF EXISTS, which waits for running queries instead of
    blocking every reader and writer of the table behind its lock. Needs an autocommit connection."""
    quoted = connection.dialect.identifier_preparer.quote(index)
    connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {quoted}")


def create_session_index_concurrently(connection: Connection) -> bool:
    """PostgreSQL: build idx_trace_sessions_uid_time with CREATE INDEX CONCURRENTLY (writers carry on)
    and check it is valid; an INVALID one left by an interrupted build is dropped and built again.

    Needs an autocommit connection. Returns whether an INVALID index was rebuilt.
    """
    from tracestore.errors import MigrationError

    rebuilt = index_is_valid(connection, SESSION_TIME_INDEX) is False
    if rebuilt:
        drop_index_concurrently(connection, SESSION_TIME_INDEX)
    sql = str(create_session_index().compile(dialect=connection.dialect))
    assert sql.startswith("CREATE INDEX IF NOT EXISTS "), sql
    connection.exec_driver_sql(sql.replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1))
    if index_is_valid(connection, SESSION_TIME_INDEX) is not True:
        raise MigrationError(
            f"index {SESSION_TIME_INDEX} is not valid after CREATE INDEX CONCURRENTLY: run the upgrade again "
            "(it drops and rebuilds an INVALID index)"
        )
    return rebuilt


def refuse_dropping_traces(connection: Connection, *, drop_data: bool) -> None:
    """Raise MigrationError if going to base would drop a traces table that holds rows, or one that an
    application's table refers to by a foreign key (whatever drop_data says: that table is not ours)."""
    from tracestore.errors import MigrationError

    if "traces" not in table_names(connection):
        return
    referring = foreign_keys_to_ours(connection)
    if referring:
        raise MigrationError(
            f"refusing to drop the traces tables: other tables have foreign keys to them ({', '.join(referring)}). "
            "Drop those constraints (or tables) in your own migrations first."
        )
    if drop_data:
        return
    count = connection.exec_driver_sql("SELECT count(*) FROM traces").scalar_one()
    if count:
        raise MigrationError(
            f"refusing to drop the traces table: it holds {count} traces. Downgrade to 0001 (the legacy "
            "schema) to keep them, or pass drop_data (`-x drop_data=yes`) if dropping them is intended."
        )


_PG_FOREIGN_KEYS_TO_OURS = text(
    "SELECT conrelid::regclass::text || '.' || conname FROM pg_constraint WHERE contype = 'f' AND conparentid = 0"
    " AND confrelid IN (to_regclass('traces'), to_regclass('trace_sessions'))"
    " AND conrelid NOT IN (to_regclass('traces'), to_regclass('trace_sessions')) ORDER BY 1"
)


def foreign_keys_to_ours(connection: Connection) -> list[str]:
    """The foreign keys of other tables (an application's) to traces or trace_sessions, as 'table.constraint'.

    PostgreSQL refuses to drop a table such a key refers to; SQLite drops it and leaves the key pointing at
    nothing, so the downgrade asks first, on both."""
    if connection.dialect.name == "postgresql":
        return list(connection.execute(_PG_FOREIGN_KEYS_TO_OURS).scalars())
    inspector = inspect(connection)
    return [
        f"{table}.{key['name']}" if key["name"] else table
        for table in sorted(inspector.get_table_names())
        if table not in OWN_TABLES
        for key in inspector.get_foreign_keys(table)
        if key["referred_table"] in ("traces", "trace_sessions")
    ]


# -- the junction's foreign key to traces ------------------------------------------------------------
# A legacy PostgreSQL schema may lack it (its writers committed links before their trace); SQLite's
# legacy DDL always declared it. `tracestore finalize` adds it once no previous release writes.
FOREIGN_KEY_VALID, FOREIGN_KEY_NOT_VALID, FOREIGN_KEY_MISSING = "valid", "not valid", "missing"

_PG_LINKS_FOREIGN_KEY = text(
    "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f'"
    " AND conrelid = to_regclass('trace_sessions') AND confrelid = to_regclass('traces')"
)


def links_foreign_key(connection: Connection) -> tuple[str, str | None]:
    """The state of trace_sessions' foreign key to traces (FOREIGN_KEY_*) and its name (None when missing)."""
    if connection.dialect.name != "postgresql":
        for key in inspect(connection).get_foreign_keys("trace_sessions"):
            if key["referred_table"] == "traces":
                return FOREIGN_KEY_VALID, key["name"]
        return FOREIGN_KEY_MISSING, None
    row = connection.execute(_PG_LINKS_FOREIGN_KEY).first()
    if row is None:
        return FOREIGN_KEY_MISSING, None
    return (FOREIGN_KEY_VALID if row.convalidated else FOREIGN_KEY_NOT_VALID), str(row.conname)


def _links_foreign_key_model() -> ForeignKeyConstraint:
    (key,) = Base.metadata.tables["trace_sessions"].foreign_key_constraints
    return key


def add_links_foreign_key_not_valid(connection: Connection) -> str:
    """PostgreSQL: ALTER TABLE … ADD CONSTRAINT <the model's foreign key> NOT VALID: checked for new rows from
    its commit on, without scanning the table (a brief lock, no wait on the rows). Returns its name."""
    sql = str(AddConstraint(_links_foreign_key_model()).compile(dialect=connection.dialect))
    connection.exec_driver_sql(f"{sql} NOT VALID")
    name = links_foreign_key(connection)[1]
    assert name is not None
    return name


def validate_links_foreign_key(connection: Connection, name: str) -> None:
    """PostgreSQL: VALIDATE CONSTRAINT scans the table under a lock that lets reads and writes go on."""
    quoted = connection.dialect.identifier_preparer.quote(name)
    connection.exec_driver_sql(f"ALTER TABLE trace_sessions VALIDATE CONSTRAINT {quoted}")


def restore_links_foreign_key(autocommit: Connection, *, batch_size: int) -> tuple[str | None, int]:
    """Give trace_sessions its foreign key to traces where a legacy PostgreSQL schema lacks it (for
    `tracestore finalize`, once no previous release writes links before their trace); returns (its name if
    added or validated, links removed). The connection must be in autocommit mode.

    NOT VALID first, so no new link without a trace can come while the existing ones are removed in
    batches (recorded or not); VALIDATE then scans without blocking writers. A NOT VALID key left by a
    killed run is finished here. Nothing to do where the key is valid (always on SQLite).
    """
    state, name = links_foreign_key(autocommit)
    if state == FOREIGN_KEY_VALID:
        return None, 0
    if state == FOREIGN_KEY_MISSING:
        # ALTER TABLE locks both tables briefly (no scan): bounded waits, in the application's order.
        locks = (("traces", "SHARE ROW EXCLUSIVE"), ("trace_sessions", "SHARE ROW EXCLUSIVE"))
        name = ddl_step(
            autocommit,
            lambda: add_links_foreign_key_not_valid(autocommit),
            what="add the foreign key trace_sessions -> traces (NOT VALID)",
            locks=locks,
        )
        log.info("added foreign key %s NOT VALID", name)
    assert name is not None
    removed = remove_orphan_links_postgresql(autocommit, batch_size=batch_size)
    validate_links_foreign_key(autocommit, name)
    log.info("validated foreign key %s (%d links without a trace removed first)", name, removed)
    return name, removed
