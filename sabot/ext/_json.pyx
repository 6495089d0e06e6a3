# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""Decode a fetch's JSON objects into Arrow columns in one pass.

The twin is ``decode_json_objects`` in ``sabot/ext/_twins.py``, which runs
``pyarrow.json.read_json`` over the same bytes. This kernel gives the same
record batch for the values it reads, and hands the whole input to the twin
for anything else, so callers always get the reader's result.

What is read here: objects whose values are null, true, false, numbers and
strings, one object per value, separated by whitespace. Column types are
inferred as Arrow's reader infers them: a column is null until it has a
value; numbers without a fraction or an exponent are int64, and a column
with any other number is double; fields appear in the order they are first
seen, and a row without a field has a null there. A column whose strings
are all dates or date-times of the forms "2024-01-31" and
"2024-01-31T10:00:00" (with "T" or a space, and an optional "Z") is
timestamp[s].

What goes to the twin: nested objects and arrays, a column holding two
kinds of value (a number and a string, say), a field given twice in one
object, integers beyond int64, the literal ``-0``, a number too large for
a double or one that rounds to zero, strings that are not valid UTF-8 or
that hold a lone surrogate escape, other strings that start like a date
("2024-"), which Arrow's reader may read as timestamps, an explicit
schema, and any input that is not well-formed JSON, whose error the reader
reports.
"""

cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport isinf
from libc.stdint cimport INT32_MAX, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

import numpy as np
import pyarrow as pa

from sabot.ext import _twins

cnp.import_array()


cdef extern from "Python.h":
    # Locale-independent and correctly rounded; with a NULL overflow
    # exception it returns an infinity for a number too large.
    double PyOS_string_to_double(const char* s, char** endptr,
                                 void* overflow_exception) except? -1.0


cdef enum:
    KIND_NULL = 0
    KIND_BOOL = 1
    KIND_INT = 2
    KIND_DOUBLE = 3
    KIND_STRING = 4

# Status of a step: go on, or hand the whole input to the twin.
cdef enum:
    DECLINE = 0
    OK = 1

# Powers of ten that a double holds exactly: with a mantissa below 2**53,
# one multiplication or division by one of them is correctly rounded.
cdef double[23] EXACT_POWERS = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12,
    1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
]
cdef uint64_t EXACT_MANTISSA = 1ULL << 53
cdef uint64_t INT64_LIMIT = 9223372036854775807ULL


def decode_json_objects(data, Py_ssize_t count, bint newline_in_values=False,
                        schema=None):
    """Parse ``count`` JSON objects separated by whitespace into one record batch.

    Returns what ``pyarrow.json.read_json`` returns for the same bytes, as
    one record batch, or None when the reader fails or finds a different
    number of objects. ``newline_in_values`` and ``schema`` are passed to
    the reader when the input goes to it.
    """
    if schema is None and type(data) is bytes:
        batch = read_flat_objects(data, count, not newline_in_values)
        if batch is not None:
            return batch
    return _twins.decode_json_objects(data, count, newline_in_values, schema)


def read_flat_objects(bytes data, Py_ssize_t count, bint one_per_line=True):
    """The compiled reader alone: the record batch, or None where it declines.

    With ``one_per_line`` every object must end its line, as when no value
    holds a newline; otherwise objects may span lines.
    """
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    if count <= 0 or size > INT32_MAX:
        return None
    cdef _Reader reader = _Reader(data, count)
    if reader.read_all(one_per_line) != OK:
        return None
    return reader.finish()


cdef class _Column:
    """One output column, with buffers sized for every row of the input."""

    cdef:
        bytes name
        int kind
        # The last row that gave this column a value (or null), to find a
        # field given twice in one object.
        Py_ssize_t stamp
        Py_ssize_t present
        Py_ssize_t count
        Py_ssize_t capacity
        object valid_array
        uint8_t* valid
        object values_array
        char* values
        object offsets_array
        int32_t* offsets
        # offsets[0..filled] are written: rows below ``filled`` are done.
        Py_ssize_t filled
        object data_array
        char* data
        Py_ssize_t data_length
        # True while every string of the column is a timestamp of a form
        # read here; the column then becomes timestamp[s], as in Arrow.
        bint maybe_timestamps
        object seconds_array
        int64_t* seconds

    def __cinit__(self, bytes name, Py_ssize_t count, Py_ssize_t capacity):
        self.name = name
        self.kind = KIND_NULL
        self.stamp = -1
        self.present = 0
        self.count = count
        self.capacity = capacity
        self.valid_array = np.zeros(count, dtype=np.uint8)
        self.valid = <uint8_t*>cnp.PyArray_DATA(self.valid_array)

    cdef int start_values(self, int kind) except -1:
        """Give a column that held only nulls its first kind of value."""
        if kind == KIND_STRING:
            self.offsets_array = np.zeros(self.count + 1, dtype=np.int32)
            self.offsets = <int32_t*>cnp.PyArray_DATA(self.offsets_array)
            self.filled = 0
            # Unescaping never lengthens a string, so the input's size bounds
            # the bytes of every string in it. The pages are not touched
            # until written.
            self.data_array = np.empty(self.capacity, dtype=np.uint8)
            self.data = <char*>cnp.PyArray_DATA(self.data_array)
            self.data_length = 0
            self.maybe_timestamps = True
            self.seconds_array = np.zeros(self.count, dtype=np.int64)
            self.seconds = <int64_t*>cnp.PyArray_DATA(self.seconds_array)
        else:
            dtype = (np.uint8 if kind == KIND_BOOL
                     else np.int64 if kind == KIND_INT else np.float64)
            self.values_array = np.zeros(self.count, dtype=dtype)
            self.values = <char*>cnp.PyArray_DATA(self.values_array)
        self.kind = kind
        return 0

    cdef int widen_to_double(self, Py_ssize_t rows) except -1:
        """Turn the int64 values of the first ``rows`` rows into doubles."""
        cdef int64_t* ints = <int64_t*>self.values
        doubles_array = np.zeros(self.count, dtype=np.float64)
        cdef double* doubles = <double*>cnp.PyArray_DATA(doubles_array)
        cdef Py_ssize_t i
        for i in range(rows):
            doubles[i] = <double>ints[i]
        self.values_array = doubles_array
        self.values = <char*>doubles
        self.kind = KIND_DOUBLE
        return 0

    cdef inline void end_offsets(self, Py_ssize_t row):
        """Write the offsets of the rows before ``row`` that have no string."""
        cdef Py_ssize_t i
        for i in range(self.filled + 1, row + 1):
            self.offsets[i] = <int32_t>self.data_length
        if row > self.filled:
            self.filled = row

    cdef object to_array(self):
        cdef Py_ssize_t nulls = self.count - self.present
        if self.kind == KIND_NULL:
            return pa.nulls(self.count)
        validity = None
        if nulls:
            validity = pa.py_buffer(np.packbits(self.valid_array, bitorder="little"))
        if self.kind == KIND_STRING and self.maybe_timestamps:
            return pa.Array.from_buffers(pa.timestamp("s"), self.count,
                                         [validity, pa.py_buffer(self.seconds_array)],
                                         null_count=nulls)
        if self.kind == KIND_STRING:
            self.end_offsets(self.count)
            return pa.Array.from_buffers(
                pa.string(), self.count,
                [validity, pa.py_buffer(self.offsets_array),
                 pa.py_buffer(self.data_array[:self.data_length])],
                null_count=nulls)
        if self.kind == KIND_BOOL:
            bits = pa.py_buffer(np.packbits(self.values_array, bitorder="little"))
            return pa.Array.from_buffers(pa.bool_(), self.count, [validity, bits],
                                         null_count=nulls)
        arrow_type = pa.int64() if self.kind == KIND_INT else pa.float64()
        return pa.Array.from_buffers(arrow_type, self.count,
                                     [validity, pa.py_buffer(self.values_array)],
                                     null_count=nulls)


cdef class _Reader:
    """The parse of one input: a cursor over its bytes and the columns found."""

    cdef:
        bytes source
        const uint8_t* buf
        Py_ssize_t size
        Py_ssize_t pos
        Py_ssize_t count
        list columns
        dict by_name

    def __cinit__(self, bytes source, Py_ssize_t count):
        self.source = source
        self.buf = <const uint8_t*>PyBytes_AS_STRING(source)
        self.size = PyBytes_GET_SIZE(source)
        self.pos = 0
        self.count = count
        self.columns = []
        self.by_name = {}

    cdef object finish(self):
        if not self.columns:
            # A batch without columns cannot carry a row count; the twin
            # returns the reader's table for it.
            return None
        cdef _Column column
        arrays = []
        names = []
        for column in self.columns:
            arrays.append(column.to_array())
            names.append(column.name.decode("utf-8"))
        return pa.RecordBatch.from_arrays(arrays, names=names)

    cdef inline void skip_space(self):
        cdef uint8_t c
        while self.pos < self.size:
            c = self.buf[self.pos]
            if c != 32 and c != 10 and c != 13 and c != 9:
                return
            self.pos += 1

    cdef inline void skip_line_space(self):
        cdef uint8_t c
        while self.pos < self.size:
            c = self.buf[self.pos]
            if c != 32 and c != 13 and c != 9:
                return
            self.pos += 1

    cdef int read_all(self, bint one_per_line) except -1:
        cdef Py_ssize_t row = 0
        while True:
            if one_per_line:
                self.skip_line_space()
            else:
                self.skip_space()
            if self.pos >= self.size:
                break
            if row >= self.count or self.buf[self.pos] != 123:  # '{'
                return DECLINE
            if self.read_object(row) != OK:
                return DECLINE
            row += 1
            if one_per_line:
                # Each object ends its line: the reader takes one per line.
                self.skip_line_space()
                if self.pos < self.size:
                    if self.buf[self.pos] != 10:
                        return DECLINE
                    self.pos += 1
        return OK if row == self.count else DECLINE

    cdef int read_object(self, Py_ssize_t row) except -1:
        cdef:
            Py_ssize_t expected = 0
            Py_ssize_t key_start, key_length, index
            const uint8_t* key
            _Column column
            list columns = self.columns
            uint8_t c
            bytes unescaped
        self.pos += 1  # past '{'
        self.skip_space()
        if self.pos >= self.size:
            return DECLINE
        if self.buf[self.pos] == 125:  # '}'
            self.pos += 1
            return OK
        while True:
            if self.pos >= self.size or self.buf[self.pos] != 34:  # '"'
                return DECLINE
            self.pos += 1
            key_start = self.pos
            while self.pos < self.size:
                c = self.buf[self.pos]
                if c == 34 or c == 92 or c < 32:
                    break
                self.pos += 1
            if self.pos >= self.size:
                return DECLINE
            if self.buf[self.pos] == 34:
                key = self.buf + key_start
                key_length = self.pos - key_start
                self.pos += 1
            else:
                # A key with escapes: unescape it whole.
                self.pos = key_start
                unescaped = self.read_key()
                if unescaped is None:
                    return DECLINE
                key = <const uint8_t*>PyBytes_AS_STRING(unescaped)
                key_length = PyBytes_GET_SIZE(unescaped)

            # Rows mostly list their fields in the same order: try the next
            # column before looking the name up.
            column = None
            if expected < len(columns):
                column = <_Column>columns[expected]
                if (PyBytes_GET_SIZE(column.name) != key_length
                        or memcmp(PyBytes_AS_STRING(column.name), key, key_length) != 0):
                    column = None
            if column is None:
                name = PyBytes_FromStringAndSize(<const char*>key, key_length)
                found = self.by_name.get(name)
                if found is None:
                    if not _valid_utf8(key, key_length):
                        return DECLINE
                    index = len(columns)
                    column = _Column(name, self.count, self.size)
                    columns.append(column)
                    self.by_name[name] = index
                else:
                    index = found
                    column = <_Column>columns[index]
                expected = index + 1
            else:
                expected += 1
            if column.stamp == row:
                return DECLINE
            column.stamp = row

            self.skip_space()
            if self.pos >= self.size or self.buf[self.pos] != 58:  # ':'
                return DECLINE
            self.pos += 1
            self.skip_space()
            if self.read_value(column, row) != OK:
                return DECLINE
            self.skip_space()
            if self.pos >= self.size:
                return DECLINE
            c = self.buf[self.pos]
            self.pos += 1
            if c == 125:  # '}'
                return OK
            if c != 44:  # ','
                return DECLINE
            self.skip_space()

    cdef bytes read_key(self):
        """Unescape the key at ``pos`` (after its opening quote); None to decline."""
        out = bytearray(self.size - self.pos)
        cdef Py_ssize_t written = _read_string(self.buf, self.size, &self.pos,
                                               <uint8_t*><char*>out)
        if written < 0:
            return None
        return bytes(out[:written])

    cdef int read_value(self, _Column column, Py_ssize_t row) except -1:
        cdef:
            uint8_t c
            uint8_t* text
            Py_ssize_t written
            int number
            int64_t integer = 0
            double real = 0.0
        if self.pos >= self.size:
            return DECLINE
        c = self.buf[self.pos]
        if c == 34:  # '"'
            if column.kind == KIND_NULL:
                column.start_values(KIND_STRING)
            elif column.kind != KIND_STRING:
                return DECLINE
            column.end_offsets(row)
            self.pos += 1
            text = <uint8_t*>column.data + column.data_length
            written = _read_string(self.buf, self.size, &self.pos, text)
            if written < 0:
                return DECLINE
            if column.maybe_timestamps:
                if not _parse_timestamp(text, written, column.seconds + row):
                    if _looks_like_date(text, written):
                        # A form of ISO 8601 not read here: the reader decides.
                        return DECLINE
                    column.maybe_timestamps = False
            column.data_length += written
            column.offsets[row + 1] = <int32_t>column.data_length
            column.filled = row + 1
        elif c == 110:  # 'n'
            if not self.literal(b"null", 4):
                return DECLINE
            return OK
        elif c == 116 or c == 102:  # 't', 'f'
            if c == 116:
                if not self.literal(b"true", 4):
                    return DECLINE
            elif not self.literal(b"false", 5):
                return DECLINE
            if column.kind == KIND_NULL:
                column.start_values(KIND_BOOL)
            elif column.kind != KIND_BOOL:
                return DECLINE
            (<uint8_t*>column.values)[row] = c == 116
        elif c == 45 or 48 <= c <= 57:  # '-', a digit
            number = _read_number(self.buf, self.size, &self.pos, &integer, &real)
            if number == 0:
                return DECLINE
            if column.kind == KIND_NULL:
                column.start_values(KIND_INT if number == 1 else KIND_DOUBLE)
            elif column.kind == KIND_INT:
                if number == 2:
                    column.widen_to_double(row)
            elif column.kind != KIND_DOUBLE:
                return DECLINE
            if column.kind == KIND_INT:
                (<int64_t*>column.values)[row] = integer
            elif number == 1:
                (<double*>column.values)[row] = <double>integer
            else:
                (<double*>column.values)[row] = real
        else:
            # '{' and '[' (nested values) and anything that is not JSON.
            return DECLINE
        column.valid[row] = 1
        column.present += 1
        return OK

    cdef inline bint literal(self, const char* word, Py_ssize_t length):
        if self.pos + length > self.size or memcmp(self.buf + self.pos, word, length) != 0:
            return False
        self.pos += length
        return True


cdef inline bint _is_digit(uint8_t c) noexcept nogil:
    return 48 <= c <= 57


cdef inline bint _looks_like_date(const uint8_t* text, Py_ssize_t length) noexcept nogil:
    # Arrow's reader makes a timestamp column of ISO 8601 strings in more
    # forms than _parse_timestamp reads ("2024-01-31T10:00+01:00", say). A
    # string that starts with four digits and a dash and is not read there
    # goes to the reader, which decides.
    return (length >= 5 and _is_digit(text[0]) and _is_digit(text[1])
            and _is_digit(text[2]) and _is_digit(text[3]) and text[4] == 45)


cdef inline int _digits(const uint8_t* text, int count) noexcept nogil:
    """The value of ``count`` decimal digits, or -1."""
    cdef int value = 0, i
    for i in range(count):
        if not _is_digit(text[i]):
            return -1
        value = value * 10 + (text[i] - 48)
    return value


cdef bint _parse_timestamp(const uint8_t* text, Py_ssize_t length,
                           int64_t* seconds) noexcept nogil:
    """Read "YYYY-MM-DD", or "YYYY-MM-DDThh:mm:ss" with "T" or a space and an
    optional "Z", into seconds since the epoch; False for anything else."""
    cdef int year, month, day, hour = 0, minute = 0, second = 0
    cdef int64_t y, era, year_of_era, day_of_year, day_of_era, days
    if length != 10 and length != 19 and length != 20:
        return False
    if text[4] != 45 or text[7] != 45:
        return False
    year = _digits(text, 4)
    month = _digits(text + 5, 2)
    day = _digits(text + 8, 2)
    if year < 0 or month < 1 or month > 12 or day < 1 or day > _days_in_month(year, month):
        return False
    if length > 10:
        if ((text[10] != 84 and text[10] != 32) or text[13] != 58 or text[16] != 58
                or (length == 20 and text[19] != 90)):
            return False
        hour = _digits(text + 11, 2)
        minute = _digits(text + 14, 2)
        second = _digits(text + 17, 2)
        if not (0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 59):
            return False
    # Days since 1970-01-01 in the proleptic Gregorian calendar, counted in
    # 400-year eras that start on March 1st.
    y = year - (1 if month <= 2 else 0)
    era = (y if y >= 0 else y - 399) // 400
    year_of_era = y - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    days = era * 146097 + day_of_era - 719468
    seconds[0] = days * 86400 + hour * 3600 + minute * 60 + second
    return True


cdef inline int _days_in_month(int year, int month) noexcept nogil:
    if month == 2:
        return 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28
    return 30 if month == 4 or month == 6 or month == 9 or month == 11 else 31


cdef int _read_number(const uint8_t* buf, Py_ssize_t size, Py_ssize_t* pos_io,
                      int64_t* integer, double* real) except -1:
    """Read the JSON number at ``pos_io``: 1 for an int64, 2 for a double, 0 to decline."""
    cdef:
        Py_ssize_t pos = pos_io[0]
        Py_ssize_t start = pos
        bint negative = False
        bint fraction_or_exponent = False
        bint exact = True
        uint64_t mantissa = 0
        int digits = 0          # digits in the mantissa, leading zeros included
        int scale = 0           # digits after the point that are in the mantissa
        int exponent = 0
        bint exponent_negative = False
        double value
        char* end = NULL
    if buf[pos] == 45:  # '-'
        negative = True
        pos += 1
    if pos >= size or not _is_digit(buf[pos]):
        return 0
    if buf[pos] == 48:  # '0': no more digits may follow
        pos += 1
        digits = 1
        if pos < size and _is_digit(buf[pos]):
            return 0
    else:
        while pos < size and _is_digit(buf[pos]):
            if digits < 19:
                mantissa = mantissa * 10 + (buf[pos] - 48)
            else:
                exact = False
            digits += 1
            pos += 1
    if pos < size and buf[pos] == 46:  # '.'
        fraction_or_exponent = True
        pos += 1
        if pos >= size or not _is_digit(buf[pos]):
            return 0
        while pos < size and _is_digit(buf[pos]):
            if digits < 19:
                mantissa = mantissa * 10 + (buf[pos] - 48)
                scale += 1
                digits += 1
            else:
                exact = False
            pos += 1
    if pos < size and (buf[pos] == 101 or buf[pos] == 69):  # 'e', 'E'
        fraction_or_exponent = True
        pos += 1
        if pos < size and (buf[pos] == 43 or buf[pos] == 45):
            exponent_negative = buf[pos] == 45
            pos += 1
        if pos >= size or not _is_digit(buf[pos]):
            return 0
        while pos < size and _is_digit(buf[pos]):
            if exponent < 100000:
                exponent = exponent * 10 + (buf[pos] - 48)
            pos += 1

    if not fraction_or_exponent:
        # More than 19 digits, or beyond int64: the reader makes it a double.
        if not exact or digits > 19:
            return 0
        if negative:
            if mantissa == 0 or mantissa > INT64_LIMIT + 1:
                return 0  # "-0" becomes -0.0 in a double column, not 0
            integer[0] = -<int64_t>(mantissa - 1) - 1
        else:
            if mantissa > INT64_LIMIT:
                return 0
            integer[0] = <int64_t>mantissa
        pos_io[0] = pos
        return 1

    if exponent_negative:
        exponent = -exponent
    exponent -= scale
    if exact and mantissa <= EXACT_MANTISSA and -22 <= exponent <= 22:
        value = <double>mantissa
        if exponent >= 0:
            value *= EXACT_POWERS[exponent]
        else:
            value /= EXACT_POWERS[-exponent]
        if negative:
            value = -value
    else:
        # The sign is part of the text parsed here.
        value = PyOS_string_to_double(<const char*>buf + start, &end, NULL)
        if end != <const char*>buf + pos:
            return 0
        if isinf(value) or (value == 0.0 and mantissa != 0):
            # Too large for a double (the reader rejects it), or rounded to
            # zero (left to the reader).
            return 0
    real[0] = value
    pos_io[0] = pos
    return 2


cdef inline int _hex4(const uint8_t* text) noexcept nogil:
    """The value of four hex digits, or -1."""
    cdef int value = 0, i
    cdef uint8_t c
    for i in range(4):
        c = text[i]
        if 48 <= c <= 57:
            value = value * 16 + (c - 48)
        elif 97 <= c <= 102:
            value = value * 16 + (c - 87)
        elif 65 <= c <= 70:
            value = value * 16 + (c - 55)
        else:
            return -1
    return value


cdef Py_ssize_t _read_string(const uint8_t* buf, Py_ssize_t size, Py_ssize_t* pos_io,
                             uint8_t* out) noexcept nogil:
    """Unescape the string at ``pos_io`` (after its opening quote) into ``out``.

    Returns the bytes written and moves ``pos_io`` past the closing quote,
    or returns -1 to decline.
    """
    cdef:
        Py_ssize_t pos = pos_io[0]
        Py_ssize_t start
        Py_ssize_t written = 0
        bint high = False
        uint8_t c
        int code, low
    while True:
        start = pos
        while pos < size:
            c = buf[pos]
            if c == 34 or c == 92 or c < 32:
                break
            if c >= 128:
                high = True
            pos += 1
        if pos >= size:
            return -1
        memcpy(out + written, buf + start, pos - start)
        written += pos - start
        c = buf[pos]
        if c == 34:  # the closing quote
            pos += 1
            break
        if c < 32:  # a control character must be escaped in JSON
            return -1
        pos += 1  # past the backslash
        if pos >= size:
            return -1
        c = buf[pos]
        pos += 1
        if c == 34 or c == 92 or c == 47:  # '"', '\\', '/'
            out[written] = c
        elif c == 98:
            out[written] = 8
        elif c == 102:
            out[written] = 12
        elif c == 110:
            out[written] = 10
        elif c == 114:
            out[written] = 13
        elif c == 116:
            out[written] = 9
        elif c == 117:  # 'u'
            if pos + 4 > size:
                return -1
            code = _hex4(buf + pos)
            pos += 4
            if code < 0 or 0xDC00 <= code <= 0xDFFF:
                return -1
            if 0xD800 <= code <= 0xDBFF:
                if pos + 6 > size or buf[pos] != 92 or buf[pos + 1] != 117:
                    return -1
                low = _hex4(buf + pos + 2)
                if not 0xDC00 <= low <= 0xDFFF:
                    return -1
                pos += 6
                code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
            written += _put_utf8(out + written, <uint32_t>code)
            continue
        else:
            return -1
        written += 1
    if high and not _valid_utf8(out, written):
        return -1
    pos_io[0] = pos
    return written


cdef inline Py_ssize_t _put_utf8(uint8_t* out, uint32_t code) noexcept nogil:
    if code < 0x80:
        out[0] = <uint8_t>code
        return 1
    if code < 0x800:
        out[0] = <uint8_t>(0xC0 | (code >> 6))
        out[1] = <uint8_t>(0x80 | (code & 0x3F))
        return 2
    if code < 0x10000:
        out[0] = <uint8_t>(0xE0 | (code >> 12))
        out[1] = <uint8_t>(0x80 | ((code >> 6) & 0x3F))
        out[2] = <uint8_t>(0x80 | (code & 0x3F))
        return 3
    out[0] = <uint8_t>(0xF0 | (code >> 18))
    out[1] = <uint8_t>(0x80 | ((code >> 12) & 0x3F))
    out[2] = <uint8_t>(0x80 | ((code >> 6) & 0x3F))
    out[3] = <uint8_t>(0x80 | (code & 0x3F))
    return 4


cdef bint _valid_utf8(const uint8_t* text, Py_ssize_t length) noexcept nogil:
    """Whether ``text`` is UTF-8 as Python's strict decoder accepts it."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, second
    while i < length:
        c = text[i]
        if c < 0x80:
            i += 1
        elif 0xC2 <= c <= 0xDF:
            if i + 1 >= length or (text[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif 0xE0 <= c <= 0xEF:
            if i + 2 >= length:
                return False
            second = text[i + 1]
            # No overlong forms (E0 80..9F) and no surrogates (ED A0..BF).
            if ((second & 0xC0) != 0x80 or (c == 0xE0 and second < 0xA0)
                    or (c == 0xED and second > 0x9F) or (text[i + 2] & 0xC0) != 0x80):
                return False
            i += 3
        elif 0xF0 <= c <= 0xF4:
            if i + 3 >= length:
                return False
            second = text[i + 1]
            # No overlong forms (F0 80..8F) and nothing above U+10FFFF.
            if ((second & 0xC0) != 0x80 or (c == 0xF0 and second < 0x90)
                    or (c == 0xF4 and second > 0x8F) or (text[i + 2] & 0xC0) != 0x80
                    or (text[i + 3] & 0xC0) != 0x80):
                return False
            i += 4
        else:
            return False
    return True
