# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""Columns of one partition's fetched ConsumerRecords, in one pass over them.

The twin is ``record_columns`` in ``sabot/ext/_twins.py``. The keys become
the buffers of an Arrow binary array directly, and the values are joined
for the JSON reader in the same pass when asked.
"""

cimport numpy as cnp
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_Check, PyBytes_CheckExact,
                            PyBytes_FromStringAndSize, PyBytes_GET_SIZE)
from libc.stdint cimport int32_t, int64_t, uint8_t
from libc.string cimport memchr, memcpy, memset

import numpy as np
import pyarrow as pa

from sabot.ext._protocols import TIMESTAMP_TYPE, JoinedValues, RecordColumns

cnp.import_array()

cdef int64_t INT32_MAX = 2147483647


def record_columns(records, bint join_values=False):
    """Return the values, keys, offsets and timestamps of aiokafka ConsumerRecords.

    With ``join_values``, also the values that are neither None nor empty,
    joined with ``b"\\n"`` for the JSON reader.
    """
    cdef:
        list items = records if type(records) is list else list(records)
        Py_ssize_t count = len(items)
        Py_ssize_t i
        object record, key, value
        list values = [None] * count
        list keys = [None] * count
        cnp.ndarray offsets_array = np.empty(count, dtype=np.int64)
        cnp.ndarray timestamps_array = np.empty(count, dtype=np.int64)
        int64_t[::1] offsets = offsets_array
        int64_t[::1] timestamps = timestamps_array
        int64_t key_bytes = 0
        Py_ssize_t null_keys = 0
        bint keys_are_bytes = True
        int64_t joined_bytes = 0
        Py_ssize_t joined_count = 0
        bint newline_in_values = False
        Py_ssize_t size

    for i in range(count):
        record = items[i]
        value = record.value
        key = record.key
        values[i] = value
        keys[i] = key
        offsets[i] = record.offset
        timestamps[i] = record.timestamp

        if key is None:
            null_keys += 1
        elif PyBytes_CheckExact(key):
            key_bytes += PyBytes_GET_SIZE(key)
        else:
            keys_are_bytes = False

        if join_values and value is not None:
            if PyBytes_Check(value):
                size = PyBytes_GET_SIZE(value)
                if size:
                    joined_bytes += size
                    joined_count += 1
                    if not newline_in_values and \
                            memchr(PyBytes_AS_STRING(value), b'\n', size) != NULL:
                        newline_in_values = True
            elif value:
                raise TypeError(f"a record value must be bytes to be joined, "
                                f"got {type(value).__name__}")

    if keys_are_bytes and key_bytes <= INT32_MAX:
        key_array = _binary_array(keys, count, key_bytes, null_keys)
    else:
        # Keys of another type, or too many bytes for int32 offsets: let
        # pyarrow convert them as the twin does.
        key_array = pa.array(keys, type=pa.binary())

    timestamp_array = pa.Array.from_buffers(
        TIMESTAMP_TYPE, count, [None, pa.py_buffer(timestamps_array)])
    joined = None
    if join_values:
        joined = JoinedValues(
            data=_join(values, joined_bytes, joined_count),
            count=joined_count,
            empty_count=count - joined_count,
            newline_in_values=newline_in_values,
        )
    return RecordColumns(values, key_array, offsets_array, timestamp_array, joined)


cdef object _binary_array(list keys, Py_ssize_t count, int64_t key_bytes,
                          Py_ssize_t null_keys):
    """Build a pyarrow binary array from ``bytes`` or None items, copying once."""
    cdef:
        cnp.ndarray offsets_array = np.empty(count + 1, dtype=np.int32)
        cnp.ndarray data_array = np.empty(key_bytes, dtype=np.uint8)
        cnp.ndarray validity_array = None
        int32_t[::1] offsets = offsets_array
        uint8_t* data = <uint8_t*>cnp.PyArray_DATA(data_array)
        uint8_t* validity = NULL
        int32_t position = 0
        Py_ssize_t i, size
        object key

    if null_keys:
        validity_array = np.empty((count + 7) // 8, dtype=np.uint8)
        validity = <uint8_t*>cnp.PyArray_DATA(validity_array)
        memset(validity, 0, (count + 7) // 8)
    offsets[0] = 0
    for i in range(count):
        key = keys[i]
        if key is not None:
            size = PyBytes_GET_SIZE(key)
            memcpy(data + position, PyBytes_AS_STRING(key), size)
            position += <int32_t>size
            if validity != NULL:
                validity[i >> 3] |= <uint8_t>(1 << (i & 7))
        offsets[i + 1] = position
    return pa.Array.from_buffers(
        pa.binary(), count,
        [None if validity_array is None else pa.py_buffer(validity_array),
         pa.py_buffer(offsets_array), pa.py_buffer(data_array)],
        null_count=null_keys)


cdef bytes _join(list values, int64_t total, Py_ssize_t count):
    """Join the non-empty ``bytes`` values with b"\\n" between them."""
    cdef:
        bytes joined
        char* cursor
        Py_ssize_t i, size
        bint first = True
        object value
    if count == 0:
        return b""
    joined = PyBytes_FromStringAndSize(NULL, total + count - 1)
    cursor = PyBytes_AS_STRING(joined)
    for i in range(len(values)):
        value = values[i]
        if value is None or not PyBytes_Check(value):
            continue
        size = PyBytes_GET_SIZE(value)
        if size == 0:
            continue
        if not first:
            cursor[0] = b'\n'
            cursor += 1
        first = False
        memcpy(cursor, PyBytes_AS_STRING(value), size)
        cursor += size
    return joined
