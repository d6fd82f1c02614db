"""Migration steps leave SQLite's write lock free long enough for a waiting writer to take it."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine as sa_create_engine

from tracestore.errors import StorageBusyError
from tracestore.migrate.online import BUSY_HANDLER_DELAYS_MS, pause_for_waiting_writers, write_step, write_transaction


@pytest.mark.parametrize(
    ("held_s", "pause_ms"),
    [(0.0, 3), (0.0005, 3), (0.002, 4), (0.050, 22), (0.120, 27), (0.200, 52), (0.300, 102), (5.0, 102)],
)
def test_pause_is_one_poll_of_a_writer_that_waited_that_long(held_s: float, pause_ms: int) -> None:
    assert pause_for_waiting_writers(held_s) == pytest.approx(pause_ms / 1000)
    assert max(BUSY_HANDLER_DELAYS_MS) == 100


def test_a_writer_gets_in_between_back_to_back_migration_transactions(tmp_path: Path) -> None:
    path = tmp_path / "lock.db"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x)")
    engine = sa_create_engine(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    hold_s, steps = 0.15, 10
    waited: list[float] = []

    def writer() -> None:
        connection = sqlite3.connect(path, timeout=10, isolation_level=None)
        time.sleep(hold_s / 2)  # arrive while the first step holds the lock
        started = time.monotonic()
        connection.execute("BEGIN IMMEDIATE")
        waited.append(time.monotonic() - started)
        connection.execute("INSERT INTO t VALUES ('writer')")
        connection.execute("COMMIT")
        connection.close()

    thread = threading.Thread(target=writer)
    with engine.connect() as connection:
        thread.start()
        for step in range(steps):
            with write_transaction(connection):
                connection.exec_driver_sql(f"INSERT INTO t VALUES ({step})")
                time.sleep(hold_s)
    thread.join()
    engine.dispose()
    # Without the pause the writer's busy handler slept through every gap and waited for all ten steps
    # (~1.5 s); with it, the writer gets the lock after the step it arrived in (or the next one).
    assert waited and waited[0] < 2.5 * hold_s, waited


def test_a_step_that_finds_the_database_busy_runs_again_until_its_deadline(tmp_path: Path) -> None:
    """SQLite's busy_timeout ran out while another writer held the lock: the step is rolled back and tried
    again (a migration batch is written to be run again), until the deadline, then StorageBusyError."""
    path = tmp_path / "busy.db"
    with sqlite3.connect(path) as setup:
        setup.execute("PRAGMA journal_mode=WAL")
        setup.execute("CREATE TABLE t (x)")
    setup.close()
    engine = sa_create_engine(f"sqlite:///{path}", isolation_level="AUTOCOMMIT")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)

    def hold_the_lock(seconds: float) -> threading.Thread:
        holder.execute("BEGIN IMMEDIATE")
        thread = threading.Timer(seconds, lambda: holder.execute("COMMIT"))
        thread.start()
        return thread

    with engine.connect() as connection:
        connection.exec_driver_sql("PRAGMA busy_timeout = 20")  # each try gives up quickly
        release = hold_the_lock(0.5)
        write_step(connection, lambda: connection.exec_driver_sql("INSERT INTO t VALUES (1)"), what="step")
        release.join()
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1

        release = hold_the_lock(1.0)
        with pytest.raises(StorageBusyError, match="step failed: the database stayed locked"):
            write_step(
                connection, lambda: connection.exec_driver_sql("INSERT INTO t VALUES (2)"), what="step", deadline=0.2
            )
        release.join()
        assert connection.exec_driver_sql("SELECT count(*) FROM t").scalar() == 1  # nothing of the refused step
    holder.close()
    engine.dispose()
