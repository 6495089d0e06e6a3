"""The ``Sabot`` app: settings, the registry of dataflows, and its lifecycle."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sabot.app.dataflow import Dataflow, SinkTarget, make_dataflow
from sabot.app.settings import Settings
from sabot.errors import ConfigError
from sabot.kafka.urls import parse_broker_url, resolve_broker

logger = logging.getLogger(__name__)


class Sabot:
    """A stream processing app: a set of dataflows over Kafka topics.

    >>> app = Sabot("orders-app", broker="kafka://127.0.0.1:9092")
    >>> @app.dataflow("orders", sink="big-orders")
    ... def big_orders(stream):
    ...     return stream.select("id", "amount")
    >>> sorted(app.dataflows)
    ['big_orders']

    Registering connects to nothing; :meth:`start` (or ``sabot worker``)
    does. ``broker`` is ``kafka://host:port[,host:port...]``; without it the
    ``SABOT_BROKER`` environment variable, else ``kafka://localhost:9092``.
    Keyword settings are listed in :class:`sabot.app.settings.Settings`.
    """

    def __init__(self, app_id: str, broker: str | None = None, **settings: Any):
        if not isinstance(app_id, str) or not app_id.strip():
            raise ConfigError(f"app id must be a non-empty string, got {app_id!r}")
        self.id = app_id
        self.broker = resolve_broker(broker)
        self.bootstrap_servers = parse_broker_url(self.broker)
        self.settings = Settings.from_kwargs(settings)
        self.dataflows: dict[str, Dataflow] = {}
        self.tables: dict[str, Any] = {}
        self.worker = None
        self._decoders: dict = {}

    # -- registry ---------------------------------------------------------------------

    @property
    def group_id(self) -> str:
        return self.settings.group_id or self.id

    @property
    def dead_letter_topic(self) -> str:
        return self.settings.dead_letter_topic or f"{self.id}-dlq"

    def dataflow(self, topics: str | list[str], sink: SinkTarget = None,
                 codec: Any = "json", name: str | None = None,
                 schema: pa.Schema | None = None, sink_codec: Any = None) -> Callable:
        """Register a function from a Stream to a Stream as a dataflow.

        ``topics`` is a topic name or a list. The output goes to ``sink``: a
        topic name, a callable receiving each output batch, or None to drop
        it. ``codec`` decodes values (json, msgpack, arrow, raw) and, unless
        ``sink_codec`` is given, encodes the output. ``schema`` fixes the
        decoded columns' types instead of inferring them per batch.
        """
        def register(fn: Callable) -> Callable:
            flow = make_dataflow(fn, topics, sink, codec, name, schema, sink_codec,
                                 self._decoders)
            if flow.name in self.dataflows:
                raise ConfigError(f"a dataflow named {flow.name!r} is already registered "
                                  f"on app {self.id!r}; pass name= to tell them apart")
            self.dataflows[flow.name] = flow
            return fn

        return register

    def table(self, name: str, key: str):
        """Register a keyed table; a dataflow updates it with ``stream.then(table.update(fn))``.

        Its rows are kept per source partition of that dataflow and logged to
        the compacted topic ``{app_id}-{name}-changelog``, from which a worker
        restores them when it is assigned the partition. See
        :class:`sabot.state.table.Table`.
        """
        from sabot.state.table import Table

        if name in self.tables:
            raise ConfigError(f"a table named {name!r} is already registered on app "
                              f"{self.id!r}")
        table = self.tables[name] = Table(name, key)
        return table

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect, create missing topics and start consuming. Called once."""
        from sabot.agents.runtime import Worker

        if self.worker is not None:
            raise ConfigError(f"app {self.id!r} is already started")
        if not self.dataflows:
            raise ConfigError(f"app {self.id!r} has no dataflows; decorate a function "
                              f"with @app.dataflow(...) first")
        self.worker = Worker(self)
        try:
            await self.worker.start()
        except BaseException:
            worker, self.worker = self.worker, None
            await worker.stop()
            raise

    async def stop(self) -> None:
        """Finish in-flight batches, commit, leave the group. Safe to call twice."""
        worker, self.worker = self.worker, None
        if worker is not None:
            await worker.stop()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Start, run until ``stop`` is set or a dataflow fails, then stop.

        A dataflow error is raised after the worker has stopped, without the
        failed batch's offsets committed.
        """
        await self.start()
        worker = self.worker
        try:
            await worker.wait(stop)
        finally:
            await self.stop()
        worker.raise_failure()

    def main(self) -> None:
        """Run on uvloop until SIGINT or SIGTERM. Blocks; used by ``sabot worker``."""
        from sabot.agents.loop import run_until_signal

        run_until_signal(self.run)

    @property
    def stats(self):
        """Counters of the running worker (consumed, produced, dead letters)."""
        return self.worker.stats if self.worker else None

    def __repr__(self) -> str:
        return f"<Sabot {self.id!r} broker={self.broker!r} dataflows={list(self.dataflows)}>"
