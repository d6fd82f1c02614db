"""The example application (examples/notes_app) on both engines: its own Alembic chain and tracestore's in
one database, notes and their traces committed together, a session's traces paged with opaque cursors."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import text
from starlette.testclient import TestClient

from tests.backends import Backend
from tracestore.migrate import head_revision

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "notes_app"


@pytest.fixture
def notes_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield importlib.import_module("notes_app.app")
    for name in [name for name in sys.modules if name == "notes_app" or name.startswith("notes_app.")]:
        del sys.modules[name]


def _app_config(url: str) -> Config:
    config = Config(str(EXAMPLE / "alembic.ini"))
    config.attributes["configure_logger"] = False
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def test_notes_and_their_traces_share_one_database(backend: Backend, notes_app: ModuleType) -> None:
    deploy = importlib.import_module("notes_app.deploy")
    deploy.migrate(backend.url)
    with backend.raw() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0001"]
        assert conn.execute(text("SELECT version_num FROM tracestore_alembic_version")).scalar_one() == head_revision()
    command.check(_app_config(backend.url))  # raises on drift: tracestore's tables are left out

    with TestClient(notes_app.create_app(backend.async_url), raise_server_exceptions=False) as client:
        ids = []
        for body in ("first", "second", "third"):
            response = client.post("/notes", json={"session_id": "s1", "body": body})
            assert response.status_code == 201, response.text
            ids.append(response.json()["trace_id"])
        assert client.post("/notes", json={"session_id": "s2", "body": "other"}).status_code == 201
        # A request failing after its writes leaves neither the note nor its trace.
        failed = client.post("/notes", json={"session_id": "s1", "body": "lost", "fail_after_write": True})
        assert failed.status_code == 500

        seen, cursor = [], None
        while True:
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            page = client.get("/sessions/s1/traces", params=params).json()
            seen += [trace["id"] for trace in page["traces"]]
            assert all(trace["sessions"] == ["s1"] and trace["data"]["path"] == "/notes" for trace in page["traces"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert sorted(seen) == sorted(ids) and len(seen) == 3
        times = [trace["created_at"] for trace in client.get("/sessions/s1/traces").json()["traces"]]
        assert times == sorted(times, reverse=True)
        assert client.get("/sessions/s1/traces", params={"since": "4e9"}).json() == {"traces": [], "next_cursor": None}
        assert client.get("/sessions/s1/traces", params={"cursor": "not-a-cursor"}).status_code == 400

    with backend.raw() as conn:
        bodies = conn.execute(text("SELECT body FROM notes ORDER BY id")).scalars().all()
        assert bodies == ["first", "second", "third", "other"]
        assert conn.execute(text("SELECT count(*) FROM traces")).scalar_one() == 4
