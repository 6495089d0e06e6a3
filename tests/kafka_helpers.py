"""Helpers for tests that produce to and read back from the test broker."""

from __future__ import annotations

import asyncio
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sabot.kafka.admin import ensure_topics


async def create_topic(bootstrap: str, topic: str, partitions: int = 4) -> None:
    await ensure_topics(bootstrap, {topic: partitions})


async def produce(bootstrap: str, topic: str, messages, headers=None) -> dict[int, int]:
    """Send ``(key, value)`` pairs; return the highest offset + 1 per partition."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    ends: dict[int, int] = {}
    try:
        futures = [await producer.send(topic, value=value, key=key, headers=headers)
                   for key, value in messages]
        for future in futures:
            meta = await future
            ends[meta.partition] = max(ends.get(meta.partition, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


async def read_topic(bootstrap: str, topic: str, expected: int, timeout: float = 30.0,
                     settle: float = 0.5):
    """Read a topic from the start until ``expected`` records arrived and no more
    came for ``settle`` seconds; return the records.

    Counting records, not end offsets, decides when the topic has been read,
    because Tansu 0.6 was seen to report end offsets below the contents.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    records = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        for _ in range(50):
            if partitions:
                break
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(topic)
            await asyncio.sleep(0.1)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or [])]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        quiet_since = None
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            records.extend(got)
            if got:
                quiet_since = None
            elif len(records) >= expected:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= settle:
                    break
    finally:
        await consumer.stop()
    return records


async def committed_offsets(bootstrap: str, group: str, topic: str,
                            partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        out = {}
        for p in range(partitions):
            out[p] = await consumer.committed(TopicPartition(topic, p)) or 0
        return out
    finally:
        await consumer.stop()
