"""The Arrow fetcher against the real broker: fetch responses, positions, the worker.

Real Fetch responses parse to the same columns on both implementations and
to the records aiokafka's consumer returns. The fetcher starts at committed
offsets and handles revocation and broker errors. A worker with
``fetcher="arrow"`` sends and commits what one with ``fetcher="aiokafka"``
does, and resumes after a restart without loss or repeat.
"""

from __future__ import annotations

import asyncio
import collections
import importlib.util
import logging
import time

import orjson
import pyarrow.compute as pc
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest, FetchResponse_v11

from sabot import Sabot
from sabot.ext import _twins
from sabot.kafka.fetch import ArrowFetcher
from tests import test_ext
from tests.kafka_helpers import committed_offsets, create_topic, produce, read_topic
from tests.test_fetch import assert_same_columns, rows_of

pytestmark = pytest.mark.broker

compiled = test_ext.compiled

HEADERS = [("trace", b"t-1"), ("empty", b"")]


async def produce_mixed(bootstrap: str, topic: str, partition: int, start: int, count: int,
                        compression: str | None = None) -> None:
    """Send ``count`` records to one partition, in several batches, some without key or value."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2,
                                max_batch_size=2048, compression_type=compression)
    await producer.start()
    try:
        futures = []
        for i in range(start, start + count):
            key = None if i % 4 == 0 else b"k%d" % i
            value = b'{"i":%d}' % i
            if i % 11 == 0:
                value = b""
            if i % 9 == 0 and key is not None:  # aiokafka's producer needs a key or a value
                value = None
            futures.append(await producer.send(topic, value=value, key=key, partition=partition,
                                               headers=HEADERS if i % 2 else None))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_fetch(bootstrap: str, tp: TopicPartition, offset: int) -> bytes:
    """Return the ``records`` field of one Fetch response for ``tp`` at ``offset``."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap)
    await client.bootstrap()
    try:
        await client.set_topics([tp.topic])
        node = client.cluster.leader_for_partition(tp)
        request = FetchRequest(500, 1, 64 << 20, 0,
                               [(tp.topic, [(tp.partition, offset, 8 << 20)])])
        response = await client.send(node, request)
    finally:
        await client.close()
    [(_, [partition])] = response.topics
    assert partition[1] == 0, f"fetch failed with error code {partition[1]}"
    return partition[-1]


