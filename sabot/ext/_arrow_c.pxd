# cython: language_level=3
"""The Arrow C Data Interface: the ABI through which pyarrow hands over arrays.

The kernels read Arrow buffers through these two structs, which pyarrow
exports with ``obj.__arrow_c_array__()`` (the Arrow PyCapsule interface,
pyarrow 14 and later). The layout is frozen by the Arrow specification
("The Arrow C data interface", arrow.apache.org/docs/format/CDataInterface.html),
so the kernels compile against no Arrow header, link no Arrow library and
keep working when pyarrow is upgraded.

An exported array is read through its ``format`` string: ``"l"`` is int64,
``"g"`` float64, ``"u"`` UTF-8 with int32 offsets, ``"+s"`` a struct,
``"+l"`` a list, ``"tsu:UTC"`` a microsecond timestamp in UTC, and so on.
``buffers[0]`` is the validity bitmap (NULL when no value is null). Element
``i`` of an array is at physical position ``offset + i`` of its buffers.
A struct's children are not sliced with it: child position ``p`` belongs to
struct position ``p``, and the child's own ``offset`` is added on top.
"""

from libc.stdint cimport int64_t


cdef extern from *:
    """
    #ifndef ARROW_C_DATA_INTERFACE
    #define ARROW_C_DATA_INTERFACE
    #define ARROW_FLAG_DICTIONARY_ORDERED 1
    #define ARROW_FLAG_NULLABLE 2
    #define ARROW_FLAG_MAP_KEYS_SORTED 4

    struct ArrowSchema {
      const char* format;
      const char* name;
      const char* metadata;
      int64_t flags;
      int64_t n_children;
      struct ArrowSchema** children;
      struct ArrowSchema* dictionary;
      void (*release)(struct ArrowSchema*);
      void* private_data;
    };

    struct ArrowArray {
      int64_t length;
      int64_t null_count;
      int64_t offset;
      int64_t n_buffers;
      int64_t n_children;
      const void** buffers;
      struct ArrowArray** children;
      struct ArrowArray* dictionary;
      void (*release)(struct ArrowArray*);
      void* private_data;
    };
    #endif
    """
    struct ArrowSchema:
        const char* format
        const char* name
        const char* metadata
        int64_t flags
        int64_t n_children
        ArrowSchema** children
        ArrowSchema* dictionary
        void (*release)(ArrowSchema*)
        void* private_data

    struct ArrowArray:
        int64_t length
        int64_t null_count
        int64_t offset
        int64_t n_buffers
        int64_t n_children
        const void** buffers
        ArrowArray** children
        ArrowArray* dictionary
        void (*release)(ArrowArray*)
        void* private_data
