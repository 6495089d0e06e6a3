"""Hot loops of the data path, compiled with Cython where available.

Every kernel has a pure-Python twin in :mod:`sabot.ext._twins` that returns
the same result. The compiled kernels (:mod:`sabot.ext._compiled`) are used
when they import; ``SABOT_NO_EXTENSIONS=1`` forces the twins, and an
``ImportError`` (no compiler at install time) falls back to them.
"""

from __future__ import annotations

import logging
import os

from sabot.ext import _twins
from sabot.ext._protocols import FetchedColumns, JoinedValues, Kernels, RecordColumns

logger = logging.getLogger(__name__)


def _select() -> tuple[Kernels, bool]:
    if os.environ.get("SABOT_NO_EXTENSIONS"):
        return _twins, False
    try:
        from sabot.ext import _compiled
    except ImportError as exc:
        logger.debug("compiled kernels not available, using the twins: %s", exc)
        return _twins, False
    return _compiled, True


kernels, USING_EXTENSIONS = _select()

murmur2 = kernels.murmur2
partitions_for_keys = kernels.partitions_for_keys
encode_json_rows = kernels.encode_json_rows
decode_json_objects = kernels.decode_json_objects
encode_msgpack_rows = kernels.encode_msgpack_rows
record_columns = kernels.record_columns
parse_record_batches = kernels.parse_record_batches
encode_record_batch = kernels.encode_record_batch

__all__ = [
    "USING_EXTENSIONS",
    "FetchedColumns",
    "JoinedValues",
    "Kernels",
    "RecordColumns",
    "decode_json_objects",
    "encode_json_rows",
    "encode_msgpack_rows",
    "encode_record_batch",
    "kernels",
    "murmur2",
    "parse_record_batches",
    "partitions_for_keys",
    "record_columns",
]
