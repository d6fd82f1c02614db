"""SQLite: build idx_trace_sessions_uid_time beside the table, in key order, and attach it whole.

Filling the partial index by updating links in rowid order puts nearly every entry on a different
leaf, so each batch rewrites about one page per link, twice (WAL and checkpoint); filling it in key
order rewrites the table's pages instead. So the backfill (tracestore.migrate.backfill) fills the
column with no session index present, and this module builds the index's b-tree as a WITHOUT ROWID
table whose records are exactly the index's, (session_uid, created_at, trace_id, rowid), then turns
its schema row into the index's. (docs/performance.md "Upgrade I/O" has the figures, docs/migrations.md
the steps.) Each step is safe to kill and run again:

1. install: the build table and three triggers that mirror every change of trace_sessions into it
   as SQLite would change the index (one write step).
2. snapshot: without the write lock, the rowids of the links, sorted in the index's order, into a TEMP
   table (a killed run's TEMP table is gone; the next run sorts the links not yet in the build table).
3. copy: batches of consecutive keys, each link read again by rowid under the lock, so a link changed
   or deleted since the snapshot is copied as it is now or not at all; INSERT OR IGNORE leaves what
   the triggers wrote. The pages are written in key order, about once.
4. check: in one statement (one read snapshot), the build table and the links with a created_at agree in count
   and in the sum of their rowids (a miss the triggers cannot see, such as a VACUUM that renumbered
   rowids or an INSERT OR REPLACE that deleted a link without its delete trigger, shows there).
5. attach: one write step drops the triggers and rewrites the build table's schema row into the
   index's (writable_schema, then schema_version + 1 so every connection reloads its schema).

If the check fails, or the schema row cannot be written (a SQLite built or configured defensive),
the build table goes and the index is made by CREATE INDEX, which holds the write lock for a sort.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from functools import partial

from sqlalchemy import Connection, Index, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import CreateIndex

from tracestore.errors import driver_reason
from tracestore.migrate.online import read_into_cache, restart_wal, write_step
from tracestore.models import SESSION_TIME_INDEX, Base

log = logging.getLogger("tracestore.migrate")

BUILD_TABLE = "tracestore_session_index_build"
BUILD_TRIGGERS = (f"{BUILD_TABLE}_insert", f"{BUILD_TABLE}_update", f"{BUILD_TABLE}_delete")
_DROP_TRIGGERS = tuple(f"DROP TRIGGER IF EXISTS {name}" for name in BUILD_TRIGGERS)
# What a downgrade runs in its own transaction to remove an interrupted build (its triggers name created_at).
DROP_BUILD = (*_DROP_TRIGGERS, f"DROP TABLE IF EXISTS {BUILD_TABLE}")
_KEYS = "tracestore_session_index_keys"  # TEMP: the snapshot, in key order (its rowid)
# Checkpoint after this many copy batches: each batch writes few pages in key order, and the pages a
# checkpoint writes back together share the OS's page-cache folios instead of dirtying one each.
CHECKPOINT_EVERY = 10

_CREATE_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {BUILD_TABLE} (session_uid TEXT NOT NULL, created_at REAL NOT NULL,"
    " trace_id TEXT NOT NULL, rid INTEGER NOT NULL, PRIMARY KEY (session_uid, created_at, trace_id, rid))"
    " WITHOUT ROWID"
)
_ENTRY = (
    f"DELETE FROM {BUILD_TABLE} WHERE session_uid = OLD.session_uid AND created_at = OLD.created_at"
    " AND trace_id = OLD.trace_id AND rid = OLD.rowid;"
)
_NEW_ENTRY = (
    f"INSERT OR REPLACE INTO {BUILD_TABLE} (session_uid, created_at, trace_id, rid)"
    " SELECT NEW.session_uid, NEW.created_at, NEW.trace_id, NEW.rowid WHERE NEW.created_at IS NOT NULL;"
)
_TRIGGERS = {
    # INSERT OR REPLACE of an existing link deletes the old row without firing a delete trigger: its
    # entry (the trace's time, another rowid) goes here. One probe of the table's key per link.
    BUILD_TRIGGERS[0]: "AFTER INSERT ON trace_sessions BEGIN"
    f" DELETE FROM {BUILD_TABLE} WHERE session_uid = NEW.session_uid"
    " AND created_at IN (NEW.created_at, (SELECT created_at FROM traces WHERE id = NEW.trace_id))"
    f" AND trace_id = NEW.trace_id AND rid <> NEW.rowid; {_NEW_ENTRY} END",
    BUILD_TRIGGERS[1]: f"AFTER UPDATE ON trace_sessions BEGIN {_ENTRY} {_NEW_ENTRY} END",
    BUILD_TRIGGERS[2]: f"AFTER DELETE ON trace_sessions BEGIN {_ENTRY} END",
}
# The snapshot: links with a created_at in the index's order, read without the write lock. A full scan and one
# sort, on two threads: walking the legacy session index and sorting each session (the plan SQLite picks)
# took 44 s at 12M links, this 14 s. A rerun leaves out the links a killed run already copied.
_SNAPSHOT = (
    f"CREATE TEMP TABLE {_KEYS} AS SELECT j.rowid AS rid FROM trace_sessions AS j NOT INDEXED"
    " WHERE j.created_at IS NOT NULL{resumed} ORDER BY j.session_uid, j.created_at, j.trace_id, j.rowid"
)
_NOT_COPIED = (
    f" AND NOT EXISTS (SELECT 1 FROM {BUILD_TABLE} AS b WHERE b.session_uid = j.session_uid"
    " AND b.created_at = j.created_at AND b.trace_id = j.trace_id AND b.rid = j.rowid)"
)
SORT_THREADS = 2
_COPY = text(
    f"INSERT OR IGNORE INTO {BUILD_TABLE} (session_uid, created_at, trace_id, rid)"
    f" SELECT j.session_uid, j.created_at, j.trace_id, j.rowid FROM temp.{_KEYS} AS k"
    " CROSS JOIN trace_sessions AS j ON j.rowid = k.rid"
    " WHERE k.rowid > :lo AND k.rowid <= :hi AND j.created_at IS NOT NULL ORDER BY k.rowid"
)
_READ_BATCH = text(
    f"SELECT count(j.created_at) FROM temp.{_KEYS} AS k CROSS JOIN trace_sessions AS j ON j.rowid = k.rid"
    " WHERE k.rowid > :lo AND k.rowid <= :hi"
)
_COUNTS = (
    f"SELECT * FROM (SELECT count(*), coalesce(sum(rid), 0) FROM {BUILD_TABLE}),"
    " (SELECT count(*), coalesce(sum(rowid), 0) FROM trace_sessions WHERE created_at IS NOT NULL)"
)


def session_index() -> Index:
    """idx_trace_sessions_uid_time as the model declares it."""
    return next(index for index in Base.metadata.tables["trace_sessions"].indexes if index.name == SESSION_TIME_INDEX)


def create_session_index() -> CreateIndex:
    """CREATE INDEX IF NOT EXISTS idx_trace_sessions_uid_time (partial), from the model."""
    return CreateIndex(session_index(), if_not_exists=True)


def build_session_index(connection: Connection, *, batch_size: int) -> bool:
    """Build and attach the session index (module doc); True if attached from the build table, False if
    it had to be made by CREATE INDEX.

    The connection must be in autocommit mode (Alembic's autocommit_block); every link must already
    carry its created_at (the backfill), and the index must not exist.
    """
    index = SESSION_TIME_INDEX
    create_index = str(create_session_index().compile(dialect=connection.dialect))
    log.info("session index: building it beside trace_sessions, in key order")
    started = time.monotonic()
    resumed = connection.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = ?", (BUILD_TABLE,)).first()
    write_step(connection, lambda: _install(connection), what="create the session index's build table")
    copied = _copy(connection, batch_size, resumed=resumed is not None)
    copy_seconds = time.monotonic() - started
    index_sql = _as_stored(create_index)
    for _ in range(3):  # again only if the schema changed between the check and the attach
        checked = _check(connection)
        if checked is None:
            break
        try:
            attached = write_step(
                connection,
                partial(_attach, connection, index, index_sql, checked),
                what=f"attach {index}",
            )
        except DBAPIError as exc:  # a defensive SQLite refuses writes to sqlite_master
            log.warning("session index: the build table's schema row cannot be rewritten: %s", driver_reason(exc))
            break
        if attached is not None:
            log.info(
                "session index: %d entries copied in key order in %.1fs, attached (%s)", copied, copy_seconds, attached
            )
            return True
    _fall_back(connection, create_index)
    return False


def _install(connection: Connection) -> None:
    run = connection.exec_driver_sql
    run(_CREATE_TABLE)
    for name, body in _TRIGGERS.items():
        run(f"CREATE TRIGGER IF NOT EXISTS {name} {body}")


def _copy(connection: Connection, batch_size: int, *, resumed: bool) -> int:
    run = connection.exec_driver_sql
    run(f"DROP TABLE IF EXISTS temp.{_KEYS}")
    snapshot_started = time.monotonic()
    threads = run("PRAGMA threads").scalar_one()
    run(f"PRAGMA threads={SORT_THREADS}")
    try:
        run(_SNAPSHOT.format(resumed=_NOT_COPIED if resumed else ""))
    finally:
        run(f"PRAGMA threads={int(threads)}")
    # No frame committed during that long read could be checkpointed: copy them now, or the writer whose
    # commit next crosses its autocheckpoint copies them all inside its COMMIT (up to 0.93 s at 10M).
    restart_wal(connection)
    total = run(f"SELECT coalesce(max(rowid), 0) FROM temp.{_KEYS}").scalar_one()
    log.info("session index: %d links to copy, sorted in %.1fs", total, time.monotonic() - snapshot_started)
    copied, low, batches, last_log = 0, 0, 0, time.monotonic()
    while low < total:
        bounds = {"lo": low, "hi": low + batch_size}
        connection.execute(_READ_BATCH, bounds)  # the links' pages, read before the lock is taken

        def batch(bounds: dict[str, int] = bounds) -> int:
            return int(connection.execute(_COPY, bounds).rowcount)

        copied += write_step(connection, batch, what="session index batch")
        low += batch_size
        batches += 1
        if batches % CHECKPOINT_EVERY == 0:
            restart_wal(connection)
        if time.monotonic() - last_log >= 5:
            log.info("session index: %d / %d links copied", min(low, total), total)
            last_log = time.monotonic()
    restart_wal(connection)
    run(f"DROP TABLE temp.{_KEYS}")
    return copied


def _check(connection: Connection) -> int | None:
    """The schema version at which the build table held exactly the index's entries, or None if it did not."""
    # The version first: a VACUUM after it changes it, and _attach then refuses; one before it is in the counts.
    version = int(connection.exec_driver_sql("PRAGMA schema_version").scalar_one())
    built_count, built_sum, count, rowid_sum = connection.exec_driver_sql(_COUNTS).one()  # one statement, one snapshot
    restart_wal(connection)  # what was committed during the scans (see _copy)
    if (built_count, built_sum) != (count, rowid_sum):
        log.warning(
            "session index: the build table holds %d entries (rowid sum %d) where trace_sessions has %d links with"
            " a created_at (sum %d)",
            built_count,
            built_sum,
            count,
            rowid_sum,
        )
        return None
    return version


def _attach(connection: Connection, index: str, index_sql: str, checked_version: int) -> str | None:
    """Turn the build table into the index, in the caller's write transaction; None (nothing changed) if the
    schema changed since the check, which must then be made again."""
    run = connection.exec_driver_sql
    if int(run("PRAGMA schema_version").scalar_one()) != checked_version:
        return None
    if run("SELECT 1 FROM sqlite_master WHERE name = ?", (index,)).first():
        # Made meanwhile by CREATE INDEX (complete by construction): a second schema row of that name would
        # corrupt the schema, so the build table goes instead.
        for statement in DROP_BUILD:
            run(statement)
        return "already made by CREATE INDEX: the build table dropped"
    for statement in _DROP_TRIGGERS:
        run(statement)
    for statistics in ("sqlite_stat1", "sqlite_stat4"):
        if run("SELECT 1 FROM sqlite_master WHERE name = ?", (statistics,)).first():
            run(f"DELETE FROM {statistics} WHERE tbl = ?", (BUILD_TABLE,))
    version = int(run("PRAGMA schema_version").scalar_one())
    run("PRAGMA writable_schema=ON")
    try:
        changed = run(
            "UPDATE sqlite_master SET type = 'index', name = ?, tbl_name = 'trace_sessions', sql = ?"
            " WHERE type = 'table' AND name = ?",
            (index, index_sql, BUILD_TABLE),
        ).rowcount
        if changed != 1:
            raise RuntimeError(f"expected one schema row for {BUILD_TABLE}, found {changed}")
        run(f"PRAGMA schema_version={version + 1}")
    finally:
        run("PRAGMA writable_schema=OFF")
    return f"schema version {version + 1}"


def _as_stored(create_index: str) -> str:
    """The CREATE INDEX statement as SQLite keeps it in sqlite_master (no IF NOT EXISTS, its spacing), made
    by SQLite itself on a scratch database, so the attached index reads exactly like a created one."""
    scratch = sqlite3.connect(":memory:")
    try:
        scratch.execute("CREATE TABLE trace_sessions (trace_id, session_uid, created_at)")
        scratch.execute(create_index)
        return str(scratch.execute("SELECT sql FROM sqlite_master WHERE type = 'index'").fetchone()[0])
    finally:
        scratch.close()


def _fall_back(connection: Connection, create_index: str) -> None:
    log.warning(
        "session index: the build table could not be attached; dropping it and running CREATE INDEX, which holds"
        " the write lock while it sorts every link"
    )
    drop_build(connection)
    read_into_cache(connection, "trace_sessions")
    write_step(connection, lambda: connection.exec_driver_sql(create_index), what="create the session index")


def drop_build(connection: Connection) -> None:
    """Drop the build table and its triggers, in one write step."""

    def drop() -> None:
        for statement in DROP_BUILD:
            connection.exec_driver_sql(statement)

    write_step(connection, drop, what="drop the session index's build table")
