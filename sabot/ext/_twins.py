"""Pure-Python twins of the Cython kernels.

Each function here is the reference for its compiled counterpart in
``sabot/ext/_*.pyx``: both must return equal results for every input, and
the compiled encoders call these twins for the Arrow types they do not read.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import msgpack
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.json as pajson

from sabot.errors import ConfigError, CorruptRecordError, MissingExtraError
from sabot.ext._protocols import TIMESTAMP_TYPE, FetchedColumns, JoinedValues, RecordColumns

# Naive datetimes (Arrow timestamps without a time zone) are written as UTC
# with a "Z" suffix, the same instant the msgpack encoder writes for them.
JSON_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z


def murmur2(data: bytes) -> int:
    """Return Kafka's murmur2 hash of ``data`` as a signed 32-bit integer.

    This is the hash of ``org.apache.kafka.common.utils.Utils.murmur2`` with
    seed 0x9747b28c, which the Java client's default partitioner uses.
    """
    length = len(data)
    seed = 0x9747B28C
    m = 0x5BD1E995
    r = 24
    h = (seed ^ length) & 0xFFFFFFFF
    length4 = length // 4
    for i in range(length4):
        i4 = i * 4
        k = (data[i4] | (data[i4 + 1] << 8) | (data[i4 + 2] << 16) | (data[i4 + 3] << 24))
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> r
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    extra = length % 4
    index = length & ~3
    if extra == 3:
        h ^= data[index + 2] << 16
    if extra >= 2:
        h ^= data[index + 1] << 8
    if extra >= 1:
        h ^= data[index]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partitions_for_keys(keys: Sequence[bytes | None] | pa.Array,
                        num_partitions: int) -> np.ndarray:
    """Return the Java default partitioner's partition for each key, as int64.

    ``keys`` is a sequence of ``bytes`` or ``None``, or a pyarrow binary or
    string array. A ``None`` key gets -1: the caller chooses a partition for it.
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) \
            or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    if isinstance(keys, pa.Array):
        if not (pa.types.is_binary(keys.type) or pa.types.is_large_binary(keys.type)
                or pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
            raise TypeError(f"keys must be a binary or string array, got {keys.type}; "
                            f"cast them with pyarrow.compute.cast first")
        keys = keys.cast(pa.large_binary()).to_pylist()
    partitions = np.empty(len(keys), dtype=np.int64)
    for i, key in enumerate(keys):
        if key is None:
            partitions[i] = -1
            continue
        if not isinstance(key, (bytes, bytearray, memoryview)):
            raise TypeError(f"a Kafka key must be bytes or None, got "
                            f"{type(key).__name__} at index {i}")
        partitions[i] = (murmur2(bytes(key)) & 0x7FFFFFFF) % num_partitions
    return partitions


def encode_json_rows(batch: pa.RecordBatch) -> list[bytes]:
    """Encode each row of ``batch`` as one compact JSON object."""
    return [orjson.dumps(row, default=_json_default, option=JSON_OPTIONS)
            for row in batch.to_pylist()]


def encode_msgpack_rows(batch: pa.RecordBatch) -> list[bytes]:
    """Encode each row of ``batch`` as one msgpack map.

    Timestamps become the msgpack Timestamp extension (type -1), which stores
    an instant without a time zone; a naive timestamp is taken as UTC.
    """
    return [msgpack.packb(row, datetime=True, default=_msgpack_default)
            for row in batch.to_pylist()]


def _json_default(obj: Any) -> str:
    # pyarrow returns pandas.Timestamp for nanosecond timestamps when pandas
    # is installed; orjson does not serialize datetime subclasses. They are
    # written like orjson writes a datetime, with nine fraction digits when
    # the nanoseconds are not a whole number of microseconds.
    nanosecond = getattr(obj, "nanosecond", None)
    if isinstance(obj, datetime) and nanosecond is not None:
        whole_seconds = obj.to_pydatetime(warn=False).replace(microsecond=0)
        text = orjson.dumps(whole_seconds, option=JSON_OPTIONS).decode()[1:-1]
        if nanosecond:
            fraction = f".{obj.microsecond * 1000 + nanosecond:09d}"
        elif obj.microsecond:
            fraction = f".{obj.microsecond:06d}"
        else:
            fraction = ""
        # text is "YYYY-MM-DDTHH:MM:SS" followed by "Z" or "+HH:MM".
        return text[:19] + fraction + text[19:]
    raise TypeError(f"Type is not JSON serializable: {type(obj).__name__}")


def _msgpack_default(obj: Any) -> Any:
    if isinstance(obj, datetime):
        if getattr(obj, "nanosecond", None) is not None:
            # pandas.Timestamp: ``value`` is nanoseconds since the epoch, in UTC
            # for an aware timestamp and as if UTC for a naive one.
            return msgpack.Timestamp.from_unix_nano(obj.value)
        if obj.tzinfo is None:
            return obj.replace(tzinfo=timezone.utc)
    raise TypeError(f"can not serialize {type(obj).__name__!r} object")


def record_columns(records: Sequence[Any], join_values: bool = False) -> RecordColumns:
    """Return the values, keys, offsets and timestamps of aiokafka ConsumerRecords.

    With ``join_values``, also the values that are neither None nor empty,
    joined with ``b"\\n"`` for the JSON reader.
    """
    values = [r.value for r in records]
    keys = pa.array([r.key for r in records], type=pa.binary())
    offsets = np.fromiter((r.offset for r in records), dtype=np.int64, count=len(records))
    timestamps = pa.array(np.fromiter((r.timestamp for r in records), dtype=np.int64,
                                      count=len(records))).cast(TIMESTAMP_TYPE)
    joined = join_values_with_newlines(values) if join_values else None
    return RecordColumns(values, keys, offsets, timestamps, joined)


def join_values_with_newlines(values: Sequence[bytes | None]) -> JoinedValues:
    """Join the values that are neither None nor empty with ``b"\\n"``."""
    present = [value for value in values if value]
    for value in present:
        if not isinstance(value, bytes):
            raise TypeError(f"a record value must be bytes to be joined, "
                            f"got {type(value).__name__}")
    data = b"\n".join(present)
    return JoinedValues(
        data=data,
        count=len(present),
        empty_count=len(values) - len(present),
        # Any newline beyond the separators is inside a value.
        newline_in_values=data.count(b"\n") > max(len(present) - 1, 0),
    )


def decode_json_objects(data: bytes, count: int, newline_in_values: bool = False,
                        schema: pa.Schema | None = None) -> pa.RecordBatch | None:
    """Parse ``count`` JSON objects separated by newlines into one record batch.

    This is ``pyarrow.json.read_json`` over the whole input. Returns None
    when the reader fails or finds a different number of objects.
    ``newline_in_values`` means that a value contains a newline of its own (a
    pretty-printed object), so a newline does not end a record. ``schema``
    fixes the types of the columns it names; other fields are inferred.
    """
    parse_options = pajson.ParseOptions(
        explicit_schema=schema,
        newlines_in_values=newline_in_values,
        unexpected_field_behavior="infer",
    )
    # One block for the whole input: types are inferred from all rows at
    # once, so a column is never int in one block and double in the next.
    read_options = pajson.ReadOptions(use_threads=False, block_size=len(data) + 1024)
    try:
        table = pajson.read_json(io.BytesIO(data), read_options=read_options,
                                 parse_options=parse_options)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if table.num_rows != count:
        return None
    # After combine_chunks a table has one batch, or none when it is empty.
    batches = table.combine_chunks().to_batches()
    if batches:
        return batches[0]
    return pa.RecordBatch.from_pylist([], schema=table.schema)


# -- Kafka record batches (message format v2, magic 2) ------------------------------------
#
# RecordBatch, as the Fetch API returns it in a partition's ``records`` field:
#
#   offset  size  field
#        0     8  baseOffset            int64
#        8     4  batchLength           int32, the bytes after this field
#       12     4  partitionLeaderEpoch  int32
#       16     1  magic                 int8 (0 and 1 are the legacy message sets,
#                                       whose magic byte sits at the same place)
#       17     4  crc                   uint32, CRC-32C of the bytes from attributes on
#       21     2  attributes            int16: bits 0-2 compression (0 none, 1 gzip,
#                                       2 snappy, 3 lz4, 4 zstd), bit 3 timestamp type
#                                       (1 = LogAppendTime), bit 4 transactional,
#                                       bit 5 control batch
#       23     4  lastOffsetDelta       int32
#       27     8  baseTimestamp         int64, ms
#       35     8  maxTimestamp          int64, ms
#       43     8  producerId            int64
#       51     2  producerEpoch         int16
#       53     4  baseSequence          int32
#       57     4  records count         int32
#       61     -  records, compressed as a whole when the batch is
#
# Record (varints are zigzag-encoded, as in protobuf's sint64):
#
#   length varint, attributes int8, timestampDelta varint, offsetDelta varint,
#   keyLength varint (-1 = null), key, valueLength varint (-1 = null), value,
#   header count varint, then per header: keyLength varint, key, valueLength
#   varint (-1 = null), value.

#: baseOffset and batchLength, the part of a batch that gives its size.
LOG_OVERHEAD = 12
#: The fixed part of a v2 batch, up to the first record.
BATCH_HEADER_SIZE = 61
#: The smallest record: seven one-byte fields (length, attributes, timestamp
#: delta, offset delta, key length, value length, header count).
MIN_RECORD_SIZE = 7
INT32_MAX = 2**31 - 1

COMPRESSION_MASK = 0x07
LOG_APPEND_TIME_FLAG = 0x08
CONTROL_FLAG = 0x20
COMPRESSION_NAMES = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}

