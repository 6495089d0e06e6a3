"""The demo: the flights example app on the embedded broker, end to end.

1. start the embedded Kafka-compatible broker on a free loopback port;
2. load the 336,776 flights of 2013 as JSON messages keyed by carrier into
   an 8-partition ``flights`` topic;
3. run ``sabot worker -A examples.flights`` until its consumer group has
   committed every flight, printing progress;
4. stop the worker with SIGTERM, read the ``delayed-flights`` topic back and
   print a summary, then stop the broker.

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
from pathlib import Path

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
SINK = "delayed-flights"
PARTITIONS = 8


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


async def load_topic(bootstrap: str, table: pa.Table) -> dict[int, int]:
    """Send every flight as a JSON message keyed by carrier; return end offsets."""
    await ensure_topics(bootstrap, {SOURCE: PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    sink = TopicSink(producer, SOURCE, get_codec("json"), PARTITIONS)
    started = time.monotonic()
    sent = 0
    try:
        for batch in table.to_batches(max_chunksize=20_000):
            keyed = batch.append_column("_key", batch.column("carrier"))
            futures = await sink.send(keyed)
            await asyncio.gather(*futures)
            sent += batch.num_rows
            if sent % 100_000 < batch.num_rows:
                say(f"loaded {sent:,}/{table.num_rows:,} flights")
    finally:
        await producer.stop()
    say(f"loaded {sent:,} flights in {time.monotonic() - started:.1f} s")
    return await end_offsets(bootstrap)


async def end_offsets(bootstrap: str) -> dict[int, int]:
    # Count what each partition contains by reading it: Tansu 0.6 can report
    # end offsets below the real contents, so they are not trusted here.
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                fetch_max_bytes=64 << 20,
                                max_partition_fetch_bytes=16 << 20)
    await consumer.start()
    tps = [TopicPartition(SOURCE, p) for p in range(PARTITIONS)]
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


async def committed(bootstrap: str) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=APP_ID,
                                enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: (await consumer.committed(TopicPartition(SOURCE, p))) or 0
                for p in range(PARTITIONS)}
    finally:
        await consumer.stop()


async def read_sink(bootstrap: str, expected: int) -> list[dict]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    rows: list[dict] = []
    try:
        tps = [TopicPartition(SINK, p) for p in sorted(consumer.partitions_for_topic(SINK)
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
                               ends: dict[int, int], timeout: float) -> float:
    total = sum(ends.values())
    started = time.monotonic()
    first_progress = None
    deadline = started + timeout
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited early with status {worker.returncode}")
        done = await committed(bootstrap)
        count = sum(min(done.get(p, 0), end) for p, end in ends.items())
        if count and first_progress is None:
            first_progress = time.monotonic()
        say(f"committed {count:,}/{total:,} flights "
            f"({count / total:.0%}), lag {total - count:,}")
        if all(done.get(p, 0) >= end for p, end in ends.items()):
            return time.monotonic() - (first_progress or started)
        await asyncio.sleep(1.0)
    raise SystemExit(f"the worker did not commit every flight within {timeout:.0f} s")


async def run(broker: EmbeddedBroker) -> int:
    bootstrap = broker.bootstrap
    table = load_flights()
    ends = await load_topic(bootstrap, table)
    total = sum(ends.values())
    if total != table.num_rows:
        say(f"error: the topic contains {total:,} records, expected {table.num_rows:,}")
        return 1

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
    print(f"  rate:                 {total / max(elapsed, 1e-9):,.0f} msgs/s "
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
    return 0


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
