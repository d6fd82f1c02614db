"""The application's Alembic environment: its own models, its own `alembic_version`, tracestore's tables left
to tracestore's chain by `tracestore.migrate.include_object`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, Text, create_engine
from sqlalchemy.pool import NullPool

from tracestore.migrate import include_object

metadata = MetaData()
Table(
    "app_users",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("email", String(200), nullable=False, unique=True),
    Column("display_name", String(100)),
)
Table(
    "app_user_traces",  # the application's own table pointing at tracestore's: kept by include_object
    metadata,
    Column("user_id", Integer, ForeignKey("app_users.id"), primary_key=True),
    Column("trace_id", Text, primary_key=True),
)


def run() -> None:
    url = context.get_x_argument(as_dictionary=True)["url"]
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=metadata,
            include_object=include_object,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()


run()
