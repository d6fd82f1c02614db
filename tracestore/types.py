"""What callers get back and hand in: the TraceContext value type and its validation."""

from __future__ import annotations

import base64
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
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


# 10000-01-01T00:00:00Z in epoch seconds: every time tracestore takes is before it.
END_OF_YEAR_9999 = 253402300800.0
# Units that epoch times are often written in by mistake, and how many of them make a second.
_SUBSECOND_UNITS = ((1e3, "milliseconds"), (1e6, "microseconds"), (1e9, "nanoseconds"))


def unit_mistake(value: float) -> str:
    """What an epoch time past the year 9999 most likely is, e.g. "it looks like milliseconds: divide by 1000".

    The smallest unit that brings it back before the year 10000 wins: a time.time() * 1000 is milliseconds,
    not microseconds of 1970.
    """
    for per_second, unit in _SUBSECOND_UNITS:
        if 0 <= value / per_second < END_OF_YEAR_9999:
            return f"it looks like {unit}: divide by {per_second:.0f}"
    return "tracestore takes epoch seconds, like time.time()"


def check_timestamp(name: str, value: object) -> float:
    """Epoch seconds as a finite float before the year 10000; bools, strings, NaN and infinities are refused.

    Past the year 9999 is refused as a unit mistake (milliseconds, microseconds or nanoseconds since the
    epoch): such a trace would sort first in its session for ever, and no prune could reach it. Any time
    before that is kept, negative ones (before 1970) included: a trace dated too far in the past sorts last
    and the next prune removes it.
    """
    if type(value) is float and -math.inf < value < END_OF_YEAR_9999:  # the usual case, decided in one step
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTraceError(f"{name} must be a number of epoch seconds, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond float range
        raise InvalidTraceError(f"{name} is out of range: {value!r}") from None
    if not math.isfinite(as_float):
        raise InvalidTraceError(f"{name} must be finite, got {value!r}")
    if as_float >= END_OF_YEAR_9999:
        raise InvalidTraceError(f"{name} {value!r} is past the year 9999: {unit_mistake(as_float)}")
    return as_float


def check_query_time(name: str, value: object) -> float:
    """A read's `since` or `until` as epoch seconds (a float), refused with InvalidQueryError when it is not.

    Refused rather than warned about: no trace can be stored past the year 9999 (check_timestamp), so a
    bound there is a unit mistake whose answer would be silently wrong (`since` in milliseconds returns
    nothing), and a warning is easy to miss or filter. The message names the likely unit. NaN, infinities,
    bools and non-numbers are refused too; times before 1970 are valid.
    """
    try:
        return check_timestamp(name, value)
    except InvalidTraceError as exc:
        raise InvalidQueryError(str(exc)) from None


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


def encode_json(value: JSONValue, field: str, trace_id: str | None = None) -> str:
    """`value` as the compact JSON text tracestore stores (a trace's data or metadata, from the store or the ORM).

    InvalidTraceError naming the field (and the trace) unless the text decodes back to an equal value:
    orjson quietly turns NaN/inf into null, datetimes and UUIDs into strings, tuples into lists and
    dataclasses into dicts, and such a value would not come back as it was given.
    """
    try:
        encoded = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidTraceError(f"{_named(field, trace_id)} is not JSON-serializable: {exc}") from exc
    if not _flat_and_exact(value) and orjson.loads(encoded) != value:
        raise InvalidTraceError(
            f"{_named(field, trace_id)} would not survive a JSON round trip "
            "(NaN/inf, tuples, datetimes, UUIDs or other non-JSON values); convert it to plain JSON types"
        )
    return encoded.decode()


def _flat_and_exact(value: JSONValue) -> bool:
    """Whether `value` is a dict of str keys to str, int, bool, None or finite floats, which JSON gives back
    exactly (orjson refuses ints past 64 bits and lone surrogates itself): such a value needs no round trip,
    which costs three times its encoding. False: the round trip decides."""
    if type(value) is not dict:
        return False
    for key, item in value.items():
        kind = type(item)
        if type(key) is not str or kind not in _EXACT_SCALARS or (kind is float and not -_INF < item < _INF):
            return False
    return True


_EXACT_SCALARS = frozenset({str, int, bool, float, type(None)})
_INF = math.inf


def refuse_nul_text(value: str, field: str, trace_id: str | None = None) -> None:
    """InvalidTraceError if `value` holds NUL, which PostgreSQL's text cannot store (SQLite's can).

    Said before the database is touched: the server's own refusal only says "invalid byte sequence for
    encoding UTF8: 0x00". Payloads never carry one (JSON text escapes it); identifiers can.
    """
    if "\x00" in value:
        raise InvalidTraceError(f"{_named(field, trace_id)} contains NUL, which PostgreSQL text cannot store")


def _named(field: str, trace_id: str | None) -> str:
    return field if trace_id is None else f"trace {trace_id!r}: {field}"


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


def _as_validated(
    trace_id: object, context_type: object, namespace: object, metadata: object, created_at: object, updated_at: object
) -> bool:
    """Whether these fields are already what validation leaves behind (False: the full checks decide)."""
    return (
        type(trace_id) is str
        and type(context_type) is str
        and type(namespace) is str
        and type(metadata) is dict
        and type(created_at) is float
        and type(updated_at) is float
        and -math.inf < created_at < END_OF_YEAR_9999
        and -math.inf < updated_at < END_OF_YEAR_9999
        and bool(trace_id and context_type and namespace)
        and trace_id.isascii()
        and context_type.isascii()
        and namespace.isascii()
    )


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

    Not frozen on purpose: a frozen dataclass pays an object.__setattr__ call per field, which would
    dominate decoding a big read (docs/design.md).
    """

    context_type: str
    namespace: str
    data: JSONValue
    metadata: dict[str, Any] = field(default_factory=dict)
    # Any iterable of str on the way in (a list is the usual); always a sorted tuple after construction.
    session_uids: Sequence[str] = ()
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
        uids = self.session_uids
        fields = (self.id, self.context_type, self.namespace, self.metadata, self.created_at, self.updated_at)
        if _as_validated(*fields) and type(uids) is tuple and _is_normalized(uids):
            return  # every field as validation leaves it: the store's usual case, in one step
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


def check_cursor(cursor: object) -> None:
    """InvalidQueryError unless `cursor` is None or a valid PageCursor (what every paged read takes)."""
    if cursor is None:
        return
    if not isinstance(cursor, PageCursor):
        raise InvalidQueryError(f"cursor must be a PageCursor (PageCursor.parse reads a token), got {cursor!r}")
    cursor.check()


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a session's traces and the cursor of the next one (None: this was the last page).

    Unpacks as `items, next_cursor = store.page_by_session_uid(...)`.
    """

    items: list[TraceContext]
    next_cursor: PageCursor | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.items, self.next_cursor))


