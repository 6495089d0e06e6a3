"""Stores of window operators: open windows and open sessions of one partition.

Both keep, besides their rows, the max event time seen in the partition,
from which the operator derives the watermark. Windows that have been
emitted are removed, and their removal is written to the changelog, so the
stores hold only open windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot.state.base import Changes, Store
from sabot.stream.aggregates import concat

KEY = "key"
START = "window_start"
END = "window_end"


class WindowStore(Store):
    """Open tumbling or hopping windows: for each window start, one row per key.

    Rows are the group key, then the accumulator columns. In the changelog
    a row is identified by ``(key, window_start)``.
    """

    def __init__(self, name: str):
        super().__init__(name, (KEY, START))
        self.windows: dict[int, pa.Table] = {}
        self.max_time: int | None = None
        self.time_type: str | None = None
        self._upserts: dict[int, pa.Table] = {}
        self._deleted: dict[int, pa.Array] = {}

    def set_window(self, start: int, rows: pa.Table, changed: pa.Table) -> None:
        """Replace the rows of window ``start``; ``changed`` are the rows that differ."""
        self.windows[start] = rows
        previous = self._upserts.get(start)
        self._upserts[start] = changed if previous is None else _replace_rows(previous, changed)

    def pop_window(self, start: int) -> pa.Table:
        """Remove window ``start`` and return its rows."""
        rows = self.windows.pop(start)
        self._upserts.pop(start, None)
        self._deleted[start] = rows.column(KEY).combine_chunks()
        return rows

    def open_rows(self) -> int:
        return sum(table.num_rows for table in self.windows.values())

    def __len__(self) -> int:
        return self.open_rows()

    # -- Store ---------------------------------------------------------------------------

    def drain(self) -> Changes:
        upserts = [_with_start(rows, start) for start, rows in self._upserts.items()
                   if rows.num_rows]
        deletes = [pa.table({KEY: keys, START: pa.array(np.full(len(keys), start, np.int64))})
                   for start, keys in self._deleted.items() if len(keys)]
        self._upserts = {}
        self._deleted = {}
        return Changes(upserts=concat(upserts) if upserts else None,
                       deletes=concat(deletes) if deletes else None)

    def restore(self, rows: pa.Table, meta: dict[str, Any]) -> None:
        self.max_time = meta.get("max_time")
        self.time_type = meta.get("time_type")
        self.windows = {}
        for start, part in split_by(rows, START):
            self.windows[start] = part.drop_columns([START])

    def meta(self) -> dict[str, Any]:
        return {"max_time": self.max_time, "time_type": self.time_type}

    def schema(self) -> pa.Schema | None:
        for rows in self.windows.values():
            return _with_start(rows.slice(0, 0), 0).schema
        for rows in self._upserts.values():
            return _with_start(rows.slice(0, 0), 0).schema
        return None


class SessionStore(Store):
    """Open sessions: rows of key, session start, session end and accumulators.

    A session's end is its last event time plus the gap. In the changelog a
    row is identified by ``(key, window_start)``; a session whose start moves
    because an earlier event joined it is deleted and written again.
    """

    def __init__(self, name: str):
        super().__init__(name, (KEY, START))
        self.rows: pa.Table | None = None
        self.max_time: int | None = None
        self.time_type: str | None = None
        self._upserts: list[pa.Table] = []
        self._deletes: list[pa.Table] = []

    def replace(self, removed: pa.Table | None, kept: pa.Table | None,
                added: pa.Table | None) -> None:
        """Set the rows to ``kept`` plus ``added``; ``removed`` are the (key, start) pairs gone."""
        parts = [t for t in (kept, added) if t is not None and t.num_rows]
        self.rows = concat(parts) if parts else None
        if added is not None and added.num_rows:
            self._upserts.append(added)
        if removed is not None and removed.num_rows:
            self._deletes.append(removed.select([KEY, START]))

    def __len__(self) -> int:
        return self.rows.num_rows if self.rows is not None else 0

    # -- Store ---------------------------------------------------------------------------

    def drain(self) -> Changes:
        upserts = concat(self._upserts) if self._upserts else None
        deletes = concat(self._deletes) if self._deletes else None
        self._upserts, self._deletes = [], []
        if upserts is not None and self.rows is not None:
            # Keep only the latest version of each session that still exists.
            alive = _pair_in(upserts, self.rows)
            upserts = upserts.filter(alive)
            upserts = _last_per_pair(upserts)
        elif upserts is not None:
            upserts = None
        if deletes is not None:
            if self.rows is not None:
                deletes = deletes.filter(pc.invert(_pair_in(deletes, self.rows)))
            deletes = _last_per_pair(deletes)
        return Changes(upserts=upserts, deletes=deletes)

    def restore(self, rows: pa.Table, meta: dict[str, Any]) -> None:
        self.max_time = meta.get("max_time")
        self.time_type = meta.get("time_type")
        self.rows = rows if rows.num_rows else None

    def meta(self) -> dict[str, Any]:
        return {"max_time": self.max_time, "time_type": self.time_type}

    def schema(self) -> pa.Schema | None:
        if self.rows is not None:
            return self.rows.schema
        if self._upserts:
            return self._upserts[-1].schema
        return None


def split_by(rows: pa.Table, column: str):
    """Yield ``(value, rows)`` for each distinct int64 value of ``column``, ascending."""
    if not rows.num_rows:
        return
    values = rows.column(column).to_numpy()
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    bounds = np.flatnonzero(np.diff(ordered)) + 1
    starts = np.concatenate([[0], bounds])
    stops = np.concatenate([bounds, [len(ordered)]])
    taken = rows.take(pa.array(order))
    for first, stop in zip(starts, stops, strict=True):
        yield int(ordered[first]), taken.slice(int(first), int(stop - first))


def _with_start(rows: pa.Table, start: int) -> pa.Table:
    starts = pa.array(np.full(rows.num_rows, start, dtype=np.int64))
    return rows.add_column(1, START, starts)


def _replace_rows(previous: pa.Table, changed: pa.Table) -> pa.Table:
    keep = pc.invert(pc.is_in(previous.column(KEY), value_set=changed.column(KEY)))
    return concat([previous.filter(keep), changed])


def _pair_keys(table: pa.Table) -> pa.Array:
    """Return one binary value per (key, window_start) pair, for set membership."""
    starts = table.column(START).combine_chunks().cast(pa.int64()).cast(pa.string())
    keys = table.column(KEY).combine_chunks()
    if not pa.types.is_string(keys.type):
        keys = pc.cast(keys, pa.string())
    return pc.binary_join_element_wise(starts, keys, "\x00")


def _pair_in(table: pa.Table, other: pa.Table) -> pa.Array:
    return pc.is_in(_pair_keys(table), value_set=_pair_keys(other))


def _last_per_pair(table: pa.Table) -> pa.Table:
    if table.num_rows < 2:
        return table
    numbered = pa.table({"pair": _pair_keys(table),
                         "__row": pa.array(np.arange(table.num_rows, dtype=np.int64))})
    last = numbered.group_by("pair", use_threads=False).aggregate([("__row", "max")])
    if last.num_rows == table.num_rows:
        return table
    return table.take(pa.array(np.sort(last.column("__row_max").to_numpy())))
