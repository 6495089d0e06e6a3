"""``sabot worker --agents N`` against the test broker, run as a user runs it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import orjson
import pytest

from tests.kafka_helpers import create_topic, produce, read_topic

pytestmark = pytest.mark.broker

APP_MODULE = """
import os

import pyarrow as pa

from sabot import Sabot

# Crash at import (exit status 3) for the first CRASHES starts. Each start
# appends one byte; with O_APPEND the write and the offset after it are one
# atomic step, so two workers starting together never take the same slot.
counter = os.environ.get("SUP_CRASH_COUNTER")
if counter:
    with open(counter, "ab", buffering=0) as file:
        file.write(b"x")
        slot = file.tell()
    if slot <= int(os.environ["SUP_CRASHES"]):
        os._exit(3)

app = Sabot(os.environ["SUP_GROUP"], session_timeout_ms=6000, progress_interval=0,
            topic_partitions=4)


@app.dataflow(os.environ["SUP_TOPIC"], sink=os.environ["SUP_SINK"])
def tag_with_pid(stream):
    return stream.with_columns(
        pid=lambda b: pa.array([os.getpid()] * b.num_rows, pa.int64()))
"""

LOG_LINE = re.compile(r"\[(\d+)\] (\S+): (.*)")


class Supervised:
    """A ``sabot worker --agents N`` subprocess whose log lines are collected."""

    def __init__(self, cwd, args: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sabot", "worker", *args], cwd=cwd,
            env={**os.environ, **env}, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.seen_children: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def children(self) -> set[int]:
        pids: set[int] = set()
        try:
            for thread in os.listdir(f"/proc/{self.process.pid}/task"):
                with open(f"/proc/{self.process.pid}/task/{thread}/children") as file:
                    pids.update(int(pid) for pid in file.read().split())
        except FileNotFoundError:
            return set()
        self.seen_children |= pids
        return pids

    def assignments(self) -> dict[int, str]:
        """The latest 'partitions assigned' of each process, by pid."""
        latest: dict[int, str] = {}
        for line in list(self.lines):
            match = LOG_LINE.search(line)
            if match and match.group(3).startswith("partitions assigned: "):
                latest[int(match.group(1))] = match.group(3).split(": ", 1)[1]
        return latest

    def wait_until(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(f"supervisor exited with {self.process.returncode} "
                                     f"while waiting for {what}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n{self.log()}")
            time.sleep(0.1)

    def wait_group_settled(self, topic: str, partitions: int) -> set[int]:
        """Wait until each of two live children owns partitions and together they own all."""
        def settled() -> bool:
            children = self.children()
            latest = self.assignments()
            if len(children) != 2 or not all(latest.get(pid, "none") != "none"
                                             for pid in children):
                return False
            owned = {part for pid in children for part in latest[pid].split(", ")}
            return owned == {f"{topic}[{p}]" for p in range(partitions)}

        self.wait_until(settled, "both workers to own partitions")
        return self.children()

    def stop(self, timeout: float = 60.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        returncode = self.process.wait(timeout)
        self._reader.join(10)
        return returncode

    def kill(self) -> None:
        """Kill the supervisor if it still runs, and close its stderr pipe."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(10)
        self.process.stderr.close()

    def log(self) -> str:
        return "\n".join(self.lines[-60:])


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def write_app(folder, name: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(APP_MODULE))


def pids_in(records) -> set[int]:
    return {orjson.loads(record.value)["pid"] for record in records}


