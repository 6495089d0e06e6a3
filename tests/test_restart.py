"""`sabot worker` as a user runs it: restarts, crashes, failing dataflows."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import orjson
import pytest

from tests.kafka_helpers import committed_offsets, create_topic, produce, read_topic

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent

APP_SOURCE = textwrap.dedent('''
    import os
    import time

    import pyarrow.compute as pc

    from sabot import Sabot

    app = Sabot(os.environ["TEST_APP_ID"], session_timeout_ms=6000, progress_interval=1,
                max_records=int(os.environ.get("TEST_MAX_RECORDS", "20000")))
    PAUSE = float(os.environ.get("TEST_PAUSE", "0"))
    FAIL_ON = int(os.environ.get("TEST_FAIL_ON", "-1"))


    def pause(batch):
        time.sleep(PAUSE)
        return batch


    def explode(batch):
        if FAIL_ON in batch.column("id").to_pylist():
            raise ZeroDivisionError("order %d cannot be processed" % FAIL_ON)
        return batch


    @app.dataflow(os.environ["TEST_SOURCE"], sink=os.environ["TEST_SINK"])
    def big_orders(stream):
        return (stream
                .map(pause)
                .map(explode)
                .filter(lambda batch: pc.greater(batch["amount"], 50))
                .select("id", "amount"))
''')

TOTAL = 20_000
PARTITIONS = 4


@pytest.fixture
def app_dir(tmp_path):
    (tmp_path / "orders_app.py").write_text(APP_SOURCE)
    return tmp_path


def start_worker(app_dir: Path, broker: str, env: dict[str, str]) -> subprocess.Popen:
    full_env = dict(os.environ, SABOT_BROKER=f"kafka://{broker}",
                    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    **env)
    return subprocess.Popen(
        [sys.executable, "-m", "sabot", "worker", "-A", "orders_app", "--loglevel", "info"],
        cwd=app_dir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


async def wait_committed(broker, group, topic, predicate, timeout=60.0, worker=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker is not None and worker.poll() is not None:
            output = worker.stdout.read().decode(errors="replace")
            raise AssertionError(f"the worker exited with status {worker.returncode}:\n"
                                 f"{output[-3000:]}")
        offsets = await committed_offsets(broker, group, topic, PARTITIONS)
        if predicate(offsets):
            return offsets
        await asyncio.sleep(0.2)
    raise AssertionError(f"committed offsets never matched; last {offsets}")


def stop(worker: subprocess.Popen, signum=signal.SIGTERM, timeout=30.0) -> tuple[int, str]:
    worker.send_signal(signum)
    output, _ = worker.communicate(timeout=timeout)
    return worker.returncode, output.decode(errors="replace")


async def prepare(broker, topic):
    await create_topic(broker, topic, PARTITIONS)
    messages = [(b"c%d" % (i % 13), orjson.dumps({"id": i, "amount": i % 100}))
                for i in range(TOTAL)]
    return await produce(broker, topic, messages)


EXPECTED = sorted(i for i in range(TOTAL) if i % 100 > 50)


async def finish_with_second_worker(app_dir, broker, env, group, topic, ends) -> list[int]:
    """Run a second worker until every record is committed, stop it with SIGTERM,
    check it exited 0, and return the order ids in the sink topic."""
    second = start_worker(app_dir, broker, {**env, "TEST_PAUSE": "0"})
    try:
        await wait_committed(broker, group, topic,
                             lambda o: all(o[p] >= ends.get(p, 0) for p in range(PARTITIONS)),
                             worker=second)
    finally:
        status, output = stop(second)
    assert status == 0, output

    records = await read_topic(broker, env["TEST_SINK"], len(EXPECTED))
    return [orjson.loads(r.value)["id"] for r in records]


async def test_sigterm_restart_neither_loses_nor_repeats(broker, app_dir, topic, unique_name):
    ends = await prepare(broker, topic)
    sink = f"{topic}-out"
    env = {"TEST_APP_ID": unique_name, "TEST_SOURCE": topic, "TEST_SINK": sink,
           "TEST_MAX_RECORDS": "400", "TEST_PAUSE": "0.03"}

    first = start_worker(app_dir, broker, env)
    try:
        partial = await wait_committed(broker, unique_name, topic,
                                       lambda o: sum(o.values()) > 0, worker=first)
    finally:
        status, output = stop(first)
    assert status == 0, output
    assert "worker stopped" in output
    assert sum(partial.values()) < TOTAL, "the first worker finished before SIGTERM"

    ids = await finish_with_second_worker(app_dir, broker, env, unique_name, topic, ends)
    assert len(ids) == len(set(ids)), "some orders were sent twice"
    assert sorted(ids) == EXPECTED


async def test_sigkill_restart_loses_nothing(broker, app_dir, topic, unique_name):
    ends = await prepare(broker, topic)
    sink = f"{topic}-out"
    env = {"TEST_APP_ID": unique_name, "TEST_SOURCE": topic, "TEST_SINK": sink,
           "TEST_MAX_RECORDS": "400", "TEST_PAUSE": "0.03"}

    first = start_worker(app_dir, broker, env)
    try:
        await wait_committed(broker, unique_name, topic, lambda o: sum(o.values()) > 2000,
                             worker=first)
    finally:
        first.kill()
        first.communicate(timeout=30)
    at_kill = await committed_offsets(broker, unique_name, topic, PARTITIONS)
    assert sum(at_kill.values()) < TOTAL, "the first worker finished before SIGKILL"

    ids = await finish_with_second_worker(app_dir, broker, env, unique_name, topic, ends)
    assert sorted(set(ids)) == EXPECTED
    # Only the uncommitted tail at the time of the kill may be delivered twice.
    tail = TOTAL - sum(at_kill.values())
    assert len(ids) - len(set(ids)) <= tail


async def test_failing_dataflow_stops_worker_uncommitted(broker, app_dir, topic, unique_name):
    await prepare(broker, topic)
    sink = f"{topic}-out"
    env = {"TEST_APP_ID": unique_name, "TEST_SOURCE": topic, "TEST_SINK": sink,
           "TEST_FAIL_ON": "12345"}
    worker = start_worker(app_dir, broker, env)
    output, _ = worker.communicate(timeout=60)
    text = output.decode(errors="replace")
    assert worker.returncode == 1, text
    assert "dataflow 'big_orders' raised ZeroDivisionError" in text
    assert "order 12345 cannot be processed" in text
    assert "Traceback" in text

    # The partition holding order 12345 must not be committed past it.
    records = await read_topic(broker, topic, TOTAL)
    failed = next(r for r in records if orjson.loads(r.value)["id"] == 12345)
    offsets = await committed_offsets(broker, unique_name, topic, PARTITIONS)
    assert offsets[failed.partition] <= failed.offset
