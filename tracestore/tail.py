"""Live tail of one session: the reads each poll runs and the traces it yields (no I/O: both stores drive it).

A poll is a generator (`SessionTail.poll`) that yields reads (tracestore.core.Read) and is sent each
read's rows; both stores run it like every other plan of tracestore.core, so they run the same reads in
the same order, and the logic is tested once.

What "new" means. The tail keeps a cursor, the sort key (created_at, id) of the newest trace it has
printed, and each poll reads the session's traces strictly after it, oldest first: an ascending range
of idx_trace_sessions_uid_time starting at the cursor (Statements.session_after), so a poll costs the
rows it returns. That alone misses a trace that commits with a created_at below the cursor: a batch
built a moment before it was stored, a slower concurrent writer, a writer whose clock lags. So each
poll also re-reads the keys (index only, never a trace row) of the lookback window, from `lookback`
seconds before the previous poll (by the tail's clock) up to the cursor, and fetches by id the ones it
has not seen: the late arrivals. The keys it has seen are kept only while they are inside that window,
so memory is bounded by the session's traces in the last `lookback` seconds (plus a poll interval).

The guarantee (key = (created_at, id)):
* every key is yielded at most once;
* a trace of the session whose key is above every key yielded so far when it commits is yielded, in
  key order with the other such traces;
* a trace that commits with a lower key (a late arrival) is yielded by a later poll, after newer ones,
  if its created_at is at most `lookback` seconds before the start of the last poll that could not
  see it; in particular whenever it commits within `lookback` seconds of its created_at, by the
  tail's clock. A trace later than that is never yielded;
* traces that exist when the tail starts are yielded only from `since` on (the backlog, oldest first).
A trace re-stored with a new created_at has a new key and is yielded again; re-stored with the same
created_at it is not. A session that has been quiet for longer than `lookback` has an empty window: its
idle poll is one index probe that reads nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from tracestore.core import Read
from tracestore.errors import InvalidQueryError
from tracestore.queries import Statements
from tracestore.rows import decode_rows
from tracestore.types import TraceContext, check_limit, check_query_bound, check_query_string

DEFAULT_LOOKBACK = 5.0
DEFAULT_POLL_LIMIT = 1000

Key = tuple[float, str]


@dataclass(frozen=True, slots=True)
class Polled:
    """What one poll found: late arrivals first, then the new traces oldest first. `more`: the poll
    stopped at its limit, so the next one should run without waiting."""

    traces: list[TraceContext]
    more: bool


Poll = Generator[Read, list[Any], Polled]


def check_tail_args(*, since: float | None, poll_interval: float, lookback: float, limit: int) -> None:
    """Refuse tail arguments that would silently misbehave (InvalidQueryError)."""
    if since is not None:
        check_query_bound("since", since)
    check_limit(limit)
    for name, value in (("poll_interval", poll_interval), ("lookback", lookback)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
            raise InvalidQueryError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


class SessionTail:
    """The state of one live tail: its cursor and the keys it has seen in the lookback window."""

    def __init__(
        self, statements: Statements, session_uid: str, *, since: float | None, lookback: float, limit: int
    ) -> None:
        check_query_string("session_uid", session_uid)
        check_tail_args(since=since, poll_interval=0, lookback=lookback, limit=limit)
        self._sql = statements
        self._session_uid = session_uid
        self._since = None if since is None else float(since)
        self._lookback = float(lookback)
        self._limit = limit
        self._cursor: Key | None = None  # None until the first poll
        self._window_from = 0.0  # late arrivals are looked for from here (set by each poll)
        self._seen: set[Key] = set()

    @property
    def seen(self) -> int:
        """How many keys the tail remembers (bounded by the lookback window)."""
        return len(self._seen)

    def poll(self, now: float, *, migrating: bool = False) -> Poll:
        """One poll at time `now` (epoch seconds, the tail's clock): yields reads, returns what it found."""
        late: list[TraceContext] = []
        if self._cursor is None:
            # The first poll: everything from `since` (else from now) on is new. Keys already in the window
            # below that are not, so remember them: otherwise the next poll would take them for late arrivals.
            self._cursor = (now if self._since is None else self._since, "")
            self._window_from = now - self._lookback
            for key in (yield from self._window_keys(migrating)):
                self._seen.add(key)
        else:
            missing = [key for key in (yield from self._window_keys(migrating)) if key not in self._seen]
            if missing:  # one read, all ids as one parameter: the same statement whatever their number
                ids = {"ids": self._sql.list_argument(dict.fromkeys(trace_id for _, trace_id in missing))}
                for trace in decode_rows((yield Read(self._sql.traces_by_id, ids))):
                    key = (trace.created_at, trace.id)
                    if key not in self._seen:  # re-stored since its key was read: already shown, or shown below
                        self._seen.add(key)
                        late.append(trace)
        created_at, trace_id = self._cursor
        params: dict[str, Any] = {"session_uid": self._session_uid, "limit": self._limit}
        params |= {"after_created_at": created_at, "after_trace_id": trace_id}
        rows = yield Read(self._sql.session_after(keys_only=False, until=False, migrating=migrating), params)
        new = []
        for trace in decode_rows(rows):
            key = (trace.created_at, trace.id)
            self._cursor = key
            if key not in self._seen:  # a late arrival fetched above, re-stored past the cursor meanwhile
                self._seen.add(key)
                new.append(trace)
        # The next poll looks for late arrivals from `lookback` before this one: a trace this poll could
        # not see committed after `now`, so one committed within `lookback` of its created_at is inside.
        # Never moved back (a clock stepped back): keys below it are forgotten and must not come back as new.
        self._window_from = max(self._window_from, now - self._lookback)
        self._seen = {key for key in self._seen if key[0] >= self._window_from}
        return Polled(late + new, more=len(rows) == self._limit)

    def _window_keys(self, migrating: bool) -> Generator[Read, list[Any], list[Key]]:
        """The keys in the lookback window below the cursor, a page of `limit` at a time (index only)."""
        assert self._cursor is not None
        after: Key = (self._window_from, "")
        if after >= self._cursor:  # a session quiet for longer than the lookback: nothing to re-read
            return []
        keys: list[Key] = []
        stmt = self._sql.session_after(keys_only=True, until=True, migrating=migrating)
        while True:
            params: dict[str, Any] = {"session_uid": self._session_uid, "limit": self._limit}
            params |= {"after_created_at": after[0], "after_trace_id": after[1]}
            params |= {"until_created_at": self._cursor[0], "until_trace_id": self._cursor[1]}
            page = [(float(created_at), trace_id) for created_at, trace_id in (yield Read(stmt, params))]
            keys += page
            if len(page) < self._limit:
                return keys
            after = page[-1]


def drive(poll: Poll, fetch: Callable[[Any, dict[str, Any]], list[Any]]) -> Polled:
    """Run a poll with a synchronous `fetch(statement, params) -> rows` (tests drive polls without a store)."""
    try:
        read = next(poll)
        while True:
            read = poll.send(fetch(read.stmt, read.params))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
