"""PostgreSQL: the tests' real server is reachable through both drivers tracestore supports.

The groundwork of issue 5: `make test` runs the suite inside scripts/with-postgres, which starts a
throwaway cluster; each test gets its own database (tests/conftest.py `pg_url`).
"""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import URL, text

from tracestore.engine import create_async_engine, create_engine

# Unicode, quotes, nesting and a big integer: what trace payloads carry.
PAYLOAD: dict[str, Any] = {"text": 'naïve "quoted" 日本語 🚀', "nested": {"list": [1, 2.5, None, True]}, "big": 2**53}


def test_sync_driver_round_trips_jsonb(pg_url: URL) -> None:
    engine = create_engine(pg_url.render_as_string(hide_password=False))
    try:
        with engine.begin() as connection:
            assert engine.dialect.driver == "psycopg"
            assert connection.dialect.server_version_info >= (15,)
            connection.execute(text("CREATE TABLE t (v JSONB NOT NULL)"))
            connection.execute(text("INSERT INTO t VALUES (CAST(:v AS JSONB))"), {"v": orjson.dumps(PAYLOAD).decode()})
            assert connection.execute(text("SELECT v FROM t")).scalar_one() == PAYLOAD
    finally:
        engine.dispose()


async def test_async_driver_round_trips_jsonb(pg_async_url: URL) -> None:
    engine = create_async_engine(pg_async_url.render_as_string(hide_password=False))
    try:
        async with engine.begin() as connection:
            assert engine.dialect.driver == "asyncpg"
            assert connection.dialect.server_version_info >= (15,)
            await connection.execute(text("CREATE TABLE t (v JSONB NOT NULL)"))
            await connection.execute(
                text("INSERT INTO t VALUES (CAST(:v AS JSONB))"), {"v": orjson.dumps(PAYLOAD).decode()}
            )
            assert (await connection.execute(text("SELECT v FROM t"))).scalar_one() == PAYLOAD
    finally:
        await engine.dispose()
