"""Windowed aggregation throughput against the stateless pipeline, one run.

One embedded broker and one topic of JSON orders keyed by user (10,000
users, one order every 10 ms of event time, so 1,000,000 orders span
10,000 s). Two Sabot apps read the whole topic, each with its own group:

  stateless   filter amount > 50, add a computed column, JSON out
              (the ``stateless`` pipeline of benchmarks/throughput.py)
  windowed    key_by user, tumbling 10-minute windows on ``ts``,
              count and sum of amount; changelog, markers and JSON out

Rates are messages consumed per second, from the first non-empty fetch to
the last commit. The windowed run's output is checked against DuckDB (the
count of (user, window) rows of the windows closed by the end).

    python benchmarks/windows.py --messages 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import FETCH, orders_table, prepare_topic  # noqa: E402

from sabot import Sabot, ext, tumbling  # noqa: E402
from sabot.agents.loop import new_event_loop  # noqa: E402
from sabot.kafka.broker import EmbeddedBroker  # noqa: E402

WINDOW_MS = 600_000


def stateless(stream):
    return (stream
            .filter(lambda b: pc.greater(b["amount"], 50))
            .with_columns(total=lambda b: pc.multiply(b["amount"], b["quantity"])))


def windowed(stream):
    return (stream
            .key_by("user")
            .window(tumbling(minutes=10), time="ts")
            .agg(orders=("id", "count"), amount=("amount", "sum")))


async def run_app(bootstrap: str, topic: str, count: int, flow, name: str):
    """Run one dataflow over the topic; return its rate and its stats."""
    app = Sabot(f"bench-{name}-{uuid.uuid4().hex[:6]}", broker=f"kafka://{bootstrap}",
                session_timeout_ms=6000, progress_interval=0, **FETCH)
    app.dataflow(topic, sink=f"{topic}-{name}-out", name=name)(flow)
    await app.start()
    try:
        while app.stats.consumed < count:
            app.worker.raise_failure()
            await asyncio.sleep(0.05)
        stats = app.stats
        rate = stats.consumed / (stats.last_commit - stats.first_fetch)
        changelog = app.worker.state.changelog_records
    finally:
        await app.stop()
    return rate, stats, changelog


def expected_window_rows(count: int, partitions: int) -> int:
    """Rows the windowed run must emit: (user, window) pairs of closed windows.

    With no allowed lateness, a window closes once its partition has seen
    an event at or past its end. Times rise with the order id, so each
    partition's last window stays open.
    """
    table = orders_table(count)
    keys = table.column("user").combine_chunks().cast(pa.binary())
    parts = pa.array(np.asarray(ext.partitions_for_keys(keys, partitions), dtype=np.int64))
    con = duckdb.connect()
    con.register("orders", table.append_column("part", parts))
    return con.sql(f"""
        WITH last AS (SELECT part, max(ts) AS final FROM orders GROUP BY part)
        SELECT count(*) FROM (
            SELECT DISTINCT o."user", o.ts // {WINDOW_MS} AS w, l.final
            FROM orders o JOIN last l USING (part))
        WHERE (w + 1) * {WINDOW_MS} <= final""").fetchall()[0][0]


async def main(args) -> None:
    broker = EmbeddedBroker().start()
    bootstrap = broker.bootstrap
    topic = f"bench-windows-{uuid.uuid4().hex[:6]}"
    try:
        started = time.monotonic()
        await prepare_topic(bootstrap, topic, args.messages, args.partitions)
        print(f"prepared {args.messages:,} JSON orders (10,000 users) in {args.partitions} "
              f"partitions in {time.monotonic() - started:.1f} s", flush=True)
        rates = {}
        for name, flow in (("stateless", stateless), ("windowed", windowed)):
            rate, stats, changelog = await run_app(bootstrap, topic, args.messages, flow, name)
            rates[name] = rate
            print(f"sabot {name:<10}{rate:>12,.0f} msgs/s   produced {stats.produced:,} rows, "
                  f"{changelog:,} changelog records", flush=True)
            if name == "windowed":
                expected = expected_window_rows(args.messages, args.partitions)
                verdict = "as expected" if stats.produced == expected else \
                    f"EXPECTED {expected:,}"
                print(f"windowed output: {stats.produced:,} (user, window) rows, {verdict}")
    finally:
        broker.stop()

    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, kernels: "
          f"{'compiled' if ext.USING_EXTENSIONS else 'pure-Python twins'}")
    ratio = rates["windowed"] / rates["stateless"]
    print(f"windowed / stateless = {ratio:.2f} (target: at least 0.50)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=8)
    arguments = parser.parse_args()
    loop = new_event_loop()
    try:
        loop.run_until_complete(main(arguments))
    finally:
        loop.close()
