"""Codecs: decode, encode and round trips, without a broker."""

from __future__ import annotations

import datetime as dt

import msgpack
import orjson
import pyarrow as pa
import pytest

from sabot.codecs import get_codec
from sabot.errors import CodecError, ConfigError


@pytest.fixture
def rows():
    return [
        {"id": 1, "name": "ann", "score": 1.5, "ok": True, "tags": ["a", "b"]},
        {"id": 2, "name": "bo \"quoted\"\n", "score": None, "ok": False, "tags": []},
        {"id": 3, "name": None, "score": -0.25, "ok": None, "tags": None},
    ]


@pytest.mark.parametrize("name", ["json", "msgpack", "arrow"])
def test_round_trip(name, rows):
    codec = get_codec(name)
    batch = pa.RecordBatch.from_pylist(rows)
    values = codec.encode(batch)
    assert len(values) == len(rows)
    decoded = codec.decode(values)
    assert decoded.errors == []
    assert decoded.rows_from.tolist() == [0, 1, 2]
    assert decoded.batch.to_pylist() == rows


def test_raw_round_trip():
    codec = get_codec("raw")
    decoded = codec.decode([b"\x00\x01", b"", None, b"text"])
    assert decoded.batch.column("value").to_pylist() == [b"\x00\x01", b"", None, b"text"]
    assert codec.encode(decoded.batch) == [b"\x00\x01", b"", None, b"text"]


def test_raw_encode_needs_value_column():
    batch = pa.RecordBatch.from_pylist([{"payload": b"x"}])
    with pytest.raises(CodecError, match="'value' column"):
        get_codec("raw").encode(batch)


def test_json_malformed_values_reported_with_index():
    values = [b'{"a": 1}', b"{broken", b'{"a": 2}', b"", None, b"[1, 2]", b'"text"',
              b'{"a": 3}']
    decoded = get_codec("json").decode(values)
    bad = dict(decoded.errors)
    assert sorted(bad) == [1, 3, 4, 5, 6]
    assert "invalid JSON" in bad[1]
    assert "empty value" in bad[3]
    assert "got list" in bad[5]
    assert "got str" in bad[6]
    assert decoded.rows_from.tolist() == [0, 2, 7]
    assert decoded.batch.column("a").to_pylist() == [1, 2, 3]


def test_json_pretty_printed_values():
    values = [b'{\n  "a": 1,\n  "b": "x"\n}', b'{"a": 2, "b": "y"}']
    decoded = get_codec("json").decode(values)
    assert decoded.errors == []
    assert decoded.batch.to_pylist() == [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]


def test_json_mixed_int_and_float_becomes_double():
    decoded = get_codec("json").decode([b'{"x": 1}', b'{"x": 2.5}'])
    assert decoded.batch.schema.field("x").type == pa.float64()


def test_json_explicit_schema():
    schema = pa.schema([("x", pa.float32()), ("y", pa.string())])
    decoded = get_codec("json", schema).decode([b'{"x": 1, "y": "a"}'])
    assert decoded.batch.schema.field("x").type == pa.float32()


def test_json_timestamps_decode_as_timestamps():
    decoded = get_codec("json").decode([b'{"t": "2013-01-01T10:15:00Z"}'])
    assert pa.types.is_timestamp(decoded.batch.schema.field("t").type)


def test_json_encode_matches_orjson(rows):
    batch = pa.RecordBatch.from_pylist(rows)
    assert get_codec("json").encode(batch) == [orjson.dumps(r) for r in rows]


def test_json_encode_timestamps():
    batch = pa.RecordBatch.from_pylist(
        [{"t": dt.datetime(2013, 1, 1, 10, 15, tzinfo=dt.timezone.utc)}])
    assert get_codec("json").encode(batch) == [b'{"t":"2013-01-01T10:15:00Z"}']


def test_msgpack_malformed_and_non_map():
    values = [msgpack.packb({"a": 1}), b"\xc1", msgpack.packb([1, 2]), None,
              msgpack.packb({"a": 2})]
    decoded = get_codec("msgpack").decode(values)
    assert [i for i, _ in decoded.errors] == [1, 2, 3]
    assert decoded.batch.column("a").to_pylist() == [1, 2]
    assert decoded.rows_from.tolist() == [0, 4]


