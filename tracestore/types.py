"""What callers get back and hand in: the TraceContext value type and its validation."""

from __future__ import annotations

import base64
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from tracestore.errors import InvalidQueryError, InvalidTraceError

JSONValue = Any


def new_trace_id(created_at: float | None = None, *, random_bytes: Callable[[int], bytes] = os.urandom) -> str:
    """A UUIDv7-shaped id whose first 48 bits are the creation time in ms.

    Ids of traces created close in time sort (and sit on disk) next to each other, so the
    recent rows the hot query reads cluster in a few pages of the `traces` primary key.
    `random_bytes` lets test factories make reproducible ids.
    """
    seconds = time.time() if created_at is None else created_at
    scaled = seconds * 1000
    # Past about 9e304 s the product overflows to inf: take the whole seconds' ms instead (masked anyway).
    ms = (int(scaled) if math.isfinite(scaled) else int(seconds) * 1000) & ((1 << 48) - 1)
    rand = int.from_bytes(random_bytes(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 68) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def check_timestamp(name: str, value: object) -> float:
    """Epoch seconds as a finite float; bools, strings, NaN and infinities are refused."""
    if type(value) is float and math.isfinite(value):  # the usual case, decided in one step
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTraceError(f"{name} must be a number of epoch seconds, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float range
        raise InvalidTraceError(f"{name} is out of range: {value!r}") from None
    if not math.isfinite(as_float):
        raise InvalidTraceError(f"{name} must be finite, got {value!r}")
    return as_float


def check_identifier(name: str, value: object) -> str:
    """A non-empty str: ids and session ids are compared byte for byte, never coerced."""
    if type(value) is str and value and value.isascii():  # the usual case: ASCII is valid UTF-8, no encoding
        return value
    if not isinstance(value, str):
        raise InvalidTraceError(f"{name} must be a str, got {type(value).__name__}")
    if not value:
        raise InvalidTraceError(f"{name} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: SQLite stores UTF-8 only
        raise InvalidTraceError(f"{name} is not valid Unicode text: {exc.reason} at {exc.start}") from None
    return value


def _normalize_sessions(session_uids: Iterable[str]) -> tuple[str, ...]:
    if type(session_uids) is tuple and _is_normalized(session_uids):
        return session_uids  # what construction left behind: validate() then re-checks it without a set and a sort
    # A bare str is iterable too, and would silently become one session per character.
    if isinstance(session_uids, str | bytes):
        raise InvalidTraceError("session_uids must be an iterable of str, not a single string")
    try:
        uids = {check_identifier("session uid", uid) for uid in session_uids}
    except TypeError as exc:
        raise InvalidTraceError(f"session_uids must be an iterable of str: {exc}") from exc
    # The junction table keeps no order, so the value type keeps a canonical one.
    return tuple(sorted(uids))


def _is_normalized(uids: tuple[Any, ...]) -> bool:
    """Strictly ascending non-empty ASCII str: no duplicates, nothing to encode-check. False: the full check decides."""
    previous = ""
    for uid in uids:
        if type(uid) is not str or uid <= previous or not uid.isascii():
            return False
        previous = uid
    return True


@dataclass(slots=True)
class TraceContext:
    """One trace: a JSON payload with metadata, timestamps and the sessions it belongs to.

    `session_uids` is normalized to a sorted tuple without duplicates (the database stores a set),
    so `store(t)` then `get(t.id) == t` holds exactly. Fields are checked at construction and again
    when stored; `data` and `metadata` are checked as JSON when stored.

    Not frozen on purpose: a frozen dataclass pays an object.__setattr__ call per field, which made
    decoding 1,000 rows ~4x slower than building them (see README, performance notes).
    """

    context_type: str
    namespace: str
    data: JSONValue
    metadata: dict[str, Any] = field(default_factory=dict)
    session_uids: tuple[str, ...] = ()
    created_at: float = None  # type: ignore[assignment]  # filled in __post_init__
    updated_at: float = None  # type: ignore[assignment]
    id: str = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.created_at is None:
            self.created_at = time.time()
        if self.updated_at is None:
            self.updated_at = self.created_at
        if self.id is None:
            self.id = new_trace_id(check_timestamp("created_at", self.created_at))
        self.validate()

    def validate(self) -> None:
        """Raise InvalidTraceError unless every field has a storable type and value (JSON aside)."""
        check_identifier("id", self.id)
        check_identifier("context_type", self.context_type)
        check_identifier("namespace", self.namespace)
        if not isinstance(self.metadata, dict):
            raise InvalidTraceError(f"metadata must be a dict, got {type(self.metadata).__name__}")
        self.created_at = check_timestamp("created_at", self.created_at)
        self.updated_at = check_timestamp("updated_at", self.updated_at)
        self.session_uids = _normalize_sessions(self.session_uids)


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where a page ended: the sort key (created_at, trace id) of its last trace.

    The next page holds the traces strictly after it in the order newest first, ties by id descending,
    so a page costs the same wherever it starts, and traces stored between two requests are neither
    skipped nor repeated. `str(cursor)` is an opaque token for an HTTP API; `PageCursor.parse` reads it.
    """

    created_at: float
    trace_id: str

    def __str__(self) -> str:
        return base64.urlsafe_b64encode(orjson.dumps([self.created_at, self.trace_id])).decode("ascii")

    @classmethod
    def parse(cls, token: str) -> PageCursor:
        """The cursor a token stands for; InvalidQueryError if it is not one tracestore made."""
        try:
            created_at, trace_id = orjson.loads(base64.urlsafe_b64decode(token.encode("ascii")))
        except (ValueError, TypeError, AttributeError, UnicodeEncodeError):
            raise InvalidQueryError(f"not a page cursor: {token!r}") from None
        cursor = cls(created_at, trace_id)
        cursor.check()
        return cursor

    def check(self) -> None:
        try:
            valid_time = (
                not isinstance(self.created_at, bool)
                and isinstance(self.created_at, int | float)
                and math.isfinite(self.created_at)
            )
            check_identifier("trace_id", self.trace_id)  # a str the driver can encode (no lone surrogates)
        except (OverflowError, InvalidTraceError):  # OverflowError: an int beyond float range
            valid_time = False
        if not valid_time:
            raise InvalidQueryError(f"not a page cursor: {self!r}")


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a session's traces and the cursor of the next one (None: this was the last page).

    Unpacks as `items, next_cursor = store.page_by_session_uid(...)`.
    """

    items: list[TraceContext]
    next_cursor: PageCursor | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.items, self.next_cursor))
