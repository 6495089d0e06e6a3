"""Windowed aggregation against the real broker: exactness, crashes, rebalances.

The input is the 2013 New York flights of a few days, sent in the file's
order as JSON keyed by origin, so each origin's rows stay on one partition.
Every result is checked against DuckDB over the same rows (see
``tests/test_windows.py`` for the oracle), with watermarks per partition.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from aiokafka import AIOKafkaProducer

from sabot import Sabot, ext, tumbling
from sabot.agents.sink import TopicSink
from sabot.codecs import get_codec
from sabot.datasets import load_flights
from tests.kafka_helpers import committed_offsets, create_topic, read_topic
from tests.test_windows import oracle_windows, values_equal

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
HOUR = 3_600_000
LATENESS = 6 * HOUR
FLIGHTS = 9_000  # the first ten days of January, in the file's order

ORACLE_AGGS = "count(flight) AS flights, avg(dep_delay) AS mean_delay, max(dep_delay) AS worst"

APP_SOURCE = textwrap.dedent('''
    import os
    import signal
    import time

    from sabot import Sabot, tumbling

    app = Sabot(os.environ["TEST_APP_ID"], session_timeout_ms=6000, progress_interval=1,
                topic_partitions=4, max_records=int(os.environ.get("TEST_MAX_RECORDS", "300")))
    PAUSE = float(os.environ.get("TEST_PAUSE", "0"))


    def pause(batch):
        time.sleep(PAUSE)
        return batch


    @app.dataflow(os.environ["TEST_SOURCE"], sink=os.environ["TEST_SINK"])
    def hourly_delay(stream):
        return (stream
                .map(pause)
                .key_by("origin")
                .window(tumbling(hours=1), time="sched_dep", allowed_lateness="6h")
                .agg(flights=("flight", "count"), mean_delay=("dep_delay", "mean"),
                     worst=("dep_delay", "max")))


    # Crash injection: SIGKILL this process the Nth time the worker reaches a
    # step, to cut a batch short at that exact point.
    CRASH_AT = os.environ.get("TEST_CRASH_AT")
    if CRASH_AT:
        from sabot.agents.runtime import Worker
        from sabot.state.manager import StateManager

        step, count = CRASH_AT.split(":")
        calls = [0]

        def crashing(original):
            async def wrapper(self, *args):
                calls[0] += 1
                if calls[0] == int(count):
                    os.kill(os.getpid(), signal.SIGKILL)
                return await original(self, *args)
            return wrapper

        if step == "commit":  # after the state's markers, before the offset commit
            Worker._commit = crashing(Worker._commit)
        elif step == "mark":  # after the changes and sink messages, before the markers
            StateManager.mark = crashing(StateManager.mark)
''')


# -- input and oracle -----------------------------------------------------------------------


def flights_input() -> pa.Table:
    table = load_flights().slice(0, FLIGHTS)
    return table.select(["flight", "origin", "dep_delay", "sched_dep"])


async def produce_flights(broker: str, topic: str, table: pa.Table,
                          create: bool = True) -> dict[int, int]:
    """Send rows as JSON keyed by origin, in order; return the rows per partition.

    A row without an origin is sent with the key JFK, so it still has a
    known partition.
    """
    if create:
        await create_topic(broker, topic, PARTITIONS)
    routing = pc.fill_null(table.column("origin"), "JFK").combine_chunks()
    producer = AIOKafkaProducer(bootstrap_servers=broker, linger_ms=5)
    await producer.start()
    sink = TopicSink(producer, topic, get_codec("json"), PARTITIONS)
    try:
        for offset in range(0, table.num_rows, 2000):
            batch = table.slice(offset, 2000).combine_chunks().to_batches()[0]
            keyed = batch.append_column("_key", routing.slice(offset, batch.num_rows))
            await asyncio.gather(*await sink.send(keyed))
    finally:
        await producer.stop()
    partitions = partition_of(routing)
    return {p: int(np.sum(partitions == p)) for p in range(PARTITIONS)}


def partition_of(keys) -> np.ndarray:
    """The partition each key's rows went to, as the sink chose it (murmur2)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    return np.asarray(ext.partitions_for_keys(keys.cast(pa.binary()), PARTITIONS))


def oracle_table(table: pa.Table) -> pa.Table:
    """The input as the oracle reads it: partition, order within it, key, time in ms."""
    times = table.column("sched_dep").cast(pa.int64())
    return pa.table({"part": partition_of(table.column("origin")),
                     "seq": np.arange(table.num_rows), "k": table.column("origin"),
                     "t": times, "flight": table.column("flight"),
                     "dep_delay": table.column("dep_delay")})


