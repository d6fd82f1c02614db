"""The deploy step: the app's own migrations, then tracestore's, each on its own connection.

python -m notes_app.deploy sqlite:///notes.db
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import command
from alembic.config import Config

import tracestore.migrate

HERE = Path(__file__).resolve().parent.parent


def migrate(url: str) -> None:
    """Bring both chains to head: the app's (alembic_version), then tracestore's (tracestore_alembic_version)."""
    config = Config(str(HERE / "alembic.ini"))
    config.attributes["configure_logger"] = False
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ini interpolation: a literal %
    command.upgrade(config, "head")
    tracestore.migrate.upgrade(url)


if __name__ == "__main__":
    migrate(sys.argv[1] if len(sys.argv) > 1 else "sqlite:///notes.db")
