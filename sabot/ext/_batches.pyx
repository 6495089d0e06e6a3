# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""Columns of the records in fetched Kafka record batches, without a Python object per record.

The twin is ``parse_record_batches`` in ``sabot/ext/_twins.py``, which also
draws the byte layout of a v2 record batch and of a record. This kernel
reads the raw ``records`` field of a FetchResponse partition in two passes:
the first walks the batch headers, checks CRCs and decompresses; the
second reads the records straight into the buffers of the Arrow arrays.
"""

cimport numpy as cnp
from cpython.bytes cimport _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_XDECREF
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memchr, memcpy

import numpy as np
import pyarrow as pa

from sabot.errors import ConfigError, CorruptRecordError
from sabot.ext._protocols import TIMESTAMP_TYPE, FetchedColumns, JoinedValues
from sabot.ext._twins import CORRUPT_WAY_OUT, check_batch_crc, decompress_records

cnp.import_array()

cdef enum:
    LOG_OVERHEAD = 12
    BATCH_HEADER_SIZE = 61
    MIN_RECORD_SIZE = 7
    COMPRESSION_MASK = 0x07
    LOG_APPEND_TIME_FLAG = 0x08
    CONTROL_FLAG = 0x20

cdef int64_t INT32_MAX = 2147483647


cdef extern from "Python.h":
    # The joined values are written into a bytes object that is shrunk to its
    # final size at the end. _PyBytes_Resize requires the only reference to
    # the object, so that reference is held as a raw pointer.
    PyObject* _new_bytes "PyBytes_FromStringAndSize"(const char* data,
                                                     Py_ssize_t size) except NULL
    char* _bytes_data "PyBytes_AS_STRING"(PyObject* obj)


cdef inline int64_t _int64(const uint8_t* p) noexcept nogil:
    cdef uint64_t value = 0
    cdef int i
    for i in range(8):
        value = (value << 8) | p[i]
    return <int64_t>value


cdef inline int32_t _int32(const uint8_t* p) noexcept nogil:
    return <int32_t>((<uint64_t>p[0] << 24) | (<uint64_t>p[1] << 16) |
                     (<uint64_t>p[2] << 8) | p[3])


cdef inline Py_ssize_t _varint(const uint8_t* buffer, Py_ssize_t position, Py_ssize_t end,
                               int64_t* out) noexcept nogil:
    """Read a zigzag varint of at most 10 bytes; return the next position, or -1."""
    cdef uint64_t raw = 0
    cdef int shift = 0
    cdef uint8_t byte
    while position < end:
        byte = buffer[position]
        position += 1
        raw |= <uint64_t>(byte & 0x7F) << shift
        if not (byte & 0x80):
            out[0] = <int64_t>((raw >> 1) ^ (<uint64_t>0 - (raw & 1)))
            return position
        shift += 7
        if shift > 63:
            return -1
    return -1


cdef object _corrupt(int64_t base_offset, str problem):
    return CorruptRecordError(f"record batch at offset {base_offset}: {problem}; "
                              f"{CORRUPT_WAY_OUT}")


cdef object _bad_varint(int64_t base_offset):
    return CorruptRecordError(f"record batch at offset {base_offset} has a malformed "
                              f"varint; {CORRUPT_WAY_OUT}")


cdef class _Output:
    """The output columns, allocated once at the sizes the batch headers allow."""

    cdef:
        cnp.ndarray offsets_array, timestamps_array
        cnp.ndarray key_offsets_array, key_data_array, key_validity_array
        cnp.ndarray value_offsets_array, value_data_array, value_validity_array
        int64_t* offsets
        int64_t* timestamps
        int32_t* key_offsets
        int32_t* value_offsets
        uint8_t* key_data
        uint8_t* value_data
        uint8_t* key_validity
        uint8_t* value_validity
        char* joined
        PyObject* joined_object
        Py_ssize_t rows, capacity, null_keys, null_values
        int64_t key_position, value_position, joined_position, joined_count
        bint join_values, newline_in_values

    def __cinit__(self, Py_ssize_t capacity, int64_t data_capacity, bint join_values):
        self.capacity = capacity
        self.offsets_array = np.empty(capacity, dtype=np.int64)
        self.timestamps_array = np.empty(capacity, dtype=np.int64)
        self.key_offsets_array = np.empty(capacity + 1, dtype=np.int32)
        self.value_offsets_array = np.empty(capacity + 1, dtype=np.int32)
        # Keys, values and the joined values each take less room than the
        # record sections they come from, so data_capacity bounds them all.
        self.key_data_array = np.empty(data_capacity, dtype=np.uint8)
        self.value_data_array = np.empty(data_capacity, dtype=np.uint8)
        self.key_validity_array = np.zeros((capacity + 7) // 8, dtype=np.uint8)
        self.value_validity_array = np.zeros((capacity + 7) // 8, dtype=np.uint8)
        self.offsets = <int64_t*>cnp.PyArray_DATA(self.offsets_array)
        self.timestamps = <int64_t*>cnp.PyArray_DATA(self.timestamps_array)
        self.key_offsets = <int32_t*>cnp.PyArray_DATA(self.key_offsets_array)
        self.value_offsets = <int32_t*>cnp.PyArray_DATA(self.value_offsets_array)
        self.key_data = <uint8_t*>cnp.PyArray_DATA(self.key_data_array)
        self.value_data = <uint8_t*>cnp.PyArray_DATA(self.value_data_array)
        self.key_validity = <uint8_t*>cnp.PyArray_DATA(self.key_validity_array)
        self.value_validity = <uint8_t*>cnp.PyArray_DATA(self.value_validity_array)
        self.key_offsets[0] = 0
        self.value_offsets[0] = 0
        self.join_values = join_values
        self.joined = NULL
        self.joined_object = NULL
        if join_values:
            self.joined_object = _new_bytes(NULL, data_capacity)
            self.joined = _bytes_data(self.joined_object)

    def __dealloc__(self):
        Py_XDECREF(self.joined_object)

    cdef int append(self, int64_t offset, int64_t timestamp,
                    const uint8_t* key, int64_t key_length,
                    const uint8_t* value, int64_t value_length) except -1:
        cdef Py_ssize_t row = self.rows
        if row >= self.capacity:
            raise AssertionError("more records than the batch headers announced")
        self.offsets[row] = offset
        self.timestamps[row] = timestamp
        if key_length >= 0:
            memcpy(self.key_data + self.key_position, key, key_length)
            self.key_position += key_length
            self.key_validity[row >> 3] |= <uint8_t>(1 << (row & 7))
        else:
            self.null_keys += 1
        self.key_offsets[row + 1] = <int32_t>self.key_position
        if value_length >= 0:
            memcpy(self.value_data + self.value_position, value, value_length)
            self.value_position += value_length
            self.value_validity[row >> 3] |= <uint8_t>(1 << (row & 7))
        else:
            self.null_values += 1
        self.value_offsets[row + 1] = <int32_t>self.value_position
        if self.join_values and value_length > 0:
            if self.joined_count:
                self.joined[self.joined_position] = b'\n'
                self.joined_position += 1
            memcpy(self.joined + self.joined_position, value, value_length)
            self.joined_position += value_length
            self.joined_count += 1
            if not self.newline_in_values and memchr(value, b'\n', value_length) != NULL:
                self.newline_in_values = True
        self.rows = row + 1
        return 0

    cdef object binary(self, cnp.ndarray validity, cnp.ndarray offsets, cnp.ndarray data,
                       Py_ssize_t nulls):
        return pa.Array.from_buffers(
            pa.binary(), self.rows,
            [pa.py_buffer(validity) if nulls else None, pa.py_buffer(offsets),
             pa.py_buffer(data)],
            null_count=nulls)

    cdef object joined_values(self):
        cdef object data
        if not self.join_values:
            return None
        # On failure _PyBytes_Resize frees the object and sets the pointer to NULL.
        _PyBytes_Resize(&self.joined_object, self.joined_position)
        data = <object>self.joined_object
        Py_DECREF(data)
        self.joined_object = NULL
        self.joined = NULL
        return JoinedValues(data, self.joined_count, self.rows - self.joined_count,
                            self.newline_in_values)


def parse_record_batches(data, int64_t fetch_offset, bint join_values=False,
                         bint check_crcs=False):
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
    cdef:
        object py_view = memoryview(data).cast("B")
        const uint8_t[::1] view = py_view
        const uint8_t* buffer = &view[0] if view.shape[0] else NULL
        Py_ssize_t size = view.shape[0]
        Py_ssize_t position = 0, end
        int64_t base_offset, batch_next_offset, next_offset = fetch_offset
        int64_t total_section_bytes = 0, section_length
        Py_ssize_t capacity = 0
        int32_t batch_length, count
        int8_t magic
        int attributes, compression
        list sections = []
        object section
        _Output output

    # Pass 1: the batch headers. Each kept batch becomes a tuple of its
    # header fields and its records section (decompressed when it was).
    while size - position >= LOG_OVERHEAD:
        base_offset = _int64(buffer + position)
        batch_length = _int32(buffer + position + 8)
        if batch_length > size - position - LOG_OVERHEAD:
            break  # cut off by the fetch size limit
        if batch_length < 5:
            raise _corrupt(base_offset, f"batch length {batch_length} leaves no magic byte")
        magic = <int8_t>buffer[position + 16]
        if magic == 0 or magic == 1:
            return _no_records(fetch_offset, join_values, True)
        if magic != 2:
            raise _corrupt(base_offset, f"invalid magic byte {magic}, expected 2")
        if batch_length < BATCH_HEADER_SIZE - LOG_OVERHEAD:
            raise _corrupt(base_offset, f"batch length {batch_length} is shorter than "
                                        f"the v2 batch header")
        end = position + LOG_OVERHEAD + batch_length
        if check_crcs:
            check_batch_crc(py_view[position:end], <uint64_t>_int32(buffer + position + 17)
                            & 0xFFFFFFFF, base_offset)
        attributes = (buffer[position + 21] << 8) | buffer[position + 22]
        batch_next_offset = <int64_t>(<uint64_t>base_offset
                                      + <uint64_t><int64_t>_int32(buffer + position + 23) + 1)

        if not (attributes & CONTROL_FLAG):
            section = py_view[position + BATCH_HEADER_SIZE:end]
            compression = attributes & COMPRESSION_MASK
            if compression > 4:
                raise _corrupt(base_offset, f"invalid compression codec {compression}")
            if compression:
                section = decompress_records(compression, section, base_offset)
            section_length = len(section)
            count = _int32(buffer + position + 57)
            if count < 0 or count > section_length // MIN_RECORD_SIZE:
                raise _corrupt(base_offset, f"{count} records cannot fit in "
                                            f"{section_length} bytes")
            total_section_bytes += section_length
            if total_section_bytes > INT32_MAX:
                raise ConfigError(
                    f"the records of one partition in a fetch response exceed 2 GiB "
                    f"after decompression (at batch offset {base_offset}); lower the "
                    f"max_partition_fetch_bytes setting")
            capacity += count
            sections.append((base_offset, _int64(buffer + position + 27),
                             _int64(buffer + position + 35),
                             bool(attributes & LOG_APPEND_TIME_FLAG), count, section))

        if batch_next_offset > next_offset:
            next_offset = batch_next_offset
        position = end

    # Pass 2: the records.
    output = _Output(capacity, total_section_bytes, join_values)
    for header in sections:
        _read_records(output, header, fetch_offset)
    return FetchedColumns(
        offsets=output.offsets_array[:output.rows],
        timestamps=pa.Array.from_buffers(
            TIMESTAMP_TYPE, output.rows,
            [None, pa.py_buffer(output.timestamps_array[:output.rows])]),
        keys=output.binary(output.key_validity_array, output.key_offsets_array,
                           output.key_data_array, output.null_keys),
        values=output.binary(output.value_validity_array, output.value_offsets_array,
                             output.value_data_array, output.null_values),
        joined=output.joined_values(),
        next_offset=next_offset,
        parsed_bytes=position,
        legacy_format=False,
    )


cdef int _read_records(_Output output, tuple header, int64_t fetch_offset) except -1:
    cdef:
        int64_t base_offset = header[0]
        int64_t base_timestamp = header[1]
        int64_t max_timestamp = header[2]
        bint log_append_time = header[3]
        int32_t count = header[4]
        const uint8_t[::1] view = header[5]
        const uint8_t* buffer = &view[0] if view.shape[0] else NULL
        Py_ssize_t end = view.shape[0]
        Py_ssize_t position = 0, record_end, key_at, value_at
        int64_t length = 0, timestamp_delta = 0, offset_delta = 0
        int64_t key_length = 0, value_length = 0, header_count = 0
        int64_t header_key_length = 0, header_value_length = 0, offset, h
        int32_t remaining = count

    while remaining > 0:
        remaining -= 1
        position = _varint(buffer, position, end, &length)
        if position < 0:
            raise _bad_varint(base_offset)
        if length < MIN_RECORD_SIZE - 1 or length > end - position:
            raise _corrupt(base_offset, f"record length {length} does not fit the batch")
        record_end = position + length
        position += 1  # attributes: no bits are defined for records
        position = _varint(buffer, position, record_end, &timestamp_delta)
        if position < 0:
            raise _bad_varint(base_offset)
        position = _varint(buffer, position, record_end, &offset_delta)
        if position < 0:
            raise _bad_varint(base_offset)

        position = _varint(buffer, position, record_end, &key_length)
        if position < 0:
            raise _bad_varint(base_offset)
        if key_length < -1 or key_length > record_end - position:
            raise _corrupt(base_offset, f"key length {key_length} does not fit the record")
        key_at = position
        if key_length > 0:
            position += key_length

        position = _varint(buffer, position, record_end, &value_length)
        if position < 0:
            raise _bad_varint(base_offset)
        if value_length < -1 or value_length > record_end - position:
            raise _corrupt(base_offset, f"value length {value_length} does not fit the record")
        value_at = position
        if value_length > 0:
            position += value_length

        position = _varint(buffer, position, record_end, &header_count)
        if position < 0:
            raise _bad_varint(base_offset)
        if header_count < 0:
            raise _corrupt(base_offset, f"header count {header_count} is negative")
        h = 0
        while h < header_count:
            position = _varint(buffer, position, record_end, &header_key_length)
            if position < 0:
                raise _bad_varint(base_offset)
            if header_key_length < 0 or header_key_length > record_end - position:
                raise _corrupt(base_offset, f"header key length {header_key_length} does "
                                            f"not fit the record")
            position += header_key_length
            position = _varint(buffer, position, record_end, &header_value_length)
            if position < 0:
                raise _bad_varint(base_offset)
            if header_value_length < -1 or header_value_length > record_end - position:
                raise _corrupt(base_offset, f"header value length {header_value_length} "
                                            f"does not fit the record")
            if header_value_length > 0:
                position += header_value_length
            h += 1
        if position != record_end:
            raise _corrupt(base_offset, f"a record has {record_end - position} bytes "
                                        f"after its last header")

        offset = <int64_t>(<uint64_t>base_offset + <uint64_t>offset_delta)
        if offset < fetch_offset:
            continue  # a batch that starts before the fetch offset
        output.append(
            offset,
            max_timestamp if log_append_time
            else <int64_t>(<uint64_t>base_timestamp + <uint64_t>timestamp_delta),
            buffer + key_at, key_length, buffer + value_at, value_length)
    if position != end:
        raise _corrupt(base_offset, f"{end - position} bytes follow the last of "
                                    f"{count} records")
    return 0


def _no_records(int64_t fetch_offset, bint join_values, bint legacy_format):
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
