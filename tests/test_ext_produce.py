"""The record batch encoder for the producer, and TopicSink sending its batches.

Every kernel test runs on both implementations through the ``kernels``
fixture. The property test compares the compiled kernel with the twin, and
the batches are read back with sabot's parser and with aiokafka's. The
broker tests send through TopicSink and read every message back.
"""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.record.default_records import DefaultRecordBatch
from aiokafka.record.util import calc_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from sabot import ext
from sabot.agents.sink import EncodedBatch, TopicSink, encoded_batch_size
from sabot.codecs import get_codec
from sabot.errors import ConfigError
from sabot.ext import _twins
from tests import test_ext
from tests.kafka_helpers import create_topic, read_topic

TIMESTAMP = 1_700_000_000_123
HEADER_SIZE = 61
PARTITIONS = 4

# The fixtures of test_ext.py: each implementation in turn, and the compiled one.
kernels = test_ext.kernels
compiled = test_ext.compiled


def encode_all(kernels, keys, values, rows, max_bytes, timestamp=TIMESTAMP):
    """Encode every row, one batch per call as the sink does; return the batches."""
    rows = np.asarray(rows, dtype=np.int64)
    batches = []
    start = 0
    while start < len(rows):
        batch, written = kernels.encode_record_batch(keys, values, rows[start:], timestamp,
                                                     max_bytes)
        assert written > 0
        batches.append((batch, written))
        start += written
    return batches


def aiokafka_records(batch: bytes) -> list:
    parsed = DefaultRecordBatch(batch)
    return list(parsed)


# -- the bytes ------------------------------------------------------------------------------


def test_selected_kernel_is_exported():
    assert ext.encode_record_batch is ext.kernels.encode_record_batch
    assert "encode_record_batch" in ext.__all__


def test_batch_equals_aiokafka_batch_builder(kernels):
    keys = [b"alpha", None, b"", b"k" * 200]
    values = [b'{"id": 1}', b"", None, b"v" * 5000]
    builder = BatchBuilder(1 << 20, 0)
    for key, value in zip(keys, values, strict=True):
        assert builder.append(timestamp=TIMESTAMP, key=key, value=value) is not None
    expected = bytes(builder._build())

    batch, written = kernels.encode_record_batch(keys, values, range(4), TIMESTAMP, 1 << 20)

    assert written == 4
    assert batch == expected


def test_batch_header_fields(kernels):
    values = [b"a", b"bb", b"ccc"]
    batch, written = kernels.encode_record_batch(None, values, np.array([2, 0]), TIMESTAMP,
                                                 4096)
    parsed = DefaultRecordBatch(batch)

    assert written == 2
    assert parsed.base_offset == 0
    assert parsed.magic == 2
    assert parsed.attributes == 0
    assert parsed.compression_type == 0
    assert parsed.timestamp_type == 0
    assert not parsed.is_transactional
    assert parsed.last_offset_delta == 1
    assert parsed.first_timestamp == TIMESTAMP
    assert parsed.max_timestamp == TIMESTAMP
    assert parsed.producer_id == -1
    assert parsed.producer_epoch == -1
    assert parsed.base_sequence == 0
    assert parsed.validate_crc()
    assert int.from_bytes(batch[8:12], "big") == len(batch) - 12
    assert int.from_bytes(batch[12:16], "big", signed=True) == -1


def test_records_parsed_by_aiokafka(kernels):
    keys = [b"k0", None, b"", b"k3"]
    values = [b"v0", b"v1", None, b""]
    rows = [3, 1, 0, 2, 1]
    batch, written = kernels.encode_record_batch(keys, values, rows, TIMESTAMP, 4096)
    records = aiokafka_records(batch)

    assert written == 5
    assert [r.offset for r in records] == [0, 1, 2, 3, 4]
    assert [r.timestamp for r in records] == [TIMESTAMP] * 5
    assert [r.key for r in records] == [keys[i] for i in rows]
    assert [r.value for r in records] == [values[i] for i in rows]
    assert [r.headers for r in records] == [[]] * 5


