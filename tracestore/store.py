"""The synchronous store: executes the statements of tracestore.queries on a SQLAlchemy Engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any

from sqlalchemy import URL, Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from tracestore.busy import BUSY_DEADLINE, Attempt, retry_busy
from tracestore.engine import WRITE, configure_engine, create_engine, missing_sqlite_file, read_options
from tracestore.errors import SchemaOutOfDateError, StorageError
from tracestore.migrate import at_head, ensure_head
from tracestore.queries import (
    LINK_COLUMNS,
    TRACE_COLUMNS,
    DriverSQL,
    Statements,
    compiled,
    explain_statement,
    statements_for,
)
from tracestore.retention import prune as retention
from tracestore.retention import upkeep as maintenance
from tracestore.rows import (
    WriteBatch,
    check_query_string,
    check_trace_id,
    decode_row,
    decode_rows,
    page_of,
    prepare_page,
    prepare_query,
    prepare_sessions_query,
    refuse_nul,
    storage_error,
)
from tracestore.tail import DEFAULT_LOOKBACK, DEFAULT_POLL_LIMIT, SessionTail, check_tail_args, drive
from tracestore.types import Page, PageCursor, TraceContext

plan_log = logging.getLogger("tracestore.plan")
upkeep_log = logging.getLogger("tracestore.maintenance")

DEFAULT_URL = "sqlite:///traces.db"


class TraceStore:
    """Stores traces and answers "what did session S do recently?" from the composite index.

    `TraceStore(url_or_engine)` takes a URL (the store owns and disposes the engine) or an existing
    Engine (SQLite connections get tracestore's pragmas). A database below the head revision is
    upgraded on open (`auto_upgrade=True`, the embedded default) or refused with SchemaOutOfDateError.
    `read_engine` (URL or Engine, same rules): reads go there, e.g. to a streaming replica; they see
    what it has replayed, so a write is not promised to be visible to the next read.
    """

    # Write-path tunables (class attributes, so the constructor's signature stays as it is): how long a
    # write retries while other writers hold the lock, and the SQLite upkeep the writer does (maintenance).
    _busy_deadline: float = BUSY_DEADLINE
    _upkeep: maintenance.Upkeep | None = None

    def __init__(
        self,
        url_or_engine: str | Engine = DEFAULT_URL,
        *,
        auto_upgrade: bool = True,
        read_engine: str | Engine | None = None,
    ) -> None:
        owned = not isinstance(url_or_engine, Engine)
        engine = create_engine(url_or_engine) if isinstance(url_or_engine, str) else configure_engine(url_or_engine)
        self._engine = engine
        self._owned = owned
        # Where reads go: the same engine, or `read_engine` (e.g. a streaming replica), owned like the
        # main one when given as a URL. Writes, deletes and the schema check stay on the main engine.
        self._reader = engine
        self._reader_owned = False
        # Engine views (shared pool): writes BEGIN IMMEDIATE so writers queue on the lock instead of
        # failing; reads are single statements, each its own snapshot (see engine._on_begin).
        self._write_engine = engine.execution_options(**{WRITE: True})
        self._read_engine = engine.execution_options(**read_options(engine.dialect.name))
        self._sql: Statements = statements_for(engine.dialect.name)
        self._migrating = False
        try:
            if read_engine is not None:
                self._reader, self._reader_owned = _read_engine(read_engine, engine)
                self._read_engine = self._reader.execution_options(**read_options(self._reader.dialect.name))
            _refuse_missing_file(engine.url, auto_upgrade=auto_upgrade)
            # True while an upgrade is unfinished (see migrate.ensure_head): session queries then
            # use the legacy join, which does not depend on the backfilled copy.
            self._migrating = ensure_head(engine, auto_upgrade=auto_upgrade)
            if self._reader is not engine and not self._migrating:
                # A replica replays the upgrade after the primary: until its own revision is head it
                # gets the legacy join too, which returns the same rows at any revision.
                self._still_migrating()
        except SQLAlchemyError as exc:
            self.close()
            raise storage_error(f"cannot open {engine.url!r}", exc) from exc
        except BaseException:
            self.close()
            raise

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def read_engine(self) -> Engine:
        """The engine reads go to: `read_engine` if one was given, else `engine`."""
        return self._reader

    # -- writes -----------------------------------------------------------------------------------
    def store(self, trace: TraceContext) -> None:
        """Insert a trace, or update it in place (its existing session links are kept and re-stamped)."""
        self.store_batch((trace,))

    def store_batch(self, traces: Iterable[TraceContext]) -> None:
        """Store many traces in one transaction: all of them or, on any error, none."""
        batch = WriteBatch(traces)
        if not batch.traces:
            return
        if self._sql.dialect_name == "postgresql":
            refuse_nul(batch)
        retry_busy(lambda attempt: self._write_batch(batch, attempt), what="store", deadline=self._busy_deadline)
        self._after_write()

    def _write_batch(self, batch: WriteBatch, attempt: Attempt) -> None:
        """One try of store_batch's transaction (retry_busy runs it again while the database is locked)."""
        insert, upsert, link = (self._driver_sql(stmt) for stmt in self._sql.write_statements)
        try:
            with self._write_engine.begin() as conn:
                # Straight to the pooled DBAPI connection, inside SQLAlchemy's transaction (like _fetch):
                # exec_driver_sql's result and event machinery cost ~10% of a 500-trace batch.
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    for setup in self._sql.write_setup:
                        cursor.execute(self._driver_sql(setup).sql)
                    if not self._sql.write_arrays:
                        cursor.executemany(insert.sql, insert.args_many(TRACE_COLUMNS, batch.traces))
                        if cursor.rowcount != len(batch.traces):  # some ids exist (or the driver cannot tell)
                            cursor.executemany(upsert.sql, upsert.args_many(TRACE_COLUMNS, batch.traces))
                        if batch.links:
                            cursor.executemany(link.sql, link.args_many(LINK_COLUMNS, batch.links))
                    else:  # one statement per table (and chunk), each row's values an array element
                        if _execute_arrays(cursor, insert, TRACE_COLUMNS, batch.traces) != len(batch.traces):
                            _execute_arrays(cursor, upsert, TRACE_COLUMNS, batch.traces)
                        if batch.links:
                            _execute_arrays(cursor, link, LINK_COLUMNS, batch.links)
                finally:
                    cursor.close()
                attempt.committing()
        except (SQLAlchemyError, self._engine.dialect.loaded_dbapi.Error) as exc:
            if attempt.at_commit:
                raise storage_error(
                    "store failed at COMMIT (not retried; on a lost connection the outcome is unknown)", exc
                ) from exc
            raise storage_error("store failed, nothing of the batch was written", exc) from exc

    def delete(self, trace_id: str) -> bool:
        """Delete a trace and its session links; False if there was no such trace."""
        query = self._driver_sql(self._sql.delete_trace)
        args = query.args({"id": check_trace_id(trace_id, self._sql)})
        deleted = retry_busy(
            lambda attempt: self._delete(query, args, attempt), what="delete", deadline=self._busy_deadline
        )
        self._after_write()
        return deleted

    def _delete(self, query: DriverSQL, args: Any, attempt: Attempt) -> bool:
        """One try of delete's transaction; a COMMIT that failed is not retried (its count would be wrong)."""
        try:
            with self._write_engine.begin() as conn:
                deleted = bool(conn.exec_driver_sql(query.sql, args).rowcount)
                attempt.committing()
            return deleted
        except SQLAlchemyError as exc:
            raise storage_error("delete failed", exc) from exc

    def _after_write(self) -> None:
        """The writer's SQLite upkeep after a committed write: a WAL checkpoint or fresh statistics when due."""
        upkeep = self._upkeep = self._upkeep or maintenance.Upkeep.for_engine(self._engine)
        job = upkeep.due() if upkeep is not None else None
        if job is not None:
            self._run_upkeep(job)

    def _run_upkeep(self, job: maintenance.Job) -> None:
        """Run an upkeep job on a pooled connection; a failure is logged (the write committed; the job is due
        again after the next one)."""
        assert self._upkeep is not None
        try:
            with self._engine.connect() as conn:
                self._upkeep.run(conn, job)
        except SQLAlchemyError as exc:
            upkeep_log.warning("SQLite %s failed (the write itself committed): %s", job, exc)

    # -- reads ------------------------------------------------------------------------------------
    def get(self, trace_id: str) -> TraceContext | None:
        params = {"id": check_trace_id(trace_id, self._sql)}
        row = self._fetch(self._sql.get_trace, params)
        return decode_row(row[0]) if row else None

    def get_by_session_uid(
        self, session_uid: str, since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """The session's traces with created_at >= since, newest first (ties: id descending)."""
        check_query_string("session_uid", session_uid)  # None here would mean "every session"
        return self.query(session_uid=session_uid, since=since, limit=limit)

    def query(
        self,
        *,
        session_uid: str | None = None,
        namespace: str | None = None,
        context_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[TraceContext]:
        """Traces matching every given filter, newest first; `since` inclusive, `until` exclusive."""
        stmt, params = prepare_query(
            self._sql,
            session_uid=session_uid,
            namespace=namespace,
            context_type=context_type,
            since=since,
            until=until,
            limit=limit,
            migrating=self._migrating and self._still_migrating(),
        )
        return decode_rows(self._fetch(stmt, params))

    def get_by_session_uids(
        self, session_uids: Sequence[str], since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """Traces of any of the sessions with created_at >= since, newest first, each trace once.

        Each session is read through the composite index (at most `limit` entries each) and the
        candidates merged: the cost grows with sessions x limit, not with the sessions' sizes.
        """
        prepared = prepare_sessions_query(
            self._sql,
            session_uids=session_uids,
            since=since,
            limit=limit,
            migrating=self._migrating and self._still_migrating(),
        )
        return decode_rows(self._fetch(*prepared)) if prepared is not None else []

    def page_by_session_uid(
        self, session_uid: str, since: float | None = None, limit: int = 100, cursor: PageCursor | None = None
    ) -> Page:
        """One page of the session's traces, newest first; pass `next_cursor` back for the next one.

        Keyset pagination on (created_at, id): every page costs one index range read of `limit`
        entries, and traces stored between two calls are neither skipped nor repeated.
        """
        stmt, params = prepare_page(
            self._sql,
            session_uid=session_uid,
            since=since,
            limit=limit,
            cursor=cursor,
            migrating=self._migrating and self._still_migrating(),
        )
        return page_of(decode_rows(self._fetch(stmt, params)), limit)

    def iter_session(
        self, session_uid: str, since: float | None = None, page_size: int = 1000
    ) -> Iterator[TraceContext]:
        """Every trace of the session (created_at >= since), newest first, a page at a time: bounded memory."""
        cursor: PageCursor | None = None
        while True:
            items, cursor = self.page_by_session_uid(session_uid, since, page_size, cursor)
            yield from items
            if cursor is None:
                return

    def tail(
        self,
        session_uid: str,
        *,
        since: float | None = None,
        poll_interval: float = 1.0,
        lookback: float = DEFAULT_LOOKBACK,
        limit_per_poll: int = DEFAULT_POLL_LIMIT,
    ) -> Iterator[list[TraceContext]]:
        """Follow the session live: one list per poll of the traces that arrived, oldest first (empty if none).

        The first poll brings the backlog from `since` (epoch seconds; default: now). Polls run
        `poll_interval` seconds apart, back to back while a backlog of `limit_per_poll` remains. Each
        is an ascending index range read from the last trace yielded, plus an index-only re-read of
        the last `lookback` seconds for traces stored late; tracestore.tail states the guarantee.
        """
        check_tail_args(since=since, poll_interval=poll_interval, lookback=lookback, limit=limit_per_poll)
        follower = SessionTail(self._sql, session_uid, since=since, lookback=lookback, limit=limit_per_poll)
        while True:
            migrating = self._migrating and self._still_migrating()
            polled = drive(follower.poll(time.time(), migrating=migrating), self._fetch)
            yield polled.traces
            if not polled.more:
                time.sleep(poll_interval)

    def explain(
        self, session_uid: str, since: float | None = None, limit: int | None = None, **filters: Any
    ) -> list[str]:
        """The query plan of query(session_uid=..., ...), one line per plan step."""
        check_query_string("session_uid", session_uid)
        migrating = self._migrating and self._still_migrating()
        stmt, params = prepare_query(
            self._sql, session_uid=session_uid, since=since, limit=limit, migrating=migrating, **filters
        )
        try:
            with self._reader.connect() as conn:
                return _plan(conn, stmt, params)
        except SQLAlchemyError as exc:
            raise storage_error("explain failed", exc) from exc

    def _still_migrating(self) -> bool:
        """Re-read the revision where reads go; once it reached head, switch to the fast query for good."""
        try:
            with self._reader.connect() as conn:
                self._migrating = not at_head(conn)
        except SQLAlchemyError as exc:
            raise storage_error("cannot read the schema revision", exc) from exc
        return self._migrating

    def _driver_sql(self, stmt: Any) -> DriverSQL:
        return compiled(stmt, self._engine.dialect)

    def _fetch(self, stmt: Any, params: dict[str, Any]) -> list[Any]:
        query = compiled(stmt, self._reader.dialect)
        try:
            with self._read_engine.connect() as conn:
                if plan_log.isEnabledFor(logging.DEBUG):
                    plan_log.debug("plan:\n  %s", "\n  ".join(_plan(conn, stmt, params)))
                # Straight to the pooled DBAPI connection: SQLAlchemy's CursorResult and Row objects
                # cost 7% of a 1,000-row window read. The price: no cursor events or echo for reads.
                cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                try:
                    cursor.execute(query.sql, query.args(params))
                    return list(cursor.fetchall())
                finally:
                    cursor.close()
        except (SQLAlchemyError, self._reader.dialect.loaded_dbapi.Error) as exc:
            raise storage_error("query failed", exc) from exc

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Dispose of the engines the store created (an engine passed in stays the caller's), even when the
        database is gone."""
        try:
            if self._upkeep is not None and self._upkeep.writes:  # statistics for the next opener (maintenance)
                self._run_upkeep("statistics")
        finally:
            if self._owned:
                self._engine.dispose()
            if self._reader_owned:
                self._reader.dispose()

    def __enter__(self) -> TraceStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- retention --------------------------------------------------------------------------------
    def prune(
        self,
        older_than: float | datetime | timedelta,
        *,
        batch_size: int = retention.DEFAULT_BATCH_SIZE,
        on_progress: retention.OnProgress | None = None,
        vacuum: bool = False,
        dry_run: bool = False,
    ) -> retention.PruneReport:
        """Delete every trace with created_at < the cutoff, and its session links, oldest first in batches.

        `older_than`: the cutoff (epoch seconds or an aware datetime; not in the future) or an age
        (timedelta). Each batch of at most `batch_size` traces is its own short write transaction, so
        writers keep working, and a prune interrupted at any point is finished by running it again.
        `on_progress(done, total)` after each batch. `vacuum`: on SQLite, give the freed pages back to
        the filesystem when the file is in auto_vacuum=INCREMENTAL mode (else the report says how).
        `dry_run`: count what would go, change nothing. tracestore.retention has the details.
        """
        request = retention.prune_request(older_than, batch_size=batch_size, vacuum=vacuum, dry_run=dry_run)
        return retention.run(self._engine, request, on_progress)


def _refuse_missing_file(url: URL, *, auto_upgrade: bool) -> None:
    """Without auto_upgrade there is nothing to create: do not leave an empty file behind when refusing."""
    path = missing_sqlite_file(url)
    if path is not None and not auto_upgrade:
        raise SchemaOutOfDateError(f"no database at {path}: run `tracestore upgrade --url {url}` to create one")


def _read_engine(read_engine: str | Engine, engine: Engine) -> tuple[Engine, bool]:
    """The read engine and whether the store owns it; the same backend as `engine` (the statements are per dialect)."""
    reader = create_engine(read_engine) if isinstance(read_engine, str) else configure_engine(read_engine)
    if reader.dialect.name != engine.dialect.name:
        if isinstance(read_engine, str):
            reader.dispose()
        raise StorageError(f"the read engine is {reader.dialect.name}, the store's is {engine.dialect.name}")
    return reader, isinstance(read_engine, str)


def _execute_arrays(cursor: Any, query: DriverSQL, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> int:
    """Run a statement of one array per column (Statements.write_arrays) over `rows`; the rows it changed."""
    changed = 0
    for args in query.args_arrays(columns, rows):
        cursor.execute(query.sql, args)
        changed += cursor.rowcount
    return changed


def _plan(conn: Connection, stmt: Any, params: dict[str, Any]) -> list[str]:
    sql, driver_params = explain_statement(stmt, params, conn.dialect)
    rows = conn.exec_driver_sql(sql, driver_params).all()
    return [str(row[-1]) for row in rows]
