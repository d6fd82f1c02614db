"""What SQL retention runs: the statements of `prune`, built per dialect (never executed here).

Kept beside tracestore.queries (the trace reads and writes) and built the same way: bind parameters
for every value, interned per shape so `queries.compiled` compiles each once per dialect.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any, cast

from sqlalchemy import Select, Table, bindparam, delete, func, select
from sqlalchemy.sql.dml import ReturningDelete

from tracestore.dialects import rules_for
from tracestore.models import Trace
from tracestore.queries import statements_for

traces = cast(Table, Trace.__table__)


@dataclass(frozen=True)
class RetentionStatements:
    """The statements of one dialect. Get them with `retention_statements_for(dialect_name)`."""

    dialect_name: str

    def _row_key(self, table: Any) -> Any:
        return rules_for(self.dialect_name).row_key(table)

    @cache  # noqa: B019 - instances are interned by retention_statements_for(), so the cache is bounded
    def delete_batch(self, *, resume: bool) -> ReturningDelete[Any]:
        """Delete the oldest :batch_size traces with created_at < :cutoff, returning their created_at.

        Walks idx_traces_created_at from its oldest end: one index range read of at most :batch_size
        entries. The links go in the same statement through ON DELETE CASCADE (foreign keys are on
        in every store connection; retention checks that on SQLite before each batch).
        `resume`: start the range at :low (created_at >= :low), the newest created_at of the batch
        before. Everything older is already gone, but on PostgreSQL its index entries stay until
        VACUUM, and a range starting at the oldest end would step over all of them again each batch.
        """
        oldest = traces.alias("oldest")  # its own name, so the subquery is not correlated with the DELETE
        batch: Select[Any] = select(self._row_key(oldest)).where(oldest.c.created_at < bindparam("cutoff"))
        if resume:
            batch = batch.where(oldest.c.created_at >= bindparam("low"))
        batch = batch.order_by(oldest.c.created_at).limit(bindparam("batch_size"))
        key = self._row_key(traces)
        return delete(traces).where(key.in_(batch.scalar_subquery())).returning(traces.c.created_at)

    @property
    @cache  # noqa: B019
    def count_older(self) -> Select[Any]:
        """How many traces have created_at < :cutoff: the prune's total (a range count of the same index)."""
        return select(func.count()).select_from(traces).where(traces.c.created_at < bindparam("cutoff"))

    @property
    def write_setup(self) -> tuple[Any, ...]:
        """Run first in each batch's transaction: the write path's own setup (queries.Statements.write_setup).

        On PostgreSQL it keeps the plan of the cascade's per-trace DELETE of trace_sessions (cached per
        connection, like the copy triggers' plans) an index scan even on a table without statistics.
        """
        return statements_for(self.dialect_name).write_setup


@cache
def retention_statements_for(dialect_name: str) -> RetentionStatements:
    statements_for(dialect_name)  # fail early on an unsupported dialect
    return RetentionStatements(dialect_name)
