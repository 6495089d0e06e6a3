"""Kafka-to-Kafka throughput: Sabot against the raw aiokafka client, one run.

One embedded broker and one prepared topic (JSON orders keyed by user);
every contender reads the whole topic with its own consumer group:

  raw consume           aiokafka getmany over every message, no processing
  raw consume+produce   aiokafka: every message sent on unchanged, acks awaited,
                        offsets committed after each fetch (at-least-once)
  confluent-kafka       librdkafka's consumer over every message, values read
                        (with the ``bench`` extra), the other client Sabot could use
  sabot big_orders      filter amount > 50, select id and amount, JSON out
  sabot stateless       filter amount > 50, add a computed column, JSON out
                        (each once per --fetchers choice: "arrow" reads record
                        batches into Arrow columns, "aiokafka" uses getmany)
  faust, quix           the stateless pipeline in Faust and in Quix Streams
                        (the ``bench`` extra), each in its own process over
                        the same topic (Faust over its first 200,000 messages)

Rates are messages consumed per second, from the first non-empty fetch to
the last commit (or the last message, for the raw consume). Ratios compare
each Sabot run with the raw rates of the same run.

    python benchmarks/throughput.py --messages 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sabot import Sabot, ext  # noqa: E402
from sabot.agents.loop import new_event_loop  # noqa: E402
from sabot.agents.sink import TopicSink  # noqa: E402
from sabot.codecs import get_codec  # noqa: E402
from sabot.kafka.admin import ensure_topics  # noqa: E402
from sabot.kafka.broker import EmbeddedBroker  # noqa: E402

FETCH = {"fetch_max_bytes": 64 << 20, "max_partition_fetch_bytes": 8 << 20}


def orders_table(count: int, users: int = 10_000, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = np.arange(count, dtype=np.int64)
    return pa.table({
        "id": ids,
        "user": pa.array([f"user-{u}" for u in rng.integers(0, users, count)]),
        "amount": np.round(rng.uniform(0, 100, count), 2),
        "quantity": rng.integers(1, 10, count),
        "ts": 1_700_000_000_000 + ids * 10,
    })


async def prepare_topic(bootstrap: str, topic: str, count: int, partitions: int) -> int:
    await ensure_topics(bootstrap, {topic: partitions})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    sink = TopicSink(producer, topic, get_codec("json"), partitions)
    try:
        for batch in orders_table(count).to_batches(max_chunksize=50_000):
            keyed = batch.append_column("_key", batch.column("user"))
            await asyncio.gather(*await sink.send(keyed))
    finally:
        await producer.stop()
    return count


async def raw_consume(bootstrap: str, topic: str, count: int) -> float:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                group_id=f"raw-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                session_timeout_ms=6000, **FETCH)
    await consumer.start()
    seen, first = 0, None
    try:
        while seen < count:
            fetched = await consumer.getmany(timeout_ms=500, max_records=20_000)
            if fetched and first is None:
                first = time.monotonic()
            for records in fetched.values():
                seen += len(records)
        return seen / (time.monotonic() - first)
    finally:
        await consumer.stop()


async def raw_consume_produce(bootstrap: str, topic: str, count: int) -> float:
    out = f"{topic}-raw-out"
    await ensure_topics(bootstrap, {out: 8})
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap,
                                group_id=f"rawcp-{uuid.uuid4().hex[:6]}",
                                auto_offset_reset="earliest", enable_auto_commit=False,
                                session_timeout_ms=6000, **FETCH)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5,
                                max_batch_size=1 << 20)
    await consumer.start()
    await producer.start()
    seen, first = 0, None
    try:
        while seen < count:
            fetched = await consumer.getmany(timeout_ms=500, max_records=20_000)
            if not fetched:
                continue
            if first is None:
                first = time.monotonic()
            futures = []
            for records in fetched.values():
                for record in records:
                    futures.append(await producer.send(out, record.value, key=record.key))
                seen += len(records)
            await asyncio.gather(*futures)
            await consumer.commit()
        return seen / (time.monotonic() - first)
    finally:
        await producer.stop()
        await consumer.stop()


def confluent_consume(bootstrap: str, topic: str, count: int,
                      partitions: int) -> float | None:
    """Consume every message with confluent-kafka (librdkafka), the other client.

    The partitions are assigned, not subscribed, and the clock starts at the
    assignment: librdkafka prefetches in a background thread, so timing from
    the first message would leave out the fetches made before it.
    """
    if importlib.util.find_spec("confluent_kafka") is None:
        return None
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": f"ck-{uuid.uuid4().hex[:6]}",
        "enable.auto.commit": False, "fetch.max.bytes": 64 << 20,
        "max.partition.fetch.bytes": 8 << 20,
    })
    started = time.monotonic()
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    seen = 0
    try:
        while seen < count:
            messages = consumer.consume(num_messages=20_000, timeout=1.0)
            for message in messages:
                message.value()
            seen += len(messages)
        return seen / (time.monotonic() - started)
    finally:
        consumer.close()


def big_orders(stream):
    return stream.filter(lambda b: pc.greater(b["amount"], 50)).select("id", "amount")


def stateless(stream):
    return (stream
            .filter(lambda b: pc.greater(b["amount"], 50))
            .with_columns(total=lambda b: pc.multiply(b["amount"], b["quantity"])))


# Reading /proc/self/statm takes microseconds, so sampling often costs little,
# and a run of a million messages, under a second, still gets a dozen samples.
RSS_INTERVAL = 0.05


class RssSampler:
    """Sample this process's resident set size (from /proc) every RSS_INTERVAL seconds."""

    def __init__(self):
        self.samples: list[tuple[int, int]] = []

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def run(self, progress):
        while True:
            self.samples.append((progress(), self.rss()))
            await asyncio.sleep(RSS_INTERVAL)


