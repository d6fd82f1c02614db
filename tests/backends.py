"""One test, both engines: a `Backend` is an empty database (a SQLite file or a PostgreSQL database)
plus the raw, store-free ways the tests look at it.

Behaviour tests take the `backend` fixture (tests/conftest.py parametrizes it over "sqlite" and
"postgresql"), open stores on `backend.url` / `backend.async_url`, and check answers with the oracles
here, which use plain SQL over the raw tables through their own engine, never tracestore's statements.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import URL, Connection, Engine, inspect, text

from tracestore import TraceContext
from tracestore.queries import explain_statement
from tracestore.testing.bulk import LEGACY_DDL, LEGACY_DDL_POSTGRESQL

NAMES = ("sqlite", "postgresql")

LegacyRow = tuple[str, str, str, object, dict[str, object], float, float, tuple[str, ...]]
"""(id, context_type, namespace, data, metadata, created_at, updated_at, session_uids)"""


class Backend:
    """An empty database on one engine; `url` for stores, `raw()` for the tests' own SQL."""

    def __init__(self, name: str, url: URL, path: Path | None = None) -> None:
        self.name = name
        self.sync_url = url
        self.path = path  # the SQLite file; None on PostgreSQL
        self._engine: Engine | None = None

    def __repr__(self) -> str:
        return f"Backend({self.name})"

    @property
    def url(self) -> str:
        return self.sync_url.render_as_string(hide_password=False)

    @property
    def async_url(self) -> str:
        driver = "sqlite+aiosqlite" if self.name == "sqlite" else "postgresql+asyncpg"
        return self.sync_url.set(drivername=driver).render_as_string(hide_password=False)

    @property
    def is_sqlite(self) -> bool:
        return self.name == "sqlite"

    # -- raw access -----------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The tests' own engine (plain SQLAlchemy: no tracestore pragmas or event hooks)."""
        if self._engine is None:
            # SQLite: no connection kept open between statements (tests look at the files). PostgreSQL:
            # a pool, since the oracles run hundreds of queries and each new connection costs ~5 ms.
            pool = {"poolclass": sqlalchemy.NullPool} if self.is_sqlite else {"pool_size": 2}
            self._engine = sqlalchemy.create_engine(self.sync_url, **pool)
        return self._engine

    @contextmanager
    def raw(self) -> Iterator[Connection]:
        """A connection in a transaction, committed on exit."""
        with self.engine.begin() as connection:
            yield connection

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.raw() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params or {})]

    def analyze(self) -> None:
        with self.raw() as connection:
            connection.exec_driver_sql("ANALYZE")

    def plan(self, stmt: Any, params: dict[str, Any]) -> list[str]:
        """The planner's lines for a tracestore statement: EXPLAIN QUERY PLAN details or EXPLAIN text."""
        with self.raw() as connection:
            sql, args = explain_statement(stmt, params, connection.dialect)
            return [str(row[-1]) for row in connection.exec_driver_sql(sql, args)]

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    # -- what is stored ----------------------------------------------------------------------------------
    def links(self, trace_id: str) -> list[tuple[str, float | None]]:
        return self.rows(
            "SELECT session_uid, created_at FROM trace_sessions WHERE trace_id = :id ORDER BY session_uid",
            {"id": trace_id},
        )

    def junction_drift(self) -> list[tuple[Any, ...]]:
        """Junction rows whose denormalized created_at differs from their trace's (must always be empty)."""
        return self.rows(
            "SELECT s.trace_id, s.session_uid, s.created_at, t.created_at FROM trace_sessions s "
            "JOIN traces t ON t.id = s.trace_id WHERE s.created_at IS DISTINCT FROM t.created_at"
        )

    def table_rows(self, table: str) -> list[tuple[Any, ...]]:
        with self.raw() as connection:
            quoted = connection.dialect.identifier_preparer.quote(table)
            return sorted((tuple(row) for row in connection.exec_driver_sql(f"SELECT * FROM {quoted}")), key=repr)

    def dump(self) -> dict[str, list[Any]]:
        """Every row of every table and the schema's definitions, sorted: equal dumps mean equal databases."""
        with self.raw() as connection:
            tables = sorted(name for name in inspect(connection).get_table_names() if not name.startswith("sqlite_"))
        dump: dict[str, list[Any]] = {table: self.table_rows(table) for table in tables}
        if self.is_sqlite:
            dump["schema"] = sorted(self.rows("SELECT * FROM sqlite_master"), key=repr)
        else:
            dump["schema"] = sorted(
                self.rows(
                    "SELECT 'column', table_name, column_name, data_type, is_nullable, column_default "
                    "FROM information_schema.columns WHERE table_schema = 'public' "
                    "UNION ALL SELECT 'index', tablename, indexname, indexdef, '', '' FROM pg_indexes "
                    "WHERE schemaname = 'public' "
                    "UNION ALL SELECT 'trigger', tgrelid::regclass::text, tgname, pg_get_triggerdef(oid), '', '' "
                    "FROM pg_trigger WHERE NOT tgisinternal "
                    "UNION ALL SELECT 'constraint', conrelid::regclass::text, conname, pg_get_constraintdef(oid), "
                    "'', '' FROM pg_constraint WHERE connamespace = 'public'::regnamespace"
                ),
                key=repr,
            )
        return dump

    # -- the legacy schema, as the pre-Alembic implementation wrote it ------------------------------------
    def create_legacy(self, rows: Iterable[LegacyRow] = (), orphan_links: Iterable[tuple[str, str]] = ()) -> None:
        """Legacy DDL and `rows`, plus junction rows pointing at traces that do not exist."""
        ddl = LEGACY_DDL if self.is_sqlite else LEGACY_DDL_POSTGRESQL
        insert_trace = text("INSERT INTO traces VALUES (:id, :type, :ns, :data, :meta, :created, :updated)")
        insert_link = text("INSERT INTO trace_sessions (trace_id, session_uid) VALUES (:id, :uid)")
        with self.raw() as connection:
            for statement in ddl.split(";"):
                if statement.strip():
                    connection.exec_driver_sql(statement)
            trace_rows, link_rows = [], []
            for trace_id, context_type, namespace, data, metadata, created, updated, sessions in rows:
                trace_rows.append(
                    {
                        "id": trace_id,
                        "type": context_type,
                        "ns": namespace,
                        "data": json.dumps(data),
                        "meta": json.dumps(metadata),
                        "created": created,
                        "updated": updated,
                    }
                )
                link_rows += [{"id": trace_id, "uid": uid} for uid in sessions]
            for statement, values in ((insert_trace, trace_rows), (insert_link, link_rows)):
                if values:
                    connection.execute(statement, values)
            orphans = [{"id": trace_id, "uid": uid} for trace_id, uid in orphan_links]
            if orphans:
                # The legacy SQLite implementation never turned foreign keys on, so links outlived their
                # traces. On PostgreSQL the same rows need the constraint's trigger skipped.
                if not self.is_sqlite:
                    connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
                connection.execute(insert_link, orphans)

    # -- the oracle in plain SQL ------------------------------------------------------------------------------
    def sql_oracle_query(
        self,
        *,
        session_uid: str | None = None,
        namespace: str | None = None,
        context_type: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int | None = None,
    ) -> list[TraceContext]:
        """query()'s question in plain SQL over the raw tables, sorted on traces.created_at (never the copy)."""
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if session_uid is not None:
            clauses.append("EXISTS (SELECT 1 FROM trace_sessions s WHERE s.trace_id = t.id AND s.session_uid = :uid)")
            params["uid"] = session_uid
        for column, value in (("namespace", namespace), ("context_type", context_type)):
            if value is not None:
                clauses.append(f"t.{column} = :{column}")
                params[column] = value
        if since is not None:
            clauses.append("t.created_at >= :since")
            params["since"] = since
        if until is not None:
            clauses.append("t.created_at < :until")
            params["until"] = until
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        # Byte order for ties on both engines (SQLite's BINARY; "C" on PostgreSQL, whatever the database's).
        tie_break = "t.id DESC" if self.is_sqlite else 't.id COLLATE "C" DESC'
        not_indexed = "NOT INDEXED" if self.is_sqlite else ""
        sql = (
            "SELECT t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at "
            f"FROM traces t {not_indexed} {where} ORDER BY t.created_at DESC, {tie_break}"
        )
        if limit is not None:
            sql += " LIMIT :limit"
            params["limit"] = limit
        with self.raw() as connection:
            rows = connection.execute(text(sql), params).fetchall()
            return [
                TraceContext(
                    id=trace_id,
                    context_type=ctype,
                    namespace=ns,
                    data=json.loads(data),
                    metadata=json.loads(metadata) if metadata is not None else {},
                    created_at=created,
                    updated_at=updated,
                    session_uids=list(
                        connection.execute(
                            text("SELECT session_uid FROM trace_sessions WHERE trace_id = :id"), {"id": trace_id}
                        ).scalars()
                    ),
                )
                for trace_id, ctype, ns, data, metadata, created, updated in rows
            ]
