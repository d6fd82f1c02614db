"""The command line, driven through click's CliRunner and through the installed console script, on SQLite
and on PostgreSQL (`--url backend.url`); tests about SQLite files (paths, `generate`) run on SQLite only."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import URL, text

from tracestore import TraceContext, TraceStore
from tracestore.cli import main, parse_duration
from tracestore.migrate import current_revision, head_revision, upgrade
from tracestore.models import SESSION_TIME_INDEX
from tracestore.testing import make_traces

from .backends import Backend, LegacyRow
from .oracle import make_trace, oracle_query

CONSOLE_SCRIPT = Path(sys.executable).parent / "tracestore"
COMMANDS = sorted(main.commands)
SESSIONS = ["s-alpha", "s-beta", "s-gamma"]


def run(*args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, env=env)


def assert_clean_failure(result: Result, exit_code: int) -> None:
    """Failed the way a CLI should: the expected code, an `Error:` line, no traceback."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert "Error" in result.stderr


def legacy_rows(traces: list[TraceContext]) -> list[LegacyRow]:
    return [
        (t.id, t.context_type, t.namespace, t.data, t.metadata, t.created_at, t.updated_at, t.session_uids)
        for t in traces
    ]


def sample_traces(now: float) -> list[TraceContext]:
    """Traces well inside the last 10 minutes or well before them: `--since 10m` is never a coin toss."""
    recent = make_traces(60, session_uids=SESSIONS, since=now - 300, until=now - 1, seed=1, sessions_per_trace=2)
    older = make_traces(60, session_uids=SESSIONS, since=now - 7200, until=now - 900, seed=2)
    # Ties on created_at are ordered by id: give a few traces the same timestamp.
    tied = make_traces(4, session_uids=SESSIONS[:1], since=now - 120, until=now - 120, seed=3)
    return recent + older + tied


@pytest.fixture
def stored(backend: Backend) -> tuple[str, list[TraceContext]]:
    traces = sample_traces(time.time())
    with TraceStore(backend.url) as store:
        store.store_batch(traces)
    return backend.url, traces


@pytest.fixture
def legacy_db(backend: Backend) -> tuple[str, list[TraceContext]]:
    traces = sample_traces(time.time())
    backend.create_legacy(legacy_rows(traces), orphan_links=[("gone-1", "s-alpha"), ("gone-2", "s-zeta")])
    return backend.url, traces


def missing_database(pg_url: URL) -> URL:
    """A database on the test server that does not exist, with a password that must never be printed."""
    return pg_url.set(database=f"{pg_url.database}_missing", password="s3cret")


# -- help and arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command: str | None) -> None:
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    described = main if command is None else main.commands[command]
    assert described.help and described.help.split("\n")[0] in " ".join(result.output.split())
    if command is None:
        assert all(name in result.output for name in COMMANDS)


