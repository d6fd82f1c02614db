"""How migrations are run from code and the CLI: a thin wrapper over alembic.command."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Connection, Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from tracestore.engine import create_engine, missing_sqlite_file, sync_url, tracestore_connection
from tracestore.engine import shown as shown_url
from tracestore.errors import (
    RevisionError,
    SchemaOutOfDateError,
    StorageError,
    driver_reason,
    is_disk_full,
    storage_error,
)
from tracestore.migrate.backfill import DEFAULT_BATCH_SIZE, remove_kept_orphans
from tracestore.migrate.lock import migration_lock, migration_running
from tracestore.migrate.online import ddl_step, write_step
from tracestore.migrate.schema import (
    ROLLING_DEPLOY_TRIGGERS,
    drop_copy_triggers,
    restore_links_foreign_key,
    rolling_deploy_triggers,
)
from tracestore.migrate.versions import (
    SHARED_VERSION_TABLE,
    VERSION_TABLE,
    adopt,
    read_state,
    release_shared_row,
)
from tracestore.migrate.versions import include_object as include_object

UrlOrEngine = str | Engine
Target = str | Engine | Connection

log = logging.getLogger("tracestore.migrate")


def script_location() -> str:
    """The migrations directory: inside the installed wheel, or the checkout's top-level `migrations/`."""
    spec = importlib.util.find_spec("tracestore.migrations")
    if spec is not None and spec.submodule_search_locations:
        return str(next(iter(spec.submodule_search_locations)))
    return str(Path(__file__).resolve().parent.parent / "migrations")


def alembic_config(**attributes: Any) -> Config:
    config = Config()
    config.set_main_option("script_location", script_location())
    config.attributes["configure_logger"] = False
    config.attributes.update(attributes)
    return config


@cache
def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _run(target: Target, action: Callable[[Config], None], **attributes: Any) -> dict[str, Any]:
    if isinstance(target, Connection):
        config = alembic_config(connection=target, **attributes)
        try:
            action(config)
        except CommandError as exc:  # e.g. an unknown revision
            raise RevisionError(str(exc)) from exc
        reports: dict[str, Any] = config.attributes.get("reports", {})
        return reports
    engine, owned = _engine(target)
    try:
        with _connect(engine) as connection:
            return _run(connection, action, **attributes)
    except SQLAlchemyError as exc:
        raise migration_storage_error("migration failed", exc) from exc
    finally:
        if owned:
            engine.dispose()


