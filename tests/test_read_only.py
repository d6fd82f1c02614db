"""Read-only media (SQLite): a file at head on a read-only mount answers every read as it did while writable.

Three shapes of file: rollback-journal mode (copied from elsewhere or converted), WAL mode with its -wal and
-shm files beside it, and WAL mode checkpointed (neither file). SQLite cannot open the last shape in a
read-only directory at all: the error says why and names immutable=1, which then reads it. Root ignores file
modes, so root gets a tmpfs remounted read-only; anyone else read-only files in a read-only directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.filesystems import tmpfs
from tracestore import AsyncTraceStore, SchemaOutOfDateError, StorageError, TraceContext, TraceStore
from tracestore.cli import main
from tracestore.migrate import upgrade
from tracestore.testing import make_traces

ROOT = os.geteuid() == 0
NOW = time.time()
SESSIONS = ["s-alpha", "s-beta", "s-gamma"]
KINDS = ["rollback-journal", "wal-with-files", "wal-checkpointed"]
WAL_HEADER_BYTES = 32  # a -wal file no longer than its header holds no transaction
READ_ONLY = r"readonly|read-only"  # SQLite's "attempt to write a readonly database"
READ_COMMANDS = [
    ["recent", "s-alpha"],
    ["recent", "s-beta", "--json", "--since", "2h", "--limit", "5"],
    ["explain", "s-alpha"],
    ["current"],
    ["verify"],
]


def sample_traces(count: int, seed: int) -> list[TraceContext]:
    """Well inside the CLI's default --since 10m or well before it, so no answer depends on when it runs."""
    recent = make_traces(count, session_uids=SESSIONS, since=NOW - 300, until=NOW - 1, seed=seed, sessions_per_trace=2)
    older = make_traces(count, session_uids=SESSIONS, since=NOW - 5000, until=NOW - 900, seed=seed + 100)
    return recent + older


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A WAL-mode file at head holding traces, checkpointed; each test starts from a copy."""
    path = tmp_path_factory.mktemp("template") / "traces.db"
    with TraceStore(f"sqlite:///{path}") as store:
        store.store_batch(sample_traces(20, seed=1))
    return path


@pytest.fixture
def medium(tmp_path: Path) -> Iterator[Path]:
    """An empty directory that `read_only()` turns read-only: a small tmpfs of its own for root."""
    where = tmp_path / "medium"
    if not ROOT:
        where.mkdir()
        yield where
        return
    with tmpfs(where, "16m"):
        yield where


def snapshot(where: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(where.iterdir()) if path.is_file()}


@contextlib.contextmanager
def read_only(where: Path) -> Iterator[None]:
    """`where` read-only for the block; afterwards, writable again, its files must be byte for byte as before."""
    before = snapshot(where)
    if ROOT:
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
    else:
        for name in before:
            (where / name).chmod(0o444)
        where.chmod(0o555)
    try:
        yield
    finally:
        if ROOT:
            subprocess.run(["mount", "-o", "remount,rw", str(where)], check=True)
        else:
            where.chmod(0o755)
            for name in before:
                (where / name).chmod(0o644)
    assert snapshot(where) == before


@contextlib.contextmanager
def held_open(path: Path) -> Iterator[None]:
    """Another connection reading `path` for the block: while it is open, closing a store neither checkpoints
    nor removes the -wal and -shm files (only the last connection to a WAL database does)."""
    connection = sqlite3.connect(path)
    try:
        connection.execute("SELECT count(*) FROM traces").fetchall()
        yield
    finally:
        connection.close()


def immutable_url(path: Path, driver: str = "sqlite") -> str:
    return f"{driver}:///file:{path}?immutable=1&uri=true"


# -- what a read answers ---------------------------------------------------------------------------------------
def answers(store: TraceStore) -> dict[str, Any]:
    """Every read API once, with arguments under which each returns something."""
    everything = store.query()
    first = store.page_by_session_uid("s-alpha", limit=4)
    return {
        "query": everything,
        "get": [store.get(trace.id) for trace in everything[:3]] + [store.get("no-such-trace")],
        "filtered": store.query(namespace=everything[0].namespace, since=NOW - 600, limit=10),
        "session": store.get_by_session_uid("s-alpha", since=NOW - 3600),
        "sessions": store.get_by_session_uids(["s-beta", "s-gamma"], since=NOW - 3600, limit=7),
        "pages": [first, store.page_by_session_uid("s-alpha", limit=4, cursor=first.next_cursor)],
        "explain": store.explain("s-alpha", since=NOW - 600, limit=10),
    }


async def async_answers(store: AsyncTraceStore) -> dict[str, Any]:
    everything = await store.query()
    first = await store.page_by_session_uid("s-alpha", limit=4)
    return {
        "query": everything,
        "get": [await store.get(trace.id) for trace in everything[:3]] + [await store.get("no-such-trace")],
        "filtered": await store.query(namespace=everything[0].namespace, since=NOW - 600, limit=10),
        "session": await store.get_by_session_uid("s-alpha", since=NOW - 3600),
        "sessions": await store.get_by_session_uids(["s-beta", "s-gamma"], since=NOW - 3600, limit=7),
        "pages": [first, await store.page_by_session_uid("s-alpha", limit=4, cursor=first.next_cursor)],
        "explain": await store.explain("s-alpha", since=NOW - 600, limit=10),
    }


def command_answers(url: str) -> list[tuple[int, str, str]]:
    """Exit code, stdout and (on failure) stderr of each read command; `current`'s line naming the URL left out."""
    results = []
    for args in READ_COMMANDS:
        result = CliRunner().invoke(main, ["--url", url, *args])
        assert "Traceback" not in result.output
        out = "\n".join(line for line in result.stdout.splitlines() if not line.startswith("database: "))
        results.append((result.exit_code, out, result.stderr if result.exit_code else ""))
    return results


