"""Bad input wherever it enters (library calls, URLs, files, the disk, CLI arguments and environment): a clear
error from the library's hierarchy, nothing written, the store still working; and no SQL is ever built from a
user's value.

What tests/test_types.py, test_store.py and test_cli.py already cover (field types, NaN/inf, lone surrogates in
fields, bad URLs, junk files) is not repeated here: this file fills the gaps between them.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sqlite3
import string
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy
from click.testing import CliRunner

from tests.backends import Backend
from tests.filesystems import tmpfs
from tests.oracle import make_trace as make
from tests.oracle import oracle_query
from tracestore import (
    AsyncTraceStore,
    InvalidQueryError,
    InvalidTraceError,
    PageCursor,
    StorageError,
    TraceContext,
    TraceStore,
    TraceStoreError,
)
from tracestore.cli import main

T0 = 1_700_000_000.0
TRACESTORE = Path(sys.executable).parent / "tracestore"


# -- what "nothing changed" means on each engine -------------------------------------------------------------
def snapshot(backend: Backend, store: TraceStore | None = None) -> Any:
    """SQLite: the bytes of the file and its WAL, plus a dump. PostgreSQL: a dump of every row and the schema.

    The store's checkpointer thread copies committed pages into the file after a write: wait for it first.
    """
    if store is not None and store._checkpointer is not None:
        store._checkpointer.idle()
    if backend.is_sqlite:
        assert backend.path is not None
        wal = Path(f"{backend.path}-wal")
        return backend.path.read_bytes(), wal.read_bytes() if wal.exists() else None, backend.dump()
    return backend.dump()


def still_works(store: TraceStore) -> None:
    trace = make(session_uids=["after"], created_at=T0 + 99)
    store.store(trace)
    assert store.get(trace.id) == trace
    assert store.get_by_session_uid("after") == [trace]


@pytest.fixture
def kept(store: TraceStore, backend: Backend) -> list[TraceContext]:
    traces = [make(id="one", session_uids=["a"], created_at=T0), make(id="two", session_uids=["a", "b"], created_at=T0)]
    store.store_batch(traces)
    return traces


# -- library calls: wrong types and values not covered elsewhere ------------------------------------------------
BAD_CALLS: list[tuple[str, Callable[[Any], Any], type[TraceStoreError], str]] = [  # Any: wrong types on purpose
    ("batch-int", lambda s: s.store_batch(5), InvalidTraceError, "iterable of TraceContext"),
    ("batch-none", lambda s: s.store_batch(None), InvalidTraceError, "iterable of TraceContext"),
    ("batch-one-trace", lambda s: s.store_batch(make()), InvalidTraceError, "iterable of TraceContext"),
    ("batch-bytes-items", lambda s: s.store_batch(b"ab"), InvalidTraceError, "expected a TraceContext"),
    ("metadata-bytes-key", lambda s: s.store(make(metadata={b"k": 1})), InvalidTraceError, "metadata"),
    ("metadata-surrogate-key", lambda s: s.store(make(metadata={"\udcff": 1})), InvalidTraceError, "metadata"),
    ("data-bytearray", lambda s: s.store(make(data=bytearray(b"\xff"))), InvalidTraceError, "data"),
    (
        "data-surrogate-escape",
        lambda s: s.store(make(data={"k": b"\xff".decode("utf-8", "surrogateescape")})),
        InvalidTraceError,
        "data",
    ),
    ("query-bytes", lambda s: s.query(session_uid=b"a"), InvalidQueryError, "session_uid"),
    ("query-namespace-surrogate", lambda s: s.query(namespace="w\udcffb"), InvalidQueryError, "namespace"),
    ("get-bytes", lambda s: s.get(b"one"), InvalidQueryError, "trace_id"),
    ("delete-bytes", lambda s: s.delete(b"one"), InvalidQueryError, "trace_id"),
    ("delete-surrogate", lambda s: s.delete("\udcff"), InvalidQueryError, "trace_id"),
    ("page-bytes", lambda s: s.page_by_session_uid(b"a"), InvalidQueryError, "session_uid"),
    (
        "page-cursor-surrogate",
        lambda s: s.page_by_session_uid("a", cursor=PageCursor(T0, "\ud800")),
        InvalidQueryError,
        "not a page cursor",
    ),
    (
        "page-cursor-int-overflow",
        lambda s: s.page_by_session_uid("a", cursor=PageCursor(10**400, "one")),
        InvalidQueryError,
        "not a page cursor",
    ),
    (
        "page-cursor-nan",
        lambda s: s.page_by_session_uid("a", cursor=PageCursor(math.nan, "one")),
        InvalidQueryError,
        "not a page cursor",
    ),
    ("page-since-inf", lambda s: s.page_by_session_uid("a", since=math.inf), InvalidQueryError, "since"),
    ("iter-page-size-zero", lambda s: list(s.iter_session("a", page_size=0)), InvalidQueryError, "limit"),
    ("sessions-bytes", lambda s: s.get_by_session_uids([b"a"]), InvalidQueryError, "session_uid"),
    ("sessions-surrogate", lambda s: s.get_by_session_uids(["a", "\udcff"]), InvalidQueryError, "session_uid"),
    ("sessions-since-nan", lambda s: s.get_by_session_uids(["a"], since=math.nan), InvalidQueryError, "since"),
    ("sessions-limit-float", lambda s: s.get_by_session_uids(["a"], limit=2.0), InvalidQueryError, "limit"),
    ("explain-bytes", lambda s: s.explain(b"a"), InvalidQueryError, "session_uid"),
]


def test_bad_call_is_a_library_error_naming_it_and_writes_nothing(
    store: TraceStore, backend: Backend, kept: list[TraceContext]
) -> None:
    # Every bad call against one database (a fresh one per call cost 13 s of the suite): each leaves the file
    # (SQLite: its bytes) exactly as it was, and the store answering.
    for name, call, error, named in BAD_CALLS:
        before = snapshot(backend, store)
        try:
            with pytest.raises(error, match=named):
                call(store)
        except (pytest.fail.Exception, Exception) as failed:
            raise AssertionError(f"{name}: {failed!r}") from failed
        assert snapshot(backend, store) == before, name
        assert store.query() == oracle_query(kept), name
    still_works(store)


@pytest.mark.parametrize("given", [None, b"sqlite:///traces.db", 5, sqlalchemy.make_url("sqlite:///traces.db")])
def test_a_store_needs_a_url_or_an_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: Any) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StorageError, match="URL"):
        TraceStore(given)
    with pytest.raises(StorageError, match="URL"):
        AsyncTraceStore(given)
    assert os.listdir(tmp_path) == []


def test_a_nul_in_a_url_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="NUL"):
        TraceStore(f"sqlite:///{tmp_path}/a\x00b.db")
    assert os.listdir(tmp_path) == []


def test_nul_in_query_arguments(store: TraceStore, backend: Backend) -> None:
    """SQLite stores NUL and finds it again; PostgreSQL text cannot hold it, so asking for one is bad input
    (InvalidQueryError naming NUL) instead of a driver error dressed as a StorageError."""
    calls: list[Callable[[], Any]] = [
        lambda: store.get("a\x00b"),
        lambda: store.delete("a\x00b"),
        lambda: store.query(session_uid="s\x00"),
        lambda: store.query(namespace="n\x00"),
        lambda: store.query(context_type="\x00"),
        lambda: store.get_by_session_uid("s\x00"),
        lambda: store.get_by_session_uids(["ok", "s\x00"]),
        lambda: store.page_by_session_uid("s\x00"),
        lambda: store.page_by_session_uid("s", cursor=PageCursor(T0, "a\x00b")),
        lambda: store.explain("s\x00"),
    ]
    if backend.is_sqlite:
        trace = make(id="a\x00b", namespace="n\x00", session_uids=["s\x00"], created_at=T0)
        store.store(trace)
        assert store.get("a\x00b") == trace
        assert store.query(namespace="n\x00") == store.get_by_session_uids(["ok", "s\x00"]) == [trace]
        assert store.delete("a\x00b") is True
        return
    store.store(make(id="keep", session_uids=["s"]))
    before = snapshot(backend, store)
    for call in calls:
        with pytest.raises(InvalidQueryError, match="NUL"):
            call()
    assert snapshot(backend, store) == before


# -- timestamps far in the past and the future -------------------------------------------------------------
END_OF_9999 = math.nextafter(253402300800.0, 0)  # the last instant before 10000-01-01, the first one refused
EXTREME_TIMES = [
    -1.7976931348623157e308,
    -1e300,
    -62135596800.0,  # 0001-01-01
    -0.0,
    5e-324,
    T0,
    END_OF_9999,
]


def test_extreme_timestamps_round_trip_sort_and_page(store: TraceStore, backend: Backend) -> None:
    # No id given: the generated id takes its time from created_at, up to the largest float.
    traces = [
        TraceContext("span", "web", {"i": i}, session_uids=("s",), created_at=t, updated_at=EXTREME_TIMES[-1 - i])
        for i, t in enumerate(EXTREME_TIMES)
    ]
    store.store_batch(traces)
    for trace in traces:
        assert store.get(trace.id) == trace
    assert store.get_by_session_uid("s") == oracle_query(traces, session_uid="s")
    for since, until in [(-math.inf, None), (-1e300, END_OF_9999), (0.0, None), (None, -0.0), (END_OF_9999, None)]:
        since = None if since == -math.inf else since
        assert store.query(since=since, until=until) == oracle_query(traces, since=since, until=until)
    assert [t.id for t in store.iter_session("s", page_size=2)] == [t.id for t in oracle_query(traces)]
    assert backend.junction_drift() == []


def test_a_time_in_milliseconds_is_refused_and_nothing_is_written(store: TraceStore, backend: Backend) -> None:
    """A created_at in milliseconds would top its session for ever (prune refuses future cutoffs)."""
    store.store(make(id="keep", session_uids=["s"], created_at=T0))
    before = snapshot(backend, store)
    with pytest.raises(InvalidTraceError, match="past the year 9999: it looks like milliseconds: divide by 1000"):
        make(session_uids=["s"], created_at=T0 * 1000)
    for field_name in ("created_at", "updated_at"):
        bad = make(session_uids=["s"], created_at=T0 + 1)
        setattr(bad, field_name, T0 * 1000)  # fields are mutable: store() checks them again
        with pytest.raises(InvalidTraceError, match="past the year 9999: it looks like milliseconds: divide by 1000"):
            store.store_batch([make(session_uids=["s"], created_at=T0 + 2), bad])
    assert snapshot(backend, store) == before
    assert [t.id for t in store.get_by_session_uid("s")] == ["keep"]


# -- huge values ------------------------------------------------------------------------------------------------
def test_huge_identifiers(store: TraceStore, backend: Backend) -> None:
    """A 100,000-character id, session and namespace: SQLite stores them; PostgreSQL's b-tree indexes cannot hold
    an id or a session that long, so such a batch is refused whole, naming the index row size, and nothing is
    written. No index holds the namespace and type (since revision 0005): those are stored on both."""
    rng = random.Random(6)
    huge = "".join(rng.choices(string.ascii_letters + string.digits, k=100_000))  # incompressible: no TOAST rescue
    store.store(make(id="keep", session_uids=["s"], created_at=T0))
    cases = [
        [make(id=huge, session_uids=["s"], created_at=T0 + 1)],
        [make(id="x1", session_uids=[huge], created_at=T0 + 2)],
    ]
    unindexed = make(id="x2", namespace=huge, context_type=huge, session_uids=["s"], created_at=T0 + 3)
    store.store(unindexed)
    assert store.get("x2") == unindexed
    if backend.is_sqlite:
        for batch in cases:
            store.store_batch(batch)
            assert store.get(batch[0].id) == batch[0]
        assert [t.id for t in store.get_by_session_uid(huge)] == ["x1"]
        return
    before = snapshot(backend, store)
    for batch in cases:
        with pytest.raises(StorageError, match="index row"):
            store.store_batch([make(id="fine", session_uids=["s"]), *batch])
    assert snapshot(backend, store) == before
    assert store.get(huge) is None and store.query(session_uid=huge) == []
    still_works(store)


def test_a_payload_past_sqlite_length_limit_is_refused_whole(db_path: Path, backend: Backend) -> None:
    """SQLITE_LIMIT_LENGTH (1 GB by default, lowered here to 100 kB) caps one value: the batch holding such a
    payload is a StorageError naming it, the database is byte-identical, and the store keeps working."""
    engine = sqlalchemy.create_engine(f"sqlite:///{db_path}")

    @sqlalchemy.event.listens_for(engine, "connect")
    def lower_the_limit(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 100_000)

    with TraceStore(engine) as store:
        store.store(make(id="keep", session_uids=["s"], created_at=T0))
        before = snapshot(backend, store)
        batch = [make(id="small", session_uids=["s"]), make(id="big", data="x" * 200_000, session_uids=["s"])]
        with pytest.raises(StorageError, match="too big"):
            store.store_batch(batch)
        assert snapshot(backend, store) == before
        assert store.get("small") is None
        still_works(store)
    engine.dispose()


# -- files that are not tracestore's -------------------------------------------------------------------------
def test_another_applications_sqlite_file_is_refused_and_its_rows_are_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("CREATE TABLE traces (x INTEGER, label TEXT)")
        connection.execute("INSERT INTO traces VALUES (1, 'theirs')")
        connection.commit()
        before = list(connection.iterdump())
    with pytest.raises(TraceStoreError, match="created_at"):
        TraceStore(f"sqlite:///{path}")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        assert list(connection.iterdump()) == before
        assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_directory_is_not_a_database(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="is a directory, not a SQLite database file"):
        TraceStore(f"sqlite:///{tmp_path}")
    assert os.listdir(tmp_path) == []


# -- the disk: read-only, full ---------------------------------------------------------------------------------
def integrity(path: Path) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        return connection.execute("PRAGMA integrity_check").fetchall()


def test_a_read_only_file_system_refuses_writes_and_changes_nothing(tmp_path: Path) -> None:
    """Root ignores file modes, so root gets a read-only mount; anyone else a read-only file and directory."""
    root = os.geteuid() == 0
    with tmpfs(tmp_path / "fs", "8m") if root else contextlib.nullcontext(tmp_path) as where:
        path = where / "traces.db"
        url = f"sqlite:///{path}"
        traces = [make(session_uids=["s"], created_at=T0 + i) for i in range(5)]
        with TraceStore(url) as store:
            store.store_batch(traces)
        if root:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        else:
            path.chmod(0o444)
            where.chmod(0o555)
        files = {name: (where / name).read_bytes() for name in os.listdir(where) if (where / name).is_file()}
        try:
            try:
                store = TraceStore(url)
            except StorageError as exc:  # refused on open: fine, as long as it says why
                assert "read" in str(exc) or "open" in str(exc), exc
            else:
                with store:
                    with pytest.raises(StorageError, match=r"readonly|read-only"):
                        store.store_batch([make(session_uids=["s"])])
                    assert store.get_by_session_uid("s") == oracle_query(traces, session_uid="s")
            assert {n: (where / n).read_bytes() for n in os.listdir(where) if (where / n).is_file()} == files
        finally:
            if root:
                subprocess.run(["mount", "-o", "remount,rw", str(where)], check=True)
            else:
                where.chmod(0o755)
                path.chmod(0o644)
        assert integrity(path) == [("ok",)]
        with TraceStore(url) as store:
            assert store.get_by_session_uid("s") == oracle_query(traces, session_uid="s")
            still_works(store)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full (ENOSPC); returns it."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):
        while True:
            handle.write(b"\0" * 4096)
    return filler


def test_a_full_disk_refuses_the_batch_whole(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "4m") as where:
        path = where / "traces.db"
        url = f"sqlite:///{path}"
        acknowledged = [make(session_uids=["s"], created_at=T0 + i) for i in range(20)]
        with TraceStore(url) as store:
            for start in range(0, 20, 5):
                store.store_batch(acknowledged[start : start + 5])
            filler = fill(where)
            refused = [make(session_uids=["s"], created_at=T0 + 100), make(data="x" * 1_000_000, session_uids=["s"])]
            with pytest.raises(StorageError, match="full"):
                store.store_batch(refused)
            assert store.get_by_session_uid("s") == oracle_query(acknowledged, session_uid="s")
            assert all(store.get(trace.id) is None for trace in refused)
        filler.unlink()
        assert integrity(path) == [("ok",)]
        with TraceStore(url) as store:
            assert store.query() == oracle_query(acknowledged)
            store.store_batch(refused)
            assert store.query() == oracle_query(acknowledged + refused)


def test_a_full_disk_on_open_is_a_storage_error_and_leaves_a_usable_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "1m") as where:
        filler = fill(where)
        path = where / "traces.db"
        with pytest.raises(StorageError, match=r"full|disk"):
            TraceStore(f"sqlite:///{path}")
        filler.unlink()
        with TraceStore(f"sqlite:///{path}") as store:  # the upgrade resumes where the full disk stopped it
            still_works(store)
        assert integrity(path) == [("ok",)]


FSIZE_CHILD = textwrap.dedent(
    """
    import json, resource, signal, sys
    from tracestore import StorageError, TraceContext, TraceStore
    url, limit = sys.argv[1], int(sys.argv[2])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
    with TraceStore(url) as store:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        batch = [TraceContext("span", "web", "x" * 2_000_000, session_uids=["s"], id=f"refused-{i}") for i in range(3)]
        try:
            store.store_batch(batch)
        except StorageError as exc:
            print(json.dumps({"error": str(exc)}))
        else:
            print(json.dumps({"error": None}))
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        store.store(TraceContext("span", "web", 1, session_uids=["s"], id="after"))
    """
)


def test_a_file_size_limit_refuses_the_batch_whole(db_path: Path) -> None:
    """The full disk without root: RLIMIT_FSIZE in a child process (SIGXFSZ ignored), so a write past it fails."""
    url = f"sqlite:///{db_path}"
    acknowledged = [make(session_uids=["s"], created_at=T0 + i) for i in range(10)]
    with TraceStore(url) as store:
        store.store_batch(acknowledged)
    limit = db_path.stat().st_size + 64 * 1024  # the store checkpointed and removed its WAL on close
    child = subprocess.run(
        [sys.executable, "-c", FSIZE_CHILD, url, str(limit)], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == 0, child.stderr
    error = __import__("json").loads(child.stdout.strip().splitlines()[-1])["error"]
    assert error is not None and ("full" in error or "disk" in error or "I/O" in error), error
    assert integrity(db_path) == [("ok",)]
    with TraceStore(url) as store:
        assert [t.id for t in store.query()] == ["after"] + [t.id for t in oracle_query(acknowledged)]
        assert all(store.get(f"refused-{i}") is None for i in range(3))


# -- no SQL is built from a user's value -------------------------------------------------------------------------
MARK = "h0stile"
HOSTILE = [
    f"{MARK}1'); DROP TABLE traces; --",
    f'{MARK}2" OR "1"="1',
    f"{MARK}3\\'; SELECT 1; --",
    f"{MARK}4 %s %(id)s ? :id $1 {{}}",
    f"{MARK}5\n\r\t\x1b[2J\x7f",
    f"{MARK}6 \uff07 ' '' \\ /* */",  # a fullwidth apostrophe too
]


class Recorded:
    """Every SQL text a driver was handed and the parameters beside it, in this process."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def add(self, sql: Any, params: Any) -> None:
        self.statements.append((sql if isinstance(sql, str) else bytes(sql).decode(), params))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Recorded:
    """Record at the driver: SQLite connections (sync, and aiosqlite's thread) get a cursor class that records
    execute/executemany, psycopg connections a cursor factory that does. The real drivers run the SQL."""
    record = Recorded()

    class SQLiteCursor(sqlite3.Cursor):
        def execute(self, sql: str, parameters: Any = (), /) -> Any:
            record.add(sql, parameters)
            return super().execute(sql, parameters)

        def executemany(self, sql: str, seq_of_parameters: Any, /) -> Any:
            rows = list(seq_of_parameters)
            record.add(sql, rows)
            return super().executemany(sql, rows)

        def executescript(self, sql_script: str, /) -> Any:
            record.add(sql_script, None)
            return super().executescript(sql_script)

    class SQLiteConnection(sqlite3.Connection):
        def cursor(self, factory: Any = SQLiteCursor) -> Any:
            return super().cursor(factory)

        def execute(self, sql: str, parameters: Any = (), /) -> Any:
            return self.cursor().execute(sql, parameters)

    class PsycopgCursor(psycopg.Cursor):
        def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
            record.add(query, params)
            return super().execute(query, params, **kwargs)

        def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> Any:
            rows = list(params_seq)
            record.add(query, rows)
            return super().executemany(query, rows, **kwargs)

    sqlite_connect, psycopg_connect = sqlite3.connect, psycopg.connect
    for module in (sqlite3, sqlite3.dbapi2):  # SQLAlchemy's pysqlite uses sqlite3.dbapi2, aiosqlite sqlite3
        monkeypatch.setattr(module, "connect", lambda *a, **k: sqlite_connect(*a, **{**k, "factory": SQLiteConnection}))
    monkeypatch.setattr(
        psycopg, "connect", lambda *a, **k: psycopg_connect(*a, **{**k, "cursor_factory": PsycopgCursor})
    )
    return record


