"""How migrations are run from code and the CLI: a thin wrapper over alembic.command."""

from __future__ import annotations

import importlib.util
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import URL, Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from tracestore.engine import create_engine, missing_sqlite_file, sync_url
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
from tracestore.migrate.lock import migration_running
from tracestore.migrate.online import ddl_step
from tracestore.migrate.schema import ROLLING_DEPLOY_TRIGGERS, drop_copy_triggers, rolling_deploy_triggers

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
        with engine.connect() as connection:
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
    """What `finalize` did: the rolling-deploy triggers it dropped, the kept orphan links it removed."""

    dropped: list[str] = field(default_factory=list)
    orphans_removed: int = 0


def finalize(target: UrlOrEngine, *, batch_size: int = DEFAULT_BATCH_SIZE) -> FinalizeReport:
    """End the rolling deploy: drop the triggers that stamp the previous release's writes, and delete the
    orphan links the upgrade kept whose trace never came.

    Run it once no instance of the previous release writes any more. From then on a link inserted
    without created_at stays NULL and is invisible to session queries until `tracestore verify --fix`.
    Idempotent, and a killed run is finished by the next; refused below head (the upgrade still
    needs the triggers).
    """
    engine, owned = _engine(target)
    try:
        with engine.connect() as connection:
            current = current_revision(connection)
            if current != head_revision():
                raise SchemaOutOfDateError(
                    f"database is at revision {current or 'none (legacy or empty)'}: finalize after "
                    "`tracestore upgrade` has reached head and the previous release has stopped writing"
                )
            present = rolling_deploy_triggers(connection)
            connection.commit()
        with engine.connect() as connection:
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
        if removed:
            log.info("removed %d orphan links the upgrade had kept", removed)
        return FinalizeReport(dropped=present, orphans_removed=removed)
    except SQLAlchemyError as exc:
        raise migration_storage_error("finalize failed", exc) from exc
    finally:
        if owned:
            engine.dispose()


def current_revision(target: Target) -> str | None:
    """The revision stamped in the database, or None for an empty or legacy (pre-Alembic) database."""
    if isinstance(target, Connection):
        revision = MigrationContext.configure(target).get_current_revision()
        if target.in_transaction():
            target.rollback()  # leave the connection idle, ready for a migration
        return revision
    engine, owned = _engine(target)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    except SQLAlchemyError as exc:
        raise storage_error("cannot read the schema revision", exc) from exc
    finally:
        if owned:
            engine.dispose()


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


def _engine(target: UrlOrEngine) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    return create_engine(sync_url(target)), True