#: The way past a malformed batch, at the end of every CorruptRecordError message.
CORRUPT_WAY_OUT = ("the data in the broker is damaged: to go past it, commit an offset "
                   "after this batch for the consumer group")

_BATCH_HEADER = struct.Struct(">qiibIhiqqqhii")


def decompress_records(compression: int, data, base_offset: int) -> bytes:
    """Decompress the records section of a batch with aiokafka's codec helpers."""
    from aiokafka import codec

    name = COMPRESSION_NAMES[compression]
    if compression != 1 and not getattr(codec, f"has_{name}")():
        raise MissingExtraError(
            f"a fetched record batch is compressed with {name}, which aiokafka reads "
            f"with the cramjam package; install it with: pip install cramjam")
    try:
        if compression == 1:
            # gzip.decompress reads every gzip member, not only the first.
            return gzip.decompress(data)
        return getattr(codec, f"{name}_decode")(bytes(data))
    except Exception as exc:  # noqa: BLE001 - zlib, gzip and cramjam raise their own types
        raise CorruptRecordError(
            f"record batch at offset {base_offset}: its {name}-compressed records cannot "
            f"be decompressed ({exc}); {CORRUPT_WAY_OUT}") from exc


def check_batch_crc(batch, stored: int, base_offset: int) -> None:
    """Raise CorruptRecordError unless ``batch[21:]`` has the CRC-32C ``stored``."""
    from aiokafka.record.util import calc_crc32c

    computed = calc_crc32c(batch[21:])
    if computed != stored:
        raise CorruptRecordError(
            f"record batch at offset {base_offset} has CRC-32C {computed:#010x} but "
            f"stores {stored:#010x}; {CORRUPT_WAY_OUT}")


