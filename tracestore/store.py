"""The synchronous store: runs the plans of tracestore.core on a SQLAlchemy Engine, blocking."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from tracestore.busy import BUSY_DEADLINE, Attempt, retry_busy
from tracestore.core import MIGRATING, Plan, Read, StoreCore, Write, session_query
from tracestore.drive import execute_steps, fetch_rows
from tracestore.engine import StoreEngine, check_connection, create_engine, tracestore_connection
from tracestore.errors import StorageError, storage_error
from tracestore.migrate import at_head, ensure_head, refuse_missing_database
from tracestore.queries import explain_statement, statements_for
from tracestore.retention import prune as retention
from tracestore.retention import upkeep as maintenance
from tracestore.tail import DEFAULT_LOOKBACK, DEFAULT_POLL_LIMIT
from tracestore.types import Page, PageCursor, Query, TraceContext

plan_log = logging.getLogger("tracestore.plan")
upkeep_log = logging.getLogger("tracestore.maintenance")

DEFAULT_URL = "sqlite:///traces.db"
T = TypeVar("T")


class TraceStore:
    """Stores traces and answers "what did session S do recently?" from the composite index.

    `TraceStore(url_or_engine)` takes a URL (the store owns and disposes the engine) or an application's
    Engine, whose own connections the store leaves as they are (docs/using.md: what it sets for the length of
    each of its operations, and WAL). A database below the head revision is
    upgraded on open (`auto_upgrade=True`, the embedded default) or refused with SchemaOutOfDateError.
    `read_engine` (URL or Engine, same rules): reads go there, e.g. to a streaming replica; they see
    what it has replayed, so a write is not promised to be visible to the next read.

    Write tuning: `retry_deadline` (seconds a write keeps retrying while other writers hold the
    database, then StorageBusyError); on SQLite, the writer's upkeep: a TRUNCATE checkpoint once the
    WAL passes `wal_checkpoint_bytes`, and a bounded ANALYZE every `analyze_every` writes when the
    statistics are stale (0 turns either off).
    """

    def __init__(
        self,
        url_or_engine: str | Engine = DEFAULT_URL,
        *,
        auto_upgrade: bool = True,
        read_engine: str | Engine | None = None,
        retry_deadline: float = BUSY_DEADLINE,
        wal_checkpoint_bytes: int = maintenance.WAL_CHECKPOINT_BYTES,
        analyze_every: int = maintenance.STATISTICS_EVERY,
    ) -> None:
        owned = isinstance(url_or_engine, str)
        self._main = StoreEngine(create_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine)
        engine = self._main.engine
        self._engine = engine
        self._owned = owned
        # Where reads go: the same engine, or `read_engine` (e.g. a streaming replica), owned like the
        # main one when given as a URL. Writes, deletes and the schema check stay on the main engine.
        self._reader = self._main
        self._reader_owned = False
        self._core = StoreCore(statements_for(engine.dialect.name))
        self._retry_deadline = retry_deadline
        self._upkeep = maintenance.Upkeep.for_engine(
            engine, wal_limit=wal_checkpoint_bytes, statistics_every=analyze_every
        )
        self._checkpointer = maintenance.Checkpointer.for_store(self, self._upkeep, owned=owned)
        self._migrating = False
        try:
            if read_engine is not None:
                self._reader, self._reader_owned = _read_engine(read_engine, engine)
            refuse_missing_database(engine.url, auto_upgrade=auto_upgrade)
            with tracestore_connection(engine) as connection:
                # True while an upgrade is unfinished (see migrate.ensure_head): session queries then
                # use the legacy join, which does not depend on the backfilled copy.
                self._migrating = ensure_head(connection, auto_upgrade=auto_upgrade)
            if self._reader is not self._main and not self._migrating:
                # A replica replays the upgrade after the primary: until its own revision is head it
                # gets the legacy join too, which returns the same rows at any revision.
                self._still_migrating()
        # The driver's own errors come from the pragmas set on an application's connection (tracestore.engine).
        except (SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
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
        return self._reader.engine

    # -- writes -----------------------------------------------------------------------------------
    def refusal(self, trace: TraceContext) -> str | None:
        """Why store_batch would refuse `trace` (InvalidTraceError, nothing written), or None: lets a caller leave
        out the traces refused on their own and store the others in one transaction."""
        return self._core.refusal(trace)

    def store(self, trace: TraceContext, *, connection: Connection | None = None) -> str:
        """Insert a trace, or update it in place (its existing session links are kept and re-stamped); its id.

        `connection`: write inside that connection's transaction instead of one of the store's (see
        store_batch).
        """
        return self._write_plan(self._core.store_batch((trace,)), connection)[0]

    def store_batch(self, traces: Iterable[TraceContext], *, connection: Connection | None = None) -> None:
        """Store many traces in one transaction: all of them or, on any error, none.

        `connection`: a Connection of the application's (on the same database): the statements run inside its
        transaction (begun if it has none), which commits or rolls them back with the application's own rows.
        The store then sends no BEGIN or COMMIT, retries nothing and runs no upkeep; a StorageError leaves that
        transaction to the caller, who should roll it back.
        """
        self._write_plan(self._core.store_batch(traces), connection)

    def delete(self, trace_id: str, *, connection: Connection | None = None) -> bool:
        """Delete a trace and its session links; False if there was no such trace. `connection`: as store_batch."""
        return self._write_plan(self._core.delete(trace_id), connection)

    # -- reads ------------------------------------------------------------------------------------
    def get(self, trace_id: str) -> TraceContext | None:
        return self._run(self._core.get(trace_id))

    def get_by_session_uid(
        self, session_uid: str, *, since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """The session's traces with created_at >= since, newest first (ties: id descending)."""
        return self._run(self._core.query(session_query(session_uid, since, limit)))

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
        filters = Query(session_uid, namespace, context_type, since, until, limit)
        return self._run(self._core.query(filters))

    def get_by_session_uids(
        self, session_uids: Sequence[str], *, since: float | None = None, limit: int | None = None
    ) -> list[TraceContext]:
        """Traces of any of the sessions with created_at >= since, newest first, each trace once.

        Each session is read through the composite index (at most `limit` entries each) and the
        candidates merged: the cost grows with sessions x limit, not with the sessions' sizes.
        """
        return self._run(self._core.sessions(session_uids, since=since, limit=limit))

    def page_by_session_uid(
        self, session_uid: str, *, since: float | None = None, limit: int = 100, cursor: PageCursor | None = None
    ) -> Page:
        """One page of the session's traces, newest first; pass `next_cursor` back for the next one.

        Keyset pagination on (created_at, id): every page costs one index range read of `limit`
        entries, and traces stored between two calls are neither skipped nor repeated.
        """
        return self._run(self._core.page(session_uid, since=since, limit=limit, cursor=cursor))

    def iter_session(
        self, session_uid: str, *, since: float | None = None, page_size: int = 1000
    ) -> Iterator[TraceContext]:
        """Every trace of the session (created_at >= since), newest first, a page at a time: bounded memory."""
        cursor: PageCursor | None = None
        while True:
            items, cursor = self.page_by_session_uid(session_uid, since=since, limit=page_size, cursor=cursor)
            yield from items
            if cursor is None:
                return

    def iter_traces(
        self,
        *,
        session_uid: str | None = None,
        since: float | None = None,
        until: float | None = None,
        page_size: int = 1000,
    ) -> Iterator[TraceContext]:
        """Every trace with since <= created_at < until, of one session or of all, oldest first (ties: id
        ascending), a page of `page_size` at a time: bounded memory, whatever the number of traces.

        Each page is a keyset read of an index starting after the previous page's last trace, and its own
        snapshot: a trace stored meanwhile is included when it sorts after the page being read.
        """
        cursor: PageCursor | None = None
        while True:
            items, cursor = self._run(
                self._core.scan(session_uid=session_uid, since=since, until=until, limit=page_size, cursor=cursor)
            )
            yield from items
            if cursor is None:
                return

    def count_traces(
        self, *, session_uid: str | None = None, since: float | None = None, until: float | None = None
    ) -> int:
        """How many traces iter_traces(...) with the same bounds would yield now (an index-only count)."""
        return self._run(self._core.count(session_uid=session_uid, since=since, until=until))

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
        follower = self._core.tail(
            session_uid, since=since, poll_interval=poll_interval, lookback=lookback, limit=limit_per_poll
        )
        return self._follow(follower, poll_interval)

    def _follow(self, follower: Any, poll_interval: float) -> Iterator[list[TraceContext]]:
        while True:
            polled = self._run(self._core.poll(follower))
            yield polled.traces
            if not polled.more:
                time.sleep(poll_interval)

    def explain(
        self, session_uid: str, *, since: float | None = None, limit: int | None = None, **filters: Any
    ) -> list[str]:
        """The query plan of query(session_uid=..., ...), one line per plan step."""
        return self._run(self._core.explain(session_query(session_uid, since, limit, **filters)))

    # -- running plans ------------------------------------------------------------------------------
    def _write_plan(self, plan: Plan[T], connection: Connection | None) -> T:
        if connection is None:
            return self._run(plan)
        check_connection(connection, Connection, self._engine.dialect.name)
        return self._run(plan, connection)

    def _run(self, plan: Plan[T], connection: Connection | None = None) -> T:
        """Answer each request of a plan (tracestore.core) until it returns."""
        try:
            request = next(plan)
            while True:
                if isinstance(request, Read):
                    answer: Any = self._read(request)
                elif request is MIGRATING:
                    answer = self._migrating and self._still_migrating()
                elif connection is not None:
                    answer = self._write_in(connection, request)
                else:
                    answer = self._write(request)
                request = plan.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _write(self, write: Write) -> Any:
        """One write transaction, retried while the database is busy, then the writer's upkeep."""
        result = retry_busy(
            lambda attempt: self._transaction(write, attempt), what=write.what, deadline=self._retry_deadline
        )
        self._after_write()
        return result

    def _transaction(self, write: Write, attempt: Attempt) -> Any:
        """One try of a write transaction: its statements (tracestore.drive), then COMMIT."""
        try:
            with self._main.transaction() as conn:
                result = execute_steps(write.steps(), conn)
                attempt.committing()
            return result
        except (SQLAlchemyError, self._engine.dialect.loaded_dbapi.Error) as exc:
            raise storage_error(write.failed_at_commit if attempt.at_commit else write.failed, exc) from exc

    def _write_in(self, connection: Connection, write: Write) -> Any:
        """A write inside the caller's transaction: once, never committed here."""
        if not connection.in_transaction():
            connection.begin()  # what SQLAlchemy's autobegin does; the raw path would bypass it
        try:
            return execute_steps(write.in_callers_transaction(), connection)
        except (SQLAlchemyError, self._engine.dialect.loaded_dbapi.Error) as exc:
            raise storage_error(write.failed_inside, exc) from exc

    def _after_write(self) -> None:
        """The writer's SQLite upkeep after a committed write: a WAL checkpoint or fresh statistics when due."""
        if self._checkpointer is not None:
            self._checkpointer.wrote()
        job = self._upkeep.due() if self._upkeep is not None else None
        if job is not None:
            self._run_upkeep(job)

    def _run_upkeep(self, job: maintenance.Job) -> None:
        """Run an upkeep job on a pooled connection; a failure is logged (the write committed; the job is due
        again after the next one)."""
        assert self._upkeep is not None
        try:
            with self._engine.connect() as conn, maintenance.exclusive(self._checkpointer, job):
                self._upkeep.run(conn, job)
        except SQLAlchemyError as exc:
            upkeep_log.warning("SQLite %s failed (the write itself committed): %s", job, exc)

    def _read(self, read: Read) -> list[Any]:
        try:
            with self._reader.read.connect() as conn:
                if read.explain or plan_log.isEnabledFor(logging.DEBUG):
                    lines = _plan(conn, read.stmt, read.params)
                    if read.explain:
                        return lines
                    plan_log.debug("plan:\n  %s", "\n  ".join(str(line[-1]) for line in lines))
                return fetch_rows(conn, read.stmt, read.params)
        except (SQLAlchemyError, self._reader.engine.dialect.loaded_dbapi.Error) as exc:
            raise storage_error("explain failed" if read.explain else "query failed", exc) from exc

    def _still_migrating(self) -> bool:
        """Re-read the revision where reads go; once it reached head, switch to the fast query for good."""
        try:
            with self._reader.engine.connect() as conn:
                self._migrating = not at_head(conn)
        except SQLAlchemyError as exc:
            raise storage_error("cannot read the schema revision", exc) from exc
        return self._migrating

    # -- lifecycle --------------------------------------------------------------------------------
    def close(self) -> None:
        """Dispose of the engines the store created (an engine passed in stays the caller's), even when the
        database is gone."""
        try:
            if self._checkpointer is not None:
                self._checkpointer.close()
            if self._upkeep is not None and self._upkeep.writes:  # statistics for the next opener (maintenance)
                self._run_upkeep("statistics")
        finally:
            if self._owned:
                self._engine.dispose()
            if self._reader_owned:
                self._reader.engine.dispose()

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
        return retention.run(self._main, request, on_progress, retry_deadline=self._retry_deadline)


def _read_engine(read_engine: str | Engine, engine: Engine) -> tuple[StoreEngine, bool]:
    """The read engine and whether the store owns it; the same backend as `engine` (the statements are per dialect)."""
    reader = StoreEngine(create_engine(read_engine) if isinstance(read_engine, str) else read_engine)
    if reader.engine.dialect.name != engine.dialect.name:
        if isinstance(read_engine, str):
            reader.engine.dispose()
        raise StorageError(f"the read engine is {reader.engine.dialect.name}, the store's is {engine.dialect.name}")
    return reader, isinstance(read_engine, str)


def _plan(conn: Connection, stmt: Any, params: dict[str, Any]) -> list[Any]:
    """The planner's rows for a statement (EXPLAIN QUERY PLAN on SQLite, EXPLAIN elsewhere)."""
    sql, driver_params = explain_statement(stmt, params, conn.dialect)
    return list(conn.exec_driver_sql(sql, driver_params).all())
