"""The interface every engine's rules implement, and the statement pieces the engines share."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, Connection, Integer, Select, Table, TextClause, bindparam, column, table
from sqlalchemy.sql.selectable import FromClause

from tracestore.models import TraceSession

_Keys = TypeVar("_Keys", bound=Select[*tuple[Any, ...]])

# The triggers that keep trace_sessions.created_at equal to its trace's at every moment after revision
# 0002, whoever writes (see tracestore.migrate.schema); each engine writes them its own way.
FOLLOW_TRIGGER = "trace_sessions_follow_created_at"
STAMP_LINK_TRIGGER = "trace_sessions_stamp_created_at"
STAMP_TRACE_TRIGGER = "traces_stamp_links_created_at"

# trace_sessions with the rowid SQLite reads a link by (the mapped table does not declare it).
links_with_rowid = table(
    "trace_sessions",
    column("rowid", Integer),
    *(column(c.name, c.type) for c in TraceSession.__table__.c),
)


def dated(stmt: _Keys, time: Any, *, since: bool) -> _Keys:
    """Links with a time (the partial index's own predicate, so the planner may use it), from :since on."""
    stmt = stmt.where(time.is_not(None))
    return stmt.where(time >= bindparam("since")) if since else stmt


def newest_first(stmt: _Keys, time: Any, tie: Any, *, limit: bool) -> _Keys:
    stmt = stmt.order_by(time.desc(), tie.desc())
    return stmt.limit(bindparam("limit")) if limit else stmt


class EngineRules:
    """What one engine does its own way. Subclasses: tracestore.dialects.sqlite and .postgresql."""

    name: str
    # Whether the write statements take one array per column, each run once per batch, instead of one
    # row of values each, run with executemany (see Statements.write_arrays).
    write_arrays: bool
    # Whether text can hold NUL (SQLite's can; PostgreSQL's cannot, so such values are refused up front).
    text_holds_nul: bool
    # The prefix that makes a statement show its plan.
    explain_prefix: str
    # Whether writers share one database-wide write lock (SQLite): a write transaction takes it up front
    # (begin_write) and a migration leaves it free between its steps; else row and table locks (PostgreSQL).
    one_write_lock: bool
    begin_write: str
    # The isolation level of the store's write transactions on an Engine set to autocommit, where each
    # statement would otherwise be a transaction of its own.
    write_isolation_level: str
    # The names of the triggers present, one per row.
    trigger_names_sql: str

    def insert(self, target: Table) -> Any:
        """The dialect's INSERT construct (it has ON CONFLICT)."""
        raise NotImplementedError

    def insert_rows(self, target: Table, columns: tuple[str, ...]) -> Any:
        """An INSERT of one row of bind parameters named after `columns` (executemany runs it per row)."""
        return self.insert(target).values({name: bindparam(name) for name in columns})

    def session_list(self, session_uid: Any) -> ColumnElement[Any]:
        """An aggregate of `session_uid` as JSON array text."""
        raise NotImplementedError

    def listed(self, name: str) -> tuple[FromClause, ColumnElement[Any]]:
        """The values of the list parameter `name` (see list_argument): a FROM element `j` and its value column."""
        raise NotImplementedError

    def list_argument(self, values: Iterable[str]) -> Any:
        """The value bound to a list parameter."""
        raise NotImplementedError

    def session_keys(self, *, since: bool, limit: bool) -> Select[*tuple[Any, ...]]:
        """The keys (created_at, trace_id) of the links of each session in :session_uids since :since, each
        session one backward range of the composite index, stopped after :limit entries when there is a limit."""
        raise NotImplementedError

    def write_setup(self) -> tuple[TextClause, ...]:
        """Statements run first in every write transaction."""
        return ()

    def write_setup_undo(self) -> tuple[tuple[TextClause, ...], tuple[TextClause, ...]]:
        """(save, restore): statements that keep, before write_setup, what it changes for the transaction, and
        put it back after the writes; for a write inside a transaction of the caller's, which goes on after it."""
        return (), ()

    def row_key(self, target: Any) -> Any:
        """The cheapest key that finds a row of `target` again within a statement (retention's deletes)."""
        return target.c.id

    def create_triggers(self, names: tuple[str, ...]) -> tuple[TextClause, ...]:
        """CREATE (idempotent) the copy triggers named."""
        raise NotImplementedError

    def drop_triggers(self, names: tuple[str, ...]) -> tuple[TextClause, ...]:
        """DROP (if they exist) the copy triggers named."""
        raise NotImplementedError

    def foreign_keys_off(self, connection: Connection) -> AbstractContextManager[None]:
        """A block run with foreign key enforcement off where a connection can turn it off (SQLite)."""
        return nullcontext()

    def freed_pages_not_zeroed(self, connection: Connection) -> AbstractContextManager[None]:
        """A block whose dropped pages are not overwritten with zeros where that is a setting (SQLite)."""
        return nullcontext()

    def session_index_drift(self, connection: Connection) -> str | None:
        """Why idx_trace_sessions_uid_time differs from the model in a way Alembic's comparison cannot see,
        or None."""
        return None


def normalized(sql: str) -> str:
    """SQL text with whitespace collapsed and upper-cased, for comparing predicates."""
    return " ".join(sql.split()).upper()