def _wrap_int64(value: int) -> int:
    # The compiled kernel adds offsets and timestamps in 64-bit arithmetic.
    return (value + 2**63) % 2**64 - 2**63


def _varint(buffer, position: int, end: int, base_offset: int) -> tuple[int, int]:
    """Read a zigzag varint of at most 10 bytes; return it and the next position."""
    raw = 0
    shift = 0
    while position < end:
        byte = buffer[position]
        position += 1
        raw |= (byte & 0x7F) << shift
        if not byte & 0x80:
            raw &= 0xFFFFFFFFFFFFFFFF
            return (raw >> 1) ^ -(raw & 1), position
        shift += 7
        if shift > 63:
            break
    raise CorruptRecordError(
        f"record batch at offset {base_offset} has a malformed varint; {CORRUPT_WAY_OUT}")


def _corrupt(base_offset: int, problem: str) -> CorruptRecordError:
    return CorruptRecordError(f"record batch at offset {base_offset}: {problem}; "
                              f"{CORRUPT_WAY_OUT}")


def parse_record_batches(data, fetch_offset: int, join_values: bool = False,
                         check_crcs: bool = False) -> FetchedColumns:
    """Parse the ``records`` field of one partition in a FetchResponse into columns.

    ``data`` is a sequence of v2 record batches. Control batches and records
    below ``fetch_offset`` are left out; a batch cut off at the end of
    ``data`` is left for the next fetch. With ``join_values``, the values
    that are neither None nor empty are also joined with ``b"\\n"`` for the
    JSON reader. With ``check_crcs``, each batch's CRC-32C is verified.

    Raises CorruptRecordError for malformed batches, MissingExtraError for a
    compression codec whose package is missing, and ConfigError when the
    records exceed the 2 GiB that Arrow's int32 offsets address.
    """
    view = memoryview(data).cast("B")
    size = len(view)
    position = 0
    next_offset = fetch_offset
    total_section_bytes = 0
    offsets: list[int] = []
    timestamps: list[int] = []
    keys: list[bytes | None] = []
    values: list[bytes | None] = []

    while size - position >= LOG_OVERHEAD:
        base_offset, batch_length = struct.unpack_from(">qi", view, position)
        if batch_length > size - position - LOG_OVERHEAD:
            break  # cut off by the fetch size limit
        if batch_length < 5:
            raise _corrupt(base_offset, f"batch length {batch_length} leaves no magic byte")
        magic = struct.unpack_from(">b", view, position + 16)[0]
        if magic in (0, 1):
            return _no_records(fetch_offset, join_values, legacy_format=True)
        if magic != 2:
            raise _corrupt(base_offset, f"invalid magic byte {magic}, expected 2")
        if batch_length < BATCH_HEADER_SIZE - LOG_OVERHEAD:
            raise _corrupt(base_offset, f"batch length {batch_length} is shorter than "
                                        f"the v2 batch header")
        end = position + LOG_OVERHEAD + batch_length
        (_, _, _, _, crc, attributes, last_offset_delta, base_timestamp, max_timestamp,
         _, _, _, count) = _BATCH_HEADER.unpack_from(view, position)
        if check_crcs:
            check_batch_crc(view[position:end], crc, base_offset)
        batch_next_offset = _wrap_int64(base_offset + last_offset_delta + 1)

        if not attributes & CONTROL_FLAG:
            section = view[position + BATCH_HEADER_SIZE:end]
            compression = attributes & COMPRESSION_MASK
            if compression > 4:
                raise _corrupt(base_offset, f"invalid compression codec {compression}")
            if compression:
                section = memoryview(decompress_records(compression, section, base_offset))
            if count < 0 or count > len(section) // MIN_RECORD_SIZE:
                raise _corrupt(base_offset, f"{count} records cannot fit in "
                                            f"{len(section)} bytes")
            total_section_bytes += len(section)
            if total_section_bytes > INT32_MAX:
                raise ConfigError(
                    f"the records of one partition in a fetch response exceed 2 GiB "
                    f"after decompression (at batch offset {base_offset}); lower the "
                    f"max_partition_fetch_bytes setting")
            log_append_time = bool(attributes & LOG_APPEND_TIME_FLAG)
            _read_records(section, count, base_offset, base_timestamp, max_timestamp,
                          log_append_time, fetch_offset, offsets, timestamps, keys, values)

        next_offset = max(next_offset, batch_next_offset)
        position = end

    joined = join_values_with_newlines(values) if join_values else None
    return FetchedColumns(
        offsets=np.array(offsets, dtype=np.int64),
        timestamps=pa.array(np.array(timestamps, dtype=np.int64)).cast(TIMESTAMP_TYPE),
        keys=pa.array(keys, type=pa.binary()),
        values=pa.array(values, type=pa.binary()),
        joined=joined,
        next_offset=next_offset,
        parsed_bytes=position,
        legacy_format=False,
    )


