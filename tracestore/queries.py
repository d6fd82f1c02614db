"""What SQL the product runs: builds every trace statement (never executes one).

Statements are built once per shape, with bind parameters for every value, and compiled once per
dialect (`compiled`): the stores hand the SQL text straight to the driver, so a call on the hot path
pays neither statement construction, nor SQLAlchemy's cache-key walk, nor compilation, which at
sub-millisecond latencies cost more than the query. What differs between
the engines (upsert syntax, the aggregate of a trace's session ids, a list of values as one
parameter, the bounded read per listed session, the write statements' row source) comes from
tracestore.dialects.

A statement's shape never depends on how many values a caller passes: a list is one parameter
(`Statements.list_argument`), so the statements and compiled texts cached here stay a fixed few.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any, cast

from sqlalchemy import (
    ClauseElement,
    ColumnElement,
    Delete,
    Dialect,
    Select,
    Table,
    TextClause,
    bindparam,
    delete,
    func,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert

from tracestore.dialects import EngineRules, rules_for
from tracestore.models import Trace, TraceSession
from tracestore.types import Query

traces = cast(Table, Trace.__table__)
links = cast(Table, TraceSession.__table__)

# Value order of the write statements' rows (see DriverSQL.args_many): the stores build rows as
# tuples in this order, which is the driver's own order for positional paramstyles.
TRACE_COLUMNS = ("id", "context_type", "namespace", "data", "metadata", "created_at", "updated_at")
LINK_COLUMNS = ("trace_id", "session_uid", "created_at")


def _session_list(rules: EngineRules) -> ColumnElement[Any]:
    """A JSON array of the trace's session ids, read from the junction primary key (one seek per trace)."""
    other = aliased(TraceSession, name="s")
    return (
        select(rules.session_list(other.session_uid))
        .where(other.trace_id == Trace.id)
        .scalar_subquery()
        .label("session_uids")
    )


# Column order of every trace-returning statement; the stores decode rows positionally.
def _trace_columns(rules: EngineRules) -> tuple[Any, ...]:
    return (
        Trace.id,
        Trace.context_type,
        Trace.namespace,
        Trace.data,
        Trace.metadata_,
        Trace.created_at,
        Trace.updated_at,
        _session_list(rules),
    )


