"""What SQL the product runs: builds every trace statement (never executes one).

Statements are built once per shape and cached, with bind parameters for every value, so a call
on the hot path pays neither statement construction nor (thanks to SQLAlchemy's compiled cache)
compilation. The only dialect-specific pieces are `_insert` (upsert syntax) and
`_session_list` (the per-trace aggregate of session ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import ColumnElement, Delete, Select, Table, Update, bindparam, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlalchemy.sql.dml import Insert

from tracestore.models import Trace, TraceSession

traces = cast(Table, Trace.__table__)
links = cast(Table, TraceSession.__table__)


def _insert(dialect_name: str) -> Any:
    if dialect_name == "sqlite":
        return sqlite.insert
    if dialect_name == "postgresql":
        return postgresql.insert
    raise NotImplementedError(f"tracestore does not support the {dialect_name!r} dialect")


def _session_list(dialect_name: str) -> ColumnElement[Any]:
    """A JSON array of the trace's session ids, read from the junction primary key (one seek per trace)."""
    other = aliased(TraceSession, name="s")
    aggregate = func.json_group_array if dialect_name == "sqlite" else func.json_agg
    return (
        select(aggregate(other.session_uid))
        .where(other.trace_id == Trace.id)
        .scalar_subquery()
        .label("session_uids")
    )


# Column order of every trace-returning statement; the stores decode rows positionally.
def _trace_columns(dialect_name: str) -> tuple[Any, ...]:
    return (
        Trace.id,
        Trace.context_type,
        Trace.namespace,
        Trace.data,
        Trace.metadata_,
        Trace.created_at,
        Trace.updated_at,
        _session_list(dialect_name),
    )


@dataclass(frozen=True)
class Statements:
    """All statements of one dialect. Get one with `statements_for(dialect_name)`."""

    dialect_name: str

    # -- writes -----------------------------------------------------------------------------------
    @property
    @cache  # noqa: B019 - instances are interned by statements_for(), so the cache is bounded
    def upsert_trace(self) -> Insert:
        """Insert a trace or update it in place. Never INSERT OR REPLACE: that deletes the row and cascades."""
        stmt = _insert(self.dialect_name)(traces).values(
            id=bindparam("id"),
            context_type=bindparam("context_type"),
            namespace=bindparam("namespace"),
            data=bindparam("data"),
            metadata=bindparam("metadata"),
            created_at=bindparam("created_at"),
            updated_at=bindparam("updated_at"),
        )
        columns = ("context_type", "namespace", "data", "metadata", "created_at", "updated_at")
        return stmt.on_conflict_do_update(  # type: ignore[no-any-return]
            index_elements=[traces.c.id], set_={name: stmt.excluded[name] for name in columns}
        )

    @property
    @cache  # noqa: B019
    def move_links(self) -> Update:
        """Re-stamp a re-stored trace's existing links with its (possibly new) created_at."""
        return (
            update(links)
            .where(links.c.trace_id == bindparam("link_trace_id"))
            .where(links.c.created_at.is_distinct_from(bindparam("link_created_at")))
            .values(created_at=bindparam("link_created_at"))
        )

    @property
    @cache  # noqa: B019
    def insert_link(self) -> Insert:
        """Add a trace-session link; an existing one is kept (move_links already fixed its time)."""
        stmt = _insert(self.dialect_name)(links).values(
            trace_id=bindparam("trace_id"),
            session_uid=bindparam("session_uid"),
            created_at=bindparam("created_at"),
        )
        return stmt.on_conflict_do_nothing(index_elements=[links.c.trace_id, links.c.session_uid])  # type: ignore[no-any-return]

    @property
    @cache  # noqa: B019
    def delete_trace(self) -> Delete:
        """Delete one trace; ON DELETE CASCADE (foreign_keys=ON) removes its links in the same statement."""
        return delete(traces).where(traces.c.id == bindparam("id"))

    # -- reads ------------------------------------------------------------------------------------
    @property
    @cache  # noqa: B019
    def get_trace(self) -> Select[Any]:
        return select(*_trace_columns(self.dialect_name)).where(Trace.id == bindparam("id"))

    @cache  # noqa: B019
    def session_traces(
        self, *, since: bool, until: bool, limit: bool, namespace: bool, context_type: bool
    ) -> Select[Any]:
        """Traces of one session, newest first: filtered and ordered on the junction's own created_at.

        The composite index (session_uid, created_at DESC, trace_id DESC) serves the filter and the
        whole sort key, so SQLite walks it in order and stops after LIMIT entries: no sort, no temp b-tree.
        """
        link = aliased(TraceSession, name="ts")
        stmt = (
            select(*_trace_columns(self.dialect_name))
            .select_from(link)
            .join(Trace, Trace.id == link.trace_id)
            .where(link.session_uid == bindparam("session_uid"))
            .order_by(link.created_at.desc(), link.trace_id.desc())
        )
        if since:
            stmt = stmt.where(link.created_at >= bindparam("since"))
        if until:
            stmt = stmt.where(link.created_at < bindparam("until"))
        return _filtered(stmt, limit=limit, namespace=namespace, context_type=context_type)

    @cache  # noqa: B019
    def all_traces(
        self, *, since: bool, until: bool, limit: bool, namespace: bool, context_type: bool
    ) -> Select[Any]:
        """Traces across sessions, newest first (not the hot path: uses the legacy traces indexes)."""
        stmt = select(*_trace_columns(self.dialect_name)).order_by(Trace.created_at.desc(), Trace.id.desc())
        if since:
            stmt = stmt.where(Trace.created_at >= bindparam("since"))
        if until:
            stmt = stmt.where(Trace.created_at < bindparam("until"))
        return _filtered(stmt, limit=limit, namespace=namespace, context_type=context_type)


def _filtered(stmt: Select[Any], *, limit: bool, namespace: bool, context_type: bool) -> Select[Any]:
    if namespace:
        stmt = stmt.where(Trace.namespace == bindparam("namespace"))
    if context_type:
        stmt = stmt.where(Trace.context_type == bindparam("context_type"))
    if limit:
        stmt = stmt.limit(bindparam("limit"))
    return stmt


@cache
def statements_for(dialect_name: str) -> Statements:
    _insert(dialect_name)  # fail early on an unsupported dialect
    return Statements(dialect_name)


def query_statement(
    statements: Statements,
    *,
    session_uid: str | None,
    namespace: str | None,
    context_type: str | None,
    since: float | None,
    until: float | None,
    limit: int | None,
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement and parameters for a query; arguments are already validated by the caller."""
    flags = {
        "since": since is not None,
        "until": until is not None,
        "limit": limit is not None,
        "namespace": namespace is not None,
        "context_type": context_type is not None,
    }
    values = {"since": since, "until": until, "limit": limit, "namespace": namespace, "context_type": context_type}
    params = {name: value for name, value in values.items() if value is not None}
    if session_uid is None:
        return statements.all_traces(**flags), params
    params["session_uid"] = session_uid
    return statements.session_traces(**flags), params


def explain_statement(
    stmt: Any, params: dict[str, Any], dialect: Any
) -> tuple[str, tuple[Any, ...] | dict[str, Any]]:
    """The planner's view of `stmt` (EXPLAIN QUERY PLAN on SQLite, EXPLAIN elsewhere) and driver parameters."""
    compiled = stmt.compile(dialect=dialect)
    prefix = "EXPLAIN QUERY PLAN " if dialect.name == "sqlite" else "EXPLAIN "
    values = compiled.construct_params(params)
    if compiled.positiontup is not None:
        return prefix + str(compiled), tuple(values[name] for name in compiled.positiontup)
    return prefix + str(compiled), values
