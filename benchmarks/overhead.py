"""Overhead of the agent pool (UnifiedCoordinator) against restarting agents per job.

    .venv/bin/python benchmarks/overhead.py            # about a minute on 2 cores
    .venv/bin/python benchmarks/overhead.py --quick    # fewer runs, no spawn rounds

Every figure is printed as a median and p99 over many runs, next to the
same figure for the restart-per-job way (start the agents, run one job,
stop them) measured in the same process. "fork" agents are forked from
the coordinator; "spawn" agents come from a new interpreter, which is
what starting agents as fresh processes costs.

Measured:

1. pool start-up to ready (``await start()``), for 2 and 4 agents;
2. per-job overhead: a job whose pipeline passes a 1-row batch through
   unchanged, on the pool, on the in-process fast path, and restart-per-job;
3. 100 small jobs back to back (1,000 flights each, filter and select),
   pooled against restart-per-job, as a ratio;
4. one large job (every flight, a computed column and a filter), pooled
   against ``collect()``, to show what the IPC costs on large inputs;
5. ``python -c "import sabot"`` against ``python -c "pass"``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sabot import Stream, UnifiedCoordinator  # noqa: E402
from sabot.agents.loop import new_event_loop  # noqa: E402

TARGETS_MS = {
    "start_2": 50.0,
    "pooled_job": 2.0,
    "fast_path_job": 0.2,
}
TARGET_RATIO_100 = 20.0


def passthrough(batch: pa.RecordBatch) -> pa.RecordBatch:
    return batch


def summary(samples_ns: list[int]) -> tuple[float, float]:
    """Return the median and the 99th percentile (nearest rank) in milliseconds."""
    ordered = sorted(samples_ns)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return statistics.median(ordered) / 1e6, p99 / 1e6


def row(label: str, samples_ns: list[int], note: str = "") -> tuple[float, float]:
    median, p99 = summary(samples_ns)
    print(f"| {label} | {len(samples_ns)} | {median:.3f} | {p99:.3f} | {note} |")
    return median, p99


def table_header(title: str) -> None:
    print(f"\n{title}\n")
    print("| measurement | runs | median ms | p99 ms | note |")
    print("| --- | ---: | ---: | ---: | --- |")


def verdict(value_ms: float, target_ms: float) -> str:
    if value_ms <= target_ms:
        return f"target < {target_ms:g} ms: met"
    return f"target < {target_ms:g} ms: missed by {value_ms - target_ms:.3f} ms " \
           f"({value_ms / target_ms:.1f}x)"


# -- 1. start-up ------------------------------------------------------------------------

async def time_start(agents: int, method: str) -> tuple[int, int]:
    """Return the ns to start a pool and to shut it down."""
    coordinator = UnifiedCoordinator(agents, small_job_rows=0, start_method=method)
    began = time.perf_counter_ns()
    await coordinator.start()
    ready = time.perf_counter_ns()
    await coordinator.shutdown()
    return ready - began, time.perf_counter_ns() - ready


def rss_mb() -> int:
    """Resident memory of this process in MB (Linux)."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20


