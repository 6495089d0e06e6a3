# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""Kafka record batches for the producer, written straight into one bytes object.

The twin is ``encode_record_batch`` in ``sabot/ext/_twins.py``, which also
draws the byte layout of a v2 record batch and of a record (above
``parse_record_batches``). The first pass over the rows sizes the records
and finds how many fit, the second writes them, and the CRC-32C is computed
without the GIL.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize
from cpython.bytes cimport PyBytes_GET_SIZE
from libc.stdint cimport INT32_MAX, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy

from sabot.errors import ConfigError
from sabot.ext._twins import MESSAGE_TOO_LARGE, check_batch_arguments, row_indices

cnp.import_array()

CHANGED_DURING_WRITE = ("the keys or values changed while encode_record_batch wrote a "
                        "batch from them; do not change them until it returns")

cdef enum:
    LOG_OVERHEAD = 12
    BATCH_HEADER_SIZE = 61
    CRC_OFFSET = 17
    ATTRIBUTES_OFFSET = 21

# CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), eight bytes per step
# ("slicing-by-8"). Table k contains the CRC of each byte value followed by k
# zero bytes, so the eight lookups of a step cover one 8-byte word.
cdef uint32_t CRC32C_POLYNOMIAL = 0x82F63B78
cdef uint32_t crc32c_table[8][256]


cdef void _fill_crc32c_table() noexcept:
    cdef uint32_t crc
    cdef int byte, k, shifts
    for byte in range(256):
        crc = byte
        shifts = 8
        while shifts > 0:
            crc = (crc >> 1) ^ (CRC32C_POLYNOMIAL if crc & 1 else 0)
            shifts -= 1
        crc32c_table[0][byte] = crc
    for byte in range(256):
        crc = crc32c_table[0][byte]
        for k in range(1, 8):
            crc = crc32c_table[0][crc & 0xFF] ^ (crc >> 8)
            crc32c_table[k][byte] = crc


_fill_crc32c_table()


cdef uint32_t c_crc32c(const uint8_t* data, Py_ssize_t length) noexcept nogil:
    """Return the CRC-32C of ``length`` bytes, as Kafka stores it in a record batch."""
    cdef uint32_t crc = ~(<uint32_t>0)
    cdef uint64_t word
    while length >= 8:
        # Assembled byte by byte so the result does not depend on the host's
        # byte order; compilers turn this into one load on little-endian CPUs.
        word = (<uint64_t>data[0] | (<uint64_t>data[1] << 8) | (<uint64_t>data[2] << 16)
                | (<uint64_t>data[3] << 24) | (<uint64_t>data[4] << 32)
                | (<uint64_t>data[5] << 40) | (<uint64_t>data[6] << 48)
                | (<uint64_t>data[7] << 56))
        word ^= crc
        crc = (crc32c_table[7][word & 0xFF] ^ crc32c_table[6][(word >> 8) & 0xFF]
               ^ crc32c_table[5][(word >> 16) & 0xFF] ^ crc32c_table[4][(word >> 24) & 0xFF]
               ^ crc32c_table[3][(word >> 32) & 0xFF] ^ crc32c_table[2][(word >> 40) & 0xFF]
               ^ crc32c_table[1][(word >> 48) & 0xFF] ^ crc32c_table[0][word >> 56])
        data += 8
        length -= 8
    while length > 0:
        crc = crc32c_table[0][(crc ^ data[0]) & 0xFF] ^ (crc >> 8)
        data += 1
        length -= 1
    return ~crc


def crc32c(data) -> int:
    """Return the CRC-32C of a bytes-like object, as an unsigned 32-bit integer."""
    cdef const uint8_t[::1] view = memoryview(data).cast("B")
    cdef Py_ssize_t length = view.shape[0]
    cdef uint32_t crc
    if length == 0:
        return 0
    with nogil:
        crc = c_crc32c(&view[0], length)
    return crc


cdef inline uint64_t _zigzag(int64_t value) noexcept nogil:
    # Arithmetic right shift: 0 for a non-negative value, all ones for a negative one.
    return (<uint64_t>value << 1) ^ <uint64_t>(value >> 63)


cdef inline int64_t _varint_size(int64_t value) noexcept nogil:
    cdef uint64_t raw = _zigzag(value)
    cdef int64_t size = 1
    while raw >= 0x80:
        raw >>= 7
        size += 1
    return size


cdef inline uint8_t* _put_varint(uint8_t* p, int64_t value) noexcept nogil:
    cdef uint64_t raw = _zigzag(value)
    while raw >= 0x80:
        p[0] = <uint8_t>((raw & 0x7F) | 0x80)
        p += 1
        raw >>= 7
    p[0] = <uint8_t>raw
    return p + 1


cdef inline void _put_int16(uint8_t* p, int64_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 8)
    p[1] = <uint8_t>value


cdef inline void _put_int32(uint8_t* p, int64_t value) noexcept nogil:
    p[0] = <uint8_t>(value >> 24)
    p[1] = <uint8_t>(value >> 16)
    p[2] = <uint8_t>(value >> 8)
    p[3] = <uint8_t>value


cdef inline void _put_int64(uint8_t* p, int64_t value) noexcept nogil:
    _put_int32(p, value >> 32)
    _put_int32(p + 4, value)