def test_records_parsed_by_sabot(kernels):
    keys = [b"k0", None, b"", b"k3"]
    values = [b"v0", b"v1", None, b""]
    rows = np.array([0, 1, 2, 3], dtype=np.int64)
    batch, _ = kernels.encode_record_batch(keys, values, rows, TIMESTAMP, 4096)

    for parse in (_twins.parse_record_batches, ext.parse_record_batches):
        columns = parse(batch, 0, check_crcs=True)
        assert columns.offsets.tolist() == [0, 1, 2, 3]
        assert columns.timestamps.cast(pa.int64()).to_pylist() == [TIMESTAMP] * 4
        assert columns.keys.to_pylist() == keys
        assert columns.values.to_pylist() == values
        assert columns.parsed_bytes == len(batch)
        assert columns.next_offset == 4


def test_no_keys_writes_null_keys(kernels):
    batch, written = kernels.encode_record_batch(None, [b"x", b"y"], range(2), TIMESTAMP, 4096)

    assert written == 2
    assert [r.key for r in aiokafka_records(batch)] == [None, None]


def test_empty_rows_return_no_batch(kernels):
    assert kernels.encode_record_batch(None, [b"x"], range(0), TIMESTAMP, 4096) == (b"", 0)
    empty = np.array([], dtype=np.int64)
    assert kernels.encode_record_batch([b"k"], [b"x"], empty, TIMESTAMP, 4096) == (b"", 0)


def test_crc32c_equals_aiokafka(compiled):
    from sabot.ext._produce import crc32c

    data = os.urandom(300)
    for start in range(9):
        for length in [*range(0, 40), 255, 291 - start]:
            chunk = data[start:start + length]
            assert crc32c(chunk) == calc_crc32c(chunk), (start, length)


# -- the size limit -------------------------------------------------------------------------


def test_batch_stops_at_max_bytes(kernels):
    values = [b"x" * 100] * 10
    # Each record: length varint 2 bytes + attributes, timestamp delta, offset
    # delta, key length, value length varint 2 bytes, 100 value bytes, header count.
    record = 2 + 1 + 1 + 1 + 1 + 2 + 100 + 1
    max_bytes = HEADER_SIZE + 3 * record

    batch, written = kernels.encode_record_batch(None, values, range(10), TIMESTAMP, max_bytes)

    assert written == 3
    assert len(batch) == max_bytes


def test_limit_one_byte_short(kernels):
    values = [b"x" * 100] * 10
    record = 109
    batch, written = kernels.encode_record_batch(None, values, range(10), TIMESTAMP,
                                                 HEADER_SIZE + 3 * record - 1)

    assert written == 2
    assert len(batch) == HEADER_SIZE + 2 * record


def test_split_batches_cover_every_row(kernels):
    values = [bytes([i % 251]) * (i * 7 % 300) for i in range(200)]
    keys = [None if i % 5 == 0 else b"key-%d" % i for i in range(200)]
    rows = np.arange(200)[::-1]
    max_bytes = 1500

    batches = encode_all(kernels, keys, values, rows, max_bytes)

    assert len(batches) > 1
    read_keys, read_values = [], []
    for batch, written in batches:
        assert len(batch) <= max_bytes
        records = aiokafka_records(batch)
        assert len(records) == written
        assert [r.offset for r in records] == list(range(written))
        read_keys.extend(r.key for r in records)
        read_values.extend(r.value for r in records)
    assert read_keys == [keys[i] for i in rows]
    assert read_values == [values[i] for i in rows]


def test_row_too_large_goes_alone(kernels):
    values = [b"v" * 500, b"small"]

    batch, written = kernels.encode_record_batch([b"key", b"k"], values, range(2),
                                                 TIMESTAMP, 400)

    assert written == 1
    assert len(batch) > 400
    assert [r.value for r in aiokafka_records(batch)] == [b"v" * 500]


