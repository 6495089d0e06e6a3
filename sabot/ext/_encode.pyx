# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, infer_types=False
"""Row encoders: one JSON object or one msgpack map per row of a record batch.

The encoders read the batch's Arrow buffers in place through the Arrow C
Data Interface (see ``_arrow_c.pxd``) and build no Python object per cell.
Their output is byte for byte that of the twins in ``sabot/ext/_twins.py``,
which run orjson and msgpack over ``batch.to_pylist()``.

Arrow types read here: null, bool, int8 to int64, uint8 to uint64, float32,
float64, string, large_string, timestamp (any unit; no time zone, "UTC" or a
fixed offset such as "+05:30"), list, large_list, fixed_size_list and struct,
nested to any depth up to ``MAX_DEPTH``; msgpack also reads binary and
large_binary. A batch with any other type (float16, decimal, date, time,
duration, dictionary, map, union, view and extension types, or a named time
zone such as "Europe/Paris") is passed whole to the twin, and so is a batch
with a timestamp outside the years 1 to 9999 that Python's datetime supports.

NOTE: string bytes are copied without UTF-8 validation. pyarrow builds valid
UTF-8 arrays, but for an invalid one (built with ``Array.from_buffers``) the
twin raises UnicodeDecodeError where these encoders write the bytes as they are.

The GIL stays held: float formatting calls CPython's ``PyOS_double_to_string``,
which allocates from the Python heap, and every row becomes a bytes object.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.math cimport INFINITY, isfinite, nextafter, signbit
from libc.stdint cimport (INT64_MAX, INT64_MIN, int8_t, int16_t, int32_t, int64_t, uint8_t,
                          uint16_t, uint32_t, uint64_t)
from libc.string cimport memcpy, strcmp, strlen, strncmp

from sabot.ext._arrow_c cimport ArrowArray, ArrowSchema

import msgpack
import orjson
import pyarrow as pa

from sabot.ext import _twins


cdef extern from "Python.h":
    char* PyOS_double_to_string(double val, char format_code, int precision, int flags,
                                int* type_) except NULL


cdef enum:
    # Nesting deeper than this goes to the twin, which then applies orjson's
    # and msgpack's own recursion limits.
    MAX_DEPTH = 64
    # Return codes of the writers, besides -1 for a raised exception:
    # FALLBACK means "this batch holds something only the twin handles".
    OK = 0
    FALLBACK = 1
    # Days from 1970-01-01 to 0001-01-01 and to 9999-12-31, the range of datetime.
    MIN_EPOCH_DAY = -719162
    MAX_EPOCH_DAY = 2932896

cdef enum Kind:
    K_NULL
    K_BOOL
    K_INT8
    K_INT16
    K_INT32
    K_INT64
    K_UINT8
    K_UINT16
    K_UINT32
    K_UINT64
    K_FLOAT32
    K_FLOAT64
    K_STRING
    K_LARGE_STRING
    K_BINARY
    K_LARGE_BINARY
    K_TIMESTAMP
    K_LIST
    K_LARGE_LIST
    K_FIXED_LIST
    K_STRUCT


cdef struct Column:
    Kind kind
    int64_t offset
    const uint8_t* validity
    # buffers[1]: the values of fixed-width types, the offsets of variable-width ones.
    const uint8_t* values
    # buffers[2]: the bytes of string and binary arrays.
    const uint8_t* data
    # Timestamps: units per second, and the zone's offset east of UTC in seconds.
    int64_t units_per_second
    int64_t utc_offset
    # Fixed-size lists: values per list.
    int64_t list_size
    int64_t n_children
    Column* children
    # This column's name, encoded as a key of its parent struct (or the row).
    const char* key
    Py_ssize_t key_length


# JSON escapes, as orjson writes them: the two-character forms for \b \t \n
# \f \r, \" and \\; "u" for \u00XX with lower-case hex; 0 for a byte copied as is.
cdef char JSON_ESCAPE[256]
cdef const char* HEX_DIGITS = b"0123456789abcdef"


cdef void _init_json_escapes() noexcept:
    cdef int c
    for c in range(256):
        JSON_ESCAPE[c] = 0
    for c in range(0x20):
        JSON_ESCAPE[c] = b'u'
    JSON_ESCAPE[0x08] = b'b'
    JSON_ESCAPE[0x09] = b't'
    JSON_ESCAPE[0x0A] = b'n'
    JSON_ESCAPE[0x0C] = b'f'
    JSON_ESCAPE[0x0D] = b'r'
    JSON_ESCAPE[0x22] = b'"'
    JSON_ESCAPE[0x5C] = b'\\'


_init_json_escapes()


@cython.final
cdef class _Buffer:
    """A growable byte buffer that one row is written into."""

    cdef char* data
    cdef Py_ssize_t length
    cdef Py_ssize_t capacity

    def __cinit__(self, Py_ssize_t capacity=4096):
        self.data = <char*>PyMem_Malloc(capacity)
        if self.data == NULL:
            raise MemoryError()
        self.capacity = capacity
        self.length = 0

    def __dealloc__(self):
        PyMem_Free(self.data)

    cdef int grow(self, Py_ssize_t extra) except -1:
        cdef:
            Py_ssize_t wanted = self.length + extra
            Py_ssize_t capacity = self.capacity * 2
            char* data
        if capacity < wanted:
            capacity = wanted
        data = <char*>PyMem_Realloc(self.data, capacity)
        if data == NULL:
            raise MemoryError()
        self.data = data
        self.capacity = capacity
        return 0

    cdef inline int reserve(self, Py_ssize_t extra) except -1:
        if self.length + extra > self.capacity:
            return self.grow(extra)
        return 0

    cdef inline int write(self, const char* text, Py_ssize_t size) except -1:
        self.reserve(size)
        memcpy(self.data + self.length, text, size)
        self.length += size
        return 0

    cdef inline int put(self, char byte) except -1:
        self.reserve(1)
        self.data[self.length] = byte
        self.length += 1
        return 0

    cdef inline int put_big_endian(self, uint64_t value, int size) except -1:
        cdef int i
        self.reserve(size)
        for i in range(size):
            self.data[self.length + i] = <char>((value >> (8 * (size - 1 - i))) & 0xFF)
        self.length += size
        return 0


@cython.final
cdef class _Columns:
    """The columns of an exported batch as a tree of ``Column`` structs.

    Holds the exported capsules, so the buffers stay alive, and the encoded
    field names the structs point to.
    """

    cdef Column* nodes
    cdef Py_ssize_t used
    cdef Column* row
    cdef int64_t length
    cdef object capsules
    cdef list keys
    cdef bint for_msgpack

    def __dealloc__(self):
        PyMem_Free(self.nodes)

    cdef int load(self, object batch, bint for_msgpack) except -1:
        """Export ``batch``; return FALLBACK when a type is not read here."""
        cdef:
            ArrowSchema* c_schema
            ArrowArray* c_array
            Py_ssize_t count
        self.for_msgpack = for_msgpack
        self.keys = []
        if not (hasattr(batch, "__arrow_c_array__")
                and isinstance(getattr(batch, "schema", None), pa.Schema)):
            return FALLBACK
        self.capsules = batch.__arrow_c_array__()
        c_schema = <ArrowSchema*>PyCapsule_GetPointer(self.capsules[0], "arrow_schema")
        c_array = <ArrowArray*>PyCapsule_GetPointer(self.capsules[1], "arrow_array")
        if strcmp(c_schema.format, b"+s") != 0:
            return FALLBACK
        count = _count_nodes(c_schema, 0)
        if count < 0:
            return FALLBACK
        self.nodes = <Column*>PyMem_Malloc(count * sizeof(Column))
        if self.nodes == NULL:
            raise MemoryError()
        self.used = 1
        self.row = &self.nodes[0]
        self.row.key = NULL
        self.row.key_length = 0
        self.length = c_array.length
        return self.fill(self.row, c_schema, c_array, pa.struct(list(batch.schema)))

    cdef int fill(self, Column* column, ArrowSchema* c_schema, ArrowArray* c_array,
                  object arrow_type) except -1:
        """Describe one exported array; ``arrow_type`` is its pyarrow type.

        Field names come from ``arrow_type``: the exported names are C
        strings, which end early at a NUL character in a name.
        """
        cdef:
            const char* format_ = c_schema.format
            int64_t i
            int rc
            set names

        column.offset = c_array.offset
        column.validity = NULL
        if c_array.n_buffers > 0 and c_array.null_count != 0:
            column.validity = <const uint8_t*>c_array.buffers[0]
        column.values = NULL
        column.data = NULL
        if c_array.n_buffers > 1:
            column.values = <const uint8_t*>c_array.buffers[1]
        if c_array.n_buffers > 2:
            column.data = <const uint8_t*>c_array.buffers[2]
        column.n_children = 0
        column.children = NULL
        column.utc_offset = 0
        column.units_per_second = 1
        column.list_size = 0
        if c_schema.dictionary != NULL or isinstance(arrow_type, pa.BaseExtensionType):
            return FALLBACK

        if format_[0] == b'+':
            if strcmp(format_, b"+l") == 0:
                column.kind = K_LIST
            elif strcmp(format_, b"+L") == 0:
                column.kind = K_LARGE_LIST
            elif strncmp(format_, b"+w:", 3) == 0:
                column.kind = K_FIXED_LIST
                column.list_size = int(format_[3:])
            elif strcmp(format_, b"+s") == 0:
                column.kind = K_STRUCT
                names = {field.name for field in arrow_type}
                if len(names) != c_schema.n_children:
                    # to_pylist() cannot build a dict with two equal keys.
                    return FALLBACK
            else:
                return FALLBACK
            column.n_children = c_schema.n_children
            column.children = &self.nodes[self.used]
            self.used += c_schema.n_children
            for i in range(c_schema.n_children):
                if column.kind == K_STRUCT:
                    field = arrow_type.field(i)
                    self.set_key(&column.children[i], field.name)
                    child_type = field.type
                else:
                    column.children[i].key = NULL
                    column.children[i].key_length = 0
                    child_type = arrow_type.value_type
                rc = self.fill(&column.children[i], c_schema.children[i],
                               c_array.children[i], child_type)
                if rc != OK:
                    return rc
            return OK

        if format_[0] == b't' and format_[1] == b's':
            return _set_timestamp(column, format_)
        if strlen(format_) != 1:
            return FALLBACK
        if format_[0] == b'n':
            column.kind = K_NULL
        elif format_[0] == b'b':
            column.kind = K_BOOL
        elif format_[0] == b'c':
            column.kind = K_INT8
        elif format_[0] == b's':
            column.kind = K_INT16
        elif format_[0] == b'i':
            column.kind = K_INT32
        elif format_[0] == b'l':
            column.kind = K_INT64
        elif format_[0] == b'C':
            column.kind = K_UINT8
        elif format_[0] == b'S':
            column.kind = K_UINT16
        elif format_[0] == b'I':
            column.kind = K_UINT32
        elif format_[0] == b'L':
            column.kind = K_UINT64
        elif format_[0] == b'f':
            column.kind = K_FLOAT32
        elif format_[0] == b'g':
            column.kind = K_FLOAT64
        elif format_[0] == b'u':
            column.kind = K_STRING
        elif format_[0] == b'U':
            column.kind = K_LARGE_STRING
        elif format_[0] == b'z' and self.for_msgpack:
            column.kind = K_BINARY
        elif format_[0] == b'Z' and self.for_msgpack:
            column.kind = K_LARGE_BINARY
        else:
            # binary has no JSON form (the twin raises), the rest are listed
            # in the module docstring.
            return FALLBACK
        return OK

    cdef int set_key(self, Column* column, str name) except -1:
        cdef bytes key
        if self.for_msgpack:
            key = msgpack.packb(name)
        else:
            key = orjson.dumps(name) + b":"
        self.keys.append(key)
        column.key = key
        column.key_length = len(key)
        return 0


cdef Py_ssize_t _count_nodes(ArrowSchema* c_schema, int depth) except -2:
    """Return the number of Column structs for ``c_schema``, -1 when nested too deep."""
    cdef:
        Py_ssize_t total = 1
        Py_ssize_t below
        int64_t i
    if depth > MAX_DEPTH:
        return -1
    for i in range(c_schema.n_children):
        below = _count_nodes(c_schema.children[i], depth + 1)
        if below < 0:
            return -1
        total += below
    return total


cdef int _set_timestamp(Column* column, const char* format_) except -1:
    """Read a "ts<unit>:<zone>" format; return FALLBACK for a named zone."""
    cdef:
        const char* zone
        int hours, minutes
    if format_[2] == b's':
        column.units_per_second = 1
    elif format_[2] == b'm':
        column.units_per_second = 1000
    elif format_[2] == b'u':
        column.units_per_second = 1000000
    elif format_[2] == b'n':
        column.units_per_second = 1000000000
    else:
        return FALLBACK
    if format_[3] != b':':
        return FALLBACK
    column.kind = K_TIMESTAMP
    zone = format_ + 4
    if zone[0] == 0 or strcmp(zone, b"UTC") == 0:
        return OK
    # A fixed offset "+HH:MM" or "-HH:MM"; pyarrow gives it a datetime.timezone.
    if (strlen(zone) == 6 and (zone[0] == b'+' or zone[0] == b'-') and zone[3] == b':'
            and _is_digit(zone[1]) and _is_digit(zone[2])
            and _is_digit(zone[4]) and _is_digit(zone[5])):
        hours = (zone[1] - 48) * 10 + (zone[2] - 48)
        minutes = (zone[4] - 48) * 10 + (zone[5] - 48)
        if hours > 23 or minutes > 59:
            return FALLBACK
        column.utc_offset = (hours * 3600 + minutes * 60) * (-1 if zone[0] == b'-' else 1)
        return OK
    return FALLBACK


cdef inline bint _is_digit(char c) noexcept nogil:
    return b'0' <= c <= b'9'


cdef inline bint _is_null(const Column* column, int64_t p) noexcept nogil:
    return column.validity != NULL and not ((column.validity[p >> 3] >> (p & 7)) & 1)


cdef inline int64_t _floor_div(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q = a // b
    if (a % b) < 0:
        q -= 1
    return q


cdef inline bint _in_datetime_range(const Column* column, int64_t value,
                                    int64_t seconds) noexcept nogil:
    """Return whether to_pylist() turns this timestamp into a datetime.

    A datetime holds the years 1 to 9999, in UTC and in the column's zone.
    Nanoseconds become pandas Timestamps, whose wall time in the zone must
    fit int64 nanoseconds too, and the smallest int64 is pandas' NaT.
    """
    cdef int64_t offset_nanos
    if column.units_per_second == 1000000000:
        offset_nanos = column.utc_offset * 1000000000
        if value == INT64_MIN:
            return False
        if offset_nanos > 0 and value > INT64_MAX - offset_nanos:
            return False
        if offset_nanos < 0 and value <= INT64_MIN - offset_nanos:
            return False
    if not (MIN_EPOCH_DAY <= _floor_div(seconds, 86400) <= MAX_EPOCH_DAY):
        return False
    return MIN_EPOCH_DAY <= _floor_div(seconds + column.utc_offset, 86400) <= MAX_EPOCH_DAY


cdef inline void _civil_from_days(int64_t days, int64_t* year, int* month,
                                  int* day) noexcept nogil:
    """Convert days since 1970-01-01 to a proleptic Gregorian date.

    Counts in 400-year eras of 146097 days starting on 0000-03-01, so the
    leap day is the last day of each year of the count.
    """
    cdef:
        int64_t z = days + 719468
        int64_t era = _floor_div(z, 146097)
        int64_t day_of_era = z - era * 146097
        int64_t year_of_era = (day_of_era - day_of_era // 1460 + day_of_era // 36524
                               - day_of_era // 146096) // 365
        int64_t day_of_year = day_of_era - (365 * year_of_era + year_of_era // 4
                                            - year_of_era // 100)
        int64_t month_index = (5 * day_of_year + 2) // 153
    day[0] = <int>(day_of_year - (153 * month_index + 2) // 5 + 1)
    month[0] = <int>(month_index + 3 if month_index < 10 else month_index - 9)
    year[0] = year_of_era + era * 400 + (1 if month[0] <= 2 else 0)


# -- JSON -----------------------------------------------------------------------------

cdef int _json_uint(_Buffer out, uint64_t value) except -1:
    cdef:
        char digits[24]
        int n = 24
    while True:
        n -= 1
        digits[n] = <char>(48 + value % 10)
        value //= 10
        if value == 0:
            break
    return out.write(&digits[n], 24 - n)


cdef int _json_int(_Buffer out, int64_t value) except -1:
    if value < 0:
        out.put(b'-')
        # Negate in unsigned arithmetic so int64 min does not overflow.
        return _json_uint(out, <uint64_t>0 - <uint64_t>value)
    return _json_uint(out, <uint64_t>value)


cdef int _json_zero_padded(_Buffer out, int64_t value, int width) except -1:
    cdef int i
    out.reserve(width)
    for i in range(width - 1, -1, -1):
        out.data[out.length + i] = <char>(48 + value % 10)
        value //= 10
    out.length += width
    return 0


cdef int _json_double(_Buffer out, double value) except -1:
    """Write ``value`` as orjson does: shortest round-trip digits, null for NaN/inf.

    The digits are Python's ``repr`` (CPython's dtoa, shortest round trip);
    the layout is orjson's: plain decimal for decimal exponents -5 to 15,
    otherwise ``1.5e-7`` or ``1e+16``.
    """
    cdef:
        char* text
        char digits[32]
        int n_digits = 0
        int integer_digits = -1
        int first = -1
        int exponent = 0
        int exponent_sign = 1
        int e, i
        const char* cursor
        bint negative

    if not isfinite(value):
        return out.write(b"null", 4)
    negative = signbit(value)
    if value == 0:
        return out.write(b"-0.0", 4) if negative else out.write(b"0.0", 3)
    if -9007199254740992.0 < value < 9007199254740992.0 and value == <double><int64_t>value:
        # Below 2**53 an integral double's shortest digits are the integer's.
        _json_int(out, <int64_t>value)
        return out.write(b".0", 2)
    if _json_short_decimal(out, value):
        return 0

    text = PyOS_double_to_string(value, b'r', 0, 0, NULL)
    try:
        cursor = text
        if cursor[0] == b'-':
            cursor += 1
        while cursor[0] != 0 and cursor[0] != b'e':
            if cursor[0] == b'.':
                integer_digits = n_digits
            else:
                digits[n_digits] = cursor[0]
                n_digits += 1
            cursor += 1
        if cursor[0] == b'e':
            cursor += 1
            if cursor[0] == b'-':
                exponent_sign = -1
                cursor += 1
            elif cursor[0] == b'+':
                cursor += 1
            while cursor[0] != 0:
                exponent = exponent * 10 + (cursor[0] - 48)
                cursor += 1
    finally:
        PyMem_Free(text)

    if integer_digits < 0:
        integer_digits = n_digits
    for i in range(n_digits):
        if digits[i] != b'0':
            first = i
            break
    while n_digits > 0 and digits[n_digits - 1] == b'0':
        n_digits -= 1
    # e: the decimal exponent of the first significant digit.
    e = integer_digits - 1 - first + exponent_sign * exponent
    n_digits -= first

    out.reserve(n_digits + 32)
    if negative:
        out.put(b'-')
    if 0 <= e < 16:
        if n_digits <= e + 1:
            out.write(&digits[first], n_digits)
            for i in range(e + 1 - n_digits):
                out.put(b'0')
            return out.write(b".0", 2)
        out.write(&digits[first], e + 1)
        out.put(b'.')
        return out.write(&digits[first + e + 1], n_digits - e - 1)
    if -5 <= e < 0:
        out.write(b"0.", 2)
        for i in range(-e - 1):
            out.put(b'0')
        return out.write(&digits[first], n_digits)
    out.put(digits[first])
    if n_digits > 1:
        out.put(b'.')
        out.write(&digits[first + 1], n_digits - 1)
    if e > 0:
        out.write(b"e+", 2)
        return _json_int(out, e)
    out.write(b"e-", 2)
    return _json_int(out, -e)


cdef bint _json_short_decimal(_Buffer out, double value) except -1:
    """Write ``value`` if it has a short decimal form; return whether it did.

    Finds the fewest fraction digits k for which the integer n nearest to
    |value| * 10**k gives back |value| as n / 10**k. Both operands are exact
    (n < 2**52, 10**k <= 10**15) and IEEE division rounds correctly, so this
    is exactly "the decimal n * 10**-k parses to value", and the smallest
    such k gives the digits of the shortest round trip that repr() returns.
    The search stops (and repr() is used) once 10**-k is below two ulps of
    value: from there several k-digit decimals may parse to value, and the
    rounded product may not pick the closest. Only for 1e-5 <= |value| <
    1e15, where orjson writes plain decimals.
    """
    cdef:
        double magnitude = -value if value < 0 else value
        double scale = 1.0
        double ulp, product
        int64_t n, whole, fraction
        int k
    if not (1e-5 <= magnitude < 1e15):
        return False
    ulp = nextafter(magnitude, INFINITY) - magnitude
    for k in range(1, 16):
        scale *= 10.0
        product = magnitude * scale
        if product >= 4503599627370496.0 or scale * ulp > 0.5:
            return False
        n = <int64_t>(product + 0.5)
        if <double>n / scale == magnitude:
            whole = <int64_t>(n // <int64_t>scale)
            fraction = n - whole * <int64_t>scale
            if value < 0:
                out.put(b'-')
            _json_int(out, whole)
            out.put(b'.')
            _json_zero_padded(out, fraction, k)
            return True
    return False


cdef int _json_string(_Buffer out, const uint8_t* text, int64_t size) except -1:
    cdef:
        int64_t i
        uint8_t c
        char escape
        char* cursor
    # At most six bytes per input byte (\u00XX) plus the quotes.
    out.reserve(size * 6 + 2)
    cursor = out.data + out.length
    cursor[0] = b'"'
    cursor += 1
    for i in range(size):
        c = text[i]
        escape = JSON_ESCAPE[c]
        if escape == 0:
            cursor[0] = <char>c
            cursor += 1
        elif escape == b'u':
            cursor[0] = b'\\'
            cursor[1] = b'u'
            cursor[2] = b'0'
            cursor[3] = b'0'
            cursor[4] = HEX_DIGITS[c >> 4]
            cursor[5] = HEX_DIGITS[c & 15]
            cursor += 6
        else:
            cursor[0] = b'\\'
            cursor[1] = escape
            cursor += 2
    cursor[0] = b'"'
    cursor += 1
    out.length = cursor - out.data
    return 0


cdef int _json_timestamp(_Buffer out, const Column* column, int64_t value) except -1:
    """Write a timestamp as orjson writes the datetime that to_pylist() returns."""
    cdef:
        int64_t units = column.units_per_second
        int64_t seconds = _floor_div(value, units)
        int64_t fraction = value - seconds * units
        int64_t local = seconds + column.utc_offset
        int64_t days = _floor_div(local, 86400)
        int64_t second_of_day = local - days * 86400
        int64_t year = 0
        int month = 0
        int day = 0
        int offset_minutes
        int64_t micros = 0
        int64_t nanos = 0

    if not _in_datetime_range(column, value, seconds):
        return FALLBACK
    _civil_from_days(days, &year, &month, &day)

    if units == 1000:
        micros = fraction * 1000
    elif units == 1000000:
        micros = fraction
    elif units == 1000000000:
        if fraction % 1000 == 0:
            micros = fraction // 1000
        else:
            nanos = fraction

    out.put(b'"')
    _json_zero_padded(out, year, 4)
    out.put(b'-')
    _json_zero_padded(out, month, 2)
    out.put(b'-')
    _json_zero_padded(out, day, 2)
    out.put(b'T')
    _json_zero_padded(out, second_of_day // 3600, 2)
    out.put(b':')
    _json_zero_padded(out, second_of_day // 60 % 60, 2)
    out.put(b':')
    _json_zero_padded(out, second_of_day % 60, 2)
    if nanos:
        out.put(b'.')
        _json_zero_padded(out, nanos, 9)
    elif micros:
        out.put(b'.')
        _json_zero_padded(out, micros, 6)
    if column.utc_offset == 0:
        out.put(b'Z')
    else:
        offset_minutes = <int>(column.utc_offset // 60)
        if offset_minutes < 0:
            out.put(b'-')
            offset_minutes = -offset_minutes
        else:
            out.put(b'+')
        _json_zero_padded(out, offset_minutes // 60, 2)
        out.put(b':')
        _json_zero_padded(out, offset_minutes % 60, 2)
    return out.put(b'"')


cdef int _json_value(_Buffer out, const Column* column, int64_t index) except -1:
    cdef:
        int64_t p = column.offset + index
        int64_t start, end, j
        int rc
        Kind kind = column.kind

    if kind == K_NULL or _is_null(column, p):
        return out.write(b"null", 4)
    if kind == K_INT64:
        return _json_int(out, (<const int64_t*>column.values)[p])
    if kind == K_FLOAT64:
        return _json_double(out, (<const double*>column.values)[p])
    if kind == K_STRING:
        start = (<const int32_t*>column.values)[p]
        end = (<const int32_t*>column.values)[p + 1]
        return _json_string(out, column.data + start, end - start)
    if kind == K_BOOL:
        if (column.values[p >> 3] >> (p & 7)) & 1:
            return out.write(b"true", 4)
        return out.write(b"false", 5)
    if kind == K_TIMESTAMP:
        return _json_timestamp(out, column, (<const int64_t*>column.values)[p])
    if kind == K_INT32:
        return _json_int(out, (<const int32_t*>column.values)[p])
    if kind == K_INT16:
        return _json_int(out, (<const int16_t*>column.values)[p])
    if kind == K_INT8:
        return _json_int(out, (<const int8_t*>column.values)[p])
    if kind == K_UINT64:
        return _json_uint(out, (<const uint64_t*>column.values)[p])
    if kind == K_UINT32:
        return _json_uint(out, (<const uint32_t*>column.values)[p])
    if kind == K_UINT16:
        return _json_uint(out, (<const uint16_t*>column.values)[p])
    if kind == K_UINT8:
        return _json_uint(out, (<const uint8_t*>column.values)[p])
    if kind == K_FLOAT32:
        return _json_double(out, <double>(<const float*>column.values)[p])
    if kind == K_LARGE_STRING:
        start = (<const int64_t*>column.values)[p]
        end = (<const int64_t*>column.values)[p + 1]
        return _json_string(out, column.data + start, end - start)
    if kind == K_STRUCT:
        return _json_object(out, column, p)
    if kind == K_LIST:
        start = (<const int32_t*>column.values)[p]
        end = (<const int32_t*>column.values)[p + 1]
    elif kind == K_LARGE_LIST:
        start = (<const int64_t*>column.values)[p]
        end = (<const int64_t*>column.values)[p + 1]
    elif kind == K_FIXED_LIST:
        start = p * column.list_size
        end = start + column.list_size
    else:
        return FALLBACK
    out.put(b'[')
    for j in range(start, end):
        if j > start:
            out.put(b',')
        rc = _json_value(out, &column.children[0], j)
        if rc != OK:
            return rc
    return out.put(b']')


cdef int _json_object(_Buffer out, const Column* column, int64_t p) except -1:
    """Write struct element ``p`` (a physical position) as a JSON object."""
    cdef:
        int64_t i
        int rc
        const Column* child
    out.put(b'{')
    for i in range(column.n_children):
        child = &column.children[i]
        if i:
            out.put(b',')
        out.write(child.key, child.key_length)
        rc = _json_value(out, child, p)
        if rc != OK:
            return rc
    return out.put(b'}')


def encode_json_rows(batch) -> list:
    """Encode each row of ``batch`` as one compact JSON object."""
    cdef:
        _Columns columns = _Columns()
        _Buffer out = _Buffer()
        int64_t count, i
        list rows
    if columns.load(batch, False) != OK:
        return _twins.encode_json_rows(batch)
    count = columns.length
    rows = [None] * count
    for i in range(count):
        out.length = 0
        if _json_value(out, columns.row, i) != OK:
            return _twins.encode_json_rows(batch)
        rows[i] = PyBytes_FromStringAndSize(out.data, out.length)
    return rows


# -- msgpack --------------------------------------------------------------------------

cdef int _msgpack_int(_Buffer out, int64_t value) except -1:
    """Write an integer in msgpack's smallest form, as msgpack-python does."""
    if value >= 0:
        return _msgpack_uint(out, <uint64_t>value)
    if value >= -32:
        return out.put(<char>(value & 0xFF))
    if value >= -128:
        out.put(<char>0xD0)
        return out.put_big_endian(<uint64_t>value, 1)
    if value >= -32768:
        out.put(<char>0xD1)
        return out.put_big_endian(<uint64_t>value, 2)
    if value >= -2147483648:
        out.put(<char>0xD2)
        return out.put_big_endian(<uint64_t>value, 4)
    out.put(<char>0xD3)
    return out.put_big_endian(<uint64_t>value, 8)


