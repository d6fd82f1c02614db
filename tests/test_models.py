"""The declarative models: legacy-exact columns, the junction's key, foreign key and composite index, the
relationship, and the checks fields get when set (tests/test_orm.py has their behaviour on a database)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from sqlalchemy import REAL, inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateIndex

from tracestore import InvalidTraceError
from tracestore.models import SESSION_TIME_INDEX, Trace, TraceSession

T0 = 1_700_000_000.0


def test_trace_columns_are_the_legacy_ones() -> None:
    table = Trace.__table__
    assert [column.name for column in table.columns] == [
        "id",
        "context_type",
        "namespace",
        "data",
        "metadata",
        "created_at",
        "updated_at",
    ]
    assert Trace.metadata_.property.columns[0].name == "metadata"  # no clash with Declarative's metadata
    assert [column.name for column in table.primary_key] == ["id"]
    for name in ("context_type", "namespace", "data", "created_at", "updated_at"):
        assert not table.c[name].nullable, name
    for name in ("data", "metadata"):  # JSON values stored as the legacy TEXT
        for dialect in (sqlite.dialect(), postgresql.dialect()):
            assert table.c[name].type.compile(dialect=dialect) == "TEXT", name
    assert isinstance(table.c.created_at.type.dialect_impl(sqlite.dialect()), REAL)
    # The legacy idx_traces_type and idx_traces_namespace are dropped by revision 0005.
    assert {index.name for index in table.indexes} == {"idx_traces_created_at"}


def test_trace_session_key_foreign_key_and_index() -> None:
    table = TraceSession.__table__
    assert [column.name for column in table.primary_key] == ["trace_id", "session_uid"]
    (foreign_key,) = table.foreign_keys
    assert foreign_key.target_fullname == "traces.id" and foreign_key.ondelete == "CASCADE"
    assert table.c.created_at.nullable  # see the model's comment: NOT NULL would need a table rebuild
    (index,) = table.indexes
    assert index.name == SESSION_TIME_INDEX
    ddl = str(CreateIndex(index).compile(dialect=sqlite.dialect()))
    assert ddl == (
        f"CREATE INDEX {SESSION_TIME_INDEX} ON trace_sessions (session_uid, created_at, trace_id)"
        " WHERE created_at IS NOT NULL"
    )


def test_the_relationship_cascades_in_the_orm() -> None:
    sessions = inspect(Trace).relationships["sessions"]
    assert sessions.back_populates == "trace" and sessions.uselist
    assert sessions.cascade.delete and sessions.cascade.delete_orphan
    assert not sessions.passive_deletes  # foreign keys may be off on the application's SQLite connections
    assert inspect(TraceSession).relationships["trace"].back_populates == "sessions"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"context_type": ""}, "context_type must not be empty"),
        ({"namespace": 7}, "namespace must be a str"),
        ({"id": "\ud800"}, "not valid Unicode"),
        ({"created_at": T0 * 1000}, "milliseconds"),
        ({"updated_at": math.nan}, "updated_at must be finite"),
        ({"metadata_": ["not", "a", "dict"]}, "metadata must be a dict"),
    ],
)
def test_fields_are_checked_when_set(fields: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"context_type": "span", "namespace": "web", "data": {}, **fields}
    with pytest.raises(InvalidTraceError, match=message):
        Trace(**values)
    trace = Trace(context_type="span", namespace="web", data={})
    name, value = next(iter(fields.items()))
    with pytest.raises(InvalidTraceError, match=message):
        setattr(trace, name, value)


def test_link_fields_are_checked_when_set() -> None:
    with pytest.raises(InvalidTraceError, match="session uid must not be empty"):
        TraceSession(session_uid="")
    with pytest.raises(InvalidTraceError, match="past the year 9999"):
        TraceSession(session_uid="s", created_at=T0 * 1e6)
