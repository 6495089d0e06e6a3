"""The records kernel: columns of fetched ConsumerRecords, on both implementations.

Includes the JSON codec reading the values the kernel joined, and a round
trip through the broker: records fetched by aiokafka become the same
columns in both implementations and the same batch as before.
"""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from sabot.agents.records import build_batch
from sabot.codecs import JsonCodec, get_codec
from sabot.ext import _twins
from tests import test_ext
from tests.kafka_helpers import create_topic, produce

# The fixtures of test_ext.py: each implementation in turn, and the compiled one.
kernels = test_ext.kernels
compiled = test_ext.compiled

TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")


def record(offset, key, value, timestamp=1_700_000_000_000, partition=0):
    return ConsumerRecord(topic="orders", partition=partition, offset=offset,
                          timestamp=timestamp, timestamp_type=0, key=key, value=value,
                          checksum=None, serialized_key_size=len(key or b""),
                          serialized_value_size=len(value or b""), headers=[])


def assert_same_columns(left, right):
    assert left.values == right.values
    assert left.keys.type == right.keys.type == pa.binary()
    assert left.keys.equals(right.keys)
    assert left.offsets.dtype == right.offsets.dtype == np.int64
    assert np.array_equal(left.offsets, right.offsets)
    assert left.timestamps.type == right.timestamps.type == TIMESTAMP_TYPE
    assert left.timestamps.equals(right.timestamps)
    assert left.joined == right.joined


def test_record_columns_values_keys_offsets(kernels):
    records = [record(10, b"k1", b'{"a":1}', timestamp=5),
               record(11, None, b'{"a":2}', timestamp=-1),
               record(12, b"", None, timestamp=7)]
    columns = kernels.record_columns(records)
    assert columns.values == [b'{"a":1}', b'{"a":2}', None]
    assert columns.keys.to_pylist() == [b"k1", None, b""]
    assert columns.keys.null_count == 1
    assert columns.offsets.tolist() == [10, 11, 12]
    assert columns.timestamps.type == TIMESTAMP_TYPE
    assert columns.timestamps.cast(pa.int64()).to_pylist() == [5, -1, 7]
    assert columns.joined is None


def test_record_columns_joined_values(kernels):
    records = [record(0, None, b'{"a":1}'), record(1, None, None), record(2, None, b""),
               record(3, None, b'{\n"a": 2\n}'), record(4, None, b"[]")]
    joined = kernels.record_columns(records, join_values=True).joined
    assert joined.data == b'{"a":1}\n{\n"a": 2\n}\n[]'
    assert joined.count == 3
    assert joined.empty_count == 2
    assert joined.newline_in_values is True


def test_record_columns_without_newlines(kernels):
    records = [record(i, b"k", b'{"i":%d}' % i) for i in range(3)]
    joined = kernels.record_columns(records, join_values=True).joined
    assert joined.data == b'{"i":0}\n{"i":1}\n{"i":2}'
    assert (joined.count, joined.empty_count, joined.newline_in_values) == (3, 0, False)


def test_record_columns_empty_fetch(kernels):
    columns = kernels.record_columns([], join_values=True)
    assert columns.values == []
    assert len(columns.keys) == 0
    assert len(columns.offsets) == 0
    assert len(columns.timestamps) == 0
    assert columns.joined.data == b""
    assert columns.joined.count == 0


def test_record_columns_non_bytes_value_rejected(kernels):
    with pytest.raises(TypeError, match="must be bytes"):
        kernels.record_columns([record(0, None, "text")], join_values=True)
    # Without joining, values pass through unchanged whatever their type.
    assert kernels.record_columns([record(0, None, "text")]).values == ["text"]


def test_record_columns_non_bytes_keys_match_twin(compiled):
    records = [record(0, bytearray(b"ab"), b"1"), record(1, None, b"2"), record(2, b"c", b"3")]
    assert_same_columns(compiled.record_columns(records), _twins.record_columns(records))


RECORDS = st.lists(
    st.builds(
        record,
        offset=st.integers(0, 2**62),
        key=st.one_of(st.none(), st.binary(max_size=16)),
        value=st.one_of(st.none(), st.just(b""), st.binary(max_size=24),
                        st.sampled_from([b"\n", b'{"a":\n1}', b'{"a":1}'])),
        timestamp=st.integers(-1, 2**45),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(records=RECORDS, join_values=st.booleans())
def test_record_columns_compiled_equals_twin(compiled, records, join_values):
    assert_same_columns(compiled.record_columns(records, join_values),
                        _twins.record_columns(records, join_values))


# -- the JSON codec on joined values ----------------------------------------------------


@pytest.mark.parametrize("values", [
    [b'{"id":1,"amount":5.5}', b'{"id":2,"amount":60}'],
    [b'{"id":1}', None, b"", b'{"id":2,\n"x":"y"}'],
    [b'{"id":1}', b"not json", b'{"id":3}'],
    [None, b""],
])
def test_json_decode_joined_equals_plain(kernels, values):
    codec = JsonCodec()
    records = [record(i, None, v) for i, v in enumerate(values)]
    columns = kernels.record_columns(records, join_values=True)
    joined = codec.decode(columns.values, joined=columns.joined)
    plain = codec.decode(values)
    assert joined.batch.equals(plain.batch)
    assert joined.rows_from.tolist() == plain.rows_from.tolist()
    assert joined.errors == plain.errors


# -- through the broker -----------------------------------------------------------------


async def fetch_all(bootstrap: str, topic: str, expected: int, partitions: int):
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    by_partition: dict[int, list] = {p: [] for p in range(partitions)}
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(100):
            fetched = await consumer.getmany(timeout_ms=200)
            for tp, records in fetched.items():
                by_partition[tp.partition].extend(records)
            # Counting records decides when the topic has been read: Tansu can
            # report end offsets below what a partition holds.
            if sum(len(r) for r in by_partition.values()) >= expected:
                break
    finally:
        await consumer.stop()
    return by_partition


@pytest.mark.broker
async def test_fetched_records_same_columns_and_batch(kernels, broker, topic):
    await create_topic(broker, topic, 2)
    # Every 4th key is null, every 13th value empty (a dead letter), every
    # 9th value pretty-printed across lines.
    messages = [(b"k%d" % (i % 5) if i % 4 else None,
                 orjson.dumps({"id": i, "amount": i * 1.5},
                              option=orjson.OPT_INDENT_2 if i % 9 == 0 else None)
                 if i % 13 else b"")
                for i in range(400)]
    await produce(broker, topic, messages)
    fetched = await fetch_all(broker, topic, len(messages), 2)
    assert sum(len(r) for r in fetched.values()) == len(messages)

    codec = get_codec("json")
    seen_ids = []
    for partition, records in fetched.items():
        columns = kernels.record_columns(records, join_values=True)
        assert_same_columns(columns, _twins.record_columns(records, join_values=True))
        assert columns.offsets.tolist() == [r.offset for r in records]
        assert columns.joined.newline_in_values

        batch, decoded, offsets = build_batch(records, partition, codec)
        plain = codec.decode([r.value for r in records])
        assert decoded.batch.equals(plain.batch)
        assert len(decoded.errors) == sum(1 for r in records if not r.value)
        assert batch.column("_key").to_pylist() == [records[i].key for i in decoded.rows_from]
        assert batch.column("_offset").to_pylist() == offsets[decoded.rows_from].tolist()
        seen_ids.extend(batch.column("id").to_pylist())
    assert sorted(seen_ids) == [i for i in range(400) if i % 13]