def expected_results(table: pa.Table) -> dict[tuple[str, int], dict]:
    """Windows the app must have emitted: those ended by their partition's final watermark."""
    rows = oracle_table(table)
    windows = oracle_windows(rows, HOUR, HOUR, LATENESS, aggs=ORACLE_AGGS, part="part")
    final_watermark = {}
    parts, times = rows.column("part").to_pylist(), rows.column("t").to_pylist()
    for part, time_ms in zip(parts, times, strict=True):
        if time_ms is not None:
            final_watermark[part] = max(final_watermark.get(part, time_ms), time_ms)
    part_of = dict(zip(rows.column("k").to_pylist(), rows.column("part").to_pylist(), strict=True))
    return {(row["key"], row["window_start"]): row for row in windows
            if row["window_start"] + HOUR <= final_watermark[part_of[row["key"]]] - LATENESS}


def expected_late(table: pa.Table) -> int:
    import duckdb

    con = duckdb.connect()
    con.register("src", oracle_table(table))
    return con.sql(f"""
        SELECT count(*) FROM (
            SELECT t, max(t) OVER (PARTITION BY part ORDER BY seq ROWS BETWEEN UNBOUNDED
                                   PRECEDING AND CURRENT ROW) - {LATENESS} AS wm
            FROM src WHERE k IS NOT NULL AND t IS NOT NULL)
        WHERE floor(t / {HOUR}) * {HOUR} + {HOUR} <= wm""").fetchall()[0][0]


def sink_results(records) -> dict[tuple[str, int], dict]:
    """Sink rows by (origin, window start); a repeated window must repeat its values."""
    results: dict[tuple[str, int], dict] = {}
    for record in records:
        row = orjson.loads(record.value)
        assert record.key == row["origin"].encode()
        start = epoch_ms(row["window_start"])
        previous = results.setdefault((row["origin"], start), row)
        assert all(values_equal(previous[c], row[c]) for c in row), (previous, row)
    return results


def epoch_ms(text: str) -> int:
    """Parse an ISO-8601 time from the sink; a time without a zone is UTC."""
    value = datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return int(value.timestamp() * 1000)


def assert_matches_oracle(results: dict, expected: dict) -> None:
    assert sorted(results) == sorted(expected)
    for window, row in expected.items():
        got = results[window]
        for column in ("flights", "mean_delay", "worst"):
            assert values_equal(got[column], row[column]), (window, column, got, row)


# -- worker processes -----------------------------------------------------------------------


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "hourly_app.py").write_text(APP_SOURCE)
    return tmp_path