def _read_records(section, count, base_offset, base_timestamp, max_timestamp,
                  log_append_time, fetch_offset, offsets, timestamps, keys, values) -> None:
    position = 0
    end = len(section)
    for _ in range(count):
        length, position = _varint(section, position, end, base_offset)
        if length < MIN_RECORD_SIZE - 1 or length > end - position:
            raise _corrupt(base_offset, f"record length {length} does not fit the batch")
        record_end = position + length
        position += 1  # attributes: no bits are defined for records
        timestamp_delta, position = _varint(section, position, record_end, base_offset)
        offset_delta, position = _varint(section, position, record_end, base_offset)

        key_length, position = _varint(section, position, record_end, base_offset)
        if key_length < -1 or key_length > record_end - position:
            raise _corrupt(base_offset, f"key length {key_length} does not fit the record")
        key = None
        if key_length >= 0:
            key = bytes(section[position:position + key_length])
            position += key_length

        value_length, position = _varint(section, position, record_end, base_offset)
        if value_length < -1 or value_length > record_end - position:
            raise _corrupt(base_offset, f"value length {value_length} does not fit the record")
        value = None
        if value_length >= 0:
            value = bytes(section[position:position + value_length])
            position += value_length

        header_count, position = _varint(section, position, record_end, base_offset)
        if header_count < 0:
            raise _corrupt(base_offset, f"header count {header_count} is negative")
        for _ in range(header_count):
            header_key_length, position = _varint(section, position, record_end, base_offset)
            if header_key_length < 0 or header_key_length > record_end - position:
                raise _corrupt(base_offset, f"header key length {header_key_length} does "
                                            f"not fit the record")
            position += header_key_length
            header_value_length, position = _varint(section, position, record_end,
                                                    base_offset)
            if header_value_length < -1 or header_value_length > record_end - position:
                raise _corrupt(base_offset, f"header value length {header_value_length} "
                                            f"does not fit the record")
            position += max(header_value_length, 0)
        if position != record_end:
            raise _corrupt(base_offset, f"a record has {record_end - position} bytes "
                                        f"after its last header")

        offset = _wrap_int64(base_offset + offset_delta)
        if offset < fetch_offset:
            continue  # a batch that starts before the fetch offset
        offsets.append(offset)
        timestamps.append(max_timestamp if log_append_time
                          else _wrap_int64(base_timestamp + timestamp_delta))
        keys.append(key)
        values.append(value)
    if position != end:
        raise _corrupt(base_offset, f"{end - position} bytes follow the last of "
                                    f"{count} records")


