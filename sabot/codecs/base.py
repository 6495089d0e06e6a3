"""The codec interface: Kafka message values to Arrow columns and back."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class Decoded:
    """The result of decoding the values of one partition's fetch.

    ``batch`` contains the value columns of every row decoded. ``rows_from[j]``
    is the index, in the input list, of the message that row ``j`` came
    from; most codecs give one row per message, the Arrow codec may give
    several. ``errors`` lists ``(index, reason)`` for every message that could
    not be decoded: those go to the dead-letter topic.
    """

    batch: pa.RecordBatch
    rows_from: np.ndarray
    errors: list[tuple[int, str]] = field(default_factory=list)


class Codec:
    """Decodes message values to a record batch and encodes rows to values."""

    name = "codec"

    def decode(self, values: list[bytes | None]) -> Decoded:
        raise NotImplementedError

    def encode(self, batch: pa.RecordBatch) -> list[bytes]:
        """Encode each row of ``batch`` (without metadata columns) as one value."""
        raise NotImplementedError


def without_rows(count: int, bad: list[tuple[int, str]]) -> np.ndarray:
    """Return the indices 0..count-1 that are not among the bad ones."""
    if not bad:
        return np.arange(count, dtype=np.int64)
    return np.delete(np.arange(count, dtype=np.int64), [i for i, _ in bad])


def empty_batch() -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({})