def start_worker(app_dir: Path, broker: str, env: dict[str, str]) -> subprocess.Popen:
    full_env = dict(os.environ, SABOT_BROKER=f"kafka://{broker}",
                    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    **env)
    return subprocess.Popen(
        [sys.executable, "-m", "sabot", "worker", "-A", "hourly_app", "--loglevel", "info"],
        cwd=app_dir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_committed(broker, group, topic, predicate, worker=None, timeout=90.0):
    deadline = time.monotonic() + timeout
    offsets: dict[int, int] = {}
    while time.monotonic() < deadline:
        if worker is not None and worker.poll() is not None:
            return None
        offsets = await committed_offsets(broker, group, topic, PARTITIONS)
        if predicate(offsets):
            return offsets
        await asyncio.sleep(0.1)
    raise AssertionError(f"committed offsets never matched; last {offsets}")


def stop(worker: subprocess.Popen, signum=signal.SIGTERM, timeout=30.0) -> tuple[int, str]:
    if worker.poll() is None:
        worker.send_signal(signum)
    output, _ = worker.communicate(timeout=timeout)
    return worker.returncode, output.decode(errors="replace")


async def finish_and_check(broker, app_dir, env, topic, unique_name, sink, table, counts):
    """Run a worker until every record is committed, stop it, and check the sink."""
    worker = start_worker(app_dir, broker, {**env, "TEST_PAUSE": "0"})
    try:
        await wait_committed(broker, unique_name, topic,
                             lambda o: all(o[p] >= counts[p] for p in range(PARTITIONS)))
    finally:
        status, output = stop(worker)
    assert status == 0, output
    expected = expected_results(table)
    results = sink_results(await read_topic(broker, sink, len(expected)))
    assert_matches_oracle(results, expected)
    late = await read_topic(broker, f"{unique_name}-late", expected_late(table))
    distinct_late = {(dict(r.headers)["sabot.partition"], dict(r.headers)["sabot.offset"])
                     for r in late}
    assert len(distinct_late) == expected_late(table)
    return output


# -- tests ----------------------------------------------------------------------------------


def make_app(app_id: str, broker_url: str, source: str, sink: str, **settings) -> Sabot:
    app = Sabot(app_id, broker=broker_url, session_timeout_ms=6000, progress_interval=0,
                topic_partitions=PARTITIONS, **settings)

    @app.dataflow(source, sink=sink)
    def hourly_delay(stream):
        return (stream
                .key_by("origin")
                .window(tumbling(hours=1), time="sched_dep", allowed_lateness="6h")
                .agg(flights=("flight", "count"), mean_delay=("dep_delay", "mean"),
                     worst=("dep_delay", "max")))

    return app


async def run_until_committed(app: Sabot, broker: str, topic: str, counts, stop_event=None):
    stop_event = stop_event or asyncio.Event()
    task = asyncio.create_task(app.run(stop_event))
    try:
        await wait_committed(broker, app.group_id, topic,
                             lambda o: all(o[p] >= counts[p] for p in range(PARTITIONS)))
    finally:
        stop_event.set()
        await task


async def test_hourly_windows_equal_oracle(broker, broker_url, topic, unique_name):
    table = flights_input()
    # Rows the window operator must set aside: a null origin, a null time.
    extra = pa.table({"flight": pa.array([1, 2], pa.int64()),
                      "origin": pa.array([None, "JFK"]),
                      "dep_delay": pa.array([5, 6], pa.int64()),
                      "sched_dep": pa.array([table.column("sched_dep")[0].as_py(), None],
                                            table.schema.field("sched_dep").type)})
    source = pa.concat_tables([table.slice(0, 4000), extra, table.slice(4000)])
    counts = await produce_flights(broker, topic, source)
    sink = f"{topic}-out"
    app = make_app(unique_name, broker_url, topic, sink, max_records=1000)
    await run_until_committed(app, broker, topic, counts)

    expected = expected_results(table)
    assert len(expected) > 300
    records = await read_topic(broker, sink, len(expected))
    assert len(records) == len(expected), "a window was emitted twice or not at all"
    assert_matches_oracle(sink_results(records), expected)

    late = expected_late(table)
    assert late > 100
    late_records = await read_topic(broker, f"{unique_name}-late", late)
    assert len(late_records) == late
    headers = dict(late_records[0].headers)
    assert headers["sabot.error"] == b"late"
    assert int(headers["sabot.watermark"]) > 0
    late_row = orjson.loads(late_records[0].value)
    assert set(late_row) == {"flight", "origin", "dep_delay", "sched_dep"}

    dead = await read_topic(broker, f"{unique_name}-dlq", 2)
    reasons = sorted(dict(r.headers)["sabot.error"].decode() for r in dead)
    assert reasons == ["null key in column 'origin'",
                       "null or invalid event time in column 'sched_dep'"]
    changelog = await read_topic(broker, f"{unique_name}-hourly_delay-window-changelog", 1)
    assert any(r.value is None for r in changelog), "emitted windows were not purged"


async def test_reprocessed_offsets_are_not_counted_twice(broker, broker_url, topic,
                                                        unique_name):
    table = flights_input()
    half = 4000
    counts = await produce_flights(broker, topic, table.slice(0, half))
    sink = f"{topic}-out"
    await run_until_committed(make_app(unique_name, broker_url, topic, sink, max_records=500),
                              broker, topic, counts)

    # Rewind the group to the start, as a crash between the state write and
    # the commit would leave it, then send the rest of the rows, which close
    # the windows still open: the state must skip the records it holds.
    await rewind_group(broker, unique_name, topic)
    rest = await produce_flights(broker, topic, table.slice(half), create=False)
    counts = {p: counts[p] + rest[p] for p in range(PARTITIONS)}
    await run_until_committed(make_app(unique_name, broker_url, topic, sink, max_records=500),
                              broker, topic, counts)

    expected = expected_results(table)
    records = await read_topic(broker, sink, len(expected))
    assert len(records) == len(expected)
    assert_matches_oracle(sink_results(records), expected)
    late = await read_topic(broker, f"{unique_name}-late", expected_late(table))
    assert len(late) == expected_late(table)


@pytest.mark.parametrize("crash_at", ["commit:4", "mark:4"])
async def test_crash_inside_a_batch_gives_oracle_results(broker, app_dir, topic, unique_name,
                                                         crash_at):
    table = flights_input()
    counts = await produce_flights(broker, topic, table)
    sink = f"{topic}-out"
    env = {"TEST_APP_ID": unique_name, "TEST_SOURCE": topic, "TEST_SINK": sink,
           "TEST_CRASH_AT": crash_at}
    crashing = start_worker(app_dir, broker, env)
    output = crashing.communicate(timeout=90)[0].decode(errors="replace")
    assert crashing.returncode == -signal.SIGKILL, output
    partial = await committed_offsets(broker, unique_name, topic, PARTITIONS)
    assert sum(partial.values()) < sum(counts.values())

    env.pop("TEST_CRASH_AT")
    output = await finish_and_check(broker, app_dir, env, topic, unique_name, sink, table,
                                    counts)
    assert "restored" in output


async def test_sigkill_mid_stream_gives_oracle_results(broker, app_dir, topic, unique_name):
    table = flights_input()
    counts = await produce_flights(broker, topic, table)
    sink = f"{topic}-out"
    env = {"TEST_APP_ID": unique_name, "TEST_SOURCE": topic, "TEST_SINK": sink,
           "TEST_PAUSE": "0.05"}
    first = start_worker(app_dir, broker, env)
    try:
        partial = await wait_committed(broker, unique_name, topic,
                                       lambda o: sum(o.values()) >= 2000, worker=first)
    finally:
        status, output = stop(first, signum=signal.SIGKILL)
    assert status == -signal.SIGKILL, output
    assert partial is not None and sum(partial.values()) < sum(counts.values()), \
        "the worker finished before it was killed"

    output = await finish_and_check(broker, app_dir, env, topic, unique_name, sink, table,
                                    counts)
    assert "restored" in output


async def test_second_worker_joining_mid_stream(broker, broker_url, topic, unique_name):
    table = flights_input()
    half = 5000
    counts_first = await produce_flights(broker, topic, table.slice(0, half))
    sink = f"{topic}-out"

    first = make_app(unique_name, broker_url, topic, sink, max_records=400)
    stop_first = asyncio.Event()
    first_task = asyncio.create_task(first.run(stop_first))
    second_task = None
    stop_second = asyncio.Event()
    try:
        await wait_committed(broker, unique_name, topic,
                             lambda o: all(o[p] >= counts_first[p] for p in range(PARTITIONS)))
        # The second worker joins: partitions with open windows move to it
        # and it restores their state from the changelog.
        second = make_app(unique_name, broker_url, topic, sink, max_records=400)
        second_task = asyncio.create_task(second.run(stop_second))
        await asyncio.wait_for(_until_assigned(second), 60)
        counts_rest = await produce_flights(broker, topic, table.slice(half), create=False)
        counts = {p: counts_first[p] + counts_rest[p] for p in range(PARTITIONS)}
        await wait_committed(broker, unique_name, topic,
                             lambda o: all(o[p] >= counts[p] for p in range(PARTITIONS)))
        restored = second.worker.state.restored_rows
    finally:
        stop_first.set()
        stop_second.set()
        await first_task
        if second_task is not None:
            await second_task
    assert restored > 0, "no state moved to the second worker"
    expected = expected_results(table)
    results = sink_results(await read_topic(broker, sink, len(expected)))
    assert_matches_oracle(results, expected)


async def rewind_group(broker: str, group: str, topic: str) -> None:
    """Commit offset 0 on every partition of ``topic`` for ``group``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.coordinator.assignors.range import RangePartitionAssignor

    # The group's members use the range assignor; the broker rejects a
    # member whose assignors differ.
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=broker, group_id=group,
                                enable_auto_commit=False, session_timeout_ms=6000,
                                partition_assignment_strategy=(RangePartitionAssignor,))
    try:
        await consumer.start()
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)
        await consumer.commit({TopicPartition(topic, p): 0 for p in range(PARTITIONS)})
    finally:
        await consumer.stop()
    assert await committed_offsets(broker, group, topic, PARTITIONS) == \
        {p: 0 for p in range(PARTITIONS)}


async def _until_assigned(app: Sabot) -> None:
    while app.worker is None or not app.worker.consumer or \
            not app.worker.consumer.assignment():
        await asyncio.sleep(0.1)
