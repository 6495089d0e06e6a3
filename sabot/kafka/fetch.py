"""Fetch records as Arrow columns, beside an aiokafka consumer that keeps the group.

aiokafka's ``getmany`` builds a ``ConsumerRecord`` for every message, which
costs more than everything else the stateless data path does. This fetcher
sends the Fetch requests itself and hands the raw record batches of each
partition to :func:`sabot.ext.parse_record_batches`, which reads them
straight into Arrow buffers.

The work is split like this::

    AIOKafkaConsumer      group membership, assignment, rebalance callbacks,
                          commits, committed offsets, ListOffsets; its own
                          fetching is paused on every assigned partition
    ArrowFetcher          positions, one Fetch request in flight per broker
                          (own AIOKafkaClient, own connections), parsing,
                          a buffer of at most one response per partition

A response is parsed as soon as it arrives and the next request for the
partitions it drained goes out before :meth:`ArrowFetcher.fetch` returns,
so the broker prepares the next fetch while the worker processes this one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka import errors as kafka_errors
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest
from aiokafka.record.memory_records import MemoryRecords

from sabot import ext
from sabot.errors import ConfigError, CorruptRecordError
from sabot.ext import FetchedColumns, JoinedValues
from sabot.ext._protocols import TIMESTAMP_TYPE
from sabot.ext._twins import join_values_with_newlines

logger = logging.getLogger(__name__)

#: How long the broker may hold a Fetch request open while it has no new
#: records, ms. aiokafka's consumer waits as long by default (fetch_max_wait_ms).
FETCH_MAX_WAIT_MS = 500
#: The same while fetched records wait to be processed, ms. Not 0, because
#: Tansu 0.6 returns no records at all for a Fetch request with max_wait_ms=0.
BUSY_FETCH_MAX_WAIT_MS = 10
#: Isolation level READ_UNCOMMITTED: records of aborted transactions are
#: returned too, as aiokafka's default consumer does.
READ_UNCOMMITTED = 0
#: Back-off after a failed fetch of a partition, doubled per failure up to the maximum, s.
RETRY_BACKOFF = 0.1
RETRY_BACKOFF_MAX = 2.0
#: The errors that mean the cached metadata named the wrong leader.
METADATA_ERRORS = (kafka_errors.NotLeaderForPartitionError,
                   kafka_errors.UnknownTopicOrPartitionError)


def format_tp(tp: TopicPartition) -> str:
    return f"{tp.topic}[{tp.partition}]"


class FetchedRecord(NamedTuple):
    """One record of a :class:`PartitionBatch`, for the few places that need a row."""

    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True)
class PartitionBatch:
    """The records of one partition from one fetch, as columns.

    ``len(batch)``, ``batch[i].offset``, ``batch[i].key`` and
    ``batch[i].value`` work as on the list of ConsumerRecords that
    ``getmany`` returns, so the worker treats both alike.
    """

    tp: TopicPartition
    columns: FetchedColumns
    #: The partition's highwater offset from the fetch response.
    highwater: int

    def __len__(self) -> int:
        return len(self.columns.offsets)

    def __getitem__(self, index: int) -> FetchedRecord:
        columns = self.columns
        return FetchedRecord(int(columns.offsets[index]),
                             columns.timestamps[index].value,
                             columns.keys[index].as_py(), columns.values[index].as_py())

    def slice(self, start: int, stop: int) -> PartitionBatch:
        """Return rows ``start`` to ``stop`` (exclusive) as a batch of their own."""
        columns = self.columns
        length = stop - start
        joined = columns.joined
        if joined is not None:
            joined = _slice_joined(joined, columns.values, start, stop)
        return PartitionBatch(self.tp, columns._replace(
            offsets=columns.offsets[start:stop],
            timestamps=columns.timestamps.slice(start, length),
            keys=columns.keys.slice(start, length),
            values=columns.values.slice(start, length),
            joined=joined,
        ), self.highwater)


def _slice_joined(joined: JoinedValues, values: pa.Array, start: int,
                  stop: int) -> JoinedValues:
    """Cut the joined values of rows ``start`` to ``stop`` out of ``joined``."""
    lengths = pc.fill_null(pc.binary_length(values), 0).to_numpy()
    present = lengths > 0
    # ends[i]: where value i's separator sits in the joined data, or the
    # previous value's when value i is empty; the last value has no separator.
    ends = np.cumsum(np.where(present, lengths + 1, 0))
    begin = int(ends[start - 1]) if start else 0
    count = int(np.count_nonzero(present[start:stop]))
    data = joined.data[begin:int(ends[stop - 1]) - 1] if count else b""
    newline_in_values = joined.newline_in_values and data.count(b"\n") > max(count - 1, 0)
    return JoinedValues(data, count, (stop - start) - count, newline_in_values)


def parse_partition(data: bytes, fetch_offset: int, join_values: bool = False,
                    check_crcs: bool = False) -> FetchedColumns:
    """Parse one partition's ``records`` field, in any message format.

    Format v2 goes to :func:`sabot.ext.parse_record_batches`. Data in the
    legacy formats v0 and v1 (brokers before Kafka 0.11, or topics kept in
    that format) is read with aiokafka's ``MemoryRecords``, one Python
    object per record.
    """
    columns = ext.parse_record_batches(data, fetch_offset, join_values, check_crcs)
    if columns.legacy_format:
        columns = _parse_legacy(data, fetch_offset, join_values, check_crcs)
    return columns


def _parse_legacy(data: bytes, fetch_offset: int, join_values: bool,
                  check_crcs: bool) -> FetchedColumns:
    records = MemoryRecords(bytes(data))
    next_offset = fetch_offset
    offsets, timestamps, keys, values = [], [], [], []
    while records.has_next():
        batch = records.next_batch()
        if check_crcs and not batch.validate_crc():
            raise CorruptRecordError(
                f"message set at offset {batch.next_offset - 1} fails its CRC check; "
                f"the data in the broker is damaged: to go past it, commit an offset "
                f"after this message for the consumer group")
        if not getattr(batch, "is_control_batch", False):
            for record in batch:
                if record.offset < fetch_offset:
                    continue
                offsets.append(record.offset)
                # Format v0 has no timestamps; -1 is Kafka's "no timestamp".
                timestamps.append(-1 if record.timestamp is None else record.timestamp)
                keys.append(record.key)
                values.append(record.value)
        next_offset = max(next_offset, batch.next_offset)
    return FetchedColumns(
        offsets=np.array(offsets, dtype=np.int64),
        timestamps=pa.array(np.array(timestamps, dtype=np.int64)).cast(TIMESTAMP_TYPE),
        keys=pa.array(keys, type=pa.binary()),
        values=pa.array(values, type=pa.binary()),
        joined=join_values_with_newlines(values) if join_values else None,
        next_offset=next_offset,
        parsed_bytes=_complete_bytes(data),
        legacy_format=True,
    )


def _complete_bytes(data: bytes) -> int:
    """Return how many bytes at the start of ``data`` are complete batches or messages."""
    position = 0
    while len(data) - position >= 12:
        # offset int64, then the length of the rest of the batch or message, int32.
        size = 12 + int.from_bytes(data[position + 8:position + 12], "big", signed=True)
        if size > len(data) - position:
            break
        position += size
    return position


class ArrowFetcher:
    """Fetches the partitions assigned to ``consumer`` and returns them as columns.

    Call :meth:`assign` and :meth:`revoke` from the consumer's rebalance
    listener, :meth:`fetch` from the consume loop, and :meth:`close` before
    the consumer stops. Positions start at the group's committed offsets,
    or at the earliest or latest offset (``auto_offset_reset``) where the
    group has none.
    """

    def __init__(self, consumer: AIOKafkaConsumer, bootstrap_servers: str, *,
                 topics: list[str], client_id: str, auto_offset_reset: str = "earliest",
                 max_partition_fetch_bytes: int = 4 << 20, fetch_max_bytes: int = 64 << 20,
                 check_crcs: bool = True, join_topics: frozenset[str] = frozenset()):
        self._consumer = consumer
        self._client = AIOKafkaClient(bootstrap_servers=bootstrap_servers,
                                      client_id=client_id)
        self._topics = list(topics)
        self._auto_offset_reset = auto_offset_reset
        self._max_partition_fetch_bytes = max_partition_fetch_bytes
        self._fetch_max_bytes = fetch_max_bytes
        self._check_crcs = check_crcs
        self._join_topics = join_topics
        #: Assigned partitions, each with the number of the assignment that
        #: brought it: a response or a lookup started under an earlier
        #: assignment of the same partition is dropped.
        self._assigned: dict[TopicPartition, int] = {}
        self._assignments = 0
        #: The next offset to fetch, per partition whose start is known.
        self._positions: dict[TopicPartition, int] = {}
        #: Partitions that start per auto_offset_reset, not at the committed offset.
        self._needs_reset: set[TopicPartition] = set()
        self._highwaters: dict[TopicPartition, int] = {}
        #: Parsed records not yet returned by fetch(), in arrival order.
        self._buffered: dict[TopicPartition, PartitionBatch] = {}
        self._in_flight: dict[int, asyncio.Task] = {}
        self._lookup: asyncio.Task | None = None
        self._retry_at: dict[TopicPartition, float] = {}
        self._failures: dict[TopicPartition, int] = {}
        self._partition_bytes: dict[TopicPartition, int] = {}
        self._legacy_logged: set[TopicPartition] = set()
        self._wakeup = asyncio.Event()
        self._error: BaseException | None = None

    async def start(self) -> None:
        await self._client.bootstrap()
        await self._client.set_topics(self._topics)

    async def close(self) -> None:
        tasks = [*self._in_flight.values(), *([self._lookup] if self._lookup else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._in_flight.clear()
        self._buffered.clear()
        await self._client.close()

    # -- assignment ---------------------------------------------------------------------

    def assign(self, tps) -> None:
        """Start fetching ``tps``, the whole new assignment, each at its committed offset."""
        for tp in list(self._assigned):
            self._forget(tp)
        for tp in tps:
            self._assignments += 1
            self._assigned[tp] = self._assignments
        self._wakeup.set()

    def revoke(self, tps) -> None:
        """Stop fetching ``tps`` and drop their buffered records."""
        for tp in tps:
            self._forget(tp)

    def _forget(self, tp: TopicPartition) -> None:
        for state in (self._assigned, self._positions, self._highwaters, self._buffered,
                      self._retry_at, self._failures, self._partition_bytes):
            state.pop(tp, None)
        self._needs_reset.discard(tp)

    def is_assigned(self, tp: TopicPartition) -> bool:
        return tp in self._assigned

    def highwater(self, tp: TopicPartition) -> int | None:
        """Return the highwater offset of ``tp`` from the last fetch response, or None."""
        return self._highwaters.get(tp)

    def position(self, tp: TopicPartition) -> int | None:
        """Return the next offset to fetch from ``tp``, or None while it is looked up."""
        return self._positions.get(tp)

    # -- fetching -----------------------------------------------------------------------

    async def fetch(self, timeout: float,
                    max_records: int) -> dict[TopicPartition, PartitionBatch]:
        """Return up to ``max_records`` fetched records, by partition.

        Waits up to ``timeout`` seconds for records and returns an empty dict
        when none arrived. Retriable failures are logged and retried with a
        back-off. Raises the errors that retrying cannot fix: CorruptRecordError,
        ConfigError for a batch larger than fetch_max_bytes, MissingExtraError
        for a compression codec whose package is missing, and non-retriable
        Kafka errors.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            self._look_up_positions()
            self._send_requests()
            if self._buffered:
                batches = self._take(max_records)
                # The drained partitions are fetched again while the caller
                # processes these records.
                self._send_requests()
                return batches
            now = time.monotonic()
            if now >= deadline:
                return {}
            wait = deadline - now
            if self._retry_at:
                wait = min(wait, max(0.0, min(self._retry_at.values()) - now))
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), max(wait, 0.001))
            except asyncio.TimeoutError:
                pass

    def _take(self, max_records: int) -> dict[TopicPartition, PartitionBatch]:
        """Remove up to ``max_records`` records from the buffer, oldest partition first."""
        batches: dict[TopicPartition, PartitionBatch] = {}
        budget = max_records
        for tp in list(self._buffered):
            if budget <= 0:
                break
            batch = self._buffered[tp]
            if len(batch) <= budget:
                batches[tp] = self._buffered.pop(tp)
                budget -= len(batch)
            else:
                batches[tp] = batch.slice(0, budget)
                self._buffered[tp] = batch.slice(budget, len(batch))
                budget = 0
        return batches

    def _send_requests(self) -> None:
        """Send one Fetch request to each broker that leads a fetchable partition."""
        now = time.monotonic()
        by_node: dict[int, list[TopicPartition]] = defaultdict(list)
        for tp in self._assigned:
            if tp in self._buffered or tp not in self._positions:
                continue
            if self._retry_at.get(tp, 0.0) > now:
                continue
            self._retry_at.pop(tp, None)
            node = self._client.cluster.leader_for_partition(tp)
            if node is None or node == -1:
                self._client.force_metadata_update()
                self._back_off(tp, "its leader is not known")
                continue
            if node not in self._in_flight:
                by_node[node].append(tp)
        for node, tps in by_node.items():
            # A partition late in a request can get nothing once the earlier
            # ones fill fetch_max_bytes, so the order changes every time.
            random.shuffle(tps)
            requested = {tp: (self._positions[tp], self._assigned[tp]) for tp in tps}
            topics: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
            for tp in tps:
                limit = self._partition_bytes.get(tp, self._max_partition_fetch_bytes)
                topics[tp.topic].append((tp.partition, self._positions[tp], limit))
            # While records wait in the buffer, the request asks for a quick
            # response. A request held open for partitions at their end would
            # delay this broker's next request, for the partitions drained meanwhile.
            max_wait_ms = BUSY_FETCH_MAX_WAIT_MS if self._buffered else FETCH_MAX_WAIT_MS
            request = FetchRequest(max_wait_ms, 1, self._fetch_max_bytes,
                                   READ_UNCOMMITTED, list(topics.items()))
            self._in_flight[node] = asyncio.create_task(
                self._fetch_from(node, request, requested), name=f"sabot-fetch-{node}")

    async def _fetch_from(self, node: int, request: FetchRequest,
                          requested: dict[TopicPartition, tuple[int, int]]) -> None:
        try:
            try:
                response = await self._client.send(node, request)
            except kafka_errors.KafkaError as exc:
                if not exc.retriable:
                    raise
                logger.warning("fetch from broker %d failed, retrying: %r", node, exc)
                self._client.force_metadata_update()
                for tp in requested:
                    self._back_off(tp, repr(exc), log=False)
                return
            self._handle_response(response, requested)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller of fetch()
            self._error = exc
        finally:
            if self._in_flight.get(node) is asyncio.current_task():
                del self._in_flight[node]
            self._wakeup.set()

    def _handle_response(self, response,
                         requested: dict[TopicPartition, tuple[int, int]]) -> None:
        for topic, partitions in response.topics:
            for partition_data in partitions:
                # Every Fetch response version starts a partition with
                # (partition, error_code, highwater) and ends it with the records.
                partition, error_code, highwater = partition_data[:3]
                tp = TopicPartition(topic, partition)
                if tp not in requested:
                    continue
                fetch_offset, assignment = requested[tp]
                if self._assigned.get(tp) != assignment or \
                        self._positions.get(tp) != fetch_offset:
                    logger.debug("dropping the fetched records of %s: it was revoked or "
                                 "moved while the request was in flight", format_tp(tp))
                    continue
                error = kafka_errors.for_code(error_code)
                if error is kafka_errors.NoError:
                    self._accept(tp, fetch_offset, highwater, partition_data[-1])
                elif error is kafka_errors.OffsetOutOfRangeError:
                    logger.warning("fetch offset %d of %s is out of range; starting again "
                                   "from the %s offset (auto_offset_reset)", fetch_offset,
                                   format_tp(tp), self._auto_offset_reset)
                    del self._positions[tp]
                    self._needs_reset.add(tp)
                elif error in METADATA_ERRORS or error.retriable:
                    if error in METADATA_ERRORS:
                        self._client.force_metadata_update()
                    self._back_off(tp, error.__name__)
                else:
                    raise error(f"fetching {format_tp(tp)} at offset {fetch_offset} failed "
                                f"with {error.__name__}, which retrying does not fix")

    def _accept(self, tp: TopicPartition, fetch_offset: int, highwater: int,
                data: bytes) -> None:
        self._highwaters[tp] = highwater
        self._failures.pop(tp, None)
        try:
            columns = parse_partition(data, fetch_offset, tp.topic in self._join_topics,
                                      self._check_crcs)
        except CorruptRecordError as exc:
            raise CorruptRecordError(f"{format_tp(tp)}: {exc}") from exc
        if columns.legacy_format and tp not in self._legacy_logged:
            self._legacy_logged.add(tp)
            logger.info("%s contains messages in the legacy format v0/v1 (magic 0 or 1); "
                        "reading them with aiokafka's MemoryRecords, one Python object "
                        "per record", format_tp(tp))
        if data and not columns.parsed_bytes:
            self._grow_fetch_size(tp, fetch_offset, data)
        self._positions[tp] = columns.next_offset
        if len(columns.offsets):
            self._buffered[tp] = PartitionBatch(tp, columns, highwater)
        logger.debug("fetched %d records of %s at offsets %d..%d", len(columns.offsets),
                     format_tp(tp), fetch_offset, columns.next_offset - 1)

    def _grow_fetch_size(self, tp: TopicPartition, fetch_offset: int, data: bytes) -> None:
        """Handle a response that contains only the start of a batch.

        Brokers since Kafka 0.10.1 return the first batch whole even when it
        exceeds the partition's limit, so this is a batch cut off by the
        response's fetch_max_bytes, or a broker that does not do so.
        """
        needed = 12 + int.from_bytes(data[8:12], "big", signed=True) if len(data) >= 12 \
            else 2 * len(data)
        limit = self._partition_bytes.get(tp, self._max_partition_fetch_bytes)
        if needed > self._fetch_max_bytes:
            raise ConfigError(
                f"the record batch at offset {fetch_offset} of {format_tp(tp)} takes "
                f"{needed} bytes, more than fetch_max_bytes={self._fetch_max_bytes}; "
                f"raise the fetch_max_bytes setting")
        if needed > limit:
            logger.warning("the record batch at offset %d of %s takes %d bytes, more than "
                           "max_partition_fetch_bytes=%d; fetching it with a larger limit",
                           fetch_offset, format_tp(tp), needed, limit)
            self._partition_bytes[tp] = needed

    def _back_off(self, tp: TopicPartition, reason: str, log: bool = True) -> None:
        failures = self._failures.get(tp, 0) + 1
        self._failures[tp] = failures
        delay = min(RETRY_BACKOFF * 2 ** (failures - 1), RETRY_BACKOFF_MAX)
        self._retry_at[tp] = time.monotonic() + delay
        if log:
            logger.warning("fetching %s failed (%s, attempt %d); retrying in %.1f s",
                           format_tp(tp), reason, failures, delay)

    # -- positions ----------------------------------------------------------------------

    def _look_up_positions(self) -> None:
        if self._lookup is not None and not self._lookup.done():
            return
        now = time.monotonic()
        pending = {tp: assignment for tp, assignment in self._assigned.items()
                   if tp not in self._positions and self._retry_at.get(tp, 0.0) <= now}
        if pending:
            self._lookup = asyncio.create_task(self._look_up(pending),
                                               name="sabot-fetch-positions")

    async def _look_up(self, pending: dict[TopicPartition, int]) -> None:
        """Find where each partition in ``pending`` starts."""
        try:
            found = await self._start_offsets(list(pending))
        except kafka_errors.KafkaError as exc:
            for tp in pending:
                self._back_off(tp, f"looking up its start offset: {exc!r}")
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the caller of fetch()
            self._error = exc
            return
        finally:
            self._wakeup.set()
        started = []
        for tp, (offset, source) in found.items():
            if self._assigned.get(tp) == pending[tp] and tp not in self._positions:
                self._positions[tp] = offset
                self._needs_reset.discard(tp)
                started.append(f"{format_tp(tp)} at {offset} ({source})")
        if started:
            logger.info("fetching %s", ", ".join(sorted(started)))

    async def _start_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition,
                                                                      tuple[int, str]]:
        """Return the committed offset of each of ``tps``, or where auto_offset_reset starts it."""
        found: dict[TopicPartition, tuple[int, str]] = {}
        committed_tps = [tp for tp in tps if tp not in self._needs_reset]
        committed = await asyncio.gather(*(self._consumer.committed(tp)
                                           for tp in committed_tps))
        reset = [tp for tp in tps if tp in self._needs_reset]
        for tp, offset in zip(committed_tps, committed, strict=True):
            if offset is None:
                reset.append(tp)
            else:
                found[tp] = (offset, "committed")
        if reset:
            if self._auto_offset_reset == "latest":
                offsets = await self._consumer.end_offsets(reset)
            else:
                offsets = await self._consumer.beginning_offsets(reset)
            for tp, offset in offsets.items():
                found[tp] = (offset, self._auto_offset_reset)
        return found