async def test_two_workers_share_group_and_restart(broker, broker_url, topic, group, tmp_path):
    sink = f"{topic}-out"
    await create_topic(broker, topic, 4)
    await create_topic(broker, sink, 4)
    write_app(tmp_path, "supervised_app")
    supervised = Supervised(tmp_path, ["-A", "supervised_app", "--agents", "2",
                                       "--broker", broker_url],
                            {"SUP_TOPIC": topic, "SUP_SINK": sink, "SUP_GROUP": group})
    try:
        first = supervised.wait_group_settled(topic, 4)

        await produce(broker, topic, [(b"k%d" % i, orjson.dumps({"id": i}))
                                      for i in range(400)])
        records = await read_topic(broker, sink, 400)
        assert {orjson.loads(r.value)["id"] for r in records} == set(range(400))
        assert pids_in(records) == first

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        supervised.wait_until(lambda: len(supervised.children()) == 2
                              and victim not in supervised.children(), "a replacement worker")
        assert any(f"(pid {victim}) was killed by signal SIGKILL" in line
                   and "restarting it in" in line for line in supervised.lines)
        (replacement,) = supervised.children() - first
        second = supervised.wait_group_settled(topic, 4)
        assert replacement in second

        await produce(broker, topic, [(b"k%d" % i, orjson.dumps({"id": i}))
                                      for i in range(400, 600)])
        records = await read_topic(broker, sink, 600)
        assert {orjson.loads(r.value)["id"] for r in records} == set(range(600))
        later = [r for r in records if orjson.loads(r.value)["id"] >= 400]
        assert replacement in pids_in(later)

        children = supervised.seen_children
        assert supervised.stop() == 0, supervised.log()
    finally:
        supervised.kill()
    assert not any(process_alive(pid) for pid in children)
    assert any("all 2 workers stopped" in line for line in supervised.lines)


async def test_crashing_worker_restarts_with_backoff(broker, broker_url, topic, group,
                                                     tmp_path):
    await create_topic(broker, topic, 4)
    write_app(tmp_path, "crashing_app")
    supervised = Supervised(
        tmp_path, ["-A", "crashing_app", "--agents", "2", "--broker", broker_url],
        {"SUP_TOPIC": topic, "SUP_SINK": f"{topic}-out", "SUP_GROUP": group,
         "SUP_CRASH_COUNTER": str(tmp_path / "crashes"), "SUP_CRASHES": "3"})
    try:
        supervised.wait_group_settled(topic, 4)
        crashes = [line for line in supervised.lines if "exited with status 3" in line]
        assert len(crashes) == 3
        assert sum("restarting it in 0.5 s (failure 1 in a row)" in line
                   for line in crashes) == 2
        assert sum("restarting it in 1.0 s (failure 2 in a row)" in line
                   for line in crashes) == 1
        assert supervised.stop() == 0, supervised.log()
    finally:
        supervised.kill()


async def test_workers_stop_when_supervisor_killed(broker, broker_url, topic, group,
                                                   tmp_path):
    await create_topic(broker, topic, 4)
    write_app(tmp_path, "orphan_app")
    supervised = Supervised(tmp_path, ["-A", "orphan_app", "--agents", "2",
                                       "--broker", broker_url],
                            {"SUP_TOPIC": topic, "SUP_SINK": f"{topic}-out",
                             "SUP_GROUP": group})
    try:
        workers = supervised.wait_group_settled(topic, 4)
        supervised.process.kill()
        supervised.process.wait(10)
        # The kernel sends each worker SIGTERM, and each stops as it does
        # for a SIGTERM from the supervisor.
        deadline = time.monotonic() + 60
        while any(process_alive(pid) for pid in workers):
            assert time.monotonic() < deadline, supervised.log()
            time.sleep(0.1)
    finally:
        supervised.kill()
    for pid in workers:
        assert any(f"[{pid}] sabot.agents.loop: received SIGTERM" in line
                   for line in supervised.lines), supervised.log()


def test_bad_app_path_is_not_restarted(tmp_path):
    supervised = Supervised(tmp_path, ["-A", "no_such_module_here", "--agents", "2",
                                       "--broker", "kafka://127.0.0.1:9"], {})
    try:
        returncode = supervised.process.wait(60)
        supervised._reader.join(10)
    finally:
        supervised.kill()
    assert returncode == 2, supervised.log()
    starts = [line for line in supervised.lines
              if "sabot.agents.supervisor" in line and line.endswith(" started")]
    assert len(starts) == 2
    assert any("Not restarting" in line for line in supervised.lines)
    assert not any("restarting it in" in line for line in supervised.lines)