def _no_records(fetch_offset: int, join_values: bool, legacy_format: bool) -> FetchedColumns:
    empty = pa.array([], type=pa.binary())
    return FetchedColumns(
        offsets=np.zeros(0, dtype=np.int64),
        timestamps=pa.array([], type=TIMESTAMP_TYPE),
        keys=empty,
        values=empty,
        joined=JoinedValues(b"", 0, 0, False) if join_values else None,
        next_offset=fetch_offset,
        parsed_bytes=0,
        legacy_format=legacy_format,
    )


# -- Producer record batches ----------------------------------------------------------------
#
# The sink sends each batch in the layout drawn above parse_record_batches,
# with the fields that aiokafka 0.14's BatchBuilder writes for a producer that
# is neither idempotent nor transactional: baseOffset 0, partitionLeaderEpoch
# -1, attributes 0 (no compression, CreateTime), producerId -1, producerEpoch
# -1 and baseSequence 0. Every record has timestamp delta 0 and no headers.

#: The error for a row whose record alone exceeds the 2 GiB a batch can
#: address. ``size`` is the bytes of its key and value.
MESSAGE_TOO_LARGE = ("a message of {size} bytes does not fit a Kafka record batch; "
                     "split it into messages below 2 GiB")


def check_batch_arguments(keys: Sequence[bytes | None] | None, values: Sequence[bytes | None],
                          timestamp_ms: int, max_bytes: int) -> tuple[int, int]:
    """Validate the arguments of ``encode_record_batch`` other than the rows.

    Returns the timestamp and the byte limit, capped at the 2 GiB that the
    int32 batchLength field addresses.
    """
    if keys is not None and len(keys) != len(values):
        raise ValueError(f"keys and values must have the same length, got {len(keys)} "
                         f"keys and {len(values)} values")
    if isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, (int, np.integer)):
        raise TypeError(f"timestamp_ms must be an integer (epoch milliseconds), "
                        f"got {type(timestamp_ms).__name__}")
    if not -2**63 <= timestamp_ms < 2**63:
        raise OverflowError(f"timestamp_ms {timestamp_ms} does not fit the int64 "
                            f"timestamp of a record batch")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) \
            or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return int(timestamp_ms), int(min(max_bytes, INT32_MAX))


