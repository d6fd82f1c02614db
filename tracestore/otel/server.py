"""The OTLP/HTTP receiver: a Starlette app storing POST /v1/traces into one TraceStore, and serve() running it."""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import signal
import socket
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import uvicorn
from sqlalchemy import Engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tracestore.busy import is_busy
from tracestore.engine import create_engine
from tracestore.errors import InvalidTraceError, StorageBusyError, StorageError, TraceStoreError, driver_reason
from tracestore.otel import otlp
from tracestore.store import TraceStore
from tracestore.types import TraceContext

logger = logging.getLogger("tracestore.otel.server")

DEFAULT_SESSION_ATTRIBUTES = otlp.DEFAULT_SESSION_ATTRIBUTES
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4318  # OTLP/HTTP's registered port
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
# Inside the OTLP exporters' default 10 s timeout, so a locked database is answered (503) before they give up.
DEFAULT_LOCK_WAIT = 3.0
# Requests still running after a SIGTERM get this long to finish before they are cancelled.
DEFAULT_SHUTDOWN_TIMEOUT = 30.0
# At most this many refusal messages are quoted in a partial_success message (the count covers them all).
_QUOTED_REFUSALS = 5

# PostgreSQL SQLSTATE classes that pass: connection exception, operator intervention (restart), resources.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57", "53")


class ListenError(TraceStoreError):
    """The receiver cannot listen on the address asked for (in use, not this host's, not allowed)."""


