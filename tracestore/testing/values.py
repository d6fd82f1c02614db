"""Synthetic TraceContext values from the standard library alone: what `tracestore demo` stores.

`make_traces` (tracestore.testing.factories) builds the same kind of values through factory-boy, which
only the `testing` extra installs; the demo must run from a plain `pip install tracestore`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tracestore.types import TraceContext, new_trace_id

CONTEXT_TYPES = ("llm_call", "tool_call", "retrieval", "agent_step")
NAMESPACES = ("default", "checkout", "search", "support")
# The JSON around the payload text, {"payload":""}: the text fills the rest of payload_bytes.
PAYLOAD_OVERHEAD = len('{"payload":""}')


def synthetic_traces(
    n: int,
    *,
    session_uids: Sequence[str],
    since: float,
    until: float,
    payload_bytes: int = 256,
    rng: random.Random | None = None,
) -> list[TraceContext]:
    """`n` traces created uniformly in [since, until], each in one of `session_uids`, with a JSON payload of
    about `payload_bytes`. `rng` (default: a new unseeded one) draws every choice, ids included."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if isinstance(session_uids, str) or not session_uids:
        raise ValueError("session_uids must be a non-empty sequence of str")
    if since > until:
        raise ValueError(f"since ({since}) must not be after until ({until})")
    rng = rng or random.Random()
    fill = max(payload_bytes - PAYLOAD_OVERHEAD, 0)
    traces = []
    for _ in range(n):
        created_at = rng.uniform(since, until)
        text = rng.randbytes(fill // 2 + 1).hex()[:fill]
        traces.append(
            TraceContext(
                context_type=rng.choice(CONTEXT_TYPES),
                namespace=rng.choice(NAMESPACES),
                data={"payload": text},
                metadata={"source": "tracestore demo"},
                session_uids=(rng.choice(session_uids),),
                created_at=created_at,
                id=new_trace_id(created_at, random_bytes=rng.randbytes),
            )
        )
    return traces
