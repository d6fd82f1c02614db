"""tracestore beside an application's own Alembic chain (tests/app_chain: its '0001' is named like tracestore's):
the recipes of docs/migrations.md, in both orders, in one shared database, and from a built wheel."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import sqlalchemy
from alembic import command
from alembic.config import Config
from click.testing import CliRunner
from sqlalchemy import URL, inspect, text

from tests.backends import Backend
from tests.test_version_table import REVISIONS, as_previous_release, own_table, shared_rows
from tests.wheel import Installed
from tracestore import TraceContext, TraceStore
from tracestore.cli import main
from tracestore.errors import MigrationError
from tracestore.migrate import (
    alembic_config,
    current_revision,
    downgrade,
    head_revision,
    upgrade,
)

APP = Path(__file__).parent / "app_chain"
HEAD = head_revision()
APP_HEAD = "0002"
APP_TABLES = {"app_users", "app_user_traces"}


def app_config(url: str, section: str = "alembic") -> tuple[Config, io.StringIO]:
    """The application's alembic.ini, as `alembic -c tests/app_chain/alembic.ini [-n section] -x url=URL`."""
    out = io.StringIO()
    # The ini's own [tracestore] line as it is: this checkout's editable install must find the migrations too.
    config = Config(str(APP / "alembic.ini"), ini_section=section, stdout=out, cmd_opts=Namespace(x=[f"url={url}"]))
    return config, out


def app(url: str, action: str, *args: str, section: str = "alembic") -> str:
    """Run an alembic command of the application's ini (its own chain, or tracestore's with section="tracestore")."""
    config, out = app_config(url, section)
    getattr(command, action)(config, *args)
    return out.getvalue()


def currents(url: str) -> tuple[str, str]:
    """Both `alembic current`s: the application's chain and tracestore's (through the ini's [tracestore] section)."""
    return app(url, "current").strip(), app(url, "current", section="tracestore").strip()


def tables(url: str) -> set[str]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as connection:
            return {name for name in inspect(connection).get_table_names() if not name.startswith("sqlite_")}
    finally:
        engine.dispose()


def rows(url: str, sql: str) -> list[tuple[object, ...]]:
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql))]
    finally:
        engine.dispose()


def tracestore_cli(*args: str) -> str:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def tracestore_check(url: str) -> None:
    """tracestore's own `alembic check` (no drift between its models and its tables): the app's tables are not its."""
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.connect() as connection:
            command.check(alembic_config(connection=connection))
    finally:
        engine.dispose()


def store_some(url: str) -> None:
    with TraceStore(url, auto_upgrade=False) as store:
        store.store(TraceContext(id="t1", context_type="llm", namespace="ns", data={"a": 1}, session_uids=["s"]))
        assert [trace.id for trace in store.get_by_session_uid("s")] == ["t1"]


def test_the_application_chain_then_tracestore_in_one_database(backend: Backend) -> None:
    """Recipe (b): the deploy step runs the app's migrations, then `tracestore upgrade --url` on its own."""
    url = backend.url
    app(url, "upgrade", "head")
    tracestore_cli("--url", url, "upgrade")
    assert currents(url) == (f"{APP_HEAD} (head)", f"{HEAD} (head)")
    app(url, "check")  # the app's autogenerate sees no drift: include_object leaves tracestore's tables out
    tracestore_check(url)
    store_some(url)

    app(url, "downgrade", "base")  # the application's downgrade leaves tracestore alone
    assert tables(url) & APP_TABLES == set()
    assert current_revision(url) == HEAD and rows(url, "SELECT id FROM traces") == [("t1",)]
    app(url, "upgrade", "head")
    downgrade(url, "base", drop_data=True)  # and tracestore's leaves the application alone
    assert tables(url) == {*APP_TABLES, "alembic_version"}
    assert rows(url, "SELECT version_num FROM alembic_version") == [(APP_HEAD,)]


def test_tracestore_then_the_application_chain_in_one_database(backend: Backend) -> None:
    """Recipe (b) the other way round, tracestore migrated from code with the application's own Engine."""
    url = backend.url
    engine = sqlalchemy.create_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    store_some(url)
    app(url, "upgrade", "0001")  # the app at '0001' while tracestore goes down to its own '0001' and back
    downgrade(url, "0001")
    assert currents(url) == ("0001", "0001")
    upgrade(url)
    assert rows(url, "SELECT version_num FROM alembic_version") == [("0001",)]  # never taken for tracestore's
    app(url, "upgrade", "head")
    assert currents(url) == (f"{APP_HEAD} (head)", f"{HEAD} (head)")
    app(url, "check")
    tracestore_check(url)

    app(url, "downgrade", "base")
    assert current_revision(url) == HEAD and rows(url, "SELECT id FROM traces") == [("t1",)]
    assert "alembic_version" not in tables(url) or rows(url, "SELECT * FROM alembic_version") == []
    app(url, "upgrade", "head")
    assert currents(url) == (f"{APP_HEAD} (head)", f"{HEAD} (head)")


@pytest.mark.parametrize("revision", REVISIONS)
def test_a_previous_release_database_is_adopted_then_the_application_chain_runs(
    backend: Backend, revision: str
) -> None:
    """A database the previous release made (tracestore's row in alembic_version): opened, finalized, and
    then the application's own chain can use alembic_version."""
    url = backend.url
    as_previous_release(backend, revision)
    with TraceStore(url) as store:  # opening adopts it (and upgrades it to head)
        store.store(TraceContext(id="t1", context_type="llm", namespace="ns", data=[1], session_uids=["s"]))
    assert own_table(backend) == ([HEAD], True) and shared_rows(backend) == [HEAD]
    out = tracestore_cli("--url", url, "finalize")
    assert "alembic_version" in out, out
    assert shared_rows(backend) is None
    app(url, "upgrade", "head")
    assert currents(url) == (f"{APP_HEAD} (head)", f"{HEAD} (head)")
    app(url, "check")
    tracestore_check(url)