cdef int _msgpack_uint(_Buffer out, uint64_t value) except -1:
    if value < 128:
        return out.put(<char>value)
    if value < 256:
        out.put(<char>0xCC)
        return out.put_big_endian(value, 1)
    if value < 65536:
        out.put(<char>0xCD)
        return out.put_big_endian(value, 2)
    if value < 4294967296:
        out.put(<char>0xCE)
        return out.put_big_endian(value, 4)
    out.put(<char>0xCF)
    return out.put_big_endian(value, 8)


cdef int _msgpack_double(_Buffer out, double value) except -1:
    cdef uint64_t bits = 0
    memcpy(&bits, &value, 8)
    out.put(<char>0xCB)
    return out.put_big_endian(bits, 8)


cdef int _msgpack_bytes(_Buffer out, const uint8_t* data, int64_t size,
                        bint text) except -1:
    """Write str (``text``) or bin, with the header msgpack-python picks for the size."""
    if text and size < 32:
        out.put(<char>(0xA0 | size))
    elif size < 256:
        out.put(<char>(0xD9 if text else 0xC4))
        out.put_big_endian(<uint64_t>size, 1)
    elif size < 65536:
        out.put(<char>(0xDA if text else 0xC5))
        out.put_big_endian(<uint64_t>size, 2)
    elif size < 4294967296:
        out.put(<char>(0xDB if text else 0xC6))
        out.put_big_endian(<uint64_t>size, 4)
    else:
        raise ValueError(f"a value of {size} bytes is too large for msgpack (max 2**32 - 1)")
    return out.write(<const char*>data, size)


