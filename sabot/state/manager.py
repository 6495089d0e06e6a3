"""State of a worker's stateful pipelines: changelogs, restore, side outputs.

The worker calls, for every fetch and source partition:

1. :meth:`StateManager.open` before the partition's first batch: compiles
   the pipeline, binds a :class:`StateContext` to its stateful operators
   and restores their stores from the changelog;
2. :meth:`StateManager.skip_applied` on the batch: drops the records whose
   offsets the stores have already applied (a crash after the state write
   and before the offset commit replays them);
3. :meth:`StateManager.write` after the pipeline ran: sends the stores'
   changes, late records and dead letters, returning futures that the
   worker awaits together with the sink's;
4. :meth:`StateManager.mark` once all of those are acknowledged: sends the
   "applied" markers and awaits them, before the worker commits offsets.

A crash anywhere before the markers leaves the batch's changes without a
marker; restore then ignores them and the batch is processed again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, TopicPartition

from sabot.errors import BrokerError, ConfigError
from sabot.kafka.admin import ensure_topics
from sabot.state.changelog import (
    CHANGELOG_CONFIG,
    Record,
    StoreLog,
    applied_record,
    change_records,
    changelog_topic,
    fence_record,
    rebuild,
)
from sabot.state.context import SideOutput, StateContext
from sabot.stream.operators import KEY_COLUMN, key_to_binary

logger = logging.getLogger(__name__)

#: Seconds a restore waits for a changelog partition to deliver its next
#: records before giving up. A healthy broker returns a fetch within a
#: second.
RESTORE_STALL_TIMEOUT = 30.0


def late_topic(app_id: str) -> str:
    return f"{app_id}-late"


def bind_stateful(pipeline, context: StateContext) -> list:
    """Bind ``context`` to each stateful operator of ``pipeline`` and return them."""
    operators = [operator for operator in pipeline.operators
                 if getattr(operator, "stateful", False) and hasattr(operator, "bind")]
    for operator in operators:
        operator.bind(context)
    return operators


class StateManager:
    """Opens, restores, logs and marks the stateful pipelines of one worker."""

    def __init__(self, worker):
        self.worker = worker
        self.app = worker.app
        self.contexts: dict[tuple[str, TopicPartition], StateContext] = {}
        self.stores: dict[str, list[str]] = {}
        self.partitions: dict[str, int] = {}
        self.late_records = 0
        self.dropped_late_records = 0
        self.dead_letters = 0
        self.restored_rows = 0
        self.changelog_records = 0
        self._marks: list[tuple[StateContext, int]] = []
        self._restore_consumer: AIOKafkaConsumer | None = None
        self._side_partitions: dict[str, int] = {}

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self, agents) -> None:
        """Find the stateful dataflows and create their changelog and late topics."""
        owners: dict[str, str] = {}
        windowed = False
        for agent in agents:
            context = StateContext(agent.flow.name)
            operators = bind_stateful(agent.stream.compile(), context)
            if not operators:
                continue
            names = [store.name for store in context.stores]
            for name in names:
                if name in owners:
                    raise ConfigError(
                        f"state store {name!r} is used by dataflows {owners[name]!r} and "
                        f"{agent.flow.name!r}; a table belongs to one dataflow, so give "
                        f"each dataflow its own table")
                owners[name] = agent.flow.name
            self.stores[agent.flow.name] = names
            windowed = windowed or any(getattr(op, "sends_late", False) for op in operators)
        if not self.stores:
            return

        producer = self.worker.producer
        app, settings = self.app, self.app.settings
        for agent in agents:
            if agent.flow.name not in self.stores:
                continue
            for topic in agent.flow.topics:
                self.partitions[topic] = len(await producer.partitions_for(topic))
        topics: dict[str, int] = {}
        for agent in agents:
            names = self.stores.get(agent.flow.name)
            if names:
                count = max(self.partitions[topic] for topic in agent.flow.topics)
                for name in names:
                    topics[changelog_topic(app.id, name)] = count
        configs = {topic: CHANGELOG_CONFIG for topic in topics}
        if windowed:
            topics[late_topic(app.id)] = settings.topic_partitions
        await ensure_topics(app.bootstrap_servers, topics, configs=configs,
                            replication_factor=settings.topic_replication_factor)
        for topic, count in topics.items():
            found = len(await producer.partitions_for(topic))
            if topic in configs and found < count:
                raise ConfigError(
                    f"changelog topic {topic} has {found} partitions but its source has "
                    f"{count}; source partition p logs to changelog partition p, so "
                    f"delete the changelog topic (its state is lost) or add partitions")
        for topic in (late_topic(app.id), app.dead_letter_topic):
            if windowed or topic == app.dead_letter_topic:
                self._side_partitions[topic] = len(await producer.partitions_for(topic))
        logger.info("state: stores %s; changelog topics %s",
                    ", ".join(f"{flow}: {'/'.join(names)}" for flow, names in
                              self.stores.items()), ", ".join(sorted(topics)))

    async def stop(self) -> None:
        consumer, self._restore_consumer = self._restore_consumer, None
        if consumer is not None:
            await consumer.stop()
        if self.stores:
            logger.info("state: late records %d (dropped %d), dead letters from stateful "
                        "operators %d", self.late_records, self.dropped_late_records,
                        self.dead_letters)

    def revoke(self, tps) -> None:
        """Forget the state of revoked partitions; their new owner restores it."""
        revoked = set(tps)
        for key in [key for key in self.contexts if key[1] in revoked]:
            del self.contexts[key]

    # -- per batch -----------------------------------------------------------------------

    async def open(self, agent, tp: TopicPartition):
        """Return the pipeline of ``agent`` for ``tp``, restoring its state first if new."""
        pipeline = agent.pipelines.get(tp)
        if pipeline is not None:
            return pipeline
        if agent.flow.name not in self.stores:
            return agent.pipeline(tp)
        pipeline = agent.stream.compile()
        context = StateContext(agent.flow.name, tp, self.partitions.get(tp.topic),
                               keep_side_outputs=True)
        bind_stateful(pipeline, context)
        await self._restore(context)
        agent.pipelines[tp] = pipeline
        self.contexts[(agent.flow.name, tp)] = context
        return pipeline

    def skip_applied(self, agent, tp: TopicPartition, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Drop the rows whose source offsets the state has already applied."""
        context = self.contexts.get((agent.flow.name, tp))
        if context is None or context.applied_offset < 0 or not batch.num_rows:
            return batch
        offsets = batch.column("_offset")
        first = offsets[0].as_py()
        if not context.resumed:
            context.resumed = True
            if first > context.applied_offset + 1:
                logger.warning(
                    "%s: the state was restored up to offset %d but the group resumes at "
                    "%d; records in between, if any, are not in the state. Was the "
                    "changelog topic deleted or the group's offsets moved forward?",
                    context.where, context.applied_offset, first)
        fresh = pc.greater(offsets, context.applied_offset)
        kept = pc.sum(fresh).as_py() or 0
        if kept == batch.num_rows:
            return batch
        logger.info("%s: skipping %d records at or below offset %d, already in the state",
                    context.where, batch.num_rows - kept, context.applied_offset)
        return batch.filter(fresh)

    async def write(self, agent, tp: TopicPartition, last_offset: int) -> list[asyncio.Future]:
        """Send the changes, late records and dead letters of one batch; return futures."""
        context = self.contexts.get((agent.flow.name, tp))
        if context is None or last_offset <= context.applied_offset:
            return []
        futures: list[asyncio.Future] = []
        for store in context.stores:
            records = change_records(store, store.drain(), tp.topic, last_offset)
            self.changelog_records += len(records)
            futures.extend(await self._send(changelog_topic(self.app.id, store.name),
                                            tp.partition, records))
        late, dead = context.take_side_outputs()
        for output in late:
            futures.extend(await self._send_side(late_topic(self.app.id), agent, tp, output))
        for output in dead:
            futures.extend(await self._send_side(self.app.dead_letter_topic, agent, tp, output))
        late_count, dropped_count, dead_count = context.take_counts()
        self.late_records += late_count
        self.dropped_late_records += dropped_count
        self.dead_letters += dead_count
        self.worker.stats.late += late_count
        self.worker.stats.dead_letters += dead_count
        self._marks.append((context, last_offset))
        return futures

    async def mark(self) -> None:
        """Write the "applied" marker of every pipeline that processed a batch; await them."""
        marks, self._marks = self._marks, []
        futures = []
        for context, offset in marks:
            record = applied_record(context.tp.topic, offset)
            for store in context.stores:
                futures.extend(await self._send(changelog_topic(self.app.id, store.name),
                                                context.tp.partition, [record]))
        if futures:
            await asyncio.gather(*futures)
        for context, offset in marks:
            context.applied_offset = offset

    # -- restore -------------------------------------------------------------------------

    async def _restore(self, context: StateContext) -> None:
        started = time.monotonic()
        tp = context.tp
        changelogs = {store.name: TopicPartition(changelog_topic(self.app.id, store.name),
                                                 tp.partition) for store in context.stores}
        # The end of the log is where our own fence record lands: end offsets
        # reported by some brokers (Tansu 0.6) can be lower than the contents.
        fences = {}
        for changelog in changelogs.values():
            futures = await self._send(changelog.topic, changelog.partition,
                                       [fence_record(tp.topic)])
            fences[changelog] = (await asyncio.gather(*futures))[-1].offset
        logs = await self._read(list(changelogs.values()), fences, tp.topic)

        applied = max((log.applied for log in logs.values()), default=-1)
        corrections = []
        total = 0
        for store in context.stores:
            changelog = changelogs[store.name]
            restored = rebuild(logs[changelog], applied)
            store.restore(restored.rows, restored.meta)
            total += restored.rows.num_rows
            if restored.corrections:
                corrections.extend(await self._send(changelog.topic, changelog.partition,
                                                    restored.corrections))
                logger.info("%s: dropped %d changes of an unfinished batch from %s",
                            context.where, len(restored.corrections), changelog.topic)
        if corrections:
            await asyncio.gather(*corrections)
        context.applied_offset = applied
        self.restored_rows += total
        logger.info("%s: restored %d rows of %s from the changelog, applied offset %d, "
                    "in %.2f s", context.where, total, "/".join(changelogs), applied,
                    time.monotonic() - started)

    async def _read(self, changelogs: list[TopicPartition], fences: dict[TopicPartition, int],
                    source_topic: str) -> dict[TopicPartition, StoreLog]:
        consumer = await self._consumer()
        consumer.assign(changelogs)
        await consumer.seek_to_beginning(*changelogs)
        logs = {changelog: StoreLog() for changelog in changelogs}
        pending = set(changelogs)
        last_progress = time.monotonic()
        while pending:
            fetched = await consumer.getmany(*pending, timeout_ms=500, max_records=50_000)
            if fetched:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > RESTORE_STALL_TIMEOUT:
                raise BrokerError(
                    f"restoring state from {sorted(str(tp) for tp in pending)} stalled: no "
                    f"records for {RESTORE_STALL_TIMEOUT:.0f} s before offset "
                    f"{[fences[tp] for tp in pending]}; check that the broker is reachable")
            for changelog, records in fetched.items():
                log = logs[changelog]
                fence = fences[changelog]
                for record in records:
                    if record.offset >= fence:
                        pending.discard(changelog)
                        break
                    log.add(record, source_topic)
        consumer.assign([])
        return logs

    async def _consumer(self) -> AIOKafkaConsumer:
        if self._restore_consumer is None:
            settings = self.app.settings
            consumer = AIOKafkaConsumer(
                bootstrap_servers=self.app.bootstrap_servers,
                client_id=f"{self.app.id}-restore-{os.getpid()}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                max_partition_fetch_bytes=settings.max_partition_fetch_bytes,
                fetch_max_bytes=settings.fetch_max_bytes,
            )
            await consumer.start()
            self._restore_consumer = consumer
        return self._restore_consumer

    # -- sending -------------------------------------------------------------------------

    async def _send(self, topic: str, partition: int,
                    records: list[Record]) -> list[asyncio.Future]:
        producer = self.worker.producer
        futures = []
        builder = producer.create_batch()
        for record in records:
            if builder.append(key=record.key, value=record.value, timestamp=None,
                              headers=record.headers) is None:
                futures.append(await producer.send_batch(builder, topic, partition=partition))
                builder = producer.create_batch()
                if builder.append(key=record.key, value=record.value, timestamp=None,
                                  headers=record.headers) is None:
                    raise ValueError(f"a changelog record of {len(record.value or b'')} bytes "
                                     f"does not fit a producer batch; raise max_batch_size")
        if builder.record_count():
            futures.append(await producer.send_batch(builder, topic, partition=partition))
        return futures

    async def _send_side(self, topic: str, agent, tp: TopicPartition,
                         output: SideOutput) -> list[asyncio.Future]:
        """Send late records or dead letters, one message per row, with their reasons."""
        rows = output.rows.combine_chunks()
        batch = rows.to_batches()[0] if rows.num_rows else None
        if batch is None:
            return []
        values = agent.flow.codec.encode(_value_columns(batch))
        keys: list[Any] = [None] * rows.num_rows
        if KEY_COLUMN in rows.schema.names:
            keys = key_to_binary(rows.column(KEY_COLUMN).combine_chunks()).to_pylist()
        offsets = rows.column("_offset").to_pylist() if "_offset" in rows.schema.names \
            else [None] * rows.num_rows
        watermarks = output.watermarks if output.watermarks is not None \
            else np.full(rows.num_rows, None)
        common = [("sabot.dataflow", agent.flow.name.encode()),
                  ("sabot.topic", tp.topic.encode()),
                  ("sabot.partition", str(tp.partition).encode())]
        records = []
        columns = zip(keys, values, offsets, output.reasons, watermarks, strict=True)
        for key, value, offset, reason, watermark in columns:
            headers = [("sabot.error", reason.encode()), *common]
            if offset is not None:
                headers.append(("sabot.offset", str(offset).encode()))
            if watermark is not None:
                headers.append(("sabot.watermark", str(int(watermark)).encode()))
            records.append(Record(key, value, headers))
        partition = tp.partition % self._side_partitions.get(topic, 1)
        return await self._send(topic, partition, records)


def _value_columns(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Drop the ``_``-prefixed metadata columns, as the sink does."""
    return batch.select([name for name in batch.schema.names if not name.startswith("_")])