def hostile_run(store: TraceStore) -> None:
    """Every public call, each hostile value in every argument it reaches."""
    traces = [
        make(
            id=value,
            context_type=value,
            namespace=value,
            data={value: [value]},
            metadata={value: value},
            session_uids=[value, f"{value}-b"],
            created_at=T0 + i,
        )
        for i, value in enumerate(HOSTILE)
    ]
    store.store_batch(traces)
    store.store(make(id=HOSTILE[0], session_uids=[HOSTILE[1]], created_at=T0 + 50))  # a re-store: the upsert
    for value in HOSTILE:
        assert store.get(value) is not None
        store.query(session_uid=value, namespace=value, context_type=value, since=T0, until=T0 + 100, limit=5)
        store.query(namespace=value)
        store.get_by_session_uid(value, since=T0, limit=3)
        store.page_by_session_uid(f"{value}-b", limit=1)
        store.page_by_session_uid(f"{value}-b", limit=1, cursor=PageCursor(T0 + 3, value))
        store.get_by_session_uids([value, f"{value}-b"], since=T0, limit=4)
        store.explain(value, since=T0, limit=2, namespace=value)
    for value in HOSTILE[::2]:
        assert store.delete(value) is True


def assert_only_parameters(recorded: Recorded) -> None:
    assert recorded.statements, "nothing was recorded: the recorder is not on the driver's path"
    for sql, _ in recorded.statements:
        assert MARK not in sql, sql
    # The values did reach the drivers, as parameters: the recorder saw the calls that carry them.
    in_parameters = " ".join(repr(params) for _, params in recorded.statements)
    for value in HOSTILE:
        assert repr(value)[1:-1] in in_parameters, value


