"""Batched backfill of trace_sessions.created_at from traces, with orphan links kept or removed, and resume.

`backfill(connection)` picks the engine's way: rowid ranges on SQLite, primary-key ranges on
PostgreSQL (which has no rowid; its (trace_id, session_uid) key is an index to range over).

Each batch is its own short write transaction over a rowid range of the junction table (which also
adds the batch's rows to the partial session index), so a concurrent writer waits at most one batch
(the lock is left free between batches, see tracestore.online), a kill loses at most one batch of
work, and the position is saved in the same transaction as the batch it describes. A batch that
finds the database busy (SQLite's lock, a PostgreSQL deadlock) is rolled back and run again.

Orphan links (a link whose trace does not exist) are not always dead: the previous release wrote a
trace's links before the trace, each in its own transaction, so during a rolling deploy a link can
be waiting for its trace. So while the rolling-deploy triggers exist (until `tracestore finalize`)
the backfill only records the orphans it finds, in ORPHANS_TABLE; `remove_kept_orphans` (run by
finalize, when no previous release writes any more) deletes those whose trace never came.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import Connection, inspect, text

from tracestore.errors import StorageError
from tracestore.migrate.index_build import CHECKPOINT_EVERY, build_session_index
from tracestore.migrate.online import CheckpointError, write_step
from tracestore.models import SESSION_TIME_INDEX

log = logging.getLogger("tracestore.migrate")
T = TypeVar("T")

PROGRESS_TABLE = "tracestore_backfill_progress"
# Links found without their trace while a previous release may still be writing it (see the module doc).
ORPHANS_TABLE = "tracestore_orphan_links"
TASK = "trace_sessions.created_at"
# Each batch adds one session-index entry per row, nearly each in its own page, while it holds the
# write lock: the size bounds a concurrent writer's longest wait (docs/performance.md).
DEFAULT_BATCH_SIZE = 10_000

ProgressCallback = Callable[[int, int], None]
"""Called after each batch with (rows done, rows in total)."""


@dataclass
class BackfillReport:
    rows_scanned: int = 0
    rows_updated: int = 0
    orphans_removed: int = 0
    # Orphan links recorded in ORPHANS_TABLE and left in place for `tracestore finalize`.
    orphans_kept: int = 0
    seconds: float = 0.0
    # SQLite: the session index was built in key order and attached (True), made by CREATE INDEX after
    # all (False), or already there and filled by the batches (None).
    index_attached: bool | None = None
    index_seconds: float = 0.0


_NEXT_BOUND = text("SELECT rowid FROM trace_sessions WHERE rowid > :lo ORDER BY rowid LIMIT 1 OFFSET :skip")
# Run after _FILL in the same transaction, which left created_at NULL exactly on the links whose trace does
# not exist (the legacy schema's traces.created_at is NOT NULL): no second probe of traces per link.
_KEEP_ORPHANS = text(
    f"INSERT OR IGNORE INTO {ORPHANS_TABLE} (trace_id, session_uid) SELECT trace_id, session_uid"
    " FROM trace_sessions WHERE rowid > :lo AND rowid <= :hi AND created_at IS NULL"
)
# Run before _FILL (verify --fix after finalize, rarely many rows), so the count of links filled leaves them out.
_DELETE_ORPHANS = text(
    "DELETE FROM trace_sessions WHERE rowid > :lo AND rowid <= :hi"
    " AND NOT EXISTS (SELECT 1 FROM traces WHERE traces.id = trace_sessions.trace_id)"
)
# Each link's copy set to its trace's time, NULL if the trace does not exist: one probe of traces per link
# (the same statement with correlated subqueries made two). Only rows whose value differs are written, so a
# rerun over finished ranges (verify --fix) costs reads only.
_FILL = text(
    "UPDATE trace_sessions SET created_at = copy.created_at FROM (SELECT j.rowid AS rid, traces.created_at"
    " FROM trace_sessions AS j LEFT JOIN traces ON traces.id = j.trace_id WHERE j.rowid > :lo AND j.rowid <= :hi)"
    " AS copy WHERE trace_sessions.rowid = copy.rid AND trace_sessions.created_at IS NOT copy.created_at"
)
_SAVE = text(f"INSERT OR REPLACE INTO {PROGRESS_TABLE} (task, last_rowid) VALUES (:task, :hi)")


def backfill_sqlite(
    connection: Connection,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
    remove_orphans: bool = False,
) -> BackfillReport:
    """Fill every junction row's created_at from its trace; record (or, with remove_orphans, delete) links to
    traces that do not exist.

    The connection must be in autocommit mode (Alembic's autocommit_block): this function opens and
    commits one IMMEDIATE transaction per batch itself.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    run = connection.exec_driver_sql
    run(f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE} (task TEXT PRIMARY KEY, last_rowid INTEGER NOT NULL)")
    if not remove_orphans:
        run(_CREATE_ORPHANS_TABLE)
    saved = connection.execute(
        text(f"SELECT last_rowid FROM {PROGRESS_TABLE} WHERE task = :task"), {"task": TASK}
    ).scalar()
    low = saved if saved is not None else 0
    if saved is not None:
        log.info("backfill: resuming after rowid %d", saved)
    log.info("backfill: batch size %d", batch_size)
    total = connection.execute(text("SELECT count(*) FROM trace_sessions WHERE rowid > :lo"), {"lo": low}).scalar_one()
    tracker = _Tracker(total, on_progress)
    # No session index yet (this release's 0002 does not create it): the batches write the table's pages
    # only, in rowid order, and the index is built in its own order afterwards (migrate.index_build).
    # An index already there (made empty by an earlier release's 0002) is filled by the batches.
    build_index = SESSION_TIME_INDEX not in {
        index["name"] for index in inspect(connection).get_indexes("trace_sessions")
    }
    batches = 0
    while True:
        high = connection.execute(_NEXT_BOUND, {"lo": low, "skip": batch_size - 1}).scalar()
        rows_in_batch = batch_size
        if high is None:
            # Fewer than batch_size rows left: the last batch runs to the current end of the table.
            high = connection.execute(text("SELECT max(rowid) FROM trace_sessions")).scalar()
            if high is None or high <= low:
                break
            rows_in_batch = connection.execute(
                text("SELECT count(*) FROM trace_sessions WHERE rowid > :lo AND rowid <= :hi"),
                {"lo": low, "hi": high},
            ).scalar_one()
        bounds = {"lo": low, "hi": high}

        def batch(bounds: dict[str, int] = bounds, high: int = high) -> tuple[int, int]:
            removed = connection.execute(_DELETE_ORPHANS, bounds).rowcount if remove_orphans else 0
            updated = connection.execute(_FILL, bounds).rowcount
            found = removed if remove_orphans else connection.execute(_KEEP_ORPHANS, bounds).rowcount
            connection.execute(_SAVE, {"task": TASK, "hi": high})
            return updated, found

        batches += 1
        checkpoint = not build_index or batches % CHECKPOINT_EVERY == 0
        updated, found = tracker.run(connection, batch, checkpoint=checkpoint)
        tracker.add(rows_in_batch, updated, found, removed=remove_orphans)
        low = high
    if build_index:
        started = time.monotonic()
        tracker.report.index_attached = build_session_index(connection, batch_size=batch_size)
        tracker.report.index_seconds = time.monotonic() - started
    return tracker.finish(connection)


_CREATE_ORPHANS_TABLE = (
    f"CREATE TABLE IF NOT EXISTS {ORPHANS_TABLE}"
    " (trace_id TEXT NOT NULL, session_uid TEXT NOT NULL, PRIMARY KEY (trace_id, session_uid))"
)


class _Tracker:
    """Both backfills' bookkeeping: running a batch, totals, the progress callback, a log line every 5 s, the end."""

    def __init__(self, total: int, on_progress: ProgressCallback | None) -> None:
        self.report = BackfillReport()
        self.total, self.on_progress = total, on_progress
        self.started = self.last_log = time.monotonic()

    def run(self, connection: Connection, batch: Callable[[], T], *, checkpoint: bool = False) -> T:
        """One batch in its own write transaction, run again while the database is busy; a failed
        checkpoint after it is a StorageError saying what is done and what to do."""
        try:
            return write_step(connection, batch, what="backfill batch", checkpoint=checkpoint)
        except CheckpointError as exc:
            done = self.report.rows_scanned
            raise StorageError(
                f"backfill stopped: {exc}. {done:,} of {self.total:,} rows are done and the position is saved: "
                f"{exc.advice}, then run it again, it resumes there"
            ) from exc

    def add(self, scanned: int, updated: int, orphans: int, *, removed: bool) -> None:
        report = self.report
        report.rows_scanned += scanned
        report.rows_updated += updated
        if removed:
            report.orphans_removed += orphans
        else:
            report.orphans_kept += orphans
        if self.on_progress is not None:
            self.on_progress(report.rows_scanned, max(self.total, report.rows_scanned))
        now = time.monotonic()
        if now - self.last_log >= 5:
            rate = report.rows_scanned / (now - self.started)
            log.info(
                "backfill: %d / %d rows (%.0f%%), %.0f rows/s, ETA %.0fs",
                report.rows_scanned,
                self.total,
                100.0 * report.rows_scanned / self.total if self.total else 100.0,
                rate,
                max(self.total - report.rows_scanned, 0) / rate if rate else float("inf"),
            )
            self.last_log = now

    def finish(self, connection: Connection) -> BackfillReport:
        """Drop the progress table (the backfill is complete) and log the totals."""
        connection.exec_driver_sql(f"DROP TABLE IF EXISTS {PROGRESS_TABLE}")
        report = self.report
        report.seconds = time.monotonic() - self.started
        log.info(
            "backfill: done, %d rows scanned, %d filled, %d orphan links removed, %d kept until finalize, %.1fs",
            report.rows_scanned,
            report.rows_updated,
            report.orphans_removed,
            report.orphans_kept,
            report.seconds,
        )
        return report


def backfill(
    connection: Connection,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
    remove_orphans: bool = False,
) -> BackfillReport:
    """backfill_sqlite or backfill_postgresql, by the connection's dialect.

    `remove_orphans`: delete links whose trace does not exist. Only once no previous release writes
    (after `tracestore finalize`): before that such a link may be waiting for its trace, so by
    default it is kept and recorded for finalize (see the module doc).
    """
    run = backfill_postgresql if connection.dialect.name == "postgresql" else backfill_sqlite
    return run(connection, batch_size=batch_size, on_progress=on_progress, remove_orphans=remove_orphans)


# PostgreSQL: batches are ranges of the junction's primary key (trace_id, session_uid), lo < key <= hi.
# The planner estimates a row-value range badly and then hash-joins the batch against a scan of all of
# traces, a cost that grows with the table, so the backfill would grow quadratically. The same range
# stated on trace_id alone is estimated from its histogram, and _PG_BATCH_SETTINGS rules the hash and
# merge joins out whatever the estimate: each link is one probe of traces' primary key.
def _pg_range(t: str) -> str:
    """The batch's key range on table (or alias) `t`."""
    return (
        f"({t}.trace_id, {t}.session_uid) > (:lo_trace, :lo_uid)"
        f" AND ({t}.trace_id, {t}.session_uid) <= (:hi_trace, :hi_uid)"
        f" AND {t}.trace_id BETWEEN :lo_trace AND :hi_trace"
    )


_PG_BATCH_SETTINGS = ("SET LOCAL enable_hashjoin = off", "SET LOCAL enable_mergejoin = off")
_PG_NEXT_BOUND = text(
    "SELECT trace_id, session_uid FROM trace_sessions WHERE (trace_id, session_uid) > (:lo_trace, :lo_uid)"
    " ORDER BY trace_id, session_uid OFFSET :skip LIMIT 1"
)
_PG_LAST_KEY = text(
    "SELECT trace_id, session_uid, count(*) OVER () FROM trace_sessions"
    " WHERE (trace_id, session_uid) > (:lo_trace, :lo_uid) ORDER BY trace_id DESC, session_uid DESC LIMIT 1"
)
_PG_ORPHANS_IN_RANGE = (
    f" FROM trace_sessions WHERE {_pg_range('trace_sessions')}"
    " AND NOT EXISTS (SELECT 1 FROM traces WHERE traces.id = trace_sessions.trace_id)"
)
_PG_DELETE_ORPHANS = text("DELETE" + _PG_ORPHANS_IN_RANGE)
_PG_KEEP_ORPHANS = text(
    f"INSERT INTO {ORPHANS_TABLE} (trace_id, session_uid) SELECT trace_id, session_uid"
    + _PG_ORPHANS_IN_RANGE
    + " ON CONFLICT DO NOTHING"
)
_PG_FILL = text(
    "UPDATE trace_sessions SET created_at = traces.created_at FROM traces"
    f" WHERE traces.id = trace_sessions.trace_id AND {_pg_range('trace_sessions')}"
    " AND trace_sessions.created_at IS DISTINCT FROM traces.created_at"
)
_PG_SAVE = text(
    f"INSERT INTO {PROGRESS_TABLE} (task, last_trace_id, last_session_uid) VALUES (:task, :hi_trace, :hi_uid)"
    " ON CONFLICT (task) DO UPDATE SET last_trace_id = EXCLUDED.last_trace_id,"
    " last_session_uid = EXCLUDED.last_session_uid"
)


def backfill_postgresql(
    connection: Connection,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
    remove_orphans: bool = False,
) -> BackfillReport:
    """backfill_sqlite's job on PostgreSQL: one BEGIN … COMMIT per primary-key range, position saved with it.

    The connection must be in autocommit mode. "" sorts before every id, so it is the start.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    connection.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {PROGRESS_TABLE}"
        " (task TEXT PRIMARY KEY, last_trace_id TEXT NOT NULL, last_session_uid TEXT NOT NULL)"
    )
    if not remove_orphans:
        connection.exec_driver_sql(_CREATE_ORPHANS_TABLE)
    saved = connection.execute(
        text(f"SELECT last_trace_id, last_session_uid FROM {PROGRESS_TABLE} WHERE task = :task"), {"task": TASK}
    ).first()
    low: tuple[str, str] = (saved[0], saved[1]) if saved is not None else ("", "")
    if saved is not None:
        log.info("backfill: resuming after key %r", low)
    log.info("backfill: batch size %d", batch_size)
    total = connection.execute(
        text("SELECT count(*) FROM trace_sessions WHERE (trace_id, session_uid) > (:lo_trace, :lo_uid)"),
        {"lo_trace": low[0], "lo_uid": low[1]},
    ).scalar_one()
    tracker = _Tracker(total, on_progress)
    orphans = _PG_DELETE_ORPHANS if remove_orphans else _PG_KEEP_ORPHANS
    for bounds, rows_in_batch in _pg_batches(connection, low, batch_size):

        def batch(bounds: dict[str, str] = bounds) -> tuple[int, int]:
            for setting in _PG_BATCH_SETTINGS:
                connection.exec_driver_sql(setting)
            found = connection.execute(orphans, bounds).rowcount
            updated = connection.execute(_PG_FILL, bounds).rowcount
            connection.execute(_PG_SAVE, {"task": TASK, "hi_trace": bounds["hi_trace"], "hi_uid": bounds["hi_uid"]})
            return updated, found

        updated, found = tracker.run(connection, batch)
        tracker.add(rows_in_batch, updated, found, removed=remove_orphans)
    return tracker.finish(connection)


def _pg_batches(connection: Connection, low: tuple[str, str], batch_size: int) -> Iterator[tuple[dict[str, str], int]]:
    """The junction's primary-key ranges of `batch_size` keys after `low`, each as (bounds, rows in it)."""
    while True:
        lo = {"lo_trace": low[0], "lo_uid": low[1]}
        bound = connection.execute(_PG_NEXT_BOUND, {**lo, "skip": batch_size - 1}).first()
        rows_in_batch = batch_size
        if bound is not None:
            high = (bound[0], bound[1])
        else:
            # Fewer than batch_size rows left: the last batch runs to the current last key.
            last = connection.execute(_PG_LAST_KEY, lo).first()
            if last is None:
                return
            high, rows_in_batch = (last[0], last[1]), last[2]
        yield {**lo, "hi_trace": high[0], "hi_uid": high[1]}, rows_in_batch
        low = high


def remove_orphan_links_postgresql(connection: Connection, *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Delete every link whose trace does not exist, recorded or not, one primary-key range per write
    transaction; the count. For a junction table whose foreign key is being added (NOT VALID, so no new
    orphan can come): a killed run is finished by the next one, which walks the table again.
    The connection must be in autocommit mode.
    """
    removed = 0
    for bounds, _ in _pg_batches(connection, ("", ""), batch_size):

        def batch(bounds: dict[str, str] = bounds) -> int:
            for setting in _PG_BATCH_SETTINGS:
                connection.exec_driver_sql(setting)
            return int(connection.execute(_PG_DELETE_ORPHANS, bounds).rowcount)

        removed += write_step(connection, batch, what="finalize: removing links without a trace")
    return removed


# -- finalize: the kept orphans whose trace never came -------------------------------------------------
_NEXT_KEPT = text(
    f"SELECT trace_id, session_uid FROM {ORPHANS_TABLE} ORDER BY trace_id, session_uid LIMIT 1 OFFSET :skip"
)
_LAST_KEPT = text(f"SELECT trace_id, session_uid FROM {ORPHANS_TABLE} ORDER BY trace_id DESC, session_uid DESC LIMIT 1")
_KEPT_UP_TO = f" FROM {ORPHANS_TABLE} k WHERE (k.trace_id, k.session_uid) <= (:hi_trace, :hi_uid)"
# A kept link whose trace has arrived meanwhile stays: only links still without a trace go.
_DELETE_KEPT_ORPHANS = text(
    f"DELETE FROM trace_sessions WHERE (trace_id, session_uid) IN (SELECT k.trace_id, k.session_uid{_KEPT_UP_TO})"
    " AND NOT EXISTS (SELECT 1 FROM traces WHERE traces.id = trace_sessions.trace_id)"
)
_FORGET_KEPT = text(f"DELETE FROM {ORPHANS_TABLE} WHERE (trace_id, session_uid) <= (:hi_trace, :hi_uid)")


def remove_kept_orphans(connection: Connection, *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Delete the links the backfill kept (ORPHANS_TABLE) whose trace still does not exist; the count.

    For `tracestore finalize`, once no previous release writes: a kept link whose trace never came is
    an orphan for good. Batches of `batch_size` kept keys in key order, each its own write
    transaction that also forgets the keys it handled, so a killed run is finished by the next one.
    The connection must be in autocommit mode.
    """
    if not inspect(connection).has_table(ORPHANS_TABLE):
        return 0
    removed = 0
    while True:
        high = connection.execute(_NEXT_KEPT, {"skip": batch_size - 1}).first()
        if high is None:
            high = connection.execute(_LAST_KEPT).first()
            if high is None:
                break
        bounds = {"hi_trace": high[0], "hi_uid": high[1]}

        def batch(bounds: dict[str, str] = bounds) -> int:
            deleted = connection.execute(_DELETE_KEPT_ORPHANS, bounds).rowcount
            connection.execute(_FORGET_KEPT, bounds)
            return int(deleted)

        removed += write_step(connection, batch, what="finalize: removing kept orphan links", checkpoint=True)
    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {ORPHANS_TABLE}")
    return removed