@dataclass
class Copy:
    """A database of one shape on the medium, the URLs that read it there, and what its original answered."""

    path: Path
    urls: list[str]
    expected: dict[str, Any]
    expected_commands: list[tuple[int, str, str]]


def prepare(kind: str, template: Path, tmp_path: Path, medium: Path) -> Copy:
    """Put a database of shape `kind` on the medium, after reading every answer from its writable original."""
    source = tmp_path / "source" / "traces.db"
    source.parent.mkdir()
    shutil.copy(template, source)
    copy = medium / "traces.db"
    with held_open(source):
        if kind == "wal-with-files":  # these transactions stay in the -wal file, not yet in the database file
            with TraceStore(f"sqlite:///{source}") as store:
                store.store_batch(sample_traces(5, seed=7))
        with TraceStore(f"sqlite:///{source}") as store:
            expected = answers(store)
        expected_commands = command_answers(f"sqlite:///{source}")
        if kind == "wal-with-files":
            for suffix in ("", "-wal", "-shm"):
                shutil.copy(f"{source}{suffix}", f"{copy}{suffix}")
            assert os.path.getsize(f"{copy}-wal") > WAL_HEADER_BYTES
    if kind == "rollback-journal":
        with contextlib.closing(sqlite3.connect(source)) as connection:
            assert connection.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    if kind != "wal-with-files":
        shutil.copy(source, copy)
    plain, read_only_url = f"sqlite:///{copy}", f"sqlite:///file:{copy}?mode=ro&uri=true"
    urls = [immutable_url(copy)] if kind == "wal-checkpointed" else [plain, read_only_url]
    return Copy(copy, urls, expected, expected_commands)


def refuses_writes(store: TraceStore, some_id: str) -> None:
    with pytest.raises(StorageError, match=READ_ONLY):
        store.store_batch(sample_traces(1, seed=9))
    with pytest.raises(StorageError, match=READ_ONLY):
        store.delete(some_id)
    with pytest.raises(StorageError, match=READ_ONLY):
        store.prune(NOW)


def journal_mode(url: str) -> str:
    with TraceStore(url) as store, store.engine.connect() as connection:
        return str(connection.exec_driver_sql("PRAGMA journal_mode").scalar())


async def open_error(url: str) -> str:
    """The StorageError an AsyncTraceStore on `url` raises when it opens (on first use)."""
    store = AsyncTraceStore(url)
    try:
        with pytest.raises(StorageError) as refused:
            await store.query()
    finally:
        await store.close()
    return str(refused.value)


def assert_needs_immutable(message: str, path: Path, driver: str = "sqlite") -> None:
    """The error of a WAL file whose -wal and -shm SQLite cannot create: the reason, and the URL that reads it."""
    assert "WAL" in message and "-shm" in message and "read-only directory" in message, message
    assert immutable_url(path, driver) in message, message


def assert_refuses_immutable_beside_wal(message: str, path: Path) -> None:
    """The refusal of immutable=1 beside a -wal file holding transactions, which immutable=1 would not read."""
    assert f"{path}-wal" in message and "immutable=1" in message, message