def test_large_second_row_ends_batch(kernels):
    values = [b"small", b"v" * 500]

    batch, written = kernels.encode_record_batch(None, values, range(2), TIMESTAMP, 400)

    assert written == 1
    assert [r.value for r in aiokafka_records(batch)] == [b"small"]
    batch, written = kernels.encode_record_batch(None, values, range(1, 2), TIMESTAMP, 400)
    assert written == 1
    assert [r.value for r in aiokafka_records(batch)] == [b"v" * 500]


# -- invalid input --------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [[3], [-1]])
def test_row_out_of_range_raises(kernels, rows):
    with pytest.raises(IndexError, match=f"row {rows[0]} is out of range for 3 values"):
        kernels.encode_record_batch(None, [b"a", b"b", b"c"], rows, TIMESTAMP, 4096)


def test_value_not_bytes_raises(kernels):
    with pytest.raises(TypeError, match="a Kafka value must be bytes or None, got str at row 1"):
        kernels.encode_record_batch(None, [b"a", "b"], range(2), TIMESTAMP, 4096)


def test_key_not_bytes_raises(kernels):
    with pytest.raises(TypeError, match="a Kafka key must be bytes or None, got int at row 0"):
        kernels.encode_record_batch([7], [b"a"], range(1), TIMESTAMP, 4096)


def test_keys_length_mismatch_raises(kernels):
    with pytest.raises(ValueError, match="got 1 keys and 2 values"):
        kernels.encode_record_batch([b"k"], [b"a", b"b"], range(2), TIMESTAMP, 4096)


@pytest.mark.parametrize("max_bytes", [0, -5, 1.5, True])
def test_invalid_max_bytes_raises(kernels, max_bytes):
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        kernels.encode_record_batch(None, [b"a"], range(1), TIMESTAMP, max_bytes)


def test_float_rows_raise(kernels):
    with pytest.raises(TypeError, match="rows must be integers"):
        kernels.encode_record_batch(None, [b"a"], np.array([0.0]), TIMESTAMP, 4096)


def test_timestamp_not_integer_raises(kernels):
    with pytest.raises(TypeError, match="timestamp_ms must be an integer"):
        kernels.encode_record_batch(None, [b"a"], range(1), 1.5, 4096)


# -- compiled against twin ------------------------------------------------------------------

FIELD = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=120, max_size=600),
)
ROWS = st.lists(
    st.tuples(st.one_of(st.none(), FIELD), st.one_of(st.none(), FIELD)),
    min_size=1, max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(rows=ROWS, data=st.data(), keyed=st.booleans(),
       max_bytes=st.integers(min_value=HEADER_SIZE, max_value=3000),
       timestamp=st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_compiled_equals_twin(compiled, rows, data, keyed, max_bytes, timestamp):
    keys = [key for key, _ in rows] if keyed else None
    values = [value for _, value in rows]
    subset = data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=80))
    indices = np.array(subset, dtype=np.int64)

    start = 0
    while start < len(indices):
        outcomes = []
        for kernels in (compiled, _twins):
            outcomes.append(kernels.encode_record_batch(keys, values, indices[start:],
                                                        timestamp, max_bytes))
        assert outcomes[0] == outcomes[1]
        batch, written = outcomes[0]
        # Only a batch of one row may exceed the limit: that row alone does.
        assert len(batch) <= max_bytes or written == 1
        records = aiokafka_records(batch)
        assert DefaultRecordBatch(batch).validate_crc()
        assert [r.key for r in records] == [keys[i] if keyed else None
                                            for i in indices[start:start + written]]
        assert [r.value for r in records] == [values[i] for i in indices[start:start + written]]
        start += written


# -- TopicSink ------------------------------------------------------------------------------


def test_encoded_batch_interface():
    batch = EncodedBatch(b"\x00" * 70, 3)

    assert batch._build() == b"\x00" * 70
    assert batch.size() == 70
    assert batch.record_count() == 3
    assert batch.closed()
    batch.close()
    assert batch.closed()
    assert batch.append(timestamp=None, key=b"k", value=b"v", headers=[]) is None
    with pytest.raises(ConfigError, match="idempotent or transactional"):
        batch._set_producer_state(5, 0, 0)


