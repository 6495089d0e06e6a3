"""Profile the stateless data path: JSON in, filter, select, JSON out.

Starts the embedded broker, loads ``--messages`` JSON orders into a
4-partition topic, then runs a worker in this process with one dataflow
(``amount > 50``, select ``id`` and ``amount``) until it has consumed every
message. The worker phase alone is timed, and profiled when ``--profiler``
is given:

    .venv/bin/python benchmarks/profile_stateless.py --messages 200000
    .venv/bin/python benchmarks/profile_stateless.py --profiler pyinstrument
    .venv/bin/py-spy record -o profile.svg -- .venv/bin/python \
        benchmarks/profile_stateless.py

Prints the throughput and, with ``--breakdown``, the time spent in each
step of a batch (build the batch, operators, encode, partition and send,
wait for acks and commit), measured by wrapping those functions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sabot import Sabot, ext  # noqa: E402
from sabot.agents.sink import TopicSink  # noqa: E402
from sabot.codecs import get_codec  # noqa: E402
from sabot.kafka.admin import ensure_topics  # noqa: E402
from sabot.kafka.broker import EmbeddedBroker  # noqa: E402

SOURCE = "orders"
SINK = "big-orders"
PARTITIONS = 4


def orders_table(count: int, seed: int = 7) -> pa.Table:
    """Return ``count`` orders shaped like a web shop's order events."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-01-01T00:00:00", "s")
    return pa.table({
        "id": np.arange(count, dtype=np.int64),
        "customer": pa.array([f"customer-{i}" for i in rng.integers(0, 5000, count)]),
        "amount": np.round(rng.gamma(2.0, 30.0, count), 2),
        "currency": pa.array(["EUR"] * count),
        "items": rng.integers(1, 8, count),
        "created": (start + rng.integers(0, 86_400 * 30, count)).astype("datetime64[s]"),
    })


async def load(bootstrap: str, table: pa.Table) -> None:
    from aiokafka import AIOKafkaProducer

    await ensure_topics(bootstrap, {SOURCE: PARTITIONS, SINK: PARTITIONS})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=20,
                                max_batch_size=1 << 20)
    await producer.start()
    try:
        sink = TopicSink(producer, SOURCE, get_codec("json"), PARTITIONS)
        for batch in table.to_batches(max_chunksize=20_000):
            futures = await sink.send(batch)
            await asyncio.gather(*futures)
    finally:
        await producer.stop()


class StepTimer:
    """Adds up the wall time of wrapped functions, by name."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)
        totals = self.totals

        if asyncio.iscoroutinefunction(original):
            async def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    totals[name] += time.perf_counter() - started
        else:
            def timed(*args, **kwargs):
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    totals[name] += time.perf_counter() - started
        setattr(owner, attribute, timed)


def install_breakdown() -> StepTimer:
    import sabot.agents.records as records
    import sabot.agents.runtime as runtime
    import sabot.agents.sink as sink
    import sabot.codecs.json as json_codec
    import sabot.stream.core as core

    timer = StepTimer()
    timer.wrap(records.ext, "record_columns", "record_columns")
    timer.wrap(runtime, "build_batch", "build_batch (incl. record_columns, decode)")
    timer.wrap(json_codec.JsonCodec, "decode", "json decode")
    timer.wrap(json_codec.JsonCodec, "encode", "json encode")
    timer.wrap(core.Pipeline, "process", "operators")
    timer.wrap(sink.TopicSink, "send", "sink.send (incl. encode, partition, send_batch)")
    timer.wrap(runtime.Worker, "_commit", "commit")
    timer.wrap(runtime.Worker, "_process", "whole fetch (_process)")
    return timer


async def run_worker(bootstrap: str, expected: int, profiler: str | None,
                     timer: StepTimer | None) -> tuple[float, int]:
    app = Sabot(f"profile-{os.getpid()}", broker=f"kafka://{bootstrap}",
                session_timeout_ms=6000, progress_interval=0, topic_partitions=PARTITIONS)

    @app.dataflow(SOURCE, sink=SINK)
    def big_orders(stream):
        return (stream
                .filter(lambda b: pc.greater(b["amount"], 50))
                .select("id", "amount"))

    session = None
    await app.start()
    try:
        await app.worker.wait_assigned()
        if profiler == "pyinstrument":
            from pyinstrument import Profiler

            session = Profiler(interval=0.0005, async_mode="disabled")
            session.start()
        started = time.perf_counter()
        while app.stats.consumed < expected:
            app.worker.raise_failure()
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        produced = app.stats.produced
    finally:
        if session is not None:
            session.stop()
        await app.stop()
    if session is not None:
        show_all = os.environ.get("PROFILE_SHOW_ALL") == "1"
        print(session.output_text(unicode=False, color=False, show_all=show_all))
    return elapsed, produced


async def main_async(args) -> None:
    log_path = Path(tempfile.mkdtemp(prefix="sabot-profile-")) / "broker.log"
    broker = EmbeddedBroker(log_path=log_path)
    broker.start()
    try:
        table = orders_table(args.messages)
        started = time.perf_counter()
        await load(broker.bootstrap, table)
        print(f"loaded {args.messages:,} orders in {time.perf_counter() - started:.1f} s")
        timer = install_breakdown() if args.breakdown else None
        elapsed, produced = await run_worker(broker.bootstrap, args.messages, args.profiler,
                                             timer)
    finally:
        broker.stop()
    kernels = "compiled" if ext.USING_EXTENSIONS else "pure-Python twins"
    print(f"kernels: {kernels}")
    print(f"consumed {args.messages:,}, produced {produced:,} in {elapsed:.2f} s: "
          f"{args.messages / elapsed:,.0f} msgs/s")
    if timer is not None:
        whole = timer.totals.get("whole fetch (_process)", 0.0) or 1e-9
        print(f"{'step':<50} {'seconds':>8} {'of fetch':>9}")
        for name, seconds in sorted(timer.totals.items(), key=lambda item: -item[1]):
            print(f"{name:<50} {seconds:8.2f} {seconds / whole:9.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--profiler", choices=["pyinstrument"], default=None)
    parser.add_argument("--breakdown", action="store_true",
                        help="time each step of a batch by wrapping its function")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
