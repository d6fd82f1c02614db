"""Query plans of the hot session query on an analyzed database, and how the statements are built."""

from __future__ import annotations

import ast
import itertools
import random
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import make_url
from sqlalchemy.dialects import postgresql, sqlite

import tracestore.queries
from tests.backends import Backend
from tests.oracle import make_trace
from tracestore import TraceContext, TraceStore
from tracestore.queries import (
    LINK_COLUMNS,
    TRACE_COLUMNS,
    DriverSQL,
    Shape,
    compiled,
    explain_statement,
    query_statement,
    statements_for,
)
from tracestore.types import Query

T0 = 1_700_000_000.0
N_TRACES = 20_000
INDEX = "idx_trace_sessions_uid_time"


def analyze(path: Path) -> None:
    """Statistics as the migration gathers them (bounded ANALYZE)."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA analysis_limit=1000")
        connection.execute("ANALYZE")
    finally:
        connection.close()


def realistic_traces() -> list[TraceContext]:
    """One hot session (40% of traces), 300 other sessions, skewed namespaces and types, tied timestamps."""
    rng = random.Random(11)
    namespaces = ["web"] * 60 + ["worker"] * 25 + ["cron"] * 10 + ["batch"] * 4 + ["rare"]
    types = ["span"] * 70 + ["log"] * 20 + ["event"] * 9 + ["error"]
    traces = []
    for index in range(N_TRACES):
        if index % 5 == 0:
            sessions = ["hot"]
        elif index % 5 == 1:
            sessions = ["hot", f"s{rng.randrange(300)}"]
        else:
            sessions = [f"s{rng.randrange(300)}"]
        traces.append(
            make_trace(
                context_type=rng.choice(types),
                namespace=rng.choice(namespaces),
                data={"index": index, "text": "x" * rng.randrange(200)},
                session_uids=sessions,
                created_at=T0 + index // 10,  # ten traces per timestamp: ties on every step
            )
        )
    return traces


@pytest.fixture(scope="module")
def planner_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TraceStore, Path]]:
    path = tmp_path_factory.mktemp("planner") / "traces.db"
    with TraceStore(f"sqlite:///{path}") as store:
        traces = realistic_traces()
        for start in range(0, len(traces), 5000):
            store.store_batch(traces[start : start + 5000])
        analyze(path)
        # Pooled connections planned before ANALYZE; start fresh so every plan sees the statistics.
        store.engine.dispose()
        yield store, path


MID = T0 + N_TRACES // 20
FLAG_COMBINATIONS = list(itertools.product([False, True], repeat=5))


def filters_for(
    since: bool, until: bool, limit: bool, namespace: bool, context_type: bool, *, rare: bool
) -> dict[str, Any]:
    args: dict[str, Any] = {}
    if since:
        args["since"] = MID
    if until:
        args["until"] = MID + 400
    if limit:
        args["limit"] = 50
    if namespace:
        args["namespace"] = "rare" if rare else "web"
    if context_type:
        args["context_type"] = "error" if rare else "span"
    return args


def flag_id(flags: tuple[bool, ...]) -> str:
    names = ("since", "until", "limit", "namespace", "context_type")
    return "+".join(name for name, on in zip(names, flags, strict=True) if on) or "plain"


@pytest.mark.parametrize("rare", [False, True], ids=["common-filters", "rare-filters"])
@pytest.mark.parametrize("session_uid", ["hot", "s7"])
@pytest.mark.parametrize("flags", FLAG_COMBINATIONS, ids=[flag_id(f) for f in FLAG_COMBINATIONS])
def test_session_query_walks_the_composite_index(
    planner_db: tuple[TraceStore, Path], flags: tuple[bool, ...], session_uid: str, rare: bool
) -> None:
    store, _ = planner_db
    plan = store.explain(session_uid, **filters_for(*flags, rare=rare))
    assert any("SEARCH" in line and INDEX in line for line in plan), plan
    assert not any("TEMP B-TREE" in line for line in plan), plan
    assert not any(line.lstrip().startswith("SCAN") for line in plan), plan


def test_answers_on_the_planner_database_match_the_oracle(planner_db: tuple[TraceStore, Path]) -> None:
    store, path = planner_db
    raw = Backend("sqlite", make_url(f"sqlite:///{path}"), path)
    for flags in [(True, False, True, False, False), (True, True, True, True, True), (False,) * 5]:
        args = filters_for(*flags, rare=False)
        for session_uid in ("hot", "s7"):
            assert store.query(session_uid=session_uid, **args) == raw.sql_oracle_query(session_uid=session_uid, **args)


# -- why trace_id belongs in the index --------------------------------------------------------------------
@pytest.fixture(scope="module")
def index_without_trace_id(planner_db: tuple[TraceStore, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, good = planner_db
    path = tmp_path_factory.mktemp("no-trace-id") / "traces.db"
    source, target = sqlite3.connect(good), sqlite3.connect(path)
    try:
        source.backup(target)
        target.execute(f"DROP INDEX {INDEX}")
        target.execute(f"CREATE INDEX {INDEX} ON trace_sessions (session_uid, created_at) WHERE created_at IS NOT NULL")
        target.commit()
    finally:
        source.close()
        target.close()
    analyze(path)
    return path


def raw_plan(path: Path, **args: Any) -> list[str]:
    stmt, params = query_statement(statements_for("sqlite"), Query(session_uid="hot", **args))
    sql, driver_params = explain_statement(stmt, params, sqlite.dialect())
    connection = sqlite3.connect(path)
    try:
        return [str(row[-1]) for row in connection.execute(sql, driver_params)]
    finally:
        connection.close()


@pytest.mark.parametrize(
    "args", [{}, {"since": MID}, {"limit": 50}, {"since": MID, "limit": 50}, {"since": MID, "until": MID + 9}]
)
def test_without_trace_id_in_the_index_sqlite_sorts(
    planner_db: tuple[TraceStore, Path], index_without_trace_id: Path, args: dict[str, Any]
) -> None:
    _, good = planner_db
    assert "USE TEMP B-TREE FOR RIGHT PART OF ORDER BY" in raw_plan(index_without_trace_id, **args)
    # The same statement on the real index: no sort at all.
    assert not any("TEMP B-TREE" in line for line in raw_plan(good, **args))


# -- statements ----------------------------------------------------------------------------------------------
def test_statements_are_built_once() -> None:
    statements = statements_for("sqlite")
    assert statements_for("sqlite") is statements
    shapes = set()
    for flags in FLAG_COMBINATIONS:
        shape = Shape(*flags)
        session = statements.session_traces(shape)
        assert statements.session_traces(Shape(*flags)) is session
        everything = statements.all_traces(shape)
        assert statements.all_traces(Shape(*flags)) is everything
        shapes.update({id(session), id(everything)})
    assert len(shapes) == 2 * len(FLAG_COMBINATIONS)
    for name in ("insert_trace", "upsert_trace", "insert_link", "delete_trace", "get_trace"):
        assert getattr(statements, name) is getattr(statements, name)


DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect()}


@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_values_are_bound_never_inlined(dialect_name: str) -> None:
    # Same shape, different values: the very same statement object, values only in the parameters.
    statements = statements_for(dialect_name)
    namespace = "n'; DROP TABLE traces; --"
    first, first_params = query_statement(statements, Query(session_uid="a", since=1.0, limit=5, namespace=namespace))
    second, second_params = query_statement(statements, Query(session_uid="b", since=2.0, limit=9, namespace=namespace))
    assert first is second
    assert first_params != second_params
    sql = str(first.compile(dialect=DIALECTS[dialect_name]))
    for value in ("DROP TABLE", "'a'", "1.0"):
        assert value not in sql


@pytest.mark.parametrize("dialect_name", DIALECTS)
def test_session_statement_filters_and_sorts_on_the_junction(dialect_name: str) -> None:
    stmt = statements_for(dialect_name).session_traces(Shape(since=True, until=True, limit=True))
    sql = " ".join(str(stmt.compile(dialect=DIALECTS[dialect_name])).split())
    assert "ORDER BY ts.created_at DESC, ts.trace_id DESC" in sql
    marker = "?" if dialect_name == "sqlite" else "%(since)s"
    assert f"ts.created_at >= {marker}" in sql and "ts.created_at < " in sql
    assert "traces.created_at >=" not in sql


def test_unsupported_dialect_is_refused() -> None:
    with pytest.raises(NotImplementedError):
        statements_for("oracle")


def test_query_module_imports_no_io() -> None:
    tree = ast.parse(Path(tracestore.queries.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    forbidden = {"sqlite3", "aiosqlite", "asyncpg", "psycopg", "socket", "os", "io", "pathlib"}
    forbidden |= {f"tracestore.{name}" for name in ("engine", "store", "async_store", "migrate", "rows")}
    assert not imported & forbidden, imported
    called = {
        node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }
    assert not called & {"execute", "exec_driver_sql", "connect", "begin", "scalar", "scalars"}, called


NO_IO_SCRIPT = """
import builtins, socket, sqlite3
import sqlalchemy, sqlalchemy.engine.create
from sqlalchemy import make_url
from sqlalchemy.dialects import postgresql, sqlite
from tracestore import queries

