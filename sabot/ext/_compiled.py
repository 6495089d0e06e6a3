"""The compiled kernels gathered in one module, the counterpart of ``_twins``.

Importing this module raises ImportError when any compiled kernel is
missing (no C compiler at install time), and ``sabot.ext`` then uses the
twins for all of them.
"""

from __future__ import annotations

from sabot.ext._batches import parse_record_batches
from sabot.ext._encode import encode_json_rows, encode_msgpack_rows
from sabot.ext._partition import murmur2, partitions_for_keys
from sabot.ext._records import record_columns

__all__ = [
    "encode_json_rows",
    "encode_msgpack_rows",
    "murmur2",
    "parse_record_batches",
    "partitions_for_keys",
    "record_columns",
]
