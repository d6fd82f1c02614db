"""TraceContext: validation, id generation, session normalization, value semantics; the error hierarchy."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
import time
import uuid
from typing import Any

import orjson
import pytest

from tests.oracle import make_trace as make
from tracestore import (
    InvalidQueryError,
    InvalidTraceError,
    SchemaOutOfDateError,
    StorageError,
    TraceContext,
    TraceStoreError,
    new_trace_id,
)
from tracestore.types import END_OF_YEAR_9999, check_query_time, encode_json

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


# -- validation -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {"context_type": ""},
        {"context_type": None},
        {"context_type": 1},
        {"context_type": b"span"},
        {"namespace": ""},
        {"namespace": None},
        {"namespace": ["web"]},
        {"metadata": None},
        {"metadata": []},
        {"metadata": "{}"},
        {"created_at": math.nan},
        {"created_at": math.inf},
        {"created_at": -math.inf},
        {"created_at": "1700000000"},
        {"created_at": True},
        {"created_at": False},
        {"created_at": 1j},
        {"updated_at": math.nan},
        {"updated_at": math.inf},
        {"updated_at": "now"},
        {"updated_at": True},
        {"id": ""},
        {"id": 42},
        {"id": b"abc"},
        {"id": uuid.uuid4()},
        {"session_uids": "abc"},
        {"session_uids": b"abc"},
        {"session_uids": None},
        {"session_uids": 7},
        {"session_uids": [""]},
        {"session_uids": ["a", 1]},
        {"session_uids": ["a", None]},
        {"session_uids": [b"a"]},
    ],
    ids=repr,
)
def test_bad_field_raises_invalid_trace_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(InvalidTraceError):
        make(**overrides)


@pytest.mark.parametrize("field_name", ["created_at", "updated_at"])
def test_timestamp_too_large_for_a_float_is_invalid_trace_error(field_name: str) -> None:
    # A finite int beyond float range must be refused like inf, not leak OverflowError.
    with pytest.raises(InvalidTraceError):
        make(**{field_name: 10**400})


NOW = 1_796_415_240.0  # 2026-12-04


@pytest.mark.parametrize(
    ("value", "unit"),
    [
        (NOW * 1e3, "milliseconds: divide by 1000"),
        (int(NOW * 1e3), "milliseconds: divide by 1000"),
        (NOW * 1e6, "microseconds: divide by 1000000"),
        (int(NOW * 1e9), "nanoseconds: divide by 1000000000"),
        (END_OF_YEAR_9999, "milliseconds"),  # 10000-01-01 itself: the first instant refused
        (1e300, "epoch seconds"),
        (1.7976931348623157e308, "epoch seconds"),
    ],
    ids=repr,
)
@pytest.mark.parametrize("field_name", ["created_at", "updated_at"])
def test_a_timestamp_past_the_year_9999_names_the_unit_mistake(field_name: str, value: float, unit: str) -> None:
    with pytest.raises(InvalidTraceError, match=f"{field_name} .* is past the year 9999: .*{unit}"):
        make(**{field_name: value})
    trace = make()
    setattr(trace, field_name, value)  # assigned after construction: store() validates again
    with pytest.raises(InvalidTraceError, match="past the year 9999"):
        trace.validate()


def test_timestamps_from_before_1970_to_the_end_of_9999_are_kept() -> None:
    last = math.nextafter(END_OF_YEAR_9999, 0)
    for value in (last, NOW, 0.0, -62135596800.0, -1e300, -1.7976931348623157e308):
        trace = make(created_at=value, updated_at=value)
        assert (trace.created_at, trace.updated_at) == (value, value)


@pytest.mark.parametrize("name", ["since", "until"])
def test_check_query_time_refuses_a_bound_past_the_year_9999(name: str) -> None:
    with pytest.raises(InvalidQueryError, match=f"{name} .* is past the year 9999: it looks like milliseconds"):
        check_query_time(name, NOW * 1000)
    with pytest.raises(InvalidQueryError, match="microseconds"):
        check_query_time(name, int(NOW * 1e6))
    for bad in (math.nan, math.inf, -math.inf, True, "1700000000", None, 10**400):
        with pytest.raises(InvalidQueryError, match=name):
            check_query_time(name, bad)
    for good, expected in ((NOW, NOW), (int(NOW), NOW), (-1e300, -1e300), (0, 0.0)):
        checked = check_query_time(name, good)
        assert checked == expected and type(checked) is float


def test_data_is_not_validated_at_construction() -> None:
    # The docstring promises validation when stored; construction stays cheap.
    trace = make(data={1, 2})
    assert trace.data == {1, 2}


# -- defaults and coercion --------------------------------------------------------------------------
def test_defaults() -> None:
    before = time.time()
    trace = make()
    after = time.time()
    assert before <= trace.created_at <= after
    assert trace.updated_at == trace.created_at
    assert trace.metadata == {}
    assert trace.session_uids == ()
    assert UUID7.match(trace.id)


def test_int_timestamps_become_floats() -> None:
    trace = make(created_at=1_700_000_000, updated_at=1_700_000_001)
    assert type(trace.created_at) is float and trace.created_at == 1_700_000_000.0
    assert type(trace.updated_at) is float and trace.updated_at == 1_700_000_001.0


def test_given_values_are_kept() -> None:
    trace = make(id="my-id", created_at=12.5, updated_at=13.25, metadata={"m": [1]})
    assert (trace.id, trace.created_at, trace.updated_at, trace.metadata) == ("my-id", 12.5, 13.25, {"m": [1]})


def test_negative_and_zero_timestamps_are_allowed() -> None:
    assert make(created_at=0).created_at == 0.0
    trace = make(created_at=-5.5)
    assert trace.created_at == -5.5
    assert UUID7.match(trace.id)


# -- ids ----------------------------------------------------------------------------------------------
def test_generated_id_is_uuid7_shaped() -> None:
    for _ in range(200):
        trace_id = make().id
        assert UUID7.match(trace_id), trace_id
        parsed = uuid.UUID(trace_id)
        assert parsed.version == 7
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == trace_id


def test_id_carries_creation_millisecond() -> None:
    created = 1_700_000_000.123
    trace_id = make(created_at=created).id
    assert int(trace_id.replace("-", "")[:12], 16) == int(created * 1000)
    assert new_trace_id(created)[:13] == trace_id[:13]


def test_ids_are_time_ordered() -> None:
    # One id per millisecond step (and some larger jumps): string order follows creation order.
    times = [1_600_000_000.0 + step / 1000 for step in range(500)] + [1_700_000_000.0, 1_800_000_000.5]
    ids = [make(created_at=created).id for created in times]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def test_ids_within_one_millisecond_are_distinct() -> None:
    ids = {new_trace_id(1_700_000_000.0) for _ in range(2000)}
    assert len(ids) == 2000


def test_new_trace_id_defaults_to_now() -> None:
    before = int(time.time() * 1000)
    trace_id = new_trace_id()
    after = int(time.time() * 1000)
    assert before <= int(trace_id.replace("-", "")[:12], 16) <= after


# -- session normalization ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ([], ()),
        (["b", "a", "b", "a"], ("a", "b")),
        (("z",), ("z",)),
        ({"y", "x"}, ("x", "y")),
        ((uid for uid in ["2", "10", "1"]), ("1", "10", "2")),
        (["é", "e\u0301", "😀", "中", "a\x00b", "a"], ("a", "a\x00b", "e\u0301", "é", "中", "😀")),
    ],
    ids=["empty", "duplicates", "tuple", "set", "generator", "unicode"],
)
def test_session_uids_normalized(given: Any, expected: tuple[str, ...]) -> None:
    assert make(session_uids=given).session_uids == expected


def test_session_uids_are_not_unicode_normalized() -> None:
    # Ids compare byte for byte: NFC and NFD spellings are two sessions.
    assert make(session_uids=["é", "e\u0301"]).session_uids == ("e\u0301", "é")


def test_normalization_makes_equal_values() -> None:
    a = make(id="x", created_at=1.0, session_uids=["b", "a"])
    b = make(id="x", created_at=1.0, session_uids=("a", "b", "a"))
    assert a == b


# -- value semantics ----------------------------------------------------------------------------------
def test_equality_by_value() -> None:
    base = {"id": "x", "created_at": 1.0, "updated_at": 2.0, "session_uids": ["s"], "metadata": {"m": 1}}
    assert make(**base) == make(**base)
    for change in [
        {"id": "y"},
        {"created_at": 1.5},
        {"updated_at": 2.5},
        {"session_uids": ["s", "t"]},
        {"metadata": {"m": 2}},
        {"data": {"k": 2}},
        {"namespace": "other"},
        {"context_type": "other"},
    ]:
        assert make(**base) != make(**{**base, **change}), change


def test_slotted_and_mutable() -> None:
    # Not frozen (decoding speed, see the class docstring): fields can be reassigned, and the store
    # validates them again when the trace is stored.
    trace = make()
    assert not hasattr(trace, "__dict__")
    trace.namespace = "other"
    assert trace.namespace == "other"
    with pytest.raises(AttributeError):
        trace.not_a_field = 1  # type: ignore[attr-defined]


def test_validate_rechecks_reassigned_fields() -> None:
    trace = make()
    trace.session_uids = ["b", "a", "b"]  # type: ignore[assignment]
    trace.validate()
    assert trace.session_uids == ("a", "b")
    trace.created_at = 5  # type: ignore[assignment]
    trace.validate()
    assert type(trace.created_at) is float
    for field_name, value in [
        ("id", ""),
        ("namespace", 1),
        ("context_type", None),
        ("metadata", []),
        ("created_at", math.nan),
        ("updated_at", True),
        ("session_uids", "abc"),
    ]:
        broken = make()
        setattr(broken, field_name, value)
        with pytest.raises(InvalidTraceError):
            broken.validate()


class Text(str):
    pass


# validate() decides the usual values (ASCII str, finite float, an already sorted tuple of ASCII
# str) in one step and leaves everything else to the full check: both paths, side by side.
@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("id", "\ud800"),  # a lone surrogate: not ASCII, and not encodable either
        ("namespace", ""),
        ("context_type", b"span"),
        ("created_at", math.inf),
        ("updated_at", -math.inf),
        ("created_at", "1.0"),
        ("session_uids", ("a", "")),
        ("session_uids", ("", "a")),
        ("session_uids", ("a", 1)),
        ("session_uids", ("a", None)),
        ("session_uids", ("a", "b\udc00")),
        ("session_uids", "ab"),
    ],
    ids=repr,
)
def test_validate_refuses_after_reassignment(field_name: str, value: Any) -> None:
    trace = make()
    setattr(trace, field_name, value)
    with pytest.raises(InvalidTraceError):
        trace.validate()


@pytest.mark.parametrize(
    ("field_name", "value", "expected"),
    [
        ("id", "中文", "中文"),
        ("namespace", Text("web"), Text("web")),  # accepted as it is, like before
        ("created_at", 7, 7.0),
        ("session_uids", ("b", "a"), ("a", "b")),
        ("session_uids", ("a", "a"), ("a",)),
        ("session_uids", ("a", "é"), ("a", "é")),
        ("session_uids", ("é", "a"), ("a", "é")),
        ("session_uids", (Text("b"), "a"), ("a", "b")),
        ("session_uids", ("a", "b"), ("a", "b")),
    ],
    ids=repr,
)
def test_validate_normalizes_after_reassignment(field_name: str, value: Any, expected: Any) -> None:
    trace = make()
    setattr(trace, field_name, value)
    trace.validate()
    assert getattr(trace, field_name) == expected
    assert type(getattr(trace, field_name)) is type(expected)


def test_not_hashable() -> None:
    # A mutable dataclass with value equality has no hash: traces cannot be set members or dict keys.
    assert TraceContext.__hash__ is None
    with pytest.raises(TypeError):
        hash(make())


def test_replace_revalidates() -> None:
    trace = make(session_uids=["b", "a"])
    assert dataclasses.replace(trace, session_uids=["c", "c"]).session_uids == ("c",)
    with pytest.raises(InvalidTraceError):
        dataclasses.replace(trace, namespace="")


# -- errors -------------------------------------------------------------------------------------------
def test_error_hierarchy() -> None:
    for error in (InvalidTraceError, InvalidQueryError, SchemaOutOfDateError, StorageError):
        assert issubclass(error, TraceStoreError)
    assert issubclass(InvalidTraceError, ValueError)
    assert issubclass(InvalidQueryError, ValueError)
    assert issubclass(TraceStoreError, Exception)


class _Str(str):
    pass


class _Color(enum.Enum):
    RED = 1


class _Level(enum.IntEnum):
    HIGH = 3


class _Mode(enum.StrEnum):
    FAST = "fast"


FLAT_VALUES: list[Any] = [
    1,
    -(2**63),
    2**64 - 1,
    1.5,
    -0.0,
    1e308,
    math.nan,
    math.inf,
    -math.inf,
    True,
    None,
    "text",
    "",
    _Str("sub"),
    _Color.RED,
    _Level.HIGH,
    _Mode.FAST,
    uuid.UUID(int=7),
    (1,),
    [1],
    {"k": 1},
]


@pytest.mark.parametrize("item", FLAT_VALUES, ids=repr)
def test_a_flat_payload_is_taken_exactly_when_it_survives_a_json_round_trip(item: Any) -> None:
    # encode_json skips the round trip for dicts of plain scalars: for every other value it must still decide
    # as the round trip does, so each value is tried as a flat dict's item and under a key of another type.
    for value in ({"v": item}, {"a": "x", "v": item, "z": 2}, {_Str("k"): item}):
        try:
            expected: str | None = orjson.dumps(value).decode() if orjson.loads(orjson.dumps(value)) == value else None
        except TypeError:
            expected = None
        try:
            got: str | None = encode_json(value, "data")
        except InvalidTraceError:
            got = None
        assert got == expected, value