def refuse(*args, **kwargs):
    raise AssertionError("I/O while building statements")

sqlite3.connect = refuse
socket.socket = refuse
builtins.open = refuse
sqlalchemy.create_engine = sqlalchemy.engine.create.create_engine = refuse

import itertools
count = 0
for dialect_name, dialect in (("sqlite", sqlite.dialect()), ("postgresql", postgresql.dialect())):
    statements = queries.statements_for(dialect_name)
    built = [getattr(statements, name) for name in
             ("insert_trace", "upsert_trace", "insert_link", "delete_trace", "get_trace")]
    for flags in itertools.product([False, True], repeat=5):
        shape = queries.Shape(*flags)
        built += [statements.session_traces(shape), statements.all_traces(shape)]
    for stmt in built:
        str(stmt.compile(dialect=dialect))
        count += 1
print(count)
"""


def test_building_statements_needs_no_engine() -> None:
    # A fresh interpreter, so nothing is cached: every statement is built and compiled with I/O refused.
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(NO_IO_SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(2 * (5 + 2 * len(FLAG_COMBINATIONS)))


def test_write_rows_go_to_the_driver_as_built() -> None:
    row = ("id1", "span", "web", "{}", "{}", 1.0, 2.0)
    lite = compiled(statements_for("sqlite").insert_trace, sqlite.dialect())
    assert lite.names == TRACE_COLUMNS  # positional: the store's tuples are already the driver's arguments
    rows = [row]
    assert lite.args_many(TRACE_COLUMNS, rows) is rows
    link = compiled(statements_for("sqlite").insert_link, sqlite.dialect())
    assert link.names == LINK_COLUMNS
    # A named paramstyle, or another order, gets the values by name.
    pg = compiled(statements_for("postgresql").insert_trace, postgresql.dialect())
    assert pg.args_many(TRACE_COLUMNS, rows) == [dict(zip(TRACE_COLUMNS, row, strict=True))]
    reordered = DriverSQL(lite.sql, tuple(reversed(TRACE_COLUMNS)), {})
    assert reordered.args_many(TRACE_COLUMNS, rows) == [tuple(reversed(row))]
