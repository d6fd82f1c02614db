"""What the tables, indexes and relationships are: the SQLAlchemy 2.x declarative models of the trace schema,
with JSON-valued attributes stored as TEXT and the defaults and checks an application's own Session relies on."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import orjson
from sqlalchemy import REAL, Connection, Double, ForeignKey, Index, MetaData, Text, event, select, text
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.default import DefaultExecutionContext
from sqlalchemy.exc import DontWrapMixin
from sqlalchemy.orm import DeclarativeBase, Mapped, Mapper, mapped_column, relationship, validates
from sqlalchemy.types import TypeDecorator, TypeEngine

from tracestore.errors import InvalidTraceError, StorageError
from tracestore.types import (
    JSONValue,
    TraceContext,
    check_identifier,
    check_timestamp,
    encode_json,
    new_trace_id,
    refuse_nul_text,
)

# Names for constraints the legacy schema left anonymous, so Alembic can address them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Epoch seconds: REAL (8-byte IEEE) in SQLite, as the legacy schema declares it; DOUBLE elsewhere
# (PostgreSQL's REAL is a 4-byte float and would lose sub-second precision).
EpochSeconds: TypeEngine[float] = Double().with_variant(REAL(), "sqlite")

# The one index the hot query needs. It carries the whole sort key (created_at, trace_id): without
# trace_id the tie-break brings back "USE TEMP B-TREE FOR RIGHT PART OF ORDER BY", and with it the
# junction side of the join is a covering index scan. SQLite walks it backwards for "newest first".
# - Partial (WHERE created_at IS NOT NULL), so the migration can build it online without one CREATE INDEX
#   holding the write lock for a full sort: PostgreSQL creates it empty and the backfill fills it, SQLite
#   builds it beside the table and attaches it whole (migrate.index_build). Queries say
#   `created_at IS NOT NULL` to use it; a link whose trace is missing (the only way a copy stays
#   NULL, see migrate.schema.COPY_TRIGGERS) is never an answer anyway.
# - Ascending, not the original design's DESC: links arrive oldest first (the backfill walks rowids,
#   new traces are the newest), so each session's entries are appended at the end of its key range,
#   and SQLite's page splits leave the pages behind full; with DESC every insert lands at the front of
#   the range and the pages left behind stay partly empty. Backwards and forwards scans read the same
#   pages. (docs/design.md and docs/performance.md have the figures.)
SESSION_TIME_INDEX = "idx_trace_sessions_uid_time"
SESSION_TIME_INDEX_WHERE = "created_at IS NOT NULL"
# (column, descending) in index order; the migration and the schema check use the same definition.
SESSION_TIME_INDEX_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("session_uid", False),
    ("created_at", False),
    ("trace_id", False),
)


class InvalidValueError(InvalidTraceError, DontWrapMixin):
    """An InvalidTraceError found while SQLAlchemy runs a statement (a flush, a Core insert); DontWrapMixin
    keeps SQLAlchemy from turning it into a StatementError, so callers catch InvalidTraceError as elsewhere."""


class JSONText(TypeDecorator[Any]):
    """A JSON value (dict, list, str, number, bool, None) stored as its compact text in a TEXT column.

    The column stays the legacy TEXT (no schema change, `alembic check` clean), and a value is refused as
    TraceContext's are when stored (NaN/inf, tuples, datetimes...: tracestore.types.encode_json), with an
    InvalidTraceError naming `field`. The store's own statements never pass through this type: they bind
    the JSON text they encode themselves and go to the driver as compiled SQL (tracestore.queries.compiled),
    so no path encodes twice.
    """

    impl = Text
    cache_ok = True

    def __init__(self, field: str = "JSON value") -> None:
        super().__init__()
        self.field = field

    def process_bind_param(self, value: JSONValue, dialect: Dialect) -> str:
        try:
            return encode_json(value, self.field)
        except InvalidTraceError as exc:
            raise InvalidValueError(str(exc)) from exc.__cause__

    def process_result_value(self, value: str | None, dialect: Dialect) -> JSONValue:
        return _decode(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        # One call per value instead of TypeDecorator's two: this runs for every row an entity read loads.
        return _decode


class JSONObjectText(JSONText):
    """A JSON object stored as TEXT (a trace's metadata); NULL, which legacy rows may hold, reads as {}."""

    cache_ok = True

    def process_result_value(self, value: str | None, dialect: Dialect) -> JSONValue:
        return _decode_object(value)

    def result_processor(self, dialect: Dialect, coltype: object) -> Callable[[Any], Any]:
        return _decode_object


def _decode(value: str | None) -> JSONValue:
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise StorageError(f"a trace holds invalid JSON: {exc}") from exc


def _decode_object(value: str | None) -> JSONValue:
    return {} if value is None else _decode(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# -- column defaults for inserts that do not set the column (the ORM's, and Core's insert(Trace)) -------------
def _row(context: DefaultExecutionContext) -> dict[str, Any]:
    """The values of the row being inserted, defaults computed so far included."""
    return context.get_current_parameters()  # type: ignore[no-untyped-call,no-any-return]


def _now(context: DefaultExecutionContext) -> float:
    return time.time()


def _same_created_at(context: DefaultExecutionContext) -> float:
    created_at: float = _row(context)["created_at"]
    return created_at


def _new_id(context: DefaultExecutionContext) -> str:
    # Defaults run in column order, id first: created_at is only there when the insert gives it.
    created_at = _row(context).get("created_at")
    return new_trace_id(created_at if isinstance(created_at, float | int) else None)


def _empty_object(context: DefaultExecutionContext) -> dict[str, Any]:
    return {}


class Trace(Base):
    """A stored trace; columns exactly as the legacy `traces` table, `data` and `metadata_` JSON values.

    Made as TraceContext makes one: `Trace(context_type=..., namespace=..., data=...)` gets a time-ordered
    id, created_at = now, updated_at = created_at and metadata_ {} unless given, and its fields are checked
    when set (InvalidTraceError); data and metadata_ are checked as JSON when stored.
    """

    __tablename__ = "traces"
    # The legacy idx_traces_type and idx_traces_namespace are gone since revision 0005: nothing read them.
    __table_args__ = (Index("idx_traces_created_at", "created_at"),)

    # The legacy DDL says `id TEXT PRIMARY KEY` without NOT NULL, which SQLite takes literally. Adding
    # NOT NULL means rebuilding the biggest table; the store never writes a NULL id, so the model
    # states the column as it is and `alembic check` stays meaningful on adopted databases.
    id: Mapped[str] = mapped_column(Text, primary_key=True, nullable=True, default=_new_id)
    context_type: Mapped[str] = mapped_column(Text)
    namespace: Mapped[str] = mapped_column(Text)
    data: Mapped[JSONValue] = mapped_column(JSONText("data"), nullable=False)
    # `metadata` is Declarative's own attribute, hence the trailing underscore.
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONObjectText("metadata"), nullable=True, default=_empty_object, server_default=text("'{}'")
    )
    created_at: Mapped[float] = mapped_column(EpochSeconds, default=_now)
    updated_at: Mapped[float] = mapped_column(EpochSeconds, default=_same_created_at)

    # Deleting a trace through the ORM deletes its links itself (not passive): an application's SQLite
    # connections may run with foreign keys off, where ON DELETE CASCADE does nothing.
    sessions: Mapped[list[TraceSession]] = relationship(
        back_populates="trace", cascade="all, delete-orphan", order_by="TraceSession.session_uid"
    )

    def __init__(self, **fields: Any) -> None:
        created_at = fields.get("created_at")
        created_at = time.time() if created_at is None else check_timestamp("created_at", created_at)
        fields["created_at"] = created_at
        if fields.get("id") is None:
            fields["id"] = new_trace_id(created_at)
        if fields.get("updated_at") is None:
            fields["updated_at"] = created_at
        if fields.get("metadata_") is None:
            fields["metadata_"] = {}
        super().__init__(**fields)

    @validates("id", "context_type", "namespace")
    def _check_identifier(self, name: str, value: object) -> str:
        return check_identifier(name, value)

    @validates("created_at", "updated_at")
    def _check_time(self, name: str, value: object) -> float:
        return check_timestamp(name, value)

    @validates("metadata_")
    def _check_metadata(self, name: str, value: object) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InvalidTraceError(f"metadata must be a dict, got {type(value).__name__}")
        return value

    @classmethod
    def from_context(cls, trace: TraceContext) -> Trace:
        """A new entity with the fields and session links of `trace` (add it to a Session to insert it;
        tracestore.orm.add_traces stores TraceContexts with the store's insert-or-update instead)."""
        trace.validate()
        entity = cls(
            id=trace.id,
            context_type=trace.context_type,
            namespace=trace.namespace,
            data=trace.data,
            metadata_=trace.metadata,
            created_at=trace.created_at,
            updated_at=trace.updated_at,
        )
        entity.sessions = [TraceSession(session_uid=uid, created_at=trace.created_at) for uid in trace.session_uids]
        return entity

    def to_context(self) -> TraceContext:
        """The TraceContext of this entity, its session ids included (loads `sessions` if it is not loaded:
        with an AsyncSession, select it with `.options(selectinload(Trace.sessions))`)."""
        return TraceContext(
            context_type=self.context_type,
            namespace=self.namespace,
            data=self.data,
            metadata=self.metadata_,
            session_uids=[link.session_uid for link in self.sessions],
            created_at=self.created_at,
            updated_at=self.updated_at,
            id=self.id,
        )

    def __repr__(self) -> str:
        return f"Trace(id={self.id!r}, context_type={self.context_type!r}, namespace={self.namespace!r})"


def _trace_created_at(context: DefaultExecutionContext) -> float | None:
    """The created_at of the link's trace, read on the inserting connection; None while there is no such trace
    (a link written before its trace stays NULL, as the store's writers leave it: see migrate.schema)."""
    trace_id = _row(context).get("trace_id")
    created_at: float | None = context.connection.execute(select(Trace.created_at).where(Trace.id == trace_id)).scalar()
    return created_at


class TraceSession(Base):
    """Links a trace to a session; `created_at` is the trace's, copied here so one index serves the query.

    A link inserted without created_at (through the ORM, or Core's insert(TraceSession)) gets its trace's:
    taken from the `trace` it is attached to, else read from the database in the same transaction.
    """

    __tablename__ = "trace_sessions"
    __table_args__ = (
        Index(
            SESSION_TIME_INDEX,
            *(text(f"{name} DESC") if desc else name for name, desc in SESSION_TIME_INDEX_COLUMNS),
            sqlite_where=text(SESSION_TIME_INDEX_WHERE),
            postgresql_where=text(SESSION_TIME_INDEX_WHERE),
        ),
    )

    trace_id: Mapped[str] = mapped_column(Text, ForeignKey("traces.id", ondelete="CASCADE"), primary_key=True)
    session_uid: Mapped[str] = mapped_column(Text, primary_key=True)
    # Nullable on purpose: SQLite cannot add NOT NULL to an existing column without rebuilding the
    # table (hours at 100 GB, and a cascade hazard), and writers of the previous release insert
    # links without it during a rolling deploy. The store always fills it; the migration backfills it.
    # A NULL copy hides the link from the session index, hence the default.
    created_at: Mapped[float | None] = mapped_column(EpochSeconds, default=_trace_created_at)

    trace: Mapped[Trace] = relationship(back_populates="sessions")

    @validates("session_uid")
    def _check_session_uid(self, name: str, value: object) -> str:
        return check_identifier("session uid", value)

    @validates("created_at")
    def _check_time(self, name: str, value: object) -> float | None:
        return None if value is None else check_timestamp(name, value)

    def __repr__(self) -> str:
        return f"TraceSession(trace_id={self.trace_id!r}, session_uid={self.session_uid!r})"


# -- checks and stamps at flush time ------------------------------------------------------------------------------
@event.listens_for(TraceSession, "before_insert")
def _stamp_from_trace(mapper: Mapper[TraceSession], connection: Connection, link: TraceSession) -> None:
    """A link attached to a loaded Trace takes its created_at without a query (the column default reads it
    otherwise); the trace was inserted first in the same flush, parents before children."""
    trace = link.__dict__.get("trace")
    if link.created_at is None and trace is not None and "created_at" in trace.__dict__:
        link.created_at = trace.created_at


@event.listens_for(Trace, "before_insert")
@event.listens_for(Trace, "before_update")
def _refuse_nul_in_trace(mapper: Mapper[Trace], connection: Connection, trace: Trace) -> None:
    if not _text_holds_nul(connection):
        for name in ("id", "context_type", "namespace"):
            value = trace.__dict__.get(name)
            if isinstance(value, str):
                _refuse_nul(value, name, trace.__dict__.get("id"))


@event.listens_for(TraceSession, "before_insert")
@event.listens_for(TraceSession, "before_update")
def _refuse_nul_in_link(mapper: Mapper[TraceSession], connection: Connection, link: TraceSession) -> None:
    uid = link.__dict__.get("session_uid")
    if isinstance(uid, str) and not _text_holds_nul(connection):
        _refuse_nul(uid, "session uid", link.__dict__.get("trace_id"))


def _refuse_nul(value: str, field: str, trace_id: str | None) -> None:
    try:
        refuse_nul_text(value, field, trace_id)
    except InvalidTraceError as exc:
        raise InvalidValueError(str(exc)) from None


def _text_holds_nul(connection: Connection) -> bool:
    from tracestore.dialects import rules_for  # the dialects build on these models

    return rules_for(connection.dialect.name).text_holds_nul
