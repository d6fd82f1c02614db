"""Where tracestore records its revision: its own Alembic version table, and the previous release's row in
`alembic_version`, recognised, adopted, kept in step and finally removed.

tracestore's chain records its revision in VERSION_TABLE, so an application's own chain keeps
`alembic_version` to itself. The previous release recorded it in `alembic_version`; such a database is
*adopted*: VERSION_TABLE is created holding the same revision, in one transaction, so a kill at any
point leaves either the old state or the adopted one. Instances of the previous release may still be
running and read `alembic_version`, so until `tracestore finalize` every revision the chain applies also
moves tracestore's row there, in the revision's own transaction (`follow_in_shared_table`). While that
is so, VERSION_TABLE carries one more column, SHARED_MARKER: an application row that happens to equal
tracestore's revision ('0001' is a common name) is then never mistaken for tracestore's.

tracestore's row in `alembic_version` is recognised by more than its text: it is one of tracestore's
revisions and tracestore's tables have that revision's shape (SHAPES).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from alembic.runtime.migration import MigrationContext, MigrationInfo
from sqlalchemy import Column, Connection, Integer, MetaData, PrimaryKeyConstraint, String, Table, inspect, text

from tracestore.dialects import rules_for
from tracestore.engine import WRITE
from tracestore.errors import RevisionError
from tracestore.migrate.backfill import ORPHANS_TABLE, PROGRESS_TABLE
from tracestore.migrate.index_build import BUILD_TABLE
from tracestore.models import SESSION_TIME_INDEX

VERSION_TABLE = "tracestore_alembic_version"
# Where the previous release recorded tracestore's revision, and where applications record theirs.
SHARED_VERSION_TABLE = "alembic_version"
# Present in VERSION_TABLE while tracestore's row is also kept in SHARED_VERSION_TABLE (until finalize).
SHARED_MARKER = "kept_in_alembic_version"


@dataclass(frozen=True)
class Shape:
    """What tracestore's tables look like at a revision: the columns and indexes it guarantees from its
    stamp until the next revision's stamp (a next revision killed half-way may have done part of its work)."""

    columns: Mapping[str, frozenset[str]]
    indexes: frozenset[str]
    no_indexes: frozenset[str] = frozenset()


_TRACE_COLUMNS = frozenset({"id", "context_type", "namespace", "data", "metadata", "created_at", "updated_at"})
_LINK_COLUMNS = frozenset({"trace_id", "session_uid"})
_TRACE_INDEXES = frozenset({"idx_traces_created_at", "idx_traces_type", "idx_traces_namespace"})
_UNUSED_TRACE_INDEXES = frozenset({"idx_traces_type", "idx_traces_namespace"})  # dropped by 0005
_LEGACY_SESSION_INDEX = "idx_trace_sessions_uid"  # dropped by 0004
_LEGACY_TRACE_INDEX = "idx_trace_sessions_trace"  # dropped by 0002 (PostgreSQL) or 0004 (SQLite)

# One entry per revision of migrations/versions (tests/test_version_table.py checks both agree).
SHAPES: Mapping[str, Shape] = {
    # The legacy tables and indexes (0002, half done, may have added the column and dropped the trace index).
    "0001": Shape(
        {"traces": _TRACE_COLUMNS, "trace_sessions": _LINK_COLUMNS}, _TRACE_INDEXES | {_LEGACY_SESSION_INDEX}
    ),
    # The copied created_at (PostgreSQL: and the empty session index, the legacy trace index gone).
    "0002": Shape(
        {"traces": _TRACE_COLUMNS, "trace_sessions": _LINK_COLUMNS | {"created_at"}},
        _TRACE_INDEXES | {_LEGACY_SESSION_INDEX},
    ),
    # The copies filled and the session index complete (0004, half done, may have dropped the legacy session
    # index; SQLite keeps the legacy trace index until 0004).
    "0003": Shape(
        {"traces": _TRACE_COLUMNS, "trace_sessions": _LINK_COLUMNS | {"created_at"}},
        _TRACE_INDEXES | {SESSION_TIME_INDEX},
    ),
    # The legacy session index gone too (0005, half done, may have dropped one of the unused trace indexes).
    "0004": Shape(
        {"traces": _TRACE_COLUMNS, "trace_sessions": _LINK_COLUMNS | {"created_at"}},
        (_TRACE_INDEXES - _UNUSED_TRACE_INDEXES) | {SESSION_TIME_INDEX},
        frozenset({_LEGACY_TRACE_INDEX, _LEGACY_SESSION_INDEX}),
    ),
    # The trace indexes no query reads gone.
    "0005": Shape(
        {"traces": _TRACE_COLUMNS, "trace_sessions": _LINK_COLUMNS | {"created_at"}},
        (_TRACE_INDEXES - _UNUSED_TRACE_INDEXES) | {SESSION_TIME_INDEX},
        frozenset({_LEGACY_TRACE_INDEX, _LEGACY_SESSION_INDEX} | _UNUSED_TRACE_INDEXES),
    ),
}

