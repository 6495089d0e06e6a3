# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""Kafka's default partitioner: murmur2 of the key bytes, modulo the partitions.

The twins are ``murmur2`` and ``partitions_for_keys`` in ``sabot/ext/_twins.py``.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t

from sabot.ext._arrow_c cimport ArrowArray, ArrowSchema

import numpy as np

cnp.import_array()

# Constants of org.apache.kafka.common.utils.Utils.murmur2 (kafka-clients).
cdef uint32_t MURMUR2_SEED = 0x9747B28C
cdef uint32_t MURMUR2_M = 0x5BD1E995
cdef int MURMUR2_R = 24


cdef inline uint32_t c_murmur2(const uint8_t* data, int64_t length) noexcept nogil:
    """Hash ``length`` bytes the way the Java client does, as an unsigned 32-bit value."""
    cdef:
        uint32_t h = MURMUR2_SEED ^ <uint32_t>length
        uint32_t k
        int64_t i4
        int64_t tail = length & ~(<int64_t>3)

    for i4 in range(0, tail, 4):
        k = (<uint32_t>data[i4] | (<uint32_t>data[i4 + 1] << 8)
             | (<uint32_t>data[i4 + 2] << 16) | (<uint32_t>data[i4 + 3] << 24))
        k *= MURMUR2_M
        k ^= k >> MURMUR2_R
        k *= MURMUR2_M
        h *= MURMUR2_M
        h ^= k

    # The Java switch on length % 4 falls through from case 3 to case 1.
    if length - tail == 3:
        h ^= <uint32_t>data[tail + 2] << 16
    if length - tail >= 2:
        h ^= <uint32_t>data[tail + 1] << 8
    if length - tail >= 1:
        h ^= <uint32_t>data[tail]
        h *= MURMUR2_M

    h ^= h >> 13
    h *= MURMUR2_M
    h ^= h >> 15
    return h


cdef inline int64_t c_partition(uint32_t hash_value, int64_t num_partitions) noexcept nogil:
    # Utils.toPositive clears the sign bit before the modulo.
    return <int64_t>(hash_value & 0x7FFFFFFF) % num_partitions


def murmur2(data) -> int:
    """Return Kafka's murmur2 hash of ``data`` as a signed 32-bit integer."""
    if not PyBytes_CheckExact(data):
        data = bytes(data)
    return <int32_t>c_murmur2(<const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))


def partitions_for_keys(keys, num_partitions) -> cnp.ndarray:
    """Return the Java default partitioner's partition for each key, -1 for a null key.

    ``keys`` is a sequence of ``bytes`` or ``None``, or a pyarrow binary or
    string array (read in place, without the GIL).
    """
    cdef int64_t partitions = _check_partitions(num_partitions)
    if hasattr(keys, "__arrow_c_array__"):
        return _partitions_for_arrow(keys, partitions)
    return _partitions_for_sequence(keys, partitions)


cdef int64_t _check_partitions(object num_partitions) except -1:
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) \
            or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, got {num_partitions!r}")
    return num_partitions


cdef cnp.ndarray _partitions_for_sequence(object keys, int64_t partitions):
    cdef:
        list items = keys if type(keys) is list else list(keys)
        Py_ssize_t count = len(items)
        Py_ssize_t i
        object key
        cnp.ndarray result = np.empty(count, dtype=np.int64)
        int64_t[::1] out = result

    for i in range(count):
        key = items[i]
        if key is None:
            out[i] = -1
            continue
        if not PyBytes_CheckExact(key):
            if not isinstance(key, (bytes, bytearray, memoryview)):
                raise TypeError(f"a Kafka key must be bytes or None, got "
                                f"{type(key).__name__} at index {i}")
            key = bytes(key)
        out[i] = c_partition(
            c_murmur2(<const uint8_t*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)),
            partitions)
    return result


cdef cnp.ndarray _partitions_for_arrow(object keys, int64_t partitions):
    cdef:
        object schema_capsule
        object array_capsule
        ArrowSchema* c_schema
        ArrowArray* c_array
        bytes format_
        bint large
        const uint8_t* validity
        const int32_t* offsets32 = NULL
        const int64_t* offsets64 = NULL
        const uint8_t* data
        int64_t count, i, p, start, end
        cnp.ndarray result
        int64_t[::1] out

    schema_capsule, array_capsule = keys.__arrow_c_array__()
    c_schema = <ArrowSchema*>PyCapsule_GetPointer(schema_capsule, "arrow_schema")
    c_array = <ArrowArray*>PyCapsule_GetPointer(array_capsule, "arrow_array")
    format_ = c_schema.format
    if format_ not in (b"z", b"Z", b"u", b"U"):
        raise TypeError(f"keys must be a binary or string array, got Arrow format "
                        f"{format_.decode()!r}; cast them with pyarrow.compute.cast first")
    large = format_ in (b"Z", b"U")
    count = c_array.length
    result = np.empty(count, dtype=np.int64)
    if count == 0:
        return result
    out = result
    validity = <const uint8_t*>c_array.buffers[0]
    if large:
        offsets64 = <const int64_t*>c_array.buffers[1]
    else:
        offsets32 = <const int32_t*>c_array.buffers[1]
    data = <const uint8_t*>c_array.buffers[2]

    with nogil:
        for i in range(count):
            p = c_array.offset + i
            if validity != NULL and not ((validity[p >> 3] >> (p & 7)) & 1):
                out[i] = -1
                continue
            if large:
                start = offsets64[p]
                end = offsets64[p + 1]
            else:
                start = offsets32[p]
                end = offsets32[p + 1]
            out[i] = c_partition(c_murmur2(data + start, end - start), partitions)
    return result