def test_arrow_several_rows_per_message():
    codec = get_codec("arrow")
    batch = pa.RecordBatch.from_pylist([{"x": 1}, {"x": 2}])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    whole = sink.getvalue().to_pybytes()
    decoded = codec.decode([whole, b"garbage", codec.encode(batch)[0]])
    assert decoded.batch.column("x").to_pylist() == [1, 2, 1]
    assert decoded.rows_from.tolist() == [0, 0, 2]
    assert [i for i, _ in decoded.errors] == [1]


def test_arrow_schema_mismatch_is_an_error():
    codec = get_codec("arrow")
    first = codec.encode(pa.RecordBatch.from_pylist([{"x": 1}]))[0]
    other = codec.encode(pa.RecordBatch.from_pylist([{"y": "a"}]))[0]
    decoded = codec.decode([first, other])
    assert decoded.batch.num_rows == 1
    assert [i for i, _ in decoded.errors] == [1]


def test_unknown_codec_lists_choices():
    with pytest.raises(ConfigError, match=r"\['arrow', 'json', 'msgpack', 'raw'\]"):
        get_codec("avro")


# -- the types that earlier messages established ------------------------------------------


def decode_all(codec, *fetches):
    """Decode each fetch in turn with one codec; return the results."""
    return [codec.decode(list(values)) for values in fetches]


def test_missing_field_becomes_null_column():
    first, second = decode_all(get_codec("json"), [b'{"id": 1, "amount": 2.5}'],
                               [b'{"id": 2}'])
    assert second.batch.schema == first.batch.schema
    assert second.batch.to_pylist() == [{"id": 2, "amount": None}]


def test_int_and_double_merge_to_double():
    codec = get_codec("json")
    first, second, third = decode_all(codec, [b'{"x": 1}'], [b'{"x": 1.5}'], [b'{"x": 2}'])
    assert first.batch.schema.field("x").type == pa.int64()
    assert second.batch.schema.field("x").type == pa.float64()
    assert third.batch.column("x").to_pylist() == [2.0]
    assert codec.learned.field("x").type == pa.float64()


def test_value_of_other_type_is_an_error():
    codec = get_codec("json")
    _, second = decode_all(codec, [b'{"id": 1, "amount": 2.5}'],
                           [b'{"id": 2, "amount": 3}', b'{"id": 3, "amount": "lots"}',
                            b'{"id": 4}'])
    assert second.batch.column("id").to_pylist() == [2, 4]
    assert second.rows_from.tolist() == [0, 2]
    assert len(second.errors) == 1
    index, reason = second.errors[0]
    assert index == 1
    assert reason.startswith("field 'amount' is 'lots' (string), but earlier messages "
                             "made it double; send double values")


def test_wrong_type_alone_in_fetch_is_an_error():
    _, second = decode_all(get_codec("json"), [b'{"amount": 2.5}'], [b'{"amount": "lots"}'])
    assert second.batch.num_rows == 0
    assert [index for index, _ in second.errors] == [0]
    assert "field 'amount' is 'lots'" in second.errors[0][1]


def test_date_text_stays_string_in_string_column():
    _, second = decode_all(get_codec("json"), [b'{"note": "hello"}'],
                           [b'{"note": "2024-01-31"}'])
    assert second.errors == []
    assert second.batch.column("note").to_pylist() == ["2024-01-31"]
    assert second.batch.schema.field("note").type == pa.string()


def test_new_fields_follow_known_ones():
    codec = get_codec("json")
    _, second = decode_all(codec, [b'{"a": 1}'], [b'{"b": "x", "a": 2}'])
    assert second.batch.schema.names == ["a", "b"]
    assert codec.learned.names == ["a", "b"]


def test_declared_schema_error_names_field():
    codec = get_codec("json", pa.schema([("amount", pa.float64())]))
    decoded = codec.decode([b'{"amount": 1}', b'{"amount": "lots"}'])
    assert decoded.batch.column("amount").to_pylist() == [1.0]
    assert decoded.errors[0][0] == 1
    assert "but the schema of the dataflow made it double" in decoded.errors[0][1]


def test_msgpack_value_of_other_type_is_an_error():
    codec = get_codec("msgpack")
    _, second = decode_all(codec, [msgpack.packb({"amount": 2.5})],
                           [msgpack.packb({"amount": "lots"}), msgpack.packb({"id": 3})])
    assert second.batch.to_pylist() == [{"amount": None, "id": 3}]
    assert [index for index, _ in second.errors] == [0]
    assert "field 'amount' is 'lots'" in second.errors[0][1]