async def run_sabot(bootstrap: str, topic: str, count: int, flow, name: str,
                    fetcher: str = "arrow"):
    app = Sabot(f"bench-{name}-{uuid.uuid4().hex[:6]}", broker=f"kafka://{bootstrap}",
                session_timeout_ms=6000, progress_interval=0, fetcher=fetcher, **FETCH)
    app.dataflow(topic, sink=f"{topic}-{name}-out", name=name)(flow)
    sampler = RssSampler()
    await app.start()
    sampling = asyncio.create_task(
        sampler.run(lambda: app.stats.consumed if app.stats else 0))
    try:
        while app.stats.consumed < count:
            await asyncio.sleep(0.05)
        stats = app.stats
        rate = stats.consumed / (stats.last_commit - stats.first_fetch)
    finally:
        sampling.cancel()
        await app.stop()
    return rate, sampler.samples


PEERS = {"faust": ("faust", "faust_orders.py"), "quix": ("quixstreams", "quix_orders.py")}
# Faust handles about 5,000 messages a second here. By default it reads
# only the start of the topic, and the other peers read all of it.
PEER_MESSAGES = {"faust": 200_000}


def run_peer(name: str, bootstrap: str, topic: str, count: int) -> float | None:
    """Run a peer framework's pipeline in a subprocess; return its rate or None."""
    module, script = PEERS[name]
    if importlib.util.find_spec(module) is None:
        print(f"{name:<21}skipped: install the bench extra (pip install -e '.[bench]')")
        return None
    env = dict(os.environ, BOOTSTRAP=bootstrap, TOPIC=topic, OUT=f"{topic}-{name}-out",
               GROUP=f"{name}-{uuid.uuid4().hex[:6]}", COUNT=str(count))
    with tempfile.TemporaryDirectory(prefix=f"sabot-bench-{name}-") as workdir:
        env["STATE_DIR"] = os.path.join(workdir, "state")
        result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers" / script)],
                                cwd=workdir, env=env, capture_output=True, text=True,
                                timeout=1800)
    match = re.search(r"rate (\d+(?:\.\d+)?)", result.stdout + result.stderr)
    if result.returncode != 0 or not match:
        tail = (result.stdout + result.stderr)[-2000:]
        print(f"{name:<21}failed with status {result.returncode}:\n{tail}")
        return None
    return float(match.group(1))


# Fewer samples than this, taken while messages flowed, show no trend.
MIN_RSS_SAMPLES = 4


def describe_rss(samples) -> str:
    if not samples:
        return "no samples"
    peak = max(r for _, r in samples)
    if sum(1 for consumed, _ in samples if consumed) < MIN_RSS_SAMPLES:
        return (f"peak RSS {peak / 2**20:.0f} MiB; the run was too short to show growth "
                f"(RSS is sampled every {RSS_INTERVAL} s)")
    total = samples[-1][0] or 1
    half = [r for c, r in samples if c <= total / 2]
    at_half = max(half) if half else peak
    return (f"peak RSS {peak / 2**20:.0f} MiB; max up to half the messages "
            f"{at_half / 2**20:.0f} MiB (growth in the second half: "
            f"{(peak - at_half) / 2**20:+.0f} MiB)")


def rss_by_tenth(samples) -> str:
    """List the peak RSS up to each tenth of the messages, to show whether it levels off."""
    total = samples[-1][0] if samples else 0
    if sum(1 for consumed, _ in samples if consumed) < MIN_RSS_SAMPLES:
        return f"none: the run was too short (RSS is sampled every {RSS_INTERVAL} s)"
    peaks = []
    for tenth in range(1, 11):
        seen = [r for c, r in samples if c <= total * tenth / 10]
        peaks.append(max(seen) if seen else 0)
    return ", ".join(f"{peak / 2**20:.0f}" for peak in peaks) + " MiB"