def test_the_command_list_shows_each_command_in_whole_words() -> None:
    """click cuts a docstring's first sentence at 45 characters ("...") in `tracestore --help`: each command
    has a short_help that fits an 80-column terminal on one line instead."""
    result = CliRunner().invoke(main, ["--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    listed = result.output.split("Commands:\n", 1)[1].splitlines()
    assert [line.split()[0] for line in listed] == COMMANDS
    for line in listed:
        name, text = line.split(maxsplit=1)
        assert text == main.commands[name].short_help and not text.endswith("..."), line
        assert len(line) <= 80, line


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("600", 600),
        ("2.5", 2.5),
        ("30s", 30),
        ("10m", 600),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        (" 10M ", 600),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "10q", "-5m", "ten", "1e3", "10m5", "1.m", "9" * 400 + "d"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(click.BadParameter):
        parse_duration(text)


@pytest.mark.parametrize("command", ["recent", "explain"])
def test_bad_duration_is_a_clean_usage_error(stored: tuple[str, list[TraceContext]], command: str) -> None:
    url, _ = stored
    result = run(command, "s-alpha", "--url", url, "--since", "10 minutes")
    assert_clean_failure(result, 2)
    assert "Invalid value for '--since'" in result.stderr
    assert "10m" in result.stderr  # the message shows what a duration looks like


# -- upgrade / current / downgrade -------------------------------------------------------------------
def test_upgrade_fresh_database_then_current_is_up_to_date(backend: Backend) -> None:
    url = backend.url
    result = run("--url", url, "upgrade")
    assert result.exit_code == 0, result.output
    assert f"-> {head_revision()} (head)" in result.stdout
    current = run("--url", url, "current")
    assert current.exit_code == 0, current.output
    assert f"current revision: {head_revision()}" in current.stdout
    assert "up to date" in current.stdout
    again = run("upgrade", "--url", url)
    assert again.exit_code == 0 and "already at" in again.stdout


def test_upgrade_legacy_database_reports_the_backfill(legacy_db: tuple[str, list[TraceContext]]) -> None:
    url, traces = legacy_db
    links = sum(len(t.session_uids) for t in traces)
    result = run("upgrade", "--url", url, "--batch-size", "7")
    assert result.exit_code == 0, result.output
    assert "none (legacy or empty database) -> " in result.stdout
    assert f"{links + 2} junction rows scanned, {links} filled in" in result.stdout
    assert "2 orphan links (no trace yet) kept" in result.stdout and "tracestore finalize" in result.stdout
    built = "built in key order and attached" if url.startswith("sqlite") else "created (empty, filled by the backfill)"
    for step in ("column and triggers added in", f"index idx_trace_sessions_uid_time {built}", "ANALYZE in"):
        assert step in result.stdout
    assert current_revision(url) == head_revision()
    # The upgraded legacy data answers the query like the oracle.
    recent = run("recent", "s-alpha", "--url", url, "--json", "--limit", "1000")
    expected = oracle_query(traces, session_uid="s-alpha", since=time.time() - 600)
    assert [json.loads(line)["id"] for line in recent.stdout.splitlines()] == [t.id for t in expected]


def test_upgrade_batch_size_from_the_environment(legacy_db: tuple[str, list[TraceContext]]) -> None:
    url, _ = legacy_db
    bad = run("upgrade", "--url", url, env={"TRACESTORE_BATCH_SIZE": "lots"})
    assert_clean_failure(bad, 2)
    assert current_revision(url) is None
    good = run("upgrade", env={"TRACESTORE_BATCH_SIZE": "5", "TRACESTORE_DATABASE_URL": url})
    assert good.exit_code == 0, good.output
    assert current_revision(url) == head_revision()


def test_upgrade_accepts_an_async_url(backend: Backend) -> None:
    result = run("--url", backend.async_url, "upgrade")
    assert result.exit_code == 0, result.output
    assert current_revision(backend.url) == head_revision()
    assert run("--url", backend.async_url, "current").exit_code == 0


def test_upgrade_to_an_unknown_revision_is_a_clean_error(backend: Backend) -> None:
    result = run("upgrade", "--url", backend.url, "--revision", "nope")
    assert_clean_failure(result, 2)
    assert "nope" in result.stderr


def test_current_below_head_exits_1(legacy_db: tuple[str, list[TraceContext]]) -> None:
    url, _ = legacy_db
    result = run("current", "--url", url)
    assert result.exit_code == 1
    assert "current revision: none" in result.stdout
    assert "tracestore upgrade" in result.stdout


def test_downgrade_one_step_and_to_base(backend: Backend) -> None:
    db_url = backend.url
    assert run("upgrade", "--url", db_url).exit_code == 0
    step = run("downgrade", "-1", "--url", db_url)
    assert step.exit_code == 0, step.output
    assert current_revision(db_url) == "0004"
    refused = run("downgrade", "base", "--url", db_url, input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output
    assert current_revision(db_url) == "0004"
    confirmed = run("downgrade", "base", "--url", db_url, input="y\n")
    assert confirmed.exit_code == 0, confirmed.output
    assert current_revision(db_url) is None


def test_downgrade_to_base_refuses_to_drop_traces(stored: tuple[str, list[TraceContext]]) -> None:
    url, traces = stored
    result = run("downgrade", "base", "--url", url, "--yes")
    assert_clean_failure(result, 1)
    assert f"{len(traces)} traces" in result.stderr
    assert current_revision(url) == head_revision()  # refused before any step ran
    dropped = run("downgrade", "base", "--url", url, "--yes", "--drop-data")
    assert dropped.exit_code == 0, dropped.output
    assert current_revision(url) is None


# -- recent / explain ---------------------------------------------------------------------------------
@pytest.mark.parametrize("session_uid", [*SESSIONS, "s-nobody"])
@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_recent_returns_what_the_oracle_says(
    stored: tuple[str, list[TraceContext]], session_uid: str, limit: int
) -> None:
    url, traces = stored
    result = run("recent", session_uid, "--url", url, "--since", "10m", "--limit", str(limit), "--json")
    assert result.exit_code == 0, result.output
    expected = oracle_query(traces, session_uid=session_uid, since=time.time() - 600, limit=limit)
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert got == [
        {
            "id": t.id,
            "context_type": t.context_type,
            "namespace": t.namespace,
            "data": t.data,
            "metadata": t.metadata,
            "session_uids": list(t.session_uids),
            "created_at": t.created_at,
            "updated_at": t.updated_at,
        }
        for t in expected
    ]
    assert f"{len(expected)} traces in " in result.stderr and " ms" in result.stderr


def test_recent_plain_lines(stored: tuple[str, list[TraceContext]]) -> None:
    url, traces = stored
    result = run("--url", url, "recent", "s-beta", "--since", "2h")
    assert result.exit_code == 0, result.output
    expected = oracle_query(traces, session_uid="s-beta", since=time.time() - 7200, limit=100)
    lines = result.stdout.splitlines()
    assert len(lines) == len(expected) > 0
    for line, trace in zip(lines, expected, strict=True):
        created, trace_id, namespace, context_type, preview = line.split("  ", 4)
        assert (trace_id, namespace, context_type) == (trace.id, trace.namespace, trace.context_type)
        assert created.startswith(time.strftime("%Y-", time.gmtime(trace.created_at)))
        assert len(preview) <= 60 and preview.startswith('{"payload":"')


def test_recent_with_an_async_url(backend: Backend, stored: tuple[str, list[TraceContext]]) -> None:
    _, traces = stored
    result = run("recent", "s-gamma", "--url", backend.async_url, "--json")
    assert result.exit_code == 0, result.output
    expected = oracle_query(traces, session_uid="s-gamma", since=time.time() - 600, limit=100)
    assert [json.loads(line)["id"] for line in result.stdout.splitlines()] == [t.id for t in expected]


def test_explain_uses_the_session_time_index(backend: Backend) -> None:
    """The planner's own text: EXPLAIN QUERY PLAN on SQLite, EXPLAIN on PostgreSQL, on a table large
    enough (and ANALYZEd) for the plan to be the one production gets: the session index, no sort."""
    assert run("upgrade", "--url", backend.url).exit_code == 0
    now = time.time()
    traces = [(f"t{i:06d}", now - 30_000 + i) for i in range(30_000)]  # one a second, the hot one every 10th
    with backend.raw() as connection:
        connection.execute(
            text("INSERT INTO traces VALUES (:id, 'span', 'web', '{}', '{}', :at, :at)"),
            [{"id": trace_id, "at": at} for trace_id, at in traces],
        )
        connection.execute(
            text("INSERT INTO trace_sessions (trace_id, session_uid, created_at) VALUES (:id, :uid, :at)"),
            [
                {"id": trace_id, "uid": "hot" if i % 10 == 0 else f"s{i % 500}", "at": at}
                for i, (trace_id, at) in enumerate(traces)
            ],
        )
    backend.analyze()
    result = run("explain", "hot", "--url", backend.url, "--since", "1h", "--limit", "50")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert SESSION_TIME_INDEX in result.stdout
    if backend.is_sqlite:
        assert "TEMP B-TREE" not in result.stdout
        assert any(line.startswith("SEARCH") for line in lines), lines
    else:  # EXPLAIN text: a Limit over a backward walk of the index, stopped after 50, no Sort node
        assert lines[0].startswith("Limit  (cost="), lines
        assert any(f"Scan Backward using {SESSION_TIME_INDEX}" in line for line in lines), lines
        assert not any("Sort" in line for line in lines), lines


@pytest.mark.parametrize("command", ["recent", "explain"])
def test_read_commands_refuse_a_legacy_database(legacy_db: tuple[str, list[TraceContext]], command: str) -> None:
    url, _ = legacy_db
    result = run(command, "s-alpha", "--url", url)
    assert_clean_failure(result, 1)
    assert "tracestore upgrade" in result.stderr
    assert current_revision(url) is None  # never upgraded behind the user's back


@pytest.mark.parametrize("command", ["recent", "explain", "current"])
def test_read_commands_do_not_create_a_missing_file(tmp_path: Path, command: str) -> None:
    path = tmp_path / "missing.db"
    args = [command, "--url", f"sqlite:///{path}"] + (["s-alpha"] if command != "current" else [])
    result = run(*args)
    assert_clean_failure(result, 1)
    assert "no database at" in result.stderr
    assert not path.exists()


@pytest.mark.parametrize("command", ["recent", "explain", "current", "upgrade"])
def test_a_missing_postgresql_database_is_a_clean_error(pg_url: URL, command: str) -> None:
    """PostgreSQL's missing file: the server names the database; nothing creates it; no password shown."""
    missing = missing_database(pg_url)
    url = missing.render_as_string(hide_password=False)
    result = run(command, "--url", url, *(["s-alpha"] if command in ("recent", "explain") else []))
    assert_clean_failure(result, 1)
    assert f'database "{missing.database}" does not exist' in result.stderr
    assert "s3cret" not in result.output
    server = Backend("postgresql", pg_url)
    try:
        assert server.rows("SELECT datname FROM pg_database WHERE datname = :name", {"name": missing.database}) == []
    finally:
        server.dispose()


def test_invalid_query_arguments_exit_2(stored: tuple[str, list[TraceContext]]) -> None:
    url, _ = stored
    result = run("recent", "", "--url", url)
    assert_clean_failure(result, 2)
    assert "session_uid" in result.stderr


def test_not_a_database_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database" * 100)
    result = run("recent", "s-alpha", "--url", f"sqlite:///{path}")
    assert_clean_failure(result, 1)


@pytest.mark.parametrize("kind", ["directory", "text file"])
def test_a_directory_or_a_file_of_another_kind_is_named_with_what_is_wrong(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x"
    if kind == "directory":
        path.mkdir()
        wrong = f"{path} is a directory, not a SQLite database file"
    else:
        path = tmp_path / "notes.txt"
        path.write_text("my notes\n")
        wrong = f"{path} is not a SQLite database (its header is not 'SQLite format 3')"
    for args in (["current"], ["upgrade"], ["recent", "s"], ["verify"], ["prune", "--older-than", "1d"]):
        result = run("--url", f"sqlite:///{path}", *args)
        assert_clean_failure(result, 1)
        (line,) = result.stderr.splitlines()
        assert line == f"Error: {wrong}", (args, line)
    forced = run("--url", f"sqlite:///{path}", "demo", "--force", "--traces", "10")
    assert_clean_failure(forced, 1)
    assert wrong in forced.stderr and path.exists()  # --force replaces a database, never this
    if kind == "text file":
        assert path.read_text() == "my notes\n"


@pytest.mark.parametrize("given", ["traces.db", "data/traces.db"])
def test_a_file_path_given_as_the_url_suggests_the_sqlite_url(given: str) -> None:
    result = run("--url", given, "current")
    assert_clean_failure(result, 2)
    assert f"use sqlite:///{given}" in result.stderr and "'--url'" in result.stderr


def test_an_unreachable_postgresql_server_is_a_clean_error(tmp_path: Path) -> None:
    """No server behind the socket: one line naming what failed, exit 1, the password hidden."""
    url = f"postgresql+psycopg://tracer:s3cret@/traces?host={tmp_path}&port=1"
    for args in (["current"], ["upgrade"], ["recent", "s-alpha"], ["verify"]):
        result = run(*args, "--url", url)
        assert_clean_failure(result, 1)
        assert "connection" in result.stderr and str(tmp_path) in result.stderr
        assert "s3cret" not in result.output


def test_a_malformed_url_is_a_usage_error() -> None:
    result = run("current", "--url", "not a url")
    assert_clean_failure(result, 2)
    assert "--url" in result.stderr


def test_an_unknown_driver_is_a_usage_error_that_hides_the_password() -> None:
    result = run("current", "--url", "postgresql+nosuchdriver://tracer:s3cret@db.example/traces")
    assert_clean_failure(result, 2)
    assert "--url" in result.stderr and "no such database driver" in result.stderr
    assert "s3cret" not in result.output and "tracer:***@db.example" in result.stderr


# -- demo -------------------------------------------------------------------------------------------
def test_demo_builds_a_database_and_times_the_query(backend: Backend) -> None:
    url = backend.url
    result = run("--url", url, "demo", "--traces", "500", "--sessions", "4")
    assert result.exit_code == 0, result.output
    assert "Stored 500 traces in 4 sessions" in result.stdout
    assert "5 rows, median" in result.stdout  # 1% of the traces are the hot session's recent ones
    if backend.is_sqlite:
        assert f"Created {backend.path} at revision" in result.stdout
        assert "EXPLAIN QUERY PLAN:" in result.stdout
        assert "idx_trace_sessions_uid_time" in result.stdout
        assert "TEMP B-TREE" not in result.stdout
    else:  # 500 rows are too few for a telling plan on PostgreSQL; it is EXPLAIN's text
        assert "Created the trace tables in postgresql+psycopg://" in result.stdout
        plan = result.stdout.split("EXPLAIN:\n", 1)[1].splitlines()
        assert plan[0].startswith("  ") and "(cost=" in plan[0] and "QUERY PLAN" not in result.stdout
        assert any("on trace_sessions" in line for line in plan), plan
    assert f"Try: tracestore --url {url} recent demo-session-0000" in result.stdout
    assert current_revision(url) == head_revision()
    assert backend.rows("SELECT count(*) FROM traces") == [(500,)]
    recent = run("--url", url, "recent", "demo-session-0000")
    assert recent.exit_code == 0 and len(recent.stdout.splitlines()) == 5

    again = run("--url", url, "demo", "--traces", "50")
    assert_clean_failure(again, 1)
    assert "--force" in again.stderr
    assert backend.rows("SELECT count(*) FROM traces") == [(500,)]
    forced = run("--url", url, "demo", "--traces", "50", "--force")
    assert forced.exit_code == 0, forced.output
    assert "1 rows, median" in forced.stdout
    assert backend.rows("SELECT count(*) FROM traces") == [(50,)]


def test_demo_refuses_an_in_memory_database() -> None:
    result = run("--url", "sqlite://", "demo", "--traces", "10")
    assert_clean_failure(result, 2)


def test_demo_leaves_a_legacy_postgresql_database_alone(pg_url: URL) -> None:
    """A PostgreSQL database with traces but no tracestore revision is not the demo's to drop, even with --force."""
    backend = Backend("postgresql", pg_url)
    try:
        backend.create_legacy([("t1", "a", "b", 1, {}, 10.0, 10.0, ("s",))])
        before = backend.dump()
        for force in ([], ["--force"]):
            result = run("--url", backend.url, "demo", "--traces", "10", *force)
            assert_clean_failure(result, 1)
        assert "legacy traces table" in result.stderr
        assert backend.dump() == before
    finally:
        backend.dispose()


# -- the installed console script ---------------------------------------------------------------------
@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="tracestore console script not installed")
def test_console_script(tmp_path: Path, legacy_db: tuple[str, list[TraceContext]]) -> None:
    url, _ = legacy_db

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)

    assert script("--help").returncode == 0
    refused = script("recent", "s-alpha", "--url", url)
    assert refused.returncode == 1
    assert "tracestore upgrade" in refused.stderr and "Traceback" not in refused.stderr
    upgraded = script("--url", url, "upgrade", "--batch-size", "10")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "2 orphan links (no trace yet) kept" in upgraded.stdout
    finalized = script("finalize", "--url", url)
    assert finalized.returncode == 0, finalized.stderr
    assert "removed 2 orphan links whose trace never came" in finalized.stdout
    current = script("current", "--url", url)
    assert current.returncode == 0 and "up to date" in current.stdout
    recent = script("recent", "s-alpha", "--url", url)
    assert recent.returncode == 0 and recent.stdout.strip()
    assert " traces in " in recent.stderr


def triggers(backend: Backend) -> set[str]:
    sql = (
        "SELECT name FROM sqlite_master WHERE type = 'trigger'"
        if backend.is_sqlite
        else "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal"
    )
    return {name for (name,) in backend.rows(sql)}


def test_finalize_ends_the_rolling_deploy(backend: Backend) -> None:
    """finalize drops the two stamp triggers (not the one the store needs); verify stays green and says so;
    a previous-release insert after that is caught by verify and repaired without bringing them back."""
    url = backend.url
    with TraceStore(url) as store:
        store.store(make_trace(id="t1", created_at=100.0, session_uids=["s"]))
    before = run("verify", "--url", url)
    assert before.exit_code == 0 and "rolling-deploy triggers present" in before.stdout

    result = run("finalize", "--url", url)
    assert result.exit_code == 0, result.output
    assert "dropped trace_sessions_stamp_created_at, traces_stamp_links_created_at" in result.stdout
    assert triggers(backend) == {"trace_sessions_follow_created_at"}
    if not backend.is_sqlite:  # the functions behind the dropped triggers went with them
        functions = backend.rows("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")
        assert functions == [("trace_sessions_follow_created_at",)]
    assert "already finalized" in run("finalize", "--url", url).stdout
    after = run("verify", "--url", url)
    assert after.exit_code == 0 and "finalized: no rolling-deploy triggers" in after.stdout

    with backend.raw() as old_release:  # a straggler of the previous release
        old_release.exec_driver_sql("INSERT INTO traces VALUES ('t2', 'a', 'b', '1', '{}', 200.0, 200.0)")
        old_release.exec_driver_sql("INSERT INTO trace_sessions (trace_id, session_uid) VALUES ('t2', 's')")
    assert backend.links("t2") == [("s", None)]
    stale = run("verify", "--url", url)
    assert stale.exit_code == 1 and "1 links whose created_at is not their trace's" in stale.stdout
    assert run("verify", "--fix", "--url", url).exit_code == 0
    assert backend.links("t2") == [("s", 200.0)]
    assert triggers(backend) == {"trace_sessions_follow_created_at"}


def test_finalize_is_refused_below_head(backend: Backend) -> None:
    backend.create_legacy([("t1", "a", "b", 1, {}, 10.0, 10.0, ("s",))])
    upgrade(backend.url, "0003")
    before = triggers(backend)
    result = run("finalize", "--url", backend.url)
    assert_clean_failure(result, 1)
    assert "finalize after `tracestore upgrade` has reached head" in result.output
    assert triggers(backend) == before and len(before) == 3


def test_generate_writes_a_head_file_the_store_uses(tmp_path: Path) -> None:
    path = tmp_path / "gen.db"
    result = run("generate", str(path), "--traces", "3k", "--recent-burst", "50", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "Wrote 3,000 traces" in result.stdout and "schema head" in result.stdout
    with TraceStore(f"sqlite:///{path}", auto_upgrade=False) as store:
        assert len(store.get_by_session_uid("hot", since=time.time() - 600)) == 50
    assert run("--url", f"sqlite:///{path}", "verify").exit_code == 0


def test_generate_refuses_and_leaves_the_old_file_alone(tmp_path: Path) -> None:
    path = tmp_path / "gen.db"
    assert run("generate", str(path), "--traces", "1k", "--schema", "legacy").exit_code == 0
    before = path.read_bytes()
    assert run("generate", str(path), "--traces", "1k").exit_code != 0  # exists, no --force
    refused = run("generate", str(path), "--traces", "1k", "--orphans", "2", "--force")  # orphans need legacy
    assert refused.exit_code != 0 and "orphan links exist only in legacy files" in refused.output
    assert run("generate", str(path), "--traces", "ten").exit_code != 0
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.db"]
    assert run("generate", str(path), "--traces", "1k", "--force").exit_code == 0
    assert path.read_bytes() != before


def test_a_password_in_the_url_is_never_printed(pg_url: URL) -> None:
    """Every command that echoes the URL (messages, hints, `Try:` lines) masks the password as ***.
    The test server trusts its clients, so a password in the URL is accepted and ignored."""
    url = pg_url.set(password="s3cret").render_as_string(hide_password=False)
    backend = Backend("postgresql", pg_url)
    try:
        backend.create_legacy([("t1", "a", "b", 1, {}, 10.0, 10.0, ("s",))])
        results = [
            run("current", "--url", url),  # below head: names the upgrade command to run
            run("recent", "s", "--url", url),  # refused: names the upgrade command
            run("verify", "--url", url),  # the schema check's hint
            run("upgrade", "--url", url, "--revision", "0003"),
            run("upgrade", "--url", url),
            run("upgrade", "--url", url),  # already at head
            run("finalize", "--url", url),
            run("downgrade", "0003", "--url", url),
            run("demo", "--url", url, "--traces", "20", "--force"),
        ]
    finally:
        backend.dispose()
    assert [result.exit_code for result in results] == [1, 1, 1, 0, 0, 0, 0, 0, 0], [r.output for r in results]
    for result in results:
        assert "s3cret" not in result.output, result.output
    assert all(":***@" in result.output for result in results), [r.output for r in results]