cdef inline int64_t _body_size(int64_t offset_delta, int64_t key_length,
                               int64_t value_length) noexcept nogil:
    # attributes, timestamp delta 0 and header count 0 take one byte each.
    return (3 + _varint_size(offset_delta)
            + _varint_size(key_length) + (key_length if key_length > 0 else 0)
            + _varint_size(value_length) + (value_length if value_length > 0 else 0))


cdef int64_t _field_length(object item, str name, int64_t row) except -2:
    """Return the length of a key or value, -1 for None; raise TypeError for other types."""
    if item is None:
        return -1
    if PyBytes_Check(item):
        return PyBytes_GET_SIZE(item)
    raise TypeError(f"a Kafka {name} must be bytes or None, got "
                    f"{type(item).__name__} at row {row}")


cdef inline uint8_t* _put_field(uint8_t* p, object item, int64_t length) noexcept:
    p = _put_varint(p, length)
    if length > 0:
        memcpy(p, PyBytes_AS_STRING(item), length)
        p += length
    return p


def encode_record_batch(keys, values, rows, timestamp_ms, max_bytes):
    """Write the ``rows`` of ``values`` and ``keys`` as one Kafka record batch.

    Returns ``(batch, rows_written)``: the batch contains the first rows whose
    records fit in ``max_bytes``, and the caller passes the rest in the next
    call. See the twin for the full contract.
    """
    cdef:
        list value_list = values if type(values) is list else list(values)
        list key_list = None
        int64_t timestamp, limit
        cnp.ndarray index_array
        const int64_t* index
        Py_ssize_t count = len(value_list)
        Py_ssize_t row_count, j, written = 0
        int64_t i, key_length = -1, value_length, body, total = BATCH_HEADER_SIZE
        object key = None, value
        bytes batch
        uint8_t* start
        uint8_t* p
        uint8_t* end
        uint32_t crc

    if keys is not None:
        key_list = keys if type(keys) is list else list(keys)
    timestamp, limit = check_batch_arguments(key_list, value_list, timestamp_ms, max_bytes)
    index_array = row_indices(rows)
    index = <const int64_t*>cnp.PyArray_DATA(index_array)
    row_count = cnp.PyArray_SIZE(index_array)
    if row_count == 0:
        return b"", 0

    # Pass 1: check each row and size its record until the batch is full.
    for j in range(row_count):
        i = index[j]
        if i < 0 or i >= count:
            raise IndexError(f"row {i} is out of range for {count} values")
        if key_list is not None:
            key_length = _field_length(key_list[i], "key", i)
        value_length = _field_length(value_list[i], "value", i)
        body = _body_size(j, key_length, value_length)
        if total + _varint_size(body) + body > limit:
            if j > 0:
                break
            # A first record beyond the limit goes alone in its batch, as
            # the Java client sends a record larger than batch.size.
            if total + _varint_size(body) + body > INT32_MAX:
                raise ConfigError(MESSAGE_TOO_LARGE.format(
                    size=max(key_length, 0) + max(value_length, 0)))
            total += _varint_size(body) + body
            written = 1
            break
        total += _varint_size(body) + body
        written = j + 1

    # Pass 2: the records, then the header. No Python code runs between the
    # passes while the GIL is held, but each row is checked again against
    # the room left in the batch. A list changed from another thread (in a
    # free-threaded build) then raises instead of writing past the end.
    batch = PyBytes_FromStringAndSize(NULL, total)
    start = <uint8_t*>PyBytes_AS_STRING(batch)
    end = start + total
    p = start + BATCH_HEADER_SIZE
    for j in range(written):
        i = index[j]
        if i >= len(value_list) or (key_list is not None and i >= len(key_list)):
            raise RuntimeError(CHANGED_DURING_WRITE)
        if key_list is not None:
            key = key_list[i]
            key_length = _field_length(key, "key", i)
        value = value_list[i]
        value_length = _field_length(value, "value", i)
        body = _body_size(j, key_length, value_length)
        if _varint_size(body) + body > end - p:
            raise RuntimeError(CHANGED_DURING_WRITE)
        p = _put_varint(p, body)
        p[0] = 0  # attributes: no bits are defined for records
        p[1] = 0  # timestamp delta 0, zigzag-encoded
        p = _put_varint(p + 2, j)
        p = _put_field(p, key, key_length)
        p = _put_field(p, value, value_length)
        p[0] = 0  # no headers
        p += 1
    if p != end:
        raise RuntimeError(CHANGED_DURING_WRITE)

    _put_int64(start, 0)  # baseOffset: the broker assigns offsets
    _put_int32(start + 8, total - LOG_OVERHEAD)
    _put_int32(start + 12, -1)  # partitionLeaderEpoch: none
    start[16] = 2  # magic
    _put_int16(start + ATTRIBUTES_OFFSET, 0)  # no compression, CreateTime
    _put_int32(start + 23, written - 1)  # lastOffsetDelta
    _put_int64(start + 27, timestamp)  # baseTimestamp
    _put_int64(start + 35, timestamp)  # maxTimestamp
    _put_int64(start + 43, -1)  # producerId: not idempotent
    _put_int16(start + 51, -1)  # producerEpoch
    _put_int32(start + 53, 0)  # baseSequence, as aiokafka's BatchBuilder sets it
    _put_int32(start + 57, written)
    with nogil:
        crc = c_crc32c(start + ATTRIBUTES_OFFSET, total - ATTRIBUTES_OFFSET)
    _put_int32(start + CRC_OFFSET, crc)
    return batch, written