@dataclass(frozen=True)
class Statements:
    """All statements of one dialect. Get one with `statements_for(dialect_name)`."""

    dialect_name: str

    @property
    def rules(self) -> EngineRules:
        """What this dialect does its own way (tracestore.dialects)."""
        return rules_for(self.dialect_name)

    # -- writes -----------------------------------------------------------------------------------
    @property
    @cache  # noqa: B019 - instances are interned by statements_for(), so the cache is bounded
    def insert_trace(self) -> Insert:
        """Insert a trace unless its id exists: the first step of a store, upsert_trace only if it skipped one.

        On SQLite ON CONFLICT DO NOTHING costs what a plain INSERT costs, while DO UPDATE makes the
        traces insert markedly slower, and nearly every stored trace is new.
        """
        return self._trace_values().on_conflict_do_nothing(index_elements=[traces.c.id])  # type: ignore[no-any-return]

    @property
    @cache  # noqa: B019
    def upsert_trace(self) -> Insert:
        """Insert a trace or update it in place. Never INSERT OR REPLACE: that deletes the row and cascades."""
        stmt = self._trace_values()
        columns = TRACE_COLUMNS[1:]
        return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
            index_elements=[traces.c.id], set_={name: stmt.excluded[name] for name in columns}
        )

    @property
    def write_statements(self) -> tuple[Insert, Insert, Insert]:
        """What a store runs, in order: insert_trace, upsert_trace (only if the insert skipped an id), insert_link."""
        return self.insert_trace, self.upsert_trace, self.insert_link

    @property
    def write_setup(self) -> tuple[TextClause, ...]:
        """Run first in every write transaction of the store's, before write_statements (tracestore.dialects)."""
        return self.rules.write_setup()

    @property
    def save_write_setup(self) -> tuple[TextClause, ...]:
        """Run before write_setup in a transaction of the caller's: keeps what write_setup changes."""
        return self.rules.write_setup_undo()[0]

    @property
    def restore_write_setup(self) -> tuple[TextClause, ...]:
        """Run after the writes in a transaction of the caller's, which goes on: put back what save_write_setup kept."""
        return self.rules.write_setup_undo()[1]

    @property
    def write_arrays(self) -> bool:
        """Whether the write statements take one array per column, each run once per batch (see
        DriverSQL.args_arrays), instead of one row of values, run once per row with executemany."""
        return self.rules.write_arrays

    def _trace_values(self) -> Any:
        return self._values(traces, TRACE_COLUMNS)

    def _values(self, table: Table, columns: tuple[str, ...]) -> Any:
        return self.rules.insert_rows(table, columns)

    @property
    @cache  # noqa: B019
    def insert_link(self) -> Insert:
        """Add a trace-session link; an existing one is kept.

        A re-stored trace's existing links follow its created_at through the database trigger that
        migration 0002 creates (it also covers writers of the previous release).
        """
        stmt = self._values(links, LINK_COLUMNS)
        # No conflict target: the primary key is the only unique constraint, (trace_id, session_uid) here
        # and (trace_id, session_uid, created_at) on a partitioned trace_sessions (tracestore.partitioning),
        # where ON CONFLICT (trace_id, session_uid) finds no matching unique index.
        return stmt.on_conflict_do_nothing()  # type: ignore[no-any-return]

    @property
    @cache  # noqa: B019
    def delete_links(self) -> Delete:
        """Delete one trace's links (the junction's primary key starts with trace_id): run before delete_trace,
        so a delete is whole on connections without foreign key enforcement too."""
        return delete(links).where(links.c.trace_id == bindparam("id"))

    @property
    @cache  # noqa: B019
    def delete_trace(self) -> Delete:
        """Delete one trace (its links first: delete_links)."""
        return delete(traces).where(traces.c.id == bindparam("id"))

    # -- reads ------------------------------------------------------------------------------------
    @property
    @cache  # noqa: B019
    def get_trace(self) -> Select[Any]:
        return select(*_trace_columns(self.rules)).where(Trace.id == bindparam("id"))

    @cache  # noqa: B019
    def session_traces(self, shape: Shape) -> Select[Any]:
        """Traces of one session, newest first: filtered and ordered on the junction's own created_at.

        The composite index (session_uid, created_at, trace_id) serves the filter and the whole sort
        key, so SQLite walks it backwards and stops after LIMIT entries: no sort, no temp b-tree.
        `created_at IS NOT NULL` is the index's own predicate (it is partial), stated so the planner
        may use it for every shape, with or without `since`.
        """
        link = aliased(TraceSession, name="ts")
        stmt = self._session_join(link).where(link.created_at.is_not(None))
        return _time_ordered(stmt, link.created_at, link.trace_id, shape)

    @cache  # noqa: B019
    def session_traces_migrating(self, shape: Shape) -> Select[Any]:
        """The same answer while the backfill is unfinished: filtered and ordered on traces.created_at.

        Links not yet backfilled have no copy of the time, so this is the legacy join (slow on big
        sessions, the reason the copy exists) and never the partial index. Used only between
        revision 0002 and head.
        """
        stmt = self._session_join(aliased(TraceSession, name="ts"))
        return _time_ordered(stmt, Trace.created_at, Trace.id, shape)

    @cache  # noqa: B019
    def session_page(self, *, since: bool, after: bool, migrating: bool = False) -> Select[Any]:
        """One page of a session, newest first: keyset pagination on the sort key (created_at, trace_id).

        `after`: only traces strictly after the cursor in that order, as one row-value comparison the
        planner turns into the start of the index range, so page 1000 reads what page 1 reads.
        `migrating`: the same on traces.created_at, for a database whose backfill is unfinished.
        """
        link = aliased(TraceSession, name="ts")
        stmt = self._session_join(link)
        time, tie = _sort_key(link, migrating=migrating)
        if not migrating:
            stmt = stmt.where(link.created_at.is_not(None))
        if after:
            stmt = stmt.where(tuple_(time, tie) < tuple_(bindparam("after_created_at"), bindparam("after_trace_id")))
        return _time_ordered(stmt, time, tie, Shape(since=since, limit=True))

    @cache  # noqa: B019
    def session_after(self, *, keys_only: bool, until: bool, migrating: bool = False) -> Select[Any]:
        """Traces of one session strictly after a key, oldest first: the forward keyset read of a live tail.

        `(created_at, trace_id) > (:after_created_at, :after_trace_id)` is the start of an ascending
        range of the composite index, read up to :limit entries, so a poll costs the rows it returns
        and an idle poll one index probe. `until`: also strictly before (:until_created_at,
        :until_trace_id). `keys_only`: (created_at, trace_id) alone, answered from the index without
        reading a trace (the tail's re-read of its lookback window, tracestore.tail).
        `migrating`: the same on traces.created_at, for a database whose backfill is unfinished.
        """
        link = aliased(TraceSession, name="ts")
        time, tie = _sort_key(link, migrating=migrating)
        if keys_only:
            stmt = select(time, tie).select_from(link).where(link.session_uid == bindparam("session_uid"))
            if migrating:
                stmt = stmt.join(Trace, Trace.id == link.trace_id)
        else:
            stmt = self._session_join(link)
        if not migrating:
            stmt = stmt.where(link.created_at.is_not(None))
        stmt = stmt.where(tuple_(time, tie) > tuple_(bindparam("after_created_at"), bindparam("after_trace_id")))
        if until:
            stmt = stmt.where(tuple_(time, tie) < tuple_(bindparam("until_created_at"), bindparam("until_trace_id")))
        return stmt.order_by(time.asc(), tie.asc()).limit(bindparam("limit"))

    @property
    @cache  # noqa: B019
    def traces_by_id(self) -> Select[Any]:
        """The traces whose ids are in :ids (one list parameter, `list_argument`), oldest first."""
        each, trace_id = self.rules.listed("ids")
        listed = select(trace_id).select_from(each)
        return select(*_trace_columns(self.rules)).where(Trace.id.in_(listed)).order_by(Trace.created_at, Trace.id)

    @cache  # noqa: B019
    def sessions_traces(self, *, since: bool, limit: bool, migrating: bool = False) -> Select[Any]:
        """Traces of any of the sessions in :session_uids (one list parameter, `list_argument`), newest first,
        each trace once.

        Each listed session is one range of the composite index, stopped after `limit` entries
        (`_session_keys`); GROUP BY keeps each (created_at, trace_id) once, and only those
        candidate keys (at most sessions x limit) are sorted and cut to `limit` before any trace row
        is read. Never a sort of every row of every session. Without a limit each session's range
        is read whole, and the union sorted.
        `migrating`: the legacy join on traces.created_at, for a database whose backfill is unfinished.
        """
        if migrating:
            each, uid = self.rules.listed("session_uids")
            link = aliased(TraceSession, name="ts")
            in_sessions = select(link.trace_id).where(link.session_uid.in_(select(uid).select_from(each)))
            stmt = select(*_trace_columns(self.rules)).where(Trace.id.in_(in_sessions))
            return _time_ordered(stmt, Trace.created_at, Trace.id, Shape(since=since, limit=limit))
        candidates = self.rules.session_keys(since=since, limit=limit)
        time, tie = candidates.selected_columns
        keys = candidates.group_by(time, tie)
        if limit:
            # Cut to `limit` on the keys alone, before the join: a sort with LIMIT computes every
            # output column of every candidate first, so joining first would read the payload and
            # the session list of sessions x limit traces to return limit of them.
            keys = keys.order_by(time.desc(), tie.desc()).limit(bindparam("limit"))
        cut = keys.subquery("k")
        return (
            select(*_trace_columns(self.rules))
            .select_from(cut)
            .join(Trace, Trace.id == cut.c.trace_id)
            .order_by(cut.c.created_at.desc(), cut.c.trace_id.desc())
        )

    @cache  # noqa: B019
    def traces_after(self, *, until: bool) -> Select[Any]:
        """Traces strictly after a key (:after_created_at, :after_trace_id), oldest first (ties: id ascending), at
        most :limit: the keyset read of an export over every session, a page at a time.

        idx_traces_created_at serves the range and the order on created_at. It holds no id, so the traces that
        share one created_at are put in id order by a sort of that tie group alone (SQLite's "TEMP B-TREE FOR
        RIGHT PART OF ORDER BY", PostgreSQL's Incremental Sort), never of the range. `until`: created_at < :until.
        """
        key = tuple_(Trace.created_at, Trace.id)
        stmt = select(*_trace_columns(self.rules)).where(
            key > tuple_(bindparam("after_created_at"), bindparam("after_trace_id"))
        )
        if until:
            stmt = stmt.where(Trace.created_at < bindparam("until"))
        return stmt.order_by(Trace.created_at.asc(), Trace.id.asc()).limit(bindparam("limit"))

    @cache  # noqa: B019
    def count_traces(self, *, session: bool, since: bool, until: bool) -> Select[Any]:
        """How many traces (of :session_uid with `session`) have since <= created_at < until: a count of index
        entries (idx_traces_created_at, or the session's range of the composite index), no trace row read."""
        if session:
            time: Any = links.c.created_at
            stmt = select(func.count()).select_from(links).where(links.c.session_uid == bindparam("session_uid"))
            stmt = stmt.where(time.is_not(None))
        else:
            time = traces.c.created_at
            stmt = select(func.count()).select_from(traces)
        if since:
            stmt = stmt.where(time >= bindparam("since"))
        if until:
            stmt = stmt.where(time < bindparam("until"))
        return stmt

    def list_argument(self, values: Iterable[str]) -> Any:
        """The value of a list parameter (:session_uids, :ids): one parameter, whatever the number of values."""
        return self.rules.list_argument(values)

    def _session_join(self, link: Any) -> Select[Any]:
        return (
            select(*_trace_columns(self.rules))
            .select_from(link)
            .join(Trace, Trace.id == link.trace_id)
            .where(link.session_uid == bindparam("session_uid"))
        )

    @cache  # noqa: B019
    def all_traces(self, shape: Shape) -> Select[Any]:
        """Traces across sessions, newest first (not the hot path: uses the legacy traces indexes)."""
        return _time_ordered(select(*_trace_columns(self.rules)), Trace.created_at, Trace.id, shape)