# The tables tracestore owns in a database it may share with an application; SQLite's statistics tables
# come with the store's ANALYZE.
SQLITE_STATISTICS = ("sqlite_stat1", "sqlite_stat4")
OWN_TABLES = frozenset(
    {"traces", "trace_sessions", PROGRESS_TABLE, ORPHANS_TABLE, BUILD_TABLE, VERSION_TABLE, *SQLITE_STATISTICS}
)


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    """For an application's `context.configure(include_object=...)`: False for tracestore's tables and for
    their columns, indexes and constraints (reflected or from metadata), so the application's autogenerate
    and `alembic check` leave them to tracestore's own chain; True for everything else."""
    if type_ == "table":
        return name not in OWN_TABLES
    return getattr(getattr(obj, "table", None), "name", None) not in OWN_TABLES


@dataclass(frozen=True)
class VersionState:
    """Where tracestore's revision is recorded in a database.

    `revision`: tracestore's revision (None: empty or legacy). `own_table`: VERSION_TABLE exists.
    `shared`: tracestore's row in `alembic_version`, which the previous release reads (None once finalized,
    or when there never was one).
    """

    revision: str | None
    own_table: bool
    shared: str | None

    @property
    def to_adopt(self) -> bool:
        """A previous release's database whose revision is only in `alembic_version`."""
        return not self.own_table and self.shared is not None


def read_state(connection: Connection) -> VersionState:
    """Read where tracestore's revision is recorded. Only reads: safe inside an application's transaction."""
    inspector = inspect(connection)
    if inspector.has_table(VERSION_TABLE):
        result = connection.execute(text(f"SELECT * FROM {VERSION_TABLE}"))
        columns = set(result.keys())
        shared = SHARED_MARKER in columns
        rows = [row.version_num for row in result]
        if len(rows) > 1:
            raise RevisionError(f"{VERSION_TABLE} holds several revisions ({', '.join(sorted(rows))}): expected one")
        revision = rows[0] if rows else None
        return VersionState(revision, own_table=True, shared=revision if shared else None)
    shared_row = recognised_row(connection)
    return VersionState(shared_row, own_table=False, shared=shared_row)


def recognised_row(connection: Connection) -> str | None:
    """tracestore's row in `alembic_version`: a revision of tracestore's chain whose shape tracestore's tables
    have. Of several rows (an application's branches) at most one is taken, and none if it is ambiguous."""
    if not inspect(connection).has_table(SHARED_VERSION_TABLE):
        return None
    rows = connection.execute(text(f"SELECT version_num FROM {SHARED_VERSION_TABLE}")).scalars().all()
    candidates = [row for row in rows if row in SHAPES]
    if not candidates or not _tables_exist(connection):
        return None
    matching = [row for row in candidates if has_shape(connection, row)]
    return matching[0] if len(matching) == 1 else None


def _tables_exist(connection: Connection) -> bool:
    inspector = inspect(connection)
    return all(inspector.has_table(table) for table in ("traces", "trace_sessions"))


def has_shape(connection: Connection, revision: str) -> bool:
    """Whether tracestore's tables have the columns and indexes `revision` guarantees."""
    shape = SHAPES[revision]
    inspector = inspect(connection)
    indexes: set[str] = set()
    for table, columns in shape.columns.items():
        if not inspector.has_table(table):
            return False
        if not columns <= {column["name"] for column in inspector.get_columns(table)}:
            return False
        indexes |= {index["name"] for index in inspector.get_indexes(table) if index["name"]}
    return shape.indexes <= indexes and not shape.no_indexes & indexes


