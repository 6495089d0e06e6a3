"""Event-time windows over keyed streams: tumbling, hopping and session.

>>> import pyarrow as pa
>>> from sabot import Stream, tumbling
>>> events = pa.table({"user": ["a", "b", "a", "a"],
...                    "ts": [1, 2, 61, 62],  # epoch seconds
...                    "amount": [5, 7, 1, 2]})
>>> out = (Stream.from_table(events)
...        .key_by("user")
...        .window(tumbling("1m"), time="ts")
...        .agg(n=("amount", "count"), total=("amount", "sum"))
...        .collect())
>>> out.select(["user", "n", "total"]).to_pylist()
[{'user': 'a', 'n': 1, 'total': 5}, {'user': 'b', 'n': 1, 'total': 7},
 {'user': 'a', 'n': 2, 'total': 3}]

Semantics, per source partition (the state of a window lives with the
partition its records come from):

* Event time comes from a column: a timestamp, ISO-8601 text, or epoch
  seconds or milliseconds as a number. A number below 10^11 is read as
  seconds (10^11 s is the year 5138), a larger one as milliseconds (10^11
  ms is March 1973).
* The watermark is the max event time seen so far in the partition minus
  ``allowed_lateness``. It is evaluated row by row, in offset order, so
  which rows are late does not depend on how records were batched.
* A record is late when every window it belongs to ends at or before the
  watermark. Late records go to ``{app_id}-late``, or are dropped after
  :meth:`WindowedStream.drop_late`, and are counted.
* A window is emitted once, after the batch in which the watermark reaches
  its end, and then removed from the state. With ``emit="update"`` the
  changed windows are also emitted after every batch, with ``final`` false.
* A row with a null key or a null or unreadable event time goes to the
  dead-letter topic, ``{app_id}-dlq``.
* Windows are aligned to the Unix epoch: hourly windows start on the hour
  (UTC for time-zone-aware times).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sabot.errors import ConfigError, SchemaError
from sabot.state.context import StateContext
from sabot.state.windowed import END, KEY, START, SessionStore, WindowStore, split_by
from sabot.stream.aggregates import Aggregation, AggregationPlan, AggSpec, concat, parse_aggs
from sabot.stream.operators import KEY_COLUMN, Operator

logger = logging.getLogger(__name__)

__all__ = ["Aggregation", "Hopping", "Session", "Tumbling", "WindowedStream",
           "hopping", "parse_duration", "session", "tumbling"]

#: Event times given as numbers below this are epoch seconds, at or above it
#: epoch milliseconds.
EPOCH_MS_THRESHOLD = 10**11

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000,
            "d": 86_400_000, "w": 604_800_000}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|min|s|m|h|d|w)", re.IGNORECASE)
_INT64_MIN = np.iinfo(np.int64).min


# -- durations ------------------------------------------------------------------------------


def parse_duration(value: Any, what: str = "duration") -> int:
    """Return a duration in milliseconds.

    Accepts a ``timedelta``, a number of seconds, or text made of
    number-unit pairs such as ``"10s"``, ``"1h30m"`` or ``"500ms"``, with
    units ms, s, m (or min), h, d and w.

    >>> parse_duration("1h30m"), parse_duration(2.5), parse_duration(timedelta(minutes=1))
    (5400000, 2500, 60000)
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a duration such as '10s' or timedelta(seconds=10), "
                          f"got {value!r}")
    if isinstance(value, timedelta):
        ms = value / timedelta(milliseconds=1)
    elif isinstance(value, (int, float)):
        ms = value * 1000
    elif isinstance(value, str):
        text = value.strip()
        parts = _DURATION_PART.findall(text)
        if not parts or _DURATION_PART.sub("", text).strip():
            raise ConfigError(f"{what} {value!r} is not a duration; write number-unit pairs "
                              f"such as '10s', '1h30m' or '500ms' (units: ms, s, m, h, d, w)")
        ms = sum(float(number) * _UNIT_MS[unit.lower()] for number, unit in parts)
    else:
        raise ConfigError(f"{what} must be a duration such as '10s' or timedelta(seconds=10), "
                          f"got {value!r}")
    if ms < 0 or ms != ms:
        raise ConfigError(f"{what} must not be negative, got {value!r}")
    if ms != int(ms):
        raise ConfigError(f"{what} {value!r} is not a whole number of milliseconds")
    return int(ms)


