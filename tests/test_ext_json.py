"""The JSON decode kernel: compiled reader against Arrow's reader (the twin).

``decode_json_objects`` must return what ``pyarrow.json.read_json`` returns.
The compiled kernel reads flat objects itself and declines the rest, which
then goes to the twin. ``read_flat_objects`` is its reader alone, so the
tests can tell a read from a decline.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sabot.ext import _twins
from tests import test_ext

# The fixtures of test_ext.py: each implementation in turn, and the compiled one.
kernels = test_ext.kernels
compiled = test_ext.compiled


def _json_module():
    # An ImportError here fails the test: only SABOT_NO_EXTENSIONS skips it.
    from sabot.ext import _json

    return _json


@pytest.fixture(scope="module")
def fast(compiled):
    """The compiled JSON module, for comparing it with the twin (skipped with the twins)."""
    return _json_module()


@pytest.fixture
def kernel(kernels):
    """Each implementation in turn: None means the twin, which has no reader of its own."""
    return None if kernels is _twins else _json_module()


def lines(*objects: bytes) -> tuple[bytes, int]:
    return b"\n".join(objects), len(objects)


def assert_same(got: pa.RecordBatch | None, expected: pa.RecordBatch | None) -> None:
    """Equal batches: schema, values, nulls, and the sign of each zero."""
    if expected is None:
        assert got is None
        return
    assert got is not None
    assert got.schema.equals(expected.schema), (got.schema, expected.schema)
    assert got.num_rows == expected.num_rows
    assert got.equals(expected), (got.to_pylist(), expected.to_pylist())
    for name in expected.schema.names:
        column = expected.column(name)
        if pa.types.is_floating(column.type):
            mine = got.column(name).to_numpy(zero_copy_only=False)
            theirs = column.to_numpy(zero_copy_only=False)
            present = ~np.isnan(theirs)
            assert np.array_equal(np.signbit(mine[present]), np.signbit(theirs[present]))


def check(fast, data: bytes, count: int, *, must_read: bool) -> pa.RecordBatch | None:
    """Compare the compiled reader with the twin; ``must_read`` forbids a decline.

    With ``fast`` None, only the twin runs and its batch is returned.
    """
    expected = _twins.decode_json_objects(data, count)
    if fast is None:
        return expected
    direct = fast.read_flat_objects(data, count)
    if must_read:
        assert direct is not None, data[:200]
        assert_same(direct, expected)
    else:
        assert direct is None, data[:200]
    assert_same(fast.decode_json_objects(data, count), expected)
    return expected


# -- what the compiled reader reads ------------------------------------------------------


def test_flat_orders(kernel):
    data, count = lines(b'{"id":1,"user":"u-1","amount":52.53,"paid":true,"note":null}',
                        b'{"id":2,"user":"u-2","amount":7,"paid":false,"note":"gift"}')
    batch = check(kernel, data, count, must_read=True)
    assert batch.schema.types == [pa.int64(), pa.string(), pa.float64(), pa.bool_(),
                                  pa.string()]
    assert batch.column("amount").to_pylist() == [52.53, 7.0]


def test_int_column_widens_to_double(kernel):
    data, count = lines(b'{"a":1}', b'{"a":null}', b'{"a":2.5}', b'{"a":-3}')
    batch = check(kernel, data, count, must_read=True)
    assert batch.column("a").to_pylist() == [1.0, None, 2.5, -3.0]


def test_field_order_and_missing_fields(kernel):
    data, count = lines(b'{"b":1}', b'{"a":"x","b":2}', b'{}', b'{"c":null,"a":"y"}')
    batch = check(kernel, data, count, must_read=True)
    assert batch.schema.names == ["b", "a", "c"]
    assert batch.column("c").type == pa.null()


def test_whitespace_and_escapes(kernel):
    data, count = lines(b' { "a" : "tab\\there \\"q\\" \\\\ \\/ \\b\\f\\r" , "b" :1 } ',
                        b'{"a":"\\u00e9\\u4e2d\\ud83d\\ude00","b":2}')
    batch = check(kernel, data, count, must_read=True)
    assert batch.column("a").to_pylist() == ['tab\there "q" \\ / \b\f\r', "é中😀"]


def test_keys_with_escapes_and_utf8(kernel):
    data, count = lines('{"\\u00e9t\\u00e9":1,"naïve":2}'.encode(),
                        '{"été":3,"naïve":4}'.encode())
    batch = check(kernel, data, count, must_read=True)
    assert batch.schema.names == ["été", "naïve"]


def test_integers_at_int64_limits(kernel):
    data, count = lines(b'{"a":9223372036854775807}', b'{"a":-9223372036854775808}',
                        b'{"a":0}')
    batch = check(kernel, data, count, must_read=True)
    assert batch.column("a").to_pylist() == [2**63 - 1, -(2**63), 0]


@pytest.mark.parametrize("text", [
    b"0.1", b"-0.0", b"1e22", b"1e23", b"1.7976931348623157e308", b"5e-324",
    b"2.2250738585072014e-308", b"123456789012345678.5", b"0.30000000000000004",
    b"9007199254740993.0", b"1E+2", b"1e-7", b"-1.5e-10",
])
def test_doubles_round_as_arrow_does(fast, text):
    data, count = lines(b'{"a":' + text + b"}", b'{"a":1.5}')
    check(fast, data, count, must_read=True)


def test_timestamps_as_arrow_infers_them(kernel):
    data, count = lines(b'{"d":"2024-02-29","t":"1969-12-31T23:59:59","z":"2013-01-01 10:00:00Z"}',
                        b'{"d":null,"t":"0001-01-01T00:00:00","z":"9999-12-31T23:59:59Z"}')
    batch = check(kernel, data, count, must_read=True)
    assert batch.schema.types == [pa.timestamp("s")] * 3
    assert batch.column("t").cast(pa.int64()).to_pylist() == [-1, -62135596800]


@pytest.mark.parametrize("objects", [
    [b'{"a":"2024-01-31"}', b'{"a":"later"}'],
    [b'{"a":"soon"}', b'{"a":"2024-01-31"}'],
])
def test_dates_among_other_strings_stay_strings(kernel, objects):
    data, count = lines(*objects)
    assert check(kernel, data, count, must_read=True).schema.types == [pa.string()]


def test_pretty_printed_objects_span_lines(fast):
    value = b'{\n  "a": 1,\n  "b": "x"\n}'
    data = value + b"\n" + value
    expected = _twins.decode_json_objects(data, 2, newline_in_values=True)
    assert fast.read_flat_objects(data, 2, one_per_line=False) is not None
    assert_same(fast.decode_json_objects(data, 2, newline_in_values=True), expected)


# -- what it declines, and the reader's result it returns instead ----------------------


@pytest.mark.parametrize("objects", [
    [b'{"a":{"b":1}}'],                       # nested object
    [b'{"a":[1,2]}'],                         # list
    [b'{"a":1}', b'{"a":"x"}'],               # number then string
    [b'{"a":true}', b'{"a":1}'],              # bool then number
    [b'{"a":1,"a":2}'],                       # a field given twice
    [b'{"a":12345678901234567890}'],          # beyond int64: a double in Arrow
    [b'{"a":-0}', b'{"a":1.5}'],              # -0 becomes -0.0 in a double column
    [b'{"a":1e400}'],                         # too large for a double
    [b'{"a":1e-400}'],                        # rounds to zero
    [b'{"a":"2024-01-31T10:00+01:00"}'],      # ISO 8601 forms not read here
    [b'{"a":"2024-01-31T10:00:00.5"}'],
    [b'{"a":"2024-01-31T10"}'],
    [b'{"a":"1999-"}'],                       # starts like one
    [b'{"a":"2024-01-31"}', b'{"a":"2024-02-30"}'],
    [b'{"a":"\\ud83d"}'],                     # lone surrogate escape
    [b'{"a":"\xff"}'],                        # not UTF-8
    [b'{"a":"\xed\xa0\x80"}'],                # an encoded surrogate
    [b'{"a":"line\nbreak"}'],                 # raw control character in a string
    [b'{"a":01}'],                            # leading zero
    [b'{"a":1.}'],
    [b'{"a":tru}'],
    [b'{"a":1,}'],
    [b'{"a":1} {"a":2}'],                     # two objects on one line
    [b'[1,2]'],                               # not an object
    [b"{}", b"{}"],                           # no columns at all
])
def test_declines_and_returns_the_readers_answer(fast, objects):
    data, count = lines(*objects)
    check(fast, data, count, must_read=False)


def test_wrong_count_declines(fast):
    data, _ = lines(b'{"a":1}', b'{"a":2}')
    for count in (1, 3):
        assert fast.read_flat_objects(data, count) is None
        assert fast.decode_json_objects(data, count) is None


def test_explicit_schema_goes_to_the_reader(fast):
    data, count = lines(b'{"a":1}', b'{"a":2}')
    schema = pa.schema([("a", pa.float64())])
    batch = fast.decode_json_objects(data, count, False, schema)
    assert batch.schema == schema
    assert_same(batch, _twins.decode_json_objects(data, count, False, schema))


def test_non_bytes_input_goes_to_the_reader(fast):
    data, count = lines(b'{"a":1}', b'{"a":2}')
    assert_same(fast.decode_json_objects(bytearray(data), count),
                _twins.decode_json_objects(data, count))


# -- properties ---------------------------------------------------------------------------

FIELD_NAMES = st.sampled_from(["id", "user", "amount", "é", "a\"b", "k\\n", "Ω", "x y"])
KINDS = {
    "bool": st.booleans(),
    "int": st.integers(min_value=-(2**63), max_value=2**63 - 1),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "string": st.text(max_size=12).filter(lambda s: not (len(s) >= 5 and s[:4].isdigit()
                                                         and s[4] == "-")),
}


def dump(row: dict, style: str) -> bytes:
    if style == "compact":
        return json.dumps(row, ensure_ascii=False, separators=(",", ":")).encode()
    if style == "ascii":
        return json.dumps(row, ensure_ascii=True).encode()
    return json.dumps(row, ensure_ascii=False, separators=(" , ", " : ")).encode()


@st.composite
def flat_rows(draw):
    """Rows whose every field keeps one kind of value, with nulls and gaps."""
    names = draw(st.lists(FIELD_NAMES, min_size=1, max_size=5, unique=True))
    kinds = {name: draw(st.sampled_from(sorted(KINDS))) for name in names}
    rows = []
    for _ in range(draw(st.integers(min_value=1, max_value=30))):
        row = {}
        for name in draw(st.permutations(names)):
            choice = draw(st.integers(min_value=0, max_value=9))
            if choice == 0:
                continue
            row[name] = None if choice == 1 else draw(KINDS[kinds[name]])
        rows.append(row)
    return rows


TIMESTAMP_TEXT = st.tuples(
    st.datetimes(), st.sampled_from(["date", "T", " ", "TZ", " Z", "T+01:00", "T.5"]),
).map(lambda pair: _timestamp_text(*pair))


def _timestamp_text(moment, form: str) -> str:
    if form == "date":
        return moment.date().isoformat()
    text = moment.replace(microsecond=0).isoformat(sep=form[0])
    return text + form[1:] if form[1:] != ".5" else text + ".5"


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.none() | TIMESTAMP_TEXT, min_size=1, max_size=10))
def test_timestamp_strings_give_the_readers_result(fast, texts):
    data, count = lines(*(json.dumps({"at": text}).encode() for text in texts))
    expected = _twins.decode_json_objects(data, count)
    direct = fast.read_flat_objects(data, count)
    if direct is not None:
        assert_same(direct, expected)
    assert_same(fast.decode_json_objects(data, count), expected)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=flat_rows(), style=st.sampled_from(["compact", "ascii", "spaced"]))
def test_flat_rows_are_read_as_arrow_reads_them(fast, rows, style):
    data, count = lines(*(dump(row, style) for row in rows))
    expected = _twins.decode_json_objects(data, count)
    direct = fast.read_flat_objects(data, count)
    if any(row for row in rows):
        # Every row with at least one field gives the reader a column.
        assert direct is not None, data[:300]
    if direct is not None:
        assert_same(direct, expected)
    assert_same(fast.decode_json_objects(data, count), expected)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8) | st.sampled_from(["2024-01-31", "2024-01-31T10:00:00", "1999-"])
    | st.datetimes().map(lambda moment: moment.isoformat(sep=" ")),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b"]), children, max_size=2),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.dictionaries(st.sampled_from(["a", "b", "c"]), JSON_VALUES,
                                     max_size=3), min_size=1, max_size=8),
       style=st.sampled_from(["compact", "ascii", "spaced"]))
def test_any_rows_give_the_readers_result(fast, rows, style):
    data, count = lines(*(dump(row, style) for row in rows))
    expected = _twins.decode_json_objects(data, count)
    direct = fast.read_flat_objects(data, count)
    if direct is not None:
        assert_same(direct, expected)
    assert_same(fast.decode_json_objects(data, count), expected)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes_give_the_readers_result(fast, data):
    for count in (1, 2):
        expected = _twins.decode_json_objects(data, count)
        direct = fast.read_flat_objects(data, count)
        if direct is not None:
            assert_same(direct, expected)
        assert_same(fast.decode_json_objects(data, count), expected)