async def consumer_rows(bootstrap: str, tp: TopicPartition, offset: int, expected: int):
    """Read ``tp`` from ``offset`` with aiokafka's consumer: (offset, timestamp, key, value)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    rows = []
    try:
        consumer.assign([tp])
        consumer.seek(tp, offset)
        while len(rows) < expected:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                rows.extend((r.offset, r.timestamp, r.key, r.value) for r in records)
    finally:
        await consumer.stop()
    return rows


@pytest.mark.parametrize("compression", [None, "gzip", "lz4"])
async def test_real_fetch_response_matches_consumer(broker, topic, compiled, compression):
    if compression == "lz4" and importlib.util.find_spec("cramjam") is None:
        pytest.skip("aiokafka writes and reads lz4 with cramjam, which is not installed")
    await create_topic(broker, topic, 1)
    tp = TopicPartition(topic, 0)
    await produce_mixed(broker, topic, 0, 0, 150, compression)
    await produce_mixed(broker, topic, 0, 150, 90, compression)

    for offset in (0, 37, 151):
        data = await raw_fetch(broker, tp, offset)
        # Bits 0-2 of the first batch's attributes name its compression codec.
        assert data[22] & 0x07 == {None: 0, "gzip": 1, "lz4": 3}[compression]
        expected = _twins.parse_record_batches(data, offset, True, True)
        assert_same_columns(compiled.parse_record_batches(data, offset, True, True), expected)
        rows = rows_of(expected)
        assert rows == (await consumer_rows(broker, tp, offset, len(rows)))[:len(rows)]
        assert rows[0][0] == offset
        if offset:
            # The broker returns whole batches: the first starts before the offset.
            assert int.from_bytes(data[:8], "big") < offset


async def test_fetcher_starts_at_committed_offsets(broker, topic, group):
    await create_topic(broker, topic, 2)
    await produce(broker, topic, [(b"k%d" % (i % 5), b"%d" % i) for i in range(40)])
    ends = {p: 0 for p in range(2)}
    for record in await read_topic(broker, topic, 40):
        ends[record.partition] = max(ends[record.partition], record.offset + 1)
    tps = [TopicPartition(topic, p) for p in range(2)]
    busy = tps[0] if ends[0] >= ends[1] else tps[1]
    await commit(broker, group, {busy: 5})

    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    fetcher = ArrowFetcher(consumer, broker, topics=[topic], client_id="test-fetcher")
    await fetcher.start()
    try:
        fetcher.assign(tps)
        offsets = await fetch_offsets(fetcher, sum(ends.values()) - 5)
    finally:
        await fetcher.close()
        await consumer.stop()
    assert offsets[busy] == list(range(5, ends[busy.partition]))
    other = tps[1] if busy == tps[0] else tps[0]
    assert offsets.get(other, []) == list(range(ends[other.partition]))


async def test_fetcher_drops_partition_revoked_mid_fetch(broker, topic, group):
    await create_topic(broker, topic, 2)
    tps = [TopicPartition(topic, p) for p in range(2)]
    for tp in tps:
        await produce_mixed(broker, topic, tp.partition, 0, 20)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    fetcher = ArrowFetcher(consumer, broker, topics=[topic], client_id="test-fetcher")
    await fetcher.start()
    try:
        fetcher.assign(tps)
        # With a timeout of 0, fetch() sends requests but does not wait for them.
        while fetcher.position(tps[0]) is None or fetcher.position(tps[1]) is None:
            assert await fetcher.fetch(0, 1000) == {}
            await asyncio.sleep(0.01)
        # The requests go out now, and tps[0] is revoked before the responses arrive.
        assert await fetcher.fetch(0, 1000) == {}
        fetcher.revoke([tps[0]])
        offsets = await fetch_offsets(fetcher, 20)
        assert not fetcher.is_assigned(tps[0])
    finally:
        await fetcher.close()
        await consumer.stop()
    assert offsets == {tps[1]: list(range(20))}


async def test_fetcher_handles_broker_error_codes(broker, topic, group, caplog):
    """OFFSET_OUT_OF_RANGE and NOT_LEADER_FOR_PARTITION, which Tansu 0.6 never sends.

    The error responses are built here and handed to the fetcher as if the
    broker had sent them. The reset and the retry that follow go to the broker.
    """
    await create_topic(broker, topic, 1)
    tp = TopicPartition(topic, 0)
    await produce_mixed(broker, topic, 0, 0, 10)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    fetcher = ArrowFetcher(consumer, broker, topics=[topic], client_id="test-fetcher")
    await fetcher.start()
    caplog.set_level(logging.INFO, logger="sabot.kafka.fetch")
    try:
        fetcher.assign([tp])
        assert await fetch_offsets(fetcher, 10) == {tp: list(range(10))}
        assert fetcher.position(tp) == 10

        fetcher._handle_response(error_response(tp, 1), {tp: (10, fetcher._assigned[tp])})
        assert fetcher.position(tp) is None
        assert "out of range" in caplog.text
        # auto_offset_reset="earliest": the partition is read again from its start.
        assert await fetch_offsets(fetcher, 10) == {tp: list(range(10))}

        fetcher._handle_response(error_response(tp, 6), {tp: (10, fetcher._assigned[tp])})
        assert "NotLeaderForPartitionError" in caplog.text
        assert fetcher.position(tp) == 10
        await produce_mixed(broker, topic, 0, 10, 3)
        assert await fetch_offsets(fetcher, 3) == {tp: [10, 11, 12]}
    finally:
        await fetcher.close()
        await consumer.stop()


def error_response(tp: TopicPartition, error_code: int) -> FetchResponse_v11:
    partition = (tp.partition, error_code, -1, -1, -1, [], -1, b"")
    return FetchResponse_v11(0, 0, 0, [(tp.topic, [partition])])


async def fetch_offsets(fetcher: ArrowFetcher, expected: int,
                        timeout: float = 30.0) -> dict[TopicPartition, list[int]]:
    """Fetch until ``expected`` records arrived; return their offsets by partition."""
    offsets: dict[TopicPartition, list[int]] = collections.defaultdict(list)
    deadline = time.monotonic() + timeout
    while sum(map(len, offsets.values())) < expected:
        assert time.monotonic() < deadline, f"only {dict(offsets)} arrived"
        for tp, batch in (await fetcher.fetch(0.2, 7)).items():
            assert len(batch) <= 7
            offsets[tp].extend(batch.columns.offsets.tolist())
    return dict(offsets)


async def commit(bootstrap: str, group: str, offsets: dict[TopicPartition, int]) -> None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign(list(offsets))
        await consumer.commit(offsets)
    finally:
        await consumer.stop()


# -- the worker ---------------------------------------------------------------------------


def make_app(name: str, broker_url: str, source: str, sink: str, fetcher: str,
             max_records: int, pause: float = 0.0) -> Sabot:
    app = Sabot(name, broker=broker_url, session_timeout_ms=6000, progress_interval=0,
                topic_partitions=4, fetcher=fetcher, max_records=max_records)

    def slow(batch):
        time.sleep(pause)
        return batch

    @app.dataflow(source, sink=sink)
    def big_orders(stream):
        return (stream.map(slow)
                .filter(lambda b: pc.greater(b["amount"], 50))
                .select("id", "amount"))

    return app


async def run_until_committed(app: Sabot, broker: str, topic: str, ends: dict[int, int],
                              timeout: float = 60.0) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        deadline = time.monotonic() + timeout
        while await committed_offsets(broker, app.group_id, topic, 4) != ends:
            assert not task.done(), "the worker stopped early"
            assert time.monotonic() < deadline, "the worker did not commit every record"
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        await task


async def test_worker_fetchers_send_and_commit_alike(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 4)
    messages = [(b"c%d" % (i % 13), orjson.dumps({"id": i, "amount": i % 100}))
                for i in range(3000)]
    messages[100] = (b"bad", b"{not json")
    messages[2000] = (None, b"")
    await produce(broker, topic, messages)
    producer = AIOKafkaProducer(bootstrap_servers=broker, compression_type="gzip")
    await producer.start()
    try:
        for i in range(3000, 3500):
            await producer.send(topic, orjson.dumps({"id": i, "amount": i % 100}),
                                key=b"c%d" % (i % 13))
        await producer.flush()
    finally:
        await producer.stop()
    ends = {p: 0 for p in range(4)}
    for record in await read_topic(broker, topic, 3500):
        ends[record.partition] = max(ends[record.partition], record.offset + 1)

    apps = {fetcher: make_app(f"{unique_name}-{fetcher}", broker_url, topic,
                              f"{topic}-{fetcher}", fetcher, max_records=700)
            for fetcher in ("arrow", "aiokafka")}
    await asyncio.gather(*(run_until_committed(app, broker, topic, ends)
                           for app in apps.values()))

    outputs = {}
    for fetcher, app in apps.items():
        sent = await read_topic(broker, f"{topic}-{fetcher}", 1715)
        dead = await read_topic(broker, app.dead_letter_topic, 2)
        outputs[fetcher] = (
            collections.Counter((r.key, r.value) for r in sent),
            collections.Counter((r.key, r.value, dict(r.headers)["sabot.offset"],
                                 dict(r.headers)["sabot.partition"]) for r in dead),
        )
    assert outputs["arrow"] == outputs["aiokafka"]
    sent, dead = outputs["arrow"]
    assert sorted(orjson.loads(value)["id"] for _, value in sent) == \
        [i for i in range(3500) if i % 100 > 50]
    assert {(key, value) for key, value, _, _ in dead} == {(None, b""), (b"bad", b"{not json")}


async def test_arrow_restart_resumes_without_loss_or_repeat(broker, broker_url, topic,
                                                            unique_name):
    await create_topic(broker, topic, 4)
    first_ends = await produce(broker, topic, [
        (b"c%d" % (i % 13), orjson.dumps({"id": i, "amount": 60})) for i in range(4000)])
    sink = f"{topic}-out"

    # Small fetches and a slow dataflow: the first worker stops mid-stream.
    first = make_app(unique_name, broker_url, topic, sink, "arrow", max_records=100,
                     pause=0.02)
    stop = asyncio.Event()
    task = asyncio.create_task(first.run(stop))
    try:
        while sum((await committed_offsets(broker, unique_name, topic, 4)).values()) < 500:
            assert not task.done(), "the first worker stopped early"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    partial = await committed_offsets(broker, unique_name, topic, 4)
    assert sum(partial.values()) < 4000, "the first worker read everything before it stopped"

    more = await produce(broker, topic, [
        (b"c%d" % (i % 13), orjson.dumps({"id": i, "amount": 60})) for i in range(4000, 5000)])
    ends = {p: max(first_ends.get(p, 0), more.get(p, 0)) for p in range(4)}
    second = make_app(unique_name, broker_url, topic, sink, "arrow", max_records=2000)
    await run_until_committed(second, broker, topic, ends)

    ids = [orjson.loads(r.value)["id"] for r in await read_topic(broker, sink, 5000)]
    assert sorted(ids) == list(range(5000))
