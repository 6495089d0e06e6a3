"""The row encoders: encode_json_rows and encode_msgpack_rows, on both implementations.

The fixed cases compare the bytes with orjson and msgpack run on Python rows
written by hand. The property tests check that on random batches the
compiled encoders return the twins' bytes, or raise the twins' error.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math

import msgpack
import orjson
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sabot.ext import _twins
from tests import test_ext

# The fixtures of test_ext.py: each implementation in turn, and the compiled one.
kernels = test_ext.kernels
compiled = test_ext.compiled

UTC = dt.timezone.utc
JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z


def json_rows(rows):
    return [orjson.dumps(row, option=JSON_OPTIONS) for row in rows]


def msgpack_rows(rows):
    return [msgpack.packb(row, datetime=True) for row in rows]


def outcome(function, batch):
    """Return ("ok", result) or ("raised", exception type) for comparing two encoders."""
    try:
        return "ok", function(batch)
    except Exception as exc:  # noqa: BLE001 - the type is what is compared
        return "raised", type(exc)


INT_LIMITS = [
    (pa.int8(), -(2**7), 2**7 - 1),
    (pa.int16(), -(2**15), 2**15 - 1),
    (pa.int32(), -(2**31), 2**31 - 1),
    (pa.int64(), -(2**63), 2**63 - 1),
    (pa.uint8(), 0, 2**8 - 1),
    (pa.uint16(), 0, 2**16 - 1),
    (pa.uint32(), 0, 2**32 - 1),
    (pa.uint64(), 0, 2**64 - 1),
]

EDGE_FLOATS = [0.0, -0.0, 1.0, -1.5, 0.1, 1 / 3, 100.0, 1e15, 1e16, 1.2345678901234568e17,
               1e22, 1e-4, 1e-5, 1e-6, 1.5e-7, 5e-324, 2.2250738585072014e-308,
               1.7976931348623157e308, -1.7976931348623157e308, 2.0**53, 2.0**53 + 2,
               9007199254740993.0, 123456.789, 53.21, -0.07, 0.00001234, 999999999999999.9,
               # 16 digits, where two 16-digit decimals parse to the same double.
               8807288258.182121, 71167246044.21571, 66652.06348468405, -68511288.00562207,
               math.nan, math.inf, -math.inf]


# -- JSON, fixed cases ------------------------------------------------------------------


def test_json_integers_at_limits(kernels):
    columns = {f"{t}": pa.array([low, high, None], type=t) for t, low, high in INT_LIMITS}
    batch = pa.record_batch(columns)
    expected = json_rows([{f"{t}": low for t, low, _ in INT_LIMITS},
                          {f"{t}": high for t, _, high in INT_LIMITS},
                          {f"{t}": None for t, _, _ in INT_LIMITS}])
    assert kernels.encode_json_rows(batch) == expected


def test_json_float_layout(kernels):
    batch = pa.record_batch({"x": pa.array(EDGE_FLOATS, type=pa.float64())})
    rows = kernels.encode_json_rows(batch)
    assert rows == json_rows({"x": x} for x in EDGE_FLOATS)
    assert rows[-3:] == [b'{"x":null}'] * 3
    assert rows[1] == b'{"x":-0.0}'
    assert b'{"x":53.21}' in rows
    assert b'{"x":1e+16}' in rows
    assert b'{"x":1e-6}' in rows
    assert b'{"x":0.00001}' in rows


def test_json_float32_widens_to_double(kernels):
    values = [0.1, 3.4028234663852886e38, 1e-45, -2.5, math.nan]
    batch = pa.record_batch({"x": pa.array(values, type=pa.float32())})
    widened = pa.array(values, type=pa.float32()).to_pylist()
    assert kernels.encode_json_rows(batch) == json_rows({"x": x} for x in widened)
    assert kernels.encode_json_rows(batch)[0] == b'{"x":0.10000000149011612}'


def test_json_string_escapes(kernels):
    text = "".join(chr(c) for c in range(0x20)) + '"\\/\x7f\u2028é😀'
    values = [text, "", None, "plain"]
    batch = pa.record_batch({"s": values, "large": pa.array(values, pa.large_string())})
    expected = json_rows({"s": v, "large": v} for v in values)
    assert kernels.encode_json_rows(batch) == expected
    assert b'\\u0000\\u0001' in expected[0]
    assert b'\\b\\t\\n\\u000b\\f\\r' in expected[0]


def test_json_key_escapes(kernels):
    batch = pa.record_batch({'quote"d': [1], "back\\slash": [2], "new\nline": [3], "é": [4]})
    assert kernels.encode_json_rows(batch) == [
        b'{"quote\\"d":1,"back\\\\slash":2,"new\\nline":3,"\xc3\xa9":4}']


def test_json_bool_and_null_type(kernels):
    batch = pa.record_batch({"b": [True, False, None], "n": pa.nulls(3)})
    assert kernels.encode_json_rows(batch) == [b'{"b":true,"n":null}',
                                               b'{"b":false,"n":null}',
                                               b'{"b":null,"n":null}']


@pytest.mark.parametrize(("unit", "value", "text"), [
    ("s", 0, "1970-01-01T00:00:00"),
    ("s", -1, "1969-12-31T23:59:59"),
    ("s", 253402300799, "9999-12-31T23:59:59"),
    ("s", -62135596800, "0001-01-01T00:00:00"),
    ("ms", 1700000000123, "2023-11-14T22:13:20.123000"),
    ("ms", -1, "1969-12-31T23:59:59.999000"),
    ("us", 951782400000001, "2000-02-29T00:00:00.000001"),
    ("ns", 1700000000000000000, "2023-11-14T22:13:20"),
    ("ns", 1700000000123456000, "2023-11-14T22:13:20.123456"),
    ("ns", 1700000000123456789, "2023-11-14T22:13:20.123456789"),
    ("ns", -1, "1969-12-31T23:59:59.999999999"),
])
@pytest.mark.parametrize(("zone", "suffix"), [
    (None, "Z"),
    ("UTC", "Z"),
    ("+05:30", None),
    ("-04:30", None),
])
def test_json_timestamps(kernels, unit, value, text, zone, suffix):
    if suffix is None and value in (253402300799, -62135596800):
        pytest.skip("the wall time in this zone is outside datetime's years 1 to 9999")
    array = pa.array([value, None], type=pa.timestamp(unit, tz=zone))
    rows = kernels.encode_json_rows(pa.record_batch({"t": array}))
    if suffix is not None:
        assert rows == [b'{"t":"' + f"{text}{suffix}".encode() + b'"}', b'{"t":null}']
    else:
        # Fixed offsets: the wall time in that zone, with the offset.
        assert rows == _twins.encode_json_rows(pa.record_batch({"t": array}))
        assert rows[0].endswith(f'{zone}"}}'.encode())


def test_json_timestamp_fixed_offset_wall_time(kernels):
    array = pa.array([0], type=pa.timestamp("s", tz="-04:30"))
    assert kernels.encode_json_rows(pa.record_batch({"t": array})) == [
        b'{"t":"1969-12-31T19:30:00-04:30"}']


def test_json_nested_types(kernels):
    point = pa.struct([("x", pa.float64()), ("tags", pa.list_(pa.string()))])
    batch = pa.record_batch({
        "list": pa.array([[1, None, 3], [], None], pa.list_(pa.int64())),
        "large": pa.array([["a"], None, ["b", "c"]], pa.large_list(pa.string())),
        "fixed": pa.array([[1.0, 2.0], None, [math.nan, -0.0]], pa.list_(pa.float64(), 2)),
        "struct": pa.array([{"x": 1.5, "tags": ["t"]}, None, {"x": None, "tags": None}], point),
        "deep": pa.array([[[{"x": 0.5, "tags": []}]], [[None], []], None],
                         pa.list_(pa.list_(point))),
    })
    expected = json_rows([
        {"list": [1, None, 3], "large": ["a"], "fixed": [1.0, 2.0],
         "struct": {"x": 1.5, "tags": ["t"]}, "deep": [[{"x": 0.5, "tags": []}]]},
        {"list": [], "large": None, "fixed": None, "struct": None, "deep": [[None], []]},
        {"list": None, "large": ["b", "c"], "fixed": [None, -0.0],
         "struct": {"x": None, "tags": None}, "deep": None},
    ])
    assert kernels.encode_json_rows(batch) == expected
    assert kernels.encode_json_rows(batch.slice(1)) == expected[1:]
    assert kernels.encode_json_rows(batch.slice(1, 1)) == expected[1:2]


def test_json_sliced_struct_array_rows(kernels):
    # A sliced struct keeps its children unsliced; the parent's offset applies.
    struct = pa.StructArray.from_arrays([pa.array([1, 2, 3, 4]), pa.array(["a", "b", "c", "d"])],
                                        names=["n", "s"]).slice(2)
    batch = pa.RecordBatch.from_arrays([struct], names=["st"])
    assert kernels.encode_json_rows(batch) == [b'{"st":{"n":3,"s":"c"}}',
                                               b'{"st":{"n":4,"s":"d"}}']


def test_json_empty_batches(kernels):
    assert kernels.encode_json_rows(pa.record_batch({"a": pa.array([], pa.int64())})) == []
    no_columns = pa.record_batch({"a": [1, 2]}).select([])
    assert kernels.encode_json_rows(no_columns) == [b"{}", b"{}"]


def test_json_binary_raises(kernels):
    batch = pa.record_batch({"b": pa.array([b"x"], pa.binary())})
    with pytest.raises(TypeError):
        kernels.encode_json_rows(batch)


def test_json_out_of_range_timestamp_raises(kernels):
    batch = pa.record_batch({"t": pa.array([253402300800], pa.timestamp("s"))})
    with pytest.raises((OverflowError, ValueError)):
        kernels.encode_json_rows(batch)


FALLBACK_COLUMNS = {
    "float16": lambda: pa.array([1.5, None], pa.float16()),
    "date32": lambda: pa.array([dt.date(2020, 1, 2), None], pa.date32()),
    "dictionary": lambda: pa.array(["a", None]).dictionary_encode(),
    "map": lambda: pa.array([[("k", 1)], None], pa.map_(pa.string(), pa.int64())),
    "named_zone": lambda: pa.array([0, None], pa.timestamp("ms", tz="Europe/Paris")),
    "decimal": lambda: pa.array([decimal.Decimal("1.5"), None], pa.decimal128(5, 2)),
    "binary": lambda: pa.array([b"x", None], pa.binary()),
    "duplicate_fields": lambda: pa.StructArray.from_arrays(
        [pa.array([1, 2]), pa.array([3, 4])], names=["a", "a"]),
}


@pytest.mark.parametrize("name", sorted(FALLBACK_COLUMNS))
def test_unsupported_types_match_twin(compiled, name):
    batch = pa.record_batch({"id": [1, 2], "other": FALLBACK_COLUMNS[name]()})
    assert outcome(compiled.encode_json_rows, batch) == \
        outcome(_twins.encode_json_rows, batch)
    assert outcome(compiled.encode_msgpack_rows, batch) == \
        outcome(_twins.encode_msgpack_rows, batch)


def test_table_input_matches_twin(compiled):
    table = pa.table({"a": [1, 2], "b": ["x", None]})
    assert compiled.encode_json_rows(table) == _twins.encode_json_rows(table)
    assert compiled.encode_msgpack_rows(table) == _twins.encode_msgpack_rows(table)


# -- msgpack, fixed cases ---------------------------------------------------------------

MSGPACK_INTEGERS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1,
                    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1,
                    -(2**63)]


def test_msgpack_integer_forms(kernels):
    batch = pa.record_batch({"v": pa.array(MSGPACK_INTEGERS, pa.int64())})
    assert kernels.encode_msgpack_rows(batch) == msgpack_rows({"v": v} for v in MSGPACK_INTEGERS)
    unsigned = [0, 127, 128, 2**32, 2**64 - 1]
    batch = pa.record_batch({"v": pa.array(unsigned, pa.uint64())})
    assert kernels.encode_msgpack_rows(batch) == msgpack_rows({"v": v} for v in unsigned)


def test_msgpack_integers_at_type_limits(kernels):
    columns = {f"{t}": pa.array([low, high, None], type=t) for t, low, high in INT_LIMITS}
    rows = kernels.encode_msgpack_rows(pa.record_batch(columns))
    assert rows == msgpack_rows([{f"{t}": low for t, low, _ in INT_LIMITS},
                                 {f"{t}": high for t, _, high in INT_LIMITS},
                                 {f"{t}": None for t, _, _ in INT_LIMITS}])


def test_msgpack_floats_keep_bits(kernels):
    batch = pa.record_batch({"d": pa.array(EDGE_FLOATS, pa.float64()),
                             "f": pa.array(EDGE_FLOATS, pa.float32())})
    widened = pa.array(EDGE_FLOATS, pa.float32()).to_pylist()
    expected = msgpack_rows({"d": d, "f": f} for d, f in zip(EDGE_FLOATS, widened, strict=True))
    assert kernels.encode_msgpack_rows(batch) == expected
    assert msgpack.unpackb(expected[1])["d"] == 0.0


@pytest.mark.parametrize("size", [0, 1, 31, 32, 255, 256, 65535, 65536])
def test_msgpack_string_and_binary_headers(kernels, size):
    text = "é" * (size // 2) + "a" * (size % 2)
    blob = bytes(range(256)) * (size // 256) + bytes(size % 256)
    batch = pa.record_batch({"s": [text, None], "b": pa.array([blob, None], pa.binary()),
                             "L": pa.array([text, None], pa.large_string()),
                             "B": pa.array([blob, None], pa.large_binary())})
    expected = msgpack_rows([{"s": text, "b": blob, "L": text, "B": blob},
                             {"s": None, "b": None, "L": None, "B": None}])
    assert kernels.encode_msgpack_rows(batch) == expected


@pytest.mark.parametrize("length", [0, 15, 16, 65535, 65536])
def test_msgpack_array_headers(kernels, length):
    expected = msgpack_rows([{"l": [v % 128 for v in range(length)]}])
    batch = pa.record_batch({"l": pa.array([[v % 128 for v in range(length)]],
                                           pa.list_(pa.int8()))})
    assert kernels.encode_msgpack_rows(batch) == expected


@pytest.mark.parametrize("fields", [1, 15, 16, 17])
def test_msgpack_map_headers(kernels, fields):
    row = {f"f{i}": i for i in range(fields)}
    batch = pa.record_batch({"st": pa.array([row], pa.struct([(k, pa.int64()) for k in row]))})
    assert kernels.encode_msgpack_rows(batch) == msgpack_rows([{"st": row}])
    wide = pa.record_batch({k: [v] for k, v in row.items()})
    assert kernels.encode_msgpack_rows(wide) == msgpack_rows([row])


@pytest.mark.parametrize("moment", [
    dt.datetime(1970, 1, 1, tzinfo=UTC),
    dt.datetime(2020, 1, 1, tzinfo=UTC),                      # 32-bit form
    dt.datetime(2106, 2, 7, 6, 28, 15, tzinfo=UTC),           # largest 32-bit seconds
    dt.datetime(2106, 2, 7, 6, 28, 16, tzinfo=UTC),           # 64-bit form
    dt.datetime(2020, 1, 1, 0, 0, 0, 1, tzinfo=UTC),          # 64-bit, with nanoseconds
    dt.datetime(2500, 1, 1, tzinfo=UTC),
    dt.datetime(2514, 5, 30, 1, 53, 4, tzinfo=UTC),           # past 34-bit seconds: 96-bit
    dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # negative: 96-bit
    dt.datetime(1, 1, 1, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
])
def test_msgpack_timestamp_forms(kernels, moment):
    micros = (moment - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)
    expected = msgpack_rows([{"t": moment}])
    for zone in ("UTC", "+05:30", None):
        array = pa.array([micros], pa.timestamp("us", tz=zone))
        if zone == "+05:30" and moment.year == 9999:
            continue  # the local time is past datetime's range
        assert kernels.encode_msgpack_rows(pa.record_batch({"t": array})) == expected, zone


def test_msgpack_nanosecond_timestamps(kernels):
    values = [1700000000123456789, -1, 0, None]
    batch = pa.record_batch({"t": pa.array(values, pa.timestamp("ns"))})
    rows = kernels.encode_msgpack_rows(batch)
    expected = [msgpack.packb({"t": msgpack.Timestamp.from_unix_nano(v)}) for v in values[:3]]
    assert rows[:3] == expected
    assert rows[3] == msgpack.packb({"t": None})
    decoded = msgpack.unpackb(rows[0], timestamp=0)["t"]
    assert decoded.to_unix_nano() == 1700000000123456789


def test_msgpack_naive_timestamp_is_utc(kernels):
    batch = pa.record_batch({"t": pa.array([86400], pa.timestamp("s"))})
    rows = kernels.encode_msgpack_rows(batch)
    assert msgpack.unpackb(rows[0], timestamp=3) == {"t": dt.datetime(1970, 1, 2, tzinfo=UTC)}


def test_msgpack_nested_and_sliced(kernels):
    point = pa.struct([("x", pa.float64()), ("tags", pa.list_(pa.string()))])
    batch = pa.record_batch({
        "pts": pa.array([[{"x": 1.0, "tags": ["a"]}, None], None, []], pa.list_(point)),
        "fixed": pa.array([[1, 2], [3, None], None], pa.list_(pa.int16(), 2)),
        "n": pa.nulls(3),
        "b": [True, None, False],
    })
    expected = msgpack_rows([
        {"pts": [{"x": 1.0, "tags": ["a"]}, None], "fixed": [1, 2], "n": None, "b": True},
        {"pts": None, "fixed": [3, None], "n": None, "b": None},
        {"pts": [], "fixed": None, "n": None, "b": False},
    ])
    assert kernels.encode_msgpack_rows(batch) == expected
    assert kernels.encode_msgpack_rows(batch.slice(2)) == expected[2:]


def test_msgpack_empty_batch(kernels):
    assert kernels.encode_msgpack_rows(pa.record_batch({"a": pa.array([], pa.int64())})) == []


# -- property tests: compiled equals twin -----------------------------------------------

FIELD_NAMES = st.text(min_size=0, max_size=6)
TIMESTAMP_RANGES = {  # years 1 to 9999 in each unit
    "s": (-62135596800, 253402300799),
    "ms": (-62135596800_000, 253402300799_999),
    "us": (-62135596800_000_000, 253402300799_999_999),
    "ns": (-(2**63) + 1, 2**63 - 1),
}
ZONES = [None, "UTC", "+05:30", "-04:30", "+00:00"]


def leaf_types():
    integer_types = [t for t, _, _ in INT_LIMITS]
    timestamps = [pa.timestamp(unit, tz=zone) for unit in TIMESTAMP_RANGES for zone in ZONES]
    return st.sampled_from([pa.null(), pa.bool_(), pa.float32(), pa.float64(), pa.string(),
                            pa.large_string(), *integer_types, *timestamps])


def nested_types(children):
    fields = st.lists(st.tuples(FIELD_NAMES, children), min_size=1, max_size=3,
                      unique_by=lambda field: field[0])
    return st.one_of(
        children.map(pa.list_),
        children.map(pa.large_list),
        st.tuples(children, st.integers(1, 3)).map(lambda item: pa.list_(*item)),
        fields.map(pa.struct),
    )


ARROW_TYPES = st.recursive(leaf_types(), nested_types, max_leaves=5)
FLOATS = st.one_of(st.floats(), st.sampled_from([0.0, -0.0, math.nan, math.inf, 5e-324,
                                                 1.7976931348623157e308, 1e16, 1e-5]))


def values_of(arrow_type):
    """A strategy for one Python value (or None) of ``arrow_type``."""
    nullable = lambda strategy: st.one_of(st.none(), strategy)  # noqa: E731

    if pa.types.is_null(arrow_type):
        return st.none()
    if pa.types.is_boolean(arrow_type):
        return nullable(st.booleans())
    if pa.types.is_integer(arrow_type):
        low, high = next((lo, hi) for t, lo, hi in INT_LIMITS if t == arrow_type)
        return nullable(st.one_of(st.integers(low, high), st.sampled_from([low, high, 0])))
    if pa.types.is_float32(arrow_type):
        return nullable(st.floats(width=32))
    if pa.types.is_float64(arrow_type):
        return nullable(FLOATS)
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return nullable(st.text(max_size=12))

    if pa.types.is_timestamp(arrow_type):
        low, high = TIMESTAMP_RANGES[arrow_type.unit]
        if arrow_type.tz not in (None, "UTC", "+00:00"):
            # Keep the wall time in the zone inside datetime's years as well. Nanosecond
            # values keep no margin: both encoders handle the int64 ends there.
            margin = 86400 * {"s": 1, "ms": 10**3, "us": 10**6, "ns": 0}[arrow_type.unit]
            low, high = low + margin, high - margin
        return nullable(st.integers(low, high))

    if pa.types.is_fixed_size_list(arrow_type):
        item = values_of(arrow_type.value_type)
        size = arrow_type.list_size
        return nullable(st.lists(item, min_size=size, max_size=size))
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return nullable(st.lists(values_of(arrow_type.value_type), max_size=4))
    if pa.types.is_struct(arrow_type):
        members = {field.name: values_of(field.type) for field in arrow_type}
        return nullable(st.fixed_dictionaries(members))
    raise AssertionError(f"no value strategy for {arrow_type}")


@st.composite
def record_batches(draw, binary=False):
    """A batch of 0 to 12 rows and 1 to 4 columns of random, possibly nested, types."""
    types = ARROW_TYPES
    if binary:
        types = st.one_of(types, st.sampled_from([pa.binary(), pa.large_binary()]))
    names = draw(st.lists(FIELD_NAMES, min_size=1, max_size=4, unique=True))
    rows = draw(st.integers(0, 12))
    arrays = []
    for _ in names:
        arrow_type = draw(types)
        if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
            strategy = st.one_of(st.none(), st.binary(max_size=12))
        else:
            strategy = values_of(arrow_type)
        values = draw(st.lists(strategy, min_size=rows, max_size=rows))
        arrays.append(pa.array(values, type=arrow_type))
    batch = pa.RecordBatch.from_arrays(arrays, names=names)
    start = draw(st.integers(0, rows))
    return batch.slice(start, draw(st.integers(0, rows - start)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=record_batches())
def test_json_compiled_equals_twin(compiled, batch):
    assert outcome(compiled.encode_json_rows, batch) == outcome(_twins.encode_json_rows, batch)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=record_batches(binary=True))
def test_msgpack_compiled_equals_twin(compiled, batch):
    assert outcome(compiled.encode_msgpack_rows, batch) == \
        outcome(_twins.encode_msgpack_rows, batch)


@settings(max_examples=150, deadline=None)
@given(values=st.lists(FLOATS, max_size=20))
def test_json_floats_compiled_equals_twin(compiled, values):
    batch = pa.record_batch({"x": pa.array(values, pa.float64())})
    assert compiled.encode_json_rows(batch) == _twins.encode_json_rows(batch)