async def main(args) -> None:
    broker = EmbeddedBroker().start()
    bootstrap = broker.bootstrap
    topic = f"bench-{uuid.uuid4().hex[:6]}"
    try:
        started = time.monotonic()
        await prepare_topic(bootstrap, topic, args.messages, args.partitions)
        print(f"prepared {args.messages:,} JSON messages in {args.partitions} partitions "
              f"in {time.monotonic() - started:.1f} s", flush=True)

        results: dict[str, float] = {}
        results["raw consume"] = await raw_consume(bootstrap, topic, args.messages)
        print(f"raw consume          {results['raw consume']:>12,.0f} msgs/s", flush=True)
        results["raw consume+produce"] = await raw_consume_produce(bootstrap, topic,
                                                                   args.messages)
        print(f"raw consume+produce  {results['raw consume+produce']:>12,.0f} msgs/s",
              flush=True)
        confluent = confluent_consume(bootstrap, topic, args.messages, args.partitions)
        if confluent is not None:
            results["confluent-kafka consume"] = confluent
            print(f"confluent-kafka consume {confluent:>9,.0f} msgs/s", flush=True)
        else:
            print("confluent-kafka      skipped: install the bench extra "
                  "(pip install -e '.[bench]')", flush=True)
        rss = {}
        for name, flow in (("big_orders", big_orders), ("stateless", stateless)):
            for fetcher in args.fetchers:
                label = sabot_label(name, fetcher, args.fetchers)
                rate, samples = await run_sabot(bootstrap, topic, args.messages, flow, name,
                                                fetcher)
                results[label] = rate
                rss[label] = describe_rss(samples)
                print(f"{label:<21}{rate:>12,.0f} msgs/s   ({rss[label]})", flush=True)
                print(f"{'':<21}peak RSS up to each tenth of the messages: "
                      f"{rss_by_tenth(samples)}", flush=True)
        for name in args.peers:
            peer_count = min(args.peer_messages or PEER_MESSAGES.get(name, args.messages),
                             args.messages)
            rate = run_peer(name, bootstrap, topic, peer_count)
            if rate is not None:
                results[name] = rate
                share = "all" if peer_count == args.messages else "first"
                print(f"{name:<21}{rate:>12,.0f} msgs/s   ({share} {peer_count:,} messages)",
                      flush=True)
    finally:
        broker.stop()

    raw, raw_cp = results["raw consume"], results["raw consume+produce"]
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, kernels: "
          f"{'compiled' if ext.USING_EXTENSIONS else 'pure-Python twins'}")
    for flow in ("big_orders", "stateless"):
        for fetcher in args.fetchers:
            name = sabot_label(flow, fetcher, args.fetchers)
            print(f"{name:<21} / raw consume = {results[name] / raw:.2f}   "
                  f"/ raw consume+produce = {results[name] / raw_cp:.2f}")
        if len(args.fetchers) == 2:
            arrow, aiokafka = (results[sabot_label(flow, f, args.fetchers)]
                               for f in ("arrow", "aiokafka"))
            print(f"sabot {flow} arrow / aiokafka fetcher = {arrow / aiokafka:.2f}")
    peers = [results[name] for name in args.peers if name in results]
    stateless_rate = results[sabot_label("stateless", args.fetchers[0], args.fetchers)]
    if peers:
        fastest = max(peers)
        for name in args.peers:
            if name in results:
                print(f"sabot stateless / {name} = {stateless_rate / results[name]:.1f}")
        print(f"sabot stateless / the faster peer = {stateless_rate / fastest:.1f}")
    targets = [("sabot stateless / raw consume+produce", stateless_rate / raw_cp, 0.6)]
    if peers:
        targets.append(("sabot stateless / the faster peer", stateless_rate / fastest, 10))
    for name, ratio, target in targets:
        verdict = "met" if ratio >= target else "missed"
        print(f"target: {name} at least {target:g}: {verdict} ({ratio:.2f})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process over the whole run: {peak:.0f} MiB")


def sabot_label(flow: str, fetcher: str, fetchers: list[str]) -> str:
    """Name a Sabot run; the fetcher is named only when several are compared."""
    return f"sabot {flow}" if len(fetchers) == 1 else f"sabot {flow} ({fetcher})"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--peer-messages", type=int, default=None,
                        help="messages each peer framework processes (default: Faust "
                             "the first 200,000, Quix Streams all of them)")
    parser.add_argument("--peers", nargs="*", default=["faust", "quix"],
                        choices=sorted(PEERS), help="peer frameworks to run (default both)")
    parser.add_argument("--fetchers", nargs="+", default=["arrow", "aiokafka"],
                        choices=["arrow", "aiokafka"],
                        help="Sabot's fetcher setting for the Sabot runs; each runs in turn "
                             "(default both, arrow first)")
    arguments = parser.parse_args()
    loop = new_event_loop()
    try:
        loop.run_until_complete(main(arguments))
    finally:
        loop.close()
