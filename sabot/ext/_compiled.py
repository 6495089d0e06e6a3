"""The compiled kernels gathered in one module, the counterpart of ``_twins``.

Importing this module raises ImportError when any compiled kernel is
missing (no C compiler at install time), and ``sabot.ext`` then uses the
twins for all of them.
"""

from __future__ import annotations

from sabot.ext._batches import parse_record_batches
from sabot.ext._encode import encode_json_rows, encode_msgpack_rows
from sabot.ext._json import decode_json_objects
from sabot.ext._partition import murmur2, partitions_for_keys
from sabot.ext._produce import encode_record_batch
from sabot.ext._records import record_columns

__all__ = [
    "decode_json_objects",
    "encode_json_rows",
    "encode_msgpack_rows",
    "encode_record_batch",
    "murmur2",
    "parse_record_batches",
    "partitions_for_keys",
    "record_columns",
]
