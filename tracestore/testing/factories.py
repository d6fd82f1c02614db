# factory-boy ships py.typed but no annotations: calling its declarations is untyped by nature.
# mypy: disable-error-code="no-untyped-call"
"""Synthetic traces for tests: factory-boy factories for the ORM models and for TraceContext values.

Model factories (`TraceFactory`, `TraceSessionFactory`) add rows to a SQLAlchemy session and flush;
they never commit, so the test that owns the session decides what survives. Bind the session once:

    bind_session(session)            # or use the `trace_db_session` fixture, which does it for you
    trace = TraceFactory(sessions=["s-1", "s-2"])

A subclass can bring its own session instead: `class Meta: sqlalchemy_session_factory = lambda: my_session`.

`TraceContextFactory` and `make_traces` build TraceContext values for `TraceStore.store_batch`. All
randomness comes from factory-boy's generator, so `factory.random.reseed_random(n)` (or
`make_traces(..., seed=n)`) reproduces ids, payloads and timestamps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import factory.random
from factory.alchemy import SQLAlchemyModelFactory
from factory.base import Factory
from factory.declarations import LazyAttribute, LazyFunction, PostGeneration, SelfAttribute, SubFactory
from sqlalchemy.orm import Session

from tracestore.models import Trace, TraceSession
from tracestore.types import TraceContext, new_trace_id

CONTEXT_TYPES = ("llm_call", "tool_call", "retrieval", "agent_step")
NAMESPACES = ("default", "checkout", "search", "support")
DEFAULT_WINDOW_SECONDS = 600.0
DEFAULT_PAYLOAD_BYTES = 256
# len(orjson.dumps({"payload": ""})): the smallest payload make_payload can produce.
PAYLOAD_OVERHEAD = 14

_rng = factory.random.randgen


def random_session_uid() -> str:
    return f"session-{_rng.getrandbits(64):016x}"


def synthetic_trace_id(created_at: float) -> str:
    """tracestore.new_trace_id (UUIDv7, time-ordered) drawing its random bits from the factories' seedable RNG."""
    return new_trace_id(created_at, random_bytes=_rng.randbytes)