def upgrade(
    target: Target,
    revision: str = "head",
    *,
    batch_size: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Upgrade a database (URL, Engine or idle Connection) to `revision`; returns the revisions' reports."""
    attributes: dict[str, Any] = {"on_progress": on_progress}
    if batch_size is not None:
        attributes["batch_size"] = batch_size
    return _run(target, lambda config: command.upgrade(config, revision), **attributes)


def downgrade(target: Target, revision: str, *, drop_data: bool = False) -> None:
    """Downgrade to `revision`. Going to "base" drops the tables: refused while traces exist unless drop_data."""
    _run(target, lambda config: command.downgrade(config, revision), drop_data=drop_data)


@dataclass(frozen=True)
class FinalizeReport:
    """What `finalize` did: the rolling-deploy triggers it dropped, the orphan links it removed, the foreign
    key it added or validated (PostgreSQL), and whether tracestore's row left `alembic_version`."""

    dropped: list[str] = field(default_factory=list)
    orphans_removed: int = 0
    foreign_key: str | None = None
    left_alembic_version: bool = False


def finalize(target: UrlOrEngine, *, batch_size: int = DEFAULT_BATCH_SIZE) -> FinalizeReport:
    """End the rolling deploy, once no instance of the previous release runs any more.

    Drops the triggers that stamp the previous release's writes and deletes the orphan links the upgrade
    kept whose trace never came; on PostgreSQL adds the junction's foreign key where a legacy schema lacks
    it (NOT VALID, every link without a trace removed, then VALIDATE: writers are never blocked); last,
    tracestore's row leaves `alembic_version` (the table too, if nothing else is in it).

    From then on a link inserted without created_at stays NULL and is invisible to session queries
    until `tracestore verify --fix`. Idempotent, and a killed run is finished by the next; refused
    below head (the upgrade still needs the triggers).
    """
    engine, owned = _engine(target)
    try:
        with _connect(engine) as connection:
            _adopt(connection, required=True)
            current = current_revision(connection)
            if current != head_revision():
                raise SchemaOutOfDateError(
                    f"database is at revision {current or 'none (legacy or empty)'}: finalize after "
                    "`tracestore upgrade` has reached head and the previous release has stopped writing"
                )
            present = rolling_deploy_triggers(connection)
            connection.commit()
        with _connect(engine) as connection:
            autocommit = connection.execution_options(isolation_level="AUTOCOMMIT")
            dialect = autocommit.dialect.name

            def drop_triggers() -> None:
                for statement in drop_copy_triggers(ROLLING_DEPLOY_TRIGGERS, dialect=dialect):
                    autocommit.execute(statement)

            # DROP TRIGGER locks its table exclusively: both tables, in the application's order.
            locks = (("traces", "ACCESS EXCLUSIVE"), ("trace_sessions", "ACCESS EXCLUSIVE"))
            ddl_step(autocommit, drop_triggers, what="finalize: drop the rolling-deploy triggers", locks=locks)
            for name in present:
                log.info("dropped trigger %s", name)
            removed = remove_kept_orphans(autocommit, batch_size=batch_size)
            foreign_key, unrecorded = restore_links_foreign_key(autocommit, batch_size=batch_size)
            removed += unrecorded
        if removed:
            log.info("removed %d orphan links", removed)
        with _connect(engine) as connection:
            left = _leave_shared_table(connection)
        return FinalizeReport(
            dropped=present, orphans_removed=removed, foreign_key=foreign_key, left_alembic_version=left
        )
    except SQLAlchemyError as exc:
        raise migration_storage_error("finalize failed", exc) from exc
    finally:
        if owned:
            engine.dispose()


def _leave_shared_table(connection: Connection) -> bool:
    """tracestore's row leaves `alembic_version`, in one transaction, one migration at a time."""
    if read_state(connection).shared is None:
        return False
    if connection.in_transaction():
        connection.rollback()
    with migration_lock(connection.engine.url):
        left = write_step(
            connection.execution_options(isolation_level="AUTOCOMMIT"),
            lambda: release_shared_row(connection),
            what=f"finalize: remove tracestore's row from {SHARED_VERSION_TABLE}",
        )
    if left:
        log.info("tracestore's revision is now in %s only", VERSION_TABLE)
    return left


def current_revision(target: Target) -> str | None:
    """tracestore's revision of the database, or None for an empty or legacy (pre-Alembic) database.

    Read from tracestore's version table, or, in a previous release's database not adopted yet (read-only,
    or never opened by this release), from tracestore's row in `alembic_version`.
    """
    if isinstance(target, Connection):
        revision = read_state(target).revision
        if target.in_transaction():
            target.rollback()  # leave the connection idle, ready for a migration
        return revision
    engine, owned = _engine(target)
    try:
        # A plain connection: a read of the revision must not switch an application's file to WAL.
        with engine.connect() as connection:
            return read_state(connection).revision
    except SQLAlchemyError as exc:
        raise storage_error("cannot read the schema revision", exc) from exc
    finally:
        if owned:
            engine.dispose()


def revision_in(connection: Connection) -> str | None:
    """tracestore's revision of the database, read on a connection that may be inside the application's
    transaction: it never commits, rolls back or writes. None for an empty or legacy database."""
    return read_state(connection).revision


# From this revision on the column and its triggers exist, so the store can answer correctly (with
# the legacy join) while the backfill of a running or interrupted upgrade is unfinished.
MIGRATING_READS_FROM = "0002"
# How long a store opening with auto_upgrade waits for another process's upgrade to reach it.
WAIT_FOR_FIRST_STEPS_S = 60.0


def ensure_head(target: Engine | Connection, *, auto_upgrade: bool) -> bool:
    """Make sure the store answers correctly; True if it must use the migration-time reads for now.

    At head: False. Below head with auto_upgrade: upgrade, unless another process is upgrading this
    database right now; then, as without auto_upgrade, a database past MIGRATING_READS_FROM is
    served with the legacy join until it reaches head (True). Anything older is refused.
    """
    if isinstance(target, Connection):
        _adopt(target, required=False)
    else:
        with _connect(target) as connection:
            _adopt(connection, required=False)
    current = current_revision(target)
    head = head_revision()
    if current == head:
        return False
    url = target.engine.url
    if auto_upgrade:
        # Another process started upgrading a legacy file moments ago: its first steps take seconds,
        # then the file can be served while its backfill runs. Wait for that, not for the backfill.
        deadline = time.monotonic() + WAIT_FOR_FIRST_STEPS_S
        while migration_running(url) and not _serves_migrating_reads(current) and time.monotonic() < deadline:
            time.sleep(0.2)
            current = current_revision(target)
        if current == head:
            return False
        if not migration_running(url):
            upgrade(target)
            return False
    if _serves_migrating_reads(current):
        log.warning(
            "database is at revision %s, head is %s: %s; session queries use the legacy join (slower) until it "
            "reaches head",
            current,
            head,
            "another process is upgrading it" if migration_running(url) else "run `tracestore upgrade` to finish",
        )
        return True
    shown = shown_url(url)
    if migration_running(url):
        raise SchemaOutOfDateError(
            f"database is at revision {current or 'none (legacy or empty)'} and another process is upgrading it; "
            f"it can be served from revision {MIGRATING_READS_FROM} on: try again in a moment"
        )
    raise SchemaOutOfDateError(
        f"database is at revision {current or 'none (legacy or empty)'}, tracestore needs {head}: "
        f"run `tracestore upgrade --url {shown}` (or `alembic -x url={shown} upgrade head`) first"
    )


def refuse_missing_database(url: URL, *, auto_upgrade: bool) -> None:
    """Without auto_upgrade there is nothing to create: refuse a SQLite file that does not exist before
    connecting, which would leave an empty file behind."""
    path = missing_sqlite_file(url)
    if path is not None and not auto_upgrade:
        raise SchemaOutOfDateError(f"no database at {path}: run `tracestore upgrade --url {url}` to create one")


def _serves_migrating_reads(revision: str | None) -> bool:
    return revision is not None and is_at_least(revision, MIGRATING_READS_FROM)


def at_head(connection: Connection) -> bool:
    """True once the database reaches head (the store's check while it serves migration-time reads)."""
    return current_revision(connection) == head_revision()


def is_at_least(revision: str, ancestor: str) -> bool:
    """True if `ancestor` is `revision` or comes before it in the migration chain."""
    script = ScriptDirectory.from_config(alembic_config())
    try:
        return any(step.revision == ancestor for step in script.iterate_revisions(revision, "base"))
    except CommandError as exc:
        raise RevisionError(f"unknown revision {revision!r} in the database: {exc}") from exc


def migration_storage_error(action: str, exc: BaseException) -> StorageError:
    """A migration's driver error as a StorageError: the driver's reason and, on a full disk, what to do."""
    advice = (
        "; what committed before is kept: free disk space, then run the command again, it goes on from there"
        if is_disk_full(exc)
        else ""
    )
    return StorageError(f"{action}: {driver_reason(exc)}{advice}")


def _adopt(connection: Connection, *, required: bool) -> None:
    """Adopt a previous release's database (tracestore.migrate.versions), unless a migration is running (it
    adopts the database itself). Not `required` (a store opening), a database that cannot be written is
    left as it is: its revision is then read from `alembic_version`."""
    state = read_state(connection)
    if connection.in_transaction():
        connection.rollback()
    if not state.to_adopt or (not required and migration_running(connection.engine.url)):
        return
    try:
        with migration_lock(connection.engine.url):
            revision = adopt(connection)
    except DBAPIError as exc:
        if required:
            raise
        log.warning(
            "cannot record tracestore's revision in %s (%s): it is read from %s until a write succeeds",
            VERSION_TABLE,
            driver_reason(exc),
            SHARED_VERSION_TABLE,
        )
        return
    if revision is not None:
        log.info("adopted a previous release's database: revision %s recorded in %s", revision, VERSION_TABLE)


def _connect(engine: Engine) -> AbstractContextManager[Connection]:
    """A connection of `engine` for tracestore's own work (migrations, adoption, finalize), for a `with` block."""
    return tracestore_connection(engine)


def _engine(target: UrlOrEngine) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    return create_engine(sync_url(target)), True
