"""The demo: the flights example app on the embedded broker, end to end.

1. start the embedded Kafka-compatible broker on a free loopback port;
2. load the 336,776 flights of 2013 as JSON messages keyed by carrier into
   an 8-partition ``flights`` topic, and keyed by origin airport into
   ``flights-by-origin`` (window state is kept per partition, so the hourly
   per-origin windows read a topic partitioned by origin);
3. run ``sabot worker -A examples.flights`` until its consumer group has
   committed every flight of both topics, printing progress;
4. stop the worker with SIGTERM, read the ``delayed-flights`` topic back and
   print a summary;
5. read the ``delay-stats`` topic back and print the hourly mean departure
   delay per origin airport on the busiest day, then stop the broker.

Run it with ``make demo``; it exits non-zero if any step fails or the
output does not match what the flights table gives.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sabot.agents.sink import TopicSink  # noqa: E402
from sabot.codecs import get_codec  # noqa: E402
from sabot.datasets import load_flights  # noqa: E402
from sabot.kafka.admin import ensure_topics  # noqa: E402
from sabot.kafka.broker import EmbeddedBroker  # noqa: E402

APP_ID = "flights"
SOURCE = "flights"
BY_ORIGIN = "flights-by-origin"
SINK = "delayed-flights"
HOURLY_SINK = "delay-stats"
PARTITIONS = 8


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


async def load_topic(bootstrap: str, table: pa.Table, topic: str,
                     key: str) -> dict[int, int]:
    """Send every flight as a JSON message keyed by ``key``; return end offsets."""
    await ensure_topics(bootstrap, {topic: PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    sink = TopicSink(producer, topic, get_codec("json"), PARTITIONS)
    started = time.monotonic()
    sent = 0
    try:
        for batch in table.to_batches(max_chunksize=20_000):
            keyed = batch.append_column("_key", batch.column(key))
            futures = await sink.send(keyed)
            await asyncio.gather(*futures)
            sent += batch.num_rows
            if sent % 100_000 < batch.num_rows:
                say(f"loaded {sent:,}/{table.num_rows:,} flights into {topic}")
    finally:
        await producer.stop()
    say(f"loaded {sent:,} flights keyed by {key} into {topic} "
        f"in {time.monotonic() - started:.1f} s")
    return await end_offsets(bootstrap, topic)


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    # Count what each partition contains by reading it: Tansu 0.6 can report
    # end offsets below the real contents, so they are not trusted here.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_bytes=64 << 20,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    ends: dict[int, int] = {}
    quiet = 0
    try:
        while quiet < 3:
            fetched = await consumer.getmany(timeout_ms=300, max_records=100_000)
            quiet = 0 if fetched else quiet + 1
            for tp, records in fetched.items():
                ends[tp.partition] = records[-1].offset + 1
    finally:
        await consumer.stop()
    return ends


async def committed(bootstrap: str, topics) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=APP_ID,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {(topic, p): (await consumer.committed(TopicPartition(topic, p))) or 0
                for topic in topics for p in range(PARTITIONS)}
    finally:
        await consumer.stop()


async def read_sink(bootstrap: str, expected: int, topic: str = SINK) -> list[dict]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    rows: list[dict] = []
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic)
                                                        or range(PARTITIONS))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        quiet = 0
        while quiet < 5 or len(rows) < expected and quiet < 50:
            fetched = await consumer.getmany(timeout_ms=200, max_records=50_000)
            quiet = 0 if fetched else quiet + 1
            for records in fetched.values():
                rows.extend(orjson.loads(r.value) for r in records)
    finally:
        await consumer.stop()
    return rows


def start_worker(broker_url: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    command = [sys.executable, "-m", "sabot", "worker", "-A", "examples.flights",
               "--broker", broker_url, "--loglevel", "info"]
    say("starting: sabot worker -A examples.flights --broker " + broker_url)
    return subprocess.Popen(command, cwd=ROOT, env=env)


async def wait_until_committed(bootstrap: str, worker: subprocess.Popen,
                               ends: dict[tuple[str, int], int], timeout: float) -> float:
    total = sum(ends.values())
    started = time.monotonic()
    first_progress = None
    deadline = started + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited early with status {worker.returncode}")
        done = await committed(bootstrap, sorted({topic for topic, _ in ends}))
        count = sum(min(done.get(p, 0), end) for p, end in ends.items())
        if count and first_progress is None:
            first_progress = time.monotonic()
        if count:
            say(f"committed {count:,}/{total:,} messages of {SOURCE} and {BY_ORIGIN} "
                f"({count / total:.0%}), lag {total - count:,}")
        else:
            say(f"waiting for the worker to join its consumer group and commit "
                f"(lag {total:,})")
        if all(done.get(p, 0) >= end for p, end in ends.items()):
            return time.monotonic() - (first_progress or started)
        await asyncio.sleep(1.0)
    raise SystemExit(f"the worker did not commit every flight within {timeout:.0f} s")


async def run(broker: EmbeddedBroker) -> int:
    bootstrap = broker.bootstrap
    # In time order by day, as a live feed would send them (the CSV lists
    # the months as 1, 10, 11, 12, 2, ..., 9).
    table = load_flights(by_day=True)
    ends = {}
    for topic, key in ((SOURCE, "carrier"), (BY_ORIGIN, "origin")):
        topic_ends = await load_topic(bootstrap, table, topic, key)
        if sum(topic_ends.values()) != table.num_rows:
            say(f"error: {topic} contains {sum(topic_ends.values()):,} records, "
                f"expected {table.num_rows:,}")
            return 1
        ends.update({(topic, p): end for p, end in topic_ends.items()})
    total = table.num_rows

    worker = start_worker(broker.url)
    try:
        elapsed = await wait_until_committed(bootstrap, worker, ends, timeout=600)
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
        status = worker.wait(timeout=60)
    if status != 0:
        say(f"error: the worker exited with status {status}")
        return 1

    expected = table.filter(pc.greater(table.column("dep_delay"), 60))
    rows = await read_sink(bootstrap, expected.num_rows)
    print()
    say("summary")
    print(f"  flights in:           {total:,}")
    print(f"  delayed flights out:  {len(rows):,} (expected {expected.num_rows:,})")
    print(f"  rate:                 {2 * total / max(elapsed, 1e-9):,.0f} msgs/s over both "
          f"topics "
          f"(first commit to last, within the 1 s polling of this script)")
    print("  five worst delays:")
    worst = sorted(rows, key=lambda row: row["dep_delay"], reverse=True)[:5]
    for row in worst:
        print(f"    {row['carrier']}{row['flight']:<5} {row['origin']}->{row['dest']}  "
              f"scheduled {row['sched_dep']}  {row['dep_delay'] / 60:5.1f} h late")
    if len(rows) < expected.num_rows:
        say("error: fewer delayed flights in the sink topic than in the data")
        return 1
    if len(rows) > expected.num_rows:
        say(f"note: {len(rows) - expected.num_rows:,} duplicates (at-least-once redelivery)")
    return await print_hourly_delays(bootstrap, table)


async def print_hourly_delays(bootstrap: str, table: pa.Table) -> int:
    """Print the app's hourly mean delay per origin on the busiest day; check it.

    The rows come from the ``delay-stats`` topic. They must equal a group-by
    of that day's flights by origin and scheduled hour.
    """
    days = table.group_by(["year", "month", "day"]).aggregate([("flight", "count")])
    busiest = days.sort_by([("flight_count", "descending")]).to_pylist()[0]
    day = (busiest["year"], busiest["month"], busiest["day"])
    flights_of_day = table.filter(pc.and_(
        pc.and_(pc.equal(table["year"], day[0]), pc.equal(table["month"], day[1])),
        pc.equal(table["day"], day[2])))
    expected = {(row["origin"], row["hour"]): row for row in flights_of_day.group_by(
        ["origin", "hour"]).aggregate([("flight", "count"), ("dep_delay", "mean")]).to_pylist()}

    new_york = ZoneInfo("America/New_York")
    got = {}
    for row in await read_sink(bootstrap, 1, topic=HOURLY_SINK):
        start = datetime.fromisoformat(row["window_start"])
        if start.tzinfo is None:  # the windows are in UTC
            start = start.replace(tzinfo=timezone.utc)
        local = start.astimezone(new_york)
        if (local.year, local.month, local.day) == day:
            got[(row["origin"], local.hour)] = row

    origins = sorted({origin for origin, _ in expected})
    print()
    say(f"hourly mean departure delay in minutes (flights), busiest day "
        f"{day[0]}-{day[1]:02d}-{day[2]:02d} with {busiest['flight_count']:,} flights, "
        f"read from {HOURLY_SINK}")
    print("  hour  " + "".join(f"{origin:>15}" for origin in origins))
    for hour in sorted({hour for _, hour in expected}):
        cells = []
        for origin in origins:
            row = got.get((origin, hour))
            if row is None:
                cells.append(f"{'-':>15}")
                continue
            mean = "n/a" if row["mean_delay"] is None else f"{row['mean_delay']:.1f}"
            cells.append(f"{mean:>9} ({row['flights']:>3})")
        print(f"  {hour:02d}:00" + "".join(cells))

    wrong = [key for key, row in expected.items()
             if key not in got or got[key]["flights"] != row["flight_count"]
             or not _close(got[key]["mean_delay"], row["dep_delay_mean"])]
    if wrong or len(got) != len(expected):
        say(f"error: the hourly delays differ from the flights table for {sorted(wrong)[:5]}")
        return 1
    say(f"the {len(got)} hourly rows of that day equal a group-by of the flights table")
    return 0


def _close(left, right) -> bool:
    if left is None or right is None:
        return left is None and right is None
    return abs(left - right) <= 1e-9 * max(1.0, abs(right))


def main() -> int:
    log_path = Path(tempfile.mkdtemp(prefix="sabot-demo-")) / "broker.log"
    broker = EmbeddedBroker(log_path=log_path)
    broker.start()
    say(f"embedded broker on {broker.url} (log: {log_path})")
    try:
        return asyncio.run(run(broker))
    finally:
        broker.stop()
        say("broker stopped")


if __name__ == "__main__":
    sys.exit(main())