def test_no_sql_is_built_from_user_values(recorded: Recorded, backend: Backend, tmp_path: Path) -> None:
    with TraceStore(backend.url) as store:
        hostile_run(store)
    if backend.is_sqlite:  # a hostile file name, from the first connection and migration on
        with TraceStore(f"sqlite:///{tmp_path / HOSTILE[0].replace('/', '')}.db") as store:
            hostile_run(store)
    for value in HOSTILE[:3]:
        for command in ("recent", "explain"):
            result = CliRunner().invoke(main, [command, value, "--url", backend.url, "--since", "1000d"])
            assert result.exit_code == 0, result.output
    assert_only_parameters(recorded)


async def test_no_sql_is_built_from_user_values_async_sqlite(recorded: Recorded, db_path: Path) -> None:
    async with AsyncTraceStore(f"sqlite+aiosqlite:///{db_path}") as store:
        traces = [make(id=v, namespace=v, session_uids=[v, f"{v}-b"], created_at=T0 + i) for i, v in enumerate(HOSTILE)]
        await store.store_batch(traces)
        for value in HOSTILE:
            assert await store.get(value) is not None
            await store.query(session_uid=value, namespace=value, since=T0, limit=5)
            await store.page_by_session_uid(f"{value}-b", limit=1, cursor=PageCursor(T0 + 3, value))
            await store.get_by_session_uids([value, f"{value}-b"])
            assert await store.delete(value) is True
    assert_only_parameters(recorded)


