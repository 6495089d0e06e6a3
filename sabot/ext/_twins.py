"""Pure-Python twins of the Cython kernels.

Each function here is the reference for its compiled counterpart in
``sabot/ext/_*.pyx``: both must return equal results for every input.
"""

from __future__ import annotations

import msgpack
import orjson
import pyarrow as pa


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


def partitions_for_keys(keys: list[bytes | None], num_partitions: int) -> list[int]:
    """Return the Java default partitioner's partition for each key.

    A ``None`` key gets -1: the caller chooses a partition for it.
    """
    return [
        -1 if key is None else (murmur2(key) & 0x7FFFFFFF) % num_partitions
        for key in keys
    ]


def encode_json_rows(batch: pa.RecordBatch) -> list[bytes]:
    """Encode each row of ``batch`` as one compact JSON object."""
    return [orjson.dumps(row, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z)
            for row in batch.to_pylist()]


def encode_msgpack_rows(batch: pa.RecordBatch) -> list[bytes]:
    """Encode each row of ``batch`` as one msgpack map."""
    return [msgpack.packb(row, datetime=True) for row in batch.to_pylist()]