def _duration(args: tuple, units: dict[str, Any], what: str) -> int:
    if args and units:
        raise ConfigError(f"give {what} either as one value or as keywords, not both")
    if len(args) > 1:
        raise ConfigError(f"{what} takes one value, got {len(args)}")
    if units:
        try:
            value: Any = timedelta(**units)
        except TypeError as exc:
            raise ConfigError(f"{what}: {exc}; use weeks, days, hours, minutes, seconds "
                              f"or milliseconds") from None
    elif args:
        value = args[0]
    else:
        raise ConfigError(f"{what} is missing, for example '1h' or hours=1")
    ms = parse_duration(value, what)
    if ms <= 0:
        raise ConfigError(f"{what} must be positive, got {value!r}")
    return ms


# -- window specifications ------------------------------------------------------------------


@dataclass(frozen=True)
class Tumbling:
    """Back-to-back windows of ``size`` milliseconds."""

    size: int

    def __str__(self) -> str:
        return f"tumbling({_format_ms(self.size)})"


@dataclass(frozen=True)
class Hopping:
    """Windows of ``size`` milliseconds starting every ``step`` milliseconds."""

    size: int
    step: int

    def __str__(self) -> str:
        return f"hopping({_format_ms(self.size)}, every {_format_ms(self.step)})"


@dataclass(frozen=True)
class Session:
    """Per key, events less than ``gap`` milliseconds apart share a session.

    A session spans from its first event to its last event plus the gap.
    """

    gap: int

    def __str__(self) -> str:
        return f"session(gap {_format_ms(self.gap)})"


def tumbling(*size: Any, **units: Any) -> Tumbling:
    """Tumbling windows: ``tumbling("1h")``, ``tumbling(hours=1)`` or a ``timedelta``."""
    return Tumbling(_duration(size, units, "tumbling window size"))


def hopping(size: Any, step: Any) -> Hopping:
    """Hopping windows of ``size`` that start every ``step``: ``hopping("1h", "15m")``."""
    size_ms = _duration((size,), {}, "hopping window size")
    step_ms = _duration((step,), {}, "hopping window step")
    if step_ms > size_ms:
        raise ConfigError(f"hopping window step {step!r} is longer than its size {size!r}, "
                          f"so some events would fall in no window; use a step <= size")
    return Hopping(size_ms, step_ms)


def session(*gap: Any, **units: Any) -> Session:
    """Session windows closed by ``gap`` of inactivity: ``session("30m")``."""
    return Session(_duration(gap, units, "session gap"))


def _format_ms(ms: int) -> str:
    for unit in ("w", "d", "h", "m", "s"):
        if ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


# -- the windowed stream --------------------------------------------------------------------


class WindowedStream:
    """A keyed stream grouped into event-time windows; finish it with :meth:`agg`.

    Made by ``Stream.window(window, time, allowed_lateness=0, emit="final")``.
    """

    def __init__(self, stream: Any, window: Any, time: str, allowed_lateness: Any = 0,
                 emit: str = "final", drop_late: bool = False):
        if not isinstance(window, (Tumbling, Hopping, Session)):
            raise ConfigError(f"window() needs tumbling(...), hopping(...) or session(...), "
                              f"got {window!r}")
        if not isinstance(time, str) or not time:
            raise ConfigError(f"window(time=...) must name the event-time column, got {time!r}")
        if emit not in ("final", "update"):
            raise ConfigError(f"window(emit={emit!r}): use 'final' (once per window) or "
                              f"'update' (also after every batch)")
        if stream.key is None:
            raise ConfigError("window() needs a keyed stream; call key_by(column) before "
                              "window(...)")
        self.stream = stream
        self.window = window
        self.time = time
        self.allowed_lateness = parse_duration(allowed_lateness, "allowed_lateness")
        self.emit = emit
        self.drop_late_records = drop_late

    def drop_late(self) -> WindowedStream:
        """Count late records and drop them instead of sending them to ``{app_id}-late``."""
        return WindowedStream(self.stream, self.window, self.time,
                              timedelta(milliseconds=self.allowed_lateness), self.emit,
                              drop_late=True)

    def agg(self, **aggs: Any) -> Any:
        """Aggregate each key's rows per window: ``agg(name=(column, function), ...)``.

        Functions: count, sum, mean, min, max, first, last, count_distinct, or
        an :class:`Aggregation`. ``("*", "count")`` counts rows. count and
        count_distinct skip nulls, as do first and last (the first and last
        non-null value in arrival order). Each output row contains the key
        column, ``window_start``, ``window_end`` (timestamps, ms) and the
        aggregates, and is keyed by the group key.
        """
        key_name = self.stream.key
        specs = parse_aggs(aggs, key_name)
        if isinstance(self.window, Session):
            for spec in specs:
                if spec.custom and spec.function.merge is None:
                    raise ConfigError(
                        f"agg({spec.name}=...): session windows merge sessions when an event "
                        f"joins two of them, so the Aggregation needs merge=(left, right)")
        operator_class = SessionAggregate if isinstance(self.window, Session) \
            else WindowAggregate
        window, time, lateness, emit, drop = (self.window, self.time, self.allowed_lateness,
                                              self.emit, self.drop_late_records)

        def factory() -> Operator:
            return operator_class(window, time, lateness, emit, specs, key_name, drop)

        return self.stream.then(factory, key=key_name)

    def __repr__(self) -> str:
        return f"<WindowedStream {self.window} time={self.time!r} emit={self.emit!r}>"


