"""Shared fixtures: temporary databases, upgraded stores (sync and async)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tracestore import AsyncTraceStore, TraceStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "traces.db"


@pytest.fixture
def db_url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def store(db_url: str) -> Iterator[TraceStore]:
    with TraceStore(db_url) as trace_store:
        yield trace_store


@pytest.fixture
async def async_store(db_path: Path) -> AsyncIterator[AsyncTraceStore]:
    async with AsyncTraceStore(f"sqlite+aiosqlite:///{db_path}") as trace_store:
        yield trace_store