def row_indices(rows) -> np.ndarray:
    """Return ``rows``, a range or a one-dimensional sequence of integers, as int64."""
    if isinstance(rows, range):
        return np.arange(rows.start, rows.stop, rows.step, dtype=np.int64)
    array = np.asarray(rows)
    if array.ndim != 1:
        raise ValueError(f"rows must be one-dimensional, got {array.ndim} dimensions")
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"rows must be integers, got an array of {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_field(item, name: str, row: int) -> bytes | None:
    if item is None or type(item) is bytes:
        return item
    if isinstance(item, bytes):
        return bytes(item)  # aiokafka's builder takes exact bytes only
    raise TypeError(f"a Kafka {name} must be bytes or None, got "
                    f"{type(item).__name__} at row {row}")


def encode_record_batch(keys: Sequence[bytes | None] | None, values: Sequence[bytes | None],
                        rows, timestamp_ms: int, max_bytes: int) -> tuple[bytes, int]:
    """Write the ``rows`` of ``values`` and ``keys`` as one Kafka record batch.

    ``rows`` is a range or a one-dimensional integer array of indices into
    ``values``, and into ``keys`` unless ``keys`` is None (records without
    keys). Keys and values are ``bytes`` or None. Record i of the batch is row
    ``rows[i]`` at offset delta i, with timestamp ``timestamp_ms`` (epoch
    milliseconds) and no headers.

    Returns ``(batch, rows_written)``. The batch contains the first rows whose
    records keep it within ``max_bytes``, and the caller passes the rest in
    the next call. A first row larger than ``max_bytes`` goes alone in its
    batch. With no rows, returns ``(b"", 0)``. Raises ConfigError (a
    ValueError) when a batch of one row would exceed 2 GiB, IndexError
    for a row outside ``values`` and TypeError for a key or value that is
    not bytes or None.
    """
    from aiokafka.record.default_records import DefaultRecordBatchBuilder

    timestamp, limit = check_batch_arguments(keys, values, timestamp_ms, max_bytes)
    indices = row_indices(rows).tolist()
    if not indices:
        return b"", 0

    # The limit is checked here because aiokafka's two builders differ at the
    # edge: its Cython builder keeps a batch below batch_size, its Python one
    # lets it reach batch_size, and both accept a first record of any size.
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0,
                                        producer_id=-1, producer_epoch=-1, base_sequence=0,
                                        batch_size=INT32_MAX)
    written = 0
    for i in indices:
        if not 0 <= i < len(values):
            raise IndexError(f"row {i} is out of range for {len(values)} values")
        key = None if keys is None else _check_field(keys[i], "key", i)
        value = _check_field(values[i], "value", i)
        record_size = builder.size_in_bytes(written, timestamp, key=key, value=value,
                                            headers=[])
        if builder.size() + record_size > limit and written > 0:
            break
        if builder.size() + record_size > INT32_MAX:
            raise ConfigError(MESSAGE_TOO_LARGE.format(
                size=len(key or b"") + len(value or b"")))
        builder.append(written, timestamp, key=key, value=value, headers=[])
        written += 1
        if builder.size() > limit:
            # A first record beyond the limit goes alone in its batch, as
            # the Java client sends a record larger than batch.size.
            break
    return bytes(builder.build()), written
