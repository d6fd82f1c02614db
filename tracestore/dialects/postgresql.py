"""PostgreSQL's rules: arrays for lists and batched writes, LATERAL for the per-session bounded read."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import ColumnElement, Connection, Select, Table, Text, TextClause, bindparam, func, select, text, true
from sqlalchemy import cast as sql_cast
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import aliased
from sqlalchemy.sql.selectable import FromClause

from tracestore.dialects.base import (
    FOLLOW_TRIGGER,
    STAMP_LINK_TRIGGER,
    STAMP_TRACE_TRIGGER,
    EngineRules,
    dated,
    newest_first,
)
from tracestore.models import SESSION_TIME_INDEX, TraceSession

# Where a write inside a transaction of the caller's keeps the caller's enable_seqscan (see write_setup_undo).
SAVED_SEQSCAN = "tracestore.enable_seqscan"


class PostgreSQLRules(EngineRules):
    name = "postgresql"
    # Every statement costs a server round trip and a parse/bind/execute even when pipelined, so a batch is
    # one INSERT ... SELECT FROM unnest(arrays) per table, whose rowcount is right on both drivers.
    write_arrays = True
    text_holds_nul = False
    explain_prefix = "EXPLAIN "
    one_write_lock = False
    begin_write = "BEGIN"
    write_isolation_level = "READ COMMITTED"  # the default, which the write statements are built for
    trigger_names_sql = "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"

    def insert(self, target: Table) -> Any:
        return postgresql.insert(target)

    def insert_rows(self, target: Table, columns: tuple[str, ...]) -> Any:
        """An INSERT ... SELECT FROM unnest(arrays): one array parameter per column, one element per row."""
        # Typed binds: the dialect casts each (%(id)s::TEXT[]), and queries.compiled binds them in binary.
        arrays = [bindparam(name, type_=postgresql.ARRAY(target.c[name].type)) for name in columns]
        rows = func.unnest(*arrays).table_valued(*columns).render_derived(name="v")
        return self.insert(target).from_select(list(columns), select(*(rows.c[name] for name in columns)))

    def session_list(self, session_uid: Any) -> ColumnElement[Any]:
        # As text, like SQLite's: psycopg and asyncpg would decode json themselves, each its own way.
        return sql_cast(func.json_agg(session_uid), Text)

    def listed(self, name: str) -> tuple[FromClause, ColumnElement[Any]]:
        array = bindparam(name, type_=postgresql.ARRAY(Text))  # typed: queries.compiled binds it in binary
        each = func.unnest(array).table_valued("value").render_derived(name="j")
        return each, each.c.value

    def list_argument(self, values: Iterable[str]) -> Any:
        return list(values)

    def session_keys(self, *, since: bool, limit: bool) -> Select[*tuple[Any, ...]]:
        # A LATERAL subquery per listed session; its ORDER BY, served by the index, also keeps the planner
        # from flattening it into a join that it may answer with a scan of all trace_sessions.
        each, uid = self.listed("session_uids")
        link = aliased(TraceSession, name="ts")
        keys = dated(
            select(link.created_at, link.trace_id).where(link.session_uid == uid), link.created_at, since=since
        )
        ranked = newest_first(keys, link.created_at, link.trace_id, limit=limit).lateral("n")
        return select(ranked.c.created_at, ranked.c.trace_id).select_from(each.join(ranked, true()))

    def write_setup(self) -> tuple[TextClause, ...]:
        # Sequential scans off for the transaction (SET LOCAL ends with it): every query a write runs is a
        # key lookup, and PL/pgSQL caches the copy triggers' plans per connection, so a plan made while
        # trace_sessions was small (a scan) would stay cached as the table grows.
        return (text("SET LOCAL enable_seqscan = off"),)

    def write_setup_undo(self) -> tuple[tuple[TextClause, ...], tuple[TextClause, ...]]:
        # The caller's transaction goes on after the store's writes: its own queries get its own setting back.
        # The saved value lives in a placeholder setting local to the transaction, so no row has to be read.
        return (
            (text(f"SELECT set_config('{SAVED_SEQSCAN}', current_setting('enable_seqscan'), true)"),),
            (text(f"SELECT set_config('enable_seqscan', current_setting('{SAVED_SEQSCAN}'), true)"),),
        )

    def create_triggers(self, names: tuple[str, ...]) -> tuple[TextClause, ...]:
        statements = []
        for name in names:
            table, event, condition, body = TRIGGERS[name]
            statements += [
                text(f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN {body} END $$"),
                text(
                    f"CREATE OR REPLACE TRIGGER {name} {event} ON {table} FOR EACH ROW WHEN ({condition})"
                    f" EXECUTE FUNCTION {name}()"
                ),
            ]
        return tuple(statements)

    def session_index_drift(self, connection: Connection) -> str | None:
        # Columns and order: Alembic's own comparison (PostgreSQL reflection keeps DESC). Not what
        # reflection hides: an interrupted CREATE INDEX CONCURRENTLY leaves an INVALID index.
        if index_is_valid(connection, SESSION_TIME_INDEX) is False:
            return f"index {SESSION_TIME_INDEX} is INVALID (an interrupted CREATE INDEX CONCURRENTLY)"
        return None

    def drop_triggers(self, names: tuple[str, ...]) -> tuple[TextClause, ...]:
        return tuple(
            statement
            for name in names
            for statement in (
                text(f"DROP TRIGGER IF EXISTS {name} ON {TRIGGERS[name][0]}"),
                text(f"DROP FUNCTION IF EXISTS {name}()"),
            )
        )


def index_is_valid(connection: Connection, index: str) -> bool | None:
    """Whether `index` can answer queries; None if there is no such index.

    A CREATE INDEX CONCURRENTLY that fails or is cancelled leaves its index behind marked INVALID:
    every write keeps maintaining it, no query ever uses it, and IF NOT EXISTS skips over it.
    """
    valid = connection.execute(
        text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"), {"name": index}
    ).scalar()
    return None if valid is None else bool(valid)


# The same triggers as SQLite's: a trigger here runs a function. name -> (table, timing and event, WHEN
# condition, function body). The link stamp is a BEFORE trigger that fills the row being inserted, which
# PostgreSQL allows and SQLite does not (there it is a second UPDATE).
TRIGGERS: dict[str, tuple[str, str, str, str]] = {
    FOLLOW_TRIGGER: (
        "traces",
        "AFTER UPDATE OF created_at",
        "NEW.created_at IS DISTINCT FROM OLD.created_at",
        "UPDATE trace_sessions SET created_at = NEW.created_at WHERE trace_id = NEW.id; RETURN NULL;",
    ),
    STAMP_LINK_TRIGGER: (
        "trace_sessions",
        "BEFORE INSERT",
        "NEW.created_at IS NULL",
        "NEW.created_at := (SELECT created_at FROM traces WHERE id = NEW.trace_id); RETURN NEW;",
    ),
    STAMP_TRACE_TRIGGER: (
        "traces",
        "AFTER INSERT",
        "TRUE",
        "UPDATE trace_sessions SET created_at = NEW.created_at"
        " WHERE trace_id = NEW.id AND created_at IS DISTINCT FROM NEW.created_at; RETURN NULL;",
    ),
}
