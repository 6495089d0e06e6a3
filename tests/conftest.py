"""Shared fixtures: a real Kafka-compatible broker, per-test topics and groups.

The session starts the embedded Tansu broker on a free loopback port, or
uses ``SABOT_TEST_BROKER=host:port`` when set, and stops what it started.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid

import pytest

from sabot import ext


def pytest_report_header(config):
    kernels = "compiled" if ext.USING_EXTENSIONS else "pure-Python twins"
    return [f"sabot kernels: {kernels}",
            f"broker: {os.environ.get('SABOT_TEST_BROKER') or 'embedded Tansu'}"]


def pytest_sessionstart(session):
    # The compiled kernels must be what runs unless the twins were asked for:
    # a silently failed build would otherwise pass every test on the twins.
    if not os.environ.get("SABOT_NO_EXTENSIONS") and not os.environ.get("SABOT_ALLOW_TWINS"):
        assert ext.USING_EXTENSIONS, (
            "the Cython kernels did not import; rebuild with 'pip install -e .' or set "
            "SABOT_NO_EXTENSIONS=1 to test the pure-Python twins"
        )


@pytest.fixture(scope="session")
def broker():
    """``host:port`` of a running broker for the whole test session."""
    external = os.environ.get("SABOT_TEST_BROKER")
    if external:
        yield external
        return
    from sabot.kafka.broker import EmbeddedBroker

    log_path = os.path.join(tempfile.mkdtemp(prefix="sabot-broker-"), "broker.log")
    instance = EmbeddedBroker(log_path=log_path)
    try:
        instance.start()
    except Exception:
        print(f"broker log ({log_path}):\n{instance.log_tail()}")
        raise
    yield instance.bootstrap
    instance.stop()


@pytest.fixture
def broker_url(broker):
    return f"kafka://{broker}"


@pytest.fixture
def unique_name(request):
    """A name unique to this test: the test's name plus a short random suffix."""
    base = re.sub(r"[^a-zA-Z0-9]+", "-", request.node.name).strip("-")[:40]
    return f"{base}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def topic(unique_name):
    return f"t-{unique_name}"


@pytest.fixture
def group(unique_name):
    return f"g-{unique_name}"