def _sort_key(link: Any, *, migrating: bool) -> tuple[Any, Any]:
    """A session's sort key (time, tie): the junction's copy, or traces' own while the backfill is unfinished."""
    if migrating:
        return Trace.created_at, Trace.id
    return link.created_at, link.trace_id


@dataclass(frozen=True, slots=True)
class Shape:
    """Which filters a read has (not their values): statements are built and cached per shape."""

    since: bool = False
    until: bool = False
    limit: bool = False
    namespace: bool = False
    context_type: bool = False

    @classmethod
    def of(cls, query: Query) -> Shape:
        return cls(
            since=query.since is not None,
            until=query.until is not None,
            limit=query.limit is not None,
            namespace=query.namespace is not None,
            context_type=query.context_type is not None,
        )


def _time_ordered(stmt: Select[Any], time: Any, tie: Any, shape: Shape) -> Select[Any]:
    """Newest first on `time` (ties: `tie` descending), bounded by since (inclusive) and until (exclusive)."""
    stmt = stmt.order_by(time.desc(), tie.desc())
    if shape.since:
        stmt = stmt.where(time >= bindparam("since"))
    if shape.until:
        stmt = stmt.where(time < bindparam("until"))
    if shape.namespace:
        stmt = stmt.where(Trace.namespace == bindparam("namespace"))
    if shape.context_type:
        stmt = stmt.where(Trace.context_type == bindparam("context_type"))
    if shape.limit:
        stmt = stmt.limit(bindparam("limit"))
    return stmt


