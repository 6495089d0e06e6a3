"""``import sabot`` loads nothing heavy and starts nothing; each part loads on first use.

Each check runs in a fresh interpreter, because this test session has
imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAVY = ("duckdb", "aiokafka", "cloudpickle", "sabot.kafka.broker")

PROBE = """
import json, os, sys, threading

def children():
    pids = []
    for thread in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{thread}/children") as file:
            pids += file.read().split()
    return pids

def report(**extra):
    print(json.dumps({
        "loaded": [name for name in HEAVY if name in sys.modules],
        "python_threads": threading.active_count(),
        "children": children(),
        **extra,
    }))
""".replace("HEAVY", repr(HEAVY))


def run_probe(code: str) -> dict:
    script = PROBE + textwrap.dedent(code)
    completed = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_import_sabot_loads_nothing_heavy():
    state = run_probe("""
        import sabot
        report(pyarrow="pyarrow" in sys.modules)
    """)
    assert state["loaded"] == []
    assert state["pyarrow"] is False
    assert state["python_threads"] == 1
    assert state["children"] == []


def test_creating_coordinator_starts_nothing():
    state = run_probe("""
        from sabot import UnifiedCoordinator
        coordinator = UnifiedCoordinator(num_local_agents=2)
        report()
    """)
    assert "duckdb" not in state["loaded"]
    assert "aiokafka" not in state["loaded"]
    assert state["children"] == []


def test_each_part_loads_on_first_use():
    state = run_probe("""
        import asyncio
        import pyarrow as pa
        from sabot import Stream, UnifiedCoordinator

        async def main():
            async with UnifiedCoordinator(num_local_agents=1) as coordinator:
                small = await coordinator.execute(Stream.from_table(pa.table({"n": [1, 2]})))
                after_start = [name for name in ("duckdb", "aiokafka") if name in sys.modules]
                await coordinator.execute_sql("SELECT 1 AS one")
            return small.num_rows, after_start

        rows, after_start = asyncio.run(main())
        report(rows=rows, after_start=after_start)
    """)
    assert state["rows"] == 2
    assert state["after_start"] == []
    assert "duckdb" in state["loaded"]
    assert "aiokafka" not in state["loaded"]
    assert state["children"] == []