def make_payload(payload_bytes: int = DEFAULT_PAYLOAD_BYTES) -> dict[str, str]:
    """A JSON object whose compact encoding (as the store writes it) is `payload_bytes` long.

    Never shorter than PAYLOAD_OVERHEAD bytes, the size of the empty object skeleton.
    """
    fill = max(payload_bytes - PAYLOAD_OVERHEAD, 0)
    return {"payload": _rng.randbytes((fill + 1) // 2).hex()[:fill]}


def _pick_sessions(sessions: Iterable[str], per_trace: int) -> tuple[str, ...]:
    pool = list(dict.fromkeys(sessions))
    return tuple(_rng.sample(pool, min(per_trace, len(pool))))


# -- binding the model factories to a session ------------------------------------------------------
_bound_session: Session | None = None


def bind_session(session: Session | None) -> Session | None:
    """Make the model factories add to `session` (None unbinds); returns the previously bound session."""
    global _bound_session
    previous, _bound_session = _bound_session, session
    return previous


def bound_session() -> Session:
    """The session bound with bind_session(); the model factories' `sqlalchemy_session_factory`."""
    if _bound_session is None:
        raise RuntimeError(
            "no SQLAlchemy session is bound to the tracestore factories: use the trace_db_session "
            "fixture (tracestore.testing.fixtures) or call tracestore.testing.bind_session(session)"
        )
    return _bound_session


# -- ORM model factories ---------------------------------------------------------------------------
class TraceFactory(SQLAlchemyModelFactory):
    """A `traces` row. `TraceFactory(sessions=[...])` also links it to those sessions.

    `data` is the `payload` parameter (a dict of about DEFAULT_PAYLOAD_BYTES once encoded); `metadata_`
    maps the `metadata` column. Both are JSON values, as the model takes them.
    """

    class Meta:
        model = Trace
        sqlalchemy_session_factory = bound_session
        # Flush so the row has its id and FK checks run, but never commit behind the test's back.
        sqlalchemy_session_persistence = "flush"

    class Params:
        payload = LazyFunction(make_payload)

    id = LazyAttribute(lambda o: synthetic_trace_id(o.created_at))
    context_type = LazyFunction(lambda: _rng.choice(CONTEXT_TYPES))
    namespace = LazyFunction(lambda: _rng.choice(NAMESPACES))
    data = SelfAttribute("payload")
    metadata_ = LazyFunction(dict)
    created_at = LazyFunction(time.time)
    updated_at = SelfAttribute("created_at")

    @PostGeneration
    def sessions(self: Trace, create: bool, extracted: Iterable[str] | None, **kwargs: Any) -> None:
        if create and extracted:
            for session_uid in extracted:
                TraceSessionFactory(trace=self, session_uid=session_uid)


class TraceSessionFactory(SQLAlchemyModelFactory):
    """A `trace_sessions` link, stamped with its trace's created_at as the store does.

    Links a new TraceFactory trace unless given `trace=` (a Trace) or `trace_id=`; with a bare
    `trace_id` and no `created_at`, the model reads the trace's created_at when the link is inserted
    (it stays NULL only when there is no such trace yet, like a link written before its trace).
    """

    class Meta:
        model = TraceSession
        sqlalchemy_session_factory = bound_session
        sqlalchemy_session_persistence = "flush"

    class Params:
        trace = SubFactory(TraceFactory)

    trace_id = LazyAttribute(lambda o: o.trace.id)
    session_uid = LazyFunction(random_session_uid)
    created_at = LazyAttribute(lambda o: o.trace.created_at if o.trace is not None else None)

    @classmethod
    def _generate(cls, strategy: str, params: dict[str, Any]) -> Any:
        # factory-boy resolves every parameter, so without this a given trace_id would still make a Trace.
        if "trace_id" in params and "trace" not in params:
            params = {**params, "trace": None}
        return super()._generate(strategy, params)


# -- TraceContext values ---------------------------------------------------------------------------
class TraceContextFactory(Factory[TraceContext]):
    """TraceContext values for TraceStore.store_batch.

    Parameters: `sessions` (session uids to draw from; default: a new random session per trace),
    `sessions_per_trace` (how many distinct ones each trace joins, default 1), `window_start` and
    `window_end` (created_at is uniform between them; default: the last 10 minutes) and
    `payload_bytes` (length of the JSON-encoded `data`).
    """

    class Meta:
        model = TraceContext

    class Params:
        sessions = LazyFunction(lambda: [random_session_uid()])
        sessions_per_trace = 1
        window_end = LazyFunction(time.time)
        window_start = LazyAttribute(lambda o: o.window_end - DEFAULT_WINDOW_SECONDS)
        payload_bytes = DEFAULT_PAYLOAD_BYTES

    context_type = LazyFunction(lambda: _rng.choice(CONTEXT_TYPES))
    namespace = LazyFunction(lambda: _rng.choice(NAMESPACES))
    data = LazyAttribute(lambda o: make_payload(o.payload_bytes))
    metadata = LazyFunction(lambda: {"source": "tracestore.testing"})
    session_uids = LazyAttribute(lambda o: _pick_sessions(o.sessions, o.sessions_per_trace))
    created_at = LazyAttribute(lambda o: _rng.uniform(o.window_start, o.window_end))
    updated_at = SelfAttribute("created_at")
    id = LazyAttribute(lambda o: synthetic_trace_id(o.created_at))


def make_traces(
    n: int,
    *,
    session_uids: Iterable[str] | None = None,
    since: float | None = None,
    until: float | None = None,
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
    seed: int | None = None,
    **fields: Any,
) -> list[TraceContext]:
    """`n` traces, created uniformly in [since, until] (default: the 10 minutes before `until`, or now).

    Each trace joins one of `session_uids` (default: one new random session shared by all `n`).
    `seed` makes the result reproducible without disturbing factory-boy's global random state.
    Further keyword arguments (namespace=..., sessions_per_trace=...) go to TraceContextFactory.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(session_uids, str):
        raise TypeError("session_uids must be an iterable of str, not a single string")
    saved = factory.random.get_random_state() if seed is not None else None
    if seed is not None:
        factory.random.reseed_random(seed)
    try:
        end = time.time() if until is None else float(until)
        start = end - DEFAULT_WINDOW_SECONDS if since is None else float(since)
        if start > end:
            raise ValueError(f"since ({start}) must not be after until ({end})")
        sessions = [random_session_uid()] if session_uids is None else list(session_uids)
        traces: list[TraceContext] = TraceContextFactory.build_batch(
            n, sessions=sessions, window_start=start, window_end=end, payload_bytes=payload_bytes, **fields
        )
        return traces
    finally:
        if saved is not None:
            factory.random.set_random_state(saved)
