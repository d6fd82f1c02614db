"""The notes app's Alembic environment: its own models, tracestore's objects left out."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from notes_app.models import Base
from sqlalchemy import create_engine

import tracestore.migrate

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def run_migrations_online() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # tracestore's tables, indexes and version table share this database: autogenerate and
            # `alembic check` must neither drop nor compare them.
            include_object=tracestore.migrate.include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