# -- the tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_read_on_a_read_only_medium_answers_as_on_the_writable_original(
    kind: str, template: Path, tmp_path: Path, medium: Path
) -> None:
    copy = prepare(kind, template, tmp_path, medium)
    with read_only(medium):
        if kind == "wal-checkpointed":
            with pytest.raises(StorageError) as refused:
                TraceStore(f"sqlite:///{copy.path}")
            assert_needs_immutable(str(refused.value), copy.path)
        if kind == "wal-with-files":  # immutable=1 would answer without the transactions in the -wal file
            with pytest.raises(StorageError) as refused:
                TraceStore(immutable_url(copy.path))
            assert_refuses_immutable_beside_wal(str(refused.value), copy.path)
        for url in copy.urls:
            with TraceStore(url) as store:  # auto_upgrade (the default) writes nothing at head
                assert answers(store) == copy.expected, url
                refuses_writes(store, copy.expected["query"][0].id)
                assert answers(store) == copy.expected, url
    if kind == "rollback-journal":  # writable again: a read-only URL leaves the mode alone, any other sets WAL
        before = snapshot(medium)
        assert journal_mode(copy.urls[1]) == "delete" and snapshot(medium) == before
        assert journal_mode(copy.urls[0]) == "wal"


@pytest.mark.parametrize("kind", KINDS)
async def test_async_reads_on_a_read_only_medium_answer_as_on_the_writable_original(
    kind: str, template: Path, tmp_path: Path, medium: Path
) -> None:
    copy = prepare(kind, template, tmp_path, medium)
    with read_only(medium):
        if kind == "wal-checkpointed":
            refusal = await open_error(f"sqlite+aiosqlite:///{copy.path}")
            assert_needs_immutable(refusal, copy.path, driver="sqlite+aiosqlite")
        if kind == "wal-with-files":
            refusal = await open_error(immutable_url(copy.path, "sqlite+aiosqlite"))
            assert_refuses_immutable_beside_wal(refusal, copy.path)
        for url in copy.urls:
            async with AsyncTraceStore(url.replace("sqlite:", "sqlite+aiosqlite:", 1)) as store:
                assert await async_answers(store) == copy.expected, url
                with pytest.raises(StorageError, match=READ_ONLY):
                    await store.store_batch(sample_traces(1, seed=9))


@pytest.mark.parametrize("kind", KINDS)
def test_read_commands_on_a_read_only_medium_print_what_they_printed_on_the_original(
    kind: str, template: Path, tmp_path: Path, medium: Path
) -> None:
    copy = prepare(kind, template, tmp_path, medium)
    with read_only(medium):
        if kind == "wal-checkpointed":
            refused = CliRunner().invoke(main, ["--url", f"sqlite:///{copy.path}", "recent", "s-alpha"])
            assert refused.exit_code == 1 and "Traceback" not in refused.output, refused.output
            assert_needs_immutable(refused.stderr.replace("\n", ""), copy.path)
        for url in copy.urls:
            assert command_answers(url) == copy.expected_commands, url


def test_a_wal_file_without_its_shm_in_a_read_only_directory_says_why_and_what_immutable_would_miss(
    template: Path, tmp_path: Path, medium: Path
) -> None:
    source = tmp_path / "source" / "traces.db"
    source.parent.mkdir()
    shutil.copy(template, source)
    copy = medium / "traces.db"
    with held_open(source):
        with TraceStore(f"sqlite:///{source}") as store:
            store.store_batch(sample_traces(5, seed=7))  # in the -wal file only
        for suffix in ("", "-wal"):  # copied without the -shm file, which SQLite cannot create there
            shutil.copy(f"{source}{suffix}", f"{copy}{suffix}")
    with read_only(medium):
        with pytest.raises(StorageError) as refused:
            TraceStore(f"sqlite:///{copy}")
        assert_needs_immutable(str(refused.value), copy)
        assert f"{copy}-wal" in str(refused.value)
        # immutable=1 reads the database file alone: it would answer without the transactions in the -wal file.
        with pytest.raises(StorageError) as not_immutable:
            TraceStore(immutable_url(copy))
        assert_refuses_immutable_beside_wal(str(not_immutable.value), copy)
        result = CliRunner().invoke(main, ["--url", immutable_url(copy), "recent", "s-alpha"])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert str(not_immutable.value) in result.stderr.replace("\n", "")


def test_a_database_below_head_on_a_read_only_medium_is_a_clear_error(medium: Path) -> None:
    path = medium / "traces.db"
    upgrade(f"sqlite:///{path}", "0001")
    with contextlib.closing(sqlite3.connect(path)) as connection:
        connection.execute("PRAGMA journal_mode=DELETE")
    url = f"sqlite:///{path}"
    with read_only(medium):
        with pytest.raises(SchemaOutOfDateError, match="tracestore needs"):
            TraceStore(url, auto_upgrade=False)
        with pytest.raises(StorageError, match=READ_ONLY):
            TraceStore(url)
        for command in (["recent", "s-alpha"], ["current"]):
            result = CliRunner().invoke(main, ["--url", url, *command])
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "not up to date" in result.stdout
