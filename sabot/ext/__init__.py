"""Hot loops of the data path, compiled with Cython where available.

Every kernel has a pure-Python twin in :mod:`sabot.ext._twins` that returns
the same result. The compiled module is used when it imports;
``SABOT_NO_EXTENSIONS=1`` forces the twins, and an ``ImportError`` (no
compiler at install time) falls back to them.
"""

from __future__ import annotations

import os

from sabot.ext import _twins

USING_EXTENSIONS = False
murmur2 = _twins.murmur2
partitions_for_keys = _twins.partitions_for_keys
encode_json_rows = _twins.encode_json_rows
encode_msgpack_rows = _twins.encode_msgpack_rows

if not os.environ.get("SABOT_NO_EXTENSIONS"):
    try:
        from sabot.ext import _kernels  # type: ignore[attr-defined]
    except ImportError:
        pass
    else:
        USING_EXTENSIONS = True
        murmur2 = _kernels.murmur2
        partitions_for_keys = _kernels.partitions_for_keys
        encode_json_rows = _kernels.encode_json_rows
        encode_msgpack_rows = _kernels.encode_msgpack_rows

__all__ = [
    "USING_EXTENSIONS",
    "encode_json_rows",
    "encode_msgpack_rows",
    "murmur2",
    "partitions_for_keys",
]
