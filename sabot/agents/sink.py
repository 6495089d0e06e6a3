"""Send a dataflow's output batches to a Kafka topic, one message per row."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from sabot import ext
from sabot.codecs import Codec
from sabot.stream.operators import KEY_COLUMN, key_to_binary

logger = logging.getLogger(__name__)


def value_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Drop the ``_``-prefixed metadata columns that are not part of a message value."""
    names = batch.schema.names
    keep = [name for name in names if not name.startswith("_")]
    return batch if len(keep) == len(names) else batch.select(keep)


def split_by_partition(partitions: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(partition, row indices)`` for each partition, rows in input order."""
    order = np.argsort(partitions, kind="stable")
    sorted_parts = partitions[order]
    bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
    for chunk in np.split(order, bounds):
        if len(chunk):
            yield int(partitions[chunk[0]]), chunk


class TopicSink:
    """Encodes batches with a codec and sends them through the shared producer.

    Keyed rows (a ``_key`` column) go to the partition Kafka's Java client
    would pick (murmur2 of the key bytes). Rows without a key go to one
    partition per batch, chosen round-robin, as Kafka's sticky partitioner does.
    """

    def __init__(self, producer, topic: str, codec: Codec, num_partitions: int):
        self.producer = producer
        self.topic = topic
        self.codec = codec
        self.num_partitions = num_partitions
        self._next_partition = 0

    async def send(self, batch: pa.RecordBatch) -> list[asyncio.Future]:
        """Queue one message per row; return futures that resolve when acknowledged."""
        values = self.codec.encode(value_columns(batch))
        if KEY_COLUMN in batch.schema.names:
            key_column = key_to_binary(batch.column(KEY_COLUMN))
            keys = key_column.to_pylist()
            # The kernel hashes the Arrow buffers in place and returns int64.
            partitions = ext.partitions_for_keys(key_column, self.num_partitions)
            if key_column.null_count:
                partitions[partitions < 0] = self._sticky_partition()
        else:
            keys = None
            partitions = None

        if partitions is None:
            return await self._send_rows(self._sticky_partition(), None, values,
                                         range(len(values)))
        futures = []
        for partition, rows in split_by_partition(partitions):
            futures.extend(await self._send_rows(partition, keys, values, rows.tolist()))
        return futures

    def _sticky_partition(self) -> int:
        partition = self._next_partition
        self._next_partition = (partition + 1) % self.num_partitions
        return partition

    async def _send_rows(self, partition, keys, values, rows) -> list[asyncio.Future]:
        producer = self.producer
        futures = []
        builder = producer.create_batch()
        for i in rows:
            key = keys[i] if keys is not None else None
            if builder.append(key=key, value=values[i], timestamp=None) is None:
                futures.append(await producer.send_batch(builder, self.topic,
                                                         partition=partition))
                builder = producer.create_batch()
                if builder.append(key=key, value=values[i], timestamp=None) is None:
                    raise ValueError(
                        f"a message of {len(values[i])} bytes does not fit a producer "
                        f"batch; raise the max_batch_size setting"
                    )
        if builder.record_count():
            futures.append(await producer.send_batch(builder, self.topic,
                                                     partition=partition))
        return futures
