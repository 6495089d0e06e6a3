"""The worker against a real broker: output, dead letters, codecs, offsets."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sabot import Sabot, Stream
from sabot.codecs import get_codec
from tests.kafka_helpers import committed_offsets, create_topic, produce, read_topic

pytestmark = pytest.mark.broker


def make_app(name: str, broker_url: str) -> Sabot:
    return Sabot(name, broker=broker_url, session_timeout_ms=6000, progress_interval=0,
                 topic_partitions=4)


async def run_until(app: Sabot, condition, timeout: float = 60.0):
    """Run ``app`` until ``await condition()`` returns a true value; return it."""
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    waiter = asyncio.create_task(condition())
    try:
        # If the app fails first, its error is raised here at once instead of
        # the condition timing out.
        done, _ = await asyncio.wait({task, waiter}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()
            raise AssertionError("the app stopped before the condition was met")
        if waiter not in done:
            raise AssertionError(f"condition not met within {timeout} s")
        return waiter.result()
    finally:
        waiter.cancel()
        stop.set()
        await task


async def test_dataflow_output_equals_expected(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 4)
    messages = [(b"k%d" % (i % 7), orjson.dumps({"id": i, "amount": i % 100}))
                for i in range(3000)]
    ends = await produce(broker, topic, messages)
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink)
    def big_orders(stream: Stream) -> Stream:
        return stream.filter(lambda b: pc.greater(b["amount"], 50)).select("id", "amount")

    expected = {i for i in range(3000) if i % 100 > 50}
    records = await run_until(app, lambda: read_topic(broker, sink, len(expected)))

    rows = [orjson.loads(r.value) for r in records]
    assert sorted(row["id"] for row in rows) == sorted(expected)
    assert all(set(row) == {"id", "amount"} for row in rows)
    assert all(r.key == b"k%d" % (orjson.loads(r.value)["id"] % 7) for r in records)
    assert await committed_offsets(broker, unique_name, topic, 4) == \
        {p: ends.get(p, 0) for p in range(4)}


async def test_key_by_partitions_like_java_client(broker, broker_url, topic, unique_name):
    from sabot import ext

    await create_topic(broker, topic, 4)
    await produce(broker, topic, [(None, orjson.dumps({"user": f"u{i}", "n": i}))
                                  for i in range(200)])
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink)
    def by_user(stream):
        return stream.key_by("user")

    records = await run_until(app, lambda: read_topic(broker, sink, 200))
    assert len(records) == 200
    for record in records:
        assert record.key == orjson.loads(record.value)["user"].encode()
        assert record.partition == (ext.murmur2(record.key) & 0x7FFFFFFF) % 4


async def test_malformed_json_goes_to_dead_letters(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 1)
    messages = [(b"a", b'{"id": 1, "amount": 60}'), (b"b", b"{not json"),
                (b"c", b'{"id": 2, "amount": 70}'), (b"d", b"[1, 2, 3]"),
                (b"e", b'{"id": 3, "amount": 5}')]
    ends = await produce(broker, topic, messages)
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink)
    def big_orders(stream):
        return stream.filter(lambda b: pc.greater(b["amount"], 50)).select("id")

    async def both():
        out = await read_topic(broker, sink, 2)
        dead = await read_topic(broker, f"{unique_name}-dlq", 2)
        return out, dead

    out, dead = await run_until(app, both)
    assert sorted(orjson.loads(r.value)["id"] for r in out) == [1, 2]
    assert sorted(r.value for r in dead) == [b"[1, 2, 3]", b"{not json"]
    by_value = {r.value: dict(r.headers) for r in dead}
    headers = by_value[b"{not json"]
    assert headers["sabot.topic"] == topic.encode()
    assert headers["sabot.partition"] == b"0"
    assert headers["sabot.offset"] == b"1"
    assert b"invalid JSON" in headers["sabot.error"]
    assert b"expected a JSON object" in by_value[b"[1, 2, 3]"]["sabot.error"]
    assert {r.key for r in dead} == {b"b", b"d"}
    assert await committed_offsets(broker, unique_name, topic, 1) == {0: ends[0]}


async def test_value_of_wrong_type_goes_to_dead_letters(broker, broker_url, topic,
                                                        unique_name):
    # The first fetch makes "amount" a double. A later message with a string
    # there goes to the dead-letter topic, and a message without it is read
    # with a null amount: neither stops the worker.
    await create_topic(broker, topic, 1)
    await produce(broker, topic, [(None, b'{"id": 1, "amount": 60.5}'),
                                  (None, b'{"id": 2, "amount": 70}')])
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink)
    def big_orders(stream):
        return stream.filter(lambda b: pc.greater(b["amount"], 50)).select("id")

    async def both_phases():
        first = await read_topic(broker, sink, 2)
        ends = await produce(broker, topic, [(None, b'{"id": 7, "amount": "lots"}'),
                                             (None, b'{"id": 6}'),
                                             (None, b'{"id": 8, "amount": 80}')])
        out = await read_topic(broker, sink, 3)
        dead = await read_topic(broker, f"{unique_name}-dlq", 1)
        return first, ends, out, dead

    first, ends, out, dead = await run_until(app, both_phases)
    assert sorted(orjson.loads(r.value)["id"] for r in first) == [1, 2]
    assert sorted(orjson.loads(r.value)["id"] for r in out) == [1, 2, 8]
    assert [r.value for r in dead] == [b'{"id": 7, "amount": "lots"}']
    reason = dict(dead[0].headers)["sabot.error"].decode()
    assert "field 'amount' is 'lots' (string)" in reason
    assert "earlier messages made it double" in reason
    assert await committed_offsets(broker, unique_name, topic, 1) == {0: ends[0]}


async def test_failing_records_go_to_dead_letters(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 1)
    ends = await produce(broker, topic, [(None, orjson.dumps({"id": i}))
                                         for i in range(1, 21)])
    sink = f"{topic}-out"
    app = Sabot(unique_name, broker=broker_url, session_timeout_ms=6000,
                progress_interval=0, topic_partitions=4, dataflow_errors="dead-letter")

    def reject_13(batch: pa.RecordBatch) -> pa.RecordBatch:
        if 13 in batch.column("id").to_pylist():
            raise ValueError("id 13 is not allowed")
        return batch

    @app.dataflow(topic, sink=sink)
    def checked(stream):
        return stream.map(reject_13).select("id")

    async def both():
        out = await read_topic(broker, sink, 19)
        dead = await read_topic(broker, f"{unique_name}-dlq", 1)
        return out, dead

    out, dead = await run_until(app, both)
    assert sorted(orjson.loads(r.value)["id"] for r in out) == [i for i in range(1, 21)
                                                                if i != 13]
    assert [r.value for r in dead] == [b'{"id":13}']
    headers = dict(dead[0].headers)
    assert headers["sabot.dataflow"] == b"checked"
    assert headers["sabot.offset"] == b"12"
    assert headers["sabot.error"] == b"dataflow 'checked' raised ValueError: id 13 is not allowed"
    assert await committed_offsets(broker, unique_name, topic, 1) == {0: ends[0]}


def test_isolate_failures_finds_each_failing_row():
    from sabot.agents.runtime import isolate_failures

    def process(batch):
        ids = batch.column("id").to_pylist()
        if any(i % 7 == 0 for i in ids):
            raise ValueError(f"multiple of 7 in {ids}")
        return [batch]

    batch = pa.record_batch({"id": list(range(1, 23))})
    outputs, failed = isolate_failures(process, batch)
    assert [row for row, _ in failed] == [6, 13, 20]
    assert all(isinstance(exc, ValueError) for _, exc in failed)
    assert [i for b in outputs for i in b.column("id").to_pylist()] == \
        [i for i in range(1, 23) if i % 7]


@pytest.mark.parametrize("codec", ["msgpack", "arrow"])
async def test_codec_round_trip_through_broker(broker, broker_url, topic, unique_name, codec):
    rows = [{"id": i, "name": f"n{i}", "score": i / 4} for i in range(50)]
    encoder = get_codec(codec)
    values = encoder.encode(pa.RecordBatch.from_pylist(rows))
    await create_topic(broker, topic, 2)
    await produce(broker, topic, [(None, v) for v in values])
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink, codec=codec)
    def identity(stream):
        return stream.select("id", "name", "score")

    records = await run_until(app, lambda: read_topic(broker, sink, 50))
    decoded = encoder.decode([r.value for r in records])
    assert decoded.errors == []
    assert sorted(decoded.batch.to_pylist(), key=lambda r: r["id"]) == rows


async def test_raw_codec_through_broker(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 1)
    payloads = [bytes([i, 255 - i]) * 3 for i in range(20)]
    await produce(broker, topic, [(None, p) for p in payloads])
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink, codec="raw")
    def upper(stream):
        return stream.filter(lambda b: pc.greater(pc.binary_length(b["value"]), 0))

    records = await run_until(app, lambda: read_topic(broker, sink, 20))
    assert [r.value for r in records] == payloads


async def test_json_in_msgpack_out(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 1)
    await produce(broker, topic, [(None, orjson.dumps({"x": i})) for i in range(10)])
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=sink, sink_codec="msgpack")
    def convert(stream):
        return stream.select("x")

    records = await run_until(app, lambda: read_topic(broker, sink, 10))
    assert [msgpack.unpackb(r.value) for r in records] == [{"x": i} for i in range(10)]


async def test_callable_sink_and_side_effect_dataflow(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 2)
    await produce(broker, topic, [(None, orjson.dumps({"x": i})) for i in range(100)])
    seen: list[int] = []
    dropped: list[int] = []
    app = make_app(unique_name, broker_url)

    @app.dataflow(topic, sink=lambda batch: seen.extend(batch.column("x").to_pylist()))
    def collect(stream):
        return stream.select("x")

    @app.dataflow(topic, name="side_effect")
    def side_effect(stream):
        return stream.map(lambda b: dropped.extend(b.column("x").to_pylist()) or b)

    async def all_seen():
        while len(seen) < 100 or len(dropped) < 100:
            await asyncio.sleep(0.05)
        return True

    await run_until(app, all_seen)
    assert sorted(seen) == list(range(100))
    assert sorted(dropped) == list(range(100))


async def test_standalone_from_kafka_to_kafka(broker, topic, unique_name):
    await create_topic(broker, topic, 2)
    await produce(broker, topic, [(None, orjson.dumps({"id": i, "amount": i}))
                                  for i in range(100)])
    sink = f"{topic}-out"
    stream = (Stream.from_kafka(broker, topic, unique_name, session_timeout_ms=6000,
                                progress_interval=0, topic_partitions=2)
              .filter(lambda b: pc.greater_equal(b["amount"], 90)))
    await stream.to_kafka(broker, sink, idle_timeout=3.0)
    records = await read_topic(broker, sink, 10)
    assert sorted(orjson.loads(r.value)["id"] for r in records) == list(range(90, 100))


async def test_standalone_async_iteration(broker, topic, unique_name):
    await create_topic(broker, topic, 1)
    await produce(broker, topic, [(None, orjson.dumps({"id": i})) for i in range(30)])
    stream = Stream.from_kafka(broker, topic, unique_name, session_timeout_ms=6000,
                               progress_interval=0).select("id")
    ids: list[int] = []
    # aclosing() stops the consumer as soon as the loop is left with break.
    async with contextlib.aclosing(aiter(stream)) as batches:
        async for batch in batches:
            ids.extend(batch.column("id").to_pylist())
            if len(ids) >= 30:
                break
    assert sorted(ids) == list(range(30))
