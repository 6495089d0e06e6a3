"""The interface that the compiled kernels and their pure-Python twins both satisfy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np
import pyarrow as pa

#: Type of the ``_timestamp`` column: Kafka record timestamps are epoch milliseconds.
TIMESTAMP_TYPE = pa.timestamp("ms", tz="UTC")


class JoinedValues(NamedTuple):
    """The non-empty values of a fetch joined with ``b"\\n"``, ready for a JSON reader."""

    #: The values that are neither None nor ``b""``, in order, joined by ``b"\n"``.
    data: bytes
    #: How many values ``data`` contains.
    count: int
    #: How many values were None or ``b""`` and are left out of ``data``.
    empty_count: int
    #: Whether a value itself contains ``b"\n"`` (a pretty-printed JSON value).
    newline_in_values: bool


class RecordColumns(NamedTuple):
    """The columns of one partition's fetched ConsumerRecords."""

    #: The record values, unchanged.
    values: list
    #: The record keys as a binary array, null where a record has no key.
    keys: pa.Array
    #: The record offsets, int64.
    offsets: np.ndarray
    #: The record timestamps as ``timestamp[ms, tz=UTC]``.
    timestamps: pa.Array
    #: The values joined for the JSON reader, or None unless requested.
    joined: JoinedValues | None


class FetchedColumns(NamedTuple):
    """The columns of the records in one partition's fetched record batches."""

    #: The record offsets, int64.
    offsets: np.ndarray
    #: The record timestamps as ``timestamp[ms, tz=UTC]``.
    timestamps: pa.Array
    #: The record keys as a binary array, null where a record has no key.
    keys: pa.Array
    #: The record values as a binary array, null where a record has no value.
    values: pa.Array
    #: The values joined for the JSON reader, or None unless requested.
    joined: JoinedValues | None
    #: The offset to fetch next: one past the last offset of the last complete
    #: batch (control batches included), and never below the fetch offset.
    next_offset: int
    #: Bytes at the start of the data that complete batches take up. Any rest
    #: is a batch cut off by the fetch size limit, to be fetched again.
    parsed_bytes: int
    #: True when the data contains a message set of format v0 or v1 (magic 0 or
    #: 1). The other fields then describe no records, and the caller parses
    #: the data with aiokafka's ``MemoryRecords`` instead.
    legacy_format: bool


class Kernels(Protocol):
    """The hot loops of the data path; ``sabot.ext`` exports one implementation."""

    def murmur2(self, data: bytes) -> int:
        """Return Kafka's murmur2 hash of ``data`` as a signed 32-bit integer."""

    def partitions_for_keys(self, keys: Sequence[bytes | None] | pa.Array,
                            num_partitions: int) -> np.ndarray:
        """Return each key's partition as Kafka's Java client picks it, -1 for None."""

    def encode_json_rows(self, batch: Any) -> list[bytes]:
        """Encode each row of ``batch`` as one compact JSON object."""

    def encode_msgpack_rows(self, batch: Any) -> list[bytes]:
        """Encode each row of ``batch`` as one msgpack map."""

    def decode_json_objects(self, data: bytes, count: int, newline_in_values: bool = False,
                            schema: Any = None) -> Any:
        """Parse ``count`` JSON objects into one record batch, as Arrow's reader does."""

    def record_columns(self, records: Sequence[Any],
                       join_values: bool = False) -> RecordColumns:
        """Return the values, keys, offsets and timestamps of ConsumerRecords."""

    def parse_record_batches(self, data: bytes, fetch_offset: int, join_values: bool = False,
                             check_crcs: bool = False) -> FetchedColumns:
        """Parse the ``records`` field of one partition in a FetchResponse into columns."""

    def encode_record_batch(self, keys: Sequence[bytes | None] | None,
                            values: Sequence[bytes | None], rows: np.ndarray | range,
                            timestamp_ms: int, max_bytes: int) -> tuple[bytes, int]:
        """Write the first rows that fit in ``max_bytes`` as one Kafka record batch."""
