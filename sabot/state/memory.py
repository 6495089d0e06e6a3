"""The in-memory backend: a keyed Arrow table changed with batch operations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot.errors import SchemaError
from sabot.state.base import Changes, Store
from sabot.stream.aggregates import concat

# Concatenating small tables leaves many chunks; past this many they are
# combined, which keeps lookups from walking thousands of small chunks.
MAX_CHUNKS = 64


class MemoryStore(Store):
    """Rows keyed by one column, held as one Arrow table in memory.

    Every operation takes whole arrays of keys or tables of rows. A lookup
    hashes the table's key column once per call, so each call costs time in
    proportion to the table's size, not to Python's per-row speed.
    """

    def __init__(self, name: str, key: str):
        super().__init__(name, (key,))
        self.key = key
        self._rows: pa.Table | None = None
        self._changed: list[pa.Array] = []

    # -- batch operations ----------------------------------------------------------------

    def get(self, keys: Any) -> pa.Table:
        """Return one row per key in ``keys``, in that order; a missing key's values are null."""
        keys = _key_array(keys, self.key)
        if self._rows is None:
            return pa.table({self.key: keys})
        index = pc.index_in(keys, value_set=self._rows.column(self.key))
        found = self._rows.take(index)
        return found.set_column(0, self.key, keys)

    def put(self, rows: pa.Table | pa.RecordBatch | dict) -> None:
        """Insert or replace rows by key; of rows with the same key the last wins.

        A column the table has and ``rows`` lacks becomes null in those rows.
        """
        rows = _as_table(rows)
        if self.key not in rows.schema.names:
            raise SchemaError(f"table {self.name!r}: put() rows need the key column "
                              f"{self.key!r}; they have {rows.schema.names}")
        keys = rows.column(self.key)
        if keys.null_count:
            raise SchemaError(f"table {self.name!r}: put() got {keys.null_count} rows with "
                              f"a null {self.key!r}; filter them out first")
        rows = _last_per_key(rows.select([self.key, *[n for n in rows.schema.names
                                                      if n != self.key]]), self.key)
        if self._rows is None:
            self._rows = rows
        else:
            keep = pc.invert(pc.is_in(self._rows.column(self.key),
                                      value_set=rows.column(self.key)))
            self._rows = concat([self._rows.filter(keep), rows])
            if self._rows.column(0).num_chunks > MAX_CHUNKS:
                self._rows = self._rows.combine_chunks()
        self._changed.append(rows.column(self.key).combine_chunks())

    def delete(self, keys: Any) -> None:
        """Remove the rows of ``keys``; keys that are not present are ignored."""
        keys = _key_array(keys, self.key)
        if self._rows is None or not len(keys):
            return
        keep = pc.invert(pc.is_in(self._rows.column(self.key), value_set=keys))
        self._rows = self._rows.filter(keep)
        self._changed.append(keys)

    def to_table(self) -> pa.Table:
        """Return every row."""
        return self._rows if self._rows is not None else pa.table({self.key: pa.array([])})

    def __len__(self) -> int:
        return self._rows.num_rows if self._rows is not None else 0

    # -- Store ---------------------------------------------------------------------------

    def drain(self) -> Changes:
        if not self._changed:
            return Changes()
        changed = pc.unique(concat([pa.table({"k": keys}) for keys in self._changed])
                            .column("k").combine_chunks())
        self._changed = []
        if self._rows is None:
            return Changes(deletes=pa.table({self.key: changed}))
        rows_keys = self._rows.column(self.key)
        upserts = self._rows.filter(pc.is_in(rows_keys, value_set=changed))
        gone = changed.filter(pc.invert(pc.is_in(changed, value_set=rows_keys)))
        return Changes(upserts=upserts, deletes=pa.table({self.key: gone}))

    def restore(self, rows: pa.Table, meta: dict[str, Any]) -> None:
        self._rows = rows if rows.num_rows or rows.num_columns > 1 else None
        self._changed = []

    def meta(self) -> dict[str, Any]:
        return {}

    def schema(self) -> pa.Schema | None:
        return self._rows.schema if self._rows is not None else None


def _as_table(rows: Any) -> pa.Table:
    if isinstance(rows, pa.Table):
        return rows
    if isinstance(rows, pa.RecordBatch):
        return pa.Table.from_batches([rows])
    if isinstance(rows, dict):
        return pa.table(rows)
    raise TypeError(f"expected a pyarrow Table, RecordBatch or dict of columns, "
                    f"got {type(rows).__name__}")


def _key_array(keys: Any, name: str) -> pa.Array:
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    elif not isinstance(keys, pa.Array):
        keys = pa.array(keys)
    if pa.types.is_dictionary(keys.type):
        keys = keys.cast(keys.type.value_type)
    return keys


def _last_per_key(rows: pa.Table, key: str) -> pa.Table:
    """Keep the last row of each key, in the order of those last rows."""
    if rows.num_rows < 2:
        return rows
    numbered = pa.table({key: rows.column(key),
                         "__row": pa.array(np.arange(rows.num_rows, dtype=np.int64))})
    last = numbered.group_by(key, use_threads=False).aggregate([("__row", "max")])
    if last.num_rows == rows.num_rows:
        return rows
    keep = np.sort(last.column("__row_max").to_numpy())
    return rows.take(pa.array(keep))
