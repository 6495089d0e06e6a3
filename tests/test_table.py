"""Keyed tables (``app.table``): batch operations, local mode, restore from Kafka."""

from __future__ import annotations

import asyncio

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from sabot import ConfigError, DataflowError, Sabot, Stream
from tests.kafka_helpers import committed_offsets, create_topic, produce, read_topic


def count_per_user(batch, table):
    """Add each batch's per-user counts and amounts to the table; return the new totals."""
    sums = pa.Table.from_batches([batch]).group_by("user", use_threads=False).aggregate(
        [("amount", "sum"), ("amount", "count")])
    before = table.get(sums["user"])
    if "orders" in before.column_names:
        orders = pc.add(pc.fill_null(before["orders"], 0), sums["amount_count"])
        total = pc.add(pc.fill_null(before["total"], 0), sums["amount_sum"])
    else:
        orders, total = sums["amount_count"], sums["amount_sum"]
    table.put({"user": sums["user"], "orders": orders, "total": total})
    return table.get(sums["user"])


def test_table_update_in_local_mode():
    app = Sabot("table-local")
    totals = app.table("totals", key="user")
    events = pa.table({"user": ["a", "b", "a", "c", "a"], "amount": [1, 2, 3, 4, 5]})
    stream = (Stream.from_table(events, batch_size=2).key_by("user")
              .then(totals.update(count_per_user)))
    pipeline = stream.compile()
    outputs = []
    for batch in events.to_batches(max_chunksize=2):
        outputs.extend(pipeline.process(batch))
    last = {row["user"]: row for row in pa.Table.from_batches(outputs).to_pylist()}
    assert {u: (r["orders"], r["total"]) for u, r in last.items()} == \
        {"a": (3, 9), "b": (1, 2), "c": (1, 4)}
    assert all(row["_key"] == row["user"] for row in last.values())
    view = pipeline.operators[-1].view
    assert len(view) == 3
    view.delete(["b"])
    assert sorted(view.to_table().column("user").to_pylist()) == ["a", "c"]


def test_table_names_are_checked():
    app = Sabot("table-names")
    app.table("t1", key="k")
    with pytest.raises(ConfigError, match="already registered"):
        app.table("t1", key="k")
    with pytest.raises(ConfigError, match="topic name"):
        app.table("bad name", key="k")


def test_table_function_errors_name_the_function():
    app = Sabot("table-errors")
    table = app.table("t", key="k")

    def broken(batch, table):
        return 1 / 0

    stream = Stream.from_table(pa.table({"k": [1]})).key_by("k").then(table.update(broken))
    with pytest.raises(DataflowError, match="broken"):
        stream.collect()


@pytest.mark.broker
async def test_table_restored_and_not_double_counted(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 4)
    users = [f"u{i % 37}" for i in range(3000)]
    messages = [(user.encode(), orjson.dumps({"user": user, "amount": i % 11}))
                for i, user in enumerate(users)]
    first_half = await produce(broker, topic, messages[:1500])
    sink = f"{topic}-out"

    def make_app():
        app = Sabot(unique_name, broker=broker_url, session_timeout_ms=6000,
                    progress_interval=0, topic_partitions=4, max_records=200)
        totals = app.table("totals", key="user")

        @app.dataflow(topic, sink=sink)
        def running_totals(stream):
            return stream.key_by("user").then(totals.update(count_per_user))

        return app

    await run_until(make_app(), broker, unique_name, topic, first_half)

    # Rewind to the start, as a crash between the state write and the commit
    # would leave the group: the restored table must skip the records it holds.
    await rewind_group(broker, unique_name, topic)
    ends = await produce(broker, topic, messages[1500:])
    total_ends = {p: max(first_half.get(p, 0), ends.get(p, 0)) for p in range(4)}
    await run_until(make_app(), broker, unique_name, topic, total_ends)

    records = await read_topic(broker, sink, 37)
    final = {}
    for record in records:  # in offset order within each partition
        row = orjson.loads(record.value)
        final[row["user"]] = (row["orders"], row["total"])
    con = duckdb.connect()
    con.register("src", pa.table({"user": users, "amount": [i % 11 for i in range(3000)]}))
    expected = {user: (orders, total) for user, orders, total in con.sql(
        "SELECT user, count(*), sum(amount) FROM src GROUP BY user").fetchall()}
    assert final == expected
    changelog = await read_topic(broker, f"{unique_name}-totals-changelog", 37)
    assert changelog


@pytest.mark.broker
async def test_table_in_two_dataflows_is_rejected(broker, broker_url, topic, unique_name):
    await create_topic(broker, topic, 2)
    app = Sabot(unique_name, broker=broker_url, session_timeout_ms=6000, progress_interval=0)
    totals = app.table("totals", key="user")
    for name in ("first", "second"):
        app.dataflow(topic, name=name)(
            lambda stream: stream.key_by("user").then(totals.update(count_per_user)))
    with pytest.raises(ConfigError, match="used by dataflows 'first' and 'second'"):
        await app.start()
    assert app.worker is None


async def run_until(app, broker, group, topic, ends, timeout=60.0):
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        async def done():
            while True:
                offsets = await committed_offsets(broker, group, topic, 4)
                if all(offsets[p] >= ends.get(p, 0) for p in range(4)):
                    return
                await asyncio.sleep(0.1)

        await asyncio.wait_for(done(), timeout)
    finally:
        stop.set()
        await task


async def rewind_group(broker, group, topic):
    from tests.test_windows_kafka import rewind_group as rewind

    await rewind(broker, group, topic)