async def bench_start(runs: int, spawn_runs: int) -> dict[str, float]:
    table_header(f"Pool start-up to ready, and shutdown (caller RSS {rss_mb()} MB "
                 f"unless stated)")
    results = {}

    cold, _ = await time_start(2, "fork")
    print(f"| first start in this process (imports cloudpickle and the agent code), "
          f"2 agents | 1 | {cold / 1e6:.3f} | {cold / 1e6:.3f} | |")
    for agents in (2, 4):
        starts, stops = [], []
        for _ in range(runs):
            start_ns, stop_ns = await time_start(agents, "fork")
            starts.append(start_ns)
            stops.append(stop_ns)
        note = verdict(summary(starts)[0], TARGETS_MS["start_2"]) if agents == 2 else ""
        results[f"start_{agents}"] = row(f"start, {agents} agents, fork", starts, note)[0]
        row(f"shutdown, {agents} agents, fork", stops)

    # A fork copies the caller's page tables, and each exit tears a copy
    # down, so both grow with the caller's memory in 4 KB pages. A 300 MB
    # NumPy array cost almost nothing in a trial run, because NumPy asks for
    # transparent huge pages on Linux.
    ballast = bytearray(300 * 2**20)
    starts, stops = [], []
    for _ in range(max(5, runs // 5)):
        start_ns, stop_ns = await time_start(2, "fork")
        starts.append(start_ns)
        stops.append(stop_ns)
    results["start_2_large"] = row(f"start, 2 agents, fork, caller RSS {rss_mb()} MB",
                                   starts)[0]
    row(f"shutdown, 2 agents, fork, caller RSS {rss_mb()} MB", stops)
    del ballast

    for agents in (2, 4):
        if not spawn_runs:
            break
        starts = [(await time_start(agents, "spawn"))[0] for _ in range(spawn_runs)]
        results[f"spawn_start_{agents}"] = row(f"start, {agents} agents, spawn", starts)[0]
    return results


# -- 2. per-job overhead ----------------------------------------------------------------

async def bench_job_overhead(runs: int, restart_runs: int, spawn_runs: int) -> dict:
    table_header("Per-job overhead: a pipeline that passes one row through unchanged")
    one_row = pa.table({"n": pa.array([1], pa.int64())})
    job = Stream.from_table(one_row).map(passthrough)
    results = {}

    in_process = []
    for _ in range(runs * 10):
        began = time.perf_counter_ns()
        job.collect()
        in_process.append(time.perf_counter_ns() - began)
    collect_ms = row("stream.collect() in this process, for reference", in_process)[0]

    async with UnifiedCoordinator(2) as coordinator:
        fast = []
        for _ in range(runs * 10):
            began = time.perf_counter_ns()
            await coordinator.execute(job)
            fast.append(time.perf_counter_ns() - began)
    results["fast_path_job"] = row("fast path (input below small_job_rows)", fast,
                                   verdict(summary(fast)[0], TARGETS_MS["fast_path_job"]))[0]
    print(f"| fast path minus collect() | | {results['fast_path_job'] - collect_ms:.3f} "
          f"| | the coordinator's own share |")

    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        for _ in range(50):  # warm-up: first jobs import and cache code paths
            await coordinator.execute(job)
        pooled = []
        for _ in range(runs):
            began = time.perf_counter_ns()
            await coordinator.execute(job)
            pooled.append(time.perf_counter_ns() - began)
    results["pooled_job"] = row("pooled, 2 agents (small_job_rows=0)", pooled,
                                verdict(summary(pooled)[0], TARGETS_MS["pooled_job"]))[0]

    for method, count in (("fork", restart_runs), ("spawn", spawn_runs)):
        if not count:
            continue
        samples = []
        for _ in range(count):
            began = time.perf_counter_ns()
            async with UnifiedCoordinator(2, small_job_rows=0, start_method=method) as c:
                await c.execute(job)
            samples.append(time.perf_counter_ns() - began)
        results[f"restart_{method}"] = row(f"restart-per-job, 2 agents, {method}", samples)[0]
    return results


# -- 3. 100 small jobs ----------------------------------------------------------------

def small_job(flights: pa.Table) -> Stream:
    return (Stream.from_table(flights)
            .filter(lambda b: pc.greater(b["dep_delay"], 60))
            .select("carrier", "flight", "origin", "dep_delay"))


async def hundred_jobs_pooled(stream: Stream, small_job_rows: int) -> int:
    async with UnifiedCoordinator(2, small_job_rows=small_job_rows) as coordinator:
        await coordinator.execute(stream)  # warm-up
        began = time.perf_counter_ns()
        for _ in range(100):
            await coordinator.execute(stream)
        return time.perf_counter_ns() - began


async def hundred_jobs_restarting(stream: Stream, method: str) -> int:
    began = time.perf_counter_ns()
    for _ in range(100):
        async with UnifiedCoordinator(2, small_job_rows=0, start_method=method) as c:
            await c.execute(stream)
    return time.perf_counter_ns() - began


async def bench_hundred_jobs(rounds: int, restart_rounds: int, spawn_rounds: int) -> dict:
    from sabot.datasets import load_flights

    stream = small_job(load_flights(limit=1_000))
    table_header(f"100 small jobs back to back (1,000 flights each: filter, select), "
                 f"2 agents, caller RSS {rss_mb()} MB")
    expected = stream.collect()
    async with UnifiedCoordinator(2, small_job_rows=0) as coordinator:
        assert (await coordinator.execute(stream)).equals(expected)

    pooled = [await hundred_jobs_pooled(stream, 0) for _ in range(rounds)]
    fast = [await hundred_jobs_pooled(stream, 10_000) for _ in range(rounds)]
    pooled_ms = row("pooled (small_job_rows=0)", pooled)[0]
    fast_ms = row("pooled coordinator, fast path (default small_job_rows)", fast)[0]
    results = {"pooled_100": pooled_ms, "fast_100": fast_ms}
    for method, count in (("fork", restart_rounds), ("spawn", spawn_rounds)):
        if not count:
            continue
        samples = [await hundred_jobs_restarting(stream, method) for _ in range(count)]
        median = row(f"restart-per-job, {method}", samples)[0]
        results[f"restart_100_{method}"] = median
    print()
    for method in ("fork", "spawn"):
        key = f"restart_100_{method}"
        if key in results:
            ratio = results[key] / pooled_ms
            met = "met" if ratio >= TARGET_RATIO_100 else \
                f"missed: {ratio / TARGET_RATIO_100:.2f} of the target"
            print(f"restart-per-job ({method}) / pooled = {ratio:.1f}x "
                  f"(target >= {TARGET_RATIO_100:g}x: {met}); "
                  f"fast path: {results[key] / fast_ms:.0f}x")
    return results


# -- 4. one large job ------------------------------------------------------------------

async def bench_large_job(runs: int) -> None:
    from sabot.datasets import load_flights

    flights = load_flights()
    stream = (Stream.from_table(flights)
              .with_columns(delay_2x=lambda b: pc.multiply(b["dep_delay"], 2))
              .filter(lambda b: pc.greater(b["dep_delay"], -100)))
    table_header(f"One large job: all {flights.num_rows:,} flights "
                 f"({flights.nbytes / 2**20:.0f} MB), with_columns and filter")
    local = []
    for _ in range(runs):
        began = time.perf_counter_ns()
        expected = stream.collect()
        local.append(time.perf_counter_ns() - began)
    row("stream.collect() in this process", local)
    async with UnifiedCoordinator(2) as coordinator:
        assert (await coordinator.execute(stream)).equals(expected)
        pooled = []
        for _ in range(runs):
            began = time.perf_counter_ns()
            await coordinator.execute(stream)
            pooled.append(time.perf_counter_ns() - began)
    row("pooled, 2 agents", pooled, "input and output cross a socketpair as Arrow IPC")


# -- 5. import time ---------------------------------------------------------------------

def bench_import(runs: int) -> None:
    table_header("Interpreter start with and without `import sabot`")
    for label, code in (("python -c 'pass'", "pass"), ("python -c 'import sabot'",
                                                        "import sabot")):
        samples = []
        for _ in range(runs):
            began = time.perf_counter_ns()
            subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
            samples.append(time.perf_counter_ns() - began)
        row(label, samples)


async def main(args: argparse.Namespace) -> None:
    quick = args.quick
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, pyarrow {pa.__version__}, event loop "
          f"{type(asyncio.get_running_loop()).__module__}")
    await bench_start(runs=20 if quick else 100, spawn_runs=0 if quick else 5)
    await bench_job_overhead(runs=500 if quick else 3_000, restart_runs=20 if quick else 100,
                             spawn_runs=0 if quick else 5)
    await bench_hundred_jobs(rounds=3 if quick else 10, restart_rounds=1 if quick else 3,
                             spawn_rounds=0 if quick else 1)
    await bench_large_job(runs=3 if quick else 10)
    bench_import(runs=10 if quick else 30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer runs and no spawn rounds, for a check in seconds")
    loop = new_event_loop()
    try:
        loop.run_until_complete(main(parser.parse_args()))
    finally:
        loop.close()
