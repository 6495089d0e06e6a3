"""Pure-Python twins of the Cython kernels.

Each function here is the reference for its compiled counterpart in
``sabot/ext/_*.pyx``: both must return equal results for every input, and
the compiled encoders call these twins for the Arrow types they do not read.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import msgpack
import numpy as np
import orjson
import pyarrow as pa

from sabot.ext._protocols import TIMESTAMP_TYPE, JoinedValues, RecordColumns

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
    joined = None
    if join_values:
        present = [value for value in values if value]
        for value in present:
            if not isinstance(value, bytes):
                raise TypeError(f"a record value must be bytes to be joined, "
                                f"got {type(value).__name__}")
        data = b"\n".join(present)
        joined = JoinedValues(
            data=data,
            count=len(present),
            empty_count=len(values) - len(present),
            # Any newline beyond the separators is inside a value.
            newline_in_values=data.count(b"\n") > max(len(present) - 1, 0),
        )
    return RecordColumns(values, keys, offsets, timestamps, joined)
