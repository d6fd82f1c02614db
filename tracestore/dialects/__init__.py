"""What differs between the database engines tracestore runs on, one module per engine (`sqlite.py`,
`postgresql.py`), the way Alembic keeps its `ddl/` implementations: the rest of tracestore asks
`rules_for(dialect_name)` for a piece of SQL or a capability instead of comparing dialect names."""

from __future__ import annotations

from functools import cache

from tracestore.dialects.base import EngineRules


@cache
def rules_for(dialect_name: str) -> EngineRules:
    """The rules of a dialect by its SQLAlchemy name; NotImplementedError for an engine tracestore does not support."""
    if dialect_name == "sqlite":
        from tracestore.dialects.sqlite import SQLiteRules

        return SQLiteRules()
    if dialect_name == "postgresql":
        from tracestore.dialects.postgresql import PostgreSQLRules

        return PostgreSQLRules()
    raise NotImplementedError(f"tracestore does not support the {dialect_name!r} dialect")


__all__ = ["EngineRules", "rules_for"]
