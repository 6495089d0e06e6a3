"""The lazy ``Stream`` and the ``Pipeline`` that runs its operators."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from sabot.errors import ConfigError
from sabot.stream import operators as ops

if TYPE_CHECKING:
    from sabot.stream.kafka import KafkaSource

logger = logging.getLogger(__name__)

OperatorFactory = Callable[[], ops.Operator]


class Pipeline:
    """Fresh operator instances for one run of a stream's steps.

    The Kafka runtime builds one pipeline per dataflow and source partition,
    so stateful operators keep per-partition state; local mode builds one.
    """

    def __init__(self, operators: list[ops.Operator]):
        self.operators = operators

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        """Run one batch through every operator and return the output batches."""
        batches = [batch] if batch.num_rows else []
        for operator in self.operators:
            if not batches:
                return batches
            if len(batches) == 1:
                batches = operator.process(batches[0])
            else:
                batches = [out for b in batches for out in operator.process(b)]
        return batches

    def flush(self) -> list[pa.RecordBatch]:
        """End the input: flush each operator and pass its output downstream."""
        pending: list[pa.RecordBatch] = []
        for operator in self.operators:
            pending = [out for b in pending for out in operator.process(b)]
            pending.extend(operator.flush())
        return pending


class Stream:
    """A lazy chain of vectorised operators over Arrow record batches.

    Each method returns a new Stream; nothing runs until the stream is
    iterated, collected, or started by an app's dataflow.

    >>> import pyarrow as pa, pyarrow.compute as pc
    >>> table = pa.table({"id": [1, 2, 3], "amount": [10, 70, 55]})
    >>> out = (Stream.from_table(table)
    ...        .filter(lambda b: pc.greater(b["amount"], 50))
    ...        .select("id")
    ...        .collect())
    >>> out.column("id").to_pylist()
    [2, 3]
    """

    def __init__(self, source: Iterable[pa.RecordBatch] | KafkaSource | None = None,
                 steps: tuple[OperatorFactory, ...] = (), key: str | None = None):
        self._source = source
        self._steps = steps
        self.key = key

    # -- sources ---------------------------------------------------------------------

    @classmethod
    def from_batches(cls, batches: Iterable[pa.RecordBatch]) -> Stream:
        """Stream over record batches already in memory (local mode)."""
        return cls(source=batches)

    @classmethod
    def from_table(cls, table: pa.Table, batch_size: int = 65_536) -> Stream:
        """Stream over a table, cut into batches of at most ``batch_size`` rows."""
        if not isinstance(table, pa.Table):
            raise TypeError(f"from_table() needs a pyarrow.Table, got {type(table).__name__}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        return cls(source=_TableSource(table, batch_size))

    @classmethod
    def from_kafka(cls, bootstrap: str, topic: str | list[str], group: str,
                   codec: str = "json", **settings: Any) -> Stream:
        """Stream over Kafka topics consumed by ``group``, for scripts without an app.

        Finish the stream with :meth:`to_kafka` and await it, or iterate it
        with ``async for``.
        """
        from sabot.stream.kafka import KafkaSource

        return cls(source=KafkaSource(bootstrap, topic, group, codec, settings))

    # -- operators -------------------------------------------------------------------

    def _then(self, factory: OperatorFactory, key: str | None = None) -> Stream:
        factory()  # validates the arguments now, where the user wrote them
        return Stream(self._source, (*self._steps, factory), key if key else self.key)

    def filter(self, fn: Callable[[pa.RecordBatch], Any]) -> Stream:
        """Keep rows where ``fn(batch)`` returns true (a boolean array or mask)."""
        return self._then(lambda: ops.Filter(fn))

    def map(self, fn: Callable[[pa.RecordBatch], pa.RecordBatch]) -> Stream:
        """Replace each batch with ``fn(batch)``."""
        return self._then(lambda: ops.Map(fn))

    def select(self, *columns: str) -> Stream:
        """Keep the named columns in this order (and ``_key`` if the stream has one)."""
        return self._then(lambda: ops.Select(columns))

    def with_columns(self, **columns: Callable[[pa.RecordBatch], Any]) -> Stream:
        """Add or replace columns: ``with_columns(total=lambda b: pc.multiply(...))``."""
        return self._then(lambda: ops.WithColumns(columns))

    def rename(self, **mapping: str) -> Stream:
        """Rename columns, old name to new: ``rename(amount="total")``."""
        key = mapping.get(self.key, self.key) if self.key else None
        stream = self._then(lambda: ops.Rename(mapping))
        stream.key = key
        return stream

    def key_by(self, column: str) -> Stream:
        """Key the stream by a column; the sink sends it as the message key."""
        return self._then(lambda: ops.KeyBy(column), key=column)

    def window(self, window: Any, time: str, allowed_lateness: Any = 0,
               emit: str = "final") -> Any:
        """Group a keyed stream into event-time windows; finish with ``.agg(...)``."""
        from sabot.stream.windows import WindowedStream

        return WindowedStream(self, window, time, allowed_lateness, emit)

    def then(self, factory: OperatorFactory, key: str | None = None) -> Stream:
        """Append a custom operator, built by ``factory()`` once per pipeline."""
        return self._then(factory, key)

    # -- running ---------------------------------------------------------------------

    def compile(self) -> Pipeline:
        """Build fresh operator instances for one run of this stream's steps."""
        return Pipeline([factory() for factory in self._steps])

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        source = self._local_source()
        pipeline = self.compile()
        for batch in source:
            if isinstance(batch, pa.Table):
                inner = batch.to_batches()
            else:
                inner = [batch]
            for b in inner:
                yield from pipeline.process(b)
        yield from pipeline.flush()

    def collect(self) -> pa.Table:
        """Run the stream in-process and return every output row as a Table."""
        source = self._local_source()
        pipeline = self.compile()
        outputs: list[pa.RecordBatch] = []
        first_input: pa.RecordBatch | None = None
        for item in source:
            for batch in item.to_batches() if isinstance(item, pa.Table) else [item]:
                if first_input is None:
                    first_input = batch
                outputs.extend(pipeline.process(batch))
        outputs.extend(pipeline.flush())
        if not outputs:
            return _empty_result(self, source, first_input)
        table = pa.Table.from_batches(outputs)
        return table.combine_chunks() if len(outputs) > 1 else table

    def _local_source(self) -> Iterable[pa.RecordBatch]:
        from sabot.stream.kafka import KafkaSource

        if self._source is None:
            raise ConfigError(
                "this stream has no source; start it with Stream.from_batches(), "
                "Stream.from_table(), or use it inside @app.dataflow"
            )
        if isinstance(self._source, KafkaSource):
            raise ConfigError(
                "a Kafka stream is unbounded; use 'await stream.to_kafka(...)' or "
                "'async for batch in stream' instead of collect() or a for loop"
            )
        return self._source

    def __aiter__(self):
        """Iterate output batches; a Kafka stream commits a batch once it is taken.

        Leave a Kafka stream's loop early inside ``contextlib.aclosing(aiter(stream))``
        so its consumer stops at once rather than when the generator is collected.
        """
        from sabot.stream.kafka import KafkaSource

        if not isinstance(self._source, KafkaSource):
            return _AsyncIterator(iter(self))
        return self._source.iterate(self).__aiter__()

    async def to_kafka(self, bootstrap: str, topic: str, codec: str | None = None,
                       idle_timeout: float | None = None) -> None:
        """Run this Kafka stream and send its output to ``topic``.

        Runs until cancelled, or until no record arrived for ``idle_timeout``
        seconds. Offsets are committed after the sink acknowledges.
        """
        from sabot.stream.kafka import KafkaSource

        if not isinstance(self._source, KafkaSource):
            raise ConfigError("to_kafka() needs a stream that starts with Stream.from_kafka()")
        await self._source.run(self, bootstrap, topic, codec, idle_timeout)

    def __repr__(self) -> str:
        return f"<Stream steps={len(self._steps)} key={self.key!r}>"


class _TableSource:
    def __init__(self, table: pa.Table, batch_size: int):
        self.table = table
        self.batch_size = batch_size

    def __iter__(self):
        return iter(self.table.to_batches(max_chunksize=self.batch_size)
                    or [pa.RecordBatch.from_pylist([], schema=self.table.schema)])


class _AsyncIterator:
    def __init__(self, iterator):
        self.iterator = iterator

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self.iterator)
        except StopIteration:
            raise StopAsyncIteration from None


def _empty_result(stream: Stream, source: Any, first_input: pa.RecordBatch | None) -> pa.Table:
    """Return an empty table with the schema the pipeline would give, if it can tell."""
    if first_input is None:
        return pa.table({})
    batch = first_input.slice(0, 0)
    for factory in stream._steps:
        operator = factory()
        try:
            if isinstance(operator, ops.BatchFunction) and not isinstance(operator, ops.Map):
                # A filter keeps the schema; no need to call user code on no rows.
                continue
            out = operator.process(batch)
        except Exception:  # noqa: BLE001 - user code may not accept an empty batch
            logger.debug("cannot derive the empty result's schema at %s", operator.name)
            return pa.table({})
        if not out:
            return pa.table({})
        batch = out[0]
    return pa.Table.from_batches([batch])
