"""Keyed tables: state a dataflow reads and updates with batch operations.

>>> import pyarrow as pa, pyarrow.compute as pc
>>> from sabot import Sabot, Stream
>>> app = Sabot("tables-doc")
>>> totals = app.table("totals", key="user")
>>> def add(batch, table):
...     sums = pa.table(batch).group_by("user").aggregate([("amount", "sum")])
...     before = table.get(sums["user"])
...     total = pc.add(pc.fill_null(before["total"], 0), sums["amount_sum"]) \\
...         if "total" in before.column_names else sums["amount_sum"]
...     table.put({"user": sums["user"], "total": total})
...     return table.get(sums["user"])
>>> events = pa.table({"user": ["a", "b", "a"], "amount": [1, 2, 3]})
>>> out = (Stream.from_table(events, batch_size=2)
...        .key_by("user").then(totals.update(add)).collect())
>>> out.select(["user", "total"]).to_pylist()
[{'user': 'a', 'total': 1}, {'user': 'b', 'total': 2}, {'user': 'a', 'total': 4}]

A table's rows live with the source partitions of the dataflow that
updates it. The step for partition *p* reads only the rows it wrote, and
they are logged to partition *p* of ``{app_id}-{table}-changelog``. Key the
source topic by the table's key, so a key always arrives on one partition.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from sabot.errors import ConfigError, DataflowError, SchemaError
from sabot.state.context import StateContext
from sabot.state.memory import MemoryStore
from sabot.stream.operators import KEY_COLUMN, Operator, describe_function


class Table:
    """A keyed table of an app, made with ``app.table(name, key=...)``.

    ``update(fn)`` makes the pipeline step that reads and writes it.
    """

    def __init__(self, name: str, key: str):
        if not isinstance(name, str) or not name or not all(
                c.isalnum() or c in "._-" for c in name):
            raise ConfigError(f"table name {name!r} must be a non-empty Kafka topic name "
                              f"part: letters, digits, '.', '_' and '-'")
        if not isinstance(key, str) or not key:
            raise ConfigError(f"table {name!r}: key must be a column name, got {key!r}")
        self.name = name
        self.key = key

    def update(self, fn: Callable[[pa.RecordBatch, TablePartition], Any]
               ) -> Callable[[], Operator]:
        """Return a step for ``Stream.then()`` that calls ``fn(batch, table)`` per batch.

        ``table`` is this partition's part of the table (a
        :class:`TablePartition`). ``fn`` returns the batch or table to pass
        on, or None for no output; output rows with the key column are keyed
        by it. In the Kafka runtime, records whose offsets the table has
        already applied are skipped before ``fn`` is called, so a replay after
        a crash does not apply them twice.
        """
        if not callable(fn):
            raise TypeError(f"{self.name}.update() needs a callable, got {fn!r}")

        def factory() -> Operator:
            return TableUpdate(self, fn)

        return factory

    def __repr__(self) -> str:
        return f"<Table {self.name!r} key={self.key!r}>"


class TablePartition:
    """The rows of a table that one source partition owns, read and written in batches.

    Every method takes or returns whole columns; see :class:`MemoryStore`
    for the cost of each.
    """

    def __init__(self, store: MemoryStore):
        self._store = store

    @property
    def key(self) -> str:
        return self._store.key

    def get(self, keys: Any) -> pa.Table:
        """Return one row per key, in order; the values of a missing key are null."""
        return self._store.get(keys)

    def put(self, rows: pa.Table | pa.RecordBatch | dict) -> None:
        """Insert or replace rows by key; of rows with the same key the last wins."""
        self._store.put(rows)

    def delete(self, keys: Any) -> None:
        """Remove the rows of ``keys``."""
        self._store.delete(keys)

    def to_table(self) -> pa.Table:
        """Return every row."""
        return self._store.to_table()

    def __len__(self) -> int:
        return len(self._store)


class TableUpdate(Operator):
    """The step that passes each batch and the partition's table to a user function."""

    stateful = True

    def __init__(self, table: Table, fn: Callable):
        self.table = table
        self.fn = fn
        self.store: MemoryStore | None = None
        self.view: TablePartition | None = None

    @property
    def name(self) -> str:
        return f"{self.table.name}.update"

    def bind(self, context: StateContext) -> None:
        self.store = MemoryStore(self.table.name, self.table.key)
        self.view = TablePartition(self.store)
        context.add_store(self.store)

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        if self.store is None:
            self.bind(StateContext())
        try:
            result = self.fn(batch, self.view)
        except (SchemaError, DataflowError):
            raise
        except Exception as exc:
            raise DataflowError(f"{self.name}({describe_function(self.fn)}) raised "
                                f"{type(exc).__name__}: {exc}") from exc
        if result is None:
            return []
        if isinstance(result, pa.RecordBatch):
            result = pa.Table.from_batches([result])
        if not isinstance(result, pa.Table):
            raise DataflowError(f"{self.name}({describe_function(self.fn)}) must return a "
                                f"pyarrow RecordBatch, Table or None, "
                                f"got {type(result).__name__}")
        names = result.schema.names
        if self.table.key in names and KEY_COLUMN not in names:
            result = result.append_column(KEY_COLUMN, result.column(self.table.key))
        return [b for b in result.combine_chunks().to_batches() if b.num_rows]
