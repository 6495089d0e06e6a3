"""Kafka sources and sinks for streams used without an app (scripts)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

logger = logging.getLogger(__name__)


class KafkaSource:
    """The source of ``Stream.from_kafka``: a consumer group on some topics.

    Running it builds a one-dataflow :class:`~sabot.Sabot` app whose id is
    the group, so it has the app's guarantees: offsets are committed after
    the sink acknowledges, and undecodable values go to ``{group}-dlq``.
    """

    def __init__(self, bootstrap: str, topics: str | list[str], group: str, codec: str,
                 settings: dict[str, Any]):
        self.bootstrap = bootstrap
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.group = group
        self.codec = codec
        self.settings = settings

    def _app(self, stream, sink, sink_codec=None):
        from sabot.app.base import Sabot
        from sabot.stream.core import Stream

        broker = self.bootstrap if "://" in self.bootstrap else f"kafka://{self.bootstrap}"
        app = Sabot(self.group, broker=broker, **self.settings)
        steps, key = stream._steps, stream.key

        @app.dataflow(self.topics, sink=sink, codec=self.codec, name=self.group,
                      sink_codec=sink_codec)
        def replay(_: Stream) -> Stream:
            return Stream(None, steps, key)

        return app

    async def run(self, stream, bootstrap: str, topic: str, codec: str | None,
                  idle_timeout: float | None) -> None:
        if bootstrap != self.bootstrap:
            raise ValueError(
                f"to_kafka() broker {bootstrap!r} differs from from_kafka()'s "
                f"{self.bootstrap!r}; both ends must use the same cluster"
            )
        app = self._app(stream, topic, codec)
        await _run_until_idle(app, idle_timeout)

    async def iterate(self, stream):
        queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        app = self._app(stream, queue.put)
        stop = asyncio.Event()
        task = asyncio.create_task(app.run(stop))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task},
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    yield getter.result()
                    continue
                getter.cancel()
                task.result()
                return
        finally:
            stop.set()
            await task


async def _run_until_idle(app, idle_timeout: float | None) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    if idle_timeout is None:
        await task
        return
    last_count, last_change = -1, time.monotonic()
    try:
        while not task.done():
            await asyncio.sleep(min(0.2, idle_timeout))
            stats = app.stats
            count = stats.consumed if stats else 0
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif time.monotonic() - last_change >= idle_timeout:
                logger.info("no record for %.1f s; stopping", idle_timeout)
                break
    finally:
        stop.set()
        await task