# -- the command line: arguments and environment -------------------------------------------------------------------
def cli(args: Sequence[bytes | str], env: dict[str, bytes | str] | None = None, cwd: Path | None = None) -> Any:
    """The installed console script, with raw bytes in argv and environment (as a shell would pass them)."""
    environment = {**os.environ, **(env or {})}
    return subprocess.run(
        [TRACESTORE, *args],
        capture_output=True,
        env=environment,
        cwd=cwd,
        timeout=120,
    )


def assert_one_line_error(result: Any, codes: tuple[int, ...] = (1, 2)) -> str:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode in codes, (result.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    return str(errors[0])


def test_cli_non_utf8_bytes_in_arguments_and_environment(tmp_path: Path) -> None:
    """Undecodable bytes in a path (argv or TRACESTORE_DATABASE_URL) name a real file; in a session id they
    are bad input. Never a traceback."""
    url = b"sqlite:///" + bytes(tmp_path) + b"/caf\xe9.db"
    missing = cli(["current", "--url", url])
    assert "no database at" in assert_one_line_error(missing, (1,)) and "caf\\xe9.db" in missing.stderr.decode()
    created = cli(["upgrade"], env={"TRACESTORE_DATABASE_URL": url})
    assert created.returncode == 0, created.stderr
    assert b"caf\\xe9.db" in created.stdout and os.path.exists(bytes(tmp_path) + b"/caf\xe9.db")
    assert cli(["current", "--url", url]).returncode == 0
    assert "session_uid" in assert_one_line_error(cli(["recent", b"s\xff", "--url", url]), (2,))
    assert cli(["verify", "--url", url]).returncode == 0


@pytest.mark.parametrize(
    ("args", "env", "code", "named"),
    [
        (["current", "--url", ""], {}, 2, "empty"),
        (["current", "--url", "postgresql+psycopg://u@h:port/db"], {}, 2, "--url"),
        (["current"], {"TRACESTORE_DATABASE_URL": "postgresql+psycopg://u@h:port/db"}, 2, "--url"),
        (["current"], {"TRACESTORE_DATABASE_URL": "not a url"}, 2, "--url"),
        (["upgrade"], {"TRACESTORE_BATCH_SIZE": "\xff"}, 2, "--batch-size"),
        (["recent", "s", "--since", "1e400"], {}, 2, "--since"),
        (["recent", "s", "--since", "-5m"], {}, 2, "--since"),
        (["recent", "s", "--limit", "2.5"], {}, 2, "--limit"),
    ],
    ids=repr,
)
def test_cli_bad_arguments_and_environment(
    tmp_path: Path, args: list[str], env: dict[str, str], code: int, named: str
) -> None:
    result = cli(args, env={"TRACESTORE_DATABASE_URL": f"sqlite:///{tmp_path}/t.db", **env}, cwd=tmp_path)
    assert named in assert_one_line_error(result, (code,))
    assert os.listdir(tmp_path) == []  # nothing created, not even the default traces.db


def test_cli_on_a_directory_and_a_non_sqlite_file_from_the_environment(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"\x00\xff" * 4096)
    for url in (f"sqlite:///{tmp_path}", f"sqlite:///{junk}"):
        for args in (["current"], ["upgrade"], ["recent", "s"]):
            assert_one_line_error(cli(args, env={"TRACESTORE_DATABASE_URL": url}), (1,))
    assert junk.read_bytes() == b"\x00\xff" * 4096


def test_cli_prints_extreme_timestamps_and_escapes_control_characters(db_path: Path) -> None:
    url = f"sqlite:///{db_path}"
    with TraceStore(url) as store:
        store.store_batch(
            [
                make(id="far", session_uids=["s"], created_at=T0 + 2),
                make(id="year-10000", session_uids=["s"], created_at=T0 + 1),
                make(id="a\x1b[2Jb\nc", namespace="n\rx", context_type="t\u2028", session_uids=["s"], created_at=T0),
            ]
        )
    # Times past the year 9999 are refused now; a file written before that may hold them, and `recent` shows them.
    with contextlib.closing(sqlite3.connect(db_path)) as connection, connection:
        for trace_id, created_at in (("far", 1e300), ("year-10000", 253402300800.0)):
            for table, key in (("traces", "id"), ("trace_sessions", "trace_id")):
                connection.execute(f"UPDATE {table} SET created_at = ? WHERE {key} = ?", (created_at, trace_id))
    result = cli(["recent", "s", "--url", url, "--since", "100000d"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 3 and "\x1b" not in result.stdout.decode() and "\r" not in result.stdout.decode()
    assert lines[0].startswith("1e+300 (epoch seconds)  far") and "year-10000" in lines[1]
    assert "a\\x1b[2Jb\\nc  n\\rx  t\\u2028" in lines[2]
