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
