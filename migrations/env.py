"""Alembic environment: picks the database URL, runs each revision in its own transaction.

URL precedence: `-x url=...`, then $TRACESTORE_DATABASE_URL, then `sqlalchemy.url` in alembic.ini.
`tracestore.migrate` passes an open connection in `config.attributes["connection"]` instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from logging.config import fileConfig
from typing import Any

from alembic import context
from alembic.operations import ops
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from tracestore.engine import WRITE, create_async_engine, create_engine
from tracestore.errors import driver_reason
from tracestore.migrate.backfill import ORPHANS_TABLE, PROGRESS_TABLE
from tracestore.migrate.lock import migration_lock
from tracestore.migrate.schema import (
    foreign_keys_off,
    freed_pages_not_zeroed,
    refuse_dropping_traces,
    session_index_drift,
)
from tracestore.migrate.versions import VERSION_TABLE, adopt, follow_in_shared_table
from tracestore.models import SESSION_TIME_INDEX, Base

config = context.config
if (
    config.config_file_name is not None
    and config.attributes.get("configure_logger", True)
    and config.file_config.has_section("formatters")
):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("tracestore.migrate")

# Alembic cannot compare this index on SQLite (and says so when it has DESC columns); check_session_index does.
warnings.filterwarnings("ignore", message=f".*expression-based index '{SESSION_TIME_INDEX}'")

# Bookkeeping tables that live beside the models but are not part of them.
NON_MODEL_TABLES = {PROGRESS_TABLE, ORPHANS_TABLE, "sqlite_stat1", "sqlite_stat4"}


def include_object(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    if type_ == "table" and (name in NON_MODEL_TABLES or (reflected and name not in Base.metadata.tables)):
        return False  # tracestore's bookkeeping, or an application's own table in a shared database
    # Alembic does not compare a partial index's predicate (nor, on SQLite, DESC); check_session_index does.
    return not (type_ == "index" and name == SESSION_TIME_INDEX and context.get_bind().dialect.name == "sqlite")


def ignore_primary_key_nullability(migration_context: Any, directives: list[Any]) -> None:
    """Drop "make traces.id NOT NULL" on engines other than SQLite.

    The model keeps `id` nullable because SQLite's legacy `id TEXT PRIMARY KEY` is (models.Trace);
    PostgreSQL makes every primary key column NOT NULL whatever the DDL says, so there it is no drift.
    """
    if migration_context.connection.dialect.name == "sqlite" or not directives:
        return
    primary_keys = {(table.name, column.name) for table in Base.metadata.sorted_tables for column in table.primary_key}
    for table_ops in directives[0].upgrade_ops.ops:
        if isinstance(table_ops, ops.ModifyTableOps):
            table_ops.ops = [
                op
                for op in table_ops.ops
                if not (
                    isinstance(op, ops.AlterColumnOp)
                    and (table_ops.table_name, op.column_name) in primary_keys
                    and op.modify_nullable is not None
                    and op.modify_type is None
                    and op.modify_name is None
                    and op.modify_server_default is False
                    and op.modify_comment is False
                )
            ]
    directives[0].upgrade_ops.ops = [
        table_ops
        for table_ops in directives[0].upgrade_ops.ops
        if not (isinstance(table_ops, ops.ModifyTableOps) and not table_ops.ops)
    ]


def check_session_index(migration_context: Any, revision: Any, directives: list[Any]) -> None:
    """Make `alembic check` / autogenerate see drift of the partial index that reflection cannot show."""
    ignore_primary_key_nullability(migration_context, directives)
    drift = session_index_drift(migration_context.connection)
    if drift is None or not directives:
        return
    log.warning("%s", drift)
    index = next(i for i in Base.metadata.tables["trace_sessions"].indexes if i.name == SESSION_TIME_INDEX)
    changes: list[Any] = [ops.CreateIndexOp.from_index(index)]
    if "missing" not in drift:
        changes.insert(0, ops.DropIndexOp.from_index(index))
    directives[0].upgrade_ops.ops.append(ops.ModifyTableOps("trace_sessions", changes))


def database_url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or os.environ.get("TRACESTORE_DATABASE_URL")
    return url or config.get_main_option("sqlalchemy.url") or "sqlite:///traces.db"


def drop_data_allowed() -> bool:
    flag = context.get_x_argument(as_dictionary=True).get("drop_data") == "yes"
    return flag or bool(config.attributes.get("drop_data"))


def going_to_base() -> bool:
    try:
        return context.get_revision_argument() is None  # Alembic reports "base" as None
    except KeyError:  # commands without a destination (check, revision --autogenerate)
        return False


def run_on(connection: Connection) -> None:
    if going_to_base():
        # Checked before any step runs, so a refused downgrade leaves the schema untouched.
        refuse_dropping_traces(connection, drop_data=drop_data_allowed())
        if connection.in_transaction():
            connection.rollback()
    # Every revision reads before it writes: with a plain BEGIN, a writer committing in between makes
    # SQLite refuse the lock upgrade at once ("database is locked", no busy wait). BEGIN IMMEDIATE
    # waits for the lock instead.
    was_write = connection.get_execution_options().get(WRITE, False)
    connection.execution_options(**{WRITE: True})
    try:
        run_revisions(connection)
    finally:
        connection.execution_options(**{WRITE: was_write})


def adopt_previous_release(connection: Connection) -> None:
    """A previous release's database: its revision into VERSION_TABLE before Alembic reads it there.

    Commands that only read (current, check) try it too, so they see the revision; a database that cannot
    be written is then left as it is, and Alembic sees no revision.
    """
    try:
        adopt(connection)
    except DBAPIError as exc:
        if not migrating():
            log.warning("cannot adopt the previous release's revision: %s", driver_reason(exc))
            return
        raise


def migrating() -> bool:
    try:
        context.get_revision_argument()
    except KeyError:  # commands without a destination (current, check, revision --autogenerate)
        return False
    return True


def run_revisions(connection: Connection) -> None:
    # Never rebuild or touch tables with foreign keys on: SQLite's copy-and-drop of a parent table
    # would cascade and silently delete every trace_sessions row.
    with foreign_keys_off(connection), freed_pages_not_zeroed(connection):
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # tracestore's own version table: an application's chain keeps alembic_version to itself.
            version_table=VERSION_TABLE,
            # While the previous release still reads tracestore's row in alembic_version, it moves too.
            on_version_apply=follow_in_shared_table,
            include_object=include_object,
            process_revision_directives=check_session_index,
            compare_type=True,
            # SQLite's DDL is transactional once the driver stops managing transactions (engine.py):
            # each revision commits or rolls back whole, so a crash never leaves half a revision.
            transactional_ddl=True,
            transaction_per_migration=True,
        )
        # Alembic reads the current revision inside run_migrations, so after waiting for another
        # migration of the same file this run starts from where that one stopped.
        with migration_lock(connection.engine.url):
            adopt_previous_release(connection)
            with context.begin_transaction():
                context.run_migrations()


async def run_async(url: str) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(run_on)
    finally:
        await engine.dispose()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    url = database_url()
    if make_url(url).get_dialect().is_async:
        asyncio.run(run_async(url))
        return
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            run_on(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    # The revisions look at the live database (adopting a legacy schema, resuming a batched
    # backfill), which a generated SQL script cannot do.
    raise CommandError("tracestore migrations need a live database connection; offline --sql mode is not supported")
else:
    run_online()