# -- event time -----------------------------------------------------------------------------


def event_times(column: pa.Array | pa.ChunkedArray,
                name: str) -> tuple[np.ndarray, np.ndarray, str | None]:
    """Return event times in epoch ms, a validity mask, and the time zone of the output.

    Invalid rows (null, NaN, or text that is not ISO 8601) have time 0 and
    validity False. The time zone is the column's for timestamps, UTC for
    numbers, and None (naive) for naive timestamps.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_dictionary(kind):
        column = column.cast(kind.value_type)
        kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        column, kind = _parse_text_times(column, name)
    if pa.types.is_date(kind):
        column = column.cast(pa.timestamp("ms"))
        kind = column.type
    if pa.types.is_timestamp(kind):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        raw = pc.fill_null(column.cast(pa.int64()), 0).to_numpy()
        per_ms = {"s": None, "ms": 1, "us": 1000, "ns": 1_000_000}[kind.unit]
        ms = raw * 1000 if per_ms is None else np.floor_divide(raw, per_ms)
        return ms.astype(np.int64), valid, kind.tz
    if pa.types.is_integer(kind):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        raw = pc.fill_null(column.cast(pa.int64()), 0).to_numpy()
        ms = np.where(np.abs(raw) < EPOCH_MS_THRESHOLD, raw * 1000, raw)
        return ms.astype(np.int64), valid, "UTC"
    if pa.types.is_floating(kind):
        raw = pc.fill_null(column.cast(pa.float64()), np.nan).to_numpy()
        valid = np.isfinite(raw)
        safe = np.where(valid, raw, 0.0)
        ms = np.floor(np.where(np.abs(safe) < EPOCH_MS_THRESHOLD, safe * 1000, safe))
        return ms.astype(np.int64), valid, "UTC"
    if pa.types.is_null(kind):
        return np.zeros(len(column), np.int64), np.zeros(len(column), bool), None
    raise SchemaError(f"window(time={name!r}): the column has type {kind}; use a timestamp, "
                      f"ISO-8601 text, or epoch seconds or milliseconds as a number")


_TEXT_TIME_TYPES = (pa.timestamp("ms", tz="UTC"), pa.timestamp("ms"))


def _parse_text_times(column: pa.Array, name: str) -> tuple[pa.Array, pa.DataType]:
    """Parse ISO-8601 text: with a zone as UTC timestamps, without one as naive ones."""
    for target in _TEXT_TIME_TYPES:
        try:
            parsed = column.cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        return parsed, parsed.type
    # Some values are not ISO 8601 (or mix zoned and naive text): parse them
    # one by one, and leave those that fail null so they become dead letters.
    values: list[int | None] = []
    target = None
    for text in column.to_pylist():
        values.append(None)
        for candidate in _TEXT_TIME_TYPES if target is None else (target,):
            try:
                values[-1] = pa.array([text]).cast(candidate).cast(pa.int64())[0].as_py()
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
            target = candidate
            break
    parsed = pa.array(values, type=pa.int64()).cast(target or _TEXT_TIME_TYPES[0])
    logger.debug("window(time=%r): %d of %d values are not ISO-8601 times", name,
                 parsed.null_count - column.null_count, len(column))
    return parsed, parsed.type


def _timestamps(values_ms: np.ndarray, tz: str | None) -> pa.Array:
    return pa.array(values_ms, type=pa.int64()).cast(pa.timestamp("ms", tz=tz))


# -- operators ------------------------------------------------------------------------------


class _WindowOperator(Operator):
    """Base of the tumbling, hopping and session operators.

    ``process`` is called once per batch of one partition, in offset order.
    It never emits a window twice as final. ``flush`` (local mode, end of
    input) emits every open window as if the watermark had reached the end
    of time.
    """

    stateful = True
    sends_late = True
    kind = "window"

    def __init__(self, window: Any, time: str, lateness_ms: int, emit: str,
                 specs: list[AggSpec], key_name: str, drop_late: bool):
        self.window = window
        self.time = time
        self.lateness = lateness_ms
        self.emit = emit
        self.specs = specs
        self.key_name = key_name
        self.drop_late = drop_late
        self.context: StateContext | None = None
        self.store: Any = None
        self.input_columns = sorted({s.column for s in specs if s.column})

    @property
    def name(self) -> str:
        return f"window({self.window})"

    def bind(self, context: StateContext) -> None:
        """Attach the pipeline's context and register this operator's store; called once."""
        self.context = context
        self.store = self._make_store(context.store_name(self.kind))
        context.add_store(self.store)

    def _make_store(self, name: str) -> Any:
        raise NotImplementedError

    def _context(self) -> StateContext:
        if self.context is None:
            self.bind(StateContext())
        return self.context

    def _valid_rows(self, batch: pa.RecordBatch) -> tuple[pa.Table, np.ndarray] | None:
        """Return the rows with a key and an event time, and their times in ms.

        The other rows go to the dead-letter topic with the reason.
        """
        context = self._context()
        names = batch.schema.names
        missing = [c for c in (KEY_COLUMN, self.time, *self.input_columns) if c not in names]
        if missing:
            hint = "Keep the key column of key_by(). " if missing[0] == KEY_COLUMN else ""
            raise SchemaError(
                f"{self.name}: column {missing[0]!r} not found; the batch has columns "
                f"{names}. {hint}Check the spelling, or add the column before window().")
        times, valid, tz = event_times(batch.column(self.time), self.time)
        if valid.any():
            self.store.time_type = tz if tz is not None else ""
        table = pa.Table.from_batches([batch])
        keys = batch.column(KEY_COLUMN)
        key_valid = keys.is_valid().to_numpy(zero_copy_only=False)
        good = valid & key_valid
        if not good.all():
            no_key = ~key_valid
            if no_key.any():
                context.send_dead_letters(table.filter(pa.array(no_key)),
                                          f"null key in column {self.key_name!r}")
            no_time = key_valid & ~valid
            if no_time.any():
                context.send_dead_letters(table.filter(pa.array(no_time)),
                                          f"null or invalid event time in column {self.time!r}")
            if not good.any():
                return None
            table = table.filter(pa.array(good))
            times = times[good]
        return table, times

    def _watermarks(self, times: np.ndarray) -> np.ndarray:
        """Return each row's watermark: the max event time up to it, minus the lateness."""
        running = np.maximum.accumulate(times)
        if self.store.max_time is not None:
            running = np.maximum(running, self.store.max_time)
        self.store.max_time = int(running[-1])
        return _minus(running, self.lateness)

    def _watermark(self) -> int:
        if self.store.max_time is None:
            return _INT64_MIN
        return int(_minus(np.array([self.store.max_time]), self.lateness)[0])

    def _send_late(self, table: pa.Table, late: np.ndarray, watermarks: np.ndarray) -> None:
        self._context().send_late(table.filter(pa.array(late)), watermarks[late], self.drop_late)

    def _inputs(self, table: pa.Table, rows: np.ndarray | None, keys: pa.Array) -> pa.Table:
        columns = {KEY: keys}
        for name in self.input_columns:
            column = table.column(name)
            columns[name] = column if rows is None else column.take(pa.array(rows))
        return pa.table(columns)

    def _output(self, parts: list[tuple[pa.Table, np.ndarray, np.ndarray]],
                final: bool) -> pa.Table | None:
        """Build output rows from ``(accumulators, window starts, window ends)`` parts."""
        tables = []
        tz = self.store.time_type or None
        for rows, starts, ends in parts:
            if not rows.num_rows:
                continue
            columns: dict[str, Any] = {self.key_name: rows.column(KEY).combine_chunks()}
            columns["window_start"] = _timestamps(starts, tz)
            columns["window_end"] = _timestamps(ends, tz)
            columns.update(self.plan.finish(rows))
            if self.emit == "update":
                columns["final"] = pa.array(np.full(rows.num_rows, final))
            columns[KEY_COLUMN] = columns[self.key_name]
            tables.append(pa.table(columns))
        if not tables:
            return None
        return concat(tables)

    def _to_batches(self, *tables: pa.Table | None) -> list[pa.RecordBatch]:
        out = []
        for table in tables:
            if table is not None and table.num_rows:
                out.extend(b for b in table.combine_chunks().to_batches() if b.num_rows)
        return out


