"""The declarative models: legacy-exact columns, the junction's key, foreign key and composite index."""

from __future__ import annotations

from sqlalchemy import REAL, Text
from sqlalchemy.dialects import sqlite
from sqlalchemy.schema import CreateIndex

from tracestore.models import SESSION_TIME_INDEX, Trace, TraceSession


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
    assert isinstance(table.c.data.type, Text)
    assert isinstance(table.c.created_at.type.dialect_impl(sqlite.dialect()), REAL)
    legacy_indexes = {"idx_traces_created_at", "idx_traces_type", "idx_traces_namespace"}
    assert {index.name for index in table.indexes} == legacy_indexes


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