def _version_table(*, shared: bool) -> Table:
    """VERSION_TABLE as Alembic creates its version table, plus SHARED_MARKER when `shared`."""
    columns: list[Any] = [Column("version_num", String(32), nullable=False)]
    if shared:
        columns.append(Column(SHARED_MARKER, Integer, nullable=False, server_default=text("1")))
    return Table(VERSION_TABLE, MetaData(), *columns, PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"))


def adopt(connection: Connection) -> str | None:
    """Adopt a previous release's database: create VERSION_TABLE holding tracestore's revision from
    `alembic_version`, in one transaction (the connection's own if it is idle, else the caller's). Returns
    the adopted revision, None when there was nothing to adopt. Concurrent adopters: the first wins, the
    others find VERSION_TABLE and do nothing."""
    if connection.in_transaction():
        return _adopt(connection)
    was_write = connection.get_execution_options().get(WRITE, False)
    connection.execution_options(**{WRITE: True})  # SQLite: BEGIN IMMEDIATE, one adopter at a time
    try:
        with connection.begin():
            return _adopt(connection)
    finally:
        connection.execution_options(**{WRITE: was_write})


def _adopt(connection: Connection) -> str | None:
    if inspect(connection).has_table(VERSION_TABLE):
        return None
    if inspect(connection).has_table(SHARED_VERSION_TABLE) and not rules_for(connection.dialect.name).one_write_lock:
        # PostgreSQL: one adopter at a time, and no previous release moving its row meanwhile (readers pass).
        connection.exec_driver_sql(f"LOCK TABLE {SHARED_VERSION_TABLE} IN SHARE ROW EXCLUSIVE MODE")
        if inspect(connection).has_table(VERSION_TABLE):
            return None
    revision = recognised_row(connection)
    if revision is None:
        return None
    table = _version_table(shared=True)
    table.create(connection)
    connection.execute(table.insert().values(version_num=revision))
    return revision


def follow_in_shared_table(
    ctx: MigrationContext, step: MigrationInfo, heads: Collection[Any], run_args: Mapping[str, Any]
) -> None:
    """Alembic's on_version_apply: runs in the transaction that records a revision in VERSION_TABLE.

    While tracestore's row is kept in `alembic_version` it moves with it. Back at base nothing of
    tracestore stays: its row leaves `alembic_version`, and VERSION_TABLE and the bookkeeping tables go.
    """
    connection = ctx.connection
    assert connection is not None
    source = next(iter(step.source_revision_ids), None)
    destination = next(iter(step.destination_revision_ids), None)
    shared = _marker_present(connection)
    if destination is None:
        if shared and source is not None:
            _delete_shared_row(connection, source)
        for table in (VERSION_TABLE, PROGRESS_TABLE, ORPHANS_TABLE):
            connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
        for table in SQLITE_STATISTICS:  # made by tracestore's ANALYZE; kept if the application's own fill them
            if (
                inspect(connection).has_table(table)
                and not connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one()
            ):
                connection.exec_driver_sql(f"DROP TABLE {table}")
        return
    if shared and source is not None and inspect(connection).has_table(SHARED_VERSION_TABLE):
        connection.execute(
            text(f"UPDATE {SHARED_VERSION_TABLE} SET version_num = :new WHERE version_num = :old"),
            {"new": destination, "old": source},
        )


def release_shared_row(connection: Connection) -> bool:
    """End the previous release's view (for `tracestore finalize`): delete tracestore's row from
    `alembic_version`, drop that table if nothing else is in it, and drop SHARED_MARKER. In the caller's
    transaction; True if there was something to do."""
    state = read_state(connection)
    if state.shared is None:
        return False
    _delete_shared_row(connection, state.shared)
    # SQLite >= 3.35 drops a column in place; the table holds one row.
    connection.exec_driver_sql(f"ALTER TABLE {VERSION_TABLE} DROP COLUMN {SHARED_MARKER}")
    return True


def _delete_shared_row(connection: Connection, revision: str) -> None:
    if not inspect(connection).has_table(SHARED_VERSION_TABLE):
        return
    run = connection.execute
    run(text(f"DELETE FROM {SHARED_VERSION_TABLE} WHERE version_num = :revision"), {"revision": revision})
    if run(text(f"SELECT count(*) FROM {SHARED_VERSION_TABLE}")).scalar_one() == 0:
        connection.exec_driver_sql(f"DROP TABLE {SHARED_VERSION_TABLE}")


def _marker_present(connection: Connection) -> bool:
    if not inspect(connection).has_table(VERSION_TABLE):
        return False
    return SHARED_MARKER in {column["name"] for column in inspect(connection).get_columns(VERSION_TABLE)}
