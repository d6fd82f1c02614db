"""Ties on created_at are ordered by trace id in the database's collation of the id columns. SQLite
compares bytes; a PostgreSQL database created with LC_COLLATE 'C' does too (the tests' databases).
Under a linguistic collation (here ICU English) the tie order differs, but it is the same order for
the index, the ORDER BY and the keyset comparison, so pages still never skip or repeat a trace."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import URL, create_engine

from tests.oracle import make_trace
from tracestore import TraceStore

T0 = 1_750_000_000.0
IDS = ["a", "B", "é", "Z", "ä", "b", "A", "z", "e", "É", "0", "_x"]


@pytest.fixture
def icu_url(pg_server_url: URL) -> Iterator[str]:
    name = f"tracestore_icu_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(
                f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu ICU_LOCALE 'en'"
                " LOCALE 'C.UTF-8'"
            )
        yield pg_server_url.set(drivername="postgresql+psycopg", database=name).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE {name} WITH (FORCE)")
    finally:
        admin.dispose()


def test_pages_follow_the_database_collation_without_skips_or_repeats(icu_url: str) -> None:
    traces = [make_trace(id=trace_id, created_at=T0 + i // 6, session_uids=["s"]) for i, trace_id in enumerate(IDS)]
    with TraceStore(icu_url) as store:
        store.store_batch(traces)
        everything = [t.id for t in store.get_by_session_uid("s")]
        paged: list[str] = []
        cursor = None
        while True:
            items, cursor = store.page_by_session_uid("s", limit=2, cursor=cursor)
            paged += [t.id for t in items]
            if cursor is None:
                break
    assert paged == everything  # the same order, page by page
    assert sorted(paged) == sorted(IDS)  # nothing skipped, nothing repeated
    byte_order = [t.id for t in sorted(traces, key=lambda t: (t.created_at, t.id), reverse=True)]
    assert everything != byte_order  # ICU puts "a" before "B": the collation, not bytes, orders the ties
    newer, older = everything[:6], everything[6:]
    assert set(newer) == set(IDS[6:]) and set(older) == set(IDS[:6])  # created_at still comes first