class _Refused(Exception):
    """A request answered with a 4xx before anything is stored."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# -- the server's store -------------------------------------------------------------------------------------------
@contextlib.contextmanager
def receiver_store(url: str, *, lock_wait: float = DEFAULT_LOCK_WAIT) -> Iterator[TraceStore]:
    """A TraceStore on its own engine whose writes wait at most `lock_wait` seconds for a lock held elsewhere, then
    fail with StorageBusyError: SQLite's busy_timeout and PostgreSQL's lock_timeout set to it on every connection.
    The database is upgraded to head on open (a fresh SQLite file is created); engine disposed on exit."""
    engine = create_engine(url)
    _bound_lock_waits(engine, lock_wait)
    try:
        store = TraceStore(engine, retry_deadline=lock_wait)
    except BaseException:
        engine.dispose()
        raise
    try:
        yield store
    finally:
        try:
            store.close()
        finally:
            engine.dispose()


def _bound_lock_waits(engine: Engine, lock_wait: float) -> None:
    milliseconds = max(1, math.ceil(lock_wait * 1000))
    sqlite = engine.dialect.name == "sqlite"

    # Registered after tracestore's own connect hook, so it overrides the store's default busy_timeout.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        try:
            if sqlite:
                cursor.execute(f"PRAGMA busy_timeout={milliseconds}")
            else:
                cursor.execute(f"SET lock_timeout = {milliseconds}")
        finally:
            cursor.close()
        if not sqlite:
            dbapi_connection.commit()  # the SET opened a transaction; the setting stays for the session


# -- the app ------------------------------------------------------------------------------------------------------
def create_app(
    store: TraceStore,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES,
    lock_wait: float = DEFAULT_LOCK_WAIT,
    retry_after: int = math.ceil(DEFAULT_LOCK_WAIT),
) -> Starlette:
    """The receiver's ASGI app on `store` (its writes bounded as receiver_store does, for 503s to come in time).

    `max_body_bytes` bounds both the body as sent and the body once gunzipped (413 past it); `session_attributes`:
    the attribute keys naming a span's sessions; `lock_wait`: on SQLite, the app's requests write one at a time,
    and one that waits longer than this for its turn gets 503 (then the store's own bound applies to the write);
    `retry_after`: the seconds a 503 asks the client to wait.
    """
    receiver = _Receiver(store, max_body_bytes, tuple(session_attributes), lock_wait, retry_after)
    return Starlette(
        routes=[
            Route("/v1/traces", receiver.traces, methods=["POST"]),
            Route("/healthz", receiver.healthz, methods=["GET"]),
        ]
    )


class _Receiver:
    def __init__(
        self,
        store: TraceStore,
        max_body_bytes: int,
        session_attributes: tuple[str, ...],
        lock_wait: float,
        retry_after: int,
    ) -> None:
        self.store = store
        self.lock_wait = lock_wait
        # SQLite takes one writer at a time: requests queue here, each woken the moment the previous write is
        # done, instead of polling the file's lock in SQLite's busy handler (sleeps of up to 100 ms).
        self._writer = threading.Lock() if store.engine.dialect.name == "sqlite" else None
        self.max_body_bytes = max_body_bytes
        self.session_attributes = session_attributes
        self.retry_after = str(retry_after)

    async def traces(self, request: Request) -> Response:
        content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        answer_type = content_type if content_type in (otlp.PROTOBUF, otlp.JSON) else otlp.JSON
        try:
            encoding = _content_encoding(request)
            if answer_type != content_type:
                raise _Refused(415, f"unsupported content type {content_type!r}: use {otlp.PROTOBUF} or {otlp.JSON}")
            body = await self._read_body(request)
            # Decompressing, decoding and the write hold the CPU or block: in a worker thread, so the event
            # loop keeps accepting requests and answering /healthz.
            rejected = await run_in_threadpool(self._ingest, body, content_type, encoding)
        except _Refused as refused:
            return self._error(answer_type, refused.status, refused.message, refused.headers)
        except StorageError as exc:
            if _is_transient(exc):
                logger.warning("database unavailable, answered 503: %s", exc)
                return self._error(answer_type, 503, f"database unavailable: {exc}", {"Retry-After": self.retry_after})
            logger.error("cannot store the request: %s", exc, exc_info=exc)
            return self._error(answer_type, 500, "internal error: the spans could not be stored")
        except Exception as exc:
            logger.error("request failed", exc_info=exc)
            return self._error(answer_type, 500, "internal error")
        message = ""
        if rejected:
            quoted = "; ".join(rejected[:_QUOTED_REFUSALS])
            more = f" (and {len(rejected) - _QUOTED_REFUSALS} more)" if len(rejected) > _QUOTED_REFUSALS else ""
            message = f"{len(rejected)} span(s) rejected: {quoted}{more}"
            logger.warning("%s", message)
        body = otlp.response_body(content_type, rejected=len(rejected), message=message)
        return Response(body, media_type=content_type)

    async def healthz(self, request: Request) -> Response:
        """200 when the database answers a SELECT 1 through the store's engine, else 503."""
        try:
            await run_in_threadpool(_ping, self.store.engine)
        except Exception as exc:
            logger.warning("health check failed: %s", exc)
            return Response("database unavailable\n", status_code=503, media_type="text/plain")
        return Response("ok\n", media_type="text/plain")

    async def _read_body(self, request: Request) -> bytes:
        """The body as sent, refused with 413 as soon as it passes the limit (before reading it all when its
        Content-Length says so)."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large("the request body")
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large("the request body")
            chunks.append(chunk)
        return b"".join(chunks)

    def _too_large(self, what: str) -> _Refused:
        return _Refused(413, f"{what} is larger than the receiver's limit of {self.max_body_bytes} bytes")

    def _ingest(self, body: bytes, content_type: str, encoding: str) -> list[str]:
        """Decode the request and store its spans in one transaction; the refusal message of each span left out."""
        if encoding == "gzip":
            body = self._gunzip(body)
        try:
            decoded = otlp.decode_request(body, content_type, session_attributes=self.session_attributes)
        except otlp.OtlpDecodeError as exc:
            raise _Refused(400, str(exc)) from exc
        rejected = list(decoded.rejected)
        if decoded.traces:
            rejected += self._store(decoded.traces)
        return rejected

    def _store(self, traces: list[TraceContext]) -> list[str]:
        if self._writer is None:
            return self._write(traces)
        if not self._writer.acquire(timeout=self.lock_wait):
            raise StorageBusyError(
                f"the receiver's other requests kept the database busy for {self.lock_wait:g} s; nothing was written"
            )
        try:
            return self._write(traces)
        finally:
            self._writer.release()

    def _write(self, traces: list[TraceContext]) -> list[str]:
        try:
            self.store.store_batch(traces)
            return []
        except InvalidTraceError as exc:
            # Refused before anything was written: leave out the spans refused on their own, store the others.
            refusals = [(trace, self.store.refusal(trace)) for trace in traces]
            kept = [trace for trace, reason in refusals if reason is None]
            if len(kept) == len(traces):  # no span is to blame on its own: the request as a whole is refused
                raise _Refused(400, str(exc)) from exc
            if kept:
                self.store.store_batch(kept)
            return [reason for _, reason in refusals if reason is not None]  # each names its trace id

    def _gunzip(self, body: bytes) -> bytes:
        """The gzip body decompressed (every member), cut off with 413 once it passes the limit, so that a
        small body inflating to gigabytes costs no more than the limit."""
        out: list[bytes] = []
        size = 0
        data = body
        try:
            while True:  # one gzip member per turn: concatenated members are one stream (RFC 1952)
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                while not inflater.eof:
                    chunk = inflater.decompress(data, self.max_body_bytes + 1 - size)
                    size += len(chunk)
                    if size > self.max_body_bytes:
                        raise self._too_large("the decompressed request body")
                    out.append(chunk)
                    data = inflater.unconsumed_tail
                    if not data and not chunk:
                        break
                if not inflater.eof:
                    raise _Refused(400, "the gzip body is truncated")
                data = inflater.unused_data
                if not data:
                    return b"".join(out)
        except zlib.error as exc:
            raise _Refused(400, f"the gzip body is corrupt: {exc}") from exc

    def _error(self, content_type: str, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        body = otlp.status_body(content_type, message, status)
        return Response(body, status_code=status, media_type=content_type, headers=headers)


def _content_encoding(request: Request) -> str:
    """The request's content coding: "gzip", or "" for none; 415 for any other, which OTLP exporters never send."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        return ""
    if encoding in ("gzip", "x-gzip"):
        return "gzip"
    raise _Refused(415, f"unsupported content encoding {encoding!r}: send gzip or none", {"Accept-Encoding": "gzip"})


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def _is_transient(exc: StorageError) -> bool:
    """Whether a failed write may succeed if sent again soon: the database locked, the connection lost or
    refused, the pool exhausted, the server restarting or out of resources."""
    if isinstance(exc, StorageBusyError):
        return True
    cause: BaseException | None = exc.__cause__
    while cause is not None:
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            return True
        if isinstance(cause, PoolTimeoutError) or is_busy(cause):
            return True
        orig = driver_reason(cause)
        state = getattr(orig, "sqlstate", "")
        if state is None and type(orig).__name__ == "OperationalError":  # psycopg: no connection, so no SQLSTATE
            return True
        if isinstance(state, str) and state.startswith(_TRANSIENT_SQLSTATE_CLASSES):
            return True
        cause = cause.__cause__
    return False


# -- running it ---------------------------------------------------------------------------------------------------
def serve(
    url: str,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    lock_wait: float = DEFAULT_LOCK_WAIT,
    session_attributes: Sequence[str] = DEFAULT_SESSION_ATTRIBUTES,
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
    on_listening: Callable[[str, int], None] | None = None,
) -> None:
    """Receive OTLP/HTTP on host:port (port 0: any free one) into the database at `url` until SIGTERM or SIGINT,
    which let the requests in flight finish (up to `shutdown_timeout` seconds), close the store and return.

    One process, one uvicorn worker, one TraceStore. `on_listening(host, port)` is called once requests are served.
    The socket is bound before the database is opened, so a port in use fails at once with ListenError.
    """
    listener = _listen(host, port)
    bound_host, bound_port = listener.getsockname()[:2]

    def started() -> None:
        if on_listening is not None:
            on_listening(bound_host, bound_port)

    try:
        with _signals_before_uvicorn() as early, receiver_store(url, lock_wait=lock_wait) as store:
            app = create_app(
                store,
                max_body_bytes=max_body_bytes,
                session_attributes=session_attributes,
                lock_wait=lock_wait,
                retry_after=math.ceil(lock_wait),
            )
            _tune_garbage_collector()
            config = uvicorn.Config(
                app,
                lifespan="off",
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=math.ceil(shutdown_timeout),
            )
            _Server(config, started, early).run(sockets=[listener])
    finally:
        listener.close()


def _tune_garbage_collector() -> None:
    """Decoding a request makes tens of thousands of small dicts that all live until its commit: at the default
    threshold (700) the collector runs over them hundreds of times per request, ~40% of the decoding time.
    Collecting every 50,000 allocations instead, and leaving the objects of start-up out of it, keeps memory
    bounded (a request holds at most max_body_bytes of spans) for a fraction of that."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it serves, and stopping at once for a signal that came before."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], object], early_signals: list[int]) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._early_signals = early_signals

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self._early_signals:  # SIGTERM while the database was opening: stop as uvicorn would have
            self.should_exit = True
        else:
            self._on_started()


@contextlib.contextmanager
def _signals_before_uvicorn() -> Iterator[list[int]]:
    """Collect SIGTERM and SIGINT until uvicorn handles them itself, and make them a clean exit after.

    uvicorn catches them for its graceful shutdown, puts back the handlers it found and raises the signal again,
    which with the default handlers would kill the process (-15) or raise KeyboardInterrupt: the handlers it
    finds are these, which only note the signal. The previous handlers are put back on exit.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # uvicorn leaves signals alone there too
        yield received
        return

    def note(sig: int, frame: object) -> None:
        received.append(sig)

    handled = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.signal(sig, note) for sig in handled}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