@cache
def statements_for(dialect_name: str) -> Statements:
    rules_for(dialect_name)  # fail early on an unsupported dialect
    return Statements(dialect_name)


def query_statement(
    statements: Statements, query: Query, *, migrating: bool = False
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement and parameters of a (validated) query.

    `migrating`: the database is between revision 0002 and head (backfill unfinished).
    """
    shape = Shape.of(query)
    if query.session_uid is None:
        return statements.all_traces(shape), query.params()
    if migrating:
        return statements.session_traces_migrating(shape), query.params()
    return statements.session_traces(shape), query.params()


@dataclass(frozen=True)
class DriverSQL:
    """A statement compiled for one dialect: the SQL text and how to turn named values into driver arguments."""

    sql: str
    names: tuple[str, ...] | None  # parameter order for positional paramstyles; None for named ones
    defaults: Mapping[str, Any]  # values the statement carries itself (e.g. SQLite's literal OFFSET 0)

    def args(self, params: Mapping[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        values = {**self.defaults, **params} if self.defaults else params
        if self.names is None:
            return dict(values)
        return tuple([values[name] for name in self.names])

    def args_many(self, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[Any]:
        """Driver arguments for executemany from rows of values in `columns` order: the rows themselves
        when that is the driver's order (SQLite), no per-row dict and tuple rebuilt on the write path."""
        if self.names == columns and not self.defaults:
            return rows
        return [self.args(dict(zip(columns, row, strict=True))) for row in rows]

    def args_arrays(self, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[Any]:
        """Driver arguments for a statement taking one array per column (Statements.write_arrays): one set
        per chunk of rows, so that no statement carries more than ARRAY_CHUNK_CHARS characters of text
        (PostgreSQL refuses a value or a message over 1 GB; a batch of huge payloads becomes several
        statements in the same transaction)."""
        chunks: list[Any] = []
        start, size = 0, 0
        for end, row in enumerate(rows):
            row_size = sum(len(value) for value in row if isinstance(value, str))
            if size + row_size > ARRAY_CHUNK_CHARS and end > start:
                chunks.append(self._arrays(columns, rows[start:end]))
                start, size = end, 0
            size += row_size
        chunks.append(self._arrays(columns, rows[start:]))
        return chunks

    def _arrays(self, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> tuple[Any, ...] | dict[str, Any]:
        return self.args({name: list(values) for name, values in zip(columns, zip(*rows, strict=True), strict=True)})


# Text per array statement: a UTF-8 character is at most 4 bytes and the driver may escape some (a
# text-format array quotes every element), so this keeps a statement far below PostgreSQL's 1 GB.
ARRAY_CHUNK_CHARS = 32 * 1024 * 1024


@lru_cache(maxsize=512)
def compiled(stmt: ClauseElement, dialect: Dialect) -> DriverSQL:
    """Compile a (cached, interned) statement once for a dialect."""
    result = cast(SQLCompiler, stmt.compile(dialect=dialect))
    defaults = {name: bind.effective_value for name, bind in result.binds.items() if not bind.required}
    names = tuple(result.positiontup) if result.positiontup is not None else None
    sql = str(result)
    if dialect.driver == "psycopg":
        # psycopg sends a list bound with %s as a text array literal, which the server parses element by
        # element; bound with %b it goes binary, much cheaper for a batch. asyncpg always sends binary.
        for name, bind in result.binds.items():
            if isinstance(bind.type, postgresql.ARRAY):
                sql = sql.replace(f"%({name})s", f"%({name})b")
    return DriverSQL(sql, names, defaults)


def explain_statement(stmt: Any, params: dict[str, Any], dialect: Any) -> tuple[str, tuple[Any, ...] | dict[str, Any]]:
    """The planner's view of `stmt` (EXPLAIN QUERY PLAN on SQLite, EXPLAIN elsewhere) and driver arguments."""
    query = compiled(stmt, dialect)
    return rules_for(dialect.name).explain_prefix + query.sql, query.args(params)
