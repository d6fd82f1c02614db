"""The HTTP service: notes written with a trace of each request in the same transaction, and a session's
traces served newest first, a page at a time, with opaque cursors.

    uvicorn --factory notes_app.app:create_app      (NOTES_DATABASE_URL picks the database)
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from notes_app.models import Note
from tracestore import AsyncTraceStore, InvalidQueryError, PageCursor, TraceContext
from tracestore.orm import add_traces

DEFAULT_URL = "sqlite+aiosqlite:///notes.db"
MAX_PAGE = 500


def create_app(database_url: str | None = None) -> Starlette:
    url = database_url or os.environ.get("NOTES_DATABASE_URL", DEFAULT_URL)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The application's engine, made as it always was; tracestore works through it without changing it.
        engine: AsyncEngine = create_async_engine(url)
        app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
        # The schema is the deploy step's job (notes_app.deploy): never upgrade from a web worker.
        app.state.traces = AsyncTraceStore(engine, auto_upgrade=False)
        async with app.state.traces:
            yield
        await engine.dispose()

    return Starlette(
        routes=[
            Route("/notes", add_note, methods=["POST"]),
            Route("/sessions/{session_id}/traces", session_traces, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


async def add_note(request: Request) -> JSONResponse:
    started = time.time()
    payload = await request.json()
    session_id, body = payload.get("session_id"), payload.get("body")
    if not isinstance(session_id, str) or not session_id or not isinstance(body, str):
        return JSONResponse({"error": "session_id and body must be non-empty strings"}, status_code=400)
    async with request.app.state.sessions() as session, session.begin():
        note = Note(session_id=session_id, body=body)
        session.add(note)
        await session.flush()  # the note's id, for the trace
        trace = TraceContext(
            context_type="http",
            namespace="notes-app",
            data={"method": "POST", "path": "/notes", "note_id": note.id, "body_chars": len(body)},
            metadata={"elapsed_ms": round((time.time() - started) * 1000, 3)},
            session_uids=[session_id],
        )
        # In the same transaction as the note: both are committed, or neither (an error rolls both back).
        await add_traces(session, [trace])
        if payload.get("fail_after_write"):  # lets the tests show the rollback
            raise RuntimeError("failed after writing the note and its trace")
    return JSONResponse({"id": note.id, "trace_id": trace.id}, status_code=201)


async def session_traces(request: Request) -> JSONResponse:
    session_id = request.path_params["session_id"]
    try:
        since = _number(request.query_params.get("since"))
        limit = int(request.query_params.get("limit", "100"))
        token = request.query_params.get("cursor")
        cursor = PageCursor.parse(token) if token else None
        if not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}")
        page = await request.app.state.traces.page_by_session_uid(session_id, since=since, limit=limit, cursor=cursor)
    except (InvalidQueryError, ValueError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(
        {
            "traces": [_shown(trace) for trace in page.items],
            "next_cursor": str(page.next_cursor) if page.next_cursor is not None else None,
        }
    )


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    return float(text)


def _shown(trace: TraceContext) -> dict[str, Any]:
    return {
        "id": trace.id,
        "type": trace.context_type,
        "namespace": trace.namespace,
        "created_at": trace.created_at,
        "data": trace.data,
        "metadata": trace.metadata,
        "sessions": list(trace.session_uids),
    }
