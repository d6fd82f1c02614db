"""PostgreSQL time-range partitioning of trace_sessions for retention: the DDL, and the runner that applies it.

Optional, PostgreSQL only, on a database at head after `tracestore finalize`. `partition()` turns
trace_sessions into a table partitioned by range on created_at (one partition per `months` months,
UTC calendar months, plus `trace_sessions_old` for anything older); `add_partitions()` creates the
months ahead (run it from cron: a link newer than the last partition is refused, with its whole
batch); `drop_partitions_before()` is retention: DETACH and DROP whole partitions, then delete the
traces of that time in short batches. The statement builders (`*_statements`) return the SQL text
for review or for running by hand.

What partitioning changes, and why:
- PostgreSQL's unique constraints on a partitioned table must contain the partition key, so the
  primary key is (trace_id, session_uid, created_at). A link's created_at is its trace's (the copy
  trigger moves the links when a trace's time changes), so this is still one row per trace and
  session; the store's link insert says ON CONFLICT DO NOTHING without a target, which works on both
  layouts (ON CONFLICT (trace_id, session_uid) has no matching unique index here).
- created_at becomes NOT NULL: a range partition cannot hold NULL. Hence after `finalize`: the
  previous release's writers insert links without created_at, and its BEFORE INSERT trigger would
  change the partition key, which PostgreSQL refuses.
- Every lookup by trace id alone (a trace's session list, ON DELETE CASCADE) probes each partition's
  primary key: partitions cost reads of traces, so keep them few (months, not days).
"""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from tracestore.engine import create_engine, sync_url
from tracestore.errors import MigrationError, SchemaOutOfDateError, storage_error
from tracestore.migrate import current_revision, head_revision
from tracestore.migrate.lock import migration_lock
from tracestore.migrate.schema import ROLLING_DEPLOY_TRIGGERS, missing_copy_triggers
from tracestore.models import SESSION_TIME_INDEX, SESSION_TIME_INDEX_COLUMNS, SESSION_TIME_INDEX_WHERE

TABLE = "trace_sessions"
OLD_PARTITION = "trace_sessions_old"  # (MINVALUE, first bound): links older than the data at conversion
_UNPARTITIONED = "trace_sessions_unpartitioned"  # the plain table during the conversion's transaction
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_BOUND = re.compile(r"FROM \((MINVALUE|'?[^')]+'?)\) TO \('?([^')]+)'?\)")

# Retention's trace deletion, one short transaction per batch, oldest first through idx_traces_created_at.
DELETE_EXPIRED_TRACES = text(
    "DELETE FROM traces WHERE id IN (SELECT id FROM traces WHERE created_at < :before LIMIT :batch_size)"
)


@dataclass(frozen=True)
class Partition:
    """One partition of trace_sessions: links with lower <= created_at < upper (lower None: no lower bound)."""

    name: str
    lower: float | None
    upper: float


@dataclass(frozen=True)
class Retention:
    """What drop_partitions_before() removed."""

    dropped: list[str]
    traces_deleted: int
    before: float | None  # traces with created_at < this are gone; None when no partition was old enough


