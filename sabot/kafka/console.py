"""Send lines to a topic and print a topic's messages: `sabot send` and `sabot tail`."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterable
from typing import TextIO

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sabot.errors import CodecError, ConfigError
from sabot.kafka.admin import ensure_topics

logger = logging.getLogger(__name__)

#: Seconds ``tail_topic`` waits for a missing topic to be created.
TOPIC_WAIT = 10.0


def _key_of(line: bytes, key_field: str | None, number: int) -> bytes | None:
    if key_field is None:
        return None
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise CodecError(
            f"line {number} is not valid JSON ({exc}), so --key-field {key_field!r} "
            f"cannot be read from it; drop --key-field to send lines as they are"
        ) from None
    if not isinstance(value, dict) or key_field not in value:
        raise CodecError(f"line {number} has no field {key_field!r} to use as the key")
    key = value[key_field]
    return key.encode() if isinstance(key, str) else orjson.dumps(key)


async def send_lines(bootstrap: str, topic: str, lines: Iterable[bytes],
                     key_field: str | None = None, partitions: int = 8) -> int:
    """Send each non-empty line as one message; return how many were sent.

    Every line is read and its key found before anything is sent, so a bad
    line sends nothing.
    """
    messages = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip(b"\r\n")
        if line:
            messages.append((_key_of(line, key_field, number), line))

    await ensure_topics(bootstrap, {topic: partitions})
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, value=value, key=key)
                   for key, value in messages]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(messages)


async def tail_topic(bootstrap: str, topic: str, out: TextIO = sys.stdout,
                     from_beginning: bool = True, count: int | None = None,
                     idle_timeout: float | None = None, headers: bool = False) -> int:
    """Print messages of ``topic`` as ``partition offset key value`` lines.

    With ``headers``, each line ends with a fifth field: the headers as
    ``name=value`` pairs joined by ``; ``. Stops after ``count`` messages,
    after ``idle_timeout`` seconds without one, or when cancelled. Reads
    without a consumer group, so nothing is committed. Returns the number
    printed.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    printed = 0
    try:
        # A topic that a worker is about to create may appear a moment later.
        deadline = time.monotonic() + TOPIC_WAIT
        partitions = consumer.partitions_for_topic(topic)
        while not partitions and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            await consumer._client.force_metadata_update()  # noqa: SLF001
            partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise ConfigError(f"topic {topic!r} not found on {bootstrap} after waiting "
                             f"{TOPIC_WAIT:.0f} s; check the name or start the app first")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await consumer.seek_to_end(*tps)
        last_message = time.monotonic()
        while count is None or printed < count:
            fetched = await consumer.getmany(timeout_ms=200)
            if not fetched:
                if idle_timeout is not None and time.monotonic() - last_message >= idle_timeout:
                    break
                continue
            last_message = time.monotonic()
            for tp, records in sorted(fetched.items()):
                for record in records:
                    key = record.key.decode(errors="replace") if record.key is not None else "-"
                    value = record.value.decode(errors="replace") \
                        if record.value is not None else "-"
                    line = f"{tp.partition}\t{record.offset}\t{key}\t{value}"
                    if headers:
                        line += "\t" + "; ".join(
                            f"{name}={raw.decode(errors='replace') if raw is not None else ''}"
                            for name, raw in record.headers)
                    out.write(line + "\n")
                    printed += 1
                    if count is not None and printed >= count:
                        break
            out.flush()
    finally:
        await consumer.stop()
    return printed