def test_tracestore_in_a_database_of_its_own(backend: Backend, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Recipe (a): the application's chain in its database, tracestore's in another; neither sees the other."""
    if backend.is_sqlite:
        app_url = f"sqlite:///{tmp_path / 'app.db'}"
    else:
        server: URL = request.getfixturevalue("pg_server_url")
        admin = sqlalchemy.create_engine(server, isolation_level="AUTOCOMMIT")
        name = f"{backend.sync_url.database}_app"
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        request.addfinalizer(lambda: _drop_database(admin, name))
        app_url = backend.sync_url.set(database=name).render_as_string(hide_password=False)
    app(app_url, "upgrade", "head")
    tracestore_cli("--url", backend.url, "upgrade")
    store_some(backend.url)
    assert tables(app_url) == {*APP_TABLES, "alembic_version"}
    assert tables(backend.url) == {"traces", "trace_sessions", "tracestore_alembic_version", "tracestore_orphan_links"}
    assert app(app_url, "current").strip() == f"{APP_HEAD} (head)"
    assert current_revision(backend.url) == HEAD
    app(app_url, "check")


def _drop_database(admin: sqlalchemy.Engine, name: str) -> None:
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.dispose()


# -- (c) the alembic command from an installed wheel ------------------------------------------------------------
def postgresql_driver(tmp_path: Path) -> dict[str, str]:
    """PYTHONPATH lending the wheel's virtualenv this environment's PostgreSQL driver (the `postgresql` extra) and
    nothing else, so everything of tracestore still comes from the wheel."""
    import psycopg
    import psycopg_binary

    lent = tmp_path / "postgresql-extra"
    lent.mkdir()
    for module in (psycopg, psycopg_binary):
        package = Path(module.__file__ or "").parent
        (lent / package.name).symlink_to(package)
        libs = package.parent / f"{package.name}.libs"
        if libs.exists():
            (lent / libs.name).symlink_to(libs)
    typing_extensions = Path(sys.modules["typing_extensions"].__file__ or "")
    (lent / typing_extensions.name).symlink_to(typing_extensions)
    for metadata in typing_extensions.parent.glob("psycopg*.dist-info"):  # SQLAlchemy checks the driver's version
        (lent / metadata.name).symlink_to(metadata)
    return {"PYTHONPATH": str(lent)}


@pytest.mark.slow
def test_a_deploy_pipeline_runs_both_chains_with_the_installed_alembic(
    installed: Installed, backend: Backend, tmp_path: Path
) -> None:
    """Recipe (c): the application's ini with a [tracestore] section (script_location = tracestore.migrations:),
    run by the `alembic` command of a virtualenv where tracestore is installed from its wheel."""
    work = tmp_path / "deploy"
    shutil.copytree(APP, work)  # away from the checkout: nothing of it can be imported by accident
    alembic = installed.venv / "bin" / "alembic"
    env = {**os.environ, **({} if backend.is_sqlite else postgresql_driver(tmp_path))}
    env.pop("TRACESTORE_DATABASE_URL", None)
    x_url = ("-x", f"url={backend.url}")

    def pipeline(*args: str) -> str:
        return run_with(env, alembic, "-c", work / "alembic.ini", *args, cwd=work)

    pipeline(*x_url, "upgrade", "head")
    pipeline("-n", "tracestore", *x_url, "upgrade", "head")
    assert f"{APP_HEAD} (head)" in pipeline(*x_url, "current")
    assert f"{HEAD} (head)" in pipeline("-n", "tracestore", *x_url, "current")
    pipeline(*x_url, "check")
    pipeline("-n", "tracestore", *x_url, "check")
    probe = "import tracestore.migrations; print(tracestore.migrations.__file__)"
    origin = run_with(env, installed.venv / "bin" / "python", "-c", probe, cwd=work)
    assert "site-packages" in origin, origin
    assert tables(backend.url) >= {*APP_TABLES, "traces", "trace_sessions", "tracestore_alembic_version"}


def run_with(env: dict[str, str], *args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_tracestore_refuses_to_drop_its_tables_while_an_application_table_refers_to_them(backend: Backend) -> None:
    """PostgreSQL cannot drop a table another one's foreign key refers to; SQLite would, leaving the key
    pointing at nothing. `downgrade base` refuses on both before any step, even with drop_data."""
    url = backend.url
    upgrade(url)
    store_some(url)
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(
                text("CREATE TABLE app_orders (id INTEGER PRIMARY KEY, trace_id TEXT REFERENCES traces(id))")
            )
            connection.execute(text("INSERT INTO app_orders VALUES (1, 't1')"))
    finally:
        engine.dispose()
    before = (tables(url), rows(url, "SELECT id FROM traces"), rows(url, "SELECT * FROM app_orders"))
    with pytest.raises(MigrationError, match=r"other tables have foreign keys to them \(app_orders"):
        downgrade(url, "base", drop_data=True)
    assert (tables(url), rows(url, "SELECT id FROM traces"), rows(url, "SELECT * FROM app_orders")) == before
    assert current_revision(url) == HEAD

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool)
    try:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE app_orders"))
    finally:
        engine.dispose()
    downgrade(url, "base", drop_data=True)
    assert "traces" not in tables(url)