class WindowAggregate(_WindowOperator):
    """Tumbling and hopping windows: state per window start, one row per key."""

    def __init__(self, *args: Any):
        super().__init__(*args)
        window = self.window
        self.size = window.size
        self.step = window.step if isinstance(window, Hopping) else window.size
        self.partial_plan = AggregationPlan(self.specs, [KEY, START])
        self.plan = AggregationPlan(self.specs, [KEY])

    def _make_store(self, name: str) -> WindowStore:
        return WindowStore(name)

    def _assign(self, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (row index, window start) for every window each row belongs to."""
        last = np.floor_divide(times, self.step)
        if self.step == self.size:
            return np.arange(len(times)), last * self.step
        first = np.floor_divide(times - self.size, self.step) + 1
        counts = (last - first + 1).astype(np.int64)
        rows = np.repeat(np.arange(len(times)), counts)
        # Position of each pair within its row: 0, 1, ... counts-1.
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        return rows, (np.repeat(first, counts) + offsets) * self.step

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        valid = self._valid_rows(batch)
        if valid is None:
            return self._close()
        table, times = valid
        keys = table.column(KEY_COLUMN).combine_chunks()
        if pa.types.is_dictionary(keys.type):
            keys = keys.cast(keys.type.value_type)
        self._context().check_partitioning(keys)
        watermarks = self._watermarks(times)

        rows, starts = self._assign(times)
        open_pairs = starts + self.size > watermarks[rows]
        contributes = np.zeros(len(times), dtype=bool)
        contributes[rows[open_pairs]] = True
        if not contributes.all():
            self._send_late(table, ~contributes, watermarks)
        rows, starts = rows[open_pairs], starts[open_pairs]

        changed: list[tuple[int, pa.Table]] = []
        if len(rows):
            pairs = self._inputs(table, rows, keys.take(pa.array(rows)))
            pairs = pairs.add_column(1, START, pa.array(starts, type=pa.int64()))
            partial = self.partial_plan.with_custom_columns(self.partial_plan.partial(pairs))
            for start, part in split_by(partial, START):
                merged = self._merge_window(start, part.drop_columns([START]), pairs)
                changed.append((start, merged))
        return self._close(changed)

    def _merge_window(self, start: int, part: pa.Table, pairs: pa.Table) -> pa.Table:
        store: WindowStore = self.store
        current = store.windows.get(start)
        rest = None
        if current is None:
            merged = part
        else:
            touched = pc.is_in(current.column(KEY), value_set=part.column(KEY))
            rest = current.filter(pc.invert(touched))
            merged = self.plan.merge([current.filter(touched), part])
        if self.plan.custom:
            in_window = pc.equal(pairs.column(START), start)
            merged = self.plan.update_custom(merged, pairs.filter(in_window).drop_columns([START]))
        rows = merged if rest is None or not rest.num_rows else concat([rest, merged])
        store.set_window(start, rows, merged)
        return merged

    def _close(self, changed: list[tuple[int, pa.Table]] | None = None) -> list[pa.RecordBatch]:
        store: WindowStore = self.store
        watermark = self._watermark()
        closed = sorted(start for start in store.windows if start + self.size <= watermark)
        return self._emit(closed, changed or [])

    def _emit(self, closed: list[int], changed: list[tuple[int, pa.Table]]):
        store: WindowStore = self.store
        final = []
        for start in closed:
            rows = store.pop_window(start).sort_by(KEY)
            final.append((rows, np.full(rows.num_rows, start, np.int64),
                          np.full(rows.num_rows, start + self.size, np.int64)))
        updates = None
        if self.emit == "update":
            closed_set = set(closed)
            parts = [(rows.sort_by(KEY), np.full(rows.num_rows, start, np.int64),
                      np.full(rows.num_rows, start + self.size, np.int64))
                     for start, rows in sorted(changed, key=lambda item: item[0])
                     if start not in closed_set]
            updates = self._output(parts, final=False)
        return self._to_batches(updates, self._output(final, final=True))

    def flush(self) -> list[pa.RecordBatch]:
        if self.store is None:
            return []
        self._context().log_totals()
        return self._emit(sorted(self.store.windows), [])


class SessionAggregate(_WindowOperator):
    """Session windows: per key, open sessions merge when an event falls between them.

    NOTE: sessions close after each batch, not row by row. If one batch both
    moves the watermark past a session's end and contains an out-of-order event
    that overlaps that session, the event joins it, where row-by-row
    processing would have closed the session first. Lateness is decided row
    by row, and in-order input gives the same sessions for any batching.
    """

    kind = "session"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.gap = self.window.gap
        group = [KEY, "__session"]
        self.partial_plan = AggregationPlan(self.specs, group)
        self.plan = AggregationPlan(self.specs, [KEY])

    def _make_store(self, name: str) -> SessionStore:
        return SessionStore(name)

    def process(self, batch: pa.RecordBatch) -> list[pa.RecordBatch]:
        valid = self._valid_rows(batch)
        if valid is None:
            return self._close([])
        table, times = valid
        keys = table.column(KEY_COLUMN).combine_chunks()
        if pa.types.is_dictionary(keys.type):
            keys = keys.cast(keys.type.value_type)
        self._context().check_partitioning(keys)
        watermarks = self._watermarks(times)

        late = times + self.gap <= watermarks
        if late.any():
            self._send_late(table, late, watermarks)
            keep = ~late
            table = table.filter(pa.array(keep))
            keys = keys.filter(pa.array(keep))
            times = times[keep]
        if not len(times):
            return self._close([])
        merged = self._merge_sessions(table, keys, times)
        return self._close([merged])

    def _merge_sessions(self, table: pa.Table, keys: pa.Array, times: np.ndarray) -> pa.Table:
        store: SessionStore = self.store
        current = store.rows
        touched = rest = None
        if current is not None:
            mask = pc.is_in(current.column(KEY), value_set=keys)
            touched = current.filter(mask)
            rest = current.filter(pc.invert(mask))
        old = 0 if touched is None else touched.num_rows

        # Intervals: the touched sessions first, then one per new event.
        if old:
            item_keys = concat([pa.table({"k": touched.column(KEY)}),
                                pa.table({"k": keys})]).column("k").combine_chunks()
            item_starts = np.concatenate([touched.column(START).to_numpy(), times])
            item_ends = np.concatenate([touched.column(END).to_numpy(), times + self.gap])
        else:
            item_keys, item_starts, item_ends = keys, times, times + self.gap
        session_ids = _session_ids(item_keys, item_starts, item_ends)

        rows = self._inputs(table, None, keys)
        rows = rows.add_column(1, "__session", pa.array(session_ids[old:]))
        partial = self.partial_plan.partial(rows)
        bounds = pa.table({KEY: rows.column(KEY), "__session": rows.column("__session"),
                           "t": pa.array(times)}).group_by(
            [KEY, "__session"], use_threads=False).aggregate([("t", "min"), ("t", "max")])
        partial = partial.add_column(2, START, bounds.column("t_min"))
        partial = partial.add_column(3, END, pc.add(bounds.column("t_max"), self.gap))
        partial = _with_nulls(partial, self.plan)

        plan = self.partial_plan
        tables = [partial]
        if old:
            existing = touched.add_column(1, "__session", pa.array(session_ids[:old]))
            tables.insert(0, existing)
        merged = _merge_with_bounds(plan, tables)
        if plan.custom:
            merged = plan.update_custom(merged, rows)
        merged = merged.drop_columns(["__session"])
        store.replace(removed=touched, kept=rest, added=merged)
        return merged

    def _close(self, changed: list[pa.Table]) -> list[pa.RecordBatch]:
        store: SessionStore = self.store
        if store.rows is None:
            return self._emit(None, changed)
        watermark = self._watermark()
        ended = pc.less_equal(store.rows.column(END), watermark)
        if not pc.any(ended).as_py():
            return self._emit(None, changed)
        closed = store.rows.filter(ended)
        store.replace(removed=closed, kept=store.rows.filter(pc.invert(ended)), added=None)
        return self._emit(closed, changed)

    def _emit(self, closed: pa.Table | None, changed: list[pa.Table]):
        final = None
        if closed is not None and closed.num_rows:
            closed = closed.sort_by([(START, "ascending"), (KEY, "ascending")])
            final = self._output([_session_part(closed)], final=True)
        updates = None
        if self.emit == "update" and changed:
            open_rows = [t for t in changed if t.num_rows]
            if open_rows and self.store.rows is not None:
                still_open = concat(open_rows)
                alive = pc.greater(still_open.column(END), self._watermark())
                still_open = still_open.filter(alive).sort_by(
                    [(START, "ascending"), (KEY, "ascending")])
                updates = self._output([_session_part(still_open)], final=False)
        return self._to_batches(updates, final)

    def flush(self) -> list[pa.RecordBatch]:
        store = self.store
        if store is None or store.rows is None:
            return []
        self._context().log_totals()
        closed = store.rows
        store.replace(removed=closed, kept=None, added=None)
        return self._emit(closed, [])


def _session_part(rows: pa.Table) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    return (rows.drop_columns([START, END]), rows.column(START).to_numpy(),
            rows.column(END).to_numpy())


def _with_nulls(partial: pa.Table, plan: AggregationPlan) -> pa.Table:
    for spec in plan.custom:
        partial = partial.append_column(spec.name, pa.nulls(partial.num_rows, pa.binary()))
    names = [KEY, "__session", START, END, *plan.accumulator_names]
    return partial.select(names)


def _merge_with_bounds(plan: AggregationPlan, tables: list[pa.Table]) -> pa.Table:
    """Merge sessions' accumulators and widen their bounds to cover each other."""
    combined = concat(tables)
    merged = plan.merge([combined.drop_columns([START, END])])
    bounds = combined.select([KEY, "__session", START, END]).group_by(
        [KEY, "__session"], use_threads=False).aggregate([(START, "min"), (END, "max")])
    merged = merged.add_column(2, START, bounds.column(f"{START}_min"))
    return merged.add_column(3, END, bounds.column(f"{END}_max"))


def _session_ids(keys: pa.Array, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Number the sessions formed by intervals [start, end) of each key.

    Intervals of one key that overlap, directly or through others, share a
    number. Sorting by (key, start) and keeping a running max of the ends
    within each key finds where a new session begins: at an interval that
    starts at or after every earlier end.
    """
    codes = pc.dictionary_encode(keys).indices.to_numpy().astype(np.int64)
    order = np.lexsort((starts, codes))
    sorted_codes, sorted_starts, sorted_ends = codes[order], starts[order], ends[order]
    running_end = _segmented_running_max(sorted_codes, sorted_ends)
    new = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        same_key = sorted_codes[1:] == sorted_codes[:-1]
        new[1:] = ~same_key | (sorted_starts[1:] >= running_end[:-1])
    ids = np.empty(len(order), dtype=np.int64)
    ids[order] = np.cumsum(new) - 1
    return ids


def _segmented_running_max(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Running max of ``values`` restarting at each change of the sorted ``codes``."""
    low = int(values.min())
    span = int(values.max()) - low + 1
    segments = int(codes.max()) + 1
    if segments * span < 2**62:
        # Lift each key's values above every earlier key's, so one running
        # max over the whole array never carries across keys.
        lift = codes * span
        return np.maximum.accumulate(values - low + lift) - lift + low
    out = np.empty_like(values)
    bounds = np.flatnonzero(np.diff(codes)) + 1
    for chunk in np.split(np.arange(len(codes)), bounds):
        out[chunk] = np.maximum.accumulate(values[chunk])
    return out


def _minus(values: np.ndarray, amount: int) -> np.ndarray:
    # Saturate at int64's minimum instead of wrapping around.
    return np.where(values < _INT64_MIN + amount, _INT64_MIN, values - amount)