async def test_sink_path_follows_producer_settings(broker):
    # The producers are never started: the sink reads only their settings.
    plain = AIOKafkaProducer(bootstrap_servers=broker, max_batch_size=4096)
    gzip = AIOKafkaProducer(bootstrap_servers=broker, compression_type="gzip")
    idempotent = AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=True)
    try:
        assert encoded_batch_size(plain, "t") == 4096
        assert encoded_batch_size(gzip, "t") is None
        assert encoded_batch_size(idempotent, "t") is None
    finally:
        for producer in (plain, gzip, idempotent):
            await producer.stop()


@pytest.mark.broker
async def test_sink_sends_row_larger_than_batch(broker, topic):
    await create_topic(broker, topic, PARTITIONS)
    producer = AIOKafkaProducer(bootstrap_servers=broker, max_batch_size=1024)
    await producer.start()
    sink = TopicSink(producer, topic, get_codec("raw"), PARTITIONS)
    batch = pa.record_batch({"value": pa.array([b"v" * 2000, b"small"])})
    try:
        await asyncio.gather(*await sink.send(batch))
    finally:
        await producer.stop()
    records = await read_topic(broker, topic, expected=2)
    assert sorted(r.value for r in records) == [b"small", b"v" * 2000]


def keyed_rows(count: int) -> pa.RecordBatch:
    """Rows with some null and empty keys, some null values and values of varied size."""
    keys, values = [], []
    for i in range(count):
        if i % 9 == 0:
            keys.append(None)
        elif i % 13 == 0:
            keys.append(b"")
        else:
            keys.append(b"customer-%d" % (i % 37))
        values.append(None if i % 17 == 0 else b"value-%d-" % i + b"x" * (i % 50))
    return pa.record_batch({"value": pa.array(values, pa.binary()),
                            "_key": pa.array(keys, pa.binary())})


@pytest.mark.broker
@pytest.mark.parametrize("compression", [None, "gzip"])
async def test_sink_keyed_and_unkeyed_rows(broker, topic, compression):
    await create_topic(broker, topic, PARTITIONS)
    # A small batch size makes each partition's rows span several batches.
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=5, max_batch_size=2048,
                                compression_type=compression)
    await producer.start()
    sink = TopicSink(producer, topic, get_codec("raw"), PARTITIONS)
    assert (sink._max_batch_size is None) == (compression is not None)
    keyed = keyed_rows(600)
    unkeyed = pa.record_batch({"value": pa.array([b"plain-%d" % i for i in range(300)])})
    started_ms = time.time_ns() // 1_000_000
    try:
        await asyncio.gather(*await sink.send(keyed))
        futures = await sink.send(unkeyed)
        # producer.send() appends to the partition's last queued batch, or
        # starts a new one when that batch is an EncodedBatch.
        futures.append(await producer.send(topic, b"after", partition=1))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    finished_ms = time.time_ns() // 1_000_000

    records = await read_topic(broker, topic, expected=901)

    # The sink's round-robin starts at partition 0: the keyed batch's rows
    # without a key go there, and the whole unkeyed batch goes to partition 1.
    keys = keyed.column("_key").to_pylist()
    values = keyed.column("value").to_pylist()
    partitions = ext.partitions_for_keys(keys, PARTITIONS)
    partitions[partitions < 0] = 0
    expected = {p: [] for p in range(PARTITIONS)}
    for key, value, partition in zip(keys, values, partitions.tolist(), strict=True):
        expected[partition].append((key, value))
    expected[1].extend((None, value) for value in unkeyed.column("value").to_pylist())
    expected[1].append((None, b"after"))

    assert len(records) == 901
    for partition in range(PARTITIONS):
        in_partition = sorted((r for r in records if r.partition == partition),
                              key=lambda r: r.offset)
        assert [(r.key, r.value) for r in in_partition] == expected[partition], partition
    for record in records:
        assert record.timestamp_type == 0
        assert started_ms <= record.timestamp <= finished_ms
