"""The record batch kernel: raw Fetch response bytes to Arrow columns, on both implementations.

Batches are built with aiokafka's own ``DefaultRecordBatchBuilder``, and
aiokafka's ``MemoryRecords`` reading the same bytes is the reference the
columns are checked against. Real fetch responses are in test_fetch_broker.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pyarrow as pa
import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.legacy_records import LegacyRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.record.util import calc_crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from sabot.app.settings import Settings
from sabot.codecs import JsonCodec
from sabot.errors import ConfigError, CorruptRecordError
from sabot.ext import _twins
from sabot.kafka.fetch import PartitionBatch, TopicPartition, parse_partition
from tests import test_ext

# The fixtures of test_ext.py: each implementation in turn, and the compiled one.
kernels = test_ext.kernels
compiled = test_ext.compiled

TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")
GZIP, SNAPPY, LZ4, ZSTD = 1, 2, 3, 4
HAS_CRAMJAM = importlib.util.find_spec("cramjam") is not None


def record_batch(base_offset: int, records, compression: int = 0, base_timestamp: int = 1000,
                 control: bool = False, log_append_time: int | None = None) -> bytes:
    """Build one v2 record batch of ``(key, value, headers)`` records at consecutive offsets.

    ``control`` sets the control bit. ``log_append_time`` sets the timestamp
    type to LogAppendTime, with that maxTimestamp. Both recompute the CRC,
    as a broker that sets them does.
    """
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=compression,
                                        is_transactional=0, producer_id=-1, producer_epoch=-1,
                                        base_sequence=-1, batch_size=1 << 30)
    for delta, (key, value, headers) in enumerate(records):
        builder.append(delta, timestamp=base_timestamp + 7 * delta, key=key, value=value,
                       headers=list(headers))
    data = bytearray(builder.build())
    data[0:8] = base_offset.to_bytes(8, "big", signed=True)
    attributes = int.from_bytes(data[21:23], "big")
    if control:
        attributes |= 0x20
    if log_append_time is not None:
        attributes |= 0x08
        data[35:43] = log_append_time.to_bytes(8, "big", signed=True)
    if control or log_append_time is not None:
        data[21:23] = attributes.to_bytes(2, "big")
        data[17:21] = calc_crc32c(bytes(data[21:])).to_bytes(4, "big")
    return bytes(data)


def reference(data: bytes, fetch_offset: int) -> list[tuple]:
    """Read ``data`` with aiokafka: (offset, timestamp, key, value) of each record it returns."""
    rows = []
    records = MemoryRecords(data)
    while records.has_next():
        batch = records.next_batch()
        if getattr(batch, "is_control_batch", False):
            continue
        rows.extend((r.offset, r.timestamp, r.key, r.value) for r in batch
                    if r.offset >= fetch_offset)
    return rows


def rows_of(columns) -> list[tuple]:
    return list(zip(columns.offsets.tolist(), columns.timestamps.cast(pa.int64()).to_pylist(),
                    columns.keys.to_pylist(), columns.values.to_pylist(), strict=True))


def assert_same_columns(left, right):
    assert left.offsets.dtype == right.offsets.dtype == np.int64
    assert np.array_equal(left.offsets, right.offsets)
    assert left.timestamps.type == right.timestamps.type == TIMESTAMP_TYPE
    assert left.timestamps.equals(right.timestamps)
    assert left.keys.type == right.keys.type == pa.binary()
    assert left.keys.equals(right.keys)
    assert left.values.type == right.values.type == pa.binary()
    assert left.values.equals(right.values)
    assert left.joined == right.joined
    assert (left.next_offset, left.parsed_bytes, left.legacy_format) == \
        (right.next_offset, right.parsed_bytes, right.legacy_format)


MIXED = [(b"k0", b'{"a":0}', ()),
         (None, b'{"a":1}', [("trace", b"abc"), ("empty", None)]),
         (b"", b"", ()),
         (b"k3", None, [("h", b"")]),
         (None, None, ()),
         (b"k5", b'{\n"a": 5\n}', ())]


def test_batches_match_aiokafka_reading(kernels):
    data = (record_batch(0, MIXED) + record_batch(6, MIXED[:2]) +
            record_batch(8, MIXED[2:], base_timestamp=-1))
    columns = kernels.parse_record_batches(data, 0)
    assert rows_of(columns) == reference(data, 0)
    assert columns.offsets.tolist() == list(range(12))
    assert columns.keys.null_count == 4
    assert columns.values.null_count == 4
    assert columns.values.to_pylist()[2] == b""
    assert columns.joined is None
    assert (columns.next_offset, columns.parsed_bytes, columns.legacy_format) == \
        (12, len(data), False)


def test_joined_values_skip_null_and_empty(kernels):
    data = record_batch(0, MIXED)
    joined = kernels.parse_record_batches(data, 0, join_values=True).joined
    assert joined.data == b'{"a":0}\n{"a":1}\n{\n"a": 5\n}'
    assert (joined.count, joined.empty_count, joined.newline_in_values) == (3, 3, True)
    plain = kernels.parse_record_batches(record_batch(0, MIXED[:2]), 0, join_values=True)
    assert plain.joined.newline_in_values is False


def test_control_batch_is_skipped_but_advances(kernels):
    marker = [(b"\x00\x00\x00\x00", b"\x00\x00\x00\x00\x00\x00", ())]
    data = record_batch(0, MIXED[:2]) + record_batch(2, marker, control=True)
    columns = kernels.parse_record_batches(data, 0)
    assert columns.offsets.tolist() == [0, 1]
    assert columns.next_offset == 3
    only_control = kernels.parse_record_batches(record_batch(2, marker, control=True), 2)
    assert len(only_control.offsets) == 0
    assert only_control.next_offset == 3


def test_batch_starting_before_fetch_offset(kernels):
    data = record_batch(100, MIXED) + record_batch(106, MIXED)
    columns = kernels.parse_record_batches(data, 103, join_values=True)
    assert columns.offsets.tolist() == list(range(103, 112))
    assert rows_of(columns) == reference(data, 103)
    assert columns.joined.count == 4
    assert columns.next_offset == 112


def test_truncated_tail_is_left_for_next_fetch(kernels):
    first = record_batch(0, MIXED)
    second = record_batch(6, MIXED)
    whole = kernels.parse_record_batches(first, 0, join_values=True)
    for cut in (1, 11, 12, 17, 60, 61, len(second) - 1):
        columns = kernels.parse_record_batches(first + second[:cut], 0, join_values=True)
        assert_same_columns(columns, whole)
        assert columns.parsed_bytes == len(first)
        assert columns.next_offset == 6
    nothing = kernels.parse_record_batches(second[:40], 6)
    assert (len(nothing.offsets), nothing.next_offset, nothing.parsed_bytes) == (0, 6, 0)


def test_empty_data(kernels):
    columns = kernels.parse_record_batches(b"", 42, join_values=True)
    assert len(columns.offsets) == 0
    assert columns.joined == (b"", 0, 0, False)
    assert (columns.next_offset, columns.parsed_bytes) == (42, 0)


def test_log_append_time_uses_max_timestamp(kernels):
    data = record_batch(0, MIXED, log_append_time=1_700_000_000_123)
    columns = kernels.parse_record_batches(data, 0, check_crcs=True)
    assert columns.timestamps.cast(pa.int64()).to_pylist() == [1_700_000_000_123] * 6
    assert rows_of(columns) == reference(data, 0)


@pytest.mark.parametrize("compression", [GZIP, SNAPPY, LZ4, ZSTD],
                         ids=["gzip", "snappy", "lz4", "zstd"])
def test_compressed_batches(kernels, compression):
    if compression != GZIP and not HAS_CRAMJAM:
        pytest.skip("aiokafka reads snappy, lz4 and zstd with cramjam, which is not installed")
    records = [(b"k%d" % i, b'{"i":%d}' % i, [("h", b"%d" % i)]) for i in range(300)]
    data = (record_batch(0, records, compression) + record_batch(300, MIXED) +
            record_batch(306, records, compression))
    columns = kernels.parse_record_batches(data, 5, join_values=True, check_crcs=True)
    assert rows_of(columns) == reference(data, 5)
    assert len(columns.offsets) == 601
    assert columns.joined.count == 598


def test_crc_mismatch(kernels):
    data = bytearray(record_batch(0, MIXED))
    position = data.index(b'{"a":0}') + 5
    data[position] = ord("9")
    with pytest.raises(CorruptRecordError, match="CRC-32C"):
        kernels.parse_record_batches(bytes(data), 0, check_crcs=True)
    # Without the check the changed byte goes unnoticed.
    assert kernels.parse_record_batches(bytes(data), 0).values[0].as_py() == b'{"a":9}'


@pytest.mark.parametrize(("position", "value", "match"), [
    (16, 3, "invalid magic byte 3"),
    (8, 2, "leaves no magic byte"),
    (22, 7, "invalid compression codec 7"),
    (60, 200, "cannot fit"),
    (61, 0x7F, "does not fit the batch"),
])
def test_malformed_batches_raise(kernels, position, value, match):
    data = bytearray(record_batch(0, MIXED) + record_batch(6, MIXED))
    if position == 8:
        data[8:12] = value.to_bytes(4, "big")
    else:
        data[position] = value
    with pytest.raises(CorruptRecordError, match=match):
        kernels.parse_record_batches(bytes(data), 0)


def test_legacy_message_set_falls_back_to_aiokafka(kernels):
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    for offset in range(4):
        builder.append(offset, timestamp=2000 + offset, key=None if offset == 1 else b"k",
                       value=b'{"v":%d}' % offset)
    data = bytes(builder.build())
    assert kernels.parse_record_batches(data, 0).legacy_format is True

    columns = parse_partition(data, 1, join_values=True, check_crcs=True)
    assert columns.legacy_format is True
    assert rows_of(columns) == reference(data, 1)
    assert columns.joined.data == b'{"v":1}\n{"v":2}\n{"v":3}'
    assert (columns.next_offset, columns.parsed_bytes) == (4, len(data))


def test_partition_batch_slices_joined_values(kernels):
    values = [b'{"a":1}', None, b"", b'{"b":\n2}', b'{"c":3}', None]
    data = record_batch(0, [(None, v, ()) for v in values])
    columns = kernels.parse_record_batches(data, 0, join_values=True)
    batch = PartitionBatch(TopicPartition("t", 0), columns, highwater=6)
    assert len(batch) == 6
    assert batch[-1].offset == 5
    assert batch[3] == (3, 1021, None, b'{"b":\n2}')
    for start in range(7):
        for stop in range(start, 7):
            part = batch.slice(start, stop)
            assert part.columns.joined == _twins.join_values_with_newlines(values[start:stop])
            assert part.columns.values.to_pylist() == values[start:stop]
            assert part.columns.offsets.tolist() == list(range(start, stop))
    assert batch.slice(2, 6).slice(1, 3).columns.joined == \
        _twins.join_values_with_newlines(values[3:5])


def test_json_codec_reads_binary_array_like_list(kernels):
    values = [b'{"a":1}', None, b"{not json", b"", b'{"a":4}', b"[1]"]
    data = record_batch(0, [(None, v, ()) for v in values])
    columns = kernels.parse_record_batches(data, 0, join_values=True)
    from_array = JsonCodec().decode(columns.values, joined=columns.joined)
    from_list = JsonCodec().decode(values)
    assert from_array.batch.equals(from_list.batch)
    assert from_array.rows_from.tolist() == from_list.rows_from.tolist() == [0, 4]
    assert from_array.errors == from_list.errors
    assert [i for i, _ in from_array.errors] == [1, 2, 3, 5]


def test_fetcher_setting(monkeypatch):
    monkeypatch.delenv("SABOT_FETCHER", raising=False)
    assert Settings.from_kwargs({}).fetcher == "arrow"
    assert Settings.from_kwargs({"fetcher": "aiokafka"}).fetcher == "aiokafka"
    with pytest.raises(ConfigError, match="fetcher must be 'arrow' or 'aiokafka'"):
        Settings.from_kwargs({"fetcher": "librdkafka"})


# -- compiled against twin --------------------------------------------------------------

binary = st.one_of(st.none(), st.binary(max_size=24),
                   st.sampled_from([b"", b"\n", b'{"x":1}']))
record_strategy = st.tuples(binary, binary, st.lists(
    st.tuples(st.text(max_size=6), st.one_of(st.none(), st.binary(max_size=8))), max_size=3))
batch_strategy = st.tuples(
    st.lists(record_strategy, min_size=1, max_size=12),
    st.sampled_from([0, 0, GZIP]),
    st.integers(-(2**40), 2**40),
    st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(batch_strategy, max_size=5), fetch_delta=st.integers(-3, 40),
       cut=st.integers(0, 80), join_values=st.booleans(), start=st.integers(0, 2**40))
def test_compiled_equals_twin_and_aiokafka(compiled, batches, fetch_delta, cut, join_values,
                                           start):
    data = b""
    offset = start
    for records, compression, base_timestamp, control in batches:
        data += record_batch(offset, records, compression, base_timestamp, control=control)
        offset += len(records)
    data = data[:len(data) - cut] if cut < len(data) else data
    fetch_offset = start + fetch_delta
    expected = _twins.parse_record_batches(data, fetch_offset, join_values, True)
    assert_same_columns(compiled.parse_record_batches(data, fetch_offset, join_values, True),
                        expected)
    assert rows_of(expected) == reference(data[:expected.parsed_bytes], fetch_offset)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), fetch_offset=st.integers(-5, 5))
def test_compiled_and_twin_agree_on_garbage(compiled, data, fetch_offset):
    outcomes = []
    for implementation in (compiled, _twins):
        try:
            outcomes.append(implementation.parse_record_batches(data, fetch_offset, True))
        except CorruptRecordError:
            outcomes.append("corrupt")
    if "corrupt" in outcomes:
        assert outcomes == ["corrupt", "corrupt"]
    else:
        assert_same_columns(*outcomes)
