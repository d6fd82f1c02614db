"""SQLite's connection setup: the pragmas every connection gets and why each is there, the transaction
recipe, and what to say when a file cannot be opened (a directory, another kind of file, a read-only
medium). tracestore.engine installs it on the SQLite engines tracestore creates; an application's Engine keeps its
own setup (tracestore.dialects.sqlite_borrow)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, ExceptionContext

from tracestore.errors import StorageError

# Execution options the store sets on its engine views (see _on_begin).
WRITE = "tracestore_write"
SINGLE_STATEMENT_READ = "tracestore_single_statement_read"


# Pragmas run on every new SQLite connection, each with the reason it is there.
SQLITE_PRAGMAS: tuple[tuple[str, str], ...] = (
    # Wait for a competing writer instead of failing at once with "database is locked".
    ("busy_timeout", "5000"),
    # The legacy ON DELETE CASCADE never ran because this was off; deletes must take their links along.
    ("foreign_keys", "ON"),
    # Readers never block the writer and vice versa; persistent in the file once set. The only one that
    # writes (the file header), so the connect hook sets it only where the connection can write.
    ("journal_mode", "WAL"),
    # In WAL mode NORMAL is durable against application crashes and much cheaper than FULL.
    ("synchronous", "NORMAL"),
    # 64 MiB of page cache keeps the hot part of idx_trace_sessions_uid_time and the traces PK in memory.
    ("cache_size", "-65536"),
    # Checkpoint every ~40 MB of WAL instead of SQLite's 4 MB: a write of 500 traces dirties ~700 pages, so
    # the default made nearly every commit pay a checkpoint and its two fsyncs, and the session index leaves
    # that every batch touches are copied once per checkpoint, not once per commit (docs/performance.md).
    ("wal_autocheckpoint", "10000"),
)


def _connect_listener(url: URL) -> Callable[[Any, Any], None]:
    """The connect listener of an engine on `url`, which says before any connection whether it may write."""
    read_only, immutable = access(url)

    def on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        _on_connect(dbapi_connection, read_only=read_only, immutable=immutable, driver=url.drivername)

    return on_connect


def _on_connect(dbapi_connection: Any, *, read_only: bool, immutable: bool, driver: str) -> None:
    # Take transaction control away from the driver: pysqlite/aiosqlite never BEGIN before a SELECT,
    # so without this a multi-statement read sees several snapshots (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for name, value in SQLITE_PRAGMAS:
            if name == "journal_mode":
                set_journal_mode(cursor, value, read_only=read_only, immutable=immutable, driver=driver)
            else:
                cursor.execute(f"PRAGMA {name}={value}")
    finally:
        cursor.close()


# SQLite's primary result codes (the low byte of an extended code) that the connect hook tells apart.
SQLITE_CANTOPEN = 14
SQLITE_BUSY = 5
SQLITE_READONLY = 8
SQLITE_NOTADB = 26
# The first 16 bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
# A -wal file no longer than its header holds no transaction.
WAL_HEADER_BYTES = 32
# How long the journal-mode switch waits for a competing writer: busy_timeout's 5000 ms.
BUSY_WAIT = int(dict(SQLITE_PRAGMAS)["busy_timeout"]) / 1000


def set_journal_mode(cursor: Any, mode: str, *, read_only: bool, immutable: bool, driver: str) -> None:
    """Switch the file to `mode` where the connection can write; a read-only one reads in the file's own mode.

    WAL stays the default of every writable file; a read-only file, mount or URL cannot take the header
    write, and a rollback-journal file reads fine as it is. This is the first statement that opens the
    file, so a file SQLite cannot open fails here, where the hook can say why.
    """
    if immutable:
        _refuse_unseen_wal(_main_file(cursor))
    try:
        # A read-only URL only asks: SQLite would refuse the switch anyway, and asking still opens the file.
        _execute_while_busy(cursor, "PRAGMA journal_mode" if read_only else f"PRAGMA journal_mode={mode}")
    except Exception as exc:  # the driver's own error class: sqlite3's, or another SQLite driver's
        code = _primary_code(exc)
        if code not in (SQLITE_READONLY, SQLITE_CANTOPEN, SQLITE_NOTADB):
            raise
        # SQLite says "unable to open" for a directory, a missing directory and a read-only mount, "file is not
        # a database" for any other file, and "readonly database" where only permissions forbid creating the
        # WAL's files: say which, with the path, where the file system tells.
        path = _main_file(cursor)
        reason = why_not_a_database(path) or _why_unopenable(path, driver)
        if reason is not None:
            raise StorageError(reason) from exc
        if code != SQLITE_READONLY:
            raise
        # A read-only file or mount: reads work in the file's own mode, writes fail with this same reason.


def _execute_while_busy(cursor: Any, statement: str) -> None:
    """Run `statement`, trying again while another connection holds the lock it needs, up to BUSY_WAIT seconds.

    Leaving a rollback journal for WAL needs the exclusive lock, and SQLite returns SQLITE_BUSY at once, without
    its busy handler, when a writer holds the file (waiting could deadlock): the wait busy_timeout gives every
    other statement is given here instead.
    """
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            cursor.execute(statement)
            return
        except Exception as exc:  # the driver's own error class
            if _primary_code(exc) != SQLITE_BUSY or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _primary_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of a driver error (sqlite3 has it from Python 3.11; else from the message)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF
    message = str(exc)
    if "database is locked" in message:
        return SQLITE_BUSY
    if "readonly database" in message:
        return SQLITE_READONLY
    if "file is not a database" in message:
        return SQLITE_NOTADB
    return SQLITE_CANTOPEN if "unable to open database file" in message else None


def _main_file(cursor: Any) -> str:
    """The path of the connection's main database file; SQLite knows it even when it cannot open the file.

    "" in memory, and when the driver cannot decode the path: the checks that need it are then skipped.
    """
    try:
        cursor.execute("PRAGMA database_list")
        return next((str(row[2] or "") for row in cursor.fetchall() if row[1] == "main"), "")
    except Exception:  # the driver's own error class, e.g. a path that is not UTF-8
        return ""


def why_not_a_database(path: str) -> str | None:
    """Why SQLite cannot use the file at `path` as a database, said with the path: a directory, a file of another
    kind, a missing or read-only directory, a file it may not read. None when the file system shows no reason."""
    if not path:
        return None
    if os.path.isdir(path):
        return f"{printable(path)} is a directory, not a SQLite database file"
    if not os.path.lexists(path):
        directory = os.path.dirname(path) or "."
        cannot = f"cannot create the SQLite database {printable(path)}: the directory {printable(directory)}"
        if not os.path.isdir(directory):
            return f"{cannot} does not exist"
        return f"{cannot} is not writable" if not os.access(directory, os.W_OK) else None
    try:
        with open(path, "rb") as file:
            header = file.read(len(SQLITE_HEADER))
    except OSError as exc:
        return f"cannot open the SQLite database {printable(path)}: {exc.strerror or exc}"
    if header and header != SQLITE_HEADER:  # an empty file is an empty database
        return f"{printable(path)} is not a SQLite database (its header is not 'SQLite format 3')"
    return None


def _why_unopenable(path: str, driver: str) -> str | None:
    """Why SQLite cannot open `path` when it is a WAL-mode file missing its -wal or -shm in a read-only directory."""
    if not path or not _in_wal_mode(path):
        return None
    missing = [suffix for suffix in ("-wal", "-shm") if not os.path.exists(path + suffix)]
    directory = os.path.dirname(path)
    if not missing or os.access(directory, os.W_OK):
        return None
    url = _immutable_url(path, driver)
    reason = (
        f"cannot open {printable(path)}: a WAL-mode database is read through its -wal and -shm files, and SQLite "
        f"cannot create the missing {' and '.join(missing)} in the read-only directory {printable(directory)}"
    )
    if _holds_transactions(path + "-wal"):
        return (
            f"{reason}. immutable=1 ({url}) would read the database file alone, without the transactions still in "
            f"{printable(path)}-wal: copy the database and its -wal file to a writable directory and open the copy, "
            "or make the directory writable"
        )
    return f"{reason}. Every committed transaction is in the database file (no -wal to replay): read it with {url}"


def _explain_unopenable(context: ExceptionContext) -> None:
    """handle_error: a file SQLite cannot even open (a directory, a missing directory) fails before the connect
    hook runs, as "unable to open database file": say why, with the path, where the file system tells."""
    if context.connection is not None or context.engine is None:  # only errors while connecting
        return
    if _primary_code(context.original_exception) not in (SQLITE_CANTOPEN, SQLITE_NOTADB):
        return
    reason = why_not_a_database(database_path(context.engine.url))
    if reason is not None:
        raise StorageError(reason) from context.original_exception


def database_path(url: URL) -> str:
    """The file a SQLite URL names (a `file:` URI's path decoded); "" in memory and for other engines."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return ""
    if not database.startswith("file:"):
        return database
    if uri_parameters(url).get("mode") == "memory":
        return ""
    path = database[len("file:") :].partition("?")[0].partition("#")[0]
    if path.startswith("//"):  # file://host/path: SQLite accepts an empty host or localhost
        path = "/" + path[2:].partition("/")[2]
    return unquote(path, errors="surrogateescape")


def _refuse_unseen_wal(path: str) -> None:
    """immutable=1 makes SQLite read the database file alone, so transactions still in the -wal would be missed."""
    if path and _holds_transactions(path + "-wal"):
        raise StorageError(
            f"{printable(path)}-wal may hold transactions that are not in the database file yet, and immutable=1 "
            "reads the database file alone: open it without immutable=1 (SQLite then needs its -shm file or a "
            "writable directory), or copy the database and its -wal file to a writable directory and open the copy"
        )


def _in_wal_mode(path: str) -> bool:
    """Whether the file's header says WAL (file format versions 2 at offsets 18 and 19)."""
    try:
        with open(path, "rb") as file:
            header = file.read(20)
    except OSError:
        return False
    return header.startswith(b"SQLite format 3\x00") and header[18:20] == b"\x02\x02"


def _holds_transactions(wal_path: str) -> bool:
    try:
        return os.path.getsize(wal_path) > WAL_HEADER_BYTES
    except OSError:
        return False


def _immutable_url(path: str, driver: str = "sqlite") -> str:
    """The URL that reads the SQLite file at `path` as immutable: no locks, no -wal or -shm, never written."""
    # SQLite decodes %XX in a URI filename and ends it at ? or #, and bytes that are not UTF-8 can only
    # travel as %XX; SQLAlchemy decodes %XX once more before handing the filename over.
    escaped = "".join(
        quote(char, safe="", errors="surrogateescape") if char in "%?#" or "\udc80" <= char <= "\udcff" else char
        for char in path
    )
    return f"{driver}:///file:{escaped.replace('%', '%25')}?immutable=1&uri=true"


def uri_parameters(url: URL) -> dict[str, str]:
    """The SQLite URI parameters of a `file:` URL with uri=true (SQLAlchemy passes the query on to SQLite)."""
    database = url.database or ""
    if url.get_backend_name() != "sqlite" or not database.startswith("file:"):
        return {}
    query = {key: value if isinstance(value, str) else value[-1] for key, value in url.query.items()}
    if not uri_true(query.get("uri", "")):
        return {}
    return {**query, **dict(parse_qsl(database.partition("?")[2]))}


def uri_true(value: str) -> bool:
    """Whether a URI parameter's value means yes, as SQLite reads it."""
    return value.lower() in ("1", "true", "yes", "on")


def access(url: URL) -> tuple[bool, bool]:
    """(read_only, immutable) of a SQLite URL, from its URI parameters: whether a connection may write the file."""
    parameters = uri_parameters(url)
    immutable = uri_true(parameters.get("immutable", ""))
    return immutable or parameters.get("mode") == "ro", immutable


def _on_checkout(dbapi_connection: Any, connection_record: Any, connection_proxy: Any) -> None:
    # SQLAlchemy resets a connection's isolation level when it comes back from an AUTOCOMMIT block
    # (Alembic's autocommit_block in the backfill, verify --fix), and pysqlite's reset hands
    # transaction control back to the driver: take it again before anyone uses the connection.
    if dbapi_connection.isolation_level is not None:
        dbapi_connection.isolation_level = None


def _on_begin(conn: Any) -> None:
    options = conn.get_execution_options()
    if options.get("isolation_level") == "AUTOCOMMIT":
        return  # e.g. Alembic's autocommit_block: the caller manages transactions itself
    if options.get(SINGLE_STATEMENT_READ):
        # One SELECT is one snapshot in SQLite already (its implicit read transaction lasts until the
        # statement is reset), so the store's single-statement reads skip BEGIN: on aiosqlite every
        # statement costs thread round trips, and this saves a third of a latest-100 read.
        return
    # Writers take the write lock up front: a deferred transaction that later upgrades to a write
    # fails with SQLITE_BUSY at once in WAL mode instead of waiting for busy_timeout.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(WRITE) else "BEGIN")


def _on_cancelled(context: ExceptionContext) -> None:
    # A task cancelled while aiosqlite runs a statement leaves it unfinished (the thread steps it all the
    # same), and SQLAlchemy then closes the connection without closing the cursor. SQLite keeps a
    # connection closed with a statement unfinished open, with its transaction and write lock, until
    # the cursor is garbage collected: close the cursor first (aiosqlite runs that before the close).
    cursor = getattr(context.execution_context, "cursor", None)
    if cursor is not None and isinstance(context.original_exception, asyncio.CancelledError):
        with contextlib.suppress(Exception):  # the cancellation is what the caller must see
            cursor.close()


def printable(text: str) -> str:
    """`text` without lone surrogates, which stdout cannot encode: a path or argument from undecodable bytes
    (Python maps them to surrogates) shows its bytes as \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that does not stand for a byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def install(engine: Engine) -> None:
    """Install the connection setup on a SQLite Engine."""
    event.listen(engine, "connect", _connect_listener(engine.url))
    event.listen(engine, "checkout", _on_checkout)
    event.listen(engine, "begin", _on_begin)
    event.listen(engine, "handle_error", _explain_unopenable)


def install_async(engine: Engine) -> None:
    """What an aiosqlite engine needs besides install(): cancelled statements closed properly."""
    if not event.contains(engine, "handle_error", _on_cancelled):
        event.listen(engine, "handle_error", _on_cancelled)
