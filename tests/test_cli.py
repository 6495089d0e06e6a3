"""The `sabot` command: app loading errors, `sabot broker`, `--help`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sabot.app.loader import load_app
from sabot.errors import ConfigError
from sabot.kafka.broker import wait_for_broker_sync
from tests.kafka_helpers import create_topic, produce

ROOT = Path(__file__).resolve().parent.parent


def run_sabot(*args: str, cwd: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sabot", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def modules(tmp_path, monkeypatch):
    (tmp_path / "good_app.py").write_text(
        "from sabot import Sabot\n"
        "app = Sabot('good', broker='kafka://127.0.0.1:1')\n"
        "other = Sabot('other', broker='kafka://127.0.0.1:1')\n"
        "def make():\n    return Sabot('made', broker='kafka://127.0.0.1:1')\n")
    (tmp_path / "single_app.py").write_text(
        "from sabot import Sabot\nmine = Sabot('mine', broker='kafka://127.0.0.1:1')\n")
    (tmp_path / "broken_app.py").write_text("import not_a_real_dependency_xyz\n")
    (tmp_path / "not_app.py").write_text("app = 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_app_forms(modules):
    assert load_app("good_app").id == "good"
    assert load_app("good_app:other").id == "other"
    assert load_app("good_app:make()").id == "made"
    assert load_app("single_app").id == "mine"
    assert load_app("good_app.py").id == "good"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module", "module 'no_such_module' not found"),
    ("broken_app", "failed to import: No module named 'not_a_real_dependency_xyz'"),
    ("good_app:missing", "has no attribute 'missing'"),
    ("not_app", "is a int, not a Sabot app"),
    (":app", "invalid app path"),
])
def test_load_app_errors(modules, spec, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_app(spec)


def test_worker_reports_missing_module(tmp_path):
    result = run_sabot("worker", "-A", "nowhere", cwd=tmp_path)
    assert result.returncode == 2
    assert "module 'nowhere' not found" in result.stderr


def test_worker_reports_import_failure_with_traceback(modules):
    result = run_sabot("worker", "-A", "broken_app", cwd=modules)
    assert result.returncode == 2
    assert "failed to import" in result.stderr
    assert "Traceback" in result.stderr


def test_worker_help_lists_options(tmp_path):
    result = run_sabot("worker", "--help", cwd=tmp_path)
    assert result.returncode == 0
    for option in ("--app", "--broker", "--loglevel", "--agents"):
        assert option in result.stdout


@pytest.mark.broker
def test_broker_command_starts_and_stops(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "sabot", "broker", "--port", "0"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"kafka://127\.0\.0\.1:(\d+)", line)
        assert match, line
        wait_for_broker_sync("127.0.0.1", int(match.group(1)), timeout=10)
    finally:
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        process.wait(timeout=20)
        process.stdout.close()
        process.stderr.close()
    assert process.returncode == 0
    assert time.monotonic() - started < 10


@pytest.mark.broker
def test_send_then_tail(broker, topic, tmp_path):
    lines = '{"id": "a", "amount": 70}\n\n{"id": "b", "amount": 10}\n{"id": "a", "amount": 3}\n'
    env = dict(os.environ, PYTHONPATH=str(ROOT), SABOT_BROKER=f"kafka://{broker}")
    sent = subprocess.run([sys.executable, "-m", "sabot", "send", topic, "--key-field", "id",
                           "--partitions", "2"],
                          input=lines, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert f"sent 3 messages to {topic}" in sent.stderr

    tailed = subprocess.run([sys.executable, "-m", "sabot", "tail", topic, "--count", "3",
                             "--idle-timeout", "10"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert tailed.returncode == 0, tailed.stderr
    rows = [line.split("\t") for line in tailed.stdout.splitlines()]
    assert len(rows) == 3
    assert sorted((key, value) for _, _, key, value in rows) == [
        ("a", '{"id": "a", "amount": 3}'),
        ("a", '{"id": "a", "amount": 70}'),
        ("b", '{"id": "b", "amount": 10}'),
    ]
    # Messages with one key share a partition, in the order they were sent.
    a_rows = [row for row in rows if row[2] == "a"]
    assert a_rows[0][0] == a_rows[1][0]
    assert int(a_rows[0][1]) < int(a_rows[1][1])


@pytest.mark.broker
async def test_tail_prints_headers(broker, topic):
    await create_topic(broker, topic, 1)
    await produce(broker, topic, [(b"k", b"v")],
                  headers=[("sabot.error", b"invalid JSON"), ("empty", None)])
    env = dict(os.environ, PYTHONPATH=str(ROOT), SABOT_BROKER=f"kafka://{broker}")
    tailed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "sabot", "tail", topic, "--count", "1",
                         "--headers"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert tailed.returncode == 0, tailed.stderr
    assert tailed.stdout.splitlines() == ["0\t0\tk\tv\tsabot.error=invalid JSON; empty="]


def test_send_rejects_line_without_key_field(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), SABOT_BROKER="kafka://127.0.0.1:1")
    result = subprocess.run([sys.executable, "-m", "sabot", "send", "t", "--key-field", "id"],
                            input="not json\n", cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert "line 1 is not valid JSON" in result.stderr
