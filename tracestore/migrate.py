"""How migrations are run from code and the CLI: a thin wrapper over alembic.command."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from tracestore.engine import create_engine, sync_url
from tracestore.errors import RevisionError, SchemaOutOfDateError, StorageError

UrlOrEngine = str | Engine
Target = str | Engine | Connection


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
        raise StorageError(f"migration failed: {exc}") from exc
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
        raise StorageError(f"cannot read the schema revision: {exc}") from exc
    finally:
        if owned:
            engine.dispose()


def ensure_head(target: Engine | Connection, *, auto_upgrade: bool) -> None:
    """Make sure the fast query is safe: the database is at head, or gets there, or we refuse."""
    current = current_revision(target)
    head = head_revision()
    if current == head:
        return
    if auto_upgrade:
        upgrade(target)
        return
    url = target.engine.url.render_as_string(hide_password=True)
    raise SchemaOutOfDateError(
        f"database is at revision {current or 'none (legacy or empty)'}, tracestore needs {head}: "
        f"run `tracestore upgrade --url {url}` (or `alembic -x url={url} upgrade head`) first"
    )


def _engine(target: UrlOrEngine) -> tuple[Engine, bool]:
    if isinstance(target, Engine):
        return target, False
    return create_engine(sync_url(target)), True