cdef int _msgpack_container(_Buffer out, int64_t count, bint is_map) except -1:
    if count < 16:
        return out.put(<char>((0x80 if is_map else 0x90) | count))
    if count < 65536:
        out.put(<char>(0xDE if is_map else 0xDC))
        return out.put_big_endian(<uint64_t>count, 2)
    out.put(<char>(0xDF if is_map else 0xDD))
    return out.put_big_endian(<uint64_t>count, 4)


cdef int _msgpack_timestamp(_Buffer out, const Column* column, int64_t value) except -1:
    """Write the msgpack Timestamp extension (type -1) for an instant.

    32-bit form: whole seconds in 0..2**32-1. 64-bit form: 30 bits of
    nanoseconds over 34 bits of seconds. 96-bit form: uint32 nanoseconds then
    int64 seconds.
    """
    cdef:
        int64_t units = column.units_per_second
        int64_t seconds = _floor_div(value, units)
        int64_t nanos = (value - seconds * units) * (1000000000 // units)

    if not _in_datetime_range(column, value, seconds):
        return FALLBACK
    if (seconds >> 34) == 0:
        if nanos == 0 and seconds <= 0xFFFFFFFF:
            out.write(b"\xd6\xff", 2)
            return out.put_big_endian(<uint64_t>seconds, 4)
        out.write(b"\xd7\xff", 2)
        return out.put_big_endian((<uint64_t>nanos << 34) | <uint64_t>seconds, 8)
    out.write(b"\xc7\x0c\xff", 3)
    out.put_big_endian(<uint64_t>nanos, 4)
    return out.put_big_endian(<uint64_t>seconds, 8)


cdef int _msgpack_value(_Buffer out, const Column* column, int64_t index) except -1:
    cdef:
        int64_t p = column.offset + index
        int64_t start, end, j
        int rc
        Kind kind = column.kind

    if kind == K_NULL or _is_null(column, p):
        return out.put(<char>0xC0)
    if kind == K_INT64:
        return _msgpack_int(out, (<const int64_t*>column.values)[p])
    if kind == K_FLOAT64:
        return _msgpack_double(out, (<const double*>column.values)[p])
    if kind == K_STRING or kind == K_BINARY:
        start = (<const int32_t*>column.values)[p]
        end = (<const int32_t*>column.values)[p + 1]
        return _msgpack_bytes(out, column.data + start, end - start, kind == K_STRING)
    if kind == K_BOOL:
        if (column.values[p >> 3] >> (p & 7)) & 1:
            return out.put(<char>0xC3)
        return out.put(<char>0xC2)
    if kind == K_TIMESTAMP:
        return _msgpack_timestamp(out, column, (<const int64_t*>column.values)[p])
    if kind == K_INT32:
        return _msgpack_int(out, (<const int32_t*>column.values)[p])
    if kind == K_INT16:
        return _msgpack_int(out, (<const int16_t*>column.values)[p])
    if kind == K_INT8:
        return _msgpack_int(out, (<const int8_t*>column.values)[p])
    if kind == K_UINT64:
        return _msgpack_uint(out, (<const uint64_t*>column.values)[p])
    if kind == K_UINT32:
        return _msgpack_uint(out, (<const uint32_t*>column.values)[p])
    if kind == K_UINT16:
        return _msgpack_uint(out, (<const uint16_t*>column.values)[p])
    if kind == K_UINT8:
        return _msgpack_uint(out, (<const uint8_t*>column.values)[p])
    if kind == K_FLOAT32:
        return _msgpack_double(out, <double>(<const float*>column.values)[p])
    if kind == K_LARGE_STRING or kind == K_LARGE_BINARY:
        start = (<const int64_t*>column.values)[p]
        end = (<const int64_t*>column.values)[p + 1]
        return _msgpack_bytes(out, column.data + start, end - start,
                              kind == K_LARGE_STRING)
    if kind == K_STRUCT:
        return _msgpack_map(out, column, p)
    if kind == K_LIST:
        start = (<const int32_t*>column.values)[p]
        end = (<const int32_t*>column.values)[p + 1]
    elif kind == K_LARGE_LIST:
        start = (<const int64_t*>column.values)[p]
        end = (<const int64_t*>column.values)[p + 1]
    elif kind == K_FIXED_LIST:
        start = p * column.list_size
        end = start + column.list_size
    else:
        return FALLBACK
    _msgpack_container(out, end - start, False)
    for j in range(start, end):
        rc = _msgpack_value(out, &column.children[0], j)
        if rc != OK:
            return rc
    return OK


cdef int _msgpack_map(_Buffer out, const Column* column, int64_t p) except -1:
    """Write struct element ``p`` (a physical position) as a msgpack map."""
    cdef:
        int64_t i
        int rc
        const Column* child
    _msgpack_container(out, column.n_children, True)
    for i in range(column.n_children):
        child = &column.children[i]
        out.write(child.key, child.key_length)
        rc = _msgpack_value(out, child, p)
        if rc != OK:
            return rc
    return OK


def encode_msgpack_rows(batch) -> list:
    """Encode each row of ``batch`` as one msgpack map."""
    cdef:
        _Columns columns = _Columns()
        _Buffer out = _Buffer()
        int64_t count, i
        list rows
    if columns.load(batch, True) != OK:
        return _twins.encode_msgpack_rows(batch)
    count = columns.length
    rows = [None] * count
    for i in range(count):
        out.length = 0
        if _msgpack_value(out, columns.row, i) != OK:
            return _twins.encode_msgpack_rows(batch)
        rows[i] = PyBytes_FromStringAndSize(out.data, out.length)
    return rows