# -- what a read asks for ------------------------------------------------------------------------------
# SQLite binds LIMIT as a signed 64-bit integer.
MAX_LIMIT = 2**63 - 1


def check_query_string(name: str, value: object) -> str:
    """A non-empty str a driver can bind (lone surrogates cannot be encoded as UTF-8); InvalidQueryError."""
    try:
        return check_identifier(name, value)
    except InvalidTraceError as exc:
        raise InvalidQueryError(str(exc)) from None


def check_query_bound(name: str, value: object) -> float:
    """`since`/`until` as epoch seconds (check_query_time); InvalidQueryError otherwise."""
    return check_query_time(name, value)


def check_limit(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_LIMIT:
        raise InvalidQueryError(f"limit must be an int between 1 and {MAX_LIMIT}, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Query:
    """The filters of a read, checked once at construction (InvalidQueryError): every given filter must
    match; `since` is inclusive and `until` exclusive (epoch seconds); newest first, at most `limit`."""

    session_uid: str | None = None
    namespace: str | None = None
    context_type: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        for name in ("session_uid", "namespace", "context_type"):
            value = getattr(self, name)
            if value is not None:
                check_query_string(name, value)
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                check_query_bound(name, value)
        if self.limit is not None:
            check_limit(self.limit)

    def params(self) -> dict[str, Any]:
        """The bind parameters of the filters that are set."""
        names = ("session_uid", "namespace", "context_type", "since", "until", "limit")
        return {name: value for name in names if (value := getattr(self, name)) is not None}