# -- bounds ------------------------------------------------------------------------------------------------
def month_start(epoch: float) -> datetime:
    moment = datetime.fromtimestamp(epoch, tz=UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=index // 12, month=index % 12 + 1)


def bounds_between(first: float, last: float, *, months: int = 1) -> list[datetime]:
    """Partition bounds: from the UTC month of `first`, every `months` months, until past `last`."""
    if months < 1:
        raise ValueError("months must be at least 1")
    bounds = [month_start(first)]
    while bounds[-1].timestamp() <= last:
        bounds.append(add_months(bounds[-1], months))
    return bounds


def partition_name(lower: datetime) -> str:
    return f"{TABLE}_p{lower:%Y_%m}"


# -- statements --------------------------------------------------------------------------------------------
def _partition_of(name: str, lower: str, upper: str, *, if_not_exists: bool = False) -> str:
    exists = "IF NOT EXISTS " if if_not_exists else ""
    return f"CREATE TABLE {exists}{name} PARTITION OF {TABLE} FOR VALUES FROM ({lower}) TO ({upper})"


def add_partition_statements(bounds: Sequence[datetime]) -> list[str]:
    """One partition per pair of consecutive bounds (created if missing)."""
    return [
        _partition_of(partition_name(lower), repr(lower.timestamp()), repr(upper.timestamp()), if_not_exists=True)
        for lower, upper in itertools.pairwise(bounds)
    ]


def partition_statements(bounds: Sequence[datetime]) -> list[str]:
    """Turn the plain trace_sessions (at head, finalized) into range partitions on created_at; one transaction.

    The rows are copied (the new table's indexes and foreign key are built after the copy, each in one
    pass): the table is locked for the whole statement list, so run it in a maintenance window.
    """
    index_columns = ", ".join(f"{name} DESC" if desc else name for name, desc in SESSION_TIME_INDEX_COLUMNS)
    return [
        # The old table's constraints keep their names (PostgreSQL's own on a legacy database): it is dropped
        # before the new table's are added.
        f"ALTER TABLE {TABLE} RENAME TO {_UNPARTITIONED}",
        f"ALTER INDEX {SESSION_TIME_INDEX} RENAME TO {SESSION_TIME_INDEX}_unpartitioned",
        f"CREATE TABLE {TABLE} (trace_id TEXT NOT NULL, session_uid TEXT NOT NULL,"
        " created_at DOUBLE PRECISION NOT NULL) PARTITION BY RANGE (created_at)",
        _partition_of(OLD_PARTITION, "MINVALUE", repr(bounds[0].timestamp())),
        *add_partition_statements(bounds),
        # NOT NULL refuses a link without created_at (verify --fix repairs those first).
        f"INSERT INTO {TABLE} (trace_id, session_uid, created_at)"
        f" SELECT trace_id, session_uid, created_at FROM {_UNPARTITIONED}",
        f"DROP TABLE {_UNPARTITIONED}",
        f"ALTER TABLE {TABLE} ADD CONSTRAINT pk_{TABLE} PRIMARY KEY (trace_id, session_uid, created_at)",
        f"ALTER TABLE {TABLE} ADD CONSTRAINT fk_{TABLE}_trace_id_traces"
        " FOREIGN KEY (trace_id) REFERENCES traces (id) ON DELETE CASCADE",
        f"CREATE INDEX {SESSION_TIME_INDEX} ON {TABLE} ({index_columns}) WHERE {SESSION_TIME_INDEX_WHERE}",
        # Autovacuum analyzes the partitions but never a partitioned parent.
        f"ANALYZE {TABLE}",
    ]


def drop_partition_statements(name: str) -> list[str]:
    """Retention of one partition: detach it (a catalog change, no row is read), then drop its file."""
    if not _NAME.match(name):
        raise ValueError(f"not a partition name: {name!r}")
    return [f"ALTER TABLE {TABLE} DETACH PARTITION {name}", f"DROP TABLE {name}"]


# -- reading the catalog -----------------------------------------------------------------------------------
def is_partitioned(connection: Connection) -> bool:
    kind = connection.exec_driver_sql(f"SELECT relkind FROM pg_class WHERE oid = to_regclass('{TABLE}')").scalar()
    return bool(kind == "p")


def partitions(connection: Connection) -> list[Partition]:
    """The partitions of trace_sessions, oldest first."""
    rows = connection.exec_driver_sql(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        f" WHERE i.inhparent = to_regclass('{TABLE}')"
    ).all()
    found = []
    for name, bound in rows:
        match = _BOUND.search(bound)
        if match is None:
            raise MigrationError(f"partition {name} is not a range partition of created_at: {bound}")
        lower = None if match.group(1) == "MINVALUE" else float(match.group(1).strip("'"))
        found.append(Partition(name, lower, float(match.group(2))))
    return sorted(found, key=lambda p: p.upper)


# -- running them ------------------------------------------------------------------------------------------
def partition(target: str | Engine, *, months: int = 1, ahead: int = 3, now: float | None = None) -> list[Partition]:
    """Partition trace_sessions by created_at: from the oldest trace's month to `ahead` months past the current one."""
    engine, owned = _engine(target)
    try:
        with migration_lock(engine.url):
            with engine.connect() as connection:
                _check_convertible(connection)
                oldest, newest = connection.exec_driver_sql("SELECT min(created_at), max(created_at) FROM traces").one()
                connection.rollback()
            moment = time.time() if now is None else now
            first = moment if oldest is None else min(oldest, moment)
            last = max(moment if newest is None else newest, _last_covered(moment, ahead))
            bounds = bounds_between(first, last, months=months)
            with engine.begin() as connection:
                for statement in partition_statements(bounds):
                    connection.exec_driver_sql(statement)
                return partitions(connection)
    except SQLAlchemyError as exc:
        raise storage_error("partitioning trace_sessions failed, nothing changed", exc) from exc
    finally:
        if owned:
            engine.dispose()


def add_partitions(target: str | Engine, *, months: int = 1, ahead: int = 3, now: float | None = None) -> list[str]:
    """Create the partitions up to `ahead` months past the current one (each `months` long); returns the new names."""
    engine, owned = _engine(target)
    try:
        with engine.begin() as connection:
            last = _partitions_or_refuse(connection)[-1].upper
            until = _last_covered(time.time() if now is None else now, ahead)
            if until < last:
                return []
            bounds = bounds_between(last, until, months=months)
            for statement in add_partition_statements(bounds):
                connection.exec_driver_sql(statement)
            return [partition_name(lower) for lower in bounds[:-1]]
    except SQLAlchemyError as exc:
        raise storage_error("adding partitions failed", exc) from exc
    finally:
        if owned:
            engine.dispose()


def _last_covered(now: float, ahead: int) -> float:
    """The last second the partitions must cover: the end of the month `ahead` months after now's."""
    return add_months(month_start(now), ahead + 1).timestamp() - 1


def drop_partitions_before(target: str | Engine, before: float, *, batch_size: int = 10_000) -> Retention:
    """Retention: drop every partition whose links are all older than `before`, then those traces.

    Each partition is detached and dropped in its own short transaction (ACCESS EXCLUSIVE on
    trace_sessions for a catalog change, no row read or written). Then the traces older than the
    dropped range are deleted `batch_size` at a time, each batch its own transaction; until the last
    one, get() of such a trace still finds it, without sessions (session queries never return it).
    """
    engine, owned = _engine(target)
    try:
        with engine.connect() as connection:
            expired = [p for p in _partitions_or_refuse(connection) if p.upper <= before]
            connection.rollback()
        for expired_partition in expired:
            with engine.begin() as connection:
                for statement in drop_partition_statements(expired_partition.name):
                    connection.exec_driver_sql(statement)
        if not expired:
            return Retention([], 0, None)
        cutoff = max(p.upper for p in expired)
        deleted = 0
        while True:
            with engine.begin() as connection:
                count = connection.execute(DELETE_EXPIRED_TRACES, {"before": cutoff, "batch_size": batch_size}).rowcount
            deleted += count
            if count < batch_size:
                return Retention([p.name for p in expired], deleted, cutoff)
    except SQLAlchemyError as exc:
        raise storage_error("retention failed", exc) from exc
    finally:
        if owned:
            engine.dispose()


def _check_convertible(connection: Connection) -> None:
    if connection.dialect.name != "postgresql":
        raise MigrationError("partitioning trace_sessions needs PostgreSQL")
    revision = current_revision(connection)
    if revision != head_revision():
        raise SchemaOutOfDateError(f"database is at revision {revision}: run `tracestore upgrade` first")
    if is_partitioned(connection):
        raise MigrationError("trace_sessions is partitioned already")
    if present := [name for name in ROLLING_DEPLOY_TRIGGERS if name not in missing_copy_triggers(connection)]:
        raise MigrationError(
            f"the rolling-deploy triggers {', '.join(present)} still exist: run `tracestore finalize` once the "
            "previous release has stopped writing (its links have no created_at, which a partition cannot hold)"
        )


def _partitions_or_refuse(connection: Connection) -> list[Partition]:
    if connection.dialect.name != "postgresql" or not is_partitioned(connection):
        raise MigrationError("trace_sessions is not partitioned (see tracestore.partitioning.partition)")
    return partitions(connection)


def _engine(target: str | Engine) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    return create_engine(sync_url(target)), True
