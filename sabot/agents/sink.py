"""Send a dataflow's output batches to a Kafka topic, one message per row."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from sabot import ext
from sabot.codecs import Codec
from sabot.errors import ConfigError
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


class EncodedBatch:
    """A record batch from ``sabot.ext.encode_record_batch``, passed to ``producer.send_batch``.

    It takes the place of the producer's own BatchBuilder. aiokafka 0.14 wraps
    the object given to ``send_batch`` in a MessageBatch
    (aiokafka/producer/message_accumulator.py), and only that class and the
    accumulator touch it, through these members:

    - ``_build()``: MessageBatch.get_data_buffer, for the ProduceRequest.
    - ``record_count()``: MessageBatch.record_count and MessageBatch.is_empty.
    - ``closed()``: MessageBatch.remaining_linger. The batch is always closed,
      so the sender takes it without waiting for linger_ms.
    - ``close()``: MessageAccumulator.flush_for_commit.
    - ``append(...)``: MessageBatch.append, when ``producer.send()`` finds this
      batch last in its partition's queue. It returns None, so the accumulator
      treats the batch as full and starts a new one.
    - ``_set_producer_state(...)``: MessageAccumulator._pop_batch, with an
      idempotent or transactional producer only. TopicSink does not use this
      class for such a producer, so the method raises.
    - ``size()``: not called by aiokafka, kept from BatchBuilder's public API.
    """

    __slots__ = ("_data", "_record_count")

    def __init__(self, data: bytes, record_count: int):
        self._data = data
        self._record_count = record_count

    def _build(self) -> bytes:
        return self._data

    def size(self) -> int:
        """Return the size of the encoded batch in bytes."""
        return len(self._data)

    def record_count(self) -> int:
        """Return the number of records in the batch."""
        return self._record_count

    def closed(self) -> bool:
        """Return True: an encoded batch takes no more records."""
        return True

    def close(self) -> None:
        """Do nothing, because an encoded batch is closed from the start."""

    def append(self, *, timestamp, key, value, headers=None) -> None:
        """Reject the message by returning None, because the batch is closed."""
        return None

    def _set_producer_state(self, producer_id, producer_epoch, base_sequence):
        raise ConfigError(
            f"an encoded record batch carries producer id -1 and cannot take producer "
            f"id {producer_id}; send through producer.create_batch() when the producer "
            f"is idempotent or transactional")


def encoded_batch_size(producer, topic: str) -> int | None:
    """Return the byte limit for EncodedBatch, or None to use the producer's own batches.

    None means that the producer compresses, is idempotent or transactional,
    or does not keep its settings where aiokafka 0.14 does.
    """
    # The kernel writes uncompressed batches with producer id -1, so a
    # compressing, idempotent or transactional producer keeps the
    # create_batch()/append() path, which compresses and sets the producer
    # state. These are private attributes of AIOKafkaProducer 0.14.
    compression = getattr(producer, "_compression_type", None)
    idempotent = getattr(producer, "_txn_manager", None) is not None
    batch_size = getattr(getattr(producer, "_message_accumulator", None), "_batch_size", None)
    if compression or idempotent or not isinstance(batch_size, int):
        logger.debug("sink to %s appends messages to producer batches: compression_type=%s, "
                     "idempotent=%s, max_batch_size=%s", topic, compression, idempotent,
                     batch_size)
        return None
    logger.debug("sink to %s sends record batches encoded by sabot.ext, up to %d bytes",
                 topic, batch_size)
    return batch_size


class TopicSink:
    """Encodes batches with a codec and sends them through the shared producer.

    Keyed rows (a ``_key`` column) go to the partition Kafka's Java client
    would pick (murmur2 of the key bytes). Rows without a key go to one
    partition per batch, chosen round-robin, as Kafka's sticky partitioner does.
    Each message carries the time its record batch was written as its
    timestamp (CreateTime).
    """

    def __init__(self, producer, topic: str, codec: Codec, num_partitions: int):
        self.producer = producer
        self.topic = topic
        self.codec = codec
        self.num_partitions = num_partitions
        self._next_partition = 0
        self._max_batch_size = encoded_batch_size(producer, topic)

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
                                         np.arange(len(values), dtype=np.int64))
        futures = []
        for partition, rows in split_by_partition(partitions):
            futures.extend(await self._send_rows(partition, keys, values, rows))
        return futures

    def _sticky_partition(self) -> int:
        partition = self._next_partition
        self._next_partition = (partition + 1) % self.num_partitions
        return partition

    async def _send_rows(self, partition, keys, values,
                         rows: np.ndarray) -> list[asyncio.Future]:
        if self._max_batch_size is None:
            return await self._append_rows(partition, keys, values, rows.tolist())
        producer = self.producer
        futures = []
        timestamp_ms = time.time_ns() // 1_000_000
        start = 0
        while start < len(rows):
            data, written = ext.encode_record_batch(keys, values, rows[start:], timestamp_ms,
                                                    self._max_batch_size)
            futures.append(await producer.send_batch(EncodedBatch(data, written), self.topic,
                                                     partition=partition))
            start += written
        return futures

    async def _append_rows(self, partition, keys, values, rows) -> list[asyncio.Future]:
        producer = self.producer
        futures = []
        builder = producer.create_batch()
        for i in rows:
            key = keys[i] if keys is not None else None
            if builder.append(key=key, value=values[i], timestamp=None) is None:
                futures.append(await producer.send_batch(builder, self.topic,
                                                         partition=partition))
                builder = producer.create_batch()
                # NOTE: aiokafka 0.14 accepts the first message of an empty batch
                # whatever its size, so this error is not raised with that version.
                if builder.append(key=key, value=values[i], timestamp=None) is None:
                    raise ValueError(
                        f"a message of {len(values[i])} bytes does not fit a producer "
                        f"batch; raise the max_batch_size setting"
                    )
        if builder.record_count():
            futures.append(await producer.send_batch(builder, self.topic,
                                                     partition=partition))
        return futures
